//! Bundles: a version in one file, for places no network reaches.
//!
//! A branch office behind a thin link, a laptop being set up in a lab: the gold
//! image travels on a USB stick or a DVD, and only the rest goes over the wire. A
//! bundle carries exactly what a pull would — data blocks, tree nodes and the version
//! record — in the same object stream ([`crate::frame`]), so it is compressed as one
//! stream, parsed with the same limits, and verified object by object on import. A
//! bundle made `--since` an older version holds only what differs from that version
//! (shared subtrees are skipped without being read) and sends changed blocks as
//! deltas against the block at the same place in the older version and against its
//! pages elsewhere ([`crate::pages`], indexed for the export), exactly as a pull
//! does; importing it needs that version.
//!
//! ```text
//! file    := magic hlen:u32le header stream
//! magic   := "STRBNDL" 0x01                 the last byte is the bundle format
//! header  := JSON (BundleHeader), hlen bytes, at most 64 KiB
//! stream  := zstd( "STRXFER" 0x01 frame* end )   see crate::frame; objects only,
//!            children before parents, the version record last
//! ```
//!
//! Because every node follows its children and the record follows the root, the
//! importer can hand objects to [`WriteSession::add_received`] in file order, a batch
//! at a time, holding one batch in memory whatever the image size; and the store's
//! rule "a node is taken only once its subtree is present" checks completeness for
//! free. A damaged or truncated bundle is refused before any branch moves; what was
//! already received stays unreferenced and goes at the next gc.
//!
//! Memory: the exporter remembers the ids it has written (to write a block shared by
//! many places once), about 50 bytes per distinct object — some 80 MB for a fully
//! populated 100 GiB image of 64 KiB blocks; the importer holds one batch.

use std::collections::HashSet;
use std::io::{Read, Write};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use strata_store::tree::entry_span;
use strata_store::{
    BranchUpdate, ChunkId, Entry, ObjectKind, RefKind, Store, StoreError, Version, VersionId,
    WriteSession,
};

use crate::error::{Result, SyncError};
use crate::frame::{Body, Frame, FrameReader, FrameWriter, DEFAULT_LEVEL};

pub const BUNDLE_MAGIC: &[u8; 8] = b"STRBNDL\x01";
pub const BUNDLE_FORMAT: u32 = 1;
const MAX_HEADER: usize = 64 << 10;
/// Objects handed to the store at a time on import.
const IMPORT_BATCH_BYTES: usize = 8 << 20;

/// What a bundle says about itself (JSON, before the object stream).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BundleHeader {
    pub format: u32,
    /// The image the version was exported from (the default image on import).
    pub image: String,
    /// The version carried (hex).
    pub version: String,
    /// When set, the bundle holds only what differs from this version (hex), which
    /// the importing store must hold.
    pub since: Option<String>,
    pub virtual_size: u64,
    pub block_size: u32,
    /// Seconds since the Unix epoch.
    pub created: i64,
    pub producer: String,
}

/// What an export wrote or an import read.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BundleStats {
    pub data_objects: u64,
    pub tree_objects: u64,
    pub version_objects: u64,
    /// Uncompressed bytes of the objects.
    pub logical_bytes: u64,
    /// Objects stored as deltas against the `since` version.
    pub deltas: u64,
    /// Bytes of the bundle file.
    pub file_bytes: u64,
    /// Import only: objects the store did not already hold.
    pub new_objects: u64,
}

impl BundleStats {
    fn count(&mut self, kind: ObjectKind, raw: usize) {
        match kind {
            ObjectKind::Data => self.data_objects += 1,
            ObjectKind::Tree => self.tree_objects += 1,
            ObjectKind::Version => self.version_objects += 1,
        }
        self.logical_bytes += raw as u64;
    }
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Hold only what differs from this version (the receiver must have it).
    pub since: Option<VersionId>,
    /// zstd level of the stream.
    pub level: i32,
    /// With `since`: let blocks reference 4 KiB pages that version holds at other
    /// places (see [`crate::pages`]).
    pub pages: bool,
}

