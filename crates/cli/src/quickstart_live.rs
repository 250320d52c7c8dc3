//! The live half of `strata quickstart`: a hub, a point and a desktop, started for
//! real in the quickstart's directory and left running.
//!
//! Every step is the `strata` command an operator would type, run as a child of this
//! binary (`current_exe`) with `--json` so its result can be checked and summarised;
//! the two servers (`strata hub run`, `strata point run`) are spawned in process
//! groups of their own with their output in `DIR/*.log`, so they outlive the
//! quickstart and a Ctrl-C at the terminal does not reach them. Their pids and
//! command lines go to `DIR/quickstart.json` the moment they start, so
//! `strata quickstart --stop DIR` finds them even if the quickstart itself was
//! interrupted; a pid counts as ours only while `/proc/PID/cmdline` is the command
//! line we started (pids are reused). If a step fails, what was started is stopped
//! before the error is reported.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::output::bytes;

/// The gold image the store tour makes and the hub serves.
pub const IMAGE: &str = "sample";
pub const CHANNEL: &str = "sample/production";
pub const DESKTOP: &str = "demo";
pub const POINT: &str = "laptop";
/// Size of the desktop's (empty) user disk.
const USER_SIZE: &str = "64M";
/// Both disks are this big (the sample image is 64 MiB too).
const DISK_BYTES: u64 = 64 << 20;
/// The record of a quickstart directory: processes, addresses, state.
pub const STATE_FILE: &str = "quickstart.json";
const SOCKET: &str = "nbd.sock";
/// What a quickstart makes in its directory (and removes when it starts afresh).
pub const ENTRIES: &[&str] = &[
    "store",
    "sample.raw",
    "hub",
    "point",
    "hub.log",
    "point.log",
    SOCKET,
    STATE_FILE,
];
/// How long a server may take to start listening, and a one-shot command to finish.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// A server the quickstart started.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Proc {
    /// "hub" or "point agent".
    pub role: String,
    pub pid: u32,
    /// Its arguments after the program name: how a pid is recognised as ours.
    pub args: Vec<String>,
    pub log: PathBuf,
}

/// `DIR/quickstart.json`.
#[derive(Serialize, Deserialize, Debug)]
pub struct State {
    pub format: u32,
    pub dir: PathBuf,
    /// "starting", "running", "failed" or "stopped".
    pub state: String,
    #[serde(default)]
    pub processes: Vec<Proc>,
    /// What `quickstart` printed (URLs, NBD URIs, the qemu command), once running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Value>,
}

impl State {
    pub fn new(dir: &Path) -> State {
        State {
            format: 1,
            dir: dir.to_path_buf(),
            state: "starting".into(),
            processes: Vec::new(),
            summary: None,
        }
    }

    pub fn load(dir: &Path) -> Result<State> {
        let f = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&f).with_context(|| f.display().to_string())?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a quickstart's record", f.display()))
    }

    /// Replace `DIR/quickstart.json` atomically.
    pub fn save(&self) -> Result<()> {
        let f = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(&tmp, text).with_context(|| tmp.display().to_string())?;
        std::fs::rename(&tmp, &f).with_context(|| f.display().to_string())?;
        Ok(())
    }

    /// The recorded servers still running.
    pub fn running(&self) -> Vec<&Proc> {
        self.processes.iter().filter(|p| is_running(p)).collect()
    }
}

/// True while `p.pid` runs the command line we started (not a zombie, not a reused
/// pid: a zombie's cmdline is empty).
pub fn is_running(p: &Proc) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{}/cmdline", p.pid)) else {
        return false;
    };
    let argv: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    argv.len() > 1 && argv[1..] == p.args[..]
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory effects; the pid was checked to be ours.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Quote `s` for a POSIX shell if it needs it (URIs with `?` do: zsh refuses
/// unmatched globs).
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn shell_line<S: AsRef<str>>(args: &[S]) -> String {
    args.iter()
        .map(|a| shell_quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
}

/// The last lines of a log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    if tail.is_empty() {
        format!("({} is empty)", log.display())
    } else {
        format!("last lines of {}:\n{tail}", log.display())
    }
}

/// Run `cmd` to completion with its output captured, killing it after `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> std::io::Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => {
            // Still our unreaped child: the pid cannot have been reused.
            signal(pid, libc::SIGKILL);
            let _ = rx.recv();
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("gave up after {}s", limit.as_secs()),
            ))
        }
    }
}

