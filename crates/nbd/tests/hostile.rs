//! Raw-socket clients that misbehave, and the server's limits: whatever one client
//! does, the server answers or hangs up on that client alone, and keeps serving
//! everyone else.

mod common;

use std::collections::HashSet;
use std::io::{self, Write};
use std::os::fd::IntoRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use strata_block::{Disk, DiskExtent};
use strata_nbd::mem::MemDisk;
use strata_nbd::proto::*;
use strata_nbd::{Listener, ServerConfig, StaticExports};

/// A fresh client can still negotiate, write and read: the server is healthy.
fn check_healthy(port: u16, name: &str) {
    let mut c = RawClient::handshake(port);
    let (size, _) = c.go(name, true);
    assert!(size >= 8192);
    // Near the end, away from what the other tests read.
    let at = size - 8192;
    let data = pattern(4096, 77);
    c.request(0, CMD_WRITE, 1, at, 4096);
    c.send(&data);
    assert_eq!(c.any_reply(), (1, 0));
    c.request(0, CMD_READ, 2, at, 4096);
    let (cookie, err, got, _) = c.structured_read(at, 4096);
    assert_eq!((cookie, err), (2, 0));
    assert_eq!(got, data);
    c.request(0, CMD_DISC, 3, 0, 0);
    assert!(c.is_closed());
}

fn server() -> (TestServer, Arc<MemDisk>) {
    let disk = sample_disk();
    let ro = Arc::new(MemDisk::new(1 << 20, 4096).read_only(true));
    let srv = TestServer::start(
        exports_of(&[("vm", disk.clone()), ("ro", ro)]),
        ServerConfig::default(),
    );
    (srv, disk)
}

#[test]
fn bad_client_flags_and_bad_option_magic_disconnect() {
    let (srv, _) = server();
    let mut c = RawClient::connect(srv.port);
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.is_closed());

    let mut c = RawClient::handshake(srv.port);
    c.send(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
    assert!(c.is_closed());

    // Garbage straight after the greeting.
    let mut c = RawClient::connect(srv.port);
    c.send(&[0xff; 200]);
    assert!(c.is_closed());
    check_healthy(srv.port, "vm");
}

#[test]
fn oversized_option_disconnects_without_reading_it() {
    let (srv, _) = server();
    let mut c = RawClient::handshake(srv.port);
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    c.send(&h);
    assert!(c.is_closed());
    // An unknown option of the largest allowed size is skipped and refused politely.
    let mut c = RawClient::handshake(srv.port);
    c.option(0x7777, &vec![0xaa; MAX_OPTION_LEN as usize]);
    assert_eq!(c.reply().1, REP_ERR_UNSUP);
    c.go("vm", false);
    check_healthy(srv.port, "vm");
}

#[test]
fn option_errors_leave_negotiation_usable() {
    let (srv, _) = server();
    let mut c = RawClient::handshake(srv.port);
    let expect = |c: &mut RawClient, opt: u32, data: &[u8], rep: u32| {
        c.option(opt, data);
        let r = c.replies();
        assert_eq!(r.last().unwrap().1, rep, "option {opt}: {r:?}");
        assert_eq!(r.last().unwrap().0, opt);
    };
    expect(&mut c, 0x1234, b"whatever", REP_ERR_UNSUP);
    expect(&mut c, 11, &[], REP_ERR_UNSUP); // EXTENDED_HEADERS: not implemented
    expect(&mut c, OPT_STARTTLS, &[], REP_ERR_UNSUP); // no TLS configured
    expect(&mut c, OPT_LIST, b"x", REP_ERR_INVALID);
    expect(&mut c, OPT_STRUCTURED_REPLY, b"x", REP_ERR_INVALID);
    expect(&mut c, OPT_GO, &[0, 0, 0, 9, b'v'], REP_ERR_INVALID);
    expect(
        &mut c,
        OPT_INFO,
        &[0, 0, 0, 2, b'v', b'm', 0, 3, 0, 1],
        REP_ERR_INVALID,
    );
    let bad_utf8 = RawClient::go_payload("\u{0}", &[]);
    expect(&mut c, OPT_GO, &bad_utf8, REP_ERR_INVALID);
    expect(
        &mut c,
        OPT_GO,
        &RawClient::go_payload("nope", &[]),
        REP_ERR_UNKNOWN,
    );
    // Meta contexts need structured replies first.
    let meta = RawClient::meta_payload("vm", &["base:allocation"]);
    expect(&mut c, OPT_SET_META_CONTEXT, &meta, REP_ERR_INVALID);
    expect(&mut c, OPT_STRUCTURED_REPLY, &[], REP_ACK);
    expect(
        &mut c,
        OPT_SET_META_CONTEXT,
        &RawClient::meta_payload("vm", &["nocolon"]),
        REP_ERR_INVALID,
    );
    expect(
        &mut c,
        OPT_LIST_META_CONTEXT,
        &RawClient::meta_payload("nope", &[]),
        REP_ERR_UNKNOWN,
    );
    // After all that, GO works and so do reads.
    let (size, flags) = c.go("vm", true);
    assert_eq!(size, 8 << 20);
    assert_ne!(flags & FLAG_SEND_DF, 0);
    c.request(0, CMD_READ, 9, 0, 512);
    let (_, err, data, _) = c.structured_read(0, 512);
    assert_eq!(err, 0);
    assert_eq!(data, pattern(256 * 1024, 1)[..512]);
}

