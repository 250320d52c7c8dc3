//! Restore points of desktops' user disks, and the policy that prunes them.
//!
//! Every version of a user disk that reaches the hub's `main` (a point's sync, a
//! restore) gets a tag `rp/<time>-<id>`; the user image is marked
//! [`strata_store::Store::set_history_by_refs`], so gc keeps exactly the versions
//! some ref names — `main`, recovery branches, and the restore-point tags the
//! [`Retention`] policy keeps — and no others, even though each version's record
//! still names its parent.
//!
//! The policy works like `restic forget`: newest first, keep the newest restore
//! point of each of the last `hourly` distinct hours that have one, of the last
//! `daily` days, of the last `monthly` months (UTC), and the `last` newest ones; a
//! restore point kept by any rule stays.

use std::collections::BTreeSet;
use std::str::FromStr;

use strata_store::{RefKind, Store, VersionId};

pub const RP_PREFIX: &str = "rp/";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub monthly: u32,
}

impl Default for Retention {
    /// Hourly for a day, daily for a month, monthly for a year.
    fn default() -> Retention {
        Retention {
            last: 1,
            hourly: 24,
            daily: 30,
            monthly: 12,
        }
    }
}

impl FromStr for Retention {
    type Err = String;

    /// `last=3,hourly=24,daily=30,monthly=12` (rules left out keep nothing).
    fn from_str(s: &str) -> Result<Retention, String> {
        let mut r = Retention {
            last: 0,
            hourly: 0,
            daily: 0,
            monthly: 0,
        };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected RULE=COUNT"))?;
            let n: u32 = v
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: {v:?} is not a count"))?;
            match k.trim() {
                "last" => r.last = n,
                "hourly" => r.hourly = n,
                "daily" => r.daily = n,
                "monthly" => r.monthly = n,
                other => {
                    return Err(format!(
                        "unknown rule {other:?} (last, hourly, daily, monthly)"
                    ))
                }
            }
        }
        if r == (Retention {
            last: 0,
            hourly: 0,
            daily: 0,
            monthly: 0,
        }) {
            return Err("a policy that keeps nothing".into());
        }
        Ok(r)
    }
}

