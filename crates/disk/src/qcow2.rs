//! Native qcow2 reader (versions 2 and 3), including backing chains.
//!
//! qcow2 maps guest clusters to host clusters through a two-level table: the L1
//! table (in the header) points to L2 tables of one cluster each, whose entries
//! say, per guest cluster, whether it is unallocated (read the backing file, or
//! zeros), explicitly zero, stored at a host offset, or compressed at a byte
//! offset. With extended L2 entries each cluster is split into 32 subclusters that
//! carry their own allocated/zero bits.
//!
//! Reading natively (instead of converting through `qemu-img`) lets the importer
//! see the allocation map and skip unallocated and zero clusters without reading
//! them, serve reads from several threads, and walk backing chains without any
//! temporary space.
//!
//! Every value taken from the file is checked before it is used: table offsets
//! must be aligned and inside the file, sizes are bounded by qemu's own limits, and
//! no buffer is ever sized from a header field beyond those limits and the file's
//! size. A damaged file yields [`DiskError::Malformed`] with the reason, never a
//! panic. Features we cannot read correctly (encryption, external data files,
//! images flagged corrupt, unknown incompatible bits) yield
//! [`DiskError::Unsupported`].
//!
//! Backing files are opened in the format recorded in the header extension and
//! never probed, because probing would let guest-written bytes in a raw backing
//! file decide how the host parses it.

mod cache;
mod compress;
mod header;

pub use header::{parse_header, CompressionType, FeatureName, Header, HeaderError};

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cache::Lru;
use header::INCOMPAT_DIRTY;

use crate::raw::{read_exact_at, RawImage};
use crate::{
    check_read_range, clip_range, push_extent, DiskError, DiskImage, Extent, ExtentKind, Format,
    OpenOptions, Result,
};

const FORMAT: &str = "qcow2";

/// L1 entry bits 9..=55: offset of the L2 table.
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry bits 9..=55: host cluster offset of a standard cluster.
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_COMPRESSED: u64 = 1 << 62;
const L2E_ZERO: u64 = 1;
const SUBCLUSTERS: u64 = 32;

/// Budget for cached L2 tables (per image in a chain).
const L2_CACHE_BYTES: u64 = 32 << 20;
/// Budget for cached decompressed clusters, for reads smaller than a cluster.
const DECOMPRESSED_CACHE_BYTES: u64 = 8 << 20;

/// Where a run of guest bytes comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Stored uncompressed at this host offset (of the first byte of the run).
    Data(u64),
    /// Reads as zeros without consulting the backing file.
    Zero,
    /// Not allocated here: read from the backing file, or zeros.
    Unallocated,
    /// Compressed cluster: stored bytes at `offset`, at most `len` long.
    Compressed { offset: u64, len: u64 },
}

/// A qcow2 image opened read-only, with its backing chain.
pub struct Qcow2Image {
    path: PathBuf,
    file: File,
    file_size: u64,
    header: Header,
    /// The active L1 table, only the entries that map the virtual size.
    l1: Vec<u64>,
    l2_cache: Lru<Vec<u64>>,
    /// Decompressed clusters keyed by their host offset.
    zcache: Lru<Vec<u8>>,
    backing: Option<Box<dyn DiskImage>>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.path)
            .field("virtual_size", &self.header.size)
            .field("cluster_bits", &self.header.cluster_bits)
            .field("has_backing", &self.backing.is_some())
            .finish()
    }
}

impl Qcow2Image {
    /// Open the qcow2 image at `path` and its backing chain.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Qcow2Image> {
        let mut chain = Vec::new();
        Self::open_in_chain(path, opts, &mut chain)
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&dyn DiskImage> {
        self.backing.as_deref()
    }

