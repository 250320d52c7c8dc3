//! [`VersionDisk`]: a committed version as a read-only, randomly addressable [`Disk`],
//! and [`VersionDisks`], which hands every user of one version in a process the same
//! `VersionDisk`.
//!
//! A read first asks the version's [`BlockCache`](crate::block_cache): a block read
//! before is a `pread` from a local file the kernel keeps in its page cache, and a
//! block known to be zero or unwritten is zeros without a lookup. Only the rest
//! descends the version's tree (nodes come from a bounded LRU cache, so a path is
//! usually read once), fetches the data chunks in one parallel batch (each decoded
//! and checked against its id), writes them into the cache and copies out the bytes
//! asked for. When the cache is off or full, decoded blocks go through a small LRU
//! instead, as before the cache existed.
//!
//! Sharing matters because many sessions (one per VM) usually sit on one gold base:
//! through [`VersionDisks`] they share one cache file, one tree-node cache and one
//! set of bitmaps, so a block one VM read is a page-cache hit for all of them.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, Weak};

use strata_store::tree::{entry_span, Node, FANOUT};
use strata_store::{ChunkId, Entry, ObjectKind, Store, StoreError, Version, VersionId};

use crate::block_cache::{
    BlockCache, BlockCacheConfig, BlockCacheStats, CACHED, PRESENT, UNKNOWN, ZERO,
};
use crate::disk::{Disk, DiskExtent};
use crate::lru::Lru;
use crate::upstream::{self, Upstream};

/// Tree nodes kept decoded (a full leaf is about 8.5 KB; 1024 leaves map 256 Ki blocks).
const NODE_CACHE_ENTRIES: usize = 1024;
/// Bytes of decompressed blocks kept when the block cache cannot take them.
const BLOCK_CACHE_BYTES: usize = 16 << 20;
/// Blocks one `extents` call looks at, at most (a client asks again for the rest).
pub(crate) const MAX_EXTENT_BLOCKS: u64 = 1 << 16;
/// Bytes one `cache` (prefetch) step reads.
const PREFETCH_BYTES: u64 = 4 << 20;

/// A committed version, read-only, with random access by byte offset.
pub struct VersionDisk {
    store: Arc<Store>,
    id: VersionId,
    version: Version,
    root: Entry,
    nodes: Mutex<Lru<ChunkId, Arc<Node>>>,
    chunks: Mutex<Lru<ChunkId, Arc<Vec<u8>>>>,
    cache: BlockCache,
    /// Where objects the local store lacks come from (a lazily streamed version on a
    /// point; see [`upstream`](crate::upstream)). `None`: the version is local.
    upstream: Option<Arc<dyn Upstream>>,
}

/// Where block cache files live: `STORE/cache/` (they have no names; see
/// [`block_cache`](crate::block_cache)).
pub fn cache_dir(store: &Store) -> std::path::PathBuf {
    store.root().join("cache")
}

/// The open [`VersionDisk`]s of one store in this process, one per version: every
/// session over a base and every read-only export of it get the same disk, hence the
/// same block cache. Holds them weakly: a version nobody uses any more is closed (and
/// its cache file with it).
pub struct VersionDisks {
    store: Arc<Store>,
    config: BlockCacheConfig,
    open: Mutex<HashMap<VersionId, Weak<VersionDisk>>>,
}

impl VersionDisks {
    pub fn new(store: Arc<Store>) -> Arc<VersionDisks> {
        VersionDisks::with_config(store, BlockCacheConfig::default())
    }

