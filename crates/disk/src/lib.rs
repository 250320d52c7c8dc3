//! # strata-disk: disk image formats behind one small trait
//!
//! Strata reads disk images that operators already have (raw files, qcow2 chains,
//! and through `qemu-img` also vmdk, vhdx, vdi and vpc) and writes raw or qcow2
//! images back out. Every format lives in its own module behind two small traits:
//!
//! * [`DiskImage`] — a read-only, thread-safe view of the *guest-visible* content of
//!   an image: its virtual size, `read_at`, and an allocation map ([`Extent`]s) that
//!   says which ranges hold data, which read as explicit zeros and which were never
//!   written. Importers use the map to skip holes without reading them.
//! * [`ImageWriter`] — a sequential sink that receives data and zero ranges in
//!   ascending order and produces a sparse file of one format.
//!
//! The format modules never touch the store; the store never parses a format. That
//! keeps each parser small enough to fuzz on its own (see `fuzz/`).

pub mod detect;
pub mod qcow2;
pub mod qcow2_writer;
pub mod qemu_img;
pub mod raw;

use std::path::{Path, PathBuf};

pub use detect::{detect_format, Format};

/// What a range of an image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated data (may still happen to contain zero bytes).
    Data,
    /// Explicitly zero: allocated-as-zero (qcow2 zero clusters, raw preallocated zeros
    /// reported by the file system as data are *not* this; they are `Data`).
    Zero,
    /// Never written: a hole in a raw file, an unallocated qcow2 cluster with no backing.
    /// Reads as zeros.
    Unallocated,
}

/// A contiguous range of an image with one [`ExtentKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

/// Errors of the format layer. Messages name the file and say what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid {format} image: {reason}")]
    Malformed {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("{path}: unsupported {format} feature: {feature}")]
    Unsupported {
        path: PathBuf,
        format: &'static str,
        feature: String,
    },
    #[error("{path}: backing file {backing}: {reason}")]
    Backing {
        path: PathBuf,
        backing: String,
        reason: String,
    },
    #[error("{path}: read of {len} bytes at offset {offset} is past the end of the image ({size} bytes)")]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("qemu-img failed on {path}: {reason}")]
    QemuImg { path: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, DiskError>;

/// Read-only, guest-visible view of a disk image. Implementations are `Sync`, so an
/// importer may read several ranges from several threads at once (positional reads).
pub trait DiskImage: Send + Sync {
    /// The format this image was opened as.
    fn format(&self) -> Format;
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;
    /// Fill `buf` with guest-visible bytes starting at `offset`. Unallocated and zero
    /// ranges read as zeros; ranges served by a backing file read the backing file.
    /// `offset + buf.len()` must not exceed [`DiskImage::virtual_size`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Allocation map of `[offset, offset + len)`: extents in ascending order, covering
    /// the range exactly (clipped to the virtual size), adjacent extents of the same
    /// kind merged. A range served by a backing file reports the backing file's kind.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;
}

impl std::fmt::Debug for dyn DiskImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskImage")
            .field("format", &self.format())
            .field("virtual_size", &self.virtual_size())
            .finish()
    }
}

/// Options for opening an image.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Format to open as; `None` detects it from the content.
    pub format: Option<Format>,
    /// How many backing files deep a qcow2 chain may go before it is refused.
    pub max_backing_depth: usize,
    /// Directory for temporary files (conversions through qemu-img).
    pub temp_dir: Option<PathBuf>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            max_backing_depth: 16,
            temp_dir: None,
        }
    }
}

/// Open `path` as a disk image: detect (or take) the format and return its reader.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn DiskImage>> {
    let format = match opts.format {
        Some(f) => f,
        None => detect_format(path)?,
    };
    match format {
        Format::Raw => Ok(Box::new(raw::RawImage::open(path)?)),
        Format::Qcow2 => Ok(Box::new(qcow2::Qcow2Image::open(path, opts)?)),
        other => Ok(Box::new(qemu_img::ConvertedImage::open(path, other, opts)?)),
    }
}

/// A sink for an image being written: ranges arrive in ascending, non-overlapping
/// order; ranges never mentioned stay unallocated.
pub trait ImageWriter {
    /// Write `data` at guest `offset` (aligned to the writer's cluster size).
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// Mark `[offset, offset + len)` as explicit zeros (aligned to the cluster size).
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Flush metadata, fsync and close. Nothing is complete until this returns.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// Create a writer for `format` at `path` (the file must not exist).
pub fn create(
    path: &Path,
    format: Format,
    virtual_size: u64,
    block_size: u32,
) -> Result<Box<dyn ImageWriter>> {
    match format {
        Format::Raw => Ok(Box::new(raw::RawWriter::create(path, virtual_size)?)),
        Format::Qcow2 => Ok(Box::new(qcow2_writer::Qcow2Writer::create(
            path,
            virtual_size,
            block_size,
        )?)),
        other => Err(DiskError::Unsupported {
            path: path.to_path_buf(),
            format: other.name(),
            feature: "writing this format (export to raw or qcow2)".into(),
        }),
    }
}

/// `OutOfRange` unless `[offset, offset + len)` lies within `size` bytes.
pub(crate) fn check_read_range(path: &Path, len: usize, offset: u64, size: u64) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len: len as u64,
            size,
        }),
    }
}

/// `[offset, offset + len)` clipped to `size` as `(start, end)`; `None` if empty.
pub(crate) fn clip_range(offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
    let end = offset.saturating_add(len).min(size);
    (offset < end).then_some((offset, end))
}

/// Append an extent, merging it into the previous one when they touch and agree.
pub(crate) fn push_extent(out: &mut Vec<Extent>, offset: u64, len: u64, kind: ExtentKind) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.kind == kind && last.offset + last.len == offset {
            last.len += len;
            return;
        }
    }
    out.push(Extent { offset, len, kind });
}