    /// Open `path`, where `chain` holds the canonical paths of the images above it
    /// (the top image first).
    fn open_in_chain(path: &Path, opts: &OpenOptions, chain: &mut Vec<PathBuf>) -> Result<Self> {
        let io_err = |source: io::Error| DiskError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (file, file_size) = crate::raw::open_image_file(path)?;
        let malformed = |reason: String| DiskError::Malformed {
            path: path.to_path_buf(),
            format: FORMAT,
            reason,
        };

        // Read the fixed header to learn the cluster size, then the first cluster,
        // which holds the header extensions and the backing file name.
        let first_len = file_size.min(header::V3_MIN_HEADER_LEN as u64 + 8);
        let mut first = vec![0u8; first_len as usize];
        read_exact_at(&file, path, &mut first, 0)?;
        if first.len() >= 24 && &first[0..4] == header::MAGIC {
            let bits = u32::from_be_bytes([first[20], first[21], first[22], first[23]]);
            if (header::MIN_CLUSTER_BITS..=header::MAX_CLUSTER_BITS).contains(&bits) {
                let len = file_size.min(1u64 << bits);
                first = vec![0u8; len as usize];
                read_exact_at(&file, path, &mut first, 0)?;
            }
        }
        let header = parse_header(&first).map_err(|e| match e {
            HeaderError::Malformed(reason) => malformed(reason),
            HeaderError::Unsupported(feature) => DiskError::Unsupported {
                path: path.to_path_buf(),
                format: FORMAT,
                feature,
            },
        })?;
        drop(first);
        if header.incompatible_features & INCOMPAT_DIRTY != 0 {
            // Only refcounts may be stale in a dirty image; the mapping is valid.
            tracing::debug!(path = %path.display(), "qcow2 image has the dirty bit set; reading anyway");
        }

        let l1 = read_l1(&file, path, file_size, &header).map_err(malformed)?;
        let cluster_size = header.cluster_size();
        let l2_cache = Lru::new((L2_CACHE_BYTES / cluster_size) as usize);
        let zcache = Lru::new(((DECOMPRESSED_CACHE_BYTES / cluster_size) as usize).max(2));

        let canonical = std::fs::canonicalize(path).map_err(io_err)?;
        chain.push(canonical);
        let backing = match &header.backing_file {
            Some(name) => Some(open_backing(path, &header, name, opts, chain)?),
            None => None,
        };

        Ok(Qcow2Image {
            path: path.to_path_buf(),
            file,
            file_size,
            header,
            l1,
            l2_cache,
            zcache,
            backing,
        })
    }

