//! `strata serve`'s block cache with real clients: sessions over one base and the
//! base's read-only export share one cache file; each session still reads its own
//! writes only; the cache leaves nothing in the store for gc or verify.

mod common;
use common::{identical, p, run_tool as run, spawn_announcing};

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

fn strata(store: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strata {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Descriptors the process holds on files under `dir`.
fn open_files_under(pid: u32, dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with(&prefix))
        .collect()
}

/// A store holding `gold` (24 MiB: data, a hole, zeros) imported from `base.raw`,
/// and sessions `vm1` and `vm2` over it.
fn gold_store(tmp: &Path) -> (PathBuf, PathBuf) {
    let store = tmp.join("store");
    strata(&store, &["init"]);
    let base = tmp.join("base.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&base), "24M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 3M",
            "-c",
            "write -P 0xa5 7M 2M",
            "-c",
            "write -z 12M 1M",
            "-c",
            "write -P 0x11 20M 4M",
            p(&base),
        ],
    );
    strata(&store, &["import", p(&base), "gold", "-m", "base"]);
    for vm in ["vm1", "vm2"] {
        strata(&store, &["session", "create", vm, "--from", "gold"]);
    }
    (store, base)
}

/// `strata serve` on a unix socket with `cache_args`.
fn serve(store: &Path, sock: &Path, cache_args: &[&str]) -> Serve {
    let (child, lines) = spawn_announcing(
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(store)
            .arg("serve")
            .args(cache_args)
            .arg("--socket")
            .arg(sock),
        1,
    );
    assert!(lines[0].starts_with("serving"), "{lines:?}");
    Serve(child)
}

#[test]
fn sessions_and_exports_of_one_version_share_one_cache_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, base) = gold_store(tmp.path());
    let sock: PathBuf = tmp.path().join("nbd.sock");
    // The cache must fill however full this machine's disk is.
    let server = serve(&store, &sock, &["--cache-reserve", "0"]);
    let uri = |export: &str| format!("nbd+unix:///{export}?socket={}", sock.display());
    let cache = store.join("cache");

    // Both sessions and the read-only version read as the base...
    for export in ["vm1", "vm2", "gold@main"] {
        assert!(identical(&uri(export), "raw", p(&base), "raw"), "{export}");
    }
    // ...through one cache file, which has no name.
    let files = open_files_under(server.0.id(), &cache);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with("(deleted)"), "{files:?}");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);

    // A write to one session (into a cached block, partly) is that session's alone.
    let expected = tmp.path().join("expected.raw");
    std::fs::copy(&base, &expected).unwrap();
    for target in [uri("vm1"), p(&expected).to_string()] {
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x77 1000 5000",
                "-c",
                "write -P 0x78 20M 64k",
                "-c",
                "flush",
                &target,
            ],
        );
    }
    assert!(identical(&uri("vm1"), "raw", p(&expected), "raw"));
    assert!(identical(&uri("vm2"), "raw", p(&base), "raw"));
    assert!(identical(&uri("gold@main"), "raw", p(&base), "raw"));

    // Stopped, the server leaves no cache behind; the store checks clean.
    drop(server);
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
    strata(&store, &["verify"]);
    strata(&store, &["gc"]);
    strata(&store, &["verify"]);
}

#[test]
fn a_cache_that_is_off_or_out_of_room_makes_no_file_and_reads_right() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, base) = gold_store(tmp.path());
    let sock: PathBuf = tmp.path().join("nbd.sock");
    let uri = |export: &str| format!("nbd+unix:///{export}?socket={}", sock.display());
    // Off, and a reserve larger than any disk: blocks are decoded at every read.
    for args in [
        &["--no-block-cache"][..],
        &["--cache-reserve", "1000000T"][..],
    ] {
        let server = serve(&store, &sock, args);
        for export in ["vm1", "gold@main", "vm2", "gold@main"] {
            assert!(
                identical(&uri(export), "raw", p(&base), "raw"),
                "{args:?} {export}"
            );
        }
        let files = open_files_under(server.0.id(), &store.join("cache"));
        assert!(files.is_empty(), "{args:?}: {files:?}");
    }
    // The two cannot be asked together.
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(&store)
        .args([
            "serve",
            "--no-block-cache",
            "--cache-reserve",
            "1G",
            "--socket",
        ])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}
