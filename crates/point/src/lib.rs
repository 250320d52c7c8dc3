//! # strata-point: the point agent's logic
//!
//! A *point* is an endpoint (a laptop, a branch server) that serves disks to local
//! VMs from a local cache and keeps a hub in the data centre up to date. On disk a
//! point is an ordinary Strata store (the cache) plus three files:
//!
//! ```text
//! STORE/
//!   point.json         hub URL, point name, CA file, sync interval, max rate
//!   point.credential   the point's bearer credential from enrolment (mode 0600)
//!   point-state.json   the sessions this point attached and what the hub has of them
//!   point.sock         control socket of a running agent (`strata point run`)
//! ```
//!
//! This crate holds what does not depend on NBD or on how sessions are opened:
//! enrolment ([`enroll`]), reading the configuration ([`Point::open`]), pulling a
//! version ([`Point::pull`], resuming after cuts, optionally seeded from a local
//! image: [`seed`]), fetching the base of a new
//! session in full ([`Point::fetch_base`]) or lazily (streaming start: see [`lazy`]),
//! recording attached sessions, and one sync round ([`Point::sync`]: commit each
//! session that has new writes, then push its image to the hub, only what the hub
//! lacks). The command (`crates/cli`, `point_cmd.rs`) supplies the NBD server and
//! the session commits through [`SessionCommitter`].
//!
//! **Offline.** Commits are local first: a sync whose push fails leaves the new
//! versions in the local store, and the next round pushes everything the hub lacks
//! (push walks the tree against the hub's answers, so a day of versions costs only
//! the blocks that changed since the hub's copy).

pub mod config;
pub mod lazy;
pub mod seed;
pub mod state;
mod sync;

pub use config::{enroll, EnrollOptions, PointConfig, CONFIG_FILE, CREDENTIAL_FILE};
pub use lazy::{LazyBase, LazyConfig, LazyProgress, RemoteTree};
pub use seed::ImageSeed;
pub use state::{PointState, SessionState};
pub use sync::{
    Point, PullReport, SessionCommitter, SessionStatus, SessionSync, Status, SyncReport,
};

/// Errors of the point's operations.
#[derive(Debug, thiserror::Error)]
pub enum PointError {
    #[error(transparent)]
    Store(#[from] strata_store::StoreError),
    #[error(transparent)]
    Sync(#[from] strata_sync::SyncError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    /// Committing a session failed (reported by the [`SessionCommitter`]).
    #[error("committing session {session}: {message}")]
    Commit { session: String, message: String },
}

impl PointError {
    /// Worth trying again later (the hub or the link failed).
    pub fn is_transient(&self) -> bool {
        matches!(self, PointError::Sync(e) if e.is_transient())
    }
}

pub type Result<T> = std::result::Result<T, PointError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> PointError + '_ {
    move |source| PointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Write `bytes` to `path` atomically (temporary file, fsync, rename, fsync dir),
/// creating it with `mode`.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Unique per writer: two processes (the agent and a command) may write at once.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