    fn malformed(&self, reason: String) -> DiskError {
        DiskError::Malformed {
            path: self.path.clone(),
            format: FORMAT,
            reason,
        }
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The L2 table at host offset `offset` (validated when the L1 table was read),
    /// as raw big-endian-decoded words.
    fn l2_table(&self, offset: u64) -> Result<Arc<Vec<u64>>> {
        self.l2_cache.get_or_load(offset, || {
            let mut bytes = vec![0u8; self.cluster_size() as usize];
            read_exact_at(&self.file, &self.path, &mut bytes, offset)?;
            Ok(bytes
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect())
        })
    }

    /// Walk `[start, end)` (inside the virtual size) and call `f(guest, len, source)`
    /// for maximal runs with one source; consecutive uncompressed runs are merged
    /// when they are also contiguous in the file.
    fn walk(
        &self,
        start: u64,
        end: u64,
        mut f: impl FnMut(u64, u64, Source) -> Result<()>,
    ) -> Result<()> {
        let mut pending: Option<(u64, u64, Source)> = None;
        let mut emit = |guest: u64, len: u64, src: Source| -> Result<()> {
            if let Some((pg, pl, ps)) = &mut pending {
                let merge = match (*ps, src) {
                    (Source::Data(a), Source::Data(b)) => a + *pl == b,
                    (Source::Zero, Source::Zero) => true,
                    (Source::Unallocated, Source::Unallocated) => true,
                    _ => false,
                };
                if merge && *pg + *pl == guest {
                    *pl += len;
                    return Ok(());
                }
                let (g, l, s) = (*pg, *pl, *ps);
                f(g, l, s)?;
            }
            pending = Some((guest, len, src));
            Ok(())
        };

        let cbits = self.header.cluster_bits;
        let csize = self.cluster_size();
        let l2_entries = self.header.l2_entries();
        let l2_span = l2_entries * csize; // guest bytes per L2 table, <= 2^39
        let extended = self.header.extended_l2();
        let mut pos = start;
        while pos < end {
            let l1_index = pos / l2_span;
            let Some(&l1_entry) = self.l1.get(l1_index as usize) else {
                return Err(self.malformed(format!("no L1 entry for guest offset {pos}")));
            };
            let span_end = ((l1_index + 1) * l2_span).min(end);
            let l2_offset = l1_entry & L1E_OFFSET_MASK;
            if l2_offset == 0 {
                emit(pos, span_end - pos, Source::Unallocated)?;
                pos = span_end;
                continue;
            }
            let table = self.l2_table(l2_offset)?;
            while pos < span_end {
                let cluster = pos >> cbits;
                let cluster_start = cluster << cbits;
                let cluster_end = (cluster_start + csize).min(span_end);
                let index = (cluster % l2_entries) as usize;
                if extended {
                    let (Some(&word), Some(&bitmap)) =
                        (table.get(2 * index), table.get(2 * index + 1))
                    else {
                        return Err(self.malformed(format!("L2 index {index} out of range")));
                    };
                    self.walk_extended(word, bitmap, cluster_start, pos, cluster_end, &mut emit)?;
                } else {
                    let Some(&word) = table.get(index) else {
                        return Err(self.malformed(format!("L2 index {index} out of range")));
                    };
                    let src = self.decode_standard(word, cluster_start)?;
                    let src = match src {
                        Source::Data(host) => Source::Data(host + (pos - cluster_start)),
                        other => other,
                    };
                    emit(pos, cluster_end - pos, src)?;
                }
                pos = cluster_end;
            }
        }
        if let Some((g, l, s)) = pending {
            f(g, l, s)?;
        }
        Ok(())
    }

    /// Decode a standard L2 entry (or the first word of an extended one) for the
    /// guest cluster starting at `guest`.
    fn decode_standard(&self, word: u64, guest: u64) -> Result<Source> {
        if word & L2E_COMPRESSED != 0 {
            return Ok(self.decode_compressed(word));
        }
        if word & L2E_ZERO != 0 && !self.header.extended_l2() {
            if self.header.version < 3 {
                return Err(self.malformed(format!(
                    "zero cluster flag at guest offset {guest} in a version 2 image"
                )));
            }
            return Ok(Source::Zero);
        }
        let host = word & L2E_OFFSET_MASK;
        if host == 0 {
            return Ok(Source::Unallocated);
        }
        if !host.is_multiple_of(self.cluster_size()) {
            return Err(self.malformed(format!(
                "data cluster for guest offset {guest} at host offset {host:#x} is not cluster-aligned"
            )));
        }
        Ok(Source::Data(host))
    }

    /// Compressed cluster descriptor: the low `x = 62 - (cluster_bits - 8)` bits are
    /// the byte offset, the bits above up to 61 the number of extra 512-byte sectors.
    fn decode_compressed(&self, word: u64) -> Source {
        let cbits = self.header.cluster_bits;
        let x = 62 - (cbits - 8);
        let offset = word & ((1u64 << x) - 1);
        let sectors = ((word >> x) & ((1u64 << (cbits - 8)) - 1)) + 1;
        // The data starts `offset % 512` bytes into its first sector.
        let len = sectors * 512 - (offset & 511);
        Source::Compressed { offset, len }
    }

    /// Emit the runs of one cluster with extended L2 entries, from guest `pos` to
    /// `end` (inside the cluster starting at `cluster_start`).
    fn walk_extended(
        &self,
        word: u64,
        bitmap: u64,
        cluster_start: u64,
        mut pos: u64,
        end: u64,
        emit: &mut impl FnMut(u64, u64, Source) -> Result<()>,
    ) -> Result<()> {
        if word & L2E_COMPRESSED != 0 {
            // Compressed clusters have no subclusters; the bitmap is reserved.
            return emit(pos, end - pos, self.decode_compressed(word));
        }
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(self.malformed(format!(
                "subclusters of guest offset {cluster_start} are both allocated and zero \
                 (bitmap {bitmap:#018x})"
            )));
        }
        let host = word & L2E_OFFSET_MASK;
        if alloc != 0 {
            if host == 0 {
                return Err(self.malformed(format!(
                    "allocated subclusters at guest offset {cluster_start} have no host cluster"
                )));
            }
            if !host.is_multiple_of(self.cluster_size()) {
                return Err(self.malformed(format!(
                    "data cluster for guest offset {cluster_start} at host offset {host:#x} is not cluster-aligned"
                )));
            }
        }
        let sc_size = self.cluster_size() / SUBCLUSTERS;
        while pos < end {
            let sc = (pos - cluster_start) / sc_size;
            let sc_end = (cluster_start + (sc + 1) * sc_size).min(end);
            let src = if alloc & (1 << sc) != 0 {
                Source::Data(host + (pos - cluster_start))
            } else if zero & (1 << sc) != 0 {
                Source::Zero
            } else {
                Source::Unallocated
            };
            emit(pos, sc_end - pos, src)?;
            pos = sc_end;
        }
        Ok(())
    }