impl Default for ExportOptions {
    fn default() -> ExportOptions {
        ExportOptions {
            since: None,
            level: DEFAULT_LEVEL,
            pages: true,
        }
    }
}

/// Counts bytes written through it.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.inner.write_all(b)?;
        self.n += b.len() as u64;
        Ok(())
    }
}

struct Exporter<'a, W: Write> {
    store: &'a Store,
    frames: FrameWriter,
    out: Counting<W>,
    level: i32,
    seen: HashSet<ChunkId>,
    stats: BundleStats,
    covered: u64,
    progress: &'a dyn Fn(u64),
    /// The `since` version's pages: blocks may reference them (see [`crate::pages`]).
    pages: Option<crate::pages::PageIndex>,
}

impl<W: Write> Exporter<'_, W> {
    fn put(&mut self, f: &Frame) -> Result<()> {
        self.frames.frame(f)?;
        let b = self.frames.take();
        self.out.put(&b)
    }

    /// Write `objs` (id, counterpart in the `since` tree), read in one go and encoded
    /// on all cores.
    fn objects(&mut self, objs: &[(ChunkId, Option<ChunkId>)]) -> Result<()> {
        let ids: Vec<ChunkId> = objs.iter().map(|(id, _)| *id).collect();
        let bases: Vec<ChunkId> = objs.iter().filter_map(|(_, b)| *b).collect();
        let raws = self.store.read_objects(&ids)?;
        let mut base_raws = self.store.read_objects(&bases)?.into_iter();
        let mut work = Vec::with_capacity(objs.len());
        for ((id, base), raw) in objs.iter().zip(raws) {
            let (kind, raw) = raw.ok_or(StoreError::MissingObject { id: *id, kind: "" })?;
            let base = base.and_then(|b| match base_raws.next().flatten() {
                Some((bkind, braw)) if bkind == kind => Some((b, braw)),
                _ => None,
            });
            work.push((kind, *id, raw, base));
        }
        let (level, store, pages) = (self.level, self.store, self.pages.as_ref());
        let frames: Vec<(Frame, usize, bool)> = work
            .into_par_iter()
            .map(|(kind, id, raw, base)| {
                let len = raw.len();
                let base = base.as_ref().map(|(b, braw)| (*b, braw.as_slice()));
                let body = match kind {
                    ObjectKind::Data => crate::pages::pages_body(
                        raw,
                        &id,
                        base,
                        pages,
                        |ids| store.read_chunks(ids).ok(),
                        level,
                    ),
                    _ => crate::delta::smaller_body(raw, &id, base, level),
                };
                let delta = !matches!(body, Body::Raw(_));
                (Frame::Object { kind, id, body }, len, delta)
            })
            .collect();
        for (f, len, delta) in &frames {
            if let Frame::Object { kind, .. } = f {
                self.stats.count(*kind, *len);
            }
            self.stats.deltas += *delta as u64;
            self.put(f)?;
        }
        Ok(())
    }

    /// Write the subtree under node `id` at `level`, skipping what the `since` tree
    /// (`base`, its node at the same place) shares and what was written already.
    fn subtree(&mut self, level: u8, id: ChunkId, base: Option<ChunkId>) -> Result<()> {
        let span = entry_span(level + 1);
        if base == Some(id) || !self.seen.insert(id) {
            self.covered += span;
            (self.progress)(self.covered);
            return Ok(());
        }
        let node = self.store.load_node(&id)?;
        let base_node = base
            .and_then(|b| self.store.load_node(&b).ok())
            .filter(|n| n.level == level);
        let pairs: Vec<(ChunkId, Option<ChunkId>)> = node
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let b = base_node
                    .as_ref()
                    .and_then(|n| n.entries.get(i))
                    .and_then(Entry::id);
                Some((e.id()?, b))
            })
            .collect();
        if level == 0 {
            let fresh: Vec<(ChunkId, Option<ChunkId>)> = pairs
                .into_iter()
                .filter(|(c, b)| *b != Some(*c) && self.seen.insert(*c))
                .collect();
            self.objects(&fresh)?;
            self.covered += span;
            (self.progress)(self.covered);
        } else {
            for (c, b) in pairs {
                self.subtree(level - 1, c, b)?;
            }
        }
        let base = base_node.and(base);
        self.objects(&[(id, base)])
    }
}

