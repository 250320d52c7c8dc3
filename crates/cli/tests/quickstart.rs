//! `strata quickstart DIR` starts the real thing and `--stop` ends it: checked with
//! real NBD clients (qemu-img, nbdinfo, qemu-io) on the URIs it prints, the
//! operator's and the point's commands it suggests, and the processes and sockets
//! it leaves (none after `--stop`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, describe, p, run_tool, strata_without_store};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Stops what a quickstart in `dir` started when dropped, even if the test failed
/// half-way: `strata quickstart --stop`, then SIGKILL for any recorded pid that
/// still runs our command line.
struct Stopper {
    sandbox: PathBuf,
    dir: PathBuf,
}

impl Drop for Stopper {
    fn drop(&mut self) {
        let _ = strata_without_store(&self.sandbox, &["quickstart", "--stop", p(&self.dir)]);
        for (pid, _) in recorded(&self.dir) {
            if alive(pid, &self.dir) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// The pids and roles `DIR/quickstart.json` records.
fn recorded(dir: &Path) -> Vec<(u32, String)> {
    let Ok(text) = std::fs::read_to_string(dir.join("quickstart.json")) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&text).unwrap_or_default();
    v["processes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    (
                        p["pid"].as_u64().unwrap() as u32,
                        p["role"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// True while `pid` runs a command line naming `dir` (a zombie's is empty; an
/// unrelated process reusing the pid does not name it).
fn alive(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(p(dir)))
        .unwrap_or(false)
}

fn ok(sandbox: &Path, args: &[&str]) -> String {
    let out = strata_without_store(sandbox, args);
    assert!(out.status.success(), "{}", describe("strata", args, &out));
    String::from_utf8(out.stdout).unwrap()
}

/// `strata --json ARGS` with the environment the quickstart tells people to export.
fn with_env(env: &Value, args: &[&str]) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = Command::new(bin())
        .args(&full)
        .env("STRATA_HUB_DIR", env["STRATA_HUB_DIR"].as_str().unwrap())
        .env("STRATA_STORE", env["STRATA_STORE"].as_str().unwrap())
        .env_remove("STRATA_HUB")
        .env_remove("STRATA_LOG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe("strata", &full, &out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(uri);
    let out = run_tool("qemu-io", &args);
    assert!(!out.contains("failed"), "qemu-io {args:?}: {out}");
}

#[test]
fn quickstart_starts_hub_point_and_desktop_and_stop_ends_them() {
    let tmp = tempfile::tempdir().unwrap();
    // As the quickstart prints its paths: absolute, no symbolic links.
    let root = tmp.path().canonicalize().unwrap();
    let sandbox = root.as_path();
    let dir = sandbox.join("qs");
    let _stop = Stopper {
        sandbox: sandbox.to_path_buf(),
        dir: dir.clone(),
    };

    // A non-empty directory that is not a quickstart's is refused, untouched.
    let other = sandbox.join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep.txt"), b"mine").unwrap();
    let out = strata_without_store(sandbox, &["quickstart", p(&other)]);
    let err = common::assert_clean_failure(&["quickstart"], &out);
    assert!(err.contains("holds no quickstart"), "{err}");
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);

    let text = ok(sandbox, &["quickstart", p(&dir)]);
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("quickstart.json")).unwrap())
            .unwrap();
    assert_eq!(state["state"], "running", "{state:#}");
    let sum = &state["summary"];
    let (os, user) = (
        sum["nbd"]["os"].as_str().unwrap().to_string(),
        sum["nbd"]["user"].as_str().unwrap().to_string(),
    );
    let sock = dir.join("nbd.sock");
    assert_eq!(
        os,
        format!("nbd+unix:///desktops/demo/os?socket={}", p(&sock))
    );
    assert_eq!(
        user,
        format!("nbd+unix:///desktops/demo/user?socket={}", p(&sock))
    );
    // What it prints: the URIs, the qemu command, what to try, how to stop.
    for needle in [
        os.as_str(),
        user.as_str(),
        "qemu-system-x86_64 -machine accel=kvm:tcg",
        sum["hub"]["url"].as_str().unwrap(),
        "admin.token",
        "export STRATA_HUB_DIR=",
        "strata desktop show demo",
        "strata point status",
        "strata channel log sample/production",
        &format!("strata quickstart --stop {}", p(&dir)),
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let qemu: Vec<&str> = sum["qemu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(qemu[0], "qemu-system-x86_64");
    assert!(qemu.contains(&format!("file={os},format=raw,if=virtio,cache=none").as_str()));
    assert!(qemu.contains(&format!("file={user},format=raw,if=virtio,cache=none").as_str()));
    let pids = recorded(&dir);
    assert_eq!(pids.len(), 2, "{state:#}");
    for (pid, role) in &pids {
        assert!(alive(*pid, &dir), "the {role} (pid {pid}) is not running");
    }

    // Real NBD clients on both disks.
    for uri in [&os, &user] {
        let info: Value = serde_json::from_str(&run_tool(
            "qemu-img",
            &["info", "--output=json", "-f", "raw", uri],
        ))
        .unwrap();
        assert_eq!(info["virtual-size"], 64 * MIB, "{uri}: {info}");
        let size = run_tool("nbdinfo", &["--size", uri]);
        assert_eq!(size.trim(), (64 * MIB).to_string(), "{uri}");
    }
    // The OS disk is the gold version the channel points at (v1 of the tour's store).
    let v1 = sandbox.join("v1.raw");
    ok(
        sandbox,
        &[
            "--store",
            p(&dir.join("store")),
            "export",
            "sample@v1",
            p(&v1),
        ],
    );
    run_tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &os, p(&v1)],
    );
    // The user disk is writable and reads back what was written.
    qemu_io(&user, &["write -P 0x5a 0 1M"]);
    qemu_io(&user, &["read -P 0x5a 0 1M", "read -P 0 1M 1M"]);

    // The commands it suggests, with the environment it says to export.
    let env = &sum["env"];
    let d = with_env(env, &["desktop", "show", "demo"]);
    assert_eq!(d["holder"], "laptop", "{d:#}");
    assert_eq!(d["point"]["point"], "laptop", "the point reported: {d:#}");
    assert_eq!(d["channel"], "sample/production");
    assert_eq!(d["os_version"], sum["channel"]["version"]);
    let st = with_env(env, &["point", "status"]);
    assert_eq!(st["point"], "laptop");
    assert_eq!(st["hub_reachable"], true, "{st:#}");
    let log = with_env(env, &["channel", "log", "sample/production"]);
    assert_eq!(log.as_array().unwrap().len(), 1);
    // The update: publish v2, start again; the OS disk switches, the user disk keeps
    // what was written.
    with_env(
        env,
        &["channel", "publish", "sample@main", "sample/production"],
    );
    let s = with_env(
        env,
        &["point", "desktop", "start", "demo", "--socket", p(&sock)],
    );
    assert_eq!(s["os"]["switched_from"], sum["channel"]["version"], "{s:#}");
    qemu_io(&user, &["read -P 0x5a 0 1M"]);

    // A second quickstart on the running one is refused and changes nothing.
    let out = strata_without_store(sandbox, &["quickstart", p(&dir)]);
    let err = common::assert_clean_failure(&["quickstart"], &out);
    assert!(err.contains("--stop"), "{err}");
    for (pid, role) in &pids {
        assert!(alive(*pid, &dir), "the {role} (pid {pid}) was stopped");
    }

    // --stop: every process gone, nothing listens.
    let stopped = ok(sandbox, &["quickstart", "--stop", p(&dir)]);
    for (pid, role) in &pids {
        assert!(
            stopped.contains(&format!("stopped the {role} (pid {pid}")),
            "{stopped}"
        );
        assert!(!alive(*pid, &dir), "the {role} (pid {pid}) still runs");
    }
    let url = sum["hub"]["url"].as_str().unwrap();
    let addr = url.trim_start_matches("http://");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "{addr} still accepts connections"
    );
    assert!(std::os::unix::net::UnixStream::connect(&sock).is_err());
    let again = ok(sandbox, &["quickstart", "--stop", p(&dir)]);
    assert!(again.contains("was running"), "{again}");

    // A stopped quickstart's directory is made afresh (here with --json: one
    // document with all of it).
    let doc: Value =
        serde_json::from_str(&ok(sandbox, &["--json", "quickstart", p(&dir)])).unwrap();
    assert_eq!(doc["nbd"]["os"], os.as_str());
    assert_eq!(doc["checks"]["tool"], "qemu-img", "{doc:#}");
    assert_eq!(doc["imports"].as_array().unwrap().len(), 2);
    let new_pids: Vec<u64> = ["hub", "point"]
        .iter()
        .map(|r| doc["pids"][r].as_u64().unwrap())
        .collect();
    for pid in &new_pids {
        assert!(alive(*pid as u32, &dir));
    }
    // The channel starts over at v1 (the earlier publish of v2 went with the old hub).
    let log = with_env(&doc["env"], &["channel", "log", "sample/production"]);
    assert_eq!(log.as_array().unwrap().len(), 1);
    let out: Value =
        serde_json::from_str(&ok(sandbox, &["--json", "quickstart", "--stop", p(&dir)])).unwrap();
    assert_eq!(out["stopped"].as_array().unwrap().len(), 2, "{out:#}");
    for pid in &new_pids {
        assert!(!alive(*pid as u32, &dir));
    }
}
