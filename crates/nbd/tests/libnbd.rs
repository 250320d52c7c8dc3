//! libnbd's tools (nbdinfo, nbdcopy, nbdsh) and fio's nbd engine against the server.
//! scripts/test installs them (Debian packages libnbd-bin, python3-libnbd, fio); a
//! missing tool fails the test that needs it.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use strata_block::Disk;
use strata_nbd::mem::MemDisk;
use strata_nbd::ServerConfig;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

#[test]
fn nbdinfo_reports_what_the_disk_can_do() {
    require!("nbdinfo");
    let rw = sample_disk();
    let ro = Arc::new(MemDisk::new(1 << 20, 4096).read_only(true));
    let srv = TestServer::start(
        exports_of(&[("rw", rw), ("ro", ro)]),
        ServerConfig::default(),
    );
    for uri in [srv.tcp_uri("rw"), srv.unix_uri("rw")] {
        let v = json(&run_ok("nbdinfo", &["--json", &uri]));
        assert_eq!(v["protocol"], "newstyle-fixed");
        assert_eq!(v["structured"], true);
        let e = &v["exports"][0];
        assert_eq!(e["export-size"], 8 << 20);
        assert_eq!(e["description"], "test disk rw");
        assert_eq!(e["contexts"][0], "base:allocation");
        for flag in [
            "can_cache",
            "can_df",
            "can_fast_zero",
            "can_flush",
            "can_fua",
            "can_multi_conn",
            "can_trim",
            "can_zero",
        ] {
            assert_eq!(e[flag], true, "{flag}: {e}");
        }
        assert_eq!(e["is_read_only"], false);
        assert_eq!(e["block_size_minimum"], 1);
        assert_eq!(e["block_size_preferred"], 65536);
        assert_eq!(e["block_size_maximum"], 32 << 20);
    }
    let v = json(&run_ok("nbdinfo", &["--json", &srv.tcp_uri("ro")]));
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"], true);
    for flag in ["can_trim", "can_zero", "can_fua", "can_fast_zero"] {
        assert_eq!(e[flag], false, "{flag}: {e}");
    }
    assert_eq!(e["block_size_preferred"], 4096);
}

#[test]
fn nbdinfo_lists_exports() {
    require!("nbdinfo");
    let srv = TestServer::start(
        exports_of(&[
            ("one", sample_disk()),
            ("two", Arc::new(MemDisk::new(4096, 4096))),
        ]),
        ServerConfig::default(),
    );
    let v = json(&run_ok("nbdinfo", &["--list", "--json", &srv.unix_uri("")]));
    let names: Vec<_> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["export-name"].clone(), e["description"].clone()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("one".into(), "test disk one".into()),
            ("two".into(), "test disk two".into())
        ]
    );
}

#[test]
fn nbdinfo_map_matches_the_holes() {
    require!("nbdinfo");
    let disk = sample_disk();
    let srv = TestServer::start(exports_of(&[("vm", disk.clone())]), ServerConfig::default());
    let out = run_ok("nbdinfo", &["--map", &srv.tcp_uri("vm")]);
    let alloc = disk.allocation();
    let mut covered = 0u64;
    let mut lines = 0;
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len, ty): (u64, u64, u32) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        assert_eq!(off, covered, "{out}");
        covered += len;
        lines += 1;
        let hole = ty == 3;
        assert!(ty == 0 || ty == 3, "{line}");
        for g in off / 65536..(off + len).div_ceil(65536) {
            assert_eq!(alloc[g as usize], !hole, "granule {g}: {line}");
        }
    }
    assert_eq!(covered, 8 << 20);
    // Neighbours with equal status are merged: data and holes alternate.
    assert_eq!(lines, 7, "{out}");
}

