//! `strata serve` and `strata session` with real NBD clients (qemu-img, qemu-io):
//! read-only versions, copy-on-write sessions checked against a qcow2 overlay doing
//! the same writes, commits while a server holds the session.

mod common;
use common::{identical, p, run_tool as run, spawn_announcing};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: PathBuf,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let env = Env {
            store: root.join("store"),
            root,
            _dir: dir,
        };
        env.ok(&["init"]);
        env
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(&self.store)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "strata {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Start `strata serve` on a Unix socket and an ephemeral TCP port.
    fn serve(&self) -> Server {
        self.serve_with(&[])
    }

    /// `serve` with more options.
    fn serve_with(&self, extra: &[&str]) -> Server {
        let sock = self.path("nbd.sock");
        let (child, mut lines) = spawn_announcing(
            Command::new(env!("CARGO_BIN_EXE_strata"))
                .arg("--store")
                .arg(&self.store)
                .args(["serve", "--listen", "127.0.0.1:0", "--socket"])
                .arg(&sock)
                .args(extra),
            1,
        );
        let line = lines.remove(0);
        let port = line
            .split("tcp 127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no TCP port in {line:?}"));
        Server { child, sock, port }
    }
}

struct Server {
    child: Child,
    sock: PathBuf,
    port: u16,
}

