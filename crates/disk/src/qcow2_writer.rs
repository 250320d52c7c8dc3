//! Native qcow2 (version 3) writer for exports.
//!
//! The writer receives guest ranges in ascending order and appends each data
//! cluster to the file as it arrives, so data is streamed straight to disk and
//! never held in memory; only the L2 entries (8 bytes per guest cluster, and only
//! for L2 tables that map something) are kept until [`ImageWriter::finish`]. Then
//! the metadata goes after the data, in this order:
//!
//! ```text
//! cluster 0        header (written last, so an unfinished file has no qcow2 magic)
//! clusters 1..     data clusters, in guest order
//!                  L2 tables, L1 table, refcount blocks, refcount table
//! ```
//!
//! Every cluster in the file is referenced exactly once, so all refcounts are 1
//! and `qemu-img check` finds neither leaks nor errors. Zero ranges become L2
//! entries with the zero flag (`QCOW_OFLAG_ZERO`), which keeps "explicitly zero"
//! distinct from "never written" for tools such as `qemu-img map`.
//!
//! The cluster size follows the store's block size (clamped to 4 KiB..=2 MiB and
//! to a power of two dividing it), so a block is usually one or a few whole
//! clusters. Writes that do not cover whole clusters are gathered in a one-cluster
//! buffer until the writer moves past that cluster.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::qcow2::{CompressionType, Header};
use crate::{DiskError, ImageWriter, Result};

const MIN_CLUSTER_BITS: u32 = 12;
const MAX_CLUSTER_BITS: u32 = 21;
const MAX_L1_BYTES: u64 = 32 << 20;
const COPIED: u64 = 1 << 63;
const ZERO: u64 = 1;
/// Host offsets must fit in L2 entry bits 9..=55.
const MAX_HOST_OFFSET: u64 = 1 << 56;
const HEADER_LEN: u32 = 104;

/// A guest cluster that has been written only partly so far.
struct Pending {
    cluster: u64,
    buf: Vec<u8>,
    has_data: bool,
}

/// Writes a new qcow2 v3 image; see the module documentation.
pub struct Qcow2Writer {
    file: File,
    path: PathBuf,
    /// Guest size recorded in the header (the requested size rounded up to 512).
    size: u64,
    cluster_bits: u32,
    /// L2 tables by L1 index, allocated on first use.
    l2: Vec<Option<Box<[u64]>>>,
    /// Next free host offset; everything below it is referenced.
    next_host: u64,
    /// Guest offset below which every range has been passed (ordering check).
    next_guest: u64,
    pending: Option<Pending>,
}

/// Cluster size for a block size: the largest power of two dividing `block_size`,
/// clamped to 4 KiB..=2 MiB, so that blocks start on cluster boundaries.
pub fn cluster_bits_for(block_size: u32) -> u32 {
    let tz = if block_size == 0 {
        MAX_CLUSTER_BITS
    } else {
        block_size.trailing_zeros()
    };
    tz.clamp(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS)
}

impl Qcow2Writer {
    /// Create `path` (which must not exist) for an image of `virtual_size` bytes.
    pub fn create(path: &Path, virtual_size: u64, block_size: u32) -> Result<Qcow2Writer> {
        let cluster_bits = cluster_bits_for(block_size);
        let cluster_size = 1u64 << cluster_bits;
        // qemu only handles sizes in whole sectors; it rounds up the same way.
        let size = virtual_size
            .checked_next_multiple_of(512)
            .ok_or_else(|| too_large(path, virtual_size))?;
        let l2_entries = cluster_size / 8;
        let l1_size = size.div_ceil(cluster_size).div_ceil(l2_entries);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(too_large(path, virtual_size));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| DiskError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let mut l2 = Vec::new();
        l2.resize_with(l1_size as usize, || None);
        Ok(Qcow2Writer {
            file,
            path: path.to_path_buf(),
            size,
            cluster_bits,
            l2,
            next_host: cluster_size, // cluster 0 is the header
            next_guest: 0,
            pending: None,
        })
    }