/// Starts the hub, the point and the desktop; stops the servers again if dropped
/// before [`Live::start`] succeeded (a step failed).
pub struct Live {
    exe: PathBuf,
    dir: PathBuf,
    text: bool,
    state: State,
    children: Vec<Child>,
    /// Until every step succeeded: dropping stops the children.
    armed: bool,
    /// Secrets shown shortened (the enrolment token).
    hide: Vec<String>,
    default_dir: bool,
}

impl Live {
    /// `state` is the directory's record, already saved as "starting";
    /// `default_dir`: DIR was not given (so `--stop` needs none either).
    pub fn new(dir: &Path, state: State, text: bool, default_dir: bool) -> Result<Live> {
        Ok(Live {
            exe: std::env::current_exe().context("finding the strata binary")?,
            dir: dir.to_path_buf(),
            text,
            state,
            children: Vec::new(),
            armed: true,
            hide: Vec::new(),
            default_dir,
        })
    }

    /// Print a progress line (text mode), with the directory shortened to `$QS` and
    /// secrets shortened: the paths are long, and `$QS` is set at the top.
    fn say(&self, line: &str) {
        if self.text {
            let mut line = line.replace(&self.dir.display().to_string(), "$QS");
            for h in &self.hide {
                line = line.replace(h, &format!("{}…", &h[..h.len().min(22)]));
            }
            println!("{line}");
            let _ = std::io::stdout().flush();
        }
    }

    fn step(&self, title: &str) {
        self.say(&format!("\n== {title}"));
    }

    /// A `strata` command with nothing taken from the caller's environment that
    /// could point it at another store or hub.
    fn command(&self) -> Command {
        let mut c = Command::new(&self.exe);
        c.env_remove("STRATA_STORE")
            .env_remove("STRATA_HUB")
            .env_remove("STRATA_HUB_DIR")
            .current_dir(&self.dir);
        c
    }