impl Server {
    fn unix(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
    fn tcp(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A 32 MiB base with data, zeros and holes.
fn make_base(env: &Env) -> PathBuf {
    let base = env.path("base.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&base), "32M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 4M",
            "-c",
            "write -P 0xa5 9M 3M",
            "-c",
            "write -P 0x01 31M 1M",
            p(&base),
        ],
    );
    env.ok(&["import", p(&base), "gold", "-m", "base"]);
    base
}

#[test]
fn versions_are_served_read_only_over_unix_and_tcp() {
    let env = Env::new();
    let base = make_base(&env);
    let srv = env.serve();
    for uri in [srv.unix("gold@main"), srv.tcp("gold"), srv.tcp("gold:main")] {
        assert!(identical(p(&base), "raw", &uri, "raw"), "{uri}");
    }
    let info = run(
        "qemu-img",
        &["info", "--output=json", &srv.unix("gold@main")],
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 32 << 20);
    // Writes to a version are refused.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &srv.unix("gold@main")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a write to a version succeeded");
    assert!(text.contains("Permission denied"), "{text}");
    // The map reports the holes, so converting skips them.
    let map = run(
        "qemu-img",
        &["map", "--output=json", &srv.unix("gold@main")],
    );
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, 8 << 20, "{map}");
    // An unknown name is refused.
    let out = Command::new("qemu-img")
        .args(["info", &srv.unix("nosuch@main")])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A tiny deterministic generator for the differential test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The block size `strata import` uses by default.
const BLOCK: u64 = 64 << 10;

/// What `nbdinfo --map` and `qemu-img map` (two clients reading NBD block status)
/// say of a served disk, checked against its content: they agree with each other,
/// cover the disk, never call a range zero that is not, and report as zero every
/// block in `must_be_zero`.
fn check_map(uri: &str, content: &[u8], must_be_zero: &[bool]) {
    let extents: serde_json::Value =
        serde_json::from_str(&run("nbdinfo", &["--map", "--json", uri])).unwrap();
    let mut zero_ranges = Vec::new();
    let mut pos = 0u64;
    for e in extents.as_array().unwrap() {
        let (off, len, ty) = (
            e["offset"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["type"].as_u64().unwrap(),
        );
        assert_eq!(off, pos, "extents are contiguous: {extents}");
        pos += len;
        if ty & 2 != 0 {
            let bytes = &content[off as usize..(off + len) as usize];
            assert!(
                bytes.iter().all(|&b| b == 0),
                "nbdinfo calls {off}+{len} zero, but it holds data"
            );
            zero_ranges.push((off, off + len));
        }
    }
    assert_eq!(pos, content.len() as u64, "the map covers the disk");
    for (b, _) in must_be_zero.iter().enumerate().filter(|(_, z)| **z) {
        let (start, end) = (b as u64 * BLOCK, (b as u64 + 1) * BLOCK);
        assert!(
            zero_ranges.iter().any(|&(s, e)| s <= start && end <= e),
            "block {b} reads as zeros but is not reported as zero: {extents}"
        );
    }
    // qemu-img's map through the same block status marks the same bytes zero.
    let qmap: serde_json::Value = serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", uri],
    ))
    .unwrap();
    let mut qzero = Vec::new();
    for e in qmap.as_array().unwrap() {
        if e["zero"] == serde_json::Value::Bool(true) {
            let start = e["start"].as_u64().unwrap();
            let end = start + e["length"].as_u64().unwrap();
            match qzero.last_mut() {
                Some((_, last_end)) if *last_end == start => *last_end = end,
                _ => qzero.push((start, end)),
            }
        }
    }
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in zero_ranges {
        match merged.last_mut() {
            Some((_, last_end)) if *last_end == s => *last_end = e,
            _ => merged.push((s, e)),
        }
    }
    assert_eq!(merged, qzero, "nbdinfo and qemu-img disagree on zeros");
}

#[test]
fn session_matches_a_qcow2_overlay_and_commits_while_served() {
    let env = Env::new();
    let base = make_base(&env);
    env.ok(&["session", "create", "s1", "--from", "gold"]);
    // The reference: a qcow2 overlay over the same base, given the same operations.
    let overlay = env.path("overlay.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            p(&base),
            "-F",
            "raw",
            p(&overlay),
        ],
    );
    let srv = env.serve();
    let session = srv.unix("s1");
    let mut rng = Rng(0x5eed);
    // Blocks (64 KiB) that must be reported as zero: all-zero in the base, or wholly
    // covered by a zero write or discard since their last data write.
    let base_bytes = std::fs::read(&base).unwrap();
    let mut zero: Vec<bool> = base_bytes
        .chunks(BLOCK as usize)
        .map(|b| b.iter().all(|&x| x == 0))
        .collect();
    for round in 0..4 {
        let mut cmds = Vec::new();
        for _ in 0..24 {
            let off = (rng.next() % (32 << 20)) & !511;
            let len = (((rng.next() % (256 << 10)) + 512) & !511).min((32 << 20) - off);
            let (first, end) = (off.div_ceil(BLOCK), (off + len) / BLOCK);
            let cmd = match rng.next() % 6 {
                0 | 1 => {
                    (first..end).for_each(|b| zero[b as usize] = true);
                    let verb = ["write -z", "discard"][(rng.next() % 2) as usize];
                    format!("{verb} {off} {len}")
                }
                2 => "flush".to_string(),
                _ => {
                    (off / BLOCK..(off + len).div_ceil(BLOCK))
                        .for_each(|b| zero[b as usize] = false);
                    format!("write -P {} {off} {len}", rng.next() % 255 + 1)
                }
            };
            cmds.push(cmd);
        }
        let mut session_args = vec!["-f".to_string(), "raw".to_string()];
        let mut overlay_args = vec!["-f".to_string(), "qcow2".to_string()];
        for c in &cmds {
            // qemu's discard on a qcow2 overlay exposes the backing file; on our
            // session a trim reads as zeros. Give the overlay explicit zeros instead.
            let oc = if let Some(rest) = c.strip_prefix("discard ") {
                format!("write -z {rest}")
            } else {
                c.clone()
            };
            session_args.extend(["-c".to_string(), c.clone()]);
            overlay_args.extend(["-c".to_string(), oc]);
        }
        session_args.push(session.clone());
        overlay_args.push(p(&overlay).to_string());
        let sa: Vec<&str> = session_args.iter().map(|s| s.as_str()).collect();
        let oa: Vec<&str> = overlay_args.iter().map(|s| s.as_str()).collect();
        run("qemu-io", &sa);
        run("qemu-io", &oa);
        assert!(
            identical(&session, "raw", p(&overlay), "qcow2"),
            "round {round}: session differs from the overlay after {cmds:?}"
        );
        let now = env.path("now.raw");
        run(
            "qemu-img",
            &["convert", "-f", "qcow2", "-O", "raw", p(&overlay), p(&now)],
        );
        check_map(&session, &std::fs::read(&now).unwrap(), &zero);
        if round == 1 {
            // Commit while the server holds the session; it keeps serving afterwards.
            let out = env.ok(&["--json", "session", "commit", "s1", "-m", "round 1"]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["branch"], "main");
        }
    }
    env.ok(&["session", "commit", "s1", "-m", "final"]);
    let log: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "log", "gold"])).unwrap();
    assert_eq!(log.as_array().unwrap().len(), 3);
    drop(srv);
    let out = env.path("out.raw");
    env.ok(&["export", "gold", p(&out)]);
    assert!(identical(p(&out), "raw", p(&overlay), "qcow2"));
    env.ok(&["verify"]);
    // Without a server, reset and rm work on the session directly.
    env.ok(&["session", "reset", "s1"]);
    let ls: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "session", "ls"])).unwrap();
    assert_eq!(ls[0]["delta"]["data_blocks"], 0, "{ls}");
    env.ok(&["session", "rm", "s1"]);
    env.ok(&["gc"]);
    env.ok(&["verify"]);
}