/// (year, month) of a Unix time, UTC (days-to-civil, proleptic Gregorian).
fn year_month(t: i64) -> (i64, u32) {
    let z = t.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

impl Retention {
    /// Which of `times` (Unix seconds, any order) to keep: their indices.
    pub fn keep(&self, times: &[i64]) -> BTreeSet<usize> {
        let mut order: Vec<usize> = (0..times.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(times[i]));
        let mut keep: BTreeSet<usize> = order.iter().take(self.last as usize).copied().collect();
        let mut rule = |n: u32, bucket: &dyn Fn(i64) -> (i64, u32)| {
            let mut seen = BTreeSet::new();
            for &i in &order {
                if seen.len() >= n as usize {
                    break;
                }
                if seen.insert(bucket(times[i])) {
                    keep.insert(i);
                }
            }
        };
        rule(self.hourly, &|t| (t.div_euclid(3600), 0));
        rule(self.daily, &|t| (t.div_euclid(86_400), 0));
        rule(self.monthly, &year_month);
        keep
    }
}

/// The tag name of a restore point of version `v` made at `time`.
pub fn tag_name(time: i64, v: &VersionId) -> String {
    format!("{RP_PREFIX}{time}-{}", &v.to_hex()[..12])
}

/// Tag version `v` of `image` as a restore point (nothing if it is one already).
pub fn add_restore_point(store: &Store, image: &str, v: &VersionId) -> strata_store::Result<()> {
    let time = store.load_version(v)?.time;
    let name = tag_name(time, v);
    match store.create_ref(image, RefKind::Tag, &name, v) {
        Ok(()) | Err(strata_store::StoreError::RefExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The restore points of `image`: (time, tag name, version), newest first.
pub fn restore_points(
    store: &Store,
    image: &str,
) -> strata_store::Result<Vec<(i64, String, VersionId)>> {
    let out: Vec<(i64, String, VersionId)> = store
        .refs(image, RefKind::Tag)?
        .into_iter()
        .filter_map(|r| {
            let rest = r.name.strip_prefix(RP_PREFIX)?;
            let time: i64 = rest.split('-').next()?.parse().ok()?;
            Some((time, r.name, VersionId::from_hex(&r.version)?))
        })
        .collect();
    // Versions record their time to the second, and two syncs can fall in one:
    // within a second, a version that has the others in its history is newer.
    let newer_than = |v: &VersionId, t: i64| -> usize {
        let same: Vec<VersionId> = out
            .iter()
            .filter(|(ot, _, ov)| *ot == t && ov != v)
            .map(|(_, _, ov)| *ov)
            .collect();
        if same.is_empty() {
            return 0;
        }
        let mut todo = vec![*v];
        let mut seen = std::collections::HashSet::new();
        while let Some(x) = todo.pop() {
            let Ok(ver) = store.load_version(&x) else {
                continue;
            };
            if ver.time < t {
                continue; // older than the second: none of `same` is further back
            }
            for p in ver.parent_ids().unwrap_or_default() {
                if seen.len() < 256 && seen.insert(p) {
                    todo.push(p);
                }
            }
        }
        same.iter().filter(|o| seen.contains(o)).count()
    };
    let rank: Vec<usize> = out.iter().map(|(t, _, v)| newer_than(v, *t)).collect();
    let mut ranked: Vec<((i64, String, VersionId), usize)> = out.into_iter().zip(rank).collect();
    ranked.sort_by_key(|((t, _, _), r)| (std::cmp::Reverse(*t), std::cmp::Reverse(*r)));
    Ok(ranked.into_iter().map(|(x, _)| x).collect())
}

/// Delete the restore-point tags of `image` that `policy` does not keep; returns
/// how many went (their versions go at the next gc unless another ref names them).
pub fn prune(store: &Store, image: &str, policy: &Retention) -> strata_store::Result<usize> {
    let points = restore_points(store, image)?;
    let times: Vec<i64> = points.iter().map(|(t, _, _)| *t).collect();
    let keep = policy.keep(&times);
    let mut n = 0;
    for (i, (_, name, _)) in points.iter().enumerate() {
        if !keep.contains(&i) {
            store.delete_ref(image, RefKind::Tag, name)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3600;
    const D: i64 = 86_400;

    #[test]
    fn months_are_calendar_months() {
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(31 * D - 1), (1970, 1));
        assert_eq!(year_month(31 * D), (1970, 2));
        // 2024-02-29 12:00 UTC and 2024-03-01 00:00 UTC.
        assert_eq!(year_month(1_709_208_000), (2024, 2));
        assert_eq!(year_month(1_709_251_200), (2024, 3));
    }

    #[test]
    fn keeps_exactly_what_the_rules_say() {
        // Every 20 minutes for 3 days, then one a day for 70 days before that.
        let now = 1_800_000_000 - 1_800_000_000 % D;
        let mut times: Vec<i64> = (0..(3 * 72)).map(|k| now - k * 20 * 60).collect();
        times.extend((3..73).map(|d| now - d * D - 5 * H));
        let p = Retention {
            last: 2,
            hourly: 24,
            daily: 30,
            monthly: 12,
        };
        let kept = p.keep(&times);
        let mut kept_times: Vec<i64> = kept.iter().map(|&i| times[i]).collect();
        kept_times.sort_by_key(|t| std::cmp::Reverse(*t));
        // last=2: the two newest.
        assert!(kept_times.contains(&now) && kept_times.contains(&(now - 20 * 60)));
        // hourly=24: the newest of each of the 24 newest hours.
        for h in 0..24 {
            let newest_in_hour = times
                .iter()
                .copied()
                .filter(|t| t.div_euclid(H) == (now - h * H).div_euclid(H))
                .max()
                .unwrap();
            assert!(kept_times.contains(&newest_in_hour), "hour {h}");
        }
        // daily=30 and monthly=12 likewise: the newest of each of the newest 30 days
        // and 12 months that have restore points.
        for (n, f) in [
            (
                30usize,
                &(|x: i64| (x.div_euclid(D), 0u32)) as &dyn Fn(i64) -> (i64, u32),
            ),
            (12, &year_month),
        ] {
            let mut buckets: Vec<(i64, u32)> = times.iter().map(|t| f(*t)).collect();
            buckets.sort();
            buckets.dedup();
            for b in buckets.iter().rev().take(n) {
                let newest = times.iter().copied().filter(|t| f(*t) == *b).max().unwrap();
                assert!(kept_times.contains(&newest), "bucket {b:?}");
            }
        }
        // Nothing else: every kept time is one of the last two or the newest of one of
        // the buckets the rules count.
        for &t in &kept_times {
            let newest = |f: &dyn Fn(i64) -> (i64, u32)| {
                times.iter().copied().filter(|x| f(*x) == f(t)).max() == Some(t)
            };
            assert!(
                t >= now - 20 * 60
                    || newest(&|x| (x.div_euclid(H), 0))
                    || newest(&|x| (x.div_euclid(D), 0))
                    || newest(&year_month),
                "{t} kept for no rule"
            );
        }
        // The oldest daily points beyond 30 days of history and 12 months go.
        assert!(kept.len() < times.len());
        // A policy parses and refuses nonsense.
        assert_eq!(
            "hourly=24,daily=30,monthly=12,last=1"
                .parse::<Retention>()
                .unwrap(),
            Retention::default()
        );
        assert!("weekly=3".parse::<Retention>().is_err());
        assert!("".parse::<Retention>().is_err());
    }
}
