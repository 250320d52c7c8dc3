//! Operating desktops end to end, with real processes (a hub, point agents,
//! `strata hub desktop serve`) and real NBD clients (qemu-io, qemu-img, nbdcopy,
//! nbdsh):
//!
//! * `desktop reset-os`: the OS disk keeps its changes from one start to the next
//!   while the channel stays; a reset request waits while a VM holds the disk, and
//!   the next start returns it to the channel's version;
//! * `desktop show`: the holding point's report beside the hub's view — bytes
//!   written and not committed, a version committed and not yet pushed (seen while
//!   the push crawls over a throttled link), nothing pending after the sync;
//! * `hub desktop serve --writable --force`: a lost laptop's desktop run from the
//!   hub, checked back in as a restore point when the server stops, then handed to a
//!   new point that reads what was written; a serve killed with SIGKILL loses
//!   nothing it acknowledged;
//! * a VM still connected to a desktop its point lost gets I/O errors from then on,
//!   and the recovery branch holds exactly the writes it was told had succeeded.

mod common;
use common::hub::{
    desktop_start, fails, json, make_raw, ok, qemu_io_assert, qemu_io_ok, strata, wait_all_local,
    Agent, Env, Hub, HubOpts, MIB,
};
use common::{identical, p, spawn_announcing};

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_netfault::Proxy;

/// A hub with gold (8 MiB, 5 MiB of data) published to `win/production`, desktop
/// d1 on it with a 4 MiB user disk, and point `a` (talking to `url_of(hub)`) running
/// its agent with the desktop started and local.
struct Desk {
    env: Env,
    hub: Hub,
    gold: PathBuf,
    a: PathBuf,
    sock_a: PathBuf,
    agent_a: Agent,
}

impl Desk {
    fn new(url_of: impl FnOnce(&Hub) -> String) -> Desk {
        let env = Env::new();
        // Restore points made within one second must all be kept (the default
        // policy keeps one an hour).
        let hub = Hub::start_opts(
            &env.hub_dir(),
            HubOpts {
                extra: &["--retention", "last=100"],
                ..HubOpts::default()
            },
        );
        let gold = env.path("gold.raw");
        make_raw(&gold, 8 * MIB, &[(0, 4 * MIB), (6 * MIB, MIB)], 7);
        env.publish(&gold, "gold");
        env.operator_json(&["channel", "publish", "gold@main", "win/production"]);
        env.create_desktop("d1", "win/production", "4M");
        let a = env.point("a", &url_of(&hub));
        let sock_a = env.path("a.sock");
        let agent_a = Agent::spawn(None, &a, &sock_a, "1h", &[]);
        desktop_start(&a, "d1", &sock_a);
        wait_all_local(&a);
        Desk {
            env,
            hub,
            gold,
            a,
            sock_a,
            agent_a,
        }
    }

    fn os(&self) -> String {
        self.agent_a.uri("desktops/d1/os")
    }

    fn user(&self) -> String {
        self.agent_a.uri("desktops/d1/user")
    }

    fn gold(&self) -> String {
        self.gold.display().to_string()
    }

    fn show(&self) -> Value {
        self.env.operator_json(&["desktop", "show", "d1"])
    }

    /// No hub serve had to keep its changes on a `recovery/hub-` branch.
    fn assert_no_hub_recovery(&self) {
        let branches = json(
            Some(&self.env.hub_store()),
            &["branch", "ls", "desktops/d1/user"],
        );
        assert!(
            !branches.to_string().contains("recovery/hub-"),
            "{branches:#}"
        );
    }
}