    pub fn with_config(store: Arc<Store>, config: BlockCacheConfig) -> Arc<VersionDisks> {
        Arc::new(VersionDisks {
            store,
            config,
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The disk of version `id`, opened (its record loaded) if nobody has it open.
    pub fn get(&self, id: VersionId) -> Result<Arc<VersionDisk>, StoreError> {
        if let Some(d) = self.lookup(&id) {
            return Ok(d);
        }
        let version = self.store.load_version(&id)?;
        Ok(self.get_with_version(id, version))
    }

    /// The disk of version `id`, whose record the caller has loaded.
    pub fn get_with_version(&self, id: VersionId, version: Version) -> Arc<VersionDisk> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = open.get(&id).and_then(Weak::upgrade) {
            return d;
        }
        open.retain(|_, w| w.strong_count() > 0);
        let d = Arc::new(VersionDisk::with_config(
            self.store.clone(),
            id,
            version,
            &self.config,
        ));
        open.insert(id, Arc::downgrade(&d));
        d
    }

    /// The disk of version `id` read lazily through `upstream` (its record fetched
    /// from elsewhere; the store may lack the version and any of its objects). The
    /// caller keeps the returned disk alive for as long as sessions may open over it:
    /// [`get`](Self::get) finds it only while someone holds it. If the version is
    /// open already, that disk is returned.
    pub fn get_lazy(
        &self,
        id: VersionId,
        version: Version,
        upstream: Arc<dyn Upstream>,
    ) -> Arc<VersionDisk> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = open.get(&id).and_then(Weak::upgrade) {
            return d;
        }
        open.retain(|_, w| w.strong_count() > 0);
        let mut d = VersionDisk::with_config(self.store.clone(), id, version, &self.config);
        d.upstream = Some(upstream);
        let d = Arc::new(d);
        open.insert(id, Arc::downgrade(&d));
        d
    }

    fn lookup(&self, id: &VersionId) -> Option<Arc<VersionDisk>> {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(id).and_then(Weak::upgrade)
    }
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
    /// A disk over version `id` with a block cache of its own. Users of one version
    /// in one process should share a disk through [`VersionDisks`] instead.
    pub fn open(store: Arc<Store>, id: VersionId) -> Result<VersionDisk, StoreError> {
        let version = store.load_version(&id)?;
        Ok(VersionDisk::with_version(store, id, version))
    }

    /// A disk over version `id` whose record the caller has already loaded.
    pub fn with_version(store: Arc<Store>, id: VersionId, version: Version) -> VersionDisk {
        VersionDisk::with_config(store, id, version, &BlockCacheConfig::default())
    }

    /// A disk over version `id` whose block cache is set up by `config`.
    pub fn with_config(
        store: Arc<Store>,
        id: VersionId,
        version: Version,
        config: &BlockCacheConfig,
    ) -> VersionDisk {
        let root = version.tree().root;
        let cache = BlockCache::new(
            cache_dir(&store),
            version.virtual_size,
            version.block_size,
            config,
        );
        VersionDisk {
            store,
            id,
            version,
            root,
            nodes: Mutex::new(Lru::new(NODE_CACHE_ENTRIES)),
            chunks: Mutex::new(Lru::new(BLOCK_CACHE_BYTES)),
            cache,
            upstream: None,
        }
    }

    /// A disk over version `id` (whose record came from elsewhere) that asks
    /// `upstream` for every tree node and data chunk the store lacks.
    pub fn lazy(
        store: Arc<Store>,
        id: VersionId,
        version: Version,
        config: &BlockCacheConfig,
        upstream: Arc<dyn Upstream>,
    ) -> VersionDisk {
        let mut d = VersionDisk::with_config(store, id, version, config);
        d.upstream = Some(upstream);
        d
    }

    /// Whether this disk reads through an [`Upstream`].
    pub fn is_lazy(&self) -> bool {
        self.upstream.is_some()
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

    /// Counters of this version's block cache.
    pub fn cache_stats(&self) -> BlockCacheStats {
        self.cache.stats()
    }

    /// A tree node of this version, through the cache.
    pub fn node(&self, id: &ChunkId) -> Result<Arc<Node>, StoreError> {
        if let Some(n) = self.nodes.lock().unwrap().get(id) {
            return Ok(n);
        }
        let n = match (self.store.load_node(id), &self.upstream) {
            (Err(StoreError::MissingObject { .. }), Some(up)) => {
                upstream::fetch_nodes(&**up, &[*id])?
                    .pop()
                    .expect("one node")
            }
            (r, _) => r?,
        };
        let n = Arc::new(n);
        self.nodes.lock().unwrap().insert(*id, n.clone(), 1);
        Ok(n)
    }

    /// Data chunks `ids` (for `blocks`, a prefetch hint; may be empty): from the
    /// store, and what it lacks from the upstream, verified (a lazy disk only).
    fn read_chunks(&self, ids: &[ChunkId], blocks: &[u64]) -> Result<Vec<Vec<u8>>, StoreError> {
        let Some(up) = &self.upstream else {
            return self.store.read_chunks(ids);
        };
        let local = self.store.read_objects(ids)?;
        let missing: Vec<usize> = (0..ids.len()).filter(|&i| local[i].is_none()).collect();
        let mut out: Vec<Option<Vec<u8>>> = Vec::with_capacity(ids.len());
        for (id, o) in ids.iter().zip(local) {
            match o {
                Some((ObjectKind::Data, raw)) => out.push(Some(raw)),
                Some((kind, _)) => {
                    return Err(StoreError::Corrupt {
                        id: *id,
                        reason: format!("expected a data chunk, found a {} object", kind.name()),
                    })
                }
                None => out.push(None),
            }
        }
        if !missing.is_empty() {
            if blocks.len() == ids.len() {
                let missed: Vec<u64> = missing.iter().map(|&i| blocks[i]).collect();
                up.missed(&missed);
            }
            let want: Vec<ChunkId> = missing.iter().map(|&i| ids[i]).collect();
            for (i, raw) in missing
                .into_iter()
                .zip(upstream::fetch_chunks(&**up, &want)?)
            {
                out[i] = Some(raw);
            }
        }
        Ok(out
            .into_iter()
            .map(|d| d.expect("every chunk found"))
            .collect())
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

    /// The content of each of `blocks`: `None` for unwritten and zero blocks, decoded
    /// from the store through the in-memory LRU (not the block cache). Chunks not in
    /// the LRU are read in one parallel batch.
    pub fn read_blocks(&self, blocks: &[u64]) -> Result<Vec<Option<Arc<Vec<u8>>>>, StoreError> {
        let mut out: Vec<Option<Arc<Vec<u8>>>> = vec![None; blocks.len()];
        let mut present: Vec<(usize, ChunkId)> = Vec::new();
        for (i, &b) in blocks.iter().enumerate() {
            if let Entry::Present(id) = self.entry(b)? {
                present.push((i, id));
            }
        }
        let ids: Vec<ChunkId> = present.iter().map(|(_, id)| *id).collect();
        for ((i, _), d) in present.iter().zip(self.decode_through_lru(&ids)?) {
            out[*i] = Some(d);
        }
        Ok(out)
    }

    /// Decode chunks through the in-memory LRU of decoded blocks.
    fn decode_through_lru(&self, ids: &[ChunkId]) -> Result<Vec<Arc<Vec<u8>>>, StoreError> {
        let mut out: Vec<Option<Arc<Vec<u8>>>> = Vec::with_capacity(ids.len());
        let mut missing: Vec<(usize, ChunkId)> = Vec::new();
        {
            let mut lru = self.chunks.lock().unwrap();
            for (i, id) in ids.iter().enumerate() {
                let d = lru.get(id);
                if d.is_none() {
                    missing.push((i, *id));
                }
                out.push(d);
            }
        }
        if !missing.is_empty() {
            let want: Vec<ChunkId> = missing.iter().map(|(_, id)| *id).collect();
            let data = self.read_chunks(&want, &[])?;
            self.cache.count_uncached(data.len() as u64);
            let mut lru = self.chunks.lock().unwrap();
            for ((i, id), d) in missing.into_iter().zip(data) {
                let d = Arc::new(d);
                lru.insert(id, d.clone(), d.len().max(1));
                out[i] = Some(d);
            }
        }
        Ok(out
            .into_iter()
            .map(|d| d.expect("every chunk found"))
            .collect())
    }

    /// Block `b` as bytes (`block_len(b)` of them).
    pub fn read_block(&self, b: u64) -> Result<Vec<u8>, StoreError> {
        if b >= self.blocks() {
            return Err(StoreError::Invalid(format!(
                "block {b} is past the end of version {}",
                self.id.short()
            )));
        }
        let mut buf = vec![0u8; self.block_len(b)];
        self.read_into(&mut buf, b * self.version.block_size as u64)?;
        Ok(buf)
    }

    /// Runs `(start, count, data)` covering blocks `[from, to)` in order: `data` is
    /// false for unwritten and zero blocks. Answered from the block cache's state map
    /// when it knows every block; otherwise from the tree, teaching the map.
    pub fn block_runs(&self, from: u64, to: u64) -> Result<Vec<(u64, u64, bool)>, StoreError> {
        let to = to.min(self.blocks());
        if let Some(runs) = self.known_block_runs(from, to) {
            return Ok(runs);
        }
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut add = |start: u64, count: u64, data: bool| match runs.last_mut() {
            Some((s, c, d)) if *d == data && *s + *c == start => *c += count,
            _ => runs.push((start, count, data)),
        };
        self.walk_runs(
            self.root,
            self.version.depth as i32 - 1,
            0,
            from,
            to,
            &mut add,
        )?;
        Ok(runs)
    }

    /// [`block_runs`](Self::block_runs) from the block cache's state map alone:
    /// `None` if it does not know every block of `[from, to)`.
    pub fn known_block_runs(&self, from: u64, to: u64) -> Option<Vec<(u64, u64, bool)>> {
        let to = to.min(self.blocks());
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for b in from..to {
            let data = match self.cache.state(b) {
                UNKNOWN => return None,
                ZERO => false,
                _ => true,
            };
            match runs.last_mut() {
                Some((_, c, d)) if *d == data => *c += 1,
                _ => runs.push((b, 1, data)),
            }
        }
        Some(runs)
    }

    /// Report the blocks of `[from, to)` under `r` (a reference to a level-`level`
    /// node covering blocks from `base`) as runs, marking what each block is.
    fn walk_runs(
        &self,
        r: Entry,
        level: i32,
        base: u64,
        from: u64,
        to: u64,
        add: &mut impl FnMut(u64, u64, bool),
    ) -> Result<(), StoreError> {
        let cover = entry_span((level + 1) as u8);
        let (lo, hi) = (base.max(from), base.saturating_add(cover).min(to));
        if lo >= hi {
            return Ok(());
        }
        let id = match r {
            Entry::Present(id) => id,
            _ => {
                self.cache.mark_zero_run(lo, hi);
                add(lo, hi - lo, false);
                return Ok(());
            }
        };
        let node = self.node(&id)?;
        if node.level as i32 != level {
            return Err(StoreError::Corrupt {
                id,
                reason: format!("tree node has level {}, expected {level}", node.level),
            });
        }
        if level == 0 {
            for b in lo..hi {
                let e =
                    node.entries
                        .get((b - base) as usize)
                        .ok_or_else(|| StoreError::Corrupt {
                            id,
                            reason: "tree node is shorter than the image".into(),
                        })?;
                let data = matches!(e, Entry::Present(_));
                self.cache.mark(b, if data { PRESENT } else { ZERO });
                add(b, 1, data);
            }
            return Ok(());
        }
        let span = entry_span(level as u8);
        for (i, child) in node.entries.iter().enumerate() {
            let cbase = base + i as u64 * span;
            if cbase >= hi {
                break;
            }
            if cbase + span <= lo {
                continue;
            }
            self.walk_runs(*child, level - 1, cbase, from, to, add)?;
        }
        Ok(())
    }

    /// Fill `buf` with the disk's bytes from `offset` (the range lies inside the disk).
    fn read_into(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.version.block_size as u64;
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / bs, (end - 1) / bs);
        // Cached and zero blocks at once, coalescing runs of cached blocks into one
        // pread; the others need the tree.
        let mut todo: Vec<u64> = Vec::new();
        let mut b = first;
        while b <= last {
            match self.cache.state(b) {
                CACHED => {
                    let mut e = b + 1;
                    while e <= last && self.cache.state(e) == CACHED {
                        e += 1;
                    }
                    self.read_cached(buf, offset, b, e)?;
                    b = e;
                    continue;
                }
                ZERO => copy_block(buf, offset, b, bs, None),
                _ => todo.push(b),
            }
            b += 1;
        }
        if !todo.is_empty() {
            self.read_uncached(buf, offset, &todo)?;
        }
        Ok(())
    }

    /// [`read_into`](Self::read_into) if every block is cached (in the page cache too)
    /// or zero: false otherwise, `buf` then unspecified.
    pub(crate) fn read_now(&self, buf: &mut [u8], offset: u64) -> bool {
        if buf.is_empty() {
            return true;
        }
        let bs = self.version.block_size as u64;
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let mut b = first;
        while b <= last {
            match self.cache.state(b) {
                CACHED => {
                    let mut e = b + 1;
                    while e <= last && self.cache.state(e) == CACHED {
                        e += 1;
                    }
                    let s = (b * bs).max(offset);
                    let t = (e * bs).min(end);
                    let dst = &mut buf[(s - offset) as usize..(t - offset) as usize];
                    if !self.cache.read_nowait(dst, s, e - b) {
                        return false;
                    }
                    b = e;
                    continue;
                }
                ZERO => copy_block(buf, offset, b, bs, None),
                _ => return false,
            }
            b += 1;
        }
        true
    }

    /// Copy the part of cached blocks `[b, e)` that falls in `buf` (disk bytes from
    /// `offset`) from the cache file.
    fn read_cached(&self, buf: &mut [u8], offset: u64, b: u64, e: u64) -> Result<(), StoreError> {
        let bs = self.version.block_size as u64;
        let s = (b * bs).max(offset);
        let t = (e * bs).min(offset + buf.len() as u64);
        self.cache
            .read(
                &mut buf[(s - offset) as usize..(t - offset) as usize],
                s,
                e - b,
            )
            .map_err(|source| StoreError::Io {
                path: cache_dir(&self.store),
                source,
            })
    }

    /// Read `blocks` (in order, none known to be cached or zero) into `buf`: look up
    /// their entries, decode the data blocks nobody else is decoding in one batch and
    /// cache them, then wait for the ones others are filling.
    fn read_uncached(&self, buf: &mut [u8], offset: u64, blocks: &[u64]) -> Result<(), StoreError> {
        let bs = self.version.block_size as u64;
        let mut fetch: Vec<(u64, ChunkId)> = Vec::new();
        let mut others: Vec<(u64, ChunkId)> = Vec::new();
        let mut plain: Vec<(u64, ChunkId)> = Vec::new();
        let mut claims = Claims {
            cache: &self.cache,
            blocks: Vec::new(),
        };
        for &b in blocks {
            match self.entry(b)? {
                Entry::Present(id) => {
                    self.cache.mark(b, PRESENT);
                    if !self.cache.filling() {
                        plain.push((b, id));
                    } else if self.cache.try_claim(b) {
                        claims.blocks.push(b);
                        // Filled between our look at its state and our claim?
                        if self.cache.state(b) == CACHED {
                            self.read_cached(buf, offset, b, b + 1)?;
                        } else {
                            fetch.push((b, id));
                        }
                    } else {
                        others.push((b, id));
                    }
                }
                _ => {
                    self.cache.mark(b, ZERO);
                    copy_block(buf, offset, b, bs, None);
                }
            }
        }
        if !fetch.is_empty() {
            let ids: Vec<ChunkId> = fetch.iter().map(|(_, id)| *id).collect();
            // On error the claims are released (dropped) and nothing is cached.
            let blocks: Vec<u64> = fetch.iter().map(|(b, _)| *b).collect();
            let data = self.read_chunks(&ids, &blocks)?;
            for ((b, _), d) in fetch.iter().zip(&data) {
                copy_block(buf, offset, *b, bs, Some(d));
                if !self.cache.fill(*b, d) {
                    self.cache.count_uncached(1);
                }
            }
        }
        drop(claims);
        for (b, id) in others {
            self.read_after_others(buf, offset, b, id)?;
        }
        if !plain.is_empty() {
            let ids: Vec<ChunkId> = plain.iter().map(|(_, id)| *id).collect();
            for ((b, _), d) in plain.iter().zip(self.decode_through_lru(&ids)?) {
                copy_block(buf, offset, *b, bs, Some(&d));
            }
        }
        Ok(())
    }

    /// Read block `b` (data chunk `id`) that another reader was filling: from the
    /// cache once it is there, or decode it here if that fill failed.
    fn read_after_others(
        &self,
        buf: &mut [u8],
        offset: u64,
        b: u64,
        id: ChunkId,
    ) -> Result<(), StoreError> {
        let bs = self.version.block_size as u64;
        loop {
            if self.cache.state(b) == CACHED {
                return self.read_cached(buf, offset, b, b + 1);
            }
            if self.cache.try_claim(b) {
                let _claim = Claims {
                    cache: &self.cache,
                    blocks: vec![b],
                };
                if self.cache.state(b) == CACHED {
                    return self.read_cached(buf, offset, b, b + 1);
                }
                let d = self.decode_through_lru(&[id])?.pop().expect("one chunk");
                copy_block(buf, offset, b, bs, Some(&d));
                self.cache.fill(b, &d);
                return Ok(());
            }
            self.cache.wait(b);
        }
    }
}

/// Blocks this reader claimed for filling; released (and waiters woken) when dropped,
/// whatever happened — an error or a panic must not leave other readers waiting.
struct Claims<'a> {
    cache: &'a BlockCache,
    blocks: Vec<u64>,
}

impl Drop for Claims<'_> {
    fn drop(&mut self) {
        if !self.blocks.is_empty() {
            self.cache.release(&self.blocks);
        }
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
        self.read_into(buf, offset).map_err(io_err)
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

    /// Prefetch: decode the range's data blocks into the block cache (and, on a lazy
    /// disk, fetch the ones the store lacks even when the cache is off).
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size(), offset, len)?;
        if !self.cache.filling() && self.upstream.is_none() {
            return Ok(());
        }
        let mut buf = vec![0u8; len.min(PREFETCH_BYTES) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(PREFETCH_BYTES) as usize;
            self.read_at(&mut buf[..n], pos)?;
            pos += n as u64;
        }
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

    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if let Err(e) = check_range(self.size(), offset, buf.len() as u64) {
            return Some(Err(e));
        }
        self.read_now(buf, offset).then_some(Ok(()))
    }

    fn try_extents(&self, offset: u64, len: u64) -> Option<io::Result<Vec<DiskExtent>>> {
        if let Err(e) = check_range(self.size(), offset, len) {
            return Some(Err(e));
        }
        if len == 0 {
            return Some(Ok(Vec::new()));
        }
        let bs = self.version.block_size as u64;
        let from = offset / bs;
        let to = (offset + len).div_ceil(bs).min(from + MAX_EXTENT_BLOCKS);
        let runs = self.known_block_runs(from, to)?;
        Some(Ok(block_runs_to_extents(
            &runs,
            bs,
            offset,
            (offset + len).min(to * bs),
        )))
    }
}

fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::ReadOnlyFilesystem,
        "a committed version is read-only",
    )
}