#[test]
fn info_list_and_meta_context_replies() {
    let (srv, _) = server();
    let mut c = RawClient::handshake(srv.port);
    c.option(OPT_LIST, &[]);
    let r = c.replies();
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].1, REP_SERVER);
    assert_eq!(&r[0].2[4..6], b"ro");
    assert_eq!(&r[1].2[4..], b"vmtest disk vm");

    c.option(
        OPT_INFO,
        &RawClient::go_payload("vm", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 99]),
    );
    let r = c.replies();
    let infos: Vec<(u16, Vec<u8>)> = r
        .iter()
        .filter(|x| x.1 == REP_INFO)
        .map(|x| (u16::from_be_bytes([x.2[0], x.2[1]]), x.2[2..].to_vec()))
        .collect();
    assert_eq!(r.last().unwrap().1, REP_ACK);
    let get = |t: u16| infos.iter().find(|i| i.0 == t).map(|i| i.1.clone());
    let export = get(INFO_EXPORT).unwrap();
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), 8 << 20);
    assert_eq!(get(INFO_NAME).unwrap(), b"vm");
    assert_eq!(get(INFO_DESCRIPTION).unwrap(), b"test disk vm");
    let bs = get(INFO_BLOCK_SIZE).unwrap();
    let words: Vec<u32> = bs
        .chunks(4)
        .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
        .collect();
    assert_eq!(words, vec![1, 65536, 32 << 20]);

    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    let list = |c: &mut RawClient, opt: u32, queries: &[&str]| -> Vec<(u32, u32, Vec<u8>)> {
        c.option(opt, &RawClient::meta_payload("vm", queries));
        c.replies()
    };
    // Listing: no query and "base:" list base:allocation; other namespaces nothing.
    for q in [&[][..], &["base:"][..], &["base:allocation", "qemu:x"][..]] {
        let r = list(&mut c, OPT_LIST_META_CONTEXT, q);
        assert_eq!(r.len(), 2, "{q:?}: {r:?}");
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[4..], b"base:allocation");
    }
    let r = list(&mut c, OPT_LIST_META_CONTEXT, &["qemu:allocation-depth"]);
    assert_eq!(r.len(), 1);
    // Setting: no query and "base:" select nothing.
    for q in [&[][..], &["base:"][..], &["x-other:thing"][..]] {
        let r = list(&mut c, OPT_SET_META_CONTEXT, q);
        assert_eq!(r.len(), 1, "{q:?}: {r:?}");
        assert_eq!(r[0].1, REP_ACK);
    }
    // So block status is refused in transmission.
    c.option(OPT_GO, &RawClient::go_payload("vm", &[]));
    assert_eq!(c.replies().last().unwrap().1, REP_ACK);
    c.request(0, CMD_BLOCK_STATUS, 5, 0, 4096);
    assert_eq!(c.any_reply(), (5, EINVAL));

    // A context selected for one export does not carry over to another.
    let mut c = RawClient::handshake(srv.port);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    c.reply();
    c.option(
        OPT_SET_META_CONTEXT,
        &RawClient::meta_payload("ro", &["base:allocation"]),
    );
    assert_eq!(c.replies().len(), 2);
    c.option(OPT_GO, &RawClient::go_payload("vm", &[]));
    c.replies();
    c.request(0, CMD_BLOCK_STATUS, 6, 0, 4096);
    assert_eq!(c.any_reply(), (6, EINVAL));
}