/// Write version `vid` (of `image`) as a bundle to `out`. `progress` is told how many
/// blocks of the image have been covered (of `virtual_size / block_size`).
pub fn export(
    store: &Store,
    image: &str,
    vid: &VersionId,
    opts: &ExportOptions,
    out: impl Write,
    progress: &dyn Fn(u64),
) -> Result<(BundleHeader, BundleStats)> {
    // Held for the duration: a gc running meanwhile keeps everything we read.
    let mut pin = WriteSession::begin(store, &format!("bundle export {image}"))?;
    pin.pin_version(vid)?;
    let version = store.load_version(vid)?;
    let since_root = match &opts.since {
        Some(s) => {
            pin.pin_version(s)?;
            let sv = store.load_version(s)?;
            if sv.depth != version.depth || sv.block_size != version.block_size {
                return Err(SyncError::Invalid(format!(
                    "version {} has a different size or block size than {}: a bundle \
                     since it cannot share its blocks (export the whole version instead)",
                    s.short(),
                    vid.short()
                )));
            }
            sv.root_entry().ok().and_then(|e| e.id())
        }
        None => None,
    };
    let header = BundleHeader {
        format: BUNDLE_FORMAT,
        image: image.to_string(),
        version: vid.to_hex(),
        since: opts.since.map(|s| s.to_hex()),
        virtual_size: version.virtual_size,
        block_size: version.block_size,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
        producer: format!("strata {}", env!("CARGO_PKG_VERSION")),
    };
    // The `since` version's pages, indexed in a scratch directory for this export.
    let scratch = match opts.since.filter(|_| opts.pages) {
        Some(_) => Some(tempfile::tempdir()?),
        None => None,
    };
    let pages = match (&scratch, &opts.since) {
        (Some(dir), Some(s)) => Some(crate::pages::PageIndex::build(
            store,
            s,
            &dir.path().join("since.idx"),
        )?),
        _ => None,
    };
    let json = serde_json::to_vec(&header).expect("headers serialize");
    let mut out = Counting { inner: out, n: 0 };
    out.put(BUNDLE_MAGIC)?;
    out.put(&(json.len() as u32).to_le_bytes())?;
    out.put(&json)?;
    let mut ex = Exporter {
        store,
        frames: FrameWriter::new(opts.level)?,
        out,
        level: opts.level,
        seen: HashSet::new(),
        stats: BundleStats::default(),
        covered: 0,
        progress,
        pages,
    };
    if let Ok(Entry::Present(root)) = version.root_entry() {
        ex.subtree(version.depth - 1, root, since_root)?;
    }
    ex.objects(&[(*vid, None)])?;
    let tail = ex.frames.finish()?;
    ex.out.put(&tail)?;
    ex.out.inner.flush()?;
    let mut stats = ex.stats;
    stats.file_bytes = ex.out.n;
    drop(pin);
    Ok((header, stats))
}

