//! Reads answered on the connection's task ([`Disk::try_read_at`]): they return the
//! same bytes and chunks as reads on blocking threads, fall back to those whenever
//! the disk cannot answer at once, turn panics and errors into error replies, and
//! see every write acknowledged before them, on any connection.

mod common;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use strata_block::{Disk, DiskExtent};
use strata_nbd::mem::MemDisk;
use strata_nbd::proto::*;
use strata_nbd::{ServerConfig, StaticExports};

/// A disk that answers reads at once in its first half only, counting which path
/// served each read; a `try_read_at` at offset 12288 panics, one at 16384 fails.
struct Hot {
    mem: MemDisk,
    now: AtomicU64,
    later: AtomicU64,
    /// `try_extents` answers (else only `extents` does).
    extents_now: AtomicBool,
}

impl Hot {
    fn new() -> Hot {
        let mem = MemDisk::new(4 << 20, 4096);
        mem.fill(&pattern(1 << 20, 5), 0);
        mem.fill(&pattern(1 << 20, 6), 3 << 20);
        Hot {
            mem,
            now: AtomicU64::new(0),
            later: AtomicU64::new(0),
            extents_now: AtomicBool::new(true),
        }
    }
}

impl Disk for Hot {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.later.fetch_add(1, Ordering::SeqCst);
        self.mem.read_at(buf, offset)
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        match offset {
            12288 => panic!("simulated bug in a disk's fast path"),
            16384 => Some(Err(io::Error::other("simulated I/O error"))),
            o if o + buf.len() as u64 <= self.size() / 2 => {
                self.now.fetch_add(1, Ordering::SeqCst);
                Some(self.mem.read_at(buf, offset))
            }
            _ => None,
        }
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.mem.write_at(data, offset, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.mem.write_zeroes(offset, len, may_trim, fua)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.mem.trim(offset, len, fua)
    }
    fn flush(&self) -> io::Result<()> {
        self.mem.flush()
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<DiskExtent>> {
        self.mem.extents(offset, len)
    }
    fn try_extents(&self, offset: u64, len: u64) -> Option<io::Result<Vec<DiskExtent>>> {
        if self.extents_now.load(Ordering::SeqCst) {
            Some(self.mem.extents(offset, len))
        } else {
            None
        }
    }
}

fn serve(disk: Arc<Hot>) -> TestServer {
    let mut exports = StaticExports::new();
    exports.add("hot", disk as Arc<dyn Disk>, "");
    TestServer::start(exports, ServerConfig::default())
}

#[test]
fn fast_and_slow_reads_return_the_same_replies() {
    let disk = Arc::new(Hot::new());
    let srv = serve(disk.clone());
    let expected = disk.mem.contents();
    let mut cookie = 0;
    for structured in [false, true] {
        let mut c = RawClient::handshake(srv.port);
        c.go("hot", structured);
        // First half: at once; second half and big reads: on threads. Reads spanning
        // data and holes (1 MiB..3 MiB is a hole) come back as data + hole chunks.
        for (off, len) in [
            (0u64, 4096usize),
            (1000, 5000),
            ((1 << 20) - 4096, 65536),
            (3 << 20, 4096),
            ((3 << 20) - 8192, 16384),
            (0, 1 << 20),
            (100, 128 << 10),
        ] {
            for extents_now in [true, false] {
                disk.extents_now.store(extents_now, Ordering::SeqCst);
                let (now, later) = (
                    disk.now.load(Ordering::SeqCst),
                    disk.later.load(Ordering::SeqCst),
                );
                cookie += 1;
                c.request(0, CMD_READ, cookie, off, len as u32);
                let (got_cookie, err, data) = if structured {
                    let (ck, err, data, _) = c.structured_read(off, len);
                    (ck, err, data)
                } else {
                    c.simple_reply(len)
                };
                assert_eq!((got_cookie, err), (cookie, 0));
                assert_eq!(
                    data,
                    &expected[off as usize..off as usize + len],
                    "{len} at {off}"
                );
                let fast = off + len as u64 <= disk.size() / 2
                    && len <= 128 << 10
                    && (extents_now || !structured);
                let (now2, later2) = (
                    disk.now.load(Ordering::SeqCst),
                    disk.later.load(Ordering::SeqCst),
                );
                if fast {
                    assert!(
                        now2 > now && later2 == later,
                        "{len} at {off} answered at once"
                    );
                } else {
                    assert!(later2 > later, "{len} at {off} went to a thread");
                }
            }
        }
    }
}

#[test]
fn fast_path_panics_and_errors_become_error_replies() {
    let disk = Arc::new(Hot::new());
    let srv = serve(disk.clone());
    for structured in [false, true] {
        let mut c = RawClient::handshake(srv.port);
        c.go("hot", structured);
        let mut read = |cookie: u64, off: u64| -> u32 {
            c.request(0, CMD_READ, cookie, off, 512);
            if structured {
                c.structured_read(off, 512).1
            } else {
                c.simple_reply(512).1
            }
        };
        assert_eq!(read(1, 12288), EIO, "panic");
        assert_eq!(read(2, 16384), EIO);
        assert_eq!(read(3, 0), 0, "the connection still serves");
    }
}

#[test]
fn fast_reads_see_writes_acknowledged_on_any_connection() {
    let disk = Arc::new(Hot::new());
    let srv = serve(disk.clone());
    let mut w = RawClient::handshake(srv.port);
    w.go("hot", true);
    let mut r = RawClient::handshake(srv.port);
    r.go("hot", true);
    for i in 0..40u64 {
        let off = (i * 7919 * 512) % (disk.size() / 2 - 8192);
        let data = pattern(4096 + (i as usize % 3) * 1000, i);
        w.request(0, CMD_WRITE, i, off, data.len() as u32);
        w.send(&data);
        assert_eq!(w.any_reply(), (i, 0));
        // Pipelined reads of what was just written, on the other connection.
        for k in 0..4 {
            r.request(0, CMD_READ, i * 10 + k, off, data.len() as u32);
        }
        for _ in 0..4 {
            let (_, err, got, _) = r.structured_read(off, data.len());
            assert_eq!(err, 0);
            assert_eq!(got, data);
        }
    }
    assert!(disk.now.load(Ordering::SeqCst) >= 160);
}
