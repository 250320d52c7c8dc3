//! `point-state.json`: the sessions this point attached, and what it knows of their
//! copies on the hub. Written atomically after every change; read by `point status`
//! whether or not an agent runs.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use strata_sync::TransferStats;

use crate::{io_err, write_atomic, PointError, Result};

pub const STATE_FILE: &str = "point-state.json";

/// One attached session: a local image `image` (a clone of `origin`) whose branch
/// `branch` the session commits to, and which the point pushes to its own image of
/// the same name on the hub.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SessionState {
    pub image: String,
    pub branch: String,
    /// What it was attached from, as given (`gold@v1`), and that version's id.
    pub origin: String,
    pub origin_version: String,
    /// The hub's tip of `image:branch` as of the last successful push (hex).
    pub hub_tip: Option<String>,
    /// What the last push that sent something moved, and when.
    pub last_push: Option<TransferStats>,
    pub last_push_time: Option<i64>,
    /// Set while the session's base is still being streamed from the hub (attached
    /// lazily): sync rounds do not commit the session until it is local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<crate::lazy::LazyProgress>,
    /// A desktop's OS disk: its writes are thrown away when the channel moves, so
    /// sync rounds neither commit nor push it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disposable: bool,
    /// A desktop's OS disk: the operators' OS reset requests it has applied (it
    /// starts over from the channel's version at the next start when the hub counts
    /// more).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub os_reset: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PointState {
    /// Session name → its state.
    pub sessions: BTreeMap<String, SessionState>,
    /// Seconds since the epoch of the last sync round that reached the hub for every
    /// session, and of the last attempt.
    pub last_sync: Option<i64>,
    pub last_attempt: Option<i64>,
    /// Why the last attempt failed (cleared by a success).
    pub last_error: Option<String>,
}

impl PointState {
    pub fn load(store_root: &Path) -> Result<PointState> {
        let path = store_root.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| PointError::Invalid(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PointState::default()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub fn save(&self, store_root: &Path) -> Result<()> {
        let mut b = serde_json::to_vec_pretty(self).expect("state serializes");
        b.push(b'\n');
        write_atomic(&store_root.join(STATE_FILE), &b, 0o644)
    }
}