#[test]
fn nbdcopy_between_exports_with_multi_conn_and_files() {
    require!("nbdcopy");
    let src = sample_disk();
    let dst = Arc::new(MemDisk::new(8 << 20, 65536));
    dst.fill(&pattern(2 << 20, 7), 4 << 20);
    let back = Arc::new(MemDisk::new(8 << 20, 65536));
    let srv = TestServer::start(
        exports_of(&[
            ("src", src.clone()),
            ("dst", dst.clone()),
            ("back", back.clone()),
        ]),
        ServerConfig::default(),
    );
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            "--requests=16",
            "--flush",
            &srv.tcp_uri("src"),
            &srv.unix_uri("dst"),
        ],
    );
    assert_eq!(dst.contents(), src.contents());
    assert!(dst.flushes() > 0);
    // With CAN_MULTI_CONN, nbdcopy opened 4 connections on each side (it uses no
    // more connections than threads, hence --threads).
    assert!(srv.server.stats().accepted >= 8, "{:?}", srv.server.stats());

    let file = srv.dir.path().join("copy.raw");
    let f = file.to_str().unwrap();
    run_ok("nbdcopy", &[&srv.tcp_uri("src"), f]);
    assert_eq!(std::fs::read(&file).unwrap(), src.contents());
    run_ok("nbdcopy", &["--connections=4", f, &srv.tcp_uri("back")]);
    assert_eq!(back.contents(), src.contents());
}

/// nbdsh runs `python3 -m nbd`: use Debian's python, where the module lives.
fn nbdsh(script: &str) -> std::process::Output {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new("nbdsh");
    cmd.env("PATH", path).args(["-n", "-c", script]);
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nbdsh");
    wait_bounded(child)
}