#[test]
fn session_over_a_tag_needs_a_branch_and_a_moved_branch_is_refused() {
    let env = Env::new();
    let base = make_base(&env);
    env.ok(&["tag", "add", "gold", "v1"]);
    env.ok(&["session", "create", "t", "--from", "gold@v1"]);
    let out = env.cmd(&["session", "commit", "t"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--branch"));
    env.ok(&["session", "commit", "t", "--branch", "work"]);
    env.ok(&["session", "create", "m", "--from", "gold"]);
    // Someone else moves gold:main; the session's commit must not drop their version.
    env.ok(&["import", p(&base), "gold", "-m", "elsewhere"]);
    let out = env.cmd(&["session", "commit", "m"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("commit to another --branch"));
    env.ok(&["session", "commit", "m", "--branch", "m-work"]);
    // The session's base survives gc even when no other ref holds it.
    env.ok(&["session", "create", "solo", "--from", "gold@v1"]);
    env.ok(&["tag", "rm", "gold", "v1"]);
    env.ok(&["branch", "rm", "gold", "work"]);
    env.ok(&["gc"]);
    env.ok(&["verify"]);
    let srv = env.serve();
    assert!(identical(p(&base), "raw", &srv.unix("solo"), "raw"));
}

#[test]
fn flushed_writes_survive_kill_9_of_the_server() {
    let env = Env::new();
    let base = env.path("base.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&base), "64M"]);
    env.ok(&["import", p(&base), "disk"]);
    env.ok(&["session", "create", "s", "--from", "disk"]);
    let mut rng = Rng(0xdead_beef);
    let mut acked: Vec<(u64, u64)> = Vec::new(); // (region, pattern) written and flushed
    let mut region = 0u64;
    for cycle in 0..5 {
        let srv = env.serve();
        let uri = srv.unix("s");
        // A few batches complete...
        for _ in 0..(rng.next() % 4 + 1) {
            let pattern = region % 250 + 1;
            run(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P {pattern} {} 1M", region << 20),
                    "-c",
                    "flush",
                    &uri,
                ],
            );
            acked.push((region, pattern));
            region += 1;
        }
        // ...and one is in flight when the server is killed.
        let pattern = region % 250 + 1;
        let mut inflight = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                &format!("write -P {pattern} {} 1M", region << 20),
                "-c",
                "flush",
                &uri,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rng.next() % 40));
        let mut srv = srv;
        srv.child.kill().unwrap(); // SIGKILL
        srv.child.wait().unwrap();
        if inflight.wait().unwrap().success() {
            acked.push((region, pattern));
        }
        eprintln!("cycle {cycle}: {} regions acknowledged", acked.len());
        region += 1;
    }
    // After a restart every acknowledged, flushed write reads back.
    let srv = env.serve();
    let uri = srv.unix("s");
    for (r, pattern) in &acked {
        let out = run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("read -P {pattern} {} 1M", r << 20),
                &uri,
            ],
        );
        assert!(
            !out.contains("Pattern verification failed"),
            "region {r}: {out}"
        );
    }
    drop(srv);
    // And the session still commits into a version that verifies.
    env.ok(&["session", "commit", "s", "-m", "after crashes"]);
    env.ok(&["verify"]);
}

#[test]
fn nbdcopy_multi_conn_and_fio_verify_on_a_session() {
    let env = Env::new();
    let base = make_base(&env);
    env.ok(&["session", "create", "s", "--from", "gold"]);
    let srv = env.serve();
    // nbdcopy out of a version, then into the session over 4 connections at once.
    let copy = env.path("copy.raw");
    run("nbdcopy", &[&srv.unix("gold@main"), p(&copy)]);
    assert!(identical(p(&base), "raw", p(&copy), "raw"));
    let other = env.path("other.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", p(&other), "32M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 1M 20M",
            "-c",
            "write -P 0x78 30M 1M",
            p(&other),
        ],
    );
    run(
        "nbdcopy",
        &["--connections=4", "--threads=4", p(&other), &srv.unix("s")],
    );
    assert!(identical(p(&other), "raw", &srv.unix("s"), "raw"));
    // fio writes and verifies its own checksums through NBD.
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", srv.unix("s")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--iodepth=8",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // fio would otherwise leave local-verify-0-verify.state in the cwd.
            "--verify_state_save=0",
        ],
    );
    assert!(out.contains("verify"), "{out}");
    env.ok(&["session", "commit", "s", "-m", "fio"]);
    env.ok(&["verify"]);
}

