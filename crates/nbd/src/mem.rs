//! [`MemDisk`]: a sparse in-memory [`Disk`], for tests and examples.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use strata_block::{Disk, DiskExtent};

/// A disk held in memory, allocated in granules: a granule never written (or trimmed,
/// or zeroed with trimming allowed) is a hole that reads as zeros, so block status has
/// something to report.
pub struct MemDisk {
    state: RwLock<State>,
    size: u64,
    granule: u64,
    read_only: bool,
    fast_zero: bool,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
}

struct State {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

impl MemDisk {
    /// An all-hole disk of `size` bytes, allocated in granules of `granule` bytes.
    pub fn new(size: u64, granule: u32) -> MemDisk {
        let granule = granule.max(1) as u64;
        MemDisk {
            state: RwLock::new(State {
                data: vec![0; size as usize],
                allocated: vec![false; size.div_ceil(granule) as usize],
            }),
            size,
            granule,
            read_only: false,
            fast_zero: true,
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
        }
    }

    /// Refuse writes, trims and zeroing.
    pub fn read_only(mut self, read_only: bool) -> MemDisk {
        self.read_only = read_only;
        self
    }

    /// What [`Disk::fast_zero`] reports.
    pub fn with_fast_zero(mut self, fast: bool) -> MemDisk {
        self.fast_zero = fast;
        self
    }

    /// Write `data` at `offset`, whether or not the disk is read-only (to fill it).
    pub fn fill(&self, data: &[u8], offset: u64) {
        self.write_inner(data, offset);
    }

    /// A copy of the whole content.
    pub fn contents(&self) -> Vec<u8> {
        self.state.read().unwrap().data.clone()
    }

    /// Which granules hold data.
    pub fn allocation(&self) -> Vec<bool> {
        self.state.read().unwrap().allocated.clone()
    }

    /// How many times [`Disk::flush`] was called.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// How many writes (of any kind) asked for FUA.
    pub fn fua_writes(&self) -> u64 {
        self.fua_writes.load(Ordering::SeqCst)
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range past the end of the disk",
            )),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(
                io::ErrorKind::ReadOnlyFilesystem,
                "read-only disk",
            ))
        } else {
            Ok(())
        }
    }

    fn write_inner(&self, data: &[u8], offset: u64) {
        if data.is_empty() {
            return;
        }
        let mut s = self.state.write().unwrap();
        let o = offset as usize;
        s.data[o..o + data.len()].copy_from_slice(data);
        let first = offset / self.granule;
        let last = (offset + data.len() as u64 - 1) / self.granule;
        for g in first..=last {
            s.allocated[g as usize] = true;
        }
    }

    /// Zero `[offset, offset + len)`; granules wholly inside become holes when
    /// `deallocate`, else stay as they are (zeroing an allocated granule keeps it
    /// allocated, zeroing part of a hole keeps it a hole).
    fn zero_inner(&self, offset: u64, len: u64, deallocate: bool, provision: bool) {
        if len == 0 {
            return;
        }
        let mut s = self.state.write().unwrap();
        s.data[offset as usize..(offset + len) as usize].fill(0);
        let first = offset / self.granule;
        let last = (offset + len - 1) / self.granule;
        for g in first..=last {
            let start = g * self.granule;
            let end = (start + self.granule).min(self.size);
            let whole = start >= offset && end <= offset + len;
            if whole && deallocate {
                s.allocated[g as usize] = false;
            } else if provision {
                s.allocated[g as usize] = true;
            }
        }
    }
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.granule.min(u32::MAX as u64) as u32
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let s = self.state.read().unwrap();
        buf.copy_from_slice(&s.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check(offset, data.len() as u64)?;
        self.write_inner(data, offset);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        self.zero_inner(offset, len, may_trim, !may_trim);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        // Only whole granules are discarded; the edges keep their content.
        let start = offset.div_ceil(self.granule) * self.granule;
        let end = ((offset + len) / self.granule * self.granule).max(start);
        let end = if offset + len == self.size {
            self.size
        } else {
            end
        };
        if end > start {
            self.zero_inner(start, end - start, true, false);
        }
        if fua {
            self.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn fast_zero(&self) -> bool {
        self.fast_zero
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<DiskExtent>> {
        self.check(offset, len)?;
        let s = self.state.read().unwrap();
        let end = offset + len;
        let mut out: Vec<DiskExtent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let g = pos / self.granule;
            let next = ((g + 1) * self.granule).min(end);
            let hole = !s.allocated[g as usize];
            match out.last_mut() {
                Some(e) if e.hole == hole => e.len += next - pos,
                _ => out.push(DiskExtent {
                    len: next - pos,
                    hole,
                    zero: hole,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_and_data() {
        let d = MemDisk::new(64 * 1024, 4096);
        assert_eq!(
            d.extents(0, 65536).unwrap(),
            vec![DiskExtent {
                len: 65536,
                hole: true,
                zero: true
            }]
        );
        d.write_at(&[1; 10], 5000, false).unwrap();
        let e = d.extents(0, 65536).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!((e[1].len, e[1].hole), (4096, false));
        d.trim(4096, 4096, false).unwrap();
        assert_eq!(d.extents(0, 65536).unwrap().len(), 1);
        let mut buf = [9u8; 10];
        d.read_at(&mut buf, 5000).unwrap();
        assert_eq!(buf, [0; 10]);
        d.write_zeroes(0, 8192, false, false).unwrap();
        assert_eq!(d.allocation()[..3], [true, true, false]);
        assert!(d.read_at(&mut buf, 65530).is_err());
    }
}
