//! `IMAGE@REV` and `IMAGE:BRANCH` arguments.

use anyhow::{bail, Result};

/// An image and, optionally, a revision of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevSpec {
    pub image: String,
    pub rev: Option<String>,
}

/// `IMAGE`, `IMAGE@REV` or `IMAGE:BRANCH` (a branch is a revision too).
pub fn rev_spec(s: &str) -> Result<RevSpec> {
    let (image, rev) = match (s.split_once('@'), s.split_once(':')) {
        (Some((i, r)), _) => (i, Some(r)),
        (None, Some((i, b))) => (i, Some(b)),
        (None, None) => (s, None),
    };
    if image.is_empty() {
        bail!("{s:?}: missing image name (expected IMAGE@REV)");
    }
    if rev == Some("") {
        bail!("{s:?}: empty revision after the image name");
    }
    Ok(RevSpec {
        image: image.to_string(),
        rev: rev.map(str::to_string),
    })
}

/// `IMAGE` or `IMAGE:BRANCH` (default branch main).
pub fn branch_target(s: &str) -> Result<(String, String)> {
    if s.contains('@') {
        bail!("{s:?}: a new version goes on a branch: use IMAGE or IMAGE:BRANCH, not IMAGE@REV");
    }
    let (image, branch) = s
        .split_once(':')
        .unwrap_or((s, strata_store::DEFAULT_BRANCH));
    if image.is_empty() || branch.is_empty() {
        bail!("{s:?}: expected IMAGE or IMAGE:BRANCH");
    }
    Ok((image.to_string(), branch.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            rev_spec("win11/gold@v1~2").unwrap(),
            RevSpec {
                image: "win11/gold".into(),
                rev: Some("v1~2".into())
            }
        );
        assert_eq!(rev_spec("a:dev").unwrap().rev.as_deref(), Some("dev"));
        assert_eq!(rev_spec("a").unwrap().rev, None);
        assert!(rev_spec("@x").is_err());
        assert!(rev_spec("a@").is_err());
        assert_eq!(
            branch_target("a:b").unwrap(),
            ("a".to_string(), "b".to_string())
        );
        assert_eq!(branch_target("a").unwrap().1, "main");
        assert!(branch_target("a@b").is_err());
    }
}