#[test]
fn export_name_ends_negotiation_old_style() {
    let (srv, _) = server();
    for (flags, tail) in [(3u32, 0usize), (1, 124)] {
        let mut c = RawClient::connect(srv.port);
        c.send(&flags.to_be_bytes());
        c.option(OPT_EXPORT_NAME, b"vm");
        let r = c.read_n(10 + tail);
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 8 << 20);
        assert!(r[10..].iter().all(|&b| b == 0));
        c.request(0, CMD_READ, 1, 0, 16);
        let (cookie, err, data) = c.simple_reply(16);
        assert_eq!((cookie, err), (1, 0));
        assert_eq!(data, pattern(16, 1));
    }
    // An unknown name cannot be refused with an error: the server hangs up.
    let mut c = RawClient::handshake(srv.port);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed());
    // ABORT is acknowledged, then the connection closes.
    let mut c = RawClient::handshake(srv.port);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    assert!(c.is_closed());
}

#[test]
fn transmission_errors_keep_the_stream_in_sync() {
    let (srv, disk) = server();
    let original = disk.contents();
    let mut c = RawClient::handshake(srv.port);
    c.go("vm", false);
    let size = 8u64 << 20;
    c.request(0, 42, 1, 0, 0);
    assert_eq!(c.simple_reply(0).1, EINVAL, "unknown command");
    c.request(0, CMD_READ, 2, size - 10, 11);
    assert_eq!(c.simple_reply(0).1, EINVAL, "read past the end");
    c.request(0, CMD_READ, 3, u64::MAX - 5, 100);
    assert_eq!(c.simple_reply(0).1, EINVAL, "offset overflow");
    c.request(0, CMD_READ, 4, 0, MAX_PAYLOAD + 1);
    assert_eq!(c.simple_reply(0).1, EINVAL, "read longer than the maximum");
    c.request(CMD_FLAG_REQ_ONE, CMD_READ, 5, 0, 10);
    assert_eq!(c.simple_reply(0).1, EINVAL, "flag not valid for read");
    c.request(CMD_FLAG_DF, CMD_READ, 6, 0, 10);
    assert_eq!(c.simple_reply(0).1, EINVAL, "DF without structured replies");
    c.request(0, CMD_BLOCK_STATUS, 7, 0, 10);
    assert_eq!(c.simple_reply(0).1, EINVAL, "block status without contexts");
    // A write past the end is refused, but its payload is consumed...
    c.request(0, CMD_WRITE, 8, size - 2, 4);
    c.send(b"ABCD");
    assert_eq!(c.simple_reply(0).1, ENOSPC);
    // ...as is the payload of a write with bad flags.
    c.request(CMD_FLAG_DF, CMD_WRITE, 9, 0, 3);
    c.send(b"xyz");
    assert_eq!(c.simple_reply(0).1, EINVAL);
    c.request(0, CMD_WRITE_ZEROES, 10, size, 1);
    assert_eq!(c.simple_reply(0).1, ENOSPC);
    c.request(0, CMD_TRIM, 11, size, 1);
    assert_eq!(c.simple_reply(0).1, EINVAL);
    c.request(0, CMD_CACHE, 12, size - 1, 2);
    assert_eq!(c.simple_reply(0).1, EINVAL);
    // Zero-length requests are harmless.
    c.request(0, CMD_READ, 13, 0, 0);
    assert_eq!(c.simple_reply(0), (13, 0, vec![]));
    c.request(0, CMD_WRITE, 14, 0, 0);
    assert_eq!(c.simple_reply(0), (14, 0, vec![]));
    // The stream is still in sync: a real read returns the right bytes.
    c.request(0, CMD_READ, 15, 0, 100);
    assert_eq!(c.simple_reply(100), (15, 0, pattern(100, 1)));
    assert_eq!(disk.contents(), original, "refused writes changed nothing");

    // A read-only export: writes get EPERM (payload consumed), reads work.
    let mut c = RawClient::handshake(srv.port);
    let (_, flags) = c.go("ro", true);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    c.request(0, CMD_WRITE, 1, 0, 5);
    c.send(b"hello");
    assert_eq!(c.any_reply(), (1, EPERM));
    c.request(0, CMD_TRIM, 2, 0, 4096);
    assert_eq!(c.any_reply(), (2, EPERM));
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096);
    assert_eq!(c.any_reply(), (3, EPERM));
    c.request(0, CMD_FLUSH, 4, 0, 0);
    assert_eq!(c.any_reply(), (4, 0));
    // With structured replies a failed read is an error chunk, never a simple reply.
    c.request(0, CMD_READ, 5, 1 << 20, 1);
    let (cookie, err, _, types) = c.structured_read(1 << 20, 1);
    assert_eq!((cookie, err), (5, EINVAL));
    assert_eq!(types, vec![REPLY_TYPE_ERROR]);
    c.request(0, CMD_READ, 6, 0, 0);
    let (_, err, _, types) = c.structured_read(0, 0);
    assert_eq!((err, types), (0, vec![REPLY_TYPE_NONE]));
    c.request(0, CMD_READ, 7, 0, 8192);
    let (_, err, data, types) = c.structured_read(0, 8192);
    assert_eq!((err, types), (0, vec![REPLY_TYPE_OFFSET_HOLE]));
    assert_eq!(data, vec![0; 8192]);
}