    /// The decompressed guest cluster stored at `offset` (at most `len` bytes).
    fn compressed_cluster(&self, offset: u64, len: u64) -> Result<Arc<Vec<u8>>> {
        self.zcache.get_or_load(offset, || {
            let mut out = vec![0u8; self.cluster_size() as usize];
            self.decompress_into(offset, len, &mut out)?;
            Ok(out)
        })
    }

    fn decompress_into(&self, offset: u64, len: u64, out: &mut [u8]) -> Result<()> {
        if offset >= self.file_size {
            return Err(self.malformed(format!(
                "compressed cluster at host offset {offset:#x} is past the end of the file ({} bytes)",
                self.file_size
            )));
        }
        // The last sector of the last compressed cluster may be cut short by EOF.
        let len = len.min(self.file_size - offset);
        let mut input = vec![0u8; len as usize];
        read_exact_at(&self.file, &self.path, &mut input, offset)?;
        compress::decompress(self.header.compression_type, &input, out).map_err(|e| {
            self.malformed(format!(
                "compressed cluster at host offset {offset:#x}: {e}"
            ))
        })
    }

    /// Read `buf.len()` bytes at guest `offset` through the backing file, zeros past
    /// its end or when there is none.
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(backing) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = backing.virtual_size();
        let n = if offset >= bsize {
            0
        } else {
            (bsize - offset).min(buf.len() as u64) as usize
        };
        if n > 0 {
            backing.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }
}

/// Fuzzing entry point: write `bytes` to a temporary file, open it as qcow2 without
/// following any backing file, and read it all (bounded to the first 16 MiB).
/// Errors are expected; panics, hangs and huge allocations are bugs.
#[doc(hidden)]
pub fn fuzz_open_and_read(bytes: &[u8]) {
    use std::io::Write;
    let Ok(mut file) = tempfile::NamedTempFile::new() else {
        return;
    };
    if file.write_all(bytes).is_err() {
        return;
    }
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        max_backing_depth: 0,
        temp_dir: None,
    };
    let Ok(img) = Qcow2Image::open(file.path(), &opts) else {
        return;
    };
    let size = img.virtual_size();
    if img.extents(0, size).is_err() {
        return;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size.min(16 << 20) {
        let n = (size - pos).min(buf.len() as u64) as usize;
        if img.read_at(&mut buf[..n], pos).is_err() {
            return;
        }
        pos += n as u64;
    }
}

