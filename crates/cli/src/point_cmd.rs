//! `strata point ...`: this store as a point of a hub (the logic is in
//! `strata-point`; this file wires it to the NBD server and the disk sessions).
//!
//! * `enroll` makes the store a point; `pull` fetches a version in full;
//! * `attach IMAGE@REV --session NAME` fetches the base ([`Point::fetch_base`], the
//!   step lazy streaming will replace), clones it as the local image NAME (free) and
//!   creates session NAME over NAME:main. NAME is this point's own image on the hub;
//! * `run` is the agent: `strata serve` over the same exports
//!   ([`serve::serve_exports`]) plus a sync loop that commits every session with new
//!   writes and pushes it, backing off while the hub is unreachable (commits are
//!   local first, so nothing is lost), and a control socket `STORE/point.sock` on
//!   which `point sync` asks for a round now;
//! * `sync` (through the agent, or here), `status`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use strata_block::SessionDisk;
use strata_point::{EnrollOptions, Point, SessionCommitter, SessionState, SyncReport};
use strata_store::Store;

use crate::cli::PointCommand;
use crate::commands::{default_author, Ctx};
use crate::output::{bytes, print_json, spinner, time};
use crate::serve::{self, session_dir, ServeArgs, StoreExports};
use crate::spec::rev_spec;

fn runtime() -> Result<tokio::runtime::Runtime> {
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
        PointCommand::Pull { spec, attempts } => pull(ctx, &spec, attempts)?,
        PointCommand::Attach { spec, session } => attach(ctx, &spec, &session)?,
        PointCommand::Run {
            listen,
            socket,
            tls_dir,
            sync_interval,
        } => agent(ctx, listen, socket, tls_dir, sync_interval)?,
        PointCommand::Sync => return sync(ctx),
        PointCommand::Status => status(ctx)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn open_point(ctx: &Ctx) -> Result<(Arc<Store>, Arc<Point>)> {
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

fn pull(ctx: &Ctx, spec: &str, attempts: u32) -> Result<()> {
    let (_, point) = open_point(ctx)?;
    let s = rev_spec(spec)?;
    let rev = s.rev.clone().unwrap_or_else(|| "main".into());
    let r = runtime()?.block_on(with_progress(
        &point,
        &format!("pulling {}@{rev}", s.image),
        ctx.hide_progress(),
        point.pull(&s.image, &rev, attempts),
    ))?;
    if ctx.json {
        print_json(&r);
    } else {
        println!(
            "{}:{} {} ({} objects, {} logical, {} on the wire{}) in {:.1}s",
            r.image,
            r.branch,
            &r.version[..12],
            r.objects,
            bytes(r.logical_bytes),
            bytes(r.wire_received + r.wire_sent),
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

fn attach(ctx: &Ctx, spec: &str, name: &str) -> Result<()> {
    let (store, point) = open_point(ctx)?;
    strata_store::validate_name(name)?;
    if store.disk_sessions()?.iter().any(|s| s.name == name) {
        bail!("a session named {name:?} already exists");
    }
    if store.images()?.iter().any(|i| i.name == name) {
        bail!("an image named {name:?} already exists here (the session's commits would go to it)");
    }
    let s = rev_spec(spec)?;
    let rev = s.rev.clone().unwrap_or_else(|| "main".into());
    // The one step that lazy streaming replaces: today the whole version is fetched.
    let (base, pulled) = runtime()?.block_on(with_progress(
        &point,
        &format!("fetching {}@{rev}", s.image),
        ctx.hide_progress(),
        point.fetch_base(&s.image, &rev),
    ))?;
    store.clone_image(name, &base)?;
    if let Err(e) = crate::session::create(&store, name, &format!("{name}:main")) {
        let _ = store.delete_image(name);
        return Err(e);
    }
    point.record_session(
        name,
        SessionState {
            image: name.to_string(),
            branch: "main".into(),
            origin: format!("{}@{rev}", s.image),
            origin_version: base.to_hex(),
            ..SessionState::default()
        },
    )?;
    if ctx.json {
        print_json(&serde_json::json!({
            "session": name,
            "image": name,
            "branch": "main",
            "base": base.to_hex(),
            "origin": format!("{}@{rev}", s.image),
            "fetched": pulled,
        }));
    } else {
        println!(
            "session {name} over {}@{rev} ({}); fetched {} on the wire; commits go to {name}:main and the hub's {name}",
            s.image,
            base.short(),
            bytes(pulled.wire_received)
        );
    }
    Ok(())
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

async fn sync_loop(point: Arc<Point>, committer: Arc<AgentCommitter>, interval: Duration) {
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
    rt: tokio::runtime::Handle,
) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let (point, committer, rt) = (point.clone(), committer.clone(), rt.clone());
        std::thread::spawn(move || {
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_err() {
                return;
            }
            let reply = match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v["op"] == "sync" => {
                    let r = rt.block_on(point.sync(&*committer));
                    log_round(&r);
                    serde_json::to_value(r).unwrap_or_default()
                }
                _ => serde_json::json!({"error": format!("bad point control request: {line:?}")}),
            };
            let _ = (&conn).write_all(format!("{reply}\n").as_bytes());
        });
    }
}

fn agent(
    ctx: &Ctx,
    listen: Vec<String>,
    sockets: Vec<PathBuf>,
    tls_dir: Option<PathBuf>,
    sync_interval: Option<Duration>,
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
    let exports = Arc::new(StoreExports::new(store.clone(), None));
    let committer = Arc::new(AgentCommitter {
        store: store.clone(),
        exports: exports.clone(),
        author: format!("{} ({})", default_author(), point.config().point),
    });
    // The sync loop has a runtime of its own: a slow hub never holds up NBD.
    let rt = runtime()?;
    let handle = rt.handle().clone();
    {
        let (point, committer) = (point.clone(), committer.clone());
        std::thread::spawn(move || rt.block_on(sync_loop(point, committer, interval)));
    }
    {
        let (point, committer) = (point.clone(), committer.clone());
        std::thread::spawn(move || control_loop(listener, point, committer, handle));
    }
    let r = serve::serve_exports(
        store,
        exports,
        ServeArgs {
            default_export: None,
            listen,
            sockets,
            tls_dir,
            tls_required: false,
        },
        ctx.json,
    );
    let _ = std::fs::remove_file(&control);
    r
}

fn sync(ctx: &Ctx) -> Result<ExitCode> {
    let (store, point) = open_point(ctx)?;
    let report: SyncReport = match UnixStream::connect(point.control_path()) {
        Ok(mut s) => {
            s.write_all(b"{\"op\":\"sync\"}\n")?;
            let mut reply = String::new();
            BufReader::new(s).read_line(&mut reply)?;
            let v: serde_json::Value =
                serde_json::from_str(&reply).context("reading the agent's reply")?;
            if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                bail!("{e}");
            }
            if ctx.json {
                print_json(&v);
            } else {
                print_round_value(&v);
            }
            return Ok(if v["ok"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Err(_) => {
            let committer = LocalCommitter {
                store,
                author: format!("{} ({})", default_author(), point.config().point),
            };
            runtime()?.block_on(point.sync(&committer))
        }
    };
    let v = serde_json::to_value(&report)?;
    if ctx.json {
        print_json(&v);
    } else {
        print_round_value(&v);
    }
    Ok(if report.ok {
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
        let committed = s["committed"]
            .as_str()
            .map(|c| format!("committed {}, ", &c[..12.min(c.len())]))
            .unwrap_or_default();
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