#[test]
fn fatal_requests_disconnect_only_that_client() {
    let (srv, disk) = server();
    // A bystander in transmission throughout.
    let mut bystander = RawClient::handshake(srv.port);
    bystander.go("vm", false);

    let mut c = RawClient::handshake(srv.port);
    c.go("vm", false);
    c.request(0, CMD_WRITE, 1, 0, MAX_PAYLOAD + 1);
    assert!(c.is_closed(), "write longer than the maximum");

    let mut c = RawClient::handshake(srv.port);
    c.go("vm", true);
    let mut bad = encode_request(0, CMD_READ, 1, 0, 10);
    bad[3] ^= 0x40;
    c.send(&bad);
    assert!(c.is_closed(), "bad request magic");

    // A request cut off half way: header, then payload.
    let mut c = RawClient::handshake(srv.port);
    c.go("vm", false);
    c.send(&encode_request(0, CMD_READ, 1, 0, 10)[..13]);
    drop(c);
    let mut c = RawClient::handshake(srv.port);
    c.go("vm", false);
    c.request(0, CMD_WRITE, 1, 0, 4096);
    c.send(&[0x66; 1000]);
    drop(c);
    // Cut off during negotiation, inside an option.
    let mut c = RawClient::handshake(srv.port);
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);

    bystander.request(0, CMD_READ, 77, 0, 64);
    assert_eq!(bystander.simple_reply(64), (77, 0, pattern(64, 1)));
    bystander.request(0, CMD_DISC, 78, 0, 0);
    assert!(bystander.is_closed());
    srv.wait_idle();
    // The half-sent write never reached the disk.
    assert_eq!(disk.contents()[..10], pattern(10, 1)[..]);
    check_healthy(srv.port, "vm");
}

/// Send `n` reads of `len` bytes without reading a single reply; wait until the
/// server stops taking requests off the socket; check others are served meanwhile;
/// then read every reply.
fn flood(srv: &TestServer, n: u64, len: u32) -> u64 {
    let mut c = RawClient::handshake(srv.port);
    c.go("vm", false);
    let before = srv.server.stats().requests;
    let mut w = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut buf = Vec::with_capacity(n as usize * 28);
        for i in 0..n {
            buf.extend_from_slice(&encode_request(0, CMD_READ, i, (i % 64) * 65536, len));
        }
        w.write_all(&buf)
    });
    // Wait until the count of requests taken stops moving (or all were taken, which
    // would be the failure this test looks for).
    let start = Instant::now();
    let mut last = 0;
    let mut still = 0;
    while still < 20 && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(50));
        let now = srv.server.stats().requests - before;
        if now == last && now > 0 {
            still += 1;
        } else {
            still = 0;
            last = now;
        }
    }
    // Meanwhile, everyone else is served.
    check_healthy(srv.port, "vm");
    let taken = last;

    // Now read everything: every cookie once, with the right data.
    let expected: Vec<Vec<u8>> = {
        let d = srv_disk_contents(srv);
        (0..64)
            .map(|k| d[k * 65536..k * 65536 + len as usize].to_vec())
            .collect()
    };
    let mut seen = HashSet::new();
    for _ in 0..n {
        let (cookie, err, data) = c.simple_reply(len as usize);
        assert_eq!(err, 0);
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
        assert!(
            data == expected[(cookie % 64) as usize],
            "wrong data for {cookie}"
        );
    }
    assert_eq!(seen.len() as u64, n);
    writer.join().unwrap().unwrap();
    c.request(0, CMD_DISC, 0, 0, 0);
    assert!(c.is_closed());
    eprintln!("{n} reads of {len} bytes: the server took {taken} before replies were read");
    taken
}

