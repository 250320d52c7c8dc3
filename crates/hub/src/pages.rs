//! Page indexes of the versions points pull against, built on first use and kept.
//!
//! A point pulling gold v2 names the version it holds (v1); the hub then sends
//! blocks compressed against v1's pages wherever they sit (see
//! [`strata_sync::pages`]). The index of v1 is built once, by one thread, however
//! many points of a fleet ask at the same time, and kept on disk under
//! `HUB_DIR/page-index/` for the next rollout; the newest [`KEEP`] are kept. A
//! download waits for a build in progress only up to a limit, then goes on without
//! page references rather than risk the client's read timeout. A channel that moves
//! has its new version indexed at once, ahead of the next rollout that will need it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use strata_store::{RefKind, Store, VersionId};
use strata_sync::pages::PageIndex;

/// Index files kept on disk.
const KEEP: usize = 32;
/// Versions walked back from a branch tip to find the one a point names.
const HISTORY_LIMIT: usize = 4096;

#[derive(Clone)]
enum Slot {
    Ready(Arc<PageIndex>),
    Building(Arc<(Mutex<bool>, Condvar)>),
    /// Building failed (logged); not retried until the hub restarts.
    Failed,
}

pub(crate) struct PageIndexes {
    dir: PathBuf,
    slots: Mutex<HashMap<VersionId, Slot>>,
    /// (image, version) pairs known to belong together.
    members: Mutex<HashSet<(String, VersionId)>>,
}

/// Where hub directory `hub_dir` keeps its page index files (`VERSION.idx`).
pub(crate) fn index_dir(hub_dir: &Path) -> PathBuf {
    hub_dir.join("page-index")
}

impl PageIndexes {
    pub fn new(hub_dir: &Path) -> PageIndexes {
        PageIndexes {
            dir: index_dir(hub_dir),
            slots: Mutex::new(HashMap::new()),
            members: Mutex::new(HashSet::new()),
        }
    }

    fn path(&self, vid: &VersionId) -> PathBuf {
        self.dir.join(format!("{}.idx", vid.to_hex()))
    }

    /// Whether `vid` is a version of `image` (named by one of its refs, or in a
    /// branch's recent history): a point may only name bases it can read.
    pub fn belongs(&self, store: &Store, image: &str, vid: &VersionId) -> bool {
        let key = (image.to_string(), *vid);
        if lock(&self.members).contains(&key) {
            return true;
        }
        let found = (|| -> Result<bool, strata_store::StoreError> {
            let mut tips = Vec::new();
            for kind in [RefKind::Branch, RefKind::Tag] {
                for r in store.refs(image, kind)? {
                    let Some(v) = VersionId::from_hex(&r.version) else {
                        continue;
                    };
                    if v == *vid {
                        return Ok(true);
                    }
                    if kind == RefKind::Branch {
                        tips.push(v);
                    }
                }
            }
            for tip in tips {
                if store
                    .history(&tip, HISTORY_LIMIT)?
                    .iter()
                    .any(|(v, _)| v == vid)
                {
                    return Ok(true);
                }
            }
            Ok(false)
        })()
        .unwrap_or(false);
        if found {
            lock(&self.members).insert(key);
        }
        found
    }

    /// The index of `vid`, starting its build if there is none; waits at most
    /// `wait` for a build in progress (`None`: not ready, or it failed).
    pub fn get(
        self: &Arc<Self>,
        store: &Arc<Store>,
        vid: VersionId,
        wait: Duration,
    ) -> Option<Arc<PageIndex>> {
        let building = match self.slot(store, vid) {
            Slot::Ready(i) => return Some(i),
            Slot::Failed => return None,
            Slot::Building(b) => b,
        };
        let (done, cv) = &*building;
        let guard = done.lock().unwrap_or_else(|p| p.into_inner());
        let _ = cv.wait_timeout_while(guard, wait, |d| !*d);
        match lock(&self.slots).get(&vid) {
            Some(Slot::Ready(i)) => Some(i.clone()),
            _ => None,
        }
    }

    /// Start indexing `vid` in the background if it is not indexed.
    pub fn prepare(self: &Arc<Self>, store: &Arc<Store>, vid: VersionId) {
        let _ = self.slot(store, vid);
    }

    fn slot(self: &Arc<Self>, store: &Arc<Store>, vid: VersionId) -> Slot {
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.get(&vid) {
            return s.clone();
        }
        let path = self.path(&vid);
        if let Ok(i) = PageIndex::open(&path) {
            if i.version() == vid {
                let s = Slot::Ready(Arc::new(i));
                slots.insert(vid, s.clone());
                return s;
            }
        }
        let b = Arc::new((Mutex::new(false), Condvar::new()));
        slots.insert(vid, Slot::Building(b.clone()));
        drop(slots);
        let (me, store, b2) = (self.clone(), store.clone(), b.clone());
        let spawned = std::thread::Builder::new()
            .name("page-index".into())
            .spawn(move || {
                let t0 = std::time::Instant::now();
                let slot = match PageIndex::build(&store, &vid, &path) {
                    Ok(i) => {
                        tracing::info!(version = %vid, pages = i.pages(),
                            secs = t0.elapsed().as_secs_f64(), "page index built");
                        Slot::Ready(Arc::new(i))
                    }
                    Err(e) => {
                        tracing::warn!(version = %vid, error = %e, "page index not built");
                        Slot::Failed
                    }
                };
                lock(&me.slots).insert(vid, slot);
                me.prune(&vid);
                let (done, cv) = &*b2;
                *done.lock().unwrap_or_else(|p| p.into_inner()) = true;
                cv.notify_all();
            });
        if spawned.is_err() {
            lock(&self.slots).insert(vid, Slot::Failed);
            return Slot::Failed;
        }
        Slot::Building(b)
    }

    /// Keep the newest [`KEEP`] index files (never `keep`, just built).
    fn prune(&self, keep: &VersionId) {
        let files: Vec<(std::time::SystemTime, PathBuf)> = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".idx"))
                .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                .collect(),
            Err(_) => Vec::new(),
        };
        if files.len() > KEEP {
            let mut files = files;
            files.sort();
            let excess = files.len() - KEEP;
            for (_, p) in files.into_iter().take(excess) {
                if p != self.path(keep) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        self.forget_removed();
    }

    /// Drop the loaded indexes whose files are gone (pruned here, or removed by a
    /// gc, the hub's own or `strata hub gc`), so that memory follows the files.
    pub fn forget_removed(&self) {
        lock(&self.slots).retain(|vid, s| !matches!(s, Slot::Ready(_)) || self.path(vid).exists());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