/// Read a bundle's header (leaving `input` at the start of its object stream).
pub fn read_header(input: &mut impl Read) -> Result<BundleHeader> {
    let not_bundle = || SyncError::Invalid("not a strata bundle (bad magic)".into());
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic).map_err(|_| not_bundle())?;
    if magic[..7] != BUNDLE_MAGIC[..7] {
        return Err(not_bundle());
    }
    if magic[7] != BUNDLE_MAGIC[7] {
        return Err(SyncError::Invalid(format!(
            "bundle format {} is not supported (this strata reads format {})",
            magic[7], BUNDLE_MAGIC[7]
        )));
    }
    let mut len = [0u8; 4];
    input
        .read_exact(&mut len)
        .map_err(|_| SyncError::Truncated)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HEADER {
        return Err(SyncError::Invalid(format!(
            "bundle header of {len} bytes is implausibly large"
        )));
    }
    let mut json = vec![0u8; len];
    input
        .read_exact(&mut json)
        .map_err(|_| SyncError::Truncated)?;
    let h: BundleHeader = serde_json::from_slice(&json)
        .map_err(|e| SyncError::Invalid(format!("bundle header: {e}")))?;
    if h.format != BUNDLE_FORMAT {
        return Err(SyncError::Invalid(format!(
            "bundle header format {} is not supported",
            h.format
        )));
    }
    strata_store::validate_name(&h.image)
        .map_err(|e| SyncError::Invalid(format!("bundle header: {e}")))?;
    for (what, v) in [("version", Some(&h.version)), ("since", h.since.as_ref())] {
        if let Some(v) = v {
            ChunkId::from_hex(v).ok_or_else(|| {
                SyncError::Invalid(format!("bundle header: {what} {v:?} is not an id"))
            })?;
        }
    }
    Ok(h)
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Image to put the version in (default: the header's).
    pub image: Option<String>,
    /// Branch to move to the version.
    pub branch: String,
    /// Move the branch even when its tip is not an ancestor of the bundle's version.
    pub force: bool,
}

/// Is `ancestor` one of `parents` or in their history, as far as this store holds it?
fn is_ancestor(store: &Store, ancestor: &VersionId, parents: Vec<VersionId>) -> bool {
    let mut todo = parents;
    let mut seen = HashSet::new();
    while let Some(v) = todo.pop() {
        if v == *ancestor {
            return true;
        }
        if !seen.insert(v) || seen.len() > 100_000 {
            continue;
        }
        if let Ok(rec) = store.load_version(&v) {
            todo.extend(rec.parent_ids().unwrap_or_default());
        }
    }
    false
}