fn srv_disk_contents(srv: &TestServer) -> Vec<u8> {
    // Read the disk through a fresh connection rather than keeping a handle.
    let mut c = RawClient::handshake(srv.port);
    c.go("vm", false);
    let mut out = Vec::new();
    for k in 0..8u64 {
        c.request(0, CMD_READ, k, k << 20, 1 << 20);
        out.extend(c.simple_reply(1 << 20).2);
    }
    out
}

#[test]
fn flood_of_pipelined_reads_is_throttled() {
    let (srv, _) = server();
    let taken = flood(&srv, 10_000, 32 * 1024);
    // The server holds at most 128 requests in flight; the rest it took only as the
    // kernel's socket buffers absorbed replies. Far from all 10,000 (and far from the
    // 312 MiB of replies they add up to).
    assert!(taken >= 129, "{taken}");
    assert!(
        taken < 2_000,
        "server took {taken} requests without replies being read"
    );
}

#[test]
fn bytes_in_flight_are_bounded_too() {
    let disk = sample_disk();
    let config = ServerConfig {
        max_in_flight_requests: 1_000_000,
        max_in_flight_bytes: 0, // raised to the minimum: one maximum-size request
        ..ServerConfig::default()
    };
    let srv = TestServer::start(exports_of(&[("vm", disk)]), config);
    let taken = flood(&srv, 150, 1 << 20);
    // 32 MiB of budget is 32 reads of 1 MiB, plus what the kernel buffers.
    assert!(taken >= 32, "{taken}");
    assert!(taken < 100, "server took {taken} reads of 1 MiB at once");
}

#[test]
fn connection_limit_and_handshake_timeout() {
    let disk = sample_disk();
    let config = ServerConfig {
        max_connections: 2,
        handshake_timeout: Some(Duration::from_secs(1)),
        ..ServerConfig::default()
    };
    let srv = TestServer::start(exports_of(&[("vm", disk)]), config);
    let mut a = RawClient::handshake(srv.port);
    a.go("vm", false);
    let _b = RawClient::connect(srv.port);
    // The third is closed at once, before any greeting.
    let mut third = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    third.set_read_timeout(Some(LIMIT)).unwrap();
    let mut buf = [0u8; 18];
    assert_eq!(io::Read::read(&mut third, &mut buf).unwrap_or(0), 0);
    assert!(srv.server.stats().refused >= 1);
    // The idle one in negotiation is dropped after the handshake timeout; the one in
    // transmission stays.
    let mut b = _b;
    assert!(b.is_closed());
    a.request(0, CMD_READ, 1, 0, 8);
    assert_eq!(a.simple_reply(8), (1, 0, pattern(8, 1)));
}

/// A disk that fails: reads at 0 panic, reads at 4096 fail with EIO, extents fail.
struct Faulty(MemDisk);

impl Disk for Faulty {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match offset {
            0 => panic!("simulated bug in a disk"),
            4096 => Err(io::Error::other("simulated I/O error")),
            _ => self.0.read_at(buf, offset),
        }
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if offset == 8192 {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "full"));
        }
        self.0.write_at(data, offset, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.0.write_zeroes(offset, len, may_trim, fua)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.0.trim(offset, len, fua)
    }
    fn flush(&self) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "no flush"))
    }
    fn extents(&self, _offset: u64, _len: u64) -> io::Result<Vec<DiskExtent>> {
        Err(io::Error::other("no extents"))
    }
}

#[test]
fn disk_errors_and_panics_become_error_replies() {
    let mut exports = StaticExports::new();
    exports.add(
        "bad",
        Arc::new(Faulty(MemDisk::new(1 << 20, 4096))) as Arc<dyn Disk>,
        "",
    );
    exports.add("vm", sample_disk() as Arc<dyn Disk>, "");
    let srv = TestServer::start(exports, ServerConfig::default());
    for structured in [false, true] {
        let mut c = RawClient::handshake(srv.port);
        c.go("bad", structured);
        let read = |c: &mut RawClient, cookie: u64, off: u64| -> u32 {
            c.request(0, CMD_READ, cookie, off, 512);
            if structured {
                c.structured_read(off, 512).1
            } else {
                c.simple_reply(512).1
            }
        };
        assert_eq!(read(&mut c, 1, 0), EIO, "panic");
        assert_eq!(read(&mut c, 2, 4096), EIO);
        assert_eq!(read(&mut c, 3, 65536), 0, "extents failing: read as data");
        c.request(0, CMD_WRITE, 4, 8192, 4);
        c.send(b"abcd");
        assert_eq!(c.any_reply(), (4, ENOSPC));
        c.request(0, CMD_FLUSH, 5, 0, 0);
        assert_eq!(c.any_reply(), (5, ENOTSUP));
        if structured {
            c.request(0, CMD_BLOCK_STATUS, 6, 0, 4096);
            assert_eq!(c.any_reply(), (6, EIO));
        }
    }
    check_healthy(srv.port, "vm");
}

