//! [`BlockCache`]: a disposable local copy of a version's *decoded* blocks, so that
//! reading a block a second time is one `pread` from a file the kernel keeps in its
//! page cache — what qemu-nbd or nbdkit do with a raw file — instead of a catalog
//! lookup, a pack read, zstd decompression and a BLAKE3 re-hash.
//!
//! # Layout
//!
//! * **One sparse file per open version**, as long as the version's virtual size;
//!   block `b` lives at byte `b × block_size`. Only blocks holding data are ever
//!   written into it: zero and unwritten blocks never touch it, so its allocated size
//!   is at most the data the clients actually read. The file is created with
//!   `O_TMPFILE` under `STORE/cache/` (a named file unlinked at once where that is not
//!   supported), so it has no name: it is recreated empty whenever a version is
//!   opened, vanishes when the last handle closes, and a crash leaves nothing behind
//!   for gc or verify to trip over (both only look at `packs/`, `tmp/`, `sessions/`).
//! * **Two bitmaps in memory**, with no per-block heap objects: 2 bits of *state* per
//!   block (unknown, zero, present, cached) and 1 *busy* bit per block (a fill is under
//!   way). A 100 GiB image at 64 KiB blocks has 1.6 M blocks: 400 KB + 200 KB.
//!
//! # Rules that keep it correct
//!
//! * A block enters the file only after the store decoded it and checked it against
//!   its id (`Store::read_chunks` re-hashes every chunk), and its state turns to
//!   *cached* only after the whole `pwrite` returned. A reader that sees *cached*
//!   (acquire) therefore reads complete, verified bytes. A corrupt chunk fails the
//!   read and is never written.
//! * States only gain bits (`fetch_or`): unknown → zero, unknown → present →
//!   cached. A version is immutable, so what a block is never changes.
//! * One fill per block at a time: a reader claims a block's busy bit before decoding
//!   it; others that want it wait for the fill (then `pread`) instead of decoding the
//!   same 64 KiB again — sequential 4 KiB readers at queue depth 16 would otherwise
//!   decode each block 16 times. A reader only waits after finishing its own fills,
//!   so two readers never wait on each other.
//! * Space is bounded: filling pauses (the cache serves what it holds; misses are
//!   decoded as before) while the file system's free space is under a reserve — it
//!   is looked at again every [`FULL_RECHECK`] — and stops for good after a write
//!   error. Reads never fail because the cache cannot grow.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What is known of a block (2 bits in [`BlockCache`]'s state map).
pub(crate) const UNKNOWN: u8 = 0;
/// Zero or unwritten: reads as zeros, never cached.
pub(crate) const ZERO: u8 = 1;
/// Holds data, not (yet) in the cache file.
pub(crate) const PRESENT: u8 = 2;
/// Holds data, and the cache file has it.
pub(crate) const CACHED: u8 = 3;

/// Filled bytes between two checks of the file system's free space.
const SPACE_CHECK_BYTES: u64 = 64 << 20;
/// How long filling pauses when the file system is short of space.
const FULL_RECHECK: Duration = Duration::from_secs(10);

/// How versions opened through one [`VersionDisks`](crate::VersionDisks) cache blocks.
#[derive(Clone, Debug)]
pub struct BlockCacheConfig {
    /// Cache decoded blocks in a local file at all.
    pub enabled: bool,
    /// Stop filling when the file system holding the cache has less free space than
    /// this. `None`: 5% of the file system, at least 1 GiB and at most 8 GiB.
    pub min_free_bytes: Option<u64>,
}

impl Default for BlockCacheConfig {
    fn default() -> BlockCacheConfig {
        BlockCacheConfig {
            enabled: true,
            min_free_bytes: None,
        }
    }
}

/// Counters of one version's block cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockCacheStats {
    /// Blocks read from the cache file.
    pub hits: u64,
    /// Blocks decoded from the store and written into the cache file.
    pub fills: u64,
    /// Bytes written into the cache file.
    pub filled_bytes: u64,
    /// Blocks decoded from the store without being cached (the cache is off, full,
    /// or could not be created).
    pub uncached_reads: u64,
    /// Blocks in the cache file now.
    pub cached_blocks: u64,
    /// New blocks are being cached (false while off, short of space, or broken).
    pub filling: bool,
}