    /// The cluster size chosen for this image.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn io_err(&self, what: &str, source: io::Error) -> DiskError {
        DiskError::Io {
            path: self.path.clone(),
            source: io::Error::new(source.kind(), format!("{what}: {source}")),
        }
    }

    /// Check bounds and ordering of a range and advance the ordering cursor.
    fn accept_range(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).filter(|&e| e <= self.size);
        let Some(end) = end else {
            return Err(DiskError::OutOfRange {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            });
        };
        if offset < self.next_guest && len > 0 {
            return Err(DiskError::Unsupported {
                path: self.path.clone(),
                format: "qcow2",
                feature: format!(
                    "out-of-order write at guest offset {offset} (writes must be ascending and \
                     non-overlapping; already written up to {})",
                    self.next_guest
                ),
            });
        }
        self.next_guest = self.next_guest.max(end);
        Ok(())
    }

    /// Reserve `n` clusters at the end of the file.
    fn alloc(&mut self, n: u64) -> Result<u64> {
        let host = self.next_host;
        let end = n
            .checked_mul(self.cluster_size())
            .and_then(|b| host.checked_add(b))
            .filter(|&e| e <= MAX_HOST_OFFSET)
            .ok_or_else(|| too_large(&self.path, self.size))?;
        self.next_host = end;
        Ok(host)
    }

    fn set_entry(&mut self, cluster: u64, value: u64) -> Result<()> {
        let l2_entries = self.cluster_size() / 8;
        let (l1, l2) = (
            (cluster / l2_entries) as usize,
            (cluster % l2_entries) as usize,
        );
        let Some(slot) = self.l2.get_mut(l1) else {
            return Err(DiskError::OutOfRange {
                path: self.path.clone(),
                offset: cluster << self.cluster_bits,
                len: 1 << self.cluster_bits,
                size: self.size,
            });
        };
        let table = slot.get_or_insert_with(|| vec![0u64; l2_entries as usize].into_boxed_slice());
        table[l2] = value;
        Ok(())
    }

    /// Write out the pending partial cluster if it is not `cluster`.
    fn flush_pending_unless(&mut self, cluster: Option<u64>) -> Result<()> {
        if self.pending.as_ref().map(|p| p.cluster) == cluster {
            return Ok(());
        }
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if p.has_data {
            let host = self.alloc(1)?;
            self.file
                .write_all_at(&p.buf, host)
                .map_err(|e| self.io_err("writing a data cluster", e))?;
            self.set_entry(p.cluster, host | COPIED)
        } else {
            // Only zero ranges (and never-written gaps, which read as zeros too).
            self.set_entry(p.cluster, ZERO)
        }
    }

    /// The pending buffer for `cluster`, creating it (zero-filled) if needed.
    fn pending_for(&mut self, cluster: u64) -> Result<&mut Pending> {
        self.flush_pending_unless(Some(cluster))?;
        let size = self.cluster_size() as usize;
        Ok(self.pending.get_or_insert_with(|| Pending {
            cluster,
            buf: vec![0u8; size],
            has_data: false,
        }))
    }

    fn write_refcounts_and_header(&mut self) -> Result<()> {
        let cs = self.cluster_size();
        let l2_entries = cs / 8;

        // L2 tables that map anything, then the L1 table pointing at them.
        let mut l1 = vec![0u64; self.l2.len()];
        let tables = std::mem::take(&mut self.l2);
        for (i, table) in tables.iter().enumerate() {
            let Some(table) = table else { continue };
            if table.iter().all(|&e| e == 0) {
                continue;
            }
            let host = self.alloc(1)?;
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file
                .write_all_at(&bytes, host)
                .map_err(|e| self.io_err("writing an L2 table", e))?;
            l1[i] = host | COPIED;
        }
        drop(tables);
        debug_assert_eq!(l2_entries * 8, cs);
        let l1_bytes = l1.len() as u64 * 8;
        let l1_offset = if l1.is_empty() {
            0
        } else {
            let host = self.alloc(l1_bytes.div_ceil(cs))?;
            let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file
                .write_all_at(&bytes, host)
                .map_err(|e| self.io_err("writing the L1 table", e))?;
            host
        };

        // Refcounts: every cluster up to the end of the refcount table is in use
        // exactly once. The refcount structures count themselves, so grow them
        // until they cover the file including themselves.
        let used = self.next_host / cs;
        let per_block = cs / 2; // 16-bit refcounts
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = used + blocks + table_clusters;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs).max(1);
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        let total = used + blocks + table_clusters;
        let first_block = self.alloc(blocks)?;
        let table_offset = self.alloc(table_clusters)?;
        let mut table = vec![0u8; (table_clusters * cs) as usize];
        for b in 0..blocks {
            let covered = (total - b * per_block).min(per_block) as usize;
            let mut block = vec![0u8; cs as usize];
            for e in block.chunks_exact_mut(2).take(covered) {
                e.copy_from_slice(&1u16.to_be_bytes());
            }
            let host = first_block + b * cs;
            self.file
                .write_all_at(&block, host)
                .map_err(|e| self.io_err("writing a refcount block", e))?;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&host.to_be_bytes());
        }
        self.file
            .write_all_at(&table, table_offset)
            .map_err(|e| self.io_err("writing the refcount table", e))?;
        debug_assert_eq!(self.next_host, total * cs);

        // Make everything durable before the header makes the file a valid image.
        self.file
            .sync_data()
            .map_err(|e| self.io_err("syncing", e))?;
        let header = Header {
            version: 3,
            cluster_bits: self.cluster_bits,
            size: self.size,
            crypt_method: 0,
            l1_size: l1.len() as u32,
            l1_table_offset: l1_offset,
            refcount_table_offset: table_offset,
            refcount_table_clusters: table_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: HEADER_LEN,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
        };
        self.file
            .write_all_at(&encode_header(&header), 0)
            .map_err(|e| self.io_err("writing the header", e))?;
        self.file.sync_all().map_err(|e| self.io_err("syncing", e))
    }
}

