//! The hub's gc: the store's gc (safe while points push and pull; see
//! `strata_store::gc`), then the page indexes of versions it removed.
//!
//! Retention prunes restore points by dropping their tags; the versions go only
//! when gc runs. A running hub does that on its own every
//! [`HubConfig::gc_interval`](crate::HubConfig::gc_interval); `strata hub gc` runs the
//! same from another process at any time (the store's `gc.lock` lets one run at a
//! time, and a second is told so rather than waiting).

use std::path::Path;

use serde::Serialize;
use strata_store::gc::{GcPhase, GcReport};
use strata_store::{Store, VersionId};

/// What [`gc`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HubGcReport {
    #[serde(flatten)]
    pub store: GcReport,
    /// Page index files dropped because their version is gone.
    pub page_indexes_removed: u64,
}

/// Run gc on the store of hub directory `hub_dir`, then remove page index files of
/// versions the store no longer has.
pub fn gc(
    hub_dir: &Path,
    store: &Store,
    progress: &mut dyn FnMut(GcPhase),
) -> Result<HubGcReport, strata_store::StoreError> {
    let report = strata_store::gc::gc(store, progress)?;
    let page_indexes_removed = remove_stale_indexes(&crate::pages::index_dir(hub_dir), store);
    Ok(HubGcReport {
        store: report,
        page_indexes_removed,
    })
}

/// Remove `DIR/VERSION.idx` files whose version `store` lacks. A file whose name is
/// not a version id is left alone (it is not ours to judge).
fn remove_stale_indexes(dir: &Path, store: &Store) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(vid) = name.strip_suffix(".idx").and_then(VersionId::from_hex) else {
            continue;
        };
        if matches!(
            store.load_version(&vid),
            Err(strata_store::StoreError::MissingObject { .. })
        ) && std::fs::remove_file(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}
