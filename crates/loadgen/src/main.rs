//! # strata-load: many simulated points against one hub
//!
//! How many points can one hub serve? This tool plays N points against a running
//! hub (`strata hub run`) over the real protocol with the real client code
//! (`strata_sync::HubClient`, `strata_sync::push`), each with a small desktop:
//! enrolled, its desktop created and checked out through the operators' API, then
//! checking in on an interval with a few rewritten blocks of its user disk and the
//! question whether its channel moved (see [`sim`]).
//!
//! **Time.** A hub's load from N points at interval T is N/T check-ins per second
//! on top of holding N desktops. `--time-scale K` runs the interval as T/K: the hub
//! holds N real desktops and takes N·K/T check-ins per second, which is the rate of
//! N·K points at T. A step passes at N with any K >= 1 only if the hub kept up with
//! at least the real rate of N points while holding all N of them, so a pass at
//! (N, K) supports "N points at interval T" outright and "N·K points" as far as the
//! rate is concerned (the table reports both). Points start at uniformly spread
//! phases (stratified: one per 1/N of the interval, in random order), as points that
//! came online at random times would.
//!
//! **Steps.** `--steps 1000,10000,10000x4` runs the load at each (N, K) in turn,
//! setting up only the desktops each step adds, and reports per step: check-ins per
//! second, p50/p90/p99/max latency of a check-in (all its requests, end to end),
//! failures, the hub process's CPU and peak memory (from /proc, `--hub-pid`), and
//! the hub's store size (`--hub-dir`).
//!
//! Run `bench/scale.sh` for the benchmark; `strata-load --help` for the knobs.

mod content;
mod procstat;
mod sim;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use serde::Serialize;
use strata_store::Store;
use tokio::sync::Mutex;

use crate::content::{Rng, Writes};
use crate::sim::{CheckinResult, HubAccess, PointSim, Sim};

/// One step: N points, time scale K.
#[derive(Clone, Copy, Debug)]
struct Step {
    points: u64,
    scale: Option<f64>,
}

fn parse_step(s: &str) -> Result<Step, String> {
    let (n, k) = match s.split_once('x') {
        Some((n, k)) => (n, Some(k)),
        None => (s, None),
    };
    let points: u64 = n
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: expected N or NxK (e.g. 10000 or 10000x4)"))?;
    let scale = k
        .map(|k| k.trim().parse::<f64>())
        .transpose()
        .map_err(|_| format!("{s:?}: the time scale after x is not a number"))?;
    if points == 0 || scale.is_some_and(|k| k.is_nan() || k <= 0.0) {
        return Err(format!("{s:?}: N and K must be positive"));
    }
    Ok(Step { points, scale })
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                u => return Err(format!("{s:?}: unknown unit {u:?}")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n * mul)
        .map_err(|_| format!("{s:?}: not a size"))
}