pub(crate) struct BlockCache {
    dir: PathBuf,
    size: u64,
    bs: u64,
    /// 2 bits per block, 32 blocks per word.
    states: Box<[AtomicU64]>,
    /// 1 bit per block: a fill is under way.
    busy: Box<[AtomicU64]>,
    /// Created on the first fill; `None` if that failed (then nothing is cached).
    file: OnceLock<Option<File>>,
    /// Off by configuration, or after an error: nothing more is cached.
    filling: AtomicBool,
    /// Short of space: nothing is cached until this time (ms since `born`); 0 = no.
    full_until_ms: AtomicU64,
    born: Instant,
    min_free: Option<u64>,
    /// Waiters for fills by other readers.
    gate: Mutex<()>,
    filled: Condvar,
    since_check: AtomicU64,
    hits: AtomicU64,
    fills: AtomicU64,
    filled_bytes: AtomicU64,
    uncached: AtomicU64,
    cached_blocks: AtomicU64,
}

fn atomics(n: u64) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl BlockCache {
    /// A cache for a version of `size` bytes in blocks of `bs`, its file (made on the
    /// first fill) under `dir`.
    pub(crate) fn new(dir: PathBuf, size: u64, bs: u32, config: &BlockCacheConfig) -> BlockCache {
        let bs = bs as u64;
        let blocks = size.div_ceil(bs);
        BlockCache {
            dir,
            size,
            bs,
            states: atomics(blocks.div_ceil(32)),
            busy: atomics(blocks.div_ceil(64)),
            file: OnceLock::new(),
            filling: AtomicBool::new(config.enabled),
            full_until_ms: AtomicU64::new(0),
            born: Instant::now(),
            min_free: config.min_free_bytes,
            gate: Mutex::new(()),
            filled: Condvar::new(),
            since_check: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            fills: AtomicU64::new(0),
            filled_bytes: AtomicU64::new(0),
            uncached: AtomicU64::new(0),
            cached_blocks: AtomicU64::new(0),
        }
    }

    pub(crate) fn state(&self, b: u64) -> u8 {
        let w = self.states[(b / 32) as usize].load(Ordering::Acquire);
        ((w >> ((b % 32) * 2)) & 3) as u8
    }

    /// Record what block `b` is (states only gain bits: see the module documentation).
    pub(crate) fn mark(&self, b: u64, state: u8) {
        let bit = (state as u64 & 3) << ((b % 32) * 2);
        let w = &self.states[(b / 32) as usize];
        if w.load(Ordering::Relaxed) & bit != bit {
            w.fetch_or(bit, Ordering::AcqRel);
        }
    }

    /// Record blocks `[from, to)` as zero.
    pub(crate) fn mark_zero_run(&self, from: u64, to: u64) {
        let mut b = from;
        while b < to {
            // Whole words at once where the run covers them (0b01 in every pair).
            if b.is_multiple_of(32) && to - b >= 32 {
                let w = &self.states[(b / 32) as usize];
                if w.load(Ordering::Relaxed) != 0x5555_5555_5555_5555 {
                    w.fetch_or(0x5555_5555_5555_5555, Ordering::AcqRel);
                }
                b += 32;
            } else {
                self.mark(b, ZERO);
                b += 1;
            }
        }
    }

    /// Whether new blocks are being written into the cache.
    pub(crate) fn filling(&self) -> bool {
        if !self.filling.load(Ordering::Acquire) {
            return false;
        }
        let until = self.full_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if (self.born.elapsed().as_millis() as u64) < until {
            return false;
        }
        // Time to look again (one reader does; the others go on without the cache).
        let later = self.born.elapsed() + FULL_RECHECK;
        if self
            .full_until_ms
            .compare_exchange(
                until,
                later.as_millis() as u64,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return false;
        }
        if self.room_left() {
            self.full_until_ms.store(0, Ordering::Release);
            true
        } else {
            false
        }
    }

    /// Pause filling for [`FULL_RECHECK`]: the file system is short of space.
    fn pause_full(&self) {
        let until = (self.born.elapsed() + FULL_RECHECK).as_millis() as u64;
        self.full_until_ms.store(until.max(1), Ordering::Release);
    }

    /// Claim block `b` for a fill: false if another reader is filling it.
    pub(crate) fn try_claim(&self, b: u64) -> bool {
        let bit = 1u64 << (b % 64);
        self.busy[(b / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn is_busy(&self, b: u64) -> bool {
        self.busy[(b / 64) as usize].load(Ordering::Acquire) & (1u64 << (b % 64)) != 0
    }

    /// End a claim (filled or not) and wake the readers waiting for it.
    pub(crate) fn release(&self, blocks: &[u64]) {
        for &b in blocks {
            self.busy[(b / 64) as usize].fetch_and(!(1u64 << (b % 64)), Ordering::AcqRel);
        }
        // Taking the lock orders this wake-up after any waiter's check of the bit.
        let _g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        self.filled.notify_all();
    }

    /// Wait until nobody is filling block `b`.
    pub(crate) fn wait(&self, b: u64) {
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        while self.is_busy(b) {
            g = self.filled.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn file(&self) -> Option<&File> {
        self.file
            .get_or_init(|| match create_file(&self.dir, self.size) {
                Ok(f) => Some(f),
                Err(_) => {
                    // Serving goes on without the cache, as before it existed.
                    self.filling.store(false, Ordering::Release);
                    None
                }
            })
            .as_ref()
    }

    /// Write block `b`'s verified bytes into the cache and mark it cached; the caller
    /// holds its claim. False (and nothing marked) if the cache is not filling.
    pub(crate) fn fill(&self, b: u64, data: &[u8]) -> bool {
        if !self.filling() {
            return false;
        }
        let n = data.len().min(self.block_len(b));
        let prev = self.since_check.fetch_add(n as u64, Ordering::Relaxed);
        if (prev == 0 || prev / SPACE_CHECK_BYTES != (prev + n as u64) / SPACE_CHECK_BYTES)
            && !self.room_left()
        {
            self.pause_full();
            return false;
        }
        let Some(file) = self.file() else {
            return false;
        };
        // Bytes past `n` in a short chunk stay a hole: zeros, as they read.
        if let Err(e) = file.write_all_at(&data[..n], b * self.bs) {
            match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => self.pause_full(),
                _ => self.filling.store(false, Ordering::Release),
            }
            return false;
        }
        self.mark(b, CACHED);
        self.fills.fetch_add(1, Ordering::Relaxed);
        self.filled_bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.cached_blocks.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Read `buf.len()` bytes at disk offset `offset`, all inside cached blocks.
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64, blocks: u64) -> io::Result<()> {
        let file = self
            .file
            .get()
            .and_then(Option::as_ref)
            .expect("a block is cached only after the file exists");
        file.read_exact_at(buf, offset)?;
        self.hits.fetch_add(blocks, Ordering::Relaxed);
        Ok(())
    }

    /// [`read`](Self::read), but only if the bytes are in the page cache: false (and
    /// `buf` unspecified) if the read would wait for the device.
    pub(crate) fn read_nowait(&self, buf: &mut [u8], offset: u64, blocks: u64) -> bool {
        let Some(file) = self.file.get().and_then(Option::as_ref) else {
            return false;
        };
        if !pread_nowait(file, buf, offset) {
            return false;
        }
        self.hits.fetch_add(blocks, Ordering::Relaxed);
        true
    }

    pub(crate) fn count_uncached(&self, blocks: u64) {
        self.uncached.fetch_add(blocks, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> BlockCacheStats {
        BlockCacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            fills: self.fills.load(Ordering::Relaxed),
            filled_bytes: self.filled_bytes.load(Ordering::Relaxed),
            uncached_reads: self.uncached.load(Ordering::Relaxed),
            cached_blocks: self.cached_blocks.load(Ordering::Relaxed),
            filling: self.filling(),
        }
    }

    fn block_len(&self, b: u64) -> usize {
        self.bs.min(self.size.saturating_sub(b * self.bs)) as usize
    }

    /// Whether the file system holding the cache has more free space than the reserve.
    fn room_left(&self) -> bool {
        let Some((free, total)) = fs_space(&self.dir) else {
            // Cannot tell (the directory may not exist yet): the fill will find out.
            return true;
        };
        let reserve = self.min_free.unwrap_or_else(|| default_reserve(total));
        free > reserve.saturating_add(SPACE_CHECK_BYTES)
    }
}

/// The space kept free on a file system of `total` bytes unless configured: 5%, at
/// least 1 GiB (a small disk must keep room for the store itself) and at most 8 GiB
/// (5% of a large disk is far more than any store write needs).
fn default_reserve(total: u64) -> u64 {
    (total / 20).clamp(1 << 30, 8 << 30)
}

/// Free and total bytes of the file system holding `dir` (or its nearest existing
/// ancestor).
fn fs_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = dir;
    while !p.exists() {
        p = p.parent()?;
    }
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct we pass; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let frsize = s.f_frsize as u64;
    Some((s.f_bavail as u64 * frsize, s.f_blocks as u64 * frsize))
}

/// Fill `buf` from `file` at `offset` if that needs no I/O (`preadv2` with
/// `RWF_NOWAIT`): false if the data is not all in the page cache, or the file system
/// cannot tell.
pub(crate) fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> bool {
    let mut done = 0usize;
    while done < buf.len() {
        let iov = libc::iovec {
            iov_base: buf[done..].as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len() - done,
        };
        // SAFETY: one iovec over the part of `buf` not yet filled, which outlives the
        // call; the fd is open.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n <= 0 {
            // EAGAIN (not cached), EOPNOTSUPP (no RWF_NOWAIT here), an error, or the
            // end of the file: the blocking path sorts it out.
            return false;
        }
        done += n as usize;
    }
    true
}

/// An unnamed sparse file of `size` bytes in `dir`.
fn create_file(dir: &Path, size: u64) -> io::Result<File> {
    std::fs::create_dir_all(dir)?;
    let f = tempfile::tempfile_in(dir)?;
    f.set_len(size)?;
    // The kernel's read-ahead would pull neighbouring holes and blocks into the page
    // cache for nothing: clients read at random.
    // SAFETY: posix_fadvise only reads its integer arguments; the fd is ours.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_only_gain_bits_and_claims_are_exclusive() {
        let tmp = tempfile::tempdir().unwrap();
        let c = BlockCache::new(
            tmp.path().join("cache"),
            100 * 4096 + 7,
            4096,
            &BlockCacheConfig {
                enabled: true,
                min_free_bytes: Some(0),
            },
        );
        assert_eq!(c.state(0), UNKNOWN);
        c.mark_zero_run(3, 70);
        assert!((3..70).all(|b| c.state(b) == ZERO));
        assert_eq!(c.state(2), UNKNOWN);
        assert_eq!(c.state(70), UNKNOWN);
        c.mark(80, PRESENT);
        assert_eq!(c.state(80), PRESENT);
        assert!(c.try_claim(80));
        assert!(!c.try_claim(80));
        assert!(c.try_claim(81));
        // The short last block: only its bytes are written.
        assert!(c.fill(100, &[9u8; 7]));
        assert!(c.fill(80, &[5u8; 4096]));
        c.release(&[80, 81]);
        c.wait(80);
        assert_eq!(c.state(80), CACHED);
        assert_eq!(c.state(100), CACHED);
        let mut buf = vec![0u8; 4096 + 7];
        c.read(&mut buf[..4096], 80 * 4096, 1).unwrap();
        c.read(&mut buf[4096..], 100 * 4096, 1).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 5));
        assert!(buf[4096..].iter().all(|&x| x == 9));
        let s = c.stats();
        assert_eq!((s.hits, s.fills, s.filled_bytes), (2, 2, 4096 + 7));
        // The file has no name in the cache directory.
        assert_eq!(
            std::fs::read_dir(tmp.path().join("cache")).unwrap().count(),
            0
        );
    }

    #[test]
    fn a_full_file_system_pauses_filling() {
        let tmp = tempfile::tempdir().unwrap();
        let c = BlockCache::new(
            tmp.path().join("cache"),
            4096 * 4,
            4096,
            &BlockCacheConfig {
                enabled: true,
                min_free_bytes: Some(u64::MAX / 2),
            },
        );
        assert!(c.try_claim(0));
        assert!(!c.fill(0, &[1u8; 4096]));
        c.release(&[0]);
        assert_eq!(c.state(0), UNKNOWN);
        assert!(!c.filling());
    }
}