#[test]
fn socket_activation_by_nbdcopy() {
    // `nbdcopy [ CMD ]` starts the server itself and hands it a listening socket the
    // systemd way (LISTEN_FDS); the client asks for the default export.
    let env = Env::new();
    let base = make_base(&env);
    let out = env.path("out.raw");
    let bin = env!("CARGO_BIN_EXE_strata");
    run(
        "nbdcopy",
        &[
            "--",
            "[",
            bin,
            "--store",
            p(&env.store),
            "serve",
            "--default-export",
            "gold@main",
            "]",
            p(&out),
        ],
    );
    assert!(identical(p(&base), "raw", p(&out), "raw"));
}

/// The newest file in /boot whose name starts with `prefix` (Debian's kernel and
/// initrd, installed by scripts/test).
fn boot_file(prefix: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("/boot (scripts/test installs linux-image-amd64)")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    found.sort();
    found
        .pop()
        .unwrap_or_else(|| panic!("no /boot/{prefix}* (scripts/test installs linux-image-amd64)"))
}

#[test]
fn qemu_boots_linux_from_a_session_and_the_commit_keeps_what_it_wrote() {
    let env = Env::new();
    // A root file system whose init proves it ran: it writes the nonce from the kernel
    // command line into a file, remounts read-only (a clean file system) and powers off.
    let root = env.path("rootdir");
    for d in ["bin", "sbin", "proc", "sys", "dev", "run", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox (scripts/test installs busybox-static)");
    let init = root.join("sbin/init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n\
         B=/bin/busybox\n\
         $B mount -t proc proc /proc\n\
         $B mount -o remount,rw /\n\
         nonce=$($B sed -n 's/.*strata.nonce=\\([0-9a-f]*\\).*/\\1/p' /proc/cmdline)\n\
         echo \"booted $nonce on $($B uname -r)\" > /booted-by-strata\n\
         $B sync\n\
         $B mount -o remount,ro /\n\
         echo STRATA-BOOT-DONE\n\
         $B poweroff -f\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = env.path("root.img");
    run("truncate", &["-s", "64M", p(&img)]);
    run("mke2fs", &["-q", "-t", "ext4", "-d", p(&root), p(&img)]);
    env.ok(&["import", p(&img), "vmroot", "-m", "root fs"]);
    env.ok(&["session", "create", "vm", "--from", "vmroot"]);
    let srv = env.serve();

    let nonce = format!("{:016x}", Rng(std::process::id() as u64 | 1).next());
    let serial = env.path("serial.log");
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35,accel=tcg", "-m", "256", "-smp", "1"])
        .args(["-display", "none", "-monitor", "none", "-nic", "none"])
        .args(["-no-reboot", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-kernel")
        .arg(boot_file("vmlinuz-"))
        .arg("-initrd")
        .arg(boot_file("initrd.img-"))
        .args([
            "-append",
            &format!("root=/dev/vda rw console=ttyS0 panic=-1 strata.nonce={nonce}"),
        ])
        .args([
            "-drive",
            &format!(
                "if=virtio,format=raw,cache=none,file.driver=nbd,file.server.type=unix,\
                 file.server.path={},file.export=vm",
                srv.sock.display()
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 (scripts/test installs qemu-system-x86)");
    // Software emulation takes ~15-40 s here; ten minutes means something hangs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let status = loop {
        if let Some(st) = qemu.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = qemu.kill();
            panic!(
                "the VM did not power off in 10 minutes; serial console:\n{}",
                std::fs::read_to_string(&serial).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(
        status.success() && console.contains("STRATA-BOOT-DONE"),
        "qemu {status}; serial console:\n{console}"
    );

    // Commit while the server still holds the session, then read the file back out of
    // the committed version with tools that know nothing of Strata.
    let out: serde_json::Value =
        serde_json::from_str(&env.ok(&["--json", "session", "commit", "vm", "-m", "after boot"]))
            .unwrap();
    let version = out["version"].as_str().unwrap().to_string();
    drop(srv);
    let exported = env.path("committed.img");
    env.ok(&[
        "export",
        &format!("vmroot@{}", &version[..16]),
        p(&exported),
    ]);
    run("e2fsck", &["-fn", p(&exported)]);
    let cat = run("debugfs", &["-R", "cat /booted-by-strata", p(&exported)]);
    assert!(
        cat.contains(&format!("booted {nonce} on ")),
        "the committed version lacks the file the VM wrote: {cat:?}"
    );
    // The base the VM booted from is untouched.
    let base_copy = env.path("base-again.img");
    env.ok(&["export", "vmroot@main~1", p(&base_copy)]);
    assert!(identical(p(&img), "raw", p(&base_copy), "raw"));
    env.ok(&["verify"]);
}

/// A CA and a server certificate for localhost/127.0.0.1 ([`common::make_pki`]), in
/// the layout `strata serve --tls-dir` and qemu's `tls-creds-x509` read: `server/`
/// (server-cert.pem, server-key.pem) and `client/` (ca-cert.pem).
fn make_pki(root: &Path) -> (PathBuf, PathBuf) {
    let pki = common::make_pki(root, &["127.0.0.1"]);
    let (server, client) = (root.join("server"), root.join("client"));
    std::fs::create_dir_all(&server).unwrap();
    std::fs::create_dir_all(&client).unwrap();
    std::fs::rename(&pki.cert, server.join("server-cert.pem")).unwrap();
    std::fs::rename(&pki.key, server.join("server-key.pem")).unwrap();
    std::fs::copy(&pki.ca, client.join("ca-cert.pem")).unwrap();
    (server, client)
}

#[test]
fn tls_required_serves_versions_and_sessions_only_over_tls() {
    let env = Env::new();
    let base = make_base(&env);
    env.ok(&["session", "create", "s", "--from", "gold"]);
    let (server_dir, client_dir) = make_pki(&env.path("pki"));
    let srv = env.serve_with(&["--tls-dir", p(&server_dir), "--tls-required"]);
    let creds = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        client_dir.display()
    );
    let opts = |export: &str| {
        format!(
            "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={},file.export={export},file.tls-creds=tls0",
            srv.port
        )
    };
    // Without TLS the server says no before any export is opened.
    let plain = Command::new("qemu-img")
        .args(["info", &srv.tcp("gold@main")])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plain client was served");
    // nbdinfo (libnbd, GnuTLS) lists the exports over TLS.
    let list = run(
        "nbdinfo",
        &[
            "--list",
            &format!(
                "nbds://127.0.0.1:{}/?tls-certificates={}",
                srv.port,
                client_dir.display()
            ),
        ],
    );
    assert!(
        list.contains("gold@main") && list.contains("export=\"s\""),
        "{list}"
    );
    // qemu reads a version and writes a session through TLS.
    let copy = env.path("copy.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            &creds,
            "--image-opts",
            &opts("gold@main"),
            "-O",
            "raw",
            p(&copy),
        ],
    );
    assert!(identical(p(&base), "raw", p(&copy), "raw"));
    run(
        "qemu-io",
        &[
            "--object",
            &creds,
            "--image-opts",
            &opts("s"),
            "-c",
            "write -P 0x3c 1M 2M",
            "-c",
            "flush",
        ],
    );
    let out = run(
        "qemu-io",
        &[
            "--object",
            &creds,
            "--image-opts",
            &opts("s"),
            "-c",
            "read -P 0x3c 1M 2M",
        ],
    );
    assert!(!out.contains("verification failed"), "{out}");
    drop(srv);
    env.ok(&["session", "commit", "s", "-m", "over tls"]);
    let exported = env.path("after.raw");
    env.ok(&["export", "gold", p(&exported)]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 1M 2M", p(&base)],
    );
    assert!(identical(p(&base), "raw", p(&exported), "raw"));
}

#[test]
fn session_ls_counts_connected_clients() {
    let env = Env::new();
    make_base(&env);
    env.ok(&["session", "create", "a", "--from", "gold"]);
    env.ok(&["session", "create", "b", "--from", "gold"]);
    let clients = |env: &Env| -> Vec<(String, u64)> {
        let ls: serde_json::Value =
            serde_json::from_str(&env.ok(&["--json", "session", "ls"])).unwrap();
        ls.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_string(),
                    r["clients"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(clients(&env), [("a".into(), 0), ("b".into(), 0)]);
    let srv = env.serve();
    // Clients that connect and stay until their stdin closes.
    let hold = |export: &str| {
        // nbdsh runs `python3 -m nbd`: Debian's python has the module.
        let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
        let (c, lines) = spawn_announcing(
            Command::new("nbdsh")
                .env("PATH", path)
                .args(["-u", &srv.unix(export), "-c"])
                .arg("import sys; print('up', flush=True); sys.stdin.read()")
                .stdin(Stdio::piped()),
            1,
        );
        assert_eq!(lines[0].trim(), "up");
        c
    };
    let held: Vec<Child> = vec![hold("a"), hold("a"), hold("b")];
    assert_eq!(clients(&env), [("a".into(), 2), ("b".into(), 1)]);
    let text = env.ok(&["session", "ls"]);
    assert!(
        text.contains("served, 2 clients") && text.contains("served, 1 client"),
        "{text}"
    );
    for mut c in held {
        drop(c.stdin.take());
        assert!(c.wait().unwrap().success());
    }
    // The server notices the disconnects (asynchronously: poll, without a deadline
    // tighter than the test runner's own).
    while clients(&env) != [("a".to_string(), 0), ("b".to_string(), 0)] {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn session_commit_killed_at_random_moments_loses_nothing() {
    let env = Env::new();
    let base = make_base(&env);
    // `expected` gets every write the session gets.
    let expected = env.path("expected.raw");
    std::fs::copy(&base, &expected).unwrap();
    env.ok(&["session", "create", "s", "--from", "gold"]);
    let mut rng = Rng(0xc0ff_ee11);
    let mut versions = 1;
    let mut full_commit_ms = 200;
    for round in 0..16 {
        let mut writes = Vec::new();
        for _ in 0..16 {
            let off = (rng.next() % (31 << 20)) & !4095;
            writes.push(format!("write -P {} {off} 1M", rng.next() % 255 + 1));
        }
        let args = |target: &str, fmt: &str| -> Vec<String> {
            let mut a = vec!["-f".to_string(), fmt.to_string()];
            for w in &writes {
                a.extend(["-c".to_string(), w.clone()]);
            }
            a.extend(["-c".to_string(), "flush".to_string(), target.to_string()]);
            a
        };
        let srv = env.serve();
        let a = args(&srv.unix("s"), "raw");
        run("qemu-io", &a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let a = args(p(&expected), "raw");
        run("qemu-io", &a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        // Even rounds: the server commits (asked over its control socket) and is killed;
        // odd rounds: `strata session commit` opens the session itself and is killed.
        let mut srv = Some(srv);
        if round % 2 == 1 {
            drop(srv.take());
        }
        let started = std::time::Instant::now();
        let mut commit = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--store")
            .arg(&env.store)
            .args(["session", "commit", "s", "-m", &format!("round {round}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Spread the kill over the time a whole commit takes (measured on the last
        // one that ran to the end).
        // Round 0 is not killed: it measures.
        if round > 0 {
            let delay = rng.next() % (full_commit_ms + 1);
            std::thread::sleep(std::time::Duration::from_millis(delay));
            match srv.as_mut() {
                Some(s) => s.child.kill().unwrap(),
                None => {
                    let _ = commit.kill();
                }
            }
        }
        let committed = commit.wait().unwrap().success();
        if committed {
            full_commit_ms = started.elapsed().as_millis() as u64;
        }
        drop(srv);
        // Whatever happened, the branch holds the old tip or a complete new version,
        // and the session reads exactly what was written to it.
        let log: serde_json::Value =
            serde_json::from_str(&env.ok(&["--json", "log", "gold"])).unwrap();
        let n = log.as_array().unwrap().len();
        assert!(
            n == versions || n == versions + 1,
            "round {round}: {n} versions"
        );
        if committed {
            assert_eq!(
                n,
                versions + 1,
                "round {round}: commit said yes, no version"
            );
        }
        if n > versions {
            let out = env.path("tip.raw");
            env.ok(&["export", "gold", p(&out), "--force"]);
            assert!(
                identical(p(&out), "raw", p(&expected), "raw"),
                "round {round}: tip"
            );
        }
        eprintln!(
            "round {round}: commit finished: {committed}, new version: {}",
            n > versions
        );
        versions = n;
        let srv = env.serve();
        assert!(
            identical(&srv.unix("s"), "raw", p(&expected), "raw"),
            "round {round}: the session lost writes"
        );
    }
    env.ok(&["session", "commit", "s", "-m", "final"]);
    let out = env.path("final.raw");
    env.ok(&["export", "gold", p(&out)]);
    assert!(identical(p(&out), "raw", p(&expected), "raw"));
    env.ok(&["gc"]);
    env.ok(&["verify"]);
}
