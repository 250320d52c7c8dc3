//! `strata session`: copy-on-write disk sessions over a version, served by
//! `strata serve` and committed as new versions.
//!
//! A session's delta lives in `STORE/disk-sessions/NAME/`; the catalog records its
//! base (a gc root) and where its commits go. When `strata serve` holds a session
//! open, `commit` and `reset` are sent to it over its control socket, so clients stay
//! connected and keep writing; otherwise this process opens the session itself.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use strata_block::{SessionDisk, SessionInfo};
use strata_store::{CommitTarget, DiskSessionInfo, RefKind, Store, VersionId};

use crate::serve::{self, session_dir, Control};
use crate::spec::rev_spec;

#[derive(Debug, Serialize)]
pub struct CommitOut {
    pub session: String,
    pub image: String,
    pub branch: String,
    pub version: String,
    pub parent: String,
    pub committed_blocks: u64,
    pub remaining_blocks: u64,
    pub new_stored_bytes: u64,
}

/// Create session `name` over `from` (IMAGE, IMAGE:BRANCH or IMAGE@REV). Commits go
/// to the branch named (or `main` for a bare IMAGE); a session over a tag or version
/// id must be committed with `--branch`.
pub fn create(store: &Arc<Store>, name: &str, from: &str) -> Result<DiskSessionInfo> {
    strata_store::validate_name(name)?;
    if name.contains('@') || name.contains(':') {
        bail!("session name {name:?} may not contain '@' or ':'");
    }
    if session_dir(store, name)
        .join(strata_point::lazy::LAZY_FILE)
        .exists()
    {
        // Not in the catalog yet because its base is still streaming from the hub.
        bail!("a session named {name:?} exists: `strata point attach` is streaming its base");
    }
    let spec = rev_spec(from)?;
    let base = store.resolve(&spec.image, spec.rev.as_deref())?;
    let rev = spec.rev.as_deref().unwrap_or(strata_store::DEFAULT_BRANCH);
    let branch = store
        .get_ref(&spec.image, RefKind::Branch, rev)?
        .map(|_| rev.to_string());
    if store.disk_sessions()?.iter().any(|s| s.name == name) {
        bail!("a session named {name:?} already exists");
    }
    let dir = session_dir(store, name);
    if dir.exists() {
        // Left by a create that was interrupted before it was recorded.
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing stale {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.parent().expect("session dirs have a parent"))?;
    drop(SessionDisk::create(&dir, store.clone(), base)?);
    let info = DiskSessionInfo {
        name: name.to_string(),
        image: spec.image,
        branch,
        base: base.to_hex(),
        created: strata_store::catalog::now(),
    };
    if let Err(e) = store.add_disk_session(&info) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e.into());
    }
    Ok(info)
}

#[derive(Debug, Serialize)]
pub struct SessionRow {
    #[serde(flatten)]
    pub session: DiskSessionInfo,
    /// The delta on disk (absent if its directory is missing or unreadable).
    pub delta: Option<SessionInfo>,
    /// NBD clients connected to it now (0 when no `strata serve` runs).
    pub clients: u64,
    /// On a point: the base is still being streamed from the hub (how much is local).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streaming: Option<strata_point::LazyProgress>,
}

