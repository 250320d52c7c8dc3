//! [`Point`]: pulls, base fetches for new sessions, sync rounds and status.
//!
//! **Desktops in a sync round.** For each desktop whose user disk it holds, the
//! round commits the user disk, then reports to the hub what the point runs and what
//! it has that the hub lacks ([`Point::desktop_report`]; a long push over a slow link
//! shows meanwhile as pending bytes), pushes, and, if there was something to push,
//! reports again once the round is recorded (nothing pending, and when it last
//! synced). A report or push refused with 403 means the desktop was checked out
//! elsewhere: the point first *seals* both disks where they are served (through the
//! serving process's control socket, `STORE/serve.sock`: every further read, write
//! and flush of a connected VM fails), commits the user disk once more, so its last
//! version holds exactly the writes the VM was told had succeeded, keeps that on the
//! hub as a `recovery/POINT-TIME` branch, and stops syncing both disks (the agent
//! then stops serving them).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use strata_store::{RefKind, Store, StoreError, VersionId};
use strata_sync::api::DesktopPointReport;
use strata_sync::{Expect, HubClient, PullOptions, PushOptions, SyncError, TransferStats};

use crate::config::{client_config, PointConfig, CREDENTIAL_FILE};
use crate::state::{PointState, SessionState};
use crate::{io_err, now, PointError, Result};

/// Commits the point's sessions; the command implements it over its open sessions
/// (through the NBD server's disks when the agent runs, else by opening them).
pub trait SessionCommitter: Send + Sync {
    /// Commit session `name` if it holds writes that are not in a version yet.
    /// Returns the new version's id (hex), or `None` when there was nothing to commit.
    fn commit_if_dirty(&self, name: &str) -> std::result::Result<Option<String>, String>;
}

/// What `point pull` (or the base fetch of `point attach`) moved.
#[derive(Clone, Debug, Serialize)]
pub struct PullReport {
    pub image: String,
    pub rev: String,
    /// The version now complete in the local store (hex) and the local branch moved.
    pub version: String,
    pub branch: String,
    /// Objects the last (successful) attempt fetched; earlier attempts' objects that
    /// arrived whole were kept and are not fetched again.
    pub objects: u64,
    pub logical_bytes: u64,
    /// Body bytes on the wire over all attempts, both directions.
    pub wire_sent: u64,
    pub wire_received: u64,
    /// Runs of the transfer (1 without failures), and requests retried within the
    /// last run (a failed run reports nothing back).
    pub attempts: u32,
    pub retries: u64,
    pub seconds: f64,
    /// The last attempt's details.
    pub transfer: TransferStats,
}

/// What a cut pull run must have received to count as progress (a run that got
/// less does not reset [`Point::pull`]'s count of failed runs).
const PROGRESS_BYTES: u64 = 64 << 10;

/// One session's part of a sync round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SessionSync {
    pub session: String,
    pub image: String,
    pub branch: String,
    /// The version this round committed (hex), if the session had new writes.
    pub committed: Option<String>,
    /// What the push sent, if the hub lacked the local tip.
    pub pushed: Option<TransferStats>,
    /// The hub's tip after this round (hex), if it was reached.
    pub hub_tip: Option<String>,
    pub error: Option<String>,
    /// Percent of the base local, while it is still being streamed (not committed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetching: Option<f64>,
    /// The error is worth retrying (the hub or the link failed).
    #[serde(skip)]
    pub transient: bool,
    /// The session was a desktop's user disk now checked out elsewhere: its local
    /// changes went to this hub branch, and the point no longer syncs it. (Its OS
    /// disk is listed too, with the same branch: its changes are disposable.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<String>,
}

/// Images of desktops' disks on the hub (`desktops/NAME/user`).
pub const DESKTOP_IMAGE_PREFIX: &str = "desktops/";

/// The session (and local image) of desktop `name`'s user disk on a point.
fn desktop_user_session(name: &str) -> String {
    format!("{DESKTOP_IMAGE_PREFIX}{name}/user")
}

