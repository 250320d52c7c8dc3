//! Write sessions: how new objects and versions enter the store.
//!
//! A session appends new objects to packs of its own, looks up every object it does
//! not write (deduplication), and at the end commits a version by moving a branch
//! with compare-and-swap. Until that commit nothing it wrote is visible.
//!
//! ## Safety against a concurrent gc
//!
//! gc deletes objects no ref reaches. A session refers to objects long before its
//! version is reachable, so it protects them in the catalog:
//!
//! * every pack it writes is registered to it *before* the file exists
//!   (`session_packs`), so gc neither deletes the file as an orphan nor sweeps the
//!   objects in it;
//! * every existing object it reuses is pinned (`session_pins`) in the *same
//!   transaction* that found it present. gc decides what to delete inside one
//!   transaction that also reads all pins, so either gc ran first (the lookup then
//!   finds the object gone and the session writes it again) or the pin is seen.
//!
//! A session is alive while its process holds an flock on `sessions/<id>.lock`; the
//! kernel drops that lock when the process dies, even by `kill -9`, and gc then
//! removes what the dead session left.

use std::collections::HashSet;
use std::fs::File;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;

use rayon::prelude::*;
use rusqlite::params;
use serde::Serialize;

use crate::catalog::{self, now};
use crate::error::{IoContext, Result, StoreError};
use crate::id::{random_hex16, ChunkId, ObjectKind, VersionId};
use crate::pack::{encode_payload, PackEntry, PackWriter, TARGET_PACK_SIZE};
use crate::store::{cas_branch, create_image, Store};
use crate::tree::{Entry, TreeBuilder};
use crate::version::{Version, VERSION_FORMAT};

/// One block of input to a new version.
pub enum BlockInput {
    /// Never written (a hole in the source).
    Unwritten,
    /// Known to be zero without reading it.
    Zero,
    /// Content; stored as [`Entry::Zero`] if it is all zero bytes.
    Data(Vec<u8>),
}

/// Blocks classified (zero or not) and hashed, on all cores, ready for a session.
pub struct PreparedBlocks(Vec<(Entry, Option<Vec<u8>>)>);

impl PreparedBlocks {
    pub fn new(blocks: Vec<BlockInput>) -> PreparedBlocks {
        PreparedBlocks(
            blocks
                .into_par_iter()
                .map(|b| match b {
                    BlockInput::Unwritten => (Entry::Unwritten, None),
                    BlockInput::Zero => (Entry::Zero, None),
                    BlockInput::Data(buf) if is_zero(&buf) => (Entry::Zero, None),
                    BlockInput::Data(buf) => (Entry::Present(ChunkId::of(&buf)), Some(buf)),
                })
                .collect(),
        )
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What a session wrote and reused.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WriteStats {
    pub blocks: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    pub unwritten_blocks: u64,
    /// Logical bytes of data blocks.
    pub data_bytes: u64,
    /// Data chunks that were new to the store, their raw and stored size.
    pub new_chunks: u64,
    pub new_raw_bytes: u64,
    pub new_stored_bytes: u64,
    /// Data blocks that the store already held (deduplicated).
    pub reused_chunks: u64,
    pub new_tree_nodes: u64,
    pub new_tree_bytes: u64,
}

/// A version being built: its tree under construction and its block counts.
pub struct VersionDraft {
    tree: TreeBuilder,
    virtual_size: u64,
    block_size: u32,
}

impl VersionDraft {
    pub fn blocks_total(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size as u64)
    }

    pub fn blocks_pushed(&self) -> u64 {
        self.tree.pushed()
    }
}

/// The branch a received version is published on ([`WriteSession::commit_received`]).
#[derive(Clone, Debug)]
pub struct BranchUpdate {
    pub image: String,
    pub branch: String,
    /// The tip the caller saw (`None`: the branch must not exist yet).
    pub expected: Option<VersionId>,
    /// Create the image (with the version's block size) if it does not exist.
    pub create_image: bool,
}

/// Where a commit goes.
#[derive(Clone, Debug)]
pub struct CommitTarget {
    pub image: String,
    pub branch: String,
    /// The branch tip this version was made against (`None`: the branch must not exist).
    pub expected: Option<VersionId>,
    /// Create the image if it does not exist yet.
    pub create_image: bool,
    pub parents: Vec<VersionId>,
    pub author: String,
    pub message: String,
}

/// The store a session writes to: borrowed (the usual case) or shared, so that a
/// session can outlive any one borrow (a hub keeps a receive session open across the
/// HTTP requests of one upload; see [`WriteSession::begin_owned`]).
enum StoreRef<'s> {
    Borrowed(&'s Store),
    Shared(Arc<Store>),
}

impl Deref for StoreRef<'_> {
    type Target = Store;
    fn deref(&self) -> &Store {
        match self {
            StoreRef::Borrowed(s) => s,
            StoreRef::Shared(s) => s,
        }
    }
}

