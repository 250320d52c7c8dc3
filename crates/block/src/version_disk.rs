//! [`VersionDisk`]: a committed version as a read-only, randomly addressable [`Disk`].
//!
//! A read finds each block's entry by descending the version's tree from the root
//! (nodes come from a bounded LRU cache, so a path is usually read once), fetches the
//! data chunks it does not have cached in one parallel batch, and copies out the bytes
//! asked for. Unwritten and zero blocks are not read at all.

use std::io;
use std::sync::{Arc, Mutex};

use strata_store::tree::{self, entry_span, Node, Span, FANOUT};
use strata_store::{ChunkId, Entry, Store, StoreError, Version, VersionId};

use crate::disk::{Disk, DiskExtent};
use crate::lru::Lru;

/// Tree nodes kept decoded (a full leaf is about 8.5 KB; 1024 leaves map 256 Ki blocks).
const NODE_CACHE_ENTRIES: usize = 1024;
/// Bytes of decompressed blocks kept.
const BLOCK_CACHE_BYTES: usize = 16 << 20;
/// Blocks one `extents` call looks at, at most (a client asks again for the rest).
pub(crate) const MAX_EXTENT_BLOCKS: u64 = 1 << 16;

/// A committed version, read-only, with random access by byte offset.
pub struct VersionDisk {
    store: Arc<Store>,
    id: VersionId,
    version: Version,
    root: Entry,
    nodes: Mutex<Lru<ChunkId, Arc<Node>>>,
    chunks: Mutex<Lru<ChunkId, Arc<Vec<u8>>>>,
}

/// Turn a store error into the `io::Error` a [`Disk`] reports, keeping its kind.
pub(crate) fn io_err(e: StoreError) -> io::Error {
    match &e {
        StoreError::Io { source, .. } => io::Error::new(source.kind(), e.to_string()),
        _ => io::Error::other(e.to_string()),
    }
}

/// Check that `[offset, offset + len)` lies inside a disk of `size` bytes.
pub(crate) fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range of {len} bytes at {offset} is outside the {size}-byte disk"),
        )),
    }
}

/// Copy the part of block `b` (its bytes `data`, or zeros for `None`) that falls in
/// `buf`, which holds the disk's bytes from `offset`.
pub(crate) fn copy_block(buf: &mut [u8], offset: u64, b: u64, bs: u64, data: Option<&[u8]>) {
    let start = (b * bs).max(offset);
    let end = ((b + 1) * bs).min(offset + buf.len() as u64);
    if start >= end {
        return;
    }
    let dst = &mut buf[(start - offset) as usize..(end - offset) as usize];
    let from = (start - b * bs) as usize;
    match data {
        Some(d) => {
            let avail = d.len().saturating_sub(from).min(dst.len());
            dst[..avail].copy_from_slice(&d[from..from + avail]);
            dst[avail..].fill(0);
        }
        None => dst.fill(0),
    }
}

/// Turn runs of blocks `(start, count, data)` into byte extents clipped to
/// `[offset, end)`, merging neighbours of the same kind.
pub(crate) fn block_runs_to_extents(
    runs: &[(u64, u64, bool)],
    bs: u64,
    offset: u64,
    end: u64,
) -> Vec<DiskExtent> {
    let mut out: Vec<DiskExtent> = Vec::new();
    for &(start, count, data) in runs {
        let s = (start * bs).max(offset);
        let e = ((start + count) * bs).min(end);
        if s >= e {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.hole != data => last.len += e - s,
            _ => out.push(DiskExtent {
                len: e - s,
                hole: !data,
                zero: !data,
            }),
        }
    }
    out
}

impl VersionDisk {
    pub fn open(store: Arc<Store>, id: VersionId) -> Result<VersionDisk, StoreError> {
        let version = store.load_version(&id)?;
        Ok(VersionDisk::with_version(store, id, version))
    }

    /// A disk over version `id` whose record the caller has already loaded.
    pub fn with_version(store: Arc<Store>, id: VersionId, version: Version) -> VersionDisk {
        let root = version.tree().root;
        VersionDisk {
            store,
            id,
            version,
            root,
            nodes: Mutex::new(Lru::new(NODE_CACHE_ENTRIES)),
            chunks: Mutex::new(Lru::new(BLOCK_CACHE_BYTES)),
        }
    }

    pub fn id(&self) -> VersionId {
        self.id
    }