/// N simulated points checking in against one hub (see the crate doc).
#[derive(Parser, Debug)]
#[command(name = "strata-load", version)]
struct Args {
    /// The hub's directory: its URL (hub.url, written by `strata hub run`), its
    /// admin credential, and its store for the size column.
    #[arg(long, value_name = "DIR")]
    hub_dir: Option<PathBuf>,
    /// The hub's URL (default: DIR/hub.url).
    #[arg(long = "hub", value_name = "URL")]
    url: Option<String>,
    /// The admin credential (default: DIR/admin.token).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// PEM certificate(s) to trust for an https hub.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The hub's process id, for its CPU and memory columns.
    #[arg(long, value_name = "PID")]
    hub_pid: Option<u32>,
    /// Steps, comma separated: N (desktops; K from --time-scale) or NxK.
    #[arg(long, value_delimiter = ',', required = true, value_parser = parse_step)]
    steps: Vec<Step>,
    /// The check-in interval being simulated, seconds.
    #[arg(long, default_value_t = 900.0)]
    interval: f64,
    /// Run the interval K times faster (K x the real check-in rate).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Seconds of load per step (default: one scaled interval, so each point checks
    /// in once).
    #[arg(long, conflicts_with = "rounds")]
    duration: Option<f64>,
    /// Instead of --duration: every point checks in exactly this many times.
    #[arg(long)]
    rounds: Option<u32>,
    /// Size of each desktop's user disk.
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    disk_size: u64,
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    block_size: u64,
    /// Blocks rewritten per check-in.
    #[arg(long, default_value_t = 3)]
    changed_blocks: usize,
    /// Random (incompressible) bytes in each rewritten block; the rest is text.
    #[arg(long, default_value = "8K", value_parser = parse_size)]
    random_bytes: u64,
    /// Share of each user disk's blocks that hold data when its desktop is created
    /// (from a template); 0: an empty disk.
    #[arg(long, default_value_t = 0.25)]
    user_fill: f64,
    /// Size of the channel's gold image (1 block in 16 holds data).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    gold_size: u64,
    /// Points set up in parallel.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// The simulated points' shared local store (default: a temporary one in
    /// /dev/shm, removed at the end).
    #[arg(long, value_name = "DIR")]
    local_store: Option<PathBuf>,
    /// Names: points and desktops PREFIX-NNNNNN, gold image PREFIX-gold.
    #[arg(long, default_value = "load")]
    prefix: String,
    #[arg(long, default_value = "load/gold")]
    channel: String,
    /// A step passes when its p99 latency is below this (seconds) and no check-in
    /// failed.
    #[arg(long, default_value_t = 1.0)]
    p99_limit: f64,
    /// Stop after the first step that does not pass.
    #[arg(long)]
    stop_on_fail: bool,
    /// Run a step that did not pass again, up to this many times (each run is
    /// reported; the step passes if its last run does).
    #[arg(long, default_value_t = 0)]
    retry_failed: u32,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON document to FILE.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// After the steps, run the step with the largest N that passed (at the
    /// smallest K it passed with) once more, with `sh -c CMD` running beside its
    /// load phase (a profiler, say), and report that run separately. CMD gets STRATA_LOAD_HUB_PID, STRATA_LOAD_POINTS,
    /// STRATA_LOAD_SCALE and STRATA_LOAD_DURATION (seconds) in its environment;
    /// the step waits for it to exit.
    #[arg(long, value_name = "CMD")]
    profile_hook: Option<String>,
    /// Seed of the schedule (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Leave out the agent's desktop reports (before and after each push), to see
    /// what they cost.
    #[arg(long)]
    no_report: bool,
}