/// An NBD client that stays connected and runs requests as the test sends them:
/// nbdsh reading lines `w OFFSET LEN BYTE`, `r OFFSET LEN`, `f` (flush) and
/// answering `ok` or `err MESSAGE` to each.
struct Held {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

const DRIVER: &str = r#"
import sys
print('up', flush=True)
for line in sys.stdin:
    a = line.split()
    try:
        if a[0] == 'w':
            h.pwrite(bytes([int(a[3], 0)]) * int(a[2]), int(a[1]))
        elif a[0] == 'r':
            h.pread(int(a[2]), int(a[1]))
        elif a[0] == 'f':
            h.flush()
        print('ok', flush=True)
    except nbd.Error as e:
        print('err', e, flush=True)
"#;

impl Held {
    fn connect(uri: &str) -> Held {
        // nbdsh runs `python3 -m nbd`: Debian's python has the module.
        let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
        let mut child = Command::new("nbdsh")
            .env("PATH", path)
            .args(["-u", uri, "-c", DRIVER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "up", "nbdsh could not connect to {uri}");
        Held { child, stdin, out }
    }

    /// Run one request; `Ok(())` or the client's error.
    fn run(&mut self, req: &str) -> Result<(), String> {
        writeln!(self.stdin, "{req}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        match line.trim() {
            "ok" => Ok(()),
            l => Err(l.to_string()),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn reset_os_returns_the_os_disk_to_the_channel_version_at_the_next_start() {
    let d = Desk::new(|h| h.url());
    // Today's behaviour, kept: the OS disk's changes live from one start to the
    // next while the channel stays.
    qemu_io_assert(&d.os(), &["write -P 0x66 1M 64k"]);
    ok(Some(&d.a), &["point", "desktop", "stop", "d1"]);
    let s = desktop_start(&d.a, "d1", &d.sock_a);
    assert!(
        s["os"]["switched_from"].is_null() && s["os"]["reset"].is_null(),
        "{s:#}"
    );
    qemu_io_assert(&d.os(), &["read -P 0x66 1M 64k"]);
    assert!(!identical(&d.gold(), "raw", &d.os(), "raw"));

    // The operator asks for a reset; the command says when it happens.
    let text = d.env.operator(&["desktop", "reset-os", "d1"]);
    assert!(
        text.contains("reset #1") && text.contains("point a") && text.contains("next start"),
        "{text}"
    );
    // While a VM holds the OS disk, neither a sync round nor a start touches it.
    let mut vm = Held::connect(&d.os());
    assert_eq!(json(Some(&d.a), &["point", "sync"])["ok"], true);
    let err = fails(
        Some(&d.a),
        &["point", "desktop", "start", "d1", "--socket", p(&d.sock_a)],
    );
    assert!(err.contains("stop the VM first"), "{err}");
    vm.run("r 1048576 65536").unwrap();
    qemu_io_assert(&d.os(), &["read -P 0x66 1M 64k"]);
    let show = d.show();
    assert_eq!(show["os_reset"], 1);
    assert_eq!(show["point"]["os_reset"], 0, "not applied yet: {show:#}");
    let text = d.env.operator(&["desktop", "show", "d1"]);
    assert!(text.contains("an OS reset is pending"), "{text}");
    drop(vm);

    // The next start applies it: the OS disk is the channel's version again.
    let s = desktop_start(&d.a, "d1", &d.sock_a);
    assert_eq!(s["os"]["reset"], 1, "{s:#}");
    assert!(
        s["os"]["switched_from"].is_null(),
        "the channel did not move"
    );
    wait_all_local(&d.a);
    assert!(identical(&d.gold(), "raw", &d.os(), "raw"));
    assert_eq!(d.show()["point"]["os_reset"], 1);
    // Applied once: the start after keeps the OS disk's new changes.
    qemu_io_assert(&d.os(), &["write -P 0x67 2M 64k"]);
    let s = desktop_start(&d.a, "d1", &d.sock_a);
    assert!(s["os"]["reset"].is_null(), "{s:#}");
    qemu_io_assert(&d.os(), &["read -P 0x67 2M 64k"]);
    let audit = d.env.admin_json(&["audit"]);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "desktop.reset-os" && e["actor"] == "admin"),
        "{audit:#}"
    );
}

#[test]
fn show_puts_the_points_report_beside_the_hubs_view() {
    // Point a talks to the hub through a proxy the test can throttle.
    let mut proxy = None;
    let d = Desk::new(|h| {
        let p = Proxy::start(h.addr()).unwrap();
        let url = format!("http://{}", p.addr());
        proxy = Some(p);
        url
    });
    let proxy = proxy.unwrap();
    let show = d.show();
    let hub_user = show["user_version"].as_str().unwrap().to_string();
    let r = &show["point"];
    assert_eq!(r["point"], "a", "the start reported: {show:#}");
    assert_eq!(r["os_version"], show["os_version"]);
    assert_eq!(r["user_version"], hub_user.as_str());
    assert_eq!(r["pending_bytes"], 0);

    // 2 MiB of random data written, not committed: the next report (a start
    // reports too) counts it, the versions still agree.
    let data = d.env.path("data.raw");
    make_raw(&data, 2 * MIB, &[(0, 2 * MIB)], 9);
    common::run_tool("nbdcopy", &["--flush", p(&data), &d.user()]);
    desktop_start(&d.a, "d1", &d.sock_a);
    let r = d.show()["point"].clone();
    assert_eq!(r["uncommitted_bytes"], 2 * MIB, "{r:#}");
    assert_eq!(r["pending_bytes"], 2 * MIB);
    assert_eq!(r["user_version"], hub_user.as_str());

    // A sync round over a link of 16 KiB/s: the round commits, reports, then
    // pushes for minutes. Meanwhile the hub shows the point ahead of it.
    proxy.set_rate(16 << 10);
    let mut sync = Command::new(common::bin())
        .args(["--json", "--store", p(&d.a), "point", "sync"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let ahead = loop {
        let show = d.show();
        if show["point"]["unpushed_bytes"].as_u64().unwrap_or(0) > 0 {
            break show;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no report: {show:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let r = &ahead["point"];
    assert_eq!(r["unpushed_bytes"], 2 * MIB, "{ahead:#}");
    assert_eq!(r["uncommitted_bytes"], 0);
    assert_eq!(r["pending_bytes"], 2 * MIB);
    assert_eq!(ahead["user_version"], hub_user.as_str(), "not pushed yet");
    assert_ne!(r["user_version"], hub_user.as_str());
    assert_eq!(r["user_pushed"], hub_user.as_str());
    let text = d.env.operator(&["desktop", "show", "d1"]);
    assert!(
        text.contains("ahead of the hub") && text.contains("pending    2.0 MiB"),
        "{text}"
    );
    let local = r["user_version"].as_str().unwrap().to_string();

    // The link recovers; after the round the two sides agree, nothing pending.
    proxy.set_rate(0);
    let mut out = String::new();
    sync.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(sync.wait().unwrap().success(), "{out}");
    let round: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(round["ok"], true, "{round:#}");
    let show = d.show();
    let r = &show["point"];
    assert_eq!(show["user_version"], local.as_str());
    assert_eq!(r["user_version"], local.as_str());
    assert_eq!(r["user_pushed"], local.as_str());
    assert_eq!(r["pending_bytes"], 0, "{show:#}");
    assert!(r["last_sync"].as_i64().unwrap() >= round["time"].as_i64().unwrap() - 1);
    assert!(r["last_push"].is_i64());
    let ls = d.env.operator(&["desktop", "ls"]);
    assert!(
        ls.contains("[a: user") && ls.contains("pending 0 B"),
        "{ls}"
    );
}

#[test]
fn the_hub_serves_a_lost_desktop_writable_and_hands_it_on() {
    let d = Desk::new(|h| h.url());
    qemu_io_assert(&d.user(), &["write -P 0x41 0 64k"]);
    assert_eq!(json(Some(&d.a), &["point", "sync"])["ok"], true);
    // The laptop writes more, then is lost before it syncs.
    qemu_io_assert(&d.user(), &["write -P 0x42 64k 64k"]);

    let serve = |extra: &[&str]| {
        let mut c = Command::new(common::bin());
        c.args(["--json", "hub", "desktop", "serve", "d1", "--writable"])
            .args(extra)
            .arg("--dir")
            .arg(d.env.hub_dir());
        c
    };
    let sock = d.env.path("dc.sock");
    let out = serve(&["--socket", p(&sock)]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("checked out to point a") && err.contains("--force"),
        "{err}"
    );
    let (mut dc, lines) = spawn_announcing(&mut serve(&["--force", "--socket", p(&sock)]), 2);
    let ann: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(ann["taken_from"], "a", "{ann:#}");
    assert_eq!(ann["holder"], "hub");
    let uri = |e: &str| format!("nbd+unix:///{e}?socket={}", p(&sock));
    let (os, user) = (uri("desktops/d1/os"), uri("desktops/d1/user"));
    // The hub's user disk: what a synced; the laptop's tail is not there.
    qemu_io_assert(&user, &["read -P 0x41 0 64k", "read -P 0 64k 64k"]);
    qemu_io_assert(&user, &["write -P 0x51 1M 64k", "flush"]);
    assert!(identical(&d.gold(), "raw", &os, "raw"));
    qemu_io_assert(&os, &["write -P 0x77 0 64k"]);
    assert_eq!(d.show()["holder"], "hub");
    // The point that lost it can no longer check it out.
    let err = fails(
        Some(&d.a),
        &["point", "desktop", "start", "d1", "--socket", p(&d.sock_a)],
    );
    assert!(err.contains("served by the hub"), "{err}");

    // Stopping the server checks the user disk in: a restore point on main.
    common::run_tool("kill", &["-TERM", &dc.id().to_string()]);
    let mut rest = String::new();
    dc.stdout.take().unwrap().read_to_string(&mut rest).unwrap();
    assert!(dc.wait().unwrap().success(), "{rest}");
    let done: Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert_eq!(done["released"], true, "{done:#}");
    let v = done["version"].as_str().unwrap().to_string();
    let show = d.show();
    assert_eq!(show["holder"], Value::Null);
    assert_eq!(show["user_version"], v.as_str());
    let rps = d.env.operator_json(&["desktop", "restore-points", "d1"]);
    assert_eq!(rps[0]["version"], v.as_str(), "{rps:#}");
    // Nothing of the serve is left in the hub's store but the new version.
    let sessions = json(Some(&d.env.hub_store()), &["session", "ls"]);
    assert_eq!(sessions.as_array().unwrap().len(), 0, "{sessions:#}");
    d.assert_no_hub_recovery();

    // Hand it to a new point: no --force needed; it runs what the hub served.
    let b = d.env.point("b", &d.hub.url());
    let t = d.env.operator_json(&["desktop", "transfer", "d1", "b"]);
    assert_eq!(t["holder"], "b");
    let sock_b = d.env.path("b.sock");
    let agent_b = Agent::spawn(None, &b, &sock_b, "1h", &[]);
    let s = desktop_start(&b, "d1", &sock_b);
    assert_eq!(s["user"]["version"], v.as_str());
    qemu_io_assert(
        &agent_b.uri("desktops/d1/user"),
        &["read -P 0x41 0 64k", "read -P 0x51 1M 64k"],
    );
    // The OS disk's changes on the hub were thrown away.
    assert!(identical(
        &d.gold(),
        "raw",
        &agent_b.uri("desktops/d1/os"),
        "raw"
    ));
    // The lost laptop keeps its tail as a recovery branch at its next contact, and
    // says so.
    let text = ok(Some(&d.a), &["point", "sync"]);
    let rec = text
        .lines()
        .find(|l| l.starts_with("desktops/d1/user: ") && l.contains("checked out elsewhere"))
        .and_then(|l| l.split("on the hub as ").nth(1))
        .and_then(|t| t.split(',').next())
        .unwrap_or_else(|| panic!("no recovery in {text}"))
        .to_string();
    assert!(rec.starts_with("recovery/"), "{text}");
    assert!(!text.contains("up to date"), "{text}");
    let tail = d
        .env
        .hub_export(&format!("desktops/d1/user@{rec}"), "tail.raw");
    qemu_io_assert(p(&tail), &["read -P 0x41 0 64k", "read -P 0x42 64k 64k"]);
    let audit = d.env.admin_json(&["audit"]).to_string();
    for a in [
        "to hub, taken from a",
        "\"desktop.checkin\"",
        "\"ref.update\"",
        "to b",
    ] {
        assert!(audit.contains(a), "{a} missing from {audit}");
    }
    drop(agent_b);
    ok(Some(&d.env.hub_store()), &["verify"]);
}

#[test]
fn a_vm_on_a_lost_desktop_gets_errors_and_its_acknowledged_writes_are_recovered() {
    let d = Desk::new(|h| h.url());
    let mut vm = Held::connect(&d.user());
    vm.run("w 0 65536 0x31").unwrap();
    vm.run("f").unwrap();
    assert_eq!(json(Some(&d.a), &["point", "sync"])["ok"], true);
    // Acknowledged, never synced: the laptop is handed over meanwhile.
    vm.run("w 1048576 65536 0x32").unwrap();
    d.env.point("b", &d.hub.url());
    d.env
        .operator_json(&["desktop", "transfer", "d1", "b", "--force"]);
    let r = json(Some(&d.a), &["point", "sync"]);
    let recovered: Vec<(String, String)> = r["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| {
            Some((
                s["session"].as_str()?.to_string(),
                s["recovered"].as_str()?.to_string(),
            ))
        })
        .collect();
    let sessions: Vec<&str> = recovered.iter().map(|(s, _)| s.as_str()).collect();
    assert!(
        sessions.contains(&"desktops/d1/user") && sessions.contains(&"desktops/d1/os"),
        "both disks stop: {r:#}"
    );
    let rec = recovered[0].1.clone();
    // The VM, still connected, gets errors from now on: no write is acknowledged
    // into a delta nobody will commit.
    for req in ["w 2097152 65536 0x33", "r 0 4096", "f"] {
        let err = vm.run(req).expect_err(req);
        assert!(err.contains("err"), "{req}: {err}");
    }
    drop(vm);
    // New connections are refused; the session is gone from the point.
    let (ok_now, _) = qemu_io_ok(&d.user(), &["read 0 4k"]);
    assert!(!ok_now, "the lost desktop is still served");
    assert!(!d.a.join("disk-sessions/desktops/d1/user").exists());
    let st = json(Some(&d.a), &["point", "status"]);
    assert_eq!(st["sessions"].as_array().unwrap().len(), 0, "{st:#}");
    // The recovery branch holds exactly what the VM was told was written.
    let expected = d.env.path("expected.raw");
    make_raw(&expected, 4 * MIB, &[], 0);
    qemu_io_assert(
        p(&expected),
        &["write -P 0x31 0 64k", "write -P 0x32 1M 64k"],
    );
    let tail = d
        .env
        .hub_export(&format!("desktops/d1/user@{rec}"), "tail.raw");
    assert!(identical(p(&expected), "raw", p(&tail), "raw"));
    let out = strata(Some(&d.a), &["session", "ls"]);
    assert!(out.status.success());
}

/// A writable serve killed with SIGKILL leaves the hub holding the desktop and its
/// session in the hub's store; the next one puts what it was told onto `main`
/// first and serves on from there.
#[test]
fn a_killed_hub_serve_loses_nothing() {
    let d = Desk::new(|h| h.url());
    let sock = d.env.path("dc.sock");
    let serve = || {
        let mut c = Command::new(common::bin());
        c.args([
            "--json",
            "hub",
            "desktop",
            "serve",
            "d1",
            "--writable",
            "--force",
        ])
        .args(["--socket", p(&sock), "--dir"])
        .arg(d.env.hub_dir());
        c
    };
    let user = format!("nbd+unix:///desktops/d1/user?socket={}", p(&sock));
    let (mut dc, _) = spawn_announcing(&mut serve(), 2);
    qemu_io_assert(&user, &["write -P 0x61 2M 64k", "flush"]);
    dc.kill().unwrap();
    dc.wait().unwrap();
    assert_eq!(d.show()["holder"], "hub", "still held by the hub");

    let (mut dc, lines) = spawn_announcing(&mut serve(), 2);
    let ann: Value = serde_json::from_str(&lines[0]).unwrap();
    let v = ann["leftover"]["main"]
        .as_str()
        .unwrap_or_else(|| panic!("{ann:#}"))
        .to_string();
    assert_eq!(ann["user_version"], v.as_str());
    assert_eq!(d.show()["user_version"], v.as_str());
    qemu_io_assert(&user, &["read -P 0x61 2M 64k"]);
    d.assert_no_hub_recovery();
    common::run_tool("kill", &["-INT", &dc.id().to_string()]);
    let mut rest = String::new();
    dc.stdout.take().unwrap().read_to_string(&mut rest).unwrap();
    assert!(dc.wait().unwrap().success(), "{rest}");
    let done: Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert_eq!(done["version"], Value::Null, "nothing new: {done:#}");
    assert_eq!(done["released"], true);
    let show = d.show();
    assert_eq!(
        (&show["holder"], &show["user_version"]),
        (&Value::Null, &Value::from(v))
    );
}