/// Import a bundle from `input` into `store`: verify every object, then move
/// `opts.branch` of the image to the version by compare-and-swap — when the branch
/// is new, already there, or behind (its tip an ancestor of the version); otherwise
/// only with `opts.force`. `progress` is told the bundle bytes read so far.
pub fn import(
    store: &Store,
    mut input: impl Read,
    opts: &ImportOptions,
    progress: &dyn Fn(u64),
) -> Result<(BundleHeader, BundleStats, Option<VersionId>)> {
    let header = read_header(&mut input)?;
    let vid = ChunkId::from_hex(&header.version).expect("checked by read_header");
    let image = opts.image.clone().unwrap_or_else(|| header.image.clone());
    strata_store::validate_name(&image)?;
    let mut session = WriteSession::begin(store, &format!("bundle import {image}"))?;
    if let Some(since) = header.since.as_deref().and_then(ChunkId::from_hex) {
        if !session.lacking(&[since])?.is_empty() {
            return Err(SyncError::Invalid(format!(
                "this bundle holds only the changes since version {since}, which this \
                 store lacks: import a bundle of that version first (or a whole bundle)"
            )));
        }
    }
    // Where the branch is now, and whether moving it is allowed.
    let current = match store.get_ref(&image, RefKind::Branch, &opts.branch) {
        Ok(v) => v,
        Err(StoreError::NoSuchImage(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let mut stats = BundleStats {
        file_bytes: 8 + 4 + serde_json::to_vec(&header).map_or(0, |j| j.len() as u64),
        ..BundleStats::default()
    };
    let mut reader = FrameReader::new()?;
    let mut buf = vec![0u8; 256 << 10];
    let mut batch: Vec<(ObjectKind, ChunkId, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut got_version: Option<Version> = None;
    let flush = |session: &mut WriteSession, batch: &mut Vec<(ObjectKind, ChunkId, Vec<u8>)>| {
        let refs: Vec<(ObjectKind, ChunkId, &[u8])> = batch
            .iter()
            .map(|(k, id, r)| (*k, *id, r.as_slice()))
            .collect();
        let n = session.add_received(&refs);
        batch.clear();
        n
    };
    'read: loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stats.file_bytes += n as u64;
        progress(stats.file_bytes);
        reader.push(&buf[..n]);
        while let Some(frame) = reader.next_frame()? {
            let (kind, id, body) = match frame {
                Frame::End => break 'read,
                Frame::Object { kind, id, body } => (kind, id, body),
                Frame::Missing(_) | Frame::Error(_) => {
                    return Err(SyncError::Invalid(
                        "bundle holds a frame that is not an object".into(),
                    ))
                }
            };
            if got_version.is_some() {
                return Err(SyncError::Invalid(
                    "bundle continues after its version record".into(),
                ));
            }
            stats.deltas += !matches!(body, Body::Raw(_)) as u64;
            let raw = crate::delta::resolve(body, store)
                .map_err(|reason| SyncError::Corrupt { id, reason })?;
            if kind == ObjectKind::Version {
                if id != vid {
                    return Err(SyncError::Invalid(format!(
                        "bundle holds version {id}, but its header names {vid}"
                    )));
                }
                let v =
                    Version::decode(&raw).map_err(|reason| SyncError::Corrupt { id, reason })?;
                // The header is informational, but a lying one is a damaged bundle.
                if (v.virtual_size, v.block_size) != (header.virtual_size, header.block_size) {
                    return Err(SyncError::Invalid(
                        "bundle header does not match its version record".into(),
                    ));
                }
                got_version = Some(v);
            }
            stats.count(kind, raw.len());
            batch_bytes += raw.len();
            batch.push((kind, id, raw));
            if batch_bytes >= IMPORT_BATCH_BYTES {
                stats.new_objects += flush(&mut session, &mut batch)? as u64;
                batch_bytes = 0;
            }
        }
    }
    reader.finish()?;
    let Some(version) = got_version else {
        return Err(SyncError::Invalid(
            "bundle ends without its version record".into(),
        ));
    };
    stats.new_objects += flush(&mut session, &mut batch)? as u64;
    if let Some(cur) = current {
        if cur != vid
            && !opts.force
            && !is_ancestor(store, &cur, version.parent_ids().unwrap_or_default())
        {
            return Err(SyncError::Conflict(format!(
                "branch {} of {image} is at {}, which is not an ancestor of the bundle's \
                 version {}; import to another branch (--branch) or replace it (--force)",
                opts.branch,
                cur.short(),
                vid.short()
            )));
        }
    }
    session.commit_received(
        &vid,
        &BranchUpdate {
            image: image.clone(),
            branch: opts.branch.clone(),
            expected: current,
            create_image: true,
        },
    )?;
    Ok((header, stats, current))
}

/// Fuzzing entry point: import `data` as a bundle into a scratch store (made once per
/// process). Any outcome but a panic is fine; a bundle that imports must verify.
#[doc(hidden)]
pub fn fuzz_import(data: &[u8]) -> bool {
    use std::sync::OnceLock;
    static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    let (_, store) = STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let store = Store::init(&dir.path().join("store")).expect("a scratch store");
        (dir, store)
    });
    let opts = ImportOptions {
        image: Some("fuzz".into()),
        branch: "main".into(),
        force: true,
    };
    let ok = import(store, data, &opts, &|_| {}).is_ok();
    if ok {
        let report = strata_store::verify::verify(store, &|_| {}).expect("verify runs");
        assert!(report.ok(), "an imported bundle left the store damaged");
    }
    ok
}