#[test]
fn graceful_shutdown_answers_what_it_took_then_closes() {
    let (srv, _) = server();
    let mut idle = RawClient::handshake(srv.port);
    let mut c = RawClient::handshake(srv.port);
    c.go("vm", false);
    for i in 0..20 {
        c.request(0, CMD_READ, i, 0, 4096);
    }
    // The first reply proves requests are being taken.
    let (cookie, err, data) = c.simple_reply(4096);
    assert_eq!((err, data), (0, pattern(4096, 1)));
    let mut seen = HashSet::from([cookie]);
    srv.server.shutdown();
    assert!(srv.server.is_shutting_down());
    // Every reply that comes is whole and right; then the connection closes.
    c.s.set_read_timeout(Some(LIMIT)).unwrap();
    loop {
        let mut magic = [0u8; 4];
        match io::Read::read_exact(&mut c.s, &mut magic) {
            Ok(()) => {}
            Err(_) => break,
        }
        let rest = c.read_n(12);
        assert_eq!(u32::from_be_bytes(magic), SIMPLE_REPLY_MAGIC);
        assert_eq!(&rest[..4], &[0, 0, 0, 0]);
        let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
        assert!(seen.insert(cookie));
        assert_eq!(c.read_n(4096), pattern(4096, 1));
    }
    assert!(idle.is_closed(), "a client in negotiation is closed");
    srv.wait_idle();
    // No new connections are taken.
    match std::net::TcpStream::connect(("127.0.0.1", srv.port)) {
        Err(_) => {}
        Ok(mut s) => {
            s.set_read_timeout(Some(LIMIT)).unwrap();
            let mut buf = [0u8; 1];
            assert_eq!(io::Read::read(&mut s, &mut buf).unwrap_or(0), 0);
        }
    }
}

#[test]
fn listeners_from_inherited_descriptors() {
    // What systemd socket activation hands over: listening sockets as raw fds.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let unix = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fds = vec![tcp.into_raw_fd(), unix.into_raw_fd()];

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut exports = StaticExports::new();
    exports.add("vm", sample_disk() as Arc<dyn Disk>, "");
    let server = strata_nbd::Server::new(Arc::new(exports), ServerConfig::default()).unwrap();
    let listeners = rt.block_on(async {
        // SAFETY: the descriptors were just released by their owners above.
        unsafe { strata_nbd::listeners_from_fds(fds) }.unwrap()
    });
    assert!(matches!(listeners[0], Listener::Tcp(_)));
    assert!(matches!(listeners[1], Listener::Unix(_)));
    assert!(listeners[1].describe().contains("activated.sock"));
    let s = server.clone();
    let serving = rt.spawn(async move { s.serve_all(listeners).await });
    check_healthy(port, "vm");
    let out = run_ok(
        "qemu-img",
        &[
            "info",
            "--output=json",
            &format!("nbd+unix:///vm?socket={}", sock.display()),
        ],
    );
    assert!(out.contains("\"virtual-size\": 8388608"), "{out}");
    server.shutdown();
    rt.block_on(async {
        tokio::time::timeout(LIMIT, serving)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        tokio::time::timeout(LIMIT, server.wait_idle())
            .await
            .unwrap();
    });

    // A socket that is not listening is refused.
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = a.into_raw_fd();
    let r = rt.block_on(async { unsafe { strata_nbd::listeners_from_fds([fd]) } });
    assert!(r.is_err());
    // SAFETY: refused, so still ours to close.
    drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });

    // The environment: only for this process, only sane counts.
    use strata_nbd::parse_listen_env as p;
    assert_eq!(p(Some("42"), Some("2"), 42), 3..5);
    assert!(p(Some("41"), Some("2"), 42).is_empty());
    assert!(p(None, Some("2"), 42).is_empty());
    assert!(p(Some("42"), Some("-1"), 42).is_empty());
    assert!(p(Some("42"), Some("x"), 42).is_empty());
    // Not socket-activated: nothing.
    if std::env::var_os("LISTEN_PID").is_none() {
        let l = rt
            .block_on(async { strata_nbd::systemd_listeners() })
            .unwrap();
        assert!(l.is_empty());
    }
}