    pub fn version(&self) -> &Version {
        &self.version
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Number of blocks (the last may be short).
    pub fn blocks(&self) -> u64 {
        self.version.blocks()
    }

    /// Length in bytes of block `b` (the block size, except maybe for the last block).
    pub fn block_len(&self, b: u64) -> usize {
        let bs = self.version.block_size as u64;
        bs.min(self.version.virtual_size.saturating_sub(b * bs)) as usize
    }

    /// The tree's root reference.
    pub fn root(&self) -> Entry {
        self.root
    }

    /// A tree node of this version, through the cache.
    pub fn node(&self, id: &ChunkId) -> Result<Arc<Node>, StoreError> {
        if let Some(n) = self.nodes.lock().unwrap().get(id) {
            return Ok(n);
        }
        let n = Arc::new(self.store.load_node(id)?);
        self.nodes.lock().unwrap().insert(*id, n.clone(), 1);
        Ok(n)
    }

    /// The entry of block `b`.
    pub fn entry(&self, b: u64) -> Result<Entry, StoreError> {
        if b >= self.blocks() {
            return Err(StoreError::Invalid(format!(
                "block {b} is past the end of version {} ({} blocks)",
                self.id.short(),
                self.blocks()
            )));
        }
        let mut r = self.root;
        for level in (0..self.version.depth).rev() {
            let id = match r {
                Entry::Present(id) => id,
                uniform => return Ok(uniform),
            };
            let node = self.node(&id)?;
            if node.level != level {
                return Err(StoreError::Corrupt {
                    id,
                    reason: format!("tree node has level {}, expected {level}", node.level),
                });
            }
            let i = ((b / entry_span(level)) % FANOUT as u64) as usize;
            r = *node.entries.get(i).ok_or_else(|| StoreError::Corrupt {
                id,
                reason: format!("tree node has no entry {i} (block {b})"),
            })?;
        }
        Ok(r)
    }

    /// The content of each of `blocks`: `None` for unwritten and zero blocks. Chunks
    /// not cached are read in one parallel batch.
    pub fn read_blocks(&self, blocks: &[u64]) -> Result<Vec<Option<Arc<Vec<u8>>>>, StoreError> {
        let mut out: Vec<Option<Arc<Vec<u8>>>> = Vec::with_capacity(blocks.len());
        let mut missing: Vec<(usize, ChunkId)> = Vec::new();
        for (i, &b) in blocks.iter().enumerate() {
            match self.entry(b)? {
                Entry::Present(id) => match self.chunks.lock().unwrap().get(&id) {
                    Some(d) => out.push(Some(d)),
                    None => {
                        missing.push((i, id));
                        out.push(None);
                    }
                },
                _ => out.push(None),
            }
        }
        if !missing.is_empty() {
            let ids: Vec<ChunkId> = missing.iter().map(|(_, id)| *id).collect();
            let data = self.store.read_chunks(&ids)?;
            let mut cache = self.chunks.lock().unwrap();
            for ((i, id), d) in missing.into_iter().zip(data) {
                let d = Arc::new(d);
                cache.insert(id, d.clone(), d.len().max(1));
                out[i] = Some(d);
            }
        }
        Ok(out)
    }

    /// Block `b` as bytes (`block_len(b)` of them).
    pub fn read_block(&self, b: u64) -> Result<Vec<u8>, StoreError> {
        let mut buf = vec![0u8; self.block_len(b)];
        if let Some(d) = self.read_blocks(&[b])?.pop().flatten() {
            let n = d.len().min(buf.len());
            buf[..n].copy_from_slice(&d[..n]);
        }
        Ok(buf)
    }

    /// Runs `(start, count, data)` covering blocks `[from, to)` in order: `data` is
    /// false for unwritten and zero blocks.
    pub fn block_runs(&self, from: u64, to: u64) -> Result<Vec<(u64, u64, bool)>, StoreError> {
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut add = |start: u64, count: u64, data: bool| match runs.last_mut() {
            Some((s, c, d)) if *d == data && *s + *c == start => *c += count,
            _ => runs.push((start, count, data)),
        };
        let t = self.version.tree();
        let mut load = |id: &ChunkId| self.node(id).map(|n| (*n).clone());
        tree::walk(&mut load, t.root, t.depth, from, to, &mut |span| {
            match span {
                Span::Uniform { start, count, .. } => add(start, count, false),
                Span::Blocks { start, entries } => {
                    for (i, e) in entries.iter().enumerate() {
                        add(start + i as u64, 1, matches!(e, Entry::Present(_)));
                    }
                }
            }
            Ok::<(), StoreError>(())
        })?;
        Ok(runs)
    }
}

impl Disk for VersionDisk {
    fn size(&self) -> u64 {
        self.version.virtual_size
    }

    fn block_size(&self) -> u32 {
        self.version.block_size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.version.block_size as u64;
        let blocks: Vec<u64> = (offset / bs..=(offset + buf.len() as u64 - 1) / bs).collect();
        let data = self.read_blocks(&blocks).map_err(io_err)?;
        for (b, d) in blocks.into_iter().zip(data) {
            copy_block(buf, offset, b, bs, d.as_deref().map(|v| v.as_slice()));
        }
        Ok(())
    }

    fn write_at(&self, _data: &[u8], _offset: u64, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_trim: bool, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn trim(&self, _offset: u64, _len: u64, _fua: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn fast_zero(&self) -> bool {
        false
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<DiskExtent>> {
        check_range(self.size(), offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let bs = self.version.block_size as u64;
        let from = offset / bs;
        let to = (offset + len).div_ceil(bs).min(from + MAX_EXTENT_BLOCKS);
        let runs = self.block_runs(from, to).map_err(io_err)?;
        Ok(block_runs_to_extents(
            &runs,
            bs,
            offset,
            (offset + len).min(to * bs),
        ))
    }
}

fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::ReadOnlyFilesystem,
        "a committed version is read-only",
    )
}