pub struct WriteSession<'s> {
    store: StoreRef<'s>,
    id: String,
    lock_path: PathBuf,
    _lock: File,
    data_pack: Option<PackWriter>,
    tree_pack: Option<PackWriter>,
    /// Objects in this session's packs that are not indexed yet.
    unflushed: HashSet<ChunkId>,
    pub stats: WriteStats,
    finished: bool,
    /// gc's repacking session: objects it appends replace their index entries.
    relocate: bool,
}

fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { b.align_to::<u128>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

impl<'s> WriteSession<'s> {
    /// Start a session; `purpose` is shown to operators (e.g. "import disk.qcow2").
    pub fn begin(store: &'s Store, purpose: &str) -> Result<WriteSession<'s>> {
        Self::begin_with(StoreRef::Borrowed(store), purpose)
    }

    fn begin_with(store: StoreRef<'s>, purpose: &str) -> Result<WriteSession<'s>> {
        let id = random_hex16();
        let lock_path = store.sessions_dir().join(format!("{id}.lock"));
        // Lock under a temporary name, then rename: a `.lock` file is never visible
        // unlocked while its writer lives, so gc may treat an unlocked one as dead.
        let tmp_path = store.sessions_dir().join(format!("{id}.lock.new"));
        let lock = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .at(&tmp_path)?;
        lock.lock().at(&tmp_path)?;
        std::fs::rename(&tmp_path, &lock_path).at(&lock_path)?;
        // The lock is held before the row exists: whoever sees the row can trust it.
        store.cat().conn.execute(
            "INSERT INTO sessions(id, pid, started, purpose) VALUES(?, ?, ?, ?)",
            params![id, std::process::id(), now(), purpose],
        )?;
        Ok(WriteSession {
            store,
            id,
            lock_path,
            _lock: lock,
            data_pack: None,
            tree_pack: None,
            unflushed: HashSet::new(),
            stats: WriteStats::default(),
            finished: false,
            relocate: false,
        })
    }

    /// Start a session that owns a handle to its store instead of borrowing it, so it
    /// can be kept across requests (a hub's upload in progress) or moved between
    /// threads. It protects what it holds from gc exactly like [`WriteSession::begin`].
    pub fn begin_owned(store: Arc<Store>, purpose: &str) -> Result<WriteSession<'static>> {
        WriteSession::begin_with(StoreRef::Shared(store), purpose)
    }

    /// Make appended objects replace existing index entries (gc's repacking).
    pub(crate) fn set_relocate(&mut self) {
        self.relocate = true;
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Read branch `branch` of `image` and pin the version it points at, atomically, so
    /// a new version can share its objects even if the branch is deleted meanwhile.
    pub fn pin_branch(&mut self, image: &str, branch: &str) -> Result<Option<VersionId>> {
        let session = self.id.clone();
        self.store.cat().write(|tx| {
            let v = crate::store::get_ref(tx, image, crate::store::RefKind::Branch, branch)?;
            if let Some(v) = v {
                tx.execute(
                    "INSERT INTO session_pins(session, ids) VALUES(?, ?)",
                    params![session, &v.0[..]],
                )?;
            }
            Ok(v)
        })
    }

    /// Pin a version (and so everything it reaches) for the rest of this session.
    pub fn pin_version(&mut self, v: &VersionId) -> Result<()> {
        let session = self.id.clone();
        self.store.cat().write(|tx| {
            let n: i64 = tx.query_row(
                "SELECT count(*) FROM versions WHERE id = ?",
                [&v.0[..]],
                |r| r.get(0),
            )?;
            if n == 0 {
                return Err(StoreError::MissingObject {
                    id: *v,
                    kind: "version",
                });
            }
            tx.execute(
                "INSERT INTO session_pins(session, ids) VALUES(?, ?)",
                params![session, &v.0[..]],
            )?;
            Ok(())
        })
    }

    pub fn new_version(&self, virtual_size: u64, block_size: u32) -> Result<VersionDraft> {
        crate::store::validate_block_size(block_size as u64)?;
        Ok(VersionDraft {
            tree: TreeBuilder::new(virtual_size.div_ceil(block_size as u64)),
            virtual_size,
            block_size,
        })
    }

    /// Of `ids`, return those already indexed, pinning them in the same transaction.
    fn lookup_and_pin(&mut self, ids: &[ChunkId]) -> Result<HashSet<ChunkId>> {
        let ids: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !self.unflushed.contains(id))
            .copied()
            .collect();
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let session = self.id.clone();
        self.store.cat().write(|tx| {
            let found = catalog::rowids(tx, &ids)?;
            let mut present = HashSet::new();
            let mut blob = Vec::new();
            for (id, r) in ids.iter().zip(found) {
                if r.is_some() && present.insert(*id) {
                    blob.extend_from_slice(&id.0);
                }
            }
            if !blob.is_empty() {
                tx.execute(
                    "INSERT INTO session_pins(session, ids) VALUES(?, ?)",
                    params![session, blob],
                )?;
            }
            Ok(present)
        })
    }

    /// Add the next blocks of `draft`, in order.
    pub fn add_blocks(&mut self, draft: &mut VersionDraft, blocks: Vec<BlockInput>) -> Result<()> {
        self.add_prepared(draft, PreparedBlocks::new(blocks))
    }

    /// Add blocks already hashed by [`PreparedBlocks::new`] (which a reader thread can
    /// run while this session compresses the previous batch).
    pub fn add_prepared(&mut self, draft: &mut VersionDraft, blocks: PreparedBlocks) -> Result<()> {
        let classified = blocks.0;
        let mut objects = Vec::new();
        let mut seen = HashSet::new();
        for (e, buf) in &classified {
            if let (Entry::Present(id), Some(buf)) = (e, buf) {
                if seen.insert(*id) {
                    objects.push((*id, buf.as_slice()));
                }
            }
        }
        let written = self.store_objects(ObjectKind::Data, &objects)?;
        self.stats.reused_chunks += (classified
            .iter()
            .filter(|(e, _)| matches!(e, Entry::Present(_)))
            .count()
            - written) as u64;
        let mut nodes: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        for (e, buf) in &classified {
            self.stats.blocks += 1;
            match e {
                Entry::Unwritten => self.stats.unwritten_blocks += 1,
                Entry::Zero => self.stats.zero_blocks += 1,
                Entry::Present(_) => {
                    self.stats.data_blocks += 1;
                    self.stats.data_bytes += buf.as_ref().map_or(0, |b| b.len() as u64);
                }
            }
            draft.tree.push(*e, &mut |id, bytes| {
                nodes.push((id, bytes));
                Ok::<(), StoreError>(())
            })?;
        }
        self.store_nodes(nodes)
    }

    /// Pin `ids` (objects this session did not write) for the rest of the session, in
    /// one transaction; an id the store does not hold is an error.
    fn pin_existing(&mut self, ids: &[ChunkId], kind: &'static str) -> Result<()> {
        let present = self.lookup_and_pin(ids)?;
        match ids
            .iter()
            .find(|id| !present.contains(id) && !self.unflushed.contains(id))
        {
            Some(id) => Err(StoreError::MissingObject { id: *id, kind }),
            None => Ok(()),
        }
    }

    /// Add the next blocks of `draft` as entries already in the store (taken from an
    /// existing version), without their data. Present chunks are pinned in one
    /// transaction, as deduplicated blocks are, and must exist.
    pub fn add_entries(&mut self, draft: &mut VersionDraft, entries: &[Entry]) -> Result<()> {
        let ids = crate::tree::present_ids(entries);
        self.pin_existing(&ids, "data")?;
        let bs = draft.block_size as u64;
        let mut nodes: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        for e in entries {
            let index = draft.tree.pushed();
            self.stats.blocks += 1;
            match e {
                Entry::Unwritten => self.stats.unwritten_blocks += 1,
                Entry::Zero => self.stats.zero_blocks += 1,
                Entry::Present(_) => {
                    self.stats.data_blocks += 1;
                    self.stats.reused_chunks += 1;
                    self.stats.data_bytes += bs.min(draft.virtual_size.saturating_sub(index * bs));
                }
            }
            draft.tree.push(*e, &mut |id, bytes| {
                nodes.push((id, bytes));
                Ok::<(), StoreError>(())
            })?;
        }
        self.store_nodes(nodes)
    }

    /// Add a whole subtree of an existing version as the next blocks of `draft`:
    /// `entry` is what that version's level-`level + 1` node holds for the level-`level`
    /// node over these blocks (see [`TreeBuilder::push_subtree`]; the draft must stand
    /// at a multiple of the subtree's span and its tree must be deeper than
    /// `level + 1`). A node id is pinned (which protects everything under it) and must
    /// exist. Returns the number of blocks added.
    ///
    /// The blocks count in `stats.blocks`, and a uniform subtree's in its kind's count;
    /// the data and zero blocks under a node are not known without reading it, so the
    /// caller adds them to `stats.data_blocks`, `stats.zero_blocks` and
    /// `stats.data_bytes` (which the version record copies) before committing.
    pub fn add_subtree(
        &mut self,
        draft: &mut VersionDraft,
        level: u8,
        entry: Entry,
    ) -> Result<u64> {
        let span = crate::tree::entry_span(level.saturating_add(1));
        let pushed = draft.tree.pushed();
        if level as usize + 1 >= draft.tree.depth() as usize
            || !pushed.is_multiple_of(span)
            || pushed >= draft.blocks_total()
        {
            return Err(StoreError::Invalid(format!(
                "a level-{level} subtree does not fit at block {pushed} of a {}-level tree of {} blocks",
                draft.tree.depth(),
                draft.blocks_total()
            )));
        }
        if let Entry::Present(id) = entry {
            self.pin_existing(&[id], "tree")?;
        }
        let mut nodes: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        let n = draft.tree.push_subtree(level, entry, &mut |id, bytes| {
            nodes.push((id, bytes));
            Ok::<(), StoreError>(())
        })?;
        self.stats.blocks += n;
        match entry {
            Entry::Unwritten => self.stats.unwritten_blocks += n,
            Entry::Zero => self.stats.zero_blocks += n,
            Entry::Present(_) => {}
        }
        self.store_nodes(nodes)?;
        Ok(n)
    }

    fn store_nodes(&mut self, nodes: Vec<(ChunkId, Vec<u8>)>) -> Result<()> {
        let objs: Vec<(ChunkId, &[u8])> = nodes.iter().map(|(i, b)| (*i, b.as_slice())).collect();
        self.store_objects(ObjectKind::Tree, &objs).map(drop)
    }

    /// Store objects not yet in the store; returns how many were new.
    fn store_objects(&mut self, kind: ObjectKind, objects: &[(ChunkId, &[u8])]) -> Result<usize> {
        if objects.is_empty() {
            return Ok(0);
        }
        let ids: Vec<ChunkId> = objects.iter().map(|(id, _)| *id).collect();
        let present = self.lookup_and_pin(&ids)?;
        let level = self.store.config.compression_level;
        let missing: Vec<&(ChunkId, &[u8])> = objects
            .iter()
            .filter(|(id, _)| !present.contains(id) && !self.unflushed.contains(id))
            .collect();
        let encoded: Vec<(ChunkId, usize, u8, Vec<u8>)> = missing
            .par_iter()
            .map(|(id, raw)| {
                let (codec, payload) = encode_payload(raw, level);
                (*id, raw.len(), codec, payload)
            })
            .collect();
        let n = encoded.len();
        for (id, raw_len, codec, payload) in encoded {
            match kind {
                ObjectKind::Data => {
                    self.stats.new_chunks += 1;
                    self.stats.new_raw_bytes += raw_len as u64;
                    self.stats.new_stored_bytes += payload.len() as u64;
                }
                _ => {
                    self.stats.new_tree_nodes += 1;
                    self.stats.new_tree_bytes += payload.len() as u64;
                }
            }
            self.append(kind, id, raw_len, codec, &payload)?;
        }
        Ok(n)
    }

    /// Append an already-encoded object (gc uses this to move objects between packs).
    pub fn append(
        &mut self,
        kind: ObjectKind,
        id: ChunkId,
        raw_len: usize,
        codec: u8,
        payload: &[u8],
    ) -> Result<PackEntry> {
        let data = kind == ObjectKind::Data;
        if (if data {
            &self.data_pack
        } else {
            &self.tree_pack
        })
        .is_none()
        {
            let w = self.new_pack()?;
            *(if data {
                &mut self.data_pack
            } else {
                &mut self.tree_pack
            }) = Some(w);
        }
        let slot = if data {
            &mut self.data_pack
        } else {
            &mut self.tree_pack
        };
        let w = slot.as_mut().expect("pack was just opened");
        let e = w.append(id, kind, raw_len, codec, payload)?;
        self.unflushed.insert(id);
        if w.len() >= TARGET_PACK_SIZE {
            let w = slot.take().expect("pack is open");
            // Data before the nodes that name it: once a node is indexed, its subtree
            // must be too (receivers rely on "node present => subtree present").
            if !data {
                if let Some(d) = self.data_pack.take() {
                    self.flush_pack(d)?;
                }
            }
            self.flush_pack(w)?;
        }
        Ok(e)
    }

    fn new_pack(&mut self) -> Result<PackWriter> {
        let name = random_hex16();
        // Registered before the file exists: gc must never take it for an orphan.
        self.store.cat().conn.execute(
            "INSERT INTO session_packs(pack, session) VALUES(?, ?)",
            params![name, self.id],
        )?;
        let path = self.store.tmp_dir().join(format!("{}-{name}.tmp", self.id));
        PackWriter::create(name, path)
    }

    fn flush_pack(&mut self, w: PackWriter) -> Result<()> {
        let fin = w.finish()?;
        self.store.backend.put_pack(&fin.name, &fin.path)?;
        self.store.cat().write(|tx| {
            catalog::insert_pack(tx, &fin.name, fin.size, &fin.entries, self.relocate)
        })?;
        for e in &fin.entries {
            self.unflushed.remove(&e.id);
        }
        Ok(())
    }

    /// Make every object written so far durable and indexed.
    pub fn flush(&mut self) -> Result<()> {
        for w in [self.data_pack.take(), self.tree_pack.take()]
            .into_iter()
            .flatten()
        {
            if w.is_empty() {
                let p = w.path().to_path_buf();
                drop(w);
                let _ = std::fs::remove_file(p);
            } else {
                self.flush_pack(w)?;
            }
        }
        Ok(())
    }

    /// Finish `draft` and commit it as a new version on `target`'s branch.
    pub fn commit(
        self,
        draft: VersionDraft,
        target: &CommitTarget,
    ) -> Result<(VersionId, Version, WriteStats)> {
        self.commit_with(draft, target, |_| Ok(()))
    }

    /// [`commit`](Self::commit), calling `before_publish` with the new version's id
    /// once its objects are durable and before the branch moves. A caller that must
    /// learn after a crash whether its commit was published records the id there
    /// (a disk session does; see strata-block) and later looks it up in the catalog.
    pub fn commit_with(
        mut self,
        draft: VersionDraft,
        target: &CommitTarget,
        before_publish: impl FnOnce(&VersionId) -> Result<()>,
    ) -> Result<(VersionId, Version, WriteStats)> {
        if draft.tree.pushed() != draft.blocks_total() {
            return Err(StoreError::Invalid(format!(
                "version has {} of its {} blocks",
                draft.tree.pushed(),
                draft.blocks_total()
            )));
        }
        let depth = draft.tree.depth();
        let mut nodes = Vec::new();
        let root = draft.tree.finish(&mut |id, b| {
            nodes.push((id, b));
            Ok::<(), StoreError>(())
        })?;
        self.store_nodes(nodes)?;
        let version = Version {
            format: VERSION_FORMAT,
            image: target.image.clone(),
            parents: target.parents.iter().map(|p| p.to_hex()).collect(),
            time: now(),
            author: target.author.clone(),
            message: target.message.clone(),
            virtual_size: draft.virtual_size,
            block_size: draft.block_size,
            root: Version::encode_root(root),
            depth,
            data_blocks: self.stats.data_blocks,
            zero_blocks: self.stats.zero_blocks,
            data_bytes: self.stats.data_bytes,
        };
        let record = version.encode();
        let vid = ChunkId::for_object(ObjectKind::Version, &record);
        self.store_objects(ObjectKind::Version, &[(vid, &record)])?;
        self.flush()?;
        before_publish(&vid)?;
        let record_text = String::from_utf8(record).expect("JSON is UTF-8");
        self.publish(
            &vid,
            &record_text,
            draft.block_size,
            &BranchUpdate {
                image: target.image.clone(),
                branch: target.branch.clone(),
                expected: target.expected,
                create_image: target.create_image,
            },
        )?;
        self.finished = true;
        let _ = std::fs::remove_file(&self.lock_path);
        Ok((vid, version, self.stats.clone()))
    }

    /// In one durable transaction: list version `vid` (its record `record_text`), move
    /// the branch by compare-and-swap (creating the image if asked), end the session.
    fn publish(
        &mut self,
        vid: &VersionId,
        record_text: &str,
        block_size: u32,
        target: &BranchUpdate,
    ) -> Result<()> {
        let session = self.id.clone();
        self.store.cat().write_durable(|tx| {
            match tx.query_row(
                "SELECT block_size FROM images WHERE name = ?",
                [&target.image],
                |r| r.get::<_, u32>(0),
            ) {
                Ok(bs) if bs != block_size => {
                    return Err(StoreError::Invalid(format!(
                        "image {:?} has {bs}-byte blocks, this version {}",
                        target.image, block_size
                    )))
                }
                Ok(_) => {}
                Err(rusqlite::Error::QueryReturnedNoRows) if target.create_image => {
                    create_image(tx, &target.image, block_size)?
                }
                Err(rusqlite::Error::QueryReturnedNoRows) => {
                    return Err(StoreError::NoSuchImage(target.image.clone()))
                }
                Err(e) => return Err(e.into()),
            }
            tx.execute(
                "INSERT INTO versions(id, record) VALUES(?, ?) ON CONFLICT(id) DO NOTHING",
                params![&vid.0[..], record_text],
            )?;
            cas_branch(
                tx,
                &target.image,
                &target.branch,
                target.expected.as_ref(),
                vid,
            )?;
            end_session(tx, &session).map(drop)
        })
    }

    // ---- receiving objects from another store ---------------------------------------
    //
    // A transfer (hub <-> point) moves objects that already have ids. The receiver
    // asks which ids it lacks ([`WriteSession::lacking`], which pins the ones it has),
    // takes the missing objects children first ([`WriteSession::add_received`]) and
    // finally moves a branch to the version ([`WriteSession::commit_received`]). All
    // of it stays protected from a concurrent gc by this session until that commit.

    /// Of `ids`, those neither in the store nor written by this session (each once, in
    /// the order given). Every id that is present is pinned in the same transaction,
    /// so "present" stays true for the rest of the session whatever gc does.
    pub fn lacking(&mut self, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
        let present = self.lookup_and_pin(ids)?;
        let mut seen = HashSet::new();
        Ok(ids
            .iter()
            .filter(|id| !present.contains(id) && !self.unflushed.contains(id) && seen.insert(**id))
            .copied()
            .collect())
    }

    /// Add objects received from elsewhere. Each must hash to its id in its kind's
    /// domain ([`ChunkId::for_object`]); a tree node is taken only once every object it
    /// names is in the store, in this session or earlier in `objects`, and a version
    /// record only once its root node is — so in a store filled this way, *a node that
    /// is present has its whole subtree present*, and a sender may skip a subtree the
    /// receiver holds without walking it. A version's parents need not be present
    /// (history may be shallow). The whole call is refused, storing nothing, if any
    /// object fails a check: [`StoreError::Corrupt`] for a hash mismatch or a record
    /// that does not decode, [`StoreError::MissingObject`] for an absent child.
    /// Returns how many objects were new.
    pub fn add_received(&mut self, objects: &[(ObjectKind, ChunkId, &[u8])]) -> Result<usize> {
        if let Some((_, id, raw, kind)) = objects
            .par_iter()
            .map(|(k, id, raw)| (ChunkId::for_object(*k, raw), id, raw, k))
            .find_first(|(h, id, _, _)| h != *id)
            .map(|(h, id, raw, k)| (h, *id, raw.len(), *k))
        {
            return Err(StoreError::Corrupt {
                id,
                reason: format!(
                    "received {} object ({raw} bytes) does not match its id",
                    kind.name()
                ),
            });
        }
        // What the metadata names, and which of it comes earlier in this call.
        let mut earlier: HashSet<ChunkId> = HashSet::new();
        let mut needed: Vec<(ChunkId, &'static str)> = Vec::new();
        for (kind, id, raw) in objects {
            let corrupt = |reason: String| StoreError::Corrupt { id: *id, reason };
            match kind {
                ObjectKind::Data => {}
                ObjectKind::Tree => {
                    let node = crate::tree::Node::decode(raw).map_err(corrupt)?;
                    let what = if node.level == 0 { "data" } else { "tree" };
                    needed.extend(
                        crate::tree::present_ids(&node.entries)
                            .into_iter()
                            .filter(|c| !earlier.contains(c))
                            .map(|c| (c, what)),
                    );
                }
                ObjectKind::Version => {
                    let v = Version::decode(raw).map_err(corrupt)?;
                    if let Ok(Entry::Present(root)) = v.root_entry() {
                        if !earlier.contains(&root) {
                            needed.push((root, "tree"));
                        }
                    }
                }
            }
            earlier.insert(*id);
        }
        if !needed.is_empty() {
            let ids: Vec<ChunkId> = needed.iter().map(|(id, _)| *id).collect();
            let present = self.lookup_and_pin(&ids)?;
            if let Some((id, kind)) = needed
                .iter()
                .find(|(id, _)| !present.contains(id) && !self.unflushed.contains(id))
            {
                return Err(StoreError::MissingObject { id: *id, kind });
            }
        }
        let mut n = 0;
        for want in [ObjectKind::Data, ObjectKind::Tree, ObjectKind::Version] {
            let objs: Vec<(ChunkId, &[u8])> = objects
                .iter()
                .filter(|(k, _, _)| *k == want)
                .map(|(_, id, raw)| (*id, *raw))
                .collect();
            n += self.store_objects(want, &objs)?;
        }
        Ok(n)
    }

    /// Finish a transfer: make everything received durable, then in one transaction
    /// list version `vid` (which must be in the store or this session, received
    /// through [`WriteSession::add_received`] or committed locally) and move
    /// `target`'s branch to it by compare-and-swap. A conflict
    /// ([`StoreError::RefConflict`]) changes nothing; the session ends either way.
    pub fn commit_received(mut self, vid: &VersionId, target: &BranchUpdate) -> Result<Version> {
        self.flush()?;
        // Pinned while we read it: gc must not take it between this read and the commit.
        if !self.lacking(&[*vid])?.is_empty() {
            return Err(StoreError::MissingObject {
                id: *vid,
                kind: "version",
            });
        }
        let record = self.store.read_object(vid, ObjectKind::Version)?;
        let version =
            Version::decode(&record).map_err(|reason| StoreError::Corrupt { id: *vid, reason })?;
        let record_text = String::from_utf8(record).map_err(|_| StoreError::Corrupt {
            id: *vid,
            reason: "version record is not UTF-8".into(),
        })?;
        self.publish(vid, &record_text, version.block_size, target)?;
        self.finished = true;
        let _ = std::fs::remove_file(&self.lock_path);
        Ok(version)
    }

    /// End the session without committing, after flushing what it wrote (gc uses this:
    /// its packs hold objects already referenced).
    pub fn finish_without_commit(mut self) -> Result<()> {
        self.flush()?;
        let session = self.id.clone();
        self.store
            .cat()
            .write(|tx| end_session(tx, &session).map(drop))?;
        self.finished = true;
        let _ = std::fs::remove_file(&self.lock_path);
        Ok(())
    }
}

/// Remove a session's rows; true if it still had its row.
pub(crate) fn end_session(tx: &rusqlite::Connection, session: &str) -> Result<bool> {
    tx.execute("DELETE FROM session_pins WHERE session = ?", [session])?;
    tx.execute("DELETE FROM session_packs WHERE session = ?", [session])?;
    Ok(tx.execute("DELETE FROM sessions WHERE id = ?", [session])? > 0)
}

impl Drop for WriteSession<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Abandoned: unfinished packs go; finished packs stay indexed but unreachable
        // and gc collects them. Errors are ignored: gc cleans up after dead sessions.
        for w in [self.data_pack.take(), self.tree_pack.take()]
            .into_iter()
            .flatten()
        {
            let p = w.path().to_path_buf();
            drop(w);
            let _ = std::fs::remove_file(p);
        }
        let session = self.id.clone();
        let _ = self.store.cat().write(|tx| end_session(tx, &session));
        let _ = std::fs::remove_file(&self.lock_path);
    }
}
