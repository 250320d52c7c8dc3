//! `strata point ...`: this store as a point of a hub (the logic is in
//! `strata-point`; this file wires it to the NBD server and the disk sessions).
//!
//! * `enroll` makes the store a point; `pull` fetches a version in full;
//! * `attach IMAGE@REV --session NAME` fetches the version record and its tree
//!   nodes only and creates session NAME over a lazy base ([`strata_point::lazy`]):
//!   the agent serves it at once, fetching blocks as they are read and prefetching
//!   the rest; once the base is local it becomes the local image NAME's main branch
//!   and the session is committed like any other. (A version already local in full
//!   is cloned as before.) NAME is this point's own image on the hub;
//! * `run` is the agent: `strata serve` over the same exports
//!   ([`serve::serve_exports`]) plus a sync loop that commits every session with new
//!   writes and pushes it, backing off while the hub is unreachable (commits are
//!   local first, so nothing is lost), and a control socket `STORE/point.sock` on
//!   which `point sync` asks for a round now;
//! * `sync` (through the agent, or here), `status`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use strata_block::{SessionDisk, VersionDisk, VersionDisks};
use strata_point::{
    EnrollOptions, LazyBase, LazyConfig, Point, RemoteTree, SessionCommitter, SessionState,
    SyncReport,
};
use strata_store::Store;

