//! qemu's NBD client (qemu-img, qemu-io, qemu-nbd) against the server, over TCP and
//! Unix sockets served at the same time.

mod common;

use std::sync::Arc;

use common::*;
use strata_nbd::mem::MemDisk;
use strata_nbd::ServerConfig;

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

#[test]
fn qemu_img_info_over_tcp_and_unix() {
    let disk = sample_disk();
    let srv = TestServer::start(exports_of(&[("vm", disk.clone())]), ServerConfig::default());
    for uri in [srv.tcp_uri("vm"), srv.unix_uri("vm")] {
        let info = json(&run_ok("qemu-img", &["info", "--output=json", &uri]));
        assert_eq!(info["virtual-size"], 8 << 20, "{uri}: {info}");
        assert_eq!(info["format"], "raw");
    }
    // An unknown export is refused cleanly.
    let o = run("qemu-img", &["info", &srv.tcp_uri("nope")]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nope"), "{err}");
    srv.wait_idle();
    assert!(srv.server.stats().accepted >= 3);
}

#[test]
fn qemu_img_convert_and_compare_from_export() {
    let disk = sample_disk();
    let srv = TestServer::start(exports_of(&[("vm", disk.clone())]), ServerConfig::default());
    for (i, uri) in [srv.tcp_uri("vm"), srv.unix_uri("vm")].iter().enumerate() {
        let out = srv.dir.path().join(format!("out{i}.raw"));
        let out_s = out.to_str().unwrap();
        run_ok(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", uri, out_s],
        );
        assert_eq!(std::fs::read(&out).unwrap(), disk.contents(), "{uri}");
        let cmp = run_ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", out_s, uri],
        );
        assert!(cmp.contains("Images are identical"), "{cmp}");
        // qcow2 output keeps the holes as holes.
        let q = srv.dir.path().join(format!("out{i}.qcow2"));
        let q_s = q.to_str().unwrap();
        run_ok(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "qcow2", uri, q_s],
        );
        let cmp = run_ok(
            "qemu-img",
            &["compare", "-f", "qcow2", "-F", "raw", q_s, uri],
        );
        assert!(cmp.contains("Images are identical"), "{cmp}");
    }
    // A difference is found.
    let out = srv.dir.path().join("out0.raw");
    disk.fill(b"changed", 5 << 20);
    let o = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            out.to_str().unwrap(),
            &srv.tcp_uri("vm"),
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn qemu_img_convert_into_export() {
    let src = sample_disk();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), src.contents()).unwrap();
    let f = file.path().to_str().unwrap();
    let tcp_target = Arc::new(MemDisk::new(8 << 20, 64 * 1024));
    let unix_target = Arc::new(MemDisk::new(8 << 20, 64 * 1024));
    // Stale data in the target must be overwritten by zeros where the source has holes.
    tcp_target.fill(&pattern(1 << 20, 9), 5 << 20);
    let srv = TestServer::start(
        exports_of(&[("a", tcp_target.clone()), ("b", unix_target.clone())]),
        ServerConfig::default(),
    );
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            f,
            &srv.tcp_uri("a"),
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            f,
            &srv.unix_uri("b"),
        ],
    );
    assert_eq!(tcp_target.contents(), src.contents());
    assert_eq!(unix_target.contents(), src.contents());
    let cmp = run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &srv.tcp_uri("a"),
            &srv.unix_uri("b"),
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");
    // qemu-img flushes at the end of a convert.
    assert!(tcp_target.flushes() > 0);
}

#[test]
fn qemu_img_map_matches_the_holes() {
    let disk = sample_disk();
    let srv = TestServer::start(exports_of(&[("vm", disk.clone())]), ServerConfig::default());
    let map = json(&run_ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &srv.tcp_uri("vm")],
    ));
    let granule = 64 * 1024u64;
    let alloc = disk.allocation();
    let mut covered = 0u64;
    for e in map.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        assert_eq!(start, covered);
        covered += len;
        for g in start / granule..(start + len).div_ceil(granule) {
            assert_eq!(alloc[g as usize], data, "granule {g} in {e}");
        }
        if !data {
            assert_eq!(e["zero"], true, "{e}");
        }
    }
    assert_eq!(covered, 8 << 20);
    // Data and holes alternate: 4 data runs, so at least 7 entries.
    assert!(map.as_array().unwrap().len() >= 7, "{map}");
}