    /// `strata --json ARGS`, shown as `strata ARGS`: its JSON document.
    fn run(&self, args: &[&str]) -> Result<Value> {
        let shown = format!("strata {}", shell_line(args));
        self.step(&shown);
        let out = output_within(self.command().arg("--json").args(args), COMMAND_TIMEOUT)
            .with_context(|| format!("running `{shown}`"))?;
        let doc: Option<Value> = serde_json::from_slice(&out.stdout).ok();
        if !out.status.success() {
            let msg = doc
                .as_ref()
                .and_then(|d| d["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
            bail!("`{shown}` failed: {msg}");
        }
        doc.ok_or_else(|| {
            anyhow!(
                "`{shown}` printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Start `strata ARGS` as a server that outlives us: its own process group,
    /// stdin from /dev/null, stdout and stderr to `log`; recorded at once.
    fn spawn(&mut self, role: &str, args: &[String], log: &Path) -> Result<usize> {
        let shown = format!("strata {}", shell_line(args));
        self.step(&format!(
            "{shown}   (in the background; log {})",
            log.display()
        ));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| log.display().to_string())?;
        let child = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting `{shown}`"))?;
        self.state.processes.push(Proc {
            role: role.to_string(),
            pid: child.id(),
            args: args.to_vec(),
            log: log.to_path_buf(),
        });
        self.children.push(child);
        self.state.save()?;
        Ok(self.children.len() - 1)
    }

    /// Wait until `ready` answers something, while child `i` lives.
    fn wait_ready<T>(&mut self, i: usize, mut ready: impl FnMut() -> Option<T>) -> Result<T> {
        let t0 = Instant::now();
        let p = self.state.processes[i].clone();
        loop {
            if let Some(v) = ready() {
                return Ok(v);
            }
            if let Some(status) = self.children[i].try_wait()? {
                bail!("the {} exited ({status}); {}", p.role, log_tail(&p.log));
            }
            if t0.elapsed() > READY_TIMEOUT {
                bail!(
                    "the {} did not start within {}s; {}",
                    p.role,
                    READY_TIMEOUT.as_secs(),
                    log_tail(&p.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every step; the summary document (also recorded in `DIR/quickstart.json`).
    pub fn start(mut self, store: &Path) -> Result<Value> {
        let dir = self.dir.clone();
        let hub_dir = dir.join("hub");
        let point = dir.join("point");
        let sock = dir.join(SOCKET);
        let (hub_s, point_s, sock_s, store_s) = (
            path_str(&hub_dir)?.to_string(),
            path_str(&point)?.to_string(),
            path_str(&sock)?.to_string(),
            path_str(store)?.to_string(),
        );

        if self.text {
            println!("(QS={})", shell_quote(path_str(&dir)?));
        }
        let init = self.run(&["hub", "init", &hub_s])?;
        let token_file = init["admin_token_file"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.say(&format!(
            "hub initialised in {hub_s}; admin credential in {token_file}"
        ));

        let hub_log = dir.join("hub.log");
        let args: Vec<String> = ["--json", "hub", "run", &hub_s, "--listen", "127.0.0.1:0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let h = self.spawn("hub", &args, &hub_log)?;
        // It prints one JSON line once it listens (after writing DIR/hub.url).
        let url = self.wait_ready(h, || {
            std::fs::read_to_string(&hub_log)
                .ok()?
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find_map(|v| v["url"].as_str().map(str::to_string))
        })?;
        let hub_pid = self.state.processes[h].pid;
        self.say(&format!("hub listening on {url} (pid {hub_pid})"));

        let v1_spec = format!("{IMAGE}:v1");
        let p1 = self.run(&[
            "hub",
            "push",
            &v1_spec,
            "--from-store",
            &store_s,
            "--dir",
            &hub_s,
        ])?;
        self.say(&pushed(&v1_spec, &p1));
        let p2 = self.run(&[
            "hub",
            "push",
            IMAGE,
            "--from-store",
            &store_s,
            "--dir",
            &hub_s,
        ])?;
        self.say(&format!(
            "{} (only what v1 lacks: {} of {} as deltas)",
            pushed(&format!("{IMAGE}:main"), &p2),
            p2["deltas"].as_u64().unwrap_or(0),
            p2["data_objects"].as_u64().unwrap_or(0)
        ));

        let published = self.run(&[
            "channel",
            "publish",
            &format!("{IMAGE}@v1"),
            CHANNEL,
            "--dir",
            &hub_s,
        ])?;
        let gold = published["version"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.say(&format!(
            "{CHANNEL} -> {IMAGE}@{} (#{})",
            short(&gold),
            published["seq"]
        ));

        let d = self.run(&[
            "desktop",
            "create",
            DESKTOP,
            "--channel",
            CHANNEL,
            "--size",
            USER_SIZE,
            "--dir",
            &hub_s,
        ])?;
        self.say(&format!(
            "desktop {DESKTOP}: OS disk follows {CHANNEL}, user disk {} ({}, empty)",
            d["user_image"].as_str().unwrap_or("?"),
            bytes(DISK_BYTES)
        ));

        let t = self.run(&["hub", "enroll", POINT, "--dir", &hub_s])?;
        let token = t["token"]
            .as_str()
            .ok_or_else(|| anyhow!("hub enroll printed no token: {t}"))?
            .to_string();
        self.hide.push(token.clone());
        self.say(&format!("one-time enrolment token for point {POINT}"));

        let e = self.run(&[
            "--store",
            &point_s,
            "point",
            "enroll",
            &url,
            &token,
            "--sync-interval",
            "30s",
        ])?;
        self.say(&format!(
            "{point_s} is now point {} of {} (syncs every {}s)",
            e["point"].as_str().unwrap_or("?"),
            e["hub"].as_str().unwrap_or("?"),
            e["sync_interval_secs"]
        ));

        let agent_log = dir.join("point.log");
        let args: Vec<String> = ["--store", &point_s, "point", "run", "--socket", &sock_s]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let a = self.spawn("point agent", &args, &agent_log)?;
        self.wait_ready(a, || UnixStream::connect(&sock).ok())?;
        let agent_pid = self.state.processes[a].pid;
        self.say(&format!(
            "point agent serving NBD on {sock_s} (pid {agent_pid})"
        ));

        let s = self.run(&[
            "--store", &point_s, "point", "desktop", "start", DESKTOP, "--socket", &sock_s,
        ])?;
        let os_uri = s["os"]["nbd"].as_str().unwrap_or_default().to_string();
        let user_uri = s["user"]["nbd"].as_str().unwrap_or_default().to_string();
        if os_uri.is_empty() || user_uri.is_empty() {
            bail!("point desktop start named no NBD exports: {s}");
        }
        let qemu: Vec<String> = s["qemu"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        self.say(&format!(
            "desktop {DESKTOP} checked out to {POINT} (epoch {}): OS disk {IMAGE}@{}{}, user disk {}",
            s["epoch"],
            short(s["os"]["version"].as_str().unwrap_or_default()),
            match s["os"]["streaming_blocks"].as_u64() {
                Some(n) if n > 0 => format!(" ({n} blocks stream from the hub as read, the rest prefetched)"),
                _ => String::new(),
            },
            short(s["user"]["version"].as_str().unwrap_or_default()),
        ));

        let checks = self.check(&[("OS disk", &os_uri), ("user disk", &user_uri)])?;

        let qemu_line = shell_line(&qemu);
        let env_line = format!(
            "export STRATA_HUB_DIR={} STRATA_STORE={}",
            shell_quote(&hub_s),
            shell_quote(&point_s)
        );
        let dir_s = path_str(&dir)?.to_string();
        let stop = if self.default_dir {
            "strata quickstart --stop".to_string()
        } else {
            format!("strata quickstart --stop {}", shell_quote(&dir_s))
        };
        let exe = self.exe.clone();
        let summary = json!({
            "dir": dir,
            "hub": {
                "url": url, "dir": hub_dir, "pid": hub_pid, "log": hub_log,
                "admin_token_file": token_file,
            },
            "point": {
                "name": POINT, "store": point, "pid": agent_pid, "log": agent_log,
                "socket": sock,
            },
            "image": IMAGE,
            "channel": {"name": CHANNEL, "version": gold},
            "desktop": s,
            "nbd": {"os": os_uri, "user": user_uri},
            "qemu": qemu,
            "qemu_command": qemu_line,
            "checks": checks,
            "pids": {"hub": hub_pid, "point": agent_pid},
            "env": {"STRATA_HUB_DIR": hub_dir, "STRATA_STORE": point},
            "stop": stop,
            "strata": exe,
        });

        if self.text {
            println!(
                "\nRunning now, and after this command exits (QS={}):",
                shell_quote(&dir_s)
            );
            println!("  hub          {url}, pid {hub_pid}, log $QS/hub.log");
            println!(
                "               admin credential in {}",
                token_file.replace(&dir_s, "$QS")
            );
            println!("  point agent  {POINT}, pid {agent_pid}, store $QS/point, log $QS/point.log");
            println!("Desktop {DESKTOP}'s disks over NBD:");
            println!("  OS disk    {os_uri}");
            println!("  user disk  {user_uri}");
            println!(
                "Attach them to a VM (the sample disk holds no OS: the VM finds nothing to boot):"
            );
            println!("  {qemu_line}");
            println!("Try it (the lines paste into a shell as they are):");
            if !strata_on_path(&exe) {
                println!("  alias strata={}", shell_quote(path_str(&exe)?));
            }
            println!("  {env_line}");
            println!("  # the desktop as the hub sees it and as the point last reported it");
            println!("  strata desktop show {DESKTOP}");
            println!("  strata --json desktop show {DESKTOP}");
            println!("  strata point status");
            println!("  # any NBD client reads and writes the disks; then commit and push (else every 30s)");
            println!("  qemu-img info {}", shell_quote(&user_uri));
            println!(
                "  qemu-io -f raw -c 'write -P 0x5a 0 1M' {}",
                shell_quote(&user_uri)
            );
            println!("  strata point sync");
            println!("  # release the update (v2) and switch the OS disk to it: only changed blocks travel");
            println!("  strata channel publish {IMAGE}@main {CHANNEL}");
            println!(
                "  strata point desktop start {DESKTOP} --socket {}",
                shell_quote(&sock_s)
            );
            println!("  strata channel log {CHANNEL}");
            println!("Stop everything:\n  {stop}");
        }

        self.state.summary = Some(summary.clone());
        self.state.state = "running".into();
        self.state.save()?;
        // Disarmed: the servers keep running.
        self.armed = false;
        Ok(summary)
    }

    /// Read both exports' sizes with a real NBD client (qemu-img, else nbdinfo);
    /// skipped with a note if neither is installed.
    fn check(&self, disks: &[(&str, &str)]) -> Result<Value> {
        let tools: [(&str, &[&str]); 2] = [
            ("qemu-img", &["info", "--output=json", "-f", "raw"]),
            ("nbdinfo", &["--size"]),
        ];
        for (tool, args) in tools {
            let installed = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            if !installed {
                continue;
            }
            self.step(&format!("check both disks with a real NBD client: {tool}"));
            let mut out = Vec::new();
            for (what, uri) in disks {
                let o = output_within(Command::new(tool).args(args).arg(uri), CHECK_TIMEOUT)
                    .with_context(|| format!("{tool} {uri}"))?;
                if !o.status.success() {
                    bail!(
                        "{tool} could not read {uri}: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                }
                let text = String::from_utf8_lossy(&o.stdout);
                let size = if tool == "qemu-img" {
                    serde_json::from_str::<Value>(&text)
                        .ok()
                        .and_then(|v| v["virtual-size"].as_u64())
                } else {
                    text.trim().parse::<u64>().ok()
                };
                let size = size.ok_or_else(|| anyhow!("{tool} {uri} printed {text:?}"))?;
                if size != DISK_BYTES {
                    bail!("{tool} says {uri} holds {size} bytes, not {DISK_BYTES}");
                }
                self.say(&format!("{what:<10} {uri}  {}", bytes(size)));
                out.push(json!({"disk": what, "uri": uri, "tool": tool, "virtual_size": size}));
            }
            return Ok(json!({"tool": tool, "disks": out}));
        }
        let note = "skipped: no NBD client installed (qemu-img from qemu-utils, or nbdinfo from libnbd-bin)";
        self.step("check both disks with a real NBD client");
        self.say(note);
        Ok(json!({"skipped": note}))
    }
}

impl Drop for Live {
    /// A step failed: stop what was started (newest first) and say so.
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let started = !self.children.is_empty();
        while let Some(mut c) = self.children.pop() {
            signal(c.id(), libc::SIGTERM);
            let t0 = Instant::now();
            while matches!(c.try_wait(), Ok(None)) && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.state.state = "failed".into();
        let _ = self.state.save();
        if started {
            eprintln!(
                "quickstart: a step failed; the servers it had started are stopped (their logs are in {})",
                self.dir.display()
            );
        }
    }
}

/// Whether `strata` on $PATH is this binary (after `cargo run` it usually is not:
/// the printed commands then come with an alias).
fn strata_on_path(exe: &Path) -> bool {
    let me = std::fs::canonicalize(exe).ok();
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .any(|d| me.is_some() && std::fs::canonicalize(d.join("strata")).ok() == me)
    })
}

fn short(v: &str) -> &str {
    &v[..12.min(v.len())]
}

fn pushed(what: &str, p: &Value) -> String {
    format!(
        "{what} -> {} on the hub: {} data objects, {} sent",
        short(p["version"].as_str().unwrap_or_default()),
        p["data_objects"].as_u64().unwrap_or(0),
        bytes(p["wire_sent"].as_u64().unwrap_or(0))
    )
}

/// `strata quickstart --stop DIR`: stop the recorded servers (the agent first, then
/// the hub): SIGTERM, then SIGKILL after 10 s. Idempotent.
pub fn stop(dir: &Path, json_out: bool) -> Result<()> {
    if !dir.join(STATE_FILE).exists() {
        bail!(
            "{} holds no quickstart (no {STATE_FILE}); nothing to stop",
            dir.display()
        );
    }
    let mut state = State::load(dir)?;
    let mut report = Vec::new();
    for p in state.processes.iter().rev() {
        if !is_running(p) {
            report.push(json!({"role": p.role, "pid": p.pid, "was_running": false}));
            continue;
        }
        signal(p.pid, libc::SIGTERM);
        let mut how = "SIGTERM";
        let t0 = Instant::now();
        while is_running(p) {
            if t0.elapsed() > Duration::from_secs(10) && how == "SIGTERM" {
                signal(p.pid, libc::SIGKILL);
                how = "SIGKILL";
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("{} (pid {}) does not exit", p.role, p.pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        report.push(json!({"role": p.role, "pid": p.pid, "was_running": true, "signal": how}));
    }
    // The agent leaves its socket file behind.
    let sock = dir.join(SOCKET);
    if sock.exists() && UnixStream::connect(&sock).is_err() {
        let _ = std::fs::remove_file(&sock);
    }
    if state.state != "stopped" {
        state.state = "stopped".into();
        state.save()?;
    }
    if json_out {
        crate::output::print_json(&json!({"dir": dir, "stopped": report}));
        return Ok(());
    }
    let mut any = false;
    for r in &report {
        if r["was_running"] == true {
            any = true;
            println!(
                "stopped the {} (pid {}, {})",
                r["role"].as_str().unwrap_or("?"),
                r["pid"],
                r["signal"].as_str().unwrap_or("?")
            );
        }
    }
    if !any {
        println!("nothing of the quickstart in {} was running", dir.display());
    }
    println!(
        "its files stay in {} (a quickstart there starts afresh; `rm -r {}` removes them)",
        dir.display(),
        shell_quote(&dir.display().to_string())
    );
    Ok(())
}