/// The session of desktop `name`'s OS disk on a point.
fn desktop_os_session(name: &str) -> String {
    format!("{DESKTOP_IMAGE_PREFIX}{name}/os")
}

/// The desktop whose user disk session `name` is.
fn desktop_of(name: &str) -> Option<&str> {
    name.strip_prefix(DESKTOP_IMAGE_PREFIX)?
        .strip_suffix("/user")
        .filter(|d| !d.is_empty())
}

/// Where a session's delta lives in a store (`STORE/disk-sessions/NAME`, see
/// `docs/architecture.md`).
fn session_dir(root: &Path, name: &str) -> PathBuf {
    root.join("disk-sessions").join(name)
}

/// The control socket of the process serving the store's sessions (`strata serve`,
/// or the agent, which embeds it: `crates/cli/src/serve.rs`).
const SERVE_SOCKET: &str = "serve.sock";

/// A sync round.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncReport {
    pub time: i64,
    pub ok: bool,
    pub sessions: Vec<SessionSync>,
    /// New channel versions of desktops held here, fetched ahead of their next start
    /// (`IMAGE@VERSION`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prefetched: Vec<String>,
    /// Bytes on the wire for the whole round.
    pub wire_sent: u64,
    pub wire_received: u64,
    pub seconds: f64,
}

impl SyncReport {
    /// Every failure in the round was the hub's or the link's (retry soon).
    pub fn only_transient_failures(&self) -> bool {
        self.sessions
            .iter()
            .all(|s| s.error.is_none() || s.transient)
    }
}

/// `point status` for one session.
#[derive(Clone, Debug, Serialize)]
pub struct SessionStatus {
    pub session: String,
    pub image: String,
    pub branch: String,
    pub origin: String,
    pub origin_version: String,
    /// The session's current base (its last commit) and the local branch tip.
    pub base: Option<String>,
    pub local_tip: Option<String>,
    /// The hub's tip: asked of the hub when reachable, else as of the last push.
    pub hub_tip: Option<String>,
    pub hub_tip_from: &'static str,
    /// Local versions on the branch the hub does not have yet.
    pub pending_versions: u64,
    /// Blocks written to the session since its last commit (as of its last flush).
    pub uncommitted_blocks: Option<u64>,
    pub last_push: Option<TransferStats>,
    pub last_push_time: Option<i64>,
    /// While the base is still being streamed from the hub: how far it got.
    pub prefetch: Option<crate::lazy::LazyProgress>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub point: String,
    pub hub: String,
    pub hub_reachable: bool,
    pub hub_error: Option<String>,
    pub sync_interval_secs: u64,
    pub max_rate: Option<u64>,
    pub last_sync: Option<i64>,
    pub last_attempt: Option<i64>,
    pub last_error: Option<String>,
    pub sessions: Vec<SessionStatus>,
}

/// Run blocking store work from async code (see `strata_sync::transfer`).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// An enrolled point over its local store.
pub struct Point {
    store: Arc<Store>,
    root: PathBuf,
    config: PointConfig,
    client: HubClient,
    /// One sync round at a time (the agent's loop and `point sync` requests).
    sync_lock: tokio::sync::Mutex<()>,
    /// Serialises read-modify-write of the state file within this process.
    state_lock: std::sync::Mutex<()>,
}