/// Run qemu-io commands; (whether all succeeded, stdout and stderr).
fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        if c.starts_with('-') {
            args.push(c);
        } else {
            args.push("-c");
            args.push(c);
        }
    }
    args.push(uri);
    let o = run("qemu-io", &args);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), out)
}

#[test]
fn qemu_io_writes_reads_flushes_discards_and_zeroes() {
    let disk = Arc::new(MemDisk::new(4 << 20, 64 * 1024));
    let srv = TestServer::start(exports_of(&[("rw", disk.clone())]), ServerConfig::default());
    let (ok, out) = qemu_io(
        &srv.tcp_uri("rw"),
        &[
            "write -P 0xab 0 256k",
            "write -P 0xcd 1000 3000",
            "write -P 0x11 -f 512k 64k",
            "read -P 0xab 0 1000",
            "read -P 0xcd 1000 3000",
            "read -P 0xab 4000 100k",
            "flush",
            "discard 128k 64k",
            "write -z 192k 64k",
            "read -P 0 128k 128k",
            "write -z -u 512k 64k",
            "read -P 0 512k 64k",
        ],
    );
    assert!(ok, "{out}");
    assert!(!out.contains("failed"), "{out}");
    let c = disk.contents();
    assert!(c[..1000].iter().all(|&b| b == 0xab));
    assert!(c[1000..4000].iter().all(|&b| b == 0xcd));
    assert!(c[4000..128 * 1024].iter().all(|&b| b == 0xab));
    assert!(c[128 * 1024..256 * 1024].iter().all(|&b| b == 0));
    assert!(c[512 * 1024..576 * 1024].iter().all(|&b| b == 0));
    assert!(disk.flushes() >= 1);
    assert!(disk.fua_writes() >= 1, "write -f sends FUA");
    let alloc = disk.allocation();
    assert!(alloc[0], "written granule is allocated");
    assert!(!alloc[2], "discarded granule is a hole");
    assert!(!alloc[8], "zeroed with unmap allowed is a hole");

    // A pattern mismatch is caught, so the checks above are real.
    let (ok, out) = qemu_io(&srv.unix_uri("rw"), &["read -P 0x12 0 512"]);
    assert!(!ok && out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn read_only_export_refuses_writes() {
    let disk = Arc::new(sample_disk().as_ref().contents_disk(true));
    let srv = TestServer::start(exports_of(&[("ro", disk.clone())]), ServerConfig::default());
    let before = disk.contents();
    // qemu sees NBD_FLAG_READ_ONLY and will not open it for writing...
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &srv.tcp_uri("ro")],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    // ...but a read-only open reads, and refuses writes.
    let (ok, out) = qemu_io(
        &srv.tcp_uri("ro"),
        &["-r", "read -P 0 300k 64k", "write -P 1 0 4k"],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("read 65536/65536 bytes"), "{out}");
    assert!(out.contains("read-only"), "{out}");
    assert!(!out.contains("wrote"), "{out}");
    let o = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            "/dev/null",
            &srv.tcp_uri("ro"),
        ],
    );
    assert!(!o.status.success());
    assert_eq!(disk.contents(), before);
}

#[test]
fn qemu_nbd_lists_exports() {
    let a = sample_disk();
    let b = Arc::new(MemDisk::new(1 << 20, 4096));
    let srv = TestServer::start(
        exports_of(&[("alpha", a), ("beta", b)]),
        ServerConfig::default(),
    );
    let port = srv.port.to_string();
    for args in [
        vec!["-L", "-b", "127.0.0.1", "-p", port.as_str()],
        vec!["-L", "-k", srv.socket.to_str().unwrap()],
    ] {
        let out = run_ok("qemu-nbd", &args);
        assert!(out.contains("exports available: 2"), "{out}");
        assert!(out.contains("export: 'alpha'"), "{out}");
        assert!(out.contains("description: test disk alpha"), "{out}");
        assert!(out.contains("export: 'beta'"), "{out}");
        assert!(out.contains("size:  1048576"), "{out}");
        assert!(out.contains("base:allocation"), "{out}");
    }
}

/// Helper used above: a read-only copy of a disk's content.
trait ContentsDisk {
    fn contents_disk(&self, read_only: bool) -> MemDisk;
}

impl ContentsDisk for MemDisk {
    fn contents_disk(&self, read_only: bool) -> MemDisk {
        let d = MemDisk::new(self.contents().len() as u64, 64 * 1024);
        d.fill(&self.contents(), 0);
        d.read_only(read_only)
    }
}