/// Seconds since the Unix epoch.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[derive(Clone, Debug, Default, Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles, in milliseconds.
    fn of(mut v: Vec<f64>) -> Percentiles {
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] * 1e3;
        Percentiles {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: v[v.len() - 1] * 1e3,
            mean: v.iter().sum::<f64>() / v.len() as f64 * 1e3,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
struct HubUsage {
    /// CPU of all the hub's threads over the load phase, percent of one core
    /// (200 = both cores of this machine).
    cpu_percent: f64,
    cpu_ms_per_checkin: f64,
    rss_mib: f64,
    /// Peak resident memory: of this step's load phase when `peak_reset`, else
    /// since the hub started.
    peak_rss_mib: f64,
    peak_reset: bool,
    write_bytes_per_checkin: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct StoreUsage {
    /// The hub's store directory (packs, catalog) and its metadata database.
    store_bytes: u64,
    store_files: u64,
    packs: u64,
    meta_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
struct SetupReport {
    /// Desktops (each: enrolment token, enrolment, desktop create, check-out).
    added: u64,
    seconds: f64,
    per_second: f64,
    hub_cpu_percent: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
struct StepReport {
    points: u64,
    time_scale: f64,
    /// The interval simulated, and the one actually run (interval / K).
    interval_s: f64,
    scaled_interval_s: f64,
    /// Points at `interval_s` that would make this rate: points x K.
    equivalent_points: f64,
    duration_s: f64,
    checkins: u64,
    failures: u64,
    /// The most frequent errors (message, count).
    errors: Vec<(String, u64)>,
    /// Planned rate, and check-ins completed per second of the load phase.
    target_per_s: f64,
    checkins_per_s: f64,
    /// A check-in: reports, push and channel question, all requests end to end.
    latency_ms: Percentiles,
    report_ms: Percentiles,
    push_ms: Percentiles,
    query_ms: Percentiles,
    /// The local commit before the push (client side, not the hub's).
    commit_ms: Percentiles,
    /// How late the scheduler started check-ins (the tool keeping up).
    max_start_lag_ms: f64,
    wire_sent_per_checkin: f64,
    wire_received_per_checkin: f64,
    objects_per_checkin: f64,
    logical_bytes_per_checkin: f64,
    deltas_per_checkin: f64,
    channel_moved: u64,
    hub: Option<HubUsage>,
    /// CPU of this tool (the simulated points) over the load phase, percent of one
    /// core: it shares the machine with the hub.
    tool_cpu_percent: f64,
    /// CPU of the whole machine over the load phase, percent of one core (200 = all
    /// of a 2-core machine): what is not the hub's or this tool's is other
    /// processes'.
    machine_cpu_percent: Option<f64>,
    store: Option<StoreUsage>,
    setup: SetupReport,
    /// 1, or the repeat of a step that did not pass (`--retry-failed`).
    attempt: u32,
    pass: bool,
}

#[derive(Serialize)]
struct Report {
    hub: String,
    interval_s: f64,
    disk_size: u64,
    block_size: u64,
    changed_blocks: usize,
    random_bytes: u64,
    user_fill: f64,
    p99_limit_s: f64,
    steps: Vec<StepReport>,
    /// The largest N that passed, with its K.
    largest_pass: Option<(u64, f64)>,
    /// The largest N that passed (at its smallest K) run again beside
    /// `--profile-hook`.
    profiled: Option<StepReport>,
}

fn resolve_access(a: &Args) -> Result<HubAccess> {
    let url = match (&a.url, &a.hub_dir) {
        (Some(u), _) => u.clone(),
        (None, Some(d)) => std::fs::read_to_string(d.join("hub.url"))
            .with_context(|| format!("{}/hub.url (is the hub running?)", d.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!("give --hub-dir DIR, or --hub URL and --admin-token-file FILE"),
    };
    let token_file = match (&a.admin_token_file, &a.hub_dir) {
        (Some(f), _) => f.clone(),
        (None, Some(d)) => d.join("admin.token"),
        (None, None) => bail!("give --admin-token-file FILE (or --hub-dir DIR)"),
    };
    let admin_token = std::fs::read_to_string(&token_file)
        .with_context(|| token_file.display().to_string())?
        .trim()
        .to_string();
    let ca_pem =
        a.ca.as_ref()
            .map(|f| std::fs::read(f).with_context(|| f.display().to_string()))
            .transpose()?;
    Ok(HubAccess {
        url,
        admin_token,
        ca_pem,
    })
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata-load: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("[strata-load] {}", msg.as_ref());
}

fn run(args: Args) -> Result<()> {
    let access = resolve_access(&args)?;
    if !args.block_size.is_power_of_two() || args.disk_size < args.block_size {
        bail!("--block-size must be a power of two and at most --disk-size");
    }
    let writes = Writes {
        block_size: args.block_size as usize,
        blocks: args.disk_size.div_ceil(args.block_size),
        changed: args.changed_blocks,
        random_bytes: args.random_bytes as usize,
    };
    // The local store: in memory (tmpfs) unless told otherwise, so the simulated
    // points' own fsyncs neither cost the hub's disk nor time.
    let _tmp;
    let local_dir = match &args.local_store {
        Some(d) => d.clone(),
        None => {
            let shm = Path::new("/dev/shm");
            let t = if shm.is_dir() {
                tempfile::Builder::new()
                    .prefix("strata-load-")
                    .tempdir_in(shm)?
            } else {
                tempfile::Builder::new().prefix("strata-load-").tempdir()?
            };
            let p = t.path().join("store");
            _tmp = t;
            p
        }
    };
    let local = Arc::new(if local_dir.join("strata.json").exists() {
        Store::open(&local_dir)?
    } else {
        Store::init(&local_dir)?
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(drive(args, access, local, writes))
}

async fn drive(args: Args, access: HubAccess, local: Arc<Store>, writes: Writes) -> Result<()> {
    sim::wait_for_hub(&access, Duration::from_secs(30)).await?;
    let gold_version = sim::publish_gold(
        &access,
        &local,
        &args.prefix,
        &args.channel,
        args.gold_size,
        &writes,
    )
    .await?;
    log(format!(
        "hub {}: channel {} -> {}-gold@{}",
        access.url,
        args.channel,
        args.prefix,
        &gold_version[..12]
    ));
    let template = if args.user_fill > 0.0 {
        Some(
            sim::push_template(
                &access,
                &local,
                &args.prefix,
                args.disk_size,
                args.user_fill.min(1.0),
                &writes,
            )
            .await?,
        )
    } else {
        None
    };
    let sim = Arc::new(Sim {
        template,
        hub: access.clone(),
        local: local.clone(),
        prefix: args.prefix.clone(),
        channel: args.channel.clone(),
        disk_size: args.disk_size,
        writes,
        gold_version,
        report: !args.no_report,
    });
    let admin = access.admin()?;
    let anon = access.anonymous()?;
    let mut rng = args.seed.map(Rng::new).unwrap_or_else(Rng::from_os);
    let mut points: Vec<Arc<Mutex<PointSim>>> = Vec::new();
    let mut reports: Vec<StepReport> = Vec::new();
    if !args.json {
        print_header();
    }
    for step in &args.steps {
        let k = step.scale.unwrap_or(args.time_scale);
        let n = step.points as usize;
        // Setup: only the desktops this step adds.
        let setup = if points.len() < n {
            let added = (n - points.len()) as u64;
            let cpu0 = args.hub_pid.and_then(procstat::sample);
            let t0 = Instant::now();
            let from = points.len() as u64;
            log(format!("setting up desktops {from}..{n}"));
            let mut made: Vec<PointSim> = Vec::with_capacity(added as usize);
            let mut stream = futures_util::stream::iter(from..n as u64)
                .map(|i| {
                    let (sim, admin, anon) = (sim.clone(), admin.clone(), anon.clone());
                    async move { sim::setup_point(&sim, &admin, &anon, i).await }
                })
                .buffer_unordered(args.setup_concurrency.max(1));
            let mut last_log = Instant::now();
            while let Some(p) = stream.next().await {
                made.push(p?);
                if last_log.elapsed() > Duration::from_secs(10) {
                    last_log = Instant::now();
                    log(format!(
                        "  {} of {added} set up ({:.0}/s)",
                        made.len(),
                        made.len() as f64 / t0.elapsed().as_secs_f64()
                    ));
                }
            }
            made.sort_by_key(|p| p.index);
            points.extend(made.into_iter().map(|p| Arc::new(Mutex::new(p))));
            let seconds = t0.elapsed().as_secs_f64();
            let cpu1 = args.hub_pid.and_then(procstat::sample);
            let r = SetupReport {
                added,
                seconds,
                per_second: added as f64 / seconds,
                hub_cpu_percent: cpu0
                    .zip(cpu1)
                    .map(|(a, b)| (b.cpu_s - a.cpu_s) / seconds * 100.0),
            };
            log(format!(
                "set up {added} desktops in {seconds:.1} s ({:.0}/s{})",
                r.per_second,
                r.hub_cpu_percent
                    .map(|c| format!(", hub CPU {c:.0}%"))
                    .unwrap_or_default()
            ));
            r
        } else {
            SetupReport::default()
        };
        // Keep the local store small: only each point's tip is referenced.
        if reports.iter().any(|r| r.checkins > 0) {
            let l = local.clone();
            tokio::task::spawn_blocking(move || strata_store::gc::gc(&l, &mut |_| {}))
                .await
                .map_err(|e| anyhow!("local gc: {e}"))??;
        }
        let mut r = run_step(&args, &sim, &points[..n], n as u64, k, &mut rng).await;
        r.setup = setup;
        if !args.json {
            print_row(&r);
        }
        let mut pass = r.pass;
        reports.push(r);
        for attempt in 2..=args.retry_failed + 1 {
            if pass {
                break;
            }
            // A stall of the machine (another process's disk writes, say) can fail
            // a step by itself: run it again, once the hub is idle, and report both.
            log(format!(
                "step did not pass; running it again (attempt {attempt})"
            ));
            if let Some(pid) = args.hub_pid {
                wait_until_idle(pid).await;
            }
            let mut r = run_step(&args, &sim, &points[..n], n as u64, k, &mut rng).await;
            r.attempt = attempt;
            if !args.json {
                print_row(&r);
            }
            pass = r.pass;
            reports.push(r);
        }
        if !pass && args.stop_on_fail {
            log("step did not pass; stopping (--stop-on-fail)");
            break;
        }
    }
    let largest_pass = reports
        .iter()
        .filter(|r| r.pass)
        .max_by(|a, b| {
            (a.points, a.equivalent_points)
                .partial_cmp(&(b.points, b.equivalent_points))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .map(|r| (r.points, r.time_scale));
    let mut profiled = None;
    // Profile the largest N that passed, at the smallest time scale it passed with:
    // the hub holding the most desktops at (nearest) the real rate.
    let profile_target = reports
        .iter()
        .filter(|r| r.pass)
        .max_by(|a, b| {
            (a.points, -a.time_scale)
                .partial_cmp(&(b.points, -b.time_scale))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .map(|r| (r.points, r.time_scale));
    if let (Some(hook), Some((n, k))) = (&args.profile_hook, profile_target) {
        if let Some(pid) = args.hub_pid {
            wait_until_idle(pid).await;
        }
        log(format!("profiling: {n} points x{k} again, with the hook"));
        let l = local.clone();
        tokio::task::spawn_blocking(move || strata_store::gc::gc(&l, &mut |_| {}))
            .await
            .map_err(|e| anyhow!("local gc: {e}"))??;
        let window = step_window(&args, args.interval / k);
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(hook)
            .env(
                "STRATA_LOAD_HUB_PID",
                args.hub_pid.map(|p| p.to_string()).unwrap_or_default(),
            )
            .env("STRATA_LOAD_POINTS", n.to_string())
            .env("STRATA_LOAD_SCALE", k.to_string())
            .env("STRATA_LOAD_DURATION", format!("{window:.0}"))
            .spawn()
            .context("starting the profile hook")?;
        let r = run_step(&args, &sim, &points[..n as usize], n, k, &mut rng).await;
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .map_err(|e| anyhow!("profile hook: {e}"))?
            .context("waiting for the profile hook")?;
        if !status.success() {
            log(format!("the profile hook exited with {status}"));
        }
        if !args.json {
            println!("profiled run of the largest N that passed:");
            print_row(&r);
        }
        profiled = Some(r);
    }
    let report = Report {
        profiled,
        hub: access.url.clone(),
        interval_s: args.interval,
        disk_size: args.disk_size,
        block_size: args.block_size,
        changed_blocks: args.changed_blocks,
        random_bytes: args.random_bytes,
        user_fill: args.user_fill,
        p99_limit_s: args.p99_limit,
        steps: reports,
        largest_pass,
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(f) = &args.json_out {
        std::fs::write(f, format!("{json}\n")).with_context(|| f.display().to_string())?;
    }
    if args.json {
        println!("{json}");
    } else {
        print_footer(&report);
    }
    Ok(())
}

/// Wait (up to a minute) until the hub uses less than 5% of a core, so that a run
/// does not start in the tail of the previous one.
async fn wait_until_idle(pid: u32) {
    for _ in 0..30 {
        let a = procstat::sample(pid);
        tokio::time::sleep(Duration::from_secs(2)).await;
        match a.zip(procstat::sample(pid)) {
            Some((a, b)) if (b.cpu_s - a.cpu_s) / 2.0 < 0.05 => return,
            None => return,
            _ => {}
        }
    }
}

/// Seconds of load of a step whose points check in every `period` seconds.
fn step_window(args: &Args, period: f64) -> f64 {
    match (args.rounds, args.duration) {
        (Some(r), _) => r as f64 * period,
        (None, Some(d)) => d,
        (None, None) => period,
    }
}

/// The check-in times of one step: (seconds from the start, point index).
fn schedule(
    n: u64,
    period: f64,
    window: Option<f64>,
    rounds: Option<u32>,
    rng: &mut Rng,
) -> Vec<(f64, usize)> {
    let mut slots: Vec<u64> = (0..n).collect();
    rng.shuffle(&mut slots);
    let mut ev = Vec::new();
    for (i, slot) in slots.into_iter().enumerate() {
        let phase = (slot as f64 + rng.next_f64()) / n as f64 * period;
        let mut m = 0u32;
        loop {
            let t = phase + m as f64 * period;
            let more = match (rounds, window) {
                (Some(r), _) => m < r,
                (None, Some(w)) => t < w,
                (None, None) => m < 1,
            };
            if !more {
                break;
            }
            ev.push((t, i));
            m += 1;
        }
    }
    ev.sort_by(|a, b| a.0.total_cmp(&b.0));
    ev
}

async fn run_step(
    args: &Args,
    sim: &Arc<Sim>,
    points: &[Arc<Mutex<PointSim>>],
    n: u64,
    k: f64,
    rng: &mut Rng,
) -> StepReport {
    let period = args.interval / k;
    let window = step_window(args, period);
    let events = schedule(n, period, Some(window), args.rounds, rng);
    log(format!(
        "step: {n} points, interval {} s / {k} = {period:.1} s, {} check-ins over {window:.0} s ({:.1}/s)",
        args.interval,
        events.len(),
        events.len() as f64 / window
    ));
    let hub0 = args.hub_pid.and_then(|pid| {
        let reset = procstat::reset_peak(pid);
        procstat::sample(pid).map(|s| (s, reset))
    });
    let me0 = procstat::sample_self();
    let m0 = procstat::machine_ticks();
    let t_start = Instant::now();
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let total = events.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(CheckinResult, f64)>();
    let scheduler = {
        let (sim, points) = (sim.clone(), points.to_vec());
        tokio::spawn(async move {
            for (t, i) in events {
                let at = start + Duration::from_secs_f64(t);
                tokio::time::sleep_until(at).await;
                let lag = tokio::time::Instant::now().duration_since(at).as_secs_f64();
                let (sim, p, tx) = (sim.clone(), points[i].clone(), tx.clone());
                tokio::spawn(async move {
                    // One round at a time per point, as the agent's sync lock does.
                    let mut p = p.lock().await;
                    let r = sim::check_in(sim, &mut p).await;
                    let _ = tx.send((r, lag));
                });
            }
        })
    };
    let mut results: Vec<CheckinResult> = Vec::with_capacity(total);
    let mut max_lag = 0f64;
    let mut last_log = Instant::now();
    while results.len() < total {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some((r, lag))) => {
                max_lag = max_lag.max(lag);
                results.push(r);
            }
            Ok(None) => break,
            Err(_) => {}
        }
        if last_log.elapsed() > Duration::from_secs(15) {
            last_log = Instant::now();
            let failed = results.iter().filter(|r| r.error.is_some()).count();
            log(format!(
                "  {}/{total} check-ins done, {failed} failed, {:.0} s",
                results.len(),
                t_start.elapsed().as_secs_f64()
            ));
        }
    }
    let _ = scheduler.await;
    let elapsed = t_start.elapsed().as_secs_f64();
    let me1 = procstat::sample_self();
    let hub1 = args.hub_pid.and_then(procstat::sample);
    let machine = m0
        .zip(procstat::machine_ticks())
        .map(|((b0, _), (b1, _))| (b1 - b0) as f64 * procstat::tick_seconds() / elapsed * 100.0);
    let mut r = summarize(
        args, n, k, period, window, elapsed, results, max_lag, hub0, hub1, me0, me1,
    );
    r.machine_cpu_percent = machine;
    r
}

#[allow(clippy::too_many_arguments)]
fn summarize(
    args: &Args,
    n: u64,
    k: f64,
    period: f64,
    window: f64,
    elapsed: f64,
    results: Vec<CheckinResult>,
    max_lag: f64,
    hub0: Option<(procstat::Sample, bool)>,
    hub1: Option<procstat::Sample>,
    me0: Option<procstat::Sample>,
    me1: Option<procstat::Sample>,
) -> StepReport {
    let c = results.len() as u64;
    let per = |f: &dyn Fn(&CheckinResult) -> f64| -> f64 {
        if c == 0 {
            0.0
        } else {
            results.iter().map(f).sum::<f64>() / c as f64
        }
    };
    let mut errors: Vec<(String, u64)> = Vec::new();
    for e in results.iter().filter_map(|r| r.error.as_deref()) {
        // Group by the message without ids and numbers.
        let key: String = e.chars().take(160).collect();
        match errors.iter_mut().find(|(m, _)| *m == key) {
            Some((_, n)) => *n += 1,
            None => errors.push((key, 1)),
        }
    }
    errors.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    errors.truncate(5);
    let failures = results.iter().filter(|r| r.error.is_some()).count() as u64;
    let hub = hub0.zip(hub1).map(|((a, reset), b)| HubUsage {
        cpu_percent: (b.cpu_s - a.cpu_s) / elapsed * 100.0,
        cpu_ms_per_checkin: if c > 0 {
            (b.cpu_s - a.cpu_s) / c as f64 * 1e3
        } else {
            0.0
        },
        rss_mib: b.rss_kib as f64 / 1024.0,
        peak_rss_mib: b.hwm_kib as f64 / 1024.0,
        peak_reset: reset,
        write_bytes_per_checkin: a
            .write_bytes
            .zip(b.write_bytes)
            .filter(|_| c > 0)
            .map(|(x, y)| (y.saturating_sub(x)) as f64 / c as f64),
    });
    let store = args.hub_dir.as_ref().map(|d| {
        let (store_bytes, store_files, packs) = procstat::dir_usage(&d.join("store"));
        let meta_bytes = ["hub.sqlite", "hub.sqlite-wal", "hub.sqlite-shm"]
            .iter()
            .filter_map(|f| std::fs::metadata(d.join(f)).ok())
            .map(|m| m.len())
            .sum();
        StoreUsage {
            store_bytes,
            store_files,
            packs,
            meta_bytes,
        }
    });
    let latency = Percentiles::of(results.iter().map(|r| r.latency_s).collect());
    let pass = c > 0 && failures == 0 && latency.p99 < args.p99_limit * 1e3;
    StepReport {
        points: n,
        time_scale: k,
        interval_s: args.interval,
        scaled_interval_s: period,
        equivalent_points: n as f64 * k,
        duration_s: window,
        checkins: c,
        failures,
        errors,
        target_per_s: n as f64 / period,
        checkins_per_s: c as f64 / window,
        report_ms: Percentiles::of(results.iter().map(|r| r.report_s).collect()),
        push_ms: Percentiles::of(results.iter().map(|r| r.push_s).collect()),
        query_ms: Percentiles::of(results.iter().map(|r| r.query_s).collect()),
        commit_ms: Percentiles::of(results.iter().map(|r| r.commit_s).collect()),
        latency_ms: latency,
        max_start_lag_ms: max_lag * 1e3,
        wire_sent_per_checkin: per(&|r| r.wire_sent as f64),
        wire_received_per_checkin: per(&|r| r.wire_received as f64),
        objects_per_checkin: per(&|r| r.objects as f64),
        logical_bytes_per_checkin: per(&|r| r.logical_bytes as f64),
        deltas_per_checkin: per(&|r| r.deltas as f64),
        channel_moved: results.iter().filter(|r| r.channel_moved).count() as u64,
        hub,
        tool_cpu_percent: me0
            .zip(me1)
            .map(|(a, b)| (b.cpu_s - a.cpu_s) / elapsed * 100.0)
            .unwrap_or(0.0),
        machine_cpu_percent: None,
        store,
        setup: SetupReport::default(),
        attempt: 1,
        pass,
    }
}

fn print_header() {
    println!(
        "{:>7} {:>4} {:>8} {:>8} {:>7} {:>6} {:>7} {:>7} {:>7} {:>7} {:>5} {:>6} {:>7} {:>7} {:>8} {:>7} {:>6} {:>6} {:>5}",
        "points",
        "K",
        "eq.pts",
        "every_s",
        "checkin",
        "per_s",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "fail",
        "hubCPU",
        "ms/ci",
        "RSS_MiB",
        "store_MB",
        "packs",
        "tool",
        "mach",
        "pass"
    );
}

fn print_row(r: &StepReport) {
    let (cpu, ms, rss) = match &r.hub {
        Some(h) => (
            format!("{:.0}%", h.cpu_percent),
            format!("{:.1}", h.cpu_ms_per_checkin),
            format!("{:.0}", h.peak_rss_mib),
        ),
        None => ("-".into(), "-".into(), "-".into()),
    };
    let (store, packs) = match &r.store {
        Some(s) => (
            format!("{:.0}", (s.store_bytes + s.meta_bytes) as f64 / 1e6),
            s.packs.to_string(),
        ),
        None => ("-".into(), "-".into()),
    };
    println!(
        "{:>7} {:>4} {:>8.0} {:>8.1} {:>7} {:>6.1} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>5} {:>6} {:>7} {:>7} {:>8} {:>7} {:>6} {:>6} {:>5}",
        r.points,
        r.time_scale,
        r.equivalent_points,
        r.scaled_interval_s,
        r.checkins,
        r.checkins_per_s,
        r.latency_ms.p50,
        r.latency_ms.p90,
        r.latency_ms.p99,
        r.latency_ms.max,
        r.failures,
        cpu,
        ms,
        rss,
        store,
        packs,
        format!("{:.0}%", r.tool_cpu_percent),
        r.machine_cpu_percent
            .map(|m| format!("{m:.0}%"))
            .unwrap_or_else(|| "-".into()),
        if r.pass { "yes" } else { "NO" }
    );
    for (e, n) in &r.errors {
        println!("        {n} x {e}");
    }
}

fn print_footer(r: &Report) {
    match r.largest_pass {
        Some((n, k)) => println!(
            "largest passing step: {n} desktops at {:.0} s / {k} (rate of {:.0} points at {:.0} s); limit p99 < {} s, no failures",
            r.interval_s,
            n as f64 * k,
            r.interval_s,
            r.p99_limit_s
        ),
        None => println!("no step passed (p99 < {} s, no failures)", r.p99_limit_s),
    }
}