/// Read and validate the active L1 table: every L2 offset must be aligned and its
/// whole table inside the file. Only the entries covering the virtual size are
/// kept; the rest (internal snapshot VM state) is never read.
fn read_l1(
    file: &File,
    path: &Path,
    file_size: u64,
    h: &Header,
) -> std::result::Result<Vec<u64>, String> {
    let entries = h.l1_entries_needed();
    if entries == 0 {
        return Ok(Vec::new());
    }
    let bytes_len = entries * 8; // <= MAX_L1_BYTES, checked by parse_header
    let end = h
        .l1_table_offset
        .checked_add(bytes_len)
        .ok_or("L1 table offset overflows")?;
    if end > file_size {
        return Err(format!(
            "L1 table at {:#x} ({} entries) extends past the end of the file ({file_size} bytes); \
             the file is truncated",
            h.l1_table_offset, entries
        ));
    }
    let mut bytes = vec![0u8; bytes_len as usize];
    read_exact_at(file, path, &mut bytes, h.l1_table_offset).map_err(|e| e.to_string())?;
    let csize = h.cluster_size();
    let mut l1 = Vec::with_capacity(entries as usize);
    for (i, c) in bytes.chunks_exact(8).enumerate() {
        let e = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let l2 = e & L1E_OFFSET_MASK;
        if l2 != 0 {
            if !l2.is_multiple_of(csize) {
                return Err(format!(
                    "L1 entry {i}: L2 table offset {l2:#x} is not cluster-aligned"
                ));
            }
            if l2 + csize > file_size {
                return Err(format!(
                    "L1 entry {i}: L2 table at {l2:#x} extends past the end of the file \
                     ({file_size} bytes); the file is truncated"
                ));
            }
        }
        l1.push(e);
    }
    Ok(l1)
}

/// qemu-style filenames that are not local paths.
fn is_protocol_name(name: &str) -> bool {
    if name.starts_with("json:") || name.contains("://") {
        return true;
    }
    // "nbd:host:port", "rbd:pool/img", ...: a prefix before the first ':' that comes
    // before any '/'.
    const PROTOCOLS: &[&str] = &[
        "nbd",
        "rbd",
        "iscsi",
        "ssh",
        "gluster",
        "sheepdog",
        "vxhs",
        "http",
        "https",
        "ftp",
        "ftps",
        "nfs",
        "blkdebug",
        "blkverify",
        "null-co",
        "null-aio",
        "host_device",
    ];
    match name.split_once(':') {
        Some((proto, _)) if !proto.contains('/') => PROTOCOLS.contains(&proto),
        _ => false,
    }
}

/// Open the backing file named `name` in the header of `path`.
fn open_backing(
    path: &Path,
    header: &Header,
    name: &[u8],
    opts: &OpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<Box<dyn DiskImage>> {
    let display = String::from_utf8_lossy(name).into_owned();
    let backing_err = |reason: String| DiskError::Backing {
        path: path.to_path_buf(),
        backing: display.clone(),
        reason,
    };
    // `chain` holds this image and the ones above it; the backing file would be at
    // depth chain.len() below the top image.
    let depth = chain.len();
    if depth > opts.max_backing_depth {
        return Err(backing_err(format!(
            "backing chain is deeper than the limit of {} backing files",
            opts.max_backing_depth
        )));
    }
    let Some(format) = header.backing_format.as_deref() else {
        return Err(backing_err(
            "the backing format is not recorded in the image, and probing it is unsafe; \
             re-create the image with `qemu-img create -F FMT` or record it with \
             `qemu-img rebase -u -F FMT -b BACKING IMAGE`"
                .into(),
        ));
    };
    let mut name_str = display.as_str();
    if let Some(rest) = name_str.strip_prefix("file:") {
        name_str = rest;
    }
    if is_protocol_name(name_str) {
        return Err(backing_err(
            "backing files reached through qemu protocols or JSON filenames are not supported"
                .into(),
        ));
    }
    let name_bytes = if display.as_bytes() == name {
        name_str.as_bytes()
    } else {
        name // not UTF-8: use the exact bytes
    };
    let name_path = Path::new(std::ffi::OsStr::from_bytes(name_bytes));
    // Relative names are relative to the directory of the image naming them.
    let resolved = if name_path.is_absolute() {
        name_path.to_path_buf()
    } else {
        path.parent()
            .unwrap_or_else(|| Path::new(""))
            .join(name_path)
    };
    let canonical = match std::fs::canonicalize(&resolved) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(backing_err(format!(
                "backing file not found (looked for {})",
                resolved.display()
            )))
        }
        Err(e) => return Err(backing_err(format!("{}: {e}", resolved.display()))),
    };
    // A FIFO or character device named by a (possibly untrusted) header would block
    // or stream forever; only files and block devices can hold an image.
    match std::fs::metadata(&canonical) {
        Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
        Ok(_) => {
            return Err(backing_err(format!(
                "{} is not a regular file or block device",
                canonical.display()
            )))
        }
        Err(e) => return Err(backing_err(format!("{}: {e}", canonical.display()))),
    }
    if let Some(pos) = chain.iter().position(|p| *p == canonical) {
        let mut names: Vec<String> = chain[pos..]
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        names.push(canonical.display().to_string());
        return Err(backing_err(format!(
            "backing chain loop: {}",
            names.join(" -> ")
        )));
    }
    let wrap = |e: DiskError| match e {
        // Errors deeper in the chain already name the image they are about.
        e @ DiskError::Backing { .. } => e,
        other => backing_err(other.to_string()),
    };
    match format {
        "qcow2" => Ok(Box::new(
            Qcow2Image::open_in_chain(&resolved, opts, chain).map_err(wrap)?,
        )),
        "raw" | "file" => Ok(Box::new(RawImage::open(&resolved).map_err(wrap)?)),
        other => match other.parse::<Format>() {
            Ok(f) => {
                let sub = OpenOptions {
                    format: Some(f),
                    ..opts.clone()
                };
                Ok(crate::open(&resolved, &sub).map_err(wrap)?)
            }
            Err(_) => Err(backing_err(format!(
                "backing format '{other}' is not supported"
            ))),
        },
    }
}