use crate::cli::PointCommand;
use crate::commands::{default_author, Ctx};
use crate::output::{bytes, print_json, spinner, time};
use crate::serve::{self, session_dir, ServeArgs, StoreExports};
use crate::spec::rev_spec;

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run(ctx: &Ctx, cmd: PointCommand) -> Result<ExitCode> {
    match cmd {
        PointCommand::Enroll {
            hub_url,
            token,
            ca,
            max_rate,
            sync_interval,
        } => {
            let opts = EnrollOptions {
                ca_file: ca,
                max_rate,
                sync_interval,
            };
            let cfg = runtime()?.block_on(strata_point::enroll(
                &ctx.store_path,
                &hub_url,
                &token,
                &opts,
            ))?;
            if ctx.json {
                print_json(&cfg);
            } else {
                println!(
                    "{} is now point {:?} of {} (sync every {}s)",
                    ctx.store_path.display(),
                    cfg.point,
                    cfg.hub,
                    cfg.sync_interval_secs
                );
            }
        }
        PointCommand::Pull {
            spec,
            attempts,
            seed,
        } => pull(ctx, &spec, attempts, seed.as_deref())?,
        PointCommand::Attach { spec, session } => attach(ctx, &spec, &session)?,
        PointCommand::Run {
            listen,
            socket,
            tls_dir,
            sync_interval,
            fetch_timeout,
            no_prefetch,
            cache,
        } => agent(
            ctx,
            ServeArgs {
                default_export: None,
                cache: cache.config(),
                listen,
                sockets: socket,
                tls_dir,
                tls_required: false,
            },
            sync_interval,
            fetch_timeout,
            !no_prefetch,
        )?,
        PointCommand::Sync => return sync(ctx),
        PointCommand::Desktop(c) => return crate::point_desktop::run(ctx, c),
        PointCommand::Status => status(ctx)?,
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn open_point(ctx: &Ctx) -> Result<(Arc<Store>, Arc<Point>)> {
    let store = ctx.open()?;
    let point = Arc::new(Point::open(store.clone())?);
    Ok((store, point))
}

/// Show bytes received while `fut` runs (a spinner on a terminal only).
async fn with_progress<T>(
    point: &Point,
    msg: &str,
    hidden: bool,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let pb = spinner(
        msg,
        hidden || !std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    let wire0 = point.client().wire().received;
    let ticker = async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let got = point.client().wire().received - wire0;
            pb.set_message(format!("{msg}: {} received", bytes(got)));
        }
    };
    let out = tokio::select! {
        r = fut => r,
        _ = ticker => unreachable!("the ticker never ends"),
    };
    pb.finish_and_clear();
    out
}

fn pull(ctx: &Ctx, spec: &str, attempts: u32, seed: Option<&Path>) -> Result<()> {
    let (_, point) = open_point(ctx)?;
    let s = rev_spec(spec)?;
    let rev = s.rev.clone().unwrap_or_else(|| "main".into());
    let rt = runtime()?;
    let seed = match seed {
        Some(path) => {
            // The seed is read in the version's block size, which the hub tells.
            let (_, v, _) = rt.block_on(point.client().get_version(&s.image, &rev))?;
            let seed = strata_point::ImageSeed::open(path, v.block_size)
                .with_context(|| format!("seeding from {}", path.display()))?;
            Some(Arc::new(seed) as Arc<dyn strata_sync::Seed>)
        }
        None => None,
    };
    let r = rt.block_on(with_progress(
        &point,
        &format!("pulling {}@{rev}", s.image),
        ctx.hide_progress(),
        point.pull(&s.image, &rev, attempts, seed),
    ))?;
    if ctx.json {
        print_json(&r);
    } else {
        println!(
            "{}:{} {} ({} objects, {} logical, {} on the wire{}{}) in {:.1}s",
            r.image,
            r.branch,
            &r.version[..12],
            r.objects,
            bytes(r.logical_bytes),
            bytes(r.wire_received + r.wire_sent),
            if r.transfer.seeded > 0 {
                format!(
                    ", {} blocks ({}) from the seed",
                    r.transfer.seeded,
                    bytes(r.transfer.seeded_bytes)
                )
            } else {
                String::new()
            },
            if r.attempts > 1 {
                format!(", {} attempts", r.attempts)
            } else {
                String::new()
            },
            r.seconds
        );
    }
    Ok(())
}

/// What `point attach` did.
#[derive(serde::Serialize)]
pub(crate) struct AttachReport {
    pub(crate) session: String,
    pub(crate) image: String,
    pub(crate) branch: String,
    pub(crate) base: String,
    pub(crate) origin: String,
    /// Set while the base is streamed from the hub.
    pub(crate) streaming: Option<strata_point::LazyProgress>,
    /// A running agent serves it already.
    pub(crate) agent: bool,
    pub(crate) wire_received: u64,
}

fn attach(ctx: &Ctx, spec: &str, name: &str) -> Result<()> {
    let r = attach_session(ctx, spec, name, false)?;
    if ctx.json {
        print_json(&r);
    } else {
        println!(
            "session {name} over {} ({}); {} on the wire; commits go to {name}:main and the hub's {name}{}",
            r.origin,
            &r.base[..12],
            bytes(r.wire_received),
            match &r.streaming {
                Some(p) => format!(
                    "; streaming {} blocks from the hub{}",
                    p.blocks_total - p.blocks_local,
                    if r.agent { " (the agent serves it now)" } else { " when `point run` serves it" }
                ),
                None => String::new(),
            }
        );
    }
    Ok(())
}

/// Attach session `name` over `spec` of the hub (see [`PointCommand::Attach`]); a
/// `disposable` one (a desktop's OS disk) is never committed or pushed.
pub(crate) fn attach_session(
    ctx: &Ctx,
    spec: &str,
    name: &str,
    disposable: bool,
) -> Result<AttachReport> {
    let (store, point) = open_point(ctx)?;
    strata_store::validate_name(name)?;
    if store.disk_sessions()?.iter().any(|s| s.name == name)
        || point.state()?.sessions.contains_key(name)
    {
        bail!("a session named {name:?} already exists");
    }
    if store.images()?.iter().any(|i| i.name == name) {
        bail!("an image named {name:?} already exists here (the session's commits would go to it)");
    }
    let s = rev_spec(spec)?;
    let rev = s.rev.clone().unwrap_or_else(|| "main".into());
    let rt = runtime()?;
    let wire0 = point.client().wire().received;
    // The record and the tree only (small); blocks come as they are read.
    let tree = rt.block_on(with_progress(
        &point,
        &format!("fetching the tree of {}@{rev}", s.image),
        ctx.hide_progress(),
        RemoteTree::fetch(point.client(), &s.image, &rev),
    ))?;
    let base = tree.id;
    // Listed versions are complete (the store takes a record only after its tree).
    let local = store.list_versions()?.iter().any(|(id, _)| *id == base);
    let mut lazy = None;
    if local {
        store.clone_image(name, &base)?;
        if let Err(e) = crate::session::create(&store, name, &format!("{name}:main")) {
            let _ = store.delete_image(name);
            return Err(e);
        }
    } else {
        let dir = session_dir(&store, name);
        if dir.exists() {
            // Left by an attach or create interrupted before it was recorded.
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing stale {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        let made = (|| -> Result<_> {
            tree.save(&dir)?;
            let base_up = LazyBase::open(
                name,
                &dir,
                store.clone(),
                point.client().clone(),
                LazyConfig {
                    fetch_timeout: Duration::from_secs(30),
                    runtime: rt.handle().clone(),
                },
            )?;
            let bases = VersionDisks::new(store.clone());
            let disk = bases.get_lazy(base, base_up.version().clone(), base_up.clone());
            drop(SessionDisk::create_shared(&dir, &bases, base)?);
            drop(disk);
            Ok(base_up.progress())
        })();
        match made {
            Ok(p) => lazy = Some(p),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        }
    }
    point.record_session(
        name,
        SessionState {
            image: name.to_string(),
            branch: "main".into(),
            origin: format!("{}@{rev}", s.image),
            origin_version: base.to_hex(),
            lazy: lazy.clone(),
            disposable,
            ..SessionState::default()
        },
    )?;
    // A running agent starts serving (and prefetching) it now.
    let adopted = lazy.is_some()
        && agent_call(&point, serde_json::json!({"op": "adopt", "session": name}))
            .with_context(|| format!("the running agent could not take session {name}"))?
            .is_some();
    Ok(AttachReport {
        session: name.to_string(),
        image: name.to_string(),
        branch: "main".into(),
        base: base.to_hex(),
        origin: format!("{}@{rev}", s.image),
        streaming: lazy,
        agent: adopted,
        wire_received: point.client().wire().received - wire0,
    })
}

/// Send one request to the running agent (`None`: no agent runs); its error
/// answers become errors.
pub(crate) fn agent_call(
    point: &Point,
    req: serde_json::Value,
) -> Result<Option<serde_json::Value>> {
    let Ok(mut c) = UnixStream::connect(point.control_path()) else {
        return Ok(None);
    };
    c.write_all(format!("{req}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(c).read_line(&mut reply)?;
    let v: serde_json::Value = serde_json::from_str(&reply).context("reading the agent's reply")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{e}");
    }
    Ok(Some(v))
}

/// The agent's sessions whose bases are still streamed from the hub.
struct Streaming {
    store: Arc<Store>,
    point: Arc<Point>,
    exports: Arc<StoreExports>,
    /// The lazy bases' registry (sessions open over them through it).
    bases: Arc<VersionDisks>,
    /// Held for the agent's lifetime: the registry finds a lazy disk only while
    /// someone holds it.
    held: std::sync::Mutex<Vec<(String, Arc<VersionDisk>)>>,
    fetch_timeout: Duration,
    prefetch: bool,
    rt: tokio::runtime::Handle,
}

impl Streaming {
    /// Serve session `name` over its lazy base, and prefetch it in the background.
    fn adopt(self: &Arc<Self>, name: &str) -> Result<()> {
        if self.held.lock().unwrap().iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        let Some(st) = self.point.state()?.sessions.get(name).cloned() else {
            bail!("no attached session {name:?}");
        };
        if st.lazy.is_none() {
            return Ok(());
        }
        if self.store.disk_session(name).is_ok() {
            // Made local before a crash left the state behind.
            self.point.record_lazy(name, None)?;
            return Ok(());
        }
        let dir = session_dir(&self.store, name);
        let up = LazyBase::open(
            name,
            &dir,
            self.store.clone(),
            self.point.client().clone(),
            LazyConfig {
                fetch_timeout: self.fetch_timeout,
                runtime: self.rt.clone(),
            },
        )?;
        let disk = self
            .bases
            .get_lazy(up.id(), up.version().clone(), up.clone());
        let session = Arc::new(SessionDisk::open_shared(&dir, &self.bases)?);
        self.exports.adopt_session(name, session);
        self.held.lock().unwrap().push((name.to_string(), disk));
        let (point, name) = (self.point.clone(), name.to_string());
        if self.prefetch {
            let (up, point, name) = (up.clone(), point.clone(), name.clone());
            self.rt.spawn(async move {
                if let Err(e) = up.prefetch(|_| {}).await {
                    tracing::error!(session = %name, error = %e, "could not make the streamed base local");
                }
                let _ = point;
            });
        }
        // Progress for `point status`, until the base is local.
        self.rt.spawn(async move {
            let mut last = None;
            loop {
                let done = up.is_materialised();
                let p = (!done).then(|| up.progress());
                if p != last {
                    if let Err(e) = point.record_lazy(&name, p.clone()) {
                        tracing::warn!(error = %e, "could not record prefetch progress");
                    }
                    last = p;
                }
                if done {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(())
    }
}

impl Streaming {
    /// Stop serving session `name`; unless `force`, refused while a VM is connected
    /// to it.
    fn release(&self, name: &str, force: bool) -> Result<()> {
        self.exports.release_session(name, force)?;
        self.held.lock().unwrap().retain(|(n, _)| n != name);
        Ok(())
    }
}

/// Commits through the agent's open disks (clients stay connected).
struct AgentCommitter {
    store: Arc<Store>,
    exports: Arc<StoreExports>,
    author: String,
}

impl SessionCommitter for AgentCommitter {
    fn commit_if_dirty(&self, name: &str) -> std::result::Result<Option<String>, String> {
        let disk = self.exports.session(name).map_err(|e| format!("{e:#}"))?;
        if disk.stats().delta_blocks == 0 {
            return Ok(None);
        }
        crate::session::commit(&self.store, name, &disk, "point sync", None, &self.author)
            .map(|c| Some(c.version))
            .map_err(|e| format!("{e:#}"))
    }
}

/// Commits without an agent: through a `strata serve` holding the session, or by
/// opening it here.
struct LocalCommitter {
    store: Arc<Store>,
    author: String,
}

impl SessionCommitter for LocalCommitter {
    fn commit_if_dirty(&self, name: &str) -> std::result::Result<Option<String>, String> {
        let info =
            SessionDisk::inspect(&session_dir(&self.store, name)).map_err(|e| e.to_string())?;
        if info.delta_blocks == 0 {
            return Ok(None);
        }
        let v = crate::session::commit_cmd(&self.store, name, "point sync", None, &self.author)
            .map_err(|e| format!("{e:#}"))?;
        Ok(v["version"].as_str().map(str::to_string))
    }
}

fn log_round(r: &SyncReport) {
    for s in &r.sessions {
        match (&s.error, &s.pushed) {
            (Some(e), _) => tracing::warn!(session = %s.session, "sync failed: {e}"),
            (None, Some(p)) => tracing::info!(
                session = %s.session,
                version = %p.version,
                objects = p.objects(),
                wire_sent = p.wire_sent,
                "pushed"
            ),
            (None, None) => tracing::debug!(session = %s.session, "up to date"),
        }
    }
}

/// Stop serving the desktops a sync round found checked out elsewhere (their
/// changes are on the hub as recovery versions).
fn stop_lost(streaming: &Streaming, r: &SyncReport) {
    for s in r.sessions.iter().filter(|s| s.recovered.is_some()) {
        // Its writes up to this round's commit are in the recovery version; the
        // session itself goes, so no new connection can write to it here.
        let _ = streaming.release(&s.session, true);
        if let Err(e) = crate::session::remove(&streaming.store, &s.session) {
            tracing::warn!(session = %s.session, error = %e, "could not remove a lost desktop's session");
        }
    }
}

async fn sync_loop(
    point: Arc<Point>,
    committer: Arc<AgentCommitter>,
    streaming: Arc<Streaming>,
    interval: Duration,
) {
    let mut failures = 0u32;
    loop {
        // After a failure, try again sooner than the interval but back off: 2 s, 4 s,
        // ... up to the interval.
        let wait = if failures == 0 {
            interval
        } else {
            interval.min(Duration::from_secs(1 << failures.min(8)))
        };
        tokio::time::sleep(wait).await;
        let r = point.sync(&*committer).await;
        log_round(&r);
        stop_lost(&streaming, &r);
        if r.ok {
            failures = 0;
        } else {
            failures += 1;
            if r.only_transient_failures() {
                tracing::warn!(failures, "hub unreachable; serving on, will retry");
            }
        }
    }
}

fn control_loop(
    listener: UnixListener,
    point: Arc<Point>,
    committer: Arc<AgentCommitter>,
    streaming: Arc<Streaming>,
    rt: tokio::runtime::Handle,
) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (point, committer, rt) = (point.clone(), committer.clone(), rt.clone());
        let streaming = streaming.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_err() {
                return;
            }
            let reply = match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v["op"] == "sync" => {
                    let r = rt.block_on(point.sync(&*committer));
                    log_round(&r);
                    stop_lost(&streaming, &r);
                    serde_json::to_value(r).unwrap_or_default()
                }
                Ok(v) if v["op"] == "release" => {
                    let name = v["session"].as_str().unwrap_or_default();
                    match streaming.release(name, false) {
                        Ok(()) => serde_json::json!({"released": name}),
                        Err(e) => serde_json::json!({"error": format!("{e:#}")}),
                    }
                }
                Ok(v) if v["op"] == "adopt" => {
                    let name = v["session"].as_str().unwrap_or_default();
                    match streaming.adopt(name) {
                        Ok(()) => serde_json::json!({"adopted": name}),
                        Err(e) => serde_json::json!({"error": format!("{e:#}")}),
                    }
                }
                _ => serde_json::json!({"error": format!("bad point control request: {line:?}")}),
            };
            let _ = (&conn).write_all(format!("{reply}\n").as_bytes());
        });
    }
}

fn agent(
    ctx: &Ctx,
    serve_args: ServeArgs,
    sync_interval: Option<Duration>,
    fetch_timeout: Duration,
    prefetch: bool,
) -> Result<()> {
    let (store, point) = open_point(ctx)?;
    let interval = sync_interval.unwrap_or_else(|| point.config().sync_interval());
    let control = point.control_path();
    if UnixStream::connect(&control).is_ok() {
        bail!(
            "another point agent runs on this store ({} answers)",
            control.display()
        );
    }
    let _ = std::fs::remove_file(&control);
    let listener =
        UnixListener::bind(&control).with_context(|| format!("binding {}", control.display()))?;
    let exports = Arc::new(StoreExports::new(
        store.clone(),
        None,
        serve_args.cache.clone(),
    ));
    let committer = Arc::new(AgentCommitter {
        store: store.clone(),
        exports: exports.clone(),
        author: format!("{} ({})", default_author(), point.config().point),
    });
    // The sync loop has a runtime of its own: a slow hub never holds up NBD.
    let rt = runtime()?;
    let handle = rt.handle().clone();
    let streaming = Arc::new(Streaming {
        store: store.clone(),
        point: point.clone(),
        exports: exports.clone(),
        bases: VersionDisks::with_config(store.clone(), serve_args.cache.clone()),
        held: std::sync::Mutex::new(Vec::new()),
        fetch_timeout,
        prefetch,
        rt: handle.clone(),
    });
    {
        let (point, committer, streaming) = (point.clone(), committer.clone(), streaming.clone());
        std::thread::spawn(move || rt.block_on(sync_loop(point, committer, streaming, interval)));
    }
    for (name, s) in point.state()?.sessions {
        if s.lazy.is_some() {
            streaming
                .adopt(&name)
                .with_context(|| format!("serving streamed session {name}"))?;
        }
    }
    {
        let (point, committer) = (point.clone(), committer.clone());
        std::thread::spawn(move || control_loop(listener, point, committer, streaming, handle));
    }
    let r = serve::serve_exports(store, exports, serve_args, ctx.json);
    let _ = std::fs::remove_file(&control);
    r
}

/// One sync round, through the agent if it runs (it holds the sessions open), else
/// here: the round's report as JSON.
fn sync_round(ctx: &Ctx) -> Result<serde_json::Value> {
    let (store, point) = open_point(ctx)?;
    if let Some(v) = agent_call(&point, serde_json::json!({"op": "sync"}))? {
        return Ok(v);
    }
    let committer = LocalCommitter {
        store,
        author: format!("{} ({})", default_author(), point.config().point),
    };
    Ok(serde_json::to_value(
        runtime()?.block_on(point.sync(&committer)),
    )?)
}

/// [`sync_round`] reported only by its outcome: true if every session is committed
/// and on the hub.
pub(crate) fn sync_quiet(ctx: &Ctx) -> Result<bool> {
    Ok(sync_round(ctx)?["ok"] == true)
}

pub(crate) fn sync(ctx: &Ctx) -> Result<ExitCode> {
    let v = sync_round(ctx)?;
    if ctx.json {
        print_json(&v);
    } else {
        print_round_value(&v);
    }
    Ok(if v["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_round_value(v: &serde_json::Value) {
    let sessions = v["sessions"].as_array().cloned().unwrap_or_default();
    if sessions.is_empty() {
        println!("no attached sessions");
    }
    for s in sessions {
        let name = s["session"].as_str().unwrap_or("?");
        if let Some(e) = s["error"].as_str() {
            println!("{name}: failed: {e}");
            continue;
        }
        if let Some(p) = s["prefetching"].as_f64() {
            println!("{name}: prefetching {p:.0}% (not committed until its base is local)");
            continue;
        }
        let committed = s["committed"]
            .as_str()
            .map(|c| format!("committed {}, ", &c[..12.min(c.len())]))
            .unwrap_or_default();
        if let Some(branch) = s["recovered"].as_str() {
            println!(
                "{name}: {committed}checked out elsewhere now; its changes are on the hub as {branch}, and it is no longer served here"
            );
            continue;
        }
        match s.get("pushed").filter(|p| !p.is_null()) {
            Some(p) => println!(
                "{name}: {committed}pushed {} objects ({} data), {} sent",
                p["data_objects"].as_u64().unwrap_or(0)
                    + p["tree_objects"].as_u64().unwrap_or(0)
                    + p["version_objects"].as_u64().unwrap_or(0),
                p["data_objects"].as_u64().unwrap_or(0),
                bytes(p["wire_sent"].as_u64().unwrap_or(0))
            ),
            None => println!("{name}: {committed}hub up to date"),
        }
    }
}

fn status(ctx: &Ctx) -> Result<()> {
    let (store, point) = open_point(ctx)?;
    let mut st = runtime()?.block_on(point.status())?;
    for s in &mut st.sessions {
        s.uncommitted_blocks = SessionDisk::inspect(&session_dir(&store, &s.session))
            .ok()
            .map(|i| i.delta_blocks);
    }
    if ctx.json {
        print_json(&st);
        return Ok(());
    }
    let short = |v: &Option<String>| {
        v.as_deref()
            .map(|h| h[..12.min(h.len())].to_string())
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "point {} of {} ({})",
        st.point,
        st.hub,
        if st.hub_reachable {
            "reachable".to_string()
        } else {
            format!(
                "unreachable: {}",
                st.hub_error.as_deref().unwrap_or("unknown")
            )
        }
    );
    println!(
        "last sync: {}{}",
        st.last_sync.map(time).unwrap_or_else(|| "never".into()),
        st.last_error
            .as_deref()
            .map(|e| format!(" (last attempt failed: {e})"))
            .unwrap_or_default()
    );
    for s in &st.sessions {
        if let Some(p) = &s.prefetch {
            println!(
                "{:<16} from {} prefetching {:.0}% ({}/{} blocks local, {} fetched) uncommitted blocks {}",
                s.session,
                s.origin,
                p.percent(),
                p.blocks_local,
                p.blocks_total,
                bytes(p.bytes_fetched),
                s.uncommitted_blocks
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "?".into()),
            );
            continue;
        }
        println!(
            "{:<16} from {} base {} local {} hub {} ({}) pending {} uncommitted blocks {} last push {}",
            s.session,
            s.origin,
            short(&s.base),
            short(&s.local_tip),
            short(&s.hub_tip),
            s.hub_tip_from,
            s.pending_versions,
            s.uncommitted_blocks
                .map(|n| n.to_string())
                .unwrap_or_else(|| "?".into()),
            s.last_push
                .as_ref()
                .map(|p| bytes(p.wire_sent))
                .unwrap_or_else(|| "-".into())
        );
    }
    Ok(())
}