fn too_large(path: &Path, size: u64) -> DiskError {
    DiskError::Unsupported {
        path: path.to_path_buf(),
        format: "qcow2",
        feature: format!("virtual size {size} is too large for this cluster size"),
    }
}

/// Encode a v3 header without extensions (followed by an end-of-extensions marker).
fn encode_header(h: &Header) -> Vec<u8> {
    let mut b = Vec::with_capacity(h.header_length as usize + 8);
    b.extend_from_slice(b"QFI\xfb");
    b.extend_from_slice(&h.version.to_be_bytes());
    b.extend_from_slice(&0u64.to_be_bytes()); // backing_file_offset
    b.extend_from_slice(&0u32.to_be_bytes()); // backing_file_size
    b.extend_from_slice(&h.cluster_bits.to_be_bytes());
    b.extend_from_slice(&h.size.to_be_bytes());
    b.extend_from_slice(&h.crypt_method.to_be_bytes());
    b.extend_from_slice(&h.l1_size.to_be_bytes());
    b.extend_from_slice(&h.l1_table_offset.to_be_bytes());
    b.extend_from_slice(&h.refcount_table_offset.to_be_bytes());
    b.extend_from_slice(&h.refcount_table_clusters.to_be_bytes());
    b.extend_from_slice(&h.nb_snapshots.to_be_bytes());
    b.extend_from_slice(&h.snapshots_offset.to_be_bytes());
    b.extend_from_slice(&h.incompatible_features.to_be_bytes());
    b.extend_from_slice(&h.compatible_features.to_be_bytes());
    b.extend_from_slice(&h.autoclear_features.to_be_bytes());
    b.extend_from_slice(&h.refcount_order.to_be_bytes());
    b.extend_from_slice(&h.header_length.to_be_bytes());
    debug_assert_eq!(b.len(), h.header_length as usize);
    b.extend_from_slice(&[0u8; 8]); // end of header extensions
    b
}

impl ImageWriter for Qcow2Writer {
    fn write_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        self.accept_range(offset, len)?;
        let cs = self.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cluster = pos >> self.cluster_bits;
            let cluster_start = cluster << self.cluster_bits;
            let within = (pos - cluster_start) as usize;
            let src = &data[(pos - offset) as usize..];
            let pending_here = self.pending.as_ref().is_some_and(|p| p.cluster == cluster);
            let full = (end - pos) / cs;
            if within == 0 && !pending_here && full > 0 {
                // Whole clusters go straight to the file, in one write.
                self.flush_pending_unless(None)?;
                let host = self.alloc(full)?;
                let bytes = (full * cs) as usize;
                self.file
                    .write_all_at(&src[..bytes], host)
                    .map_err(|e| self.io_err("writing data clusters", e))?;
                for i in 0..full {
                    self.set_entry(cluster + i, (host + i * cs) | COPIED)?;
                }
                pos += full * cs;
            } else {
                let n = (cs as usize - within).min(src.len());
                let p = self.pending_for(cluster)?;
                p.buf[within..within + n].copy_from_slice(&src[..n]);
                p.has_data = true;
                pos += n as u64;
            }
        }
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.accept_range(offset, len)?;
        let cs = self.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let cluster = pos >> self.cluster_bits;
            let cluster_start = cluster << self.cluster_bits;
            let pending_here = self.pending.as_ref().is_some_and(|p| p.cluster == cluster);
            let piece_end = (cluster_start + cs).min(end);
            if pos == cluster_start && piece_end == cluster_start + cs && !pending_here {
                self.flush_pending_unless(None)?;
                self.set_entry(cluster, ZERO)?;
            } else {
                // The buffer starts zeroed; it only has to exist so the cluster is
                // recorded as zero (or as data, if data joins it later).
                self.pending_for(cluster)?;
            }
            pos = piece_end;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.flush_pending_unless(None)?;
        self.write_refcounts_and_header()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_size_follows_block_size() {
        assert_eq!(cluster_bits_for(4096), 12);
        assert_eq!(cluster_bits_for(512), 12);
        assert_eq!(cluster_bits_for(64 << 10), 16);
        assert_eq!(cluster_bits_for(2 << 20), 21);
        assert_eq!(cluster_bits_for(8 << 20), 21);
        assert_eq!(cluster_bits_for(96 << 10), 15); // 32 KiB divides 96 KiB
        assert_eq!(cluster_bits_for(0), 21);
    }

    #[test]
    fn header_round_trips_through_the_parser() {
        let h = Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 5 << 16,
            refcount_table_offset: 6 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: HEADER_LEN,
            compression_type: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
        };
        let mut bytes = encode_header(&h);
        bytes.resize(1 << 16, 0);
        assert_eq!(crate::qcow2::parse_header(&bytes).unwrap(), h);
    }
}