pub fn list(store: &Store) -> Result<Vec<SessionRow>> {
    let clients = serve::send_control(store, &Control::Clients)?
        .and_then(|v| v.get("clients").cloned())
        .unwrap_or_default();
    store
        .disk_sessions()?
        .into_iter()
        .map(|s| {
            let delta = SessionDisk::inspect(&session_dir(store, &s.name)).ok();
            let clients = clients.get(&s.name).and_then(|n| n.as_u64()).unwrap_or(0);
            Ok(SessionRow {
                session: s,
                delta,
                clients,
                streaming: None,
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(|mut rows| {
            rows.extend(streaming_rows(store, &clients));
            rows
        })
}

/// A point's sessions whose bases are still streamed from the hub: they are in the
/// catalog only once their base is local (a catalog session pins a complete base),
/// so they come from the point's state file.
fn streaming_rows(store: &Store, clients: &serde_json::Value) -> Vec<SessionRow> {
    let Ok(state) = strata_point::PointState::load(store.root()) else {
        return Vec::new();
    };
    state
        .sessions
        .into_iter()
        .filter_map(|(name, s)| {
            let progress = s.lazy?;
            let delta = SessionDisk::inspect(&session_dir(store, &name)).ok();
            let clients = clients.get(&name).and_then(|n| n.as_u64()).unwrap_or(0);
            Some(SessionRow {
                session: DiskSessionInfo {
                    name: name.clone(),
                    image: s.image,
                    branch: Some(s.branch),
                    base: s.origin_version,
                    created: 0,
                },
                delta,
                clients,
                streaming: Some(progress),
            })
        })
        .collect()
}

/// Commit an open session: the new version goes on the session's branch (or
/// `branch`), which must still point at the session's base.
pub fn commit(
    store: &Arc<Store>,
    name: &str,
    disk: &SessionDisk,
    message: &str,
    branch: Option<String>,
    author: &str,
) -> Result<CommitOut> {
    let info = store.disk_session(name)?;
    let Some(branch) = branch.or(info.branch.clone()) else {
        bail!("session {name:?} was not made from a branch: name one with --branch");
    };
    let base: VersionId = disk.base();
    let tip = store.get_ref(&info.image, RefKind::Branch, &branch)?;
    if let Some(tip) = tip {
        if tip != base {
            bail!(
                "{}:{branch} is at {}, but session {name:?} stands on {}: commit to another --branch",
                info.image,
                tip.short(),
                base.short()
            );
        }
    }
    let target = CommitTarget {
        image: info.image.clone(),
        branch: branch.clone(),
        expected: tip,
        create_image: false,
        parents: vec![base],
        author: author.to_string(),
        message: message.to_string(),
    };
    let r = disk.commit(&target)?;
    store.set_disk_session_base(name, &r.version)?;
    Ok(CommitOut {
        session: name.to_string(),
        image: info.image,
        branch,
        version: r.version.to_hex(),
        parent: r.parent.to_hex(),
        committed_blocks: r.committed_blocks,
        remaining_blocks: r.remaining_blocks,
        new_stored_bytes: r.stats.new_stored_bytes,
    })
}

/// Commit through a running server, or by opening the session here.
pub fn commit_cmd(
    store: &Arc<Store>,
    name: &str,
    message: &str,
    branch: Option<String>,
    author: &str,
) -> Result<serde_json::Value> {
    store.disk_session(name)?;
    let req = Control::Commit {
        session: name.to_string(),
        message: message.to_string(),
        branch: branch.clone(),
        author: author.to_string(),
    };
    if let Some(v) = serve::send_control(store, &req)? {
        return Ok(v);
    }
    let disk = open_here(store, name)?;
    Ok(serde_json::to_value(commit(
        store, name, &disk, message, branch, author,
    )?)?)
}

pub fn reset_cmd(store: &Arc<Store>, name: &str) -> Result<()> {
    store.disk_session(name)?;
    let req = Control::Reset {
        session: name.to_string(),
    };
    if serve::send_control(store, &req)?.is_some() {
        return Ok(());
    }
    open_here(store, name)?.reset()?;
    Ok(())
}

fn open_here(store: &Arc<Store>, name: &str) -> Result<SessionDisk> {
    let info = store.disk_session(name)?;
    let disk = SessionDisk::open(&session_dir(store, name), store.clone())?;
    serve::reconcile_base(store, name, &info.base, &disk)?;
    Ok(disk)
}

pub fn remove(store: &Arc<Store>, name: &str) -> Result<()> {
    store.disk_session(name)?;
    let dir = session_dir(store, name);
    if dir.exists() {
        SessionDisk::remove(&dir)?;
    }
    store.remove_disk_session(name)?;
    Ok(())
}
