//! [`Disk`]: the byte-addressed, writable view that servers (NBD today, points next)
//! export. Every layer of the block layer that a client can attach to implements it.

use std::io;

/// Allocation state of a range, as NBD's `base:allocation` context reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskExtent {
    pub len: u64,
    /// No data is allocated here (reads as zeros; a client may skip it).
    pub hole: bool,
    /// Reads as zeros.
    pub zero: bool,
}

/// A disk served to clients. Implementations are thread-safe: requests from several
/// connections arrive at once, and a write acknowledged on one is visible to reads on
/// all. Errors are `io::Error`s whose kind maps onto the protocol's error codes
/// (`InvalidInput` → EINVAL, `PermissionDenied`/`ReadOnlyFilesystem` → EPERM,
/// `StorageFull` → ENOSPC, `Unsupported` → ENOTSUP, anything else → EIO).
pub trait Disk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// The granularity at which the disk works best (advertised as preferred block size).
    fn block_size(&self) -> u32;
    /// Writes, trims and zeroing are refused.
    fn read_only(&self) -> bool;
    /// Fill `buf` from `offset`; the range lies inside the disk.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `data` at `offset`. With `fua`, it is durable before this returns.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Make `[offset, offset + len)` read as zeros; `may_trim` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;
    /// The client no longer needs this range; it may read back as anything (we make it
    /// read as zeros or the base, never as garbage).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Make every write acknowledged so far durable.
    fn flush(&self) -> io::Result<()>;
    /// A hint that `[offset, offset + len)` will be read soon.
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Whether zeroing is cheap (no data written), for NBD's FAST_ZERO.
    fn fast_zero(&self) -> bool {
        true
    }
    /// Allocation map of `[offset, offset + len)`, in order, covering at least the
    /// first byte (it may stop early; the caller asks again for the rest).
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<DiskExtent>>;

    /// [`read_at`](Self::read_at), but only if it can be done at once: from memory or
    /// the page cache, without waiting for a device, a contended lock or decoding.
    /// `None` means "not at once" (the contents of `buf` are then unspecified) and the
    /// caller calls `read_at` from a thread that may block. Lets a server answer hot
    /// reads on its event loop instead of handing each one to another thread.
    fn try_read_at(&self, _buf: &mut [u8], _offset: u64) -> Option<io::Result<()>> {
        None
    }

    /// [`extents`](Self::extents), but only if it can be answered at once (as
    /// [`try_read_at`](Self::try_read_at)).
    fn try_extents(&self, _offset: u64, _len: u64) -> Option<io::Result<Vec<DiskExtent>>> {
        None
    }
}
