//! Raw images: the guest disk byte for byte, in a regular file or a block device.
//!
//! There is no metadata, so the only interesting part is the allocation map. A
//! sparse raw file's holes were never written and read as zeros; the file system
//! tells us where they are through `lseek(SEEK_DATA / SEEK_HOLE)`, which lets an
//! importer skip terabytes of holes without reading them. Where the file system
//! (or a block device) cannot answer, the whole range is reported as data, which
//! is always correct, only slower.
//!
//! Reads are positional (`pread`), so one `RawImage` serves many threads without
//! a lock. The writer creates a new sparse file: ranges it is told are zero are
//! simply not written, and read back as holes.

use std::fs::{File, Metadata};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{
    check_read_range, clip_range, push_extent, DiskError, DiskImage, Extent, ExtentKind, Format,
    ImageWriter, Result,
};

/// Size of an open file or block device. Block devices report a zero length in
/// their metadata, so their size is found by seeking to the end.
/// Open `path` read-only as an image file (regular file or block device, never a
/// directory) and find its size. Every format opens its file through here.
pub(crate) fn open_image_file(path: &Path) -> Result<(File, u64)> {
    let io_err = |source: io::Error| DiskError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if meta.is_dir() {
        return Err(io_err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "is a directory, not a disk image",
        )));
    }
    let size = file_size(&file, &meta).map_err(io_err)?;
    Ok((file, size))
}

pub(crate) fn file_size(file: &File, meta: &Metadata) -> io::Result<u64> {
    if meta.file_type().is_block_device() {
        let mut f = file;
        f.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

/// Read exactly `buf.len()` bytes at `offset`, naming `path` on failure.
pub(crate) fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(|source| DiskError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(
                source.kind(),
                format!("reading {} bytes at offset {offset}: {source}", buf.len()),
            ),
        })
}

/// A raw image file or block device opened read-only.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawImage {
    /// Open `path` read-only. Regular files and block devices are accepted.
    pub fn open(path: &Path) -> Result<RawImage> {
        let (file, size) = open_image_file(path)?;
        Ok(RawImage {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// The path this image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One `lseek` with `whence`; `Ok(None)` for ENXIO (no data / hole at or
    /// after `offset` before the end of the file).
    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: lseek on a file descriptor we own; it only moves the file position,
        // which nothing else uses (all reads are positional).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(err);
        }
        Ok(Some(r as u64))
    }

    /// Allocation map from SEEK_DATA/SEEK_HOLE, or `None` where unsupported.
    fn sparse_map(&self, start: u64, end: u64) -> Option<Vec<Extent>> {
        let mut out = Vec::new();
        let mut pos = start;
        while pos < end {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(Some(d)) if d >= pos => d.min(end),
                Ok(Some(_)) => return None, // nonsensical answer: do not trust it
                Ok(None) => end,            // only a hole from here to EOF
                Err(_) => return None,      // EINVAL/EOPNOTSUPP: no sparse support
            };
            if data > pos {
                push_extent(&mut out, pos, data - pos, ExtentKind::Unallocated);
            }
            if data >= end {
                break;
            }
            let hole = match self.seek(data, libc::SEEK_HOLE) {
                Ok(Some(h)) if h > data => h.min(end),
                Ok(Some(_)) => return None,
                Ok(None) => end,
                Err(_) => return None,
            };
            push_extent(&mut out, data, hole - data, ExtentKind::Data);
            pos = hole;
        }
        Some(out)
    }
}

impl DiskImage for RawImage {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_read_range(&self.path, buf.len(), offset, self.size)?;
        read_exact_at(&self.file, &self.path, buf, offset)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let Some((start, end)) = clip_range(offset, len, self.size) else {
            return Ok(Vec::new());
        };
        Ok(self.sparse_map(start, end).unwrap_or_else(|| {
            vec![Extent {
                offset: start,
                len: end - start,
                kind: ExtentKind::Data,
            }]
        }))
    }
}

/// Writes a new sparse raw file. Zero ranges are left as holes.
#[derive(Debug)]
pub struct RawWriter {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawWriter {
    /// Create `path` (which must not exist) as a sparse file of `virtual_size` bytes.
    pub fn create(path: &Path, virtual_size: u64) -> Result<RawWriter> {
        let io_err = |source: io::Error| DiskError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err)?;
        file.set_len(virtual_size).map_err(io_err)?;
        Ok(RawWriter {
            file,
            path: path.to_path_buf(),
            size: virtual_size,
        })
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DiskError::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            }),
        }
    }
}

impl ImageWriter for RawWriter {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|source| DiskError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        // The file is new and was extended with set_len, so the range is already a
        // hole that reads as zeros; writing nothing keeps it sparse.
        self.check(offset, len)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        self.file.sync_all().map_err(|source| DiskError::Io {
            path: self.path.clone(),
            source,
        })
    }
}