fn wait_bounded(mut child: std::process::Child) -> std::process::Output {
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("nbdsh did not finish");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

const NBDSH_CHECKS: &str = r#"
import errno
import nbd

h = nbd.NBD()
h.set_opt_mode(True)
h.add_meta_context("base:allocation")
h.connect_uri(URI_RW)
exports = []
h.opt_list(lambda name, desc: exports.append((name, desc)) or 0)
assert exports == [("ro", "test disk ro"), ("rw", "test disk rw"), ("slow", "test disk slow")], exports
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
assert ctxs == ["base:allocation"], ctxs
h.opt_go()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.can_df() and h.can_fast_zero() and h.can_multi_conn() and h.can_cache()
assert h.can_trim() and h.can_zero() and h.can_fua() and h.can_flush()
assert not h.is_read_only()
assert h.get_size() == 8 << 20

# A structured read over data and holes: data chunks, hole chunks, right bytes.
chunks = []
def cb(sub, off, status, err):
    chunks.append((off, len(sub), status))
    return 0
buf = h.pread_structured(2 << 20, 0, cb)
assert buf == EXPECTED_0_2M, "content differs"
kinds = {s for (_, _, s) in chunks}
assert kinds == {nbd.READ_DATA, nbd.READ_HOLE}, chunks
assert sum(n for (_, n, _) in chunks) == 2 << 20, chunks
# The same with DF: exactly one data chunk.
chunks.clear()
buf = h.pread_structured(2 << 20, 0, cb, nbd.CMD_FLAG_DF)
assert buf == EXPECTED_0_2M
assert chunks == [(0, 2 << 20, nbd.READ_DATA)], chunks

# Block status, whole and REQ_ONE.
ents = []
def bs(meta, off, entries, err):
    ents.append((meta, off, list(entries)))
    return 0
h.block_status(2 << 20, 0, bs)
assert ents == [("base:allocation", 0, [256 << 10, 0, 768 << 10, 3, 64 << 10, 0, 960 << 10, 3])], ents
ents.clear()
h.block_status(2 << 20, 300 << 10, bs, nbd.CMD_FLAG_REQ_ONE)
assert ents == [("base:allocation", 300 << 10, [724 << 10, 3])], ents

# Writes with FUA, zeroes, trims, cache, flush.
h.pwrite(b"\x42" * 4096, 5 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 5 << 20) == b"\x42" * 4096
h.zero(4096, 5 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 5 << 20) == bytes(4096)
h.zero(64 << 10, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(64 << 10, 0) == bytes(64 << 10)
h.trim(64 << 10, 64 << 10)
h.cache(1 << 20, 0)
h.flush()

# Past the end, with libnbd's own checks off so the server sees it.
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 10, h.get_size() - 5)
    assert False, "write past the end succeeded"
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
try:
    h.pread(10, h.get_size() - 5)
    assert False, "read past the end succeeded"
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
h.shutdown()

# A disk that cannot zero fast refuses FAST_ZERO with ENOTSUP, and zeroes without it.
h = nbd.NBD()
h.connect_uri(URI_SLOW)
assert h.can_fast_zero()
try:
    h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    assert False, "fast zero succeeded"
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
h.zero(4096, 0)
h.shutdown()

# A read-only export: flags say so, and the server refuses writes itself.
h = nbd.NBD()
h.connect_uri(URI_RO)
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero()
h.set_strict_mode(0)
for f in (lambda: h.pwrite(b"x", 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
    try:
        f()
        assert False, "write to read-only export succeeded"
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
assert h.pread(4, 0) == b"\x01\x02\x03\x04"
h.shutdown()

# Without structured replies: simple replies, no block status.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(URI_RW)
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
assert h.pread(8192, 5 << 20) == bytes(8192)
h.pwrite(b"\x05" * 512, 7 << 20)
assert h.pread(512, 7 << 20) == b"\x05" * 512
h.shutdown()
print("all checks passed")
"#;

#[test]
fn nbdsh_checks_flags_structured_replies_and_errors() {
    require!("nbdsh");
    let rw = sample_disk();
    let expected = rw.contents()[..2 << 20].to_vec();
    let ro = MemDisk::new(1 << 20, 4096);
    ro.fill(&[1, 2, 3, 4], 0);
    let ro = Arc::new(ro.read_only(true));
    let slow = Arc::new(MemDisk::new(1 << 20, 4096).with_fast_zero(false));
    let srv = TestServer::start(
        exports_of(&[
            ("rw", rw.clone()),
            ("ro", ro.clone()),
            ("slow", slow.clone()),
        ]),
        ServerConfig::default(),
    );
    // The expected bytes go through a file, not the command line.
    let exp_file = srv.dir.path().join("expected.bin");
    std::fs::write(&exp_file, &expected).unwrap();
    let script = NBDSH_CHECKS
        .replace("URI_RW", &format!("{:?}", srv.tcp_uri("rw")))
        .replace("URI_RO", &format!("{:?}", srv.unix_uri("ro")))
        .replace("URI_SLOW", &format!("{:?}", srv.tcp_uri("slow")))
        .replace(
            "EXPECTED_0_2M",
            &format!("open({:?}, 'rb').read()", exp_file.to_str().unwrap()),
        );
    let o = nbdsh(&script);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "nbdsh failed:\n{out}\n{err}");
    assert!(out.contains("all checks passed"), "{out}\n{err}");
    // What nbdsh did, seen from the disks.
    assert!(rw.fua_writes() >= 1);
    assert!(rw.flushes() >= 1);
    assert!(!rw.allocation()[1], "trimmed granule is a hole");
    assert_eq!(&rw.contents()[7 << 20..(7 << 20) + 512], &[5u8; 512][..]);
    assert_eq!(ro.contents()[0..4], [1, 2, 3, 4]);
    let _ = slow.size();
}

#[test]
fn fio_random_writes_verify() {
    require!("fio");
    let disk = Arc::new(MemDisk::new(32 << 20, 65536));
    let srv = TestServer::start(
        exports_of(&[("fio", disk.clone())]),
        ServerConfig::default(),
    );
    let uri = format!("--uri={}", srv.tcp_uri("fio"));
    let o = run_in(
        "fio",
        &[
            "--name=nbd",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=64",
            "--verify=crc32c",
            "--output-format=json",
        ],
        Some(srv.dir.path()),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "fio: {out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let start = out.find('{').expect("fio JSON");
    let v = json(&out[start..]);
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 16 << 20);
    // Verification read back everything written.
    assert_eq!(job["read"]["io_bytes"], 16 << 20);
}