impl Point {
    /// The point whose cache is `store` (which must have been enrolled).
    pub fn open(store: Arc<Store>) -> Result<Point> {
        let root = store.root().to_path_buf();
        let config = PointConfig::load(&root)?;
        let client = config.client(&root)?;
        Ok(Point {
            store,
            root,
            config,
            client,
            sync_lock: tokio::sync::Mutex::new(()),
            state_lock: std::sync::Mutex::new(()),
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &PointConfig {
        &self.config
    }

    pub fn client(&self) -> &HubClient {
        &self.client
    }

    /// Where a running agent listens for `point sync`.
    pub fn control_path(&self) -> PathBuf {
        self.root.join("point.sock")
    }

    pub fn state(&self) -> Result<PointState> {
        PointState::load(&self.root)
    }

    fn update_state(&self, f: impl FnOnce(&mut PointState)) -> Result<()> {
        let _g = self.state_lock.lock().unwrap_or_else(|p| p.into_inner());
        // And across processes: the agent records progress while a command (attach,
        // desktop start) records sessions; neither may lose the other's change.
        let lock_path = self.root.join("point-state.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        lock.lock().map_err(io_err(&lock_path))?;
        let mut st = PointState::load(&self.root)?;
        f(&mut st);
        st.save(&self.root)
    }

    /// Fetch version `rev` of `image` completely (only the objects the local store
    /// lacks) and move the local branch (see [`strata_sync::pull`]). A run cut by the
    /// link is run again, each resuming where the last stopped, until `attempts`
    /// runs in a row received nothing.
    ///
    /// With a `seed` (a local copy of the image, see [`crate::ImageSeed`]), blocks the
    /// seed holds at the same place with the right hash are taken from it instead
    /// (the report's `transfer.seeded` counts those of the last attempt).
    pub async fn pull(
        &self,
        image: &str,
        rev: &str,
        attempts: u32,
        seed: Option<Arc<dyn strata_sync::Seed>>,
    ) -> Result<PullReport> {
        let t0 = Instant::now();
        let wire0 = self.client.wire();
        let mut attempt = 0u32;
        let opts = PullOptions {
            seed,
            ..PullOptions::default()
        };
        // Runs in a row that received nothing: only those count toward `attempts`
        // and lengthen the pause. A run cut after it received data made progress
        // (what arrived whole is kept), so a long pull over a link that keeps
        // failing goes on as long as it gets somewhere.
        let mut stalled = 0u32;
        let stats = loop {
            attempt += 1;
            let received = self.client.wire().received;
            match strata_sync::pull(&self.store, &self.client, image, rev, &opts).await {
                Ok(s) => break s,
                Err(e) if e.is_transient() => {
                    if self.client.wire().received - received >= PROGRESS_BYTES {
                        stalled = 0;
                    } else {
                        stalled += 1;
                    }
                    if stalled >= attempts.max(1) {
                        return Err(e.into());
                    }
                    let wait = Duration::from_millis(500u64 << stalled.min(4));
                    tracing::warn!(error = %e, attempt, "pull interrupted; resuming in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let wire = self.client.wire();
        Ok(PullReport {
            image: image.to_string(),
            rev: rev.to_string(),
            version: stats.version.clone(),
            branch: stats.branch.clone(),
            objects: stats.objects(),
            logical_bytes: stats.logical_bytes,
            wire_sent: wire.sent - wire0.sent,
            wire_received: wire.received - wire0.received,
            attempts: attempt,
            retries: stats.retries,
            seconds: t0.elapsed().as_secs_f64(),
            transfer: stats,
        })
    }

    /// Make version `rev` of `image` usable as the base of a new session.
    ///
    /// Today this fetches the whole version ahead of time ([`Point::pull`]). When the
    /// block layer can read a version lazily, this is the one call to replace: fetch
    /// the tree, return at once, and let the served session fetch blocks on demand
    /// while a background task prefetches the rest.
    pub async fn fetch_base(&self, image: &str, rev: &str) -> Result<(VersionId, PullReport)> {
        let r = self.pull(image, rev, 5, None).await?;
        let id = VersionId::from_hex(&r.version)
            .ok_or_else(|| PointError::Invalid(format!("bad version id {:?}", r.version)))?;
        Ok((id, r))
    }

    /// Remember that session `name` belongs to this point (pushed by sync rounds).
    pub fn record_session(&self, name: &str, s: SessionState) -> Result<()> {
        self.update_state(|st| {
            st.sessions.insert(name.to_string(), s);
        })
    }

    /// Record the streaming progress of session `name`'s base (`None`: it is local).
    pub fn record_lazy(
        &self,
        name: &str,
        progress: Option<crate::lazy::LazyProgress>,
    ) -> Result<()> {
        self.update_state(|st| {
            if let Some(s) = st.sessions.get_mut(name) {
                s.lazy = progress;
            }
        })
    }

    /// Forget session `name` (its image stays, locally and on the hub).
    pub fn forget_session(&self, name: &str) -> Result<()> {
        self.update_state(|st| {
            st.sessions.remove(name);
        })
    }

    /// One sync round: for every attached session, commit it if it has new writes,
    /// then push its branch to the hub if the hub lacks the tip. A failure of one
    /// session does not stop the others; the report says what happened to each.
    pub async fn sync(&self, committer: &dyn SessionCommitter) -> SyncReport {
        let _g = self.sync_lock.lock().await;
        let t0 = Instant::now();
        let wire0 = self.client.wire();
        let mut report = SyncReport {
            time: now(),
            ..SyncReport::default()
        };
        let sessions = match self.state() {
            Ok(s) => s.sessions,
            Err(e) => {
                report.sessions.push(SessionSync {
                    error: Some(e.to_string()),
                    ..SessionSync::default()
                });
                return report;
            }
        };
        // Desktops that had something to push: reported again once the round is
        // recorded (what was pending is on the hub now, and when it last synced).
        // Otherwise the report before the push stands (one small write on the hub
        // per desktop and round).
        let mut held: Vec<String> = Vec::new();
        for (name, s) in sessions {
            let mut r = SessionSync {
                session: name.clone(),
                image: s.image.clone(),
                branch: s.branch.clone(),
                ..SessionSync::default()
            };
            if s.disposable {
                continue;
            }
            let desktop = desktop_of(&name).map(str::to_string);
            if let Some(l) = &s.lazy {
                // A version over a partial base would break the store's invariants:
                // the writes wait, durable in the session's delta.
                r.prefetching = Some(l.percent());
                if let Some(d) = &desktop {
                    // (A desktop lost meanwhile is recovered once its base is local:
                    // only then can its writes become a version.)
                    if let Err(e) = self.report_desktop(d).await {
                        tracing::warn!(desktop = %d, error = %e, "could not report the desktop to the hub");
                    }
                }
                report.sessions.push(r);
                continue;
            }
            match blocking(|| committer.commit_if_dirty(&name)) {
                Ok(v) => r.committed = v,
                Err(message) => {
                    r.error = Some(
                        PointError::Commit {
                            session: name.clone(),
                            message,
                        }
                        .to_string(),
                    );
                    report.sessions.push(r);
                    continue;
                }
            }
            // Why the hub refused this point the desktop: it was handed to another.
            let mut lost = None;
            if let Some(d) = &desktop {
                // Before the push: what is on its way (a long push over a slow link
                // shows as pending bytes on the hub meanwhile).
                match self.report_desktop(d).await {
                    Ok(()) => {}
                    Err(PointError::Sync(SyncError::Forbidden(why))) => lost = Some(why),
                    // The push says whether the hub is reachable.
                    Err(e) => tracing::debug!(desktop = %d, error = %e, "could not report"),
                }
            }
            if lost.is_none() {
                match self.push_session(&name, &s).await {
                    Ok((tip, pushed)) => {
                        r.hub_tip = tip;
                        r.pushed = pushed;
                        if r.pushed.is_some() || r.committed.is_some() {
                            held.extend(desktop.clone());
                        }
                    }
                    Err(PointError::Sync(SyncError::Forbidden(why))) if desktop.is_some() => {
                        lost = Some(why)
                    }
                    Err(e) => {
                        r.transient = e.is_transient();
                        r.error = Some(e.to_string());
                    }
                }
            }
            // A desktop handed to another point: keep this point's changes as a
            // recovery version and stop syncing it (the caller stops serving it).
            if let (Some(why), Some(d)) = (lost, desktop.as_deref()) {
                let os = self
                    .lose_desktop(d, &name, &s, committer, &why, &mut r)
                    .await;
                report.sessions.push(r);
                report.sessions.extend(os);
                continue;
            }
            report.sessions.push(r);
        }
        report.ok = report.sessions.iter().all(|s| s.error.is_none());
        self.prefetch_channels(&mut report).await;
        let (ok, time) = (report.ok, report.time);
        let err = report
            .sessions
            .iter()
            .find_map(|s| s.error.clone().map(|e| format!("{}: {e}", s.session)));
        if let Err(e) = self.update_state(|st| {
            st.last_attempt = Some(time);
            if ok {
                st.last_sync = Some(time);
            }
            st.last_error = err;
        }) {
            tracing::warn!(error = %e, "could not record the sync round");
        }
        for d in held {
            if let Err(e) = self.report_desktop(&d).await {
                tracing::debug!(desktop = %d, error = %e, "could not report");
            }
        }
        let wire = self.client.wire();
        report.wire_sent = wire.sent - wire0.sent;
        report.wire_received = wire.received - wire0.received;
        report.seconds = t0.elapsed().as_secs_f64();
        report
    }

    /// For each desktop held here (one whose OS disk this point runs) whose channel
    /// moved to a version not local yet: fetch it now, only the blocks not already
    /// here, so the next start switches without waiting. A failure is logged and left
    /// to the next round (the start streams what is missing anyway).
    async fn prefetch_channels(&self, report: &mut SyncReport) {
        let runs_desktops = self
            .state()
            .is_ok_and(|st| st.sessions.values().any(|s| s.disposable));
        if !runs_desktops {
            return;
        }
        let desktops = match self.client.desktops().await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "could not ask the hub for this point's desktops");
                return;
            }
        };
        for d in desktops {
            let (Some(image), Some(version)) = (d.os_image, d.os_version) else {
                continue;
            };
            let Some(vid) = VersionId::from_hex(&version) else {
                continue;
            };
            if self.store.load_version(&vid).is_ok() {
                continue;
            }
            match self.pull(&image, &version, 1, None).await {
                Ok(_) => report.prefetched.push(format!("{image}@{version}")),
                Err(e) => {
                    tracing::warn!(%image, %version, error = %e, "could not prefetch a channel's new version")
                }
            }
        }
    }

    /// Push the local tip of a desktop's user disk that this point no longer holds to
    /// a new `recovery/POINT-TIME` branch on the hub, then forget the session.
    async fn recover(&self, name: &str, s: &SessionState) -> Result<String> {
        let branch = self.push_recovery(&s.image, &s.branch).await?;
        self.forget_session(name)?;
        Ok(branch)
    }

    /// Desktop `desktop` is checked out elsewhere (`why`, the hub's words): seal both
    /// its disks where they are served, commit the user disk `name` once more (now
    /// it holds exactly the writes its clients were told succeeded), keep it as a
    /// recovery branch and forget both sessions. Fills `r` (the user disk's part of
    /// the round) and returns the OS disk's part, which the caller stops serving too.
    /// On failure nothing is forgotten; the next round tries again (the seal stays).
    async fn lose_desktop(
        &self,
        desktop: &str,
        name: &str,
        s: &SessionState,
        committer: &dyn SessionCommitter,
        why: &str,
        r: &mut SessionSync,
    ) -> Option<SessionSync> {
        let os = desktop_os_session(desktop);
        for n in [name, os.as_str()] {
            if let Err(e) = blocking(|| self.seal_served(n)) {
                r.error = Some(format!("stopping the clients of {n}: {e}"));
                return None;
            }
        }
        match blocking(|| committer.commit_if_dirty(name)) {
            Ok(Some(v)) => r.committed = Some(v),
            Ok(None) => {}
            Err(message) => {
                r.error = Some(
                    PointError::Commit {
                        session: name.to_string(),
                        message,
                    }
                    .to_string(),
                );
                return None;
            }
        }
        let branch = match self.recover(name, s).await {
            Ok(b) => b,
            Err(e) => {
                r.transient = e.is_transient();
                r.error = Some(e.to_string());
                return None;
            }
        };
        tracing::warn!(desktop, %why, %branch, "desktop lost; changes kept on the hub");
        r.recovered = Some(branch.clone());
        let os_state = self.state().ok()?.sessions.get(&os).cloned()?;
        if let Err(e) = self.forget_session(&os) {
            tracing::warn!(session = %os, error = %e, "could not forget a lost desktop's OS disk");
        }
        Some(SessionSync {
            session: os,
            image: os_state.image,
            branch: os_state.branch,
            recovered: Some(branch),
            ..SessionSync::default()
        })
    }

    /// Make the process serving session `name` of this store (if any) refuse every
    /// further read, write and flush of its clients, after the writes it already
    /// acknowledged (see `Control::Seal` in `crates/cli/src/serve.rs`).
    fn seal_served(&self, name: &str) -> Result<()> {
        let path = self.root.join(SERVE_SOCKET);
        let Ok(mut c) = std::os::unix::net::UnixStream::connect(&path) else {
            // Nothing serves this store: no client can write.
            return Ok(());
        };
        let req = serde_json::json!({"op": "seal", "session": name});
        c.write_all(format!("{req}\n").as_bytes())
            .map_err(io_err(&path))?;
        let mut reply = String::new();
        BufReader::new(c)
            .read_line(&mut reply)
            .map_err(io_err(&path))?;
        let v: serde_json::Value = serde_json::from_str(&reply).map_err(|e| {
            PointError::Invalid(format!("{}: bad reply {reply:?}: {e}", path.display()))
        })?;
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) => Err(PointError::Invalid(e.to_string())),
            None => Ok(()),
        }
    }

    /// Record that session `name` (a desktop's OS disk) applied `generation` OS
    /// reset requests.
    pub fn set_os_reset(&self, name: &str, generation: i64) -> Result<()> {
        self.update_state(|st| {
            if let Some(s) = st.sessions.get_mut(name) {
                s.os_reset = generation;
            }
        })
    }

    /// What this point runs of desktop `desktop` and what it has that the hub lacks
    /// (see [`DesktopPointReport`]).
    pub fn desktop_report(&self, desktop: &str) -> Result<DesktopPointReport> {
        let st = self.state()?;
        let os = st.sessions.get(&desktop_os_session(desktop));
        let user = desktop_user_session(desktop);
        let mut r = DesktopPointReport {
            time: now(),
            os_version: os.map(|s| s.origin_version.clone()),
            os_reset: os.map_or(0, |s| s.os_reset),
            last_sync: st.last_sync,
            ..DesktopPointReport::default()
        };
        let Some(s) = st.sessions.get(&user) else {
            return Ok(r);
        };
        r.streaming = s.lazy.is_some();
        r.last_push = s.last_push_time;
        let pushed = s
            .hub_tip
            .clone()
            .unwrap_or_else(|| s.origin_version.clone());
        let head = match self.store.get_ref(&s.image, RefKind::Branch, &s.branch) {
            Ok(v) => v,
            // Still streaming: the image is made when its base is local.
            Err(StoreError::NoSuchImage(_)) => None,
            Err(e) => return Err(e.into()),
        };
        match head {
            Some(h) => {
                r.user_version = Some(h.to_hex());
                r.last_commit = self.store.load_version(&h).ok().map(|v| v.time);
                if h.to_hex() != pushed {
                    r.unpushed_bytes = VersionId::from_hex(&pushed)
                        .and_then(|p| self.changed_bytes(&p, &h).ok())
                        .unwrap_or(0);
                }
            }
            None => r.user_version = Some(s.origin_version.clone()),
        }
        r.user_pushed = Some(pushed);
        if let Ok(i) = strata_block::SessionDisk::inspect(&session_dir(&self.root, &user)) {
            r.uncommitted_bytes = i.delta_blocks * i.block_size as u64;
        }
        r.pending_bytes = r.unpushed_bytes + r.uncommitted_bytes;
        Ok(r)
    }

    /// Send [`Point::desktop_report`] to the hub. `Forbidden`: the desktop is checked
    /// out elsewhere now.
    pub async fn report_desktop(&self, desktop: &str) -> Result<()> {
        let r = blocking(|| self.desktop_report(desktop))?;
        Ok(self.client.report_desktop(desktop, &r).await?)
    }

    /// Bytes whose content differs between versions `a` and `b` (whole blocks).
    fn changed_bytes(&self, a: &VersionId, b: &VersionId) -> Result<u64> {
        let (va, vb) = (self.store.load_version(a)?, self.store.load_version(b)?);
        let bs = vb.block_size as u64;
        let end = va.virtual_size.max(vb.virtual_size);
        let mut n = 0u64;
        let mut load = |id: &strata_store::ChunkId| self.store.load_node(id);
        strata_store::tree::diff(&mut load, va.tree(), vb.tree(), &mut |start, count| {
            let offset = start * bs;
            n += (count * bs).min(end.saturating_sub(offset));
            Ok::<(), StoreError>(())
        })?;
        Ok(n)
    }

    /// Push the local tip of `image:branch` to a new branch `recovery/POINT-TIME` of
    /// the hub's `image` (a former holder of a desktop may push only such branches),
    /// so what only this point has is kept; returns the branch's name.
    pub async fn push_recovery(&self, image: &str, branch: &str) -> Result<String> {
        let Some(tip) = self.store.get_ref(image, RefKind::Branch, branch)? else {
            return Err(PointError::Invalid(format!(
                "local branch {image}:{branch} is gone"
            )));
        };
        let recovery = format!("recovery/{}-{}", self.config.point, now());
        strata_sync::push(
            &self.store,
            &self.client,
            image,
            &recovery,
            &tip,
            &PushOptions {
                expected: Expect::Value(None),
                ..PushOptions::default()
            },
        )
        .await?;
        Ok(recovery)
    }

    /// Push the local tip of a session's branch if the hub (as far as we know) lacks
    /// it. Returns the hub's tip and what was sent.
    async fn push_session(
        &self,
        name: &str,
        s: &SessionState,
    ) -> Result<(Option<String>, Option<TransferStats>)> {
        let Some(tip) = self.store.get_ref(&s.image, RefKind::Branch, &s.branch)? else {
            return Err(PointError::Invalid(format!(
                "local branch {}:{} is gone",
                s.image, s.branch
            )));
        };
        if s.hub_tip.as_deref() == Some(tip.to_hex().as_str()) {
            return Ok((s.hub_tip.clone(), None));
        }
        // Compare-and-swap against what this point last knew of the hub's branch: if
        // it moved without us (an operator restored the desktop's user disk), this
        // push must fail rather than silently undo that.
        let origin_image = s.origin.split('@').next().unwrap_or_default();
        let known = match &s.hub_tip {
            Some(t) => Some(t.as_str()),
            None if origin_image == s.image => Some(s.origin_version.as_str()),
            None => None,
        };
        let expected = match known {
            Some(t) => Expect::Value(Some(VersionId::from_hex(t).ok_or_else(|| {
                PointError::Invalid(format!("bad version id {t:?} in the point state"))
            })?)),
            None => Expect::Current,
        };
        let stats = strata_sync::push(
            &self.store,
            &self.client,
            &s.image,
            &s.branch,
            &tip,
            &PushOptions {
                expected,
                ..PushOptions::default()
            },
        )
        .await
        .map_err(|e| match e {
            SyncError::Conflict(m) => PointError::Invalid(format!(
                "the hub's {}:{} moved without this point ({m}); run `strata point desktop \
                 start` to keep this point's changes as a recovery version and continue from \
                 the hub's",
                s.image, s.branch
            )),
            e => e.into(),
        })?;
        let hub_tip = stats.version.clone();
        let st2 = stats.clone();
        self.update_state(|st| {
            if let Some(e) = st.sessions.get_mut(name) {
                e.hub_tip = Some(hub_tip.clone());
                e.last_push = Some(st2);
                e.last_push_time = Some(now());
            }
        })?;
        Ok((Some(hub_tip), Some(stats)))
    }

    /// What this point knows of itself and, if it answers within a few seconds, what
    /// the hub holds of its sessions.
    pub async fn status(&self) -> Result<Status> {
        let state = self.state()?;
        let mut cfg = client_config(&self.config.hub, self.config.ca_file.as_deref())?;
        let cred_path = self.root.join(CREDENTIAL_FILE);
        let cred = std::fs::read_to_string(&cred_path).map_err(io_err(&cred_path))?;
        cfg = cfg.credential(cred.trim());
        cfg.connect_timeout = Duration::from_secs(3);
        cfg.read_timeout = Duration::from_secs(5);
        let quick = HubClient::new(&cfg)?;
        let (mut reachable, mut hub_error) = (true, None);
        let mut sessions = Vec::new();
        for (name, s) in &state.sessions {
            let (mut hub_tip, mut from) = (s.hub_tip.clone(), "last sync");
            // A disposable session (a desktop's OS disk) is never pushed: nothing is
            // pending and the hub has no image of its name to ask about.
            if reachable && !s.disposable {
                match quick.image(&s.image).await {
                    Ok(summary) => {
                        hub_tip = summary
                            .branches
                            .iter()
                            .find(|b| b.name == s.branch)
                            .map(|b| b.version.clone());
                        from = "hub";
                    }
                    // Not on the hub yet (a point may not even see a name it
                    // does not own).
                    Err(SyncError::Hub { status: 404, .. }) | Err(SyncError::Forbidden(_))
                        if s.hub_tip.is_none() =>
                    {
                        hub_tip = None;
                        from = "hub";
                    }
                    Err(e) => {
                        reachable = !e.is_transient();
                        hub_error = Some(e.to_string());
                    }
                }
            }
            let local_tip = match self.store.get_ref(&s.image, RefKind::Branch, &s.branch) {
                Ok(v) => v,
                Err(StoreError::NoSuchImage(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let pending = match local_tip {
                Some(t) if !s.disposable => {
                    self.pending(&t, hub_tip.as_deref(), &s.origin_version)?
                }
                _ => 0,
            };
            let disk = self.store.disk_session(name).ok();
            sessions.push(SessionStatus {
                session: name.clone(),
                image: s.image.clone(),
                branch: s.branch.clone(),
                origin: s.origin.clone(),
                origin_version: s.origin_version.clone(),
                base: disk.map(|d| d.base),
                local_tip: local_tip.map(|t| t.to_hex()),
                hub_tip,
                hub_tip_from: from,
                pending_versions: pending,
                uncommitted_blocks: None,
                last_push: s.last_push.clone(),
                last_push_time: s.last_push_time,
                prefetch: s.lazy.clone(),
            });
        }
        if state.sessions.is_empty() {
            if let Err(e) = quick.images().await {
                reachable = !e.is_transient();
                hub_error = Some(e.to_string());
            }
        }
        Ok(Status {
            point: self.config.point.clone(),
            hub: self.config.hub.clone(),
            hub_reachable: reachable,
            hub_error,
            sync_interval_secs: self.config.sync_interval_secs,
            max_rate: self.config.max_rate,
            last_sync: state.last_sync,
            last_attempt: state.last_attempt,
            last_error: state.last_error,
            sessions,
        })
    }

    /// Versions from `tip` back along first parents that the hub lacks: up to (not
    /// including) the hub's tip, or, when the hub has none, back to the origin
    /// (counted too: the hub's branch must still be created).
    fn pending(&self, tip: &VersionId, hub_tip: Option<&str>, origin: &str) -> Result<u64> {
        let mut n = 0;
        for (id, _) in self.store.history(tip, 100_000)? {
            let hex = id.to_hex();
            if Some(hex.as_str()) == hub_tip {
                return Ok(n);
            }
            n += 1;
            if hub_tip.is_none() && hex == origin {
                return Ok(n);
            }
        }
        Ok(n)
    }
}