impl DiskImage for Qcow2Image {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_read_range(&self.path, buf.len(), offset, self.header.size)?;
        let end = offset + buf.len() as u64;
        let csize = self.cluster_size();
        self.walk(offset, end, |guest, len, src| {
            let at = (guest - offset) as usize;
            let out = &mut buf[at..at + len as usize];
            match src {
                Source::Data(host) => {
                    if host.checked_add(len).is_none_or(|e| e > self.file_size) {
                        return Err(self.malformed(format!(
                            "data for guest offset {guest} at host offset {host:#x} (+{len}) \
                             lies past the end of the file ({} bytes); the file is truncated",
                            self.file_size
                        )));
                    }
                    read_exact_at(&self.file, &self.path, out, host)
                }
                Source::Zero => {
                    out.fill(0);
                    Ok(())
                }
                Source::Unallocated => self.read_backing(out, guest),
                Source::Compressed {
                    offset: coff,
                    len: clen,
                } => {
                    let within = (guest % csize) as usize;
                    if len == csize {
                        // A whole cluster: inflate straight into the caller's buffer.
                        self.decompress_into(coff, clen, out)
                    } else {
                        let cluster = self.compressed_cluster(coff, clen)?;
                        out.copy_from_slice(&cluster[within..within + len as usize]);
                        Ok(())
                    }
                }
            }
        })
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let Some((start, end)) = clip_range(offset, len, self.header.size) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        self.walk(start, end, |guest, len, src| {
            match src {
                Source::Data(_) | Source::Compressed { .. } => {
                    push_extent(&mut out, guest, len, ExtentKind::Data)
                }
                Source::Zero => push_extent(&mut out, guest, len, ExtentKind::Zero),
                Source::Unallocated => match &self.backing {
                    Some(b) => {
                        for e in b.extents(guest, len)? {
                            push_extent(&mut out, e.offset, e.len, e.kind);
                        }
                        // Past the end of a smaller backing file: nothing there.
                        let covered = b.virtual_size().clamp(guest, guest + len);
                        push_extent(
                            &mut out,
                            covered,
                            guest + len - covered,
                            ExtentKind::Unallocated,
                        );
                    }
                    None => push_extent(&mut out, guest, len, ExtentKind::Unallocated),
                },
            }
            Ok(())
        })?;
        Ok(out)
    }
}
