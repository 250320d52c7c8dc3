//! [`SessionDisk`]: a writable disk — an immutable base version plus a copy-on-write
//! delta kept in a directory on local disk — that commits back to the store.
//!
//! # Layout of a session directory
//!
//! ```text
//! DIR/
//!   session.json      {"format":1,"base":"<64 hex>","block_size":N,"size":N,"generation":G,"created":T}
//!                     replaced atomically (write session.json.tmp, fsync, rename, fsync DIR)
//!   journal.<G>       the block map of the delta for generation G (G in decimal)
//!   data              block slots: slot s holds one block at byte s * block_size
//!   lock              flock'ed (exclusively) by the process that has the session open
//! ```
//!
//! Other names in the directory are left alone, so a caller may keep its own files
//! there. **`journal.<G>`** is a 64-byte header followed by 24-byte records:
//!
//! ```text
//! header := magic "STRJRNL1" | generation:u64 | nonce:[16] | base version id:[32]
//! record := block:u64 | slot:u64 (u64::MAX: the block is zero) | check:u64
//!           check = first 8 bytes of BLAKE3(nonce | block | slot), little-endian
//! ```
//!
//! (integers little-endian). Replaying the records in order gives the delta: each
//! block of the disk is either absent (it reads from the base version), zero (costs no
//! data space) or in a slot of `data`. Replay stops at the first record that is short
//! or fails its check (a torn tail), and opening truncates the file there. The header
//! names the base version; it must agree with `session.json`.
//!
//! # Guarantees
//!
//! * **Durability.** A write is durable once a later `flush` (or its own FUA) returns:
//!   flush fsyncs `data`, then appends the block-map changes made since the last flush
//!   to the journal and fsyncs it. So the journal never names a slot whose data is not
//!   on disk, and a slot is reused only after the change that freed it is durable:
//!   after a crash (`kill -9` or a power cut) the session always opens, and every
//!   block reads as its state at some flush or later — never another block's data or
//!   never-written garbage. Writes not flushed may be lost. An overwrite of a block
//!   already in the delta (and not frozen by a commit) is written in place, so a crash
//!   in the middle of such a write may leave the block part old, part new, at page
//!   granularity, as a crash does on a real disk.
//! * **Concurrency.** Any number of threads may read and write at once; a write is
//!   visible to every reader as soon as it returns. Each block is guarded by one of
//!   [`STRIPES`] striped locks (held while that block is read or changed, I/O included),
//!   and the in-memory block map by a lock held only for map updates, never across I/O.
//! * **Seal** ([`SessionDisk::seal`]): once the writes under way have finished,
//!   every further request of the disk's clients (read, write, zeroing, flush,
//!   cache, extents) fails with an I/O error, and what was acknowledged before is
//!   flushed. A server seals a session it stops serving while clients are still
//!   connected (a desktop handed to another point): such a client then sees errors
//!   instead of writing into a delta nobody will commit, and a last commit holds
//!   exactly the writes it was told had succeeded. [`SessionDisk::detach`] also
//!   gives up the directory's lock, so the session can be removed.
//! * **Commit** ([`SessionDisk::commit`]) makes a new version of base + delta as of one
//!   point in time (the moment it starts) while writes continue: it freezes the
//!   current block map; writes to frozen blocks then go to new slots, so the commit
//!   reads the frozen ones undisturbed. Blocks outside the delta are reused from the
//!   base version without being read — whole untouched subtrees of its block map
//!   included. Then the new version becomes the base and the frozen entries that were
//!   not overwritten meanwhile leave the delta; the switch is made durable by writing
//!   a new journal generation and then `session.json`. A crash at any point leaves
//!   either the old base with the whole delta or the new base with what was written
//!   after the freeze — both read the same. The store's own crash safety covers the
//!   version.
//!
//! # Keeping the base alive
//!
//! The session refers to its base version from outside the store, where gc cannot see
//! it. **The caller must keep a store ref (a branch or tag) pointing at
//! [`SessionDisk::base`] for as long as the session exists**, and move it when a
//! commit changes the base (the new version is reachable from the commit's branch
//! until then). A commit pins the base for its own duration.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};
use strata_store::tree::{entry_span, FANOUT};
use strata_store::{
    BlockInput, CommitTarget, Entry, Store, StoreError, Version, VersionDraft, VersionId,
    WriteSession, WriteStats,
};

use crate::disk::{Disk, DiskExtent};
use crate::version_disk::{
    block_runs_to_extents, check_range, copy_block, io_err, VersionDisk, VersionDisks,
    MAX_EXTENT_BLOCKS,
};

/// Test support: kill the process at a numbered step of a commit, as a crash there
/// would stop it. Steps: 1 the version is in the store, nothing else changed; 2 the
/// data file is synced; 3 the new journal is written and synced; 4 its directory
/// entry is synced; 5 `session.json` names it; 6 the old journal is gone.
#[doc(hidden)]
pub mod failpoint {
    use std::sync::atomic::{AtomicU32, Ordering};

    pub static ABORT_AT: AtomicU32 = AtomicU32::new(0);

    pub(crate) fn hit(step: u32) {
        if ABORT_AT.load(Ordering::Relaxed) == step {
            // Die as `kill -9` kills: no destructors, no core dump.
            // SAFETY: plain system calls on our own process.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            std::process::abort();
        }
    }
}

/// Number of striped block locks.
pub const STRIPES: usize = 1024;
const META: &str = "session.json";
const META_TMP: &str = "session.json.tmp";
const DATA: &str = "data";
/// The id of a version being committed, written before the branch moves and removed
/// once the session has switched to it (see [`SessionDisk::adopt_interrupted_commit`]).
const COMMIT_INTENT: &str = "commit-intent";
const LOCK: &str = "lock";
const JOURNAL_PREFIX: &str = "journal.";
const SESSION_FORMAT: u32 = 1;
const MAGIC: &[u8; 8] = b"STRJRNL1";
const HEADER_LEN: usize = 64;
const RECORD_LEN: usize = 24;
const ZERO_SLOT: u64 = u64::MAX;

/// What the delta holds for a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rec {
    Zero,
    Data(u64),
}

impl Rec {
    fn slot(self) -> Option<u64> {
        match self {
            Rec::Data(s) => Some(s),
            Rec::Zero => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    format: u32,
    base: String,
    block_size: u32,
    size: u64,
    generation: u64,
    created: i64,
}

impl Meta {
    fn base_id(&self, dir: &Path) -> Result<VersionId, StoreError> {
        VersionId::from_hex(&self.base).ok_or_else(|| {
            StoreError::Invalid(format!(
                "{}: bad base version id {:?}",
                dir.join(META).display(),
                self.base
            ))
        })
    }
}

/// Statistics of an open session.
#[derive(Clone, Debug, Serialize)]
pub struct SessionStats {
    /// The base version (hex).
    pub base: String,
    pub size: u64,
    pub block_size: u32,
    /// Blocks in the delta (data and zero).
    pub delta_blocks: u64,
    /// Blocks in the delta holding data.
    pub data_blocks: u64,
    /// Blocks in the delta recorded as zero (they cost no data space).
    pub zero_blocks: u64,
    /// Bytes of the data blocks in the delta.
    pub data_bytes: u64,
    /// Slots of the data file (in use or free).
    pub slots: u64,
    /// Free slots, reused by later writes.
    pub free_slots: u64,
    /// Block-map changes not yet durable (made durable by the next flush).
    pub unflushed_changes: u64,
    /// Journal generation (it advances at every commit, reset and compaction).
    pub generation: u64,
}

/// What [`inspect`] finds in a session directory without opening it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    pub base: String,
    pub size: u64,
    pub block_size: u32,
    pub generation: u64,
    /// Seconds since the Unix epoch.
    pub created: i64,
    /// As of the last flush.
    pub delta_blocks: u64,
    pub data_blocks: u64,
    pub zero_blocks: u64,
    /// Whether a process has the session open.
    pub in_use: bool,
}

/// The result of [`SessionDisk::commit`].
#[derive(Clone, Debug)]
pub struct CommitReport {
    pub version: VersionId,
    pub record: Version,
    /// The old base, now the new version's parent.
    pub parent: VersionId,
    /// Blocks of the delta that went into the version.
    pub committed_blocks: u64,
    /// Blocks still in the delta afterwards (written while the commit ran).
    pub remaining_blocks: u64,
    pub stats: WriteStats,
}

struct State {
    base: Arc<VersionDisk>,
    map: BTreeMap<u64, Rec>,
    data_blocks: u64,
    zero_blocks: u64,
    /// Block-map changes since the last flush, the latest per block.
    pending: BTreeMap<u64, Rec>,
    /// Slots that `pending` frees: reusable once it is durable.
    pending_frees: Vec<u64>,
    free: Vec<u64>,
    next_slot: u64,
    /// Slots a running commit reads: never written in place or freed meanwhile.
    frozen: HashSet<u64>,
}

impl State {
    /// Point block `b` at `rec`, recording the change for the next flush. The slot it
    /// held (unless frozen) becomes free once that change is durable.
    fn set(&mut self, b: u64, rec: Rec) {
        match self.map.insert(b, rec) {
            Some(Rec::Data(s)) => {
                self.data_blocks -= 1;
                if !self.frozen.contains(&s) {
                    self.pending_frees.push(s);
                }
            }
            Some(Rec::Zero) => self.zero_blocks -= 1,
            None => {}
        }
        match rec {
            Rec::Data(_) => self.data_blocks += 1,
            Rec::Zero => self.zero_blocks += 1,
        }
        self.pending.insert(b, rec);
    }

    /// Drop block `b` from the delta (its content is in the base now).
    fn remove(&mut self, b: u64) {
        match self.map.remove(&b) {
            Some(Rec::Data(_)) => self.data_blocks -= 1,
            Some(Rec::Zero) => self.zero_blocks -= 1,
            None => {}
        }
        self.pending.remove(&b);
    }

    fn alloc(&mut self) -> u64 {
        self.free.pop().unwrap_or_else(|| {
            self.next_slot += 1;
            self.next_slot - 1
        })
    }
}

struct Journal {
    file: File,
    len: u64,
    records: u64,
    generation: u64,
    nonce: [u8; 16],
}

/// A copy-on-write session over a base version. See the module documentation.
pub struct SessionDisk {
    dir: PathBuf,
    store: Arc<Store>,
    /// Where the base (and every later base) comes from: shared with the other
    /// sessions over the same version in this process, so they share its block cache.
    bases: Arc<VersionDisks>,
    size: u64,
    bs: u32,
    blocks: u64,
    created: i64,
    data: File,
    state: RwLock<State>,
    stripes: Box<[RwLock<()>]>,
    /// The journal; its lock orders flushes and generation switches.
    journal: Mutex<Journal>,
    /// One commit or reset at a time.
    commit_lock: Mutex<()>,
    /// The journal's generation (for stats, without waiting for the journal's lock).
    generation: AtomicU64,
    /// Data was written since the last fsync of `data`.
    dirty: AtomicBool,
    /// A durability step failed: the in-memory state can no longer be made durable,
    /// so every further change is refused until the session is reopened.
    broken: AtomicBool,
    /// Clients' requests are refused (see [`SessionDisk::seal`]).
    sealed: AtomicBool,
    /// The directory's lock; given up by [`SessionDisk::detach`].
    lock: Mutex<Option<File>>,
}

fn rd<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn wr<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

fn lk<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

fn at<T>(r: io::Result<T>, path: &Path) -> Result<T, StoreError> {
    r.map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn io_to_store(e: io::Error, dir: &Path) -> StoreError {
    StoreError::Io {
        path: dir.to_path_buf(),
        source: e,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{JOURNAL_PREFIX}{generation}"))
}

fn record_check(nonce: &[u8; 16], block: u64, slot: u64) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(nonce);
    h.update(&block.to_le_bytes());
    h.update(&slot.to_le_bytes());
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap())
}

fn encode_record(out: &mut Vec<u8>, nonce: &[u8; 16], block: u64, rec: Rec) {
    let slot = rec.slot().unwrap_or(ZERO_SLOT);
    out.extend_from_slice(&block.to_le_bytes());
    out.extend_from_slice(&slot.to_le_bytes());
    out.extend_from_slice(&record_check(nonce, block, slot).to_le_bytes());
}

fn encode_header(generation: u64, nonce: &[u8; 16], base: &VersionId) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&generation.to_le_bytes());
    h.extend_from_slice(nonce);
    h.extend_from_slice(&base.0);
    h
}

/// A replayed journal.
struct Replay {
    map: BTreeMap<u64, Rec>,
    /// Length of the valid prefix.
    valid_len: u64,
    file_len: u64,
    records: u64,
    nonce: [u8; 16],
}

fn replay_journal(path: &Path, meta: &Meta, base: &VersionId) -> Result<Replay, StoreError> {
    let bytes = at(fs::read(path), path)?;
    let bad = |reason: String| StoreError::Invalid(format!("{}: {reason}", path.display()));
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(bad("not a session journal".into()));
    }
    let generation = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let nonce: [u8; 16] = bytes[16..32].try_into().unwrap();
    if generation != meta.generation || bytes[32..64] != base.0 {
        return Err(bad(format!(
            "journal header (generation {generation}) does not match {META}"
        )));
    }
    let blocks = meta.size.div_ceil(meta.block_size as u64);
    let mut map = BTreeMap::new();
    let mut records = 0;
    let mut pos = HEADER_LEN;
    while pos + RECORD_LEN <= bytes.len() {
        let r = &bytes[pos..pos + RECORD_LEN];
        let block = u64::from_le_bytes(r[0..8].try_into().unwrap());
        let slot = u64::from_le_bytes(r[8..16].try_into().unwrap());
        let check = u64::from_le_bytes(r[16..24].try_into().unwrap());
        if check != record_check(&nonce, block, slot) {
            break; // a torn tail: nothing after it was ever durable
        }
        if block >= blocks {
            return Err(bad(format!(
                "record for block {block}, past the end of the disk"
            )));
        }
        map.insert(
            block,
            if slot == ZERO_SLOT {
                Rec::Zero
            } else {
                Rec::Data(slot)
            },
        );
        records += 1;
        pos += RECORD_LEN;
    }
    Ok(Replay {
        map,
        valid_len: pos as u64,
        file_len: bytes.len() as u64,
        records,
        nonce,
    })
}

fn read_meta(dir: &Path) -> Result<Meta, StoreError> {
    let path = dir.join(META);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::Invalid(format!(
                "{} is not a session (no {META})",
                dir.display()
            )))
        }
        Err(e) => return at(Err(e), &path),
    };
    let meta: Meta = serde_json::from_slice(&bytes)
        .map_err(|e| StoreError::Invalid(format!("{}: {e}", path.display())))?;
    if meta.format != SESSION_FORMAT {
        return Err(StoreError::Invalid(format!(
            "{}: unsupported session format {}",
            path.display(),
            meta.format
        )));
    }
    Ok(meta)
}

fn write_meta(dir: &Path, meta: &Meta) -> io::Result<()> {
    let tmp = dir.join(META_TMP);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all_at(
        &serde_json::to_vec_pretty(meta).expect("meta serializes"),
        0,
    )?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(META))?;
    fsync_dir(dir)
}

/// Take the session directory's lock: exclusively to open it, shared to look at it.
fn lock_dir(dir: &Path, exclusive: bool) -> Result<Option<File>, StoreError> {
    let path = dir.join(LOCK);
    let f = at(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path),
        &path,
    )?;
    // `inspect` holds a shared lock for a moment; ride over it.
    for _ in 0..50 {
        let r = if exclusive {
            f.try_lock()
        } else {
            f.try_lock_shared()
        };
        match r {
            Ok(()) => return Ok(Some(f)),
            Err(fs::TryLockError::WouldBlock) if exclusive => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(fs::TryLockError::WouldBlock) => return Ok(None),
            Err(fs::TryLockError::Error(e)) => return at(Err(e), &path),
        }
    }
    Err(StoreError::Invalid(format!(
        "session {} is in use by another process",
        dir.display()
    )))
}

fn random_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    getrandom::getrandom(&mut n).expect("the OS random source is available");
    n
}

fn inspect(dir: &Path) -> Result<SessionInfo, StoreError> {
    read_meta(dir)?;
    let in_use = lock_dir(dir, false)?.is_none();
    let mut last = None;
    // A commit in another process may switch generations under us; look again.
    for _ in 0..3 {
        let meta = read_meta(dir)?;
        let base = meta.base_id(dir)?;
        match replay_journal(&journal_path(dir, meta.generation), &meta, &base) {
            Ok(r) => {
                let zero = r.map.values().filter(|r| **r == Rec::Zero).count() as u64;
                return Ok(SessionInfo {
                    base: meta.base,
                    size: meta.size,
                    block_size: meta.block_size,
                    generation: meta.generation,
                    created: meta.created,
                    delta_blocks: r.map.len() as u64,
                    data_blocks: r.map.len() as u64 - zero,
                    zero_blocks: zero,
                    in_use,
                });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("the loop ran"))
}

fn remove(dir: &Path) -> Result<(), StoreError> {
    read_meta(dir)?;
    let _lock = lock_dir(dir, true)?;
    at(fs::remove_dir_all(dir), dir)
}

impl SessionDisk {
    /// Look at a session directory without opening it (another process may be serving
    /// it): its metadata and the delta as of its last flush.
    pub fn inspect(dir: &Path) -> Result<SessionInfo, StoreError> {
        inspect(dir)
    }

    /// Delete a session directory; fails if a process has the session open. (Drop the
    /// caller's ref on its base too.)
    pub fn remove(dir: &Path) -> Result<(), StoreError> {
        remove(dir)
    }

    /// Create a session over version `base` in `dir` (created if missing; it must not
    /// hold a session already) and open it.
    pub fn create(
        dir: &Path,
        store: Arc<Store>,
        base: VersionId,
    ) -> Result<SessionDisk, StoreError> {
        SessionDisk::create_shared(dir, &VersionDisks::new(store), base)
    }

    /// [`create`](Self::create), taking the base's disk from `bases`: the base may be
    /// a lazy version registered there ([`VersionDisks::get_lazy`]) that the store
    /// does not hold (yet).
    pub fn create_shared(
        dir: &Path,
        bases: &Arc<VersionDisks>,
        base: VersionId,
    ) -> Result<SessionDisk, StoreError> {
        let base_disk = bases.get(base)?;
        let version = base_disk.version().clone();
        at(fs::create_dir_all(dir), dir)?;
        let lock = lock_dir(dir, true)?.expect("exclusive locks wait or fail");
        if dir.join(META).exists() {
            return Err(StoreError::Invalid(format!(
                "{} already holds a session",
                dir.display()
            )));
        }
        let meta = Meta {
            format: SESSION_FORMAT,
            base: base.to_hex(),
            block_size: version.block_size,
            size: version.virtual_size,
            generation: 0,
            created: now(),
        };
        let jpath = journal_path(dir, 0);
        let header = encode_header(0, &random_nonce(), &base);
        let j = at(File::create(&jpath), &jpath)?;
        at(j.write_all_at(&header, 0), &jpath)?;
        at(j.sync_all(), &jpath)?;
        let dpath = dir.join(DATA);
        let d = at(File::create(&dpath), &dpath)?;
        at(d.sync_all(), &dpath)?;
        at(fsync_dir(dir), dir)?;
        // session.json last: its presence means "a complete session".
        at(write_meta(dir, &meta), dir)?;
        SessionDisk::open_locked(dir, bases, lock)
    }

    /// Open the session in `dir` (after a restart or a crash: the delta is replayed
    /// from its journal), with a base disk of its own.
    pub fn open(dir: &Path, store: Arc<Store>) -> Result<SessionDisk, StoreError> {
        SessionDisk::open_shared(dir, &VersionDisks::new(store))
    }

    /// Open the session in `dir`, taking its base version's disk from `bases`, so
    /// that every session over one version in a process shares one disk and one
    /// block cache (a server should open all its sessions this way).
    pub fn open_shared(dir: &Path, bases: &Arc<VersionDisks>) -> Result<SessionDisk, StoreError> {
        read_meta(dir)?;
        let lock = lock_dir(dir, true)?.expect("exclusive locks wait or fail");
        SessionDisk::open_locked(dir, bases, lock)
    }

    fn open_locked(
        dir: &Path,
        bases: &Arc<VersionDisks>,
        lock: File,
    ) -> Result<SessionDisk, StoreError> {
        let store = bases.store().clone();
        let meta = read_meta(dir)?;
        let base_id = meta.base_id(dir)?;
        let base = bases.get(base_id)?;
        let version = base.version();
        if version.block_size != meta.block_size || version.virtual_size != meta.size {
            return Err(StoreError::Invalid(format!(
                "{}: base version {} does not match the session's size or block size",
                dir.display(),
                base_id.short()
            )));
        }
        // Leftovers of an interrupted switch of generation.
        let _ = fs::remove_file(dir.join(META_TMP));
        for e in at(fs::read_dir(dir), dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(g) = name.strip_prefix(JOURNAL_PREFIX) {
                if g.parse::<u64>().is_ok_and(|g| g != meta.generation) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let jpath = journal_path(dir, meta.generation);
        let replay = replay_journal(&jpath, &meta, &base_id)?;
        let jfile = at(
            OpenOptions::new().read(true).write(true).open(&jpath),
            &jpath,
        )?;
        if replay.valid_len < replay.file_len {
            // New records must follow the valid prefix, or replay would stop before them.
            at(jfile.set_len(replay.valid_len), &jpath)?;
            at(jfile.sync_all(), &jpath)?;
        }
        let dpath = dir.join(DATA);
        let data = at(
            OpenOptions::new().read(true).write(true).open(&dpath),
            &dpath,
        )?;
        let data_len = at(data.metadata(), &dpath)?.len();
        let bs = meta.block_size as u64;
        let next_slot = data_len.div_ceil(bs);
        let mut used = HashSet::new();
        let (mut data_blocks, mut zero_blocks) = (0, 0);
        for (b, rec) in &replay.map {
            match rec {
                Rec::Data(s) => {
                    if *s >= next_slot || !used.insert(*s) {
                        return Err(StoreError::Invalid(format!(
                            "{}: block {b} maps to slot {s}, which is {}",
                            jpath.display(),
                            if *s >= next_slot {
                                "past the end of the data file"
                            } else {
                                "another block's"
                            }
                        )));
                    }
                    data_blocks += 1;
                }
                Rec::Zero => zero_blocks += 1,
            }
        }
        let free: Vec<u64> = (0..next_slot).rev().filter(|s| !used.contains(s)).collect();
        let blocks = meta.size.div_ceil(bs);
        let disk = SessionDisk {
            dir: dir.to_path_buf(),
            size: meta.size,
            bs: meta.block_size,
            blocks,
            created: meta.created,
            data,
            state: RwLock::new(State {
                base,
                map: replay.map,
                data_blocks,
                zero_blocks,
                pending: BTreeMap::new(),
                pending_frees: Vec::new(),
                free,
                next_slot,
                frozen: HashSet::new(),
            }),
            store,
            bases: bases.clone(),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            journal: Mutex::new(Journal {
                file: jfile,
                len: replay.valid_len,
                records: replay.records,
                generation: meta.generation,
                nonce: replay.nonce,
            }),
            commit_lock: Mutex::new(()),
            generation: AtomicU64::new(meta.generation),
            dirty: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            lock: Mutex::new(Some(lock)),
        };
        disk.adopt_interrupted_commit()?;
        Ok(disk)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The base version. Keep a store ref on it (see the module documentation).
    pub fn base(&self) -> VersionId {
        rd(&self.state).base.id()
    }

    /// The base version's record.
    pub fn base_version(&self) -> Version {
        rd(&self.state).base.version().clone()
    }

    /// The base version's disk (shared with other users of that version when the
    /// session was opened with [`open_shared`](Self::open_shared)).
    pub fn base_disk(&self) -> Arc<VersionDisk> {
        rd(&self.state).base.clone()
    }

    pub fn stats(&self) -> SessionStats {
        let generation = self.generation.load(Ordering::Acquire);
        let st = rd(&self.state);
        let last = self.blocks.saturating_sub(1);
        let short = if matches!(st.map.get(&last), Some(Rec::Data(_))) {
            self.bs as u64 - self.block_len(last) as u64
        } else {
            0
        };
        SessionStats {
            base: st.base.id().to_hex(),
            size: self.size,
            block_size: self.bs,
            delta_blocks: st.map.len() as u64,
            data_blocks: st.data_blocks,
            zero_blocks: st.zero_blocks,
            data_bytes: st.data_blocks * self.bs as u64 - short,
            slots: st.next_slot,
            free_slots: st.free.len() as u64 + st.pending_frees.len() as u64,
            unflushed_changes: st.pending.len() as u64,
            generation,
        }
    }

    fn block_len(&self, b: u64) -> usize {
        let bs = self.bs as u64;
        bs.min(self.size.saturating_sub(b * bs)) as usize
    }

    fn stripe(&self, b: u64) -> &RwLock<()> {
        &self.stripes[(b % STRIPES as u64) as usize]
    }

    fn check_broken(&self) -> io::Result<()> {
        if self.broken.load(Ordering::Acquire) {
            Err(io::Error::other(format!(
                "session {} failed to make its changes durable; reopen it",
                self.dir.display()
            )))
        } else {
            Ok(())
        }
    }

    /// Refuse a client's request once the session is sealed.
    fn admit(&self) -> io::Result<()> {
        if self.sealed.load(Ordering::Acquire) {
            Err(io::Error::other(format!(
                "session {} was released: it no longer takes requests",
                self.dir.display()
            )))
        } else {
            Ok(())
        }
    }

    /// Refuse every further request of the disk's clients (reads, writes, zeroing,
    /// trims, flushes, cache hints, extents) with an I/O error. Writes already under
    /// way finish first; everything acknowledged until then is flushed and stays in
    /// the delta, which [`commit`](Self::commit) still commits. Idempotent.
    pub fn seal(&self) -> io::Result<()> {
        self.sealed.store(true, Ordering::Release);
        // A write checks the seal under its block's lock and changes the block only
        // while holding it: once every lock has been taken, no write is half done and
        // none will start.
        drop(self.stripes.iter().map(|s| wr(s)).collect::<Vec<_>>());
        let mut j = lk(&self.journal);
        self.flush_locked(&mut j)
    }

    /// Whether [`seal`](Self::seal) was called.
    pub fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// [`seal`](Self::seal), then give up the directory's lock, so that the session
    /// can be removed (or opened again) while this object lives on only to fail its
    /// clients' requests.
    pub fn detach(&self) -> io::Result<()> {
        let r = self.seal();
        lk(&self.lock).take();
        r
    }

    fn fail<T>(&self, e: io::Error) -> io::Result<T> {
        self.broken.store(true, Ordering::Release);
        Err(e)
    }

    fn slot_offset(&self, s: u64) -> u64 {
        s * self.bs as u64
    }

    fn pread_slot(&self, s: u64, from: usize, buf: &mut [u8]) -> io::Result<()> {
        self.data
            .read_exact_at(buf, self.slot_offset(s) + from as u64)
    }

    fn pwrite_slot(&self, s: u64, from: usize, data: &[u8]) -> io::Result<()> {
        self.data
            .write_all_at(data, self.slot_offset(s) + from as u64)?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Give slots back for reuse (their release is durable); their space is returned
    /// to the filesystem.
    fn release(&self, slots: Vec<u64>) {
        if slots.is_empty() {
            return;
        }
        for &s in &slots {
            // Best effort: a slot that keeps its old bytes is still free.
            // SAFETY: fallocate only reads its integer arguments; the fd is ours.
            unsafe {
                libc::fallocate(
                    self.data.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    self.slot_offset(s) as libc::off_t,
                    self.bs as libc::off_t,
                );
            }
        }
        wr(&self.state).free.extend(slots);
    }

    /// Write `data` at `off` inside block `b` (the range lies inside the block).
    fn write_piece(&self, b: u64, off: usize, data: &[u8]) -> io::Result<()> {
        let blen = self.block_len(b);
        let _g = wr(self.stripe(b));
        // Under the block's lock: `seal` waits for this write or it sees the seal.
        self.admit()?;
        let (rec, frozen, base) = {
            let st = rd(&self.state);
            let rec = st.map.get(&b).copied();
            let frozen = rec
                .and_then(Rec::slot)
                .is_some_and(|s| st.frozen.contains(&s));
            (rec, frozen, st.base.clone())
        };
        if let (Some(Rec::Data(s)), false) = (rec, frozen) {
            // The block is ours alone: overwrite in place.
            return self.pwrite_slot(s, off, data);
        }
        let full = off == 0 && data.len() == blen;
        let merged;
        let content: &[u8] = if full {
            data
        } else {
            let mut buf = match rec {
                Some(Rec::Data(s)) => {
                    let mut buf = vec![0u8; blen];
                    self.pread_slot(s, 0, &mut buf)?;
                    buf
                }
                Some(Rec::Zero) => vec![0u8; blen],
                None => base.read_block(b).map_err(io_err)?,
            };
            buf[off..off + data.len()].copy_from_slice(data);
            merged = buf;
            &merged
        };
        let s = wr(&self.state).alloc();
        if let Err(e) = self.pwrite_slot(s, 0, content) {
            // Nothing refers to the slot; it is free again at once.
            wr(&self.state).free.push(s);
            return Err(e);
        }
        wr(&self.state).set(b, Rec::Data(s));
        Ok(())
    }

    /// Whether block `b` is recorded as zero here, or untouched here and zero or
    /// unwritten in the base.
    fn reads_as_zero(&self, b: u64) -> io::Result<bool> {
        let (rec, base) = {
            let st = rd(&self.state);
            (st.map.get(&b).copied(), st.base.clone())
        };
        Ok(match rec {
            Some(Rec::Zero) => true,
            Some(Rec::Data(_)) => false,
            None => !matches!(base.entry(b).map_err(io_err)?, Entry::Present(_)),
        })
    }

    /// Record block `b` as zero.
    fn zero_block(&self, b: u64) -> io::Result<()> {
        let _g = wr(self.stripe(b));
        self.admit()?;
        let mut st = wr(&self.state);
        if st.map.get(&b) != Some(&Rec::Zero) {
            st.set(b, Rec::Zero);
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.admit()?;
        self.check_broken()?;
        check_range(self.size, offset, len)?;
        let bs = self.bs as u64;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let b = pos / bs;
            let off = (pos - b * bs) as usize;
            let n = (self.block_len(b) - off).min((end - pos) as usize);
            if off == 0 && n == self.block_len(b) {
                self.zero_block(b)?;
            } else if !self.reads_as_zero(b)? {
                // Zeroing part of a block that already reads as zeros changes nothing;
                // writing it as data would turn a hole into an allocated block.
                self.write_piece(b, off, &vec![0u8; n])?;
            }
            pos += n as u64;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// Make the in-memory delta the durable one by writing it whole as a new journal
    /// generation, then pointing `session.json` at it (and at the current base).
    /// `frees` (and the pending ones) are released once that is done.
    fn switch_generation(&self, j: &mut Journal, mut frees: Vec<u64>) -> io::Result<()> {
        let (records, base) = {
            let mut st = wr(&self.state);
            st.pending.clear();
            frees.append(&mut st.pending_frees);
            let records: Vec<(u64, Rec)> = st.map.iter().map(|(b, r)| (*b, *r)).collect();
            (records, st.base.id())
        };
        // Every slot in `records` was written before it entered the map.
        self.dirty.store(false, Ordering::Release);
        self.data.sync_data()?;
        failpoint::hit(2);
        let generation = j.generation + 1;
        let nonce = random_nonce();
        let mut buf = encode_header(generation, &nonce, &base);
        for (b, r) in &records {
            encode_record(&mut buf, &nonce, *b, *r);
        }
        let path = journal_path(&self.dir, generation);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.write_all_at(&buf, 0)?;
        file.sync_all()?;
        failpoint::hit(3);
        fsync_dir(&self.dir)?;
        failpoint::hit(4);
        write_meta(
            &self.dir,
            &Meta {
                format: SESSION_FORMAT,
                base: base.to_hex(),
                block_size: self.bs,
                size: self.size,
                generation,
                created: self.created,
            },
        )?;
        failpoint::hit(5);
        self.generation.store(generation, Ordering::Release);
        let old = journal_path(&self.dir, j.generation);
        *j = Journal {
            file,
            len: buf.len() as u64,
            records: records.len() as u64,
            generation,
            nonce,
        };
        let _ = fs::remove_file(old);
        failpoint::hit(6);
        self.release(frees);
        Ok(())
    }

    fn flush_locked(&self, j: &mut Journal) -> io::Result<()> {
        self.check_broken()?;
        let (records, frees) = {
            let mut st = wr(&self.state);
            (
                std::mem::take(&mut st.pending),
                std::mem::take(&mut st.pending_frees),
            )
        };
        // Every record's data was written before the record was made; `dirty` was set
        // after that write, so it is still set here unless an earlier flush (which we
        // waited for) synced it.
        if self.dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.data.sync_data() {
                return self.fail(e);
            }
        }
        if !records.is_empty() {
            let mut buf = Vec::with_capacity(records.len() * RECORD_LEN);
            for (b, r) in &records {
                encode_record(&mut buf, &j.nonce, *b, *r);
            }
            if let Err(e) = j
                .file
                .write_all_at(&buf, j.len)
                .and_then(|_| j.file.sync_data())
            {
                return self.fail(e);
            }
            j.len += buf.len() as u64;
            j.records += records.len() as u64;
        }
        self.release(frees);
        // Compact a journal that is mostly superseded records.
        let live = rd(&self.state).map.len() as u64;
        if j.records > 4 * live + 65536 {
            if let Err(e) = self.switch_generation(j, Vec::new()) {
                return self.fail(e);
            }
        }
        Ok(())
    }

    /// Make a new version of base + delta, as of the moment this is called, on
    /// `target`'s branch (`target.parents` empty means `[base]`), while other threads
    /// go on reading and writing. Then that version is the base and the delta holds
    /// only what was written since the commit started. On error nothing changes (the
    /// version may exist in the store, unreferenced, if the branch moved meanwhile).
    /// Move the caller's ref on the base to the returned version.
    pub fn commit(&self, target: &CommitTarget) -> Result<CommitReport, StoreError> {
        let _c = lk(&self.commit_lock);
        self.check_broken().map_err(|e| io_to_store(e, &self.dir))?;
        let (frozen, base) = {
            let mut st = wr(&self.state);
            let frozen = st.map.clone();
            st.frozen = frozen.values().filter_map(|r| r.slot()).collect();
            (frozen, st.base.clone())
        };
        let built = self.build_version(&base, &frozen, target);
        let (vid, record, stats) = match built {
            Ok(v) => v,
            Err(e) => {
                // Usually not published (a moved branch, a full disk). An intent left
                // behind is checked against the catalog when the session next opens.
                self.unfreeze(&frozen);
                return Err(e);
            }
        };
        failpoint::hit(1);
        let new_base = self.bases.get_with_version(vid, record.clone());
        // Switch: the new base first, so a block leaving the delta reads the same.
        let mut j = lk(&self.journal);
        wr(&self.state).base = new_base;
        let mut freed = Vec::new();
        for (b, rec) in &frozen {
            let _g = wr(self.stripe(*b));
            let mut st = wr(&self.state);
            if st.map.get(b) == Some(rec) {
                st.remove(*b);
            }
            // Either way the frozen slot is no longer in the delta.
            freed.extend(rec.slot());
        }
        let remaining = {
            let mut st = wr(&self.state);
            st.frozen.clear();
            st.map.len() as u64
        };
        if let Err(e) = self.switch_generation(&mut j, freed) {
            self.broken.store(true, Ordering::Release);
            return Err(io_to_store(e, &self.dir));
        }
        // Switched: the intent has served (a crash before this line finds the
        // session already on the new base when it reopens, and just drops it).
        let _ = fs::remove_file(self.dir.join(COMMIT_INTENT));
        Ok(CommitReport {
            version: vid,
            record,
            parent: base.id(),
            committed_blocks: frozen.len() as u64,
            remaining_blocks: remaining,
            stats,
        })
    }

    /// Undo a freeze after a failed commit: frozen slots that writes replaced meanwhile
    /// are free once the replacement is durable.
    fn unfreeze(&self, frozen: &BTreeMap<u64, Rec>) {
        let mut st = wr(&self.state);
        for (b, rec) in frozen {
            if let Rec::Data(s) = rec {
                if st.map.get(b) != Some(rec) {
                    st.pending_frees.push(*s);
                }
            }
        }
        st.frozen.clear();
    }

    fn build_version(
        &self,
        base: &VersionDisk,
        frozen: &BTreeMap<u64, Rec>,
        target: &CommitTarget,
    ) -> Result<(VersionId, Version, WriteStats), StoreError> {
        let mut ws = WriteSession::begin(
            &self.store,
            &format!("commit of session {}", self.dir.display()),
        )?;
        ws.pin_version(&base.id())?;
        let mut draft = ws.new_version(self.size, self.bs)?;
        let depth = base.version().depth;
        let mut b = Builder {
            disk: self,
            base,
            frozen,
            ws: &mut ws,
            draft: &mut draft,
            depth,
            batch: Vec::new(),
            seen: Counts::default(),
        };
        b.subtree(base.root(), depth as i32 - 1, 0)?;
        b.flush_batch()?;
        // Data and zero blocks inside the subtrees reused whole: the base's totals
        // less what the walk saw of the base elsewhere.
        let seen = b.seen;
        let v = base.version();
        ws.stats.data_blocks += v.data_blocks.saturating_sub(seen.data_blocks);
        ws.stats.zero_blocks += v.zero_blocks.saturating_sub(seen.zero_blocks);
        ws.stats.data_bytes += v.data_bytes.saturating_sub(seen.data_bytes);
        let mut target = target.clone();
        if target.parents.is_empty() {
            target.parents = vec![base.id()];
        }
        ws.commit_with(draft, &target, |vid| {
            let path = self.dir.join(COMMIT_INTENT);
            fs::write(&path, vid.to_hex())
                .and_then(|_| File::open(&path)?.sync_all())
                .and_then(|_| fsync_dir(&self.dir))
                .map_err(|e| io_to_store(e, &self.dir))
        })
    }

    /// After a crash between publishing a commit and switching to it, the branch
    /// holds the new version while this session still stands on the old base with
    /// its whole delta. That version is the old base plus the delta as it was when
    /// the commit began, and every record written since is still in the delta, so
    /// the new version with the whole delta over it reads exactly like the old base
    /// with it: switch to it, keeping the delta (blocks it already holds just get
    /// committed again, deduplicated).
    fn adopt_interrupted_commit(&self) -> Result<(), StoreError> {
        let path = self.dir.join(COMMIT_INTENT);
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(());
        };
        if let Some(vid) = VersionId::from_hex(text.trim()) {
            let published = self
                .store
                .versions_with_prefix(&vid.to_hex())?
                .contains(&vid);
            if published && vid != self.base() {
                let new_base = self.bases.get(vid)?;
                let v = new_base.version();
                if v.block_size != self.bs || v.virtual_size != self.size {
                    return Err(StoreError::Invalid(format!(
                        "{}: interrupted commit {} does not match the session's size",
                        self.dir.display(),
                        vid.short()
                    )));
                }
                wr(&self.state).base = new_base;
                let mut j = lk(&self.journal);
                self.switch_generation(&mut j, Vec::new())
                    .map_err(|e| io_to_store(e, &self.dir))?;
            }
        }
        at(fs::remove_file(&path), &path)?;
        at(fsync_dir(&self.dir), &self.dir)?;
        Ok(())
    }
}

#[derive(Clone, Copy, Default)]
struct Counts {
    data_blocks: u64,
    zero_blocks: u64,
    data_bytes: u64,
}

enum Item {
    Base(Entry),
    Delta(u64, Rec),
}

/// Walks the base tree in block order, pushing a new version's blocks.
struct Builder<'a, 's> {
    disk: &'a SessionDisk,
    base: &'a VersionDisk,
    frozen: &'a BTreeMap<u64, Rec>,
    ws: &'a mut WriteSession<'s>,
    draft: &'a mut VersionDraft,
    depth: u8,
    batch: Vec<Item>,
    /// Counts of the base's entries everywhere except inside subtrees reused whole.
    seen: Counts,
}

const BATCH_ITEMS: usize = 1024;
const BATCH_BYTES: usize = 32 << 20;

impl Builder<'_, '_> {
    /// Push the blocks under `r`, a reference to a level-`level` node starting at
    /// block `start`.
    fn subtree(&mut self, r: Entry, level: i32, start: u64) -> Result<(), StoreError> {
        let total = self.disk.blocks;
        let end = start
            .saturating_add(entry_span((level + 1) as u8))
            .min(total);
        if start >= end {
            return Ok(());
        }
        let touched = self.frozen.range(start..end).next().is_some();
        if !touched && level + 1 < self.depth as i32 {
            self.flush_batch()?;
            self.ws.add_subtree(self.draft, level as u8, r)?;
            if r == Entry::Zero {
                self.seen.zero_blocks += end - start;
            }
            return Ok(());
        }
        let node;
        let uniform;
        let children: &[Entry] = match r {
            Entry::Present(id) => {
                node = self.base.node(&id)?;
                if node.level as i32 != level {
                    return Err(StoreError::Corrupt {
                        id,
                        reason: format!("tree node has level {}, expected {level}", node.level),
                    });
                }
                &node.entries
            }
            u => {
                uniform = vec![u; FANOUT];
                &uniform
            }
        };
        if level == 0 {
            for blk in start..end {
                let e = *children.get((blk - start) as usize).ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "damaged block map: leaf over block {start} is shorter than the image"
                    ))
                })?;
                match e {
                    Entry::Present(_) => {
                        self.seen.data_blocks += 1;
                        self.seen.data_bytes += self.base.block_len(blk) as u64;
                    }
                    Entry::Zero => self.seen.zero_blocks += 1,
                    Entry::Unwritten => {}
                }
                self.batch.push(match self.frozen.get(&blk) {
                    Some(rec) => Item::Delta(blk, *rec),
                    None => Item::Base(e),
                });
                if self.batch.len() >= BATCH_ITEMS {
                    self.flush_batch()?;
                }
            }
        } else {
            let span = entry_span(level as u8);
            for (i, c) in children.iter().enumerate() {
                let cs = start + i as u64 * span;
                if cs >= end {
                    break;
                }
                self.subtree(*c, level - 1, cs)?;
            }
        }
        Ok(())
    }

    /// Push the batched blocks: runs of base entries as they are, runs of delta blocks
    /// read from their frozen slots.
    fn flush_batch(&mut self) -> Result<(), StoreError> {
        let batch = std::mem::take(&mut self.batch);
        let mut i = 0;
        while i < batch.len() {
            if let Item::Base(_) = batch[i] {
                let mut entries = Vec::new();
                while let Some(Item::Base(e)) = batch.get(i) {
                    entries.push(*e);
                    i += 1;
                }
                self.ws.add_entries(self.draft, &entries)?;
            } else {
                let mut inputs = Vec::new();
                let mut bytes = 0;
                while let Some(Item::Delta(b, rec)) = batch.get(i) {
                    if bytes >= BATCH_BYTES {
                        break;
                    }
                    inputs.push(match rec {
                        Rec::Zero => BlockInput::Zero,
                        Rec::Data(s) => {
                            let mut buf = vec![0u8; self.disk.block_len(*b)];
                            // Under the block's lock: a write that chose this slot
                            // before the freeze finishes first.
                            let _g = rd(self.disk.stripe(*b));
                            self.disk
                                .pread_slot(*s, 0, &mut buf)
                                .map_err(|e| io_to_store(e, &self.disk.dir.join(DATA)))?;
                            bytes += buf.len();
                            BlockInput::Data(buf)
                        }
                    });
                    i += 1;
                }
                self.ws.add_blocks(self.draft, inputs)?;
            }
        }
        Ok(())
    }
}

impl SessionDisk {
    /// Drop the whole delta: the disk reads as its base version again.
    pub fn reset(&self) -> Result<(), StoreError> {
        let _c = lk(&self.commit_lock);
        self.check_broken().map_err(|e| io_to_store(e, &self.dir))?;
        let mut j = lk(&self.journal);
        // Every block lock: no write is half done while the slots vanish.
        let _all: Vec<_> = self.stripes.iter().map(|s| wr(s)).collect();
        {
            let mut st = wr(&self.state);
            st.map.clear();
            st.pending.clear();
            st.pending_frees.clear();
            st.data_blocks = 0;
            st.zero_blocks = 0;
        }
        let r = self.switch_generation(&mut j, Vec::new()).and_then(|_| {
            // The durable delta is empty now: no slot is referenced.
            self.data.set_len(0)?;
            self.data.sync_all()
        });
        if let Err(e) = r {
            self.broken.store(true, Ordering::Release);
            return Err(io_to_store(e, &self.dir));
        }
        let mut st = wr(&self.state);
        st.free.clear();
        st.next_slot = 0;
        Ok(())
    }
}

impl Drop for SessionDisk {
    /// Closing a session flushes it (best effort: a failure leaves it as a crash would;
    /// a sealed one was flushed when it was sealed).
    fn drop(&mut self) {
        let _ = Disk::flush(self);
    }
}

impl Disk for SessionDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.bs
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.admit()?;
        check_range(self.size, offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.bs as u64;
        let (first, last) = (offset / bs, (offset + buf.len() as u64 - 1) / bs);
        let (delta, base) = {
            let st = rd(&self.state);
            let delta: Vec<u64> = st.map.range(first..=last).map(|(b, _)| *b).collect();
            (delta, st.base.clone())
        };
        // Runs of blocks outside the delta: from the base (its block cache), a run at
        // a time. (If one is written meanwhile, this read simply happened first.)
        let end = offset + buf.len() as u64;
        let mut run = first;
        for stop in delta.iter().copied().chain(std::iter::once(last + 1)) {
            if stop > run {
                let s = (run * bs).max(offset);
                let t = (stop * bs).min(end);
                base.read_at(&mut buf[(s - offset) as usize..(t - offset) as usize], s)?;
            }
            run = stop + 1;
        }
        for b in delta {
            // Under the block's lock, its slot cannot be freed and reused.
            let _g = rd(self.stripe(b));
            let (rec, base) = {
                let st = rd(&self.state);
                (st.map.get(&b).copied(), st.base.clone())
            };
            match rec {
                Some(Rec::Data(s)) => {
                    let start = (b * bs).max(offset);
                    let end = ((b + 1) * bs).min(offset + buf.len() as u64);
                    let dst = &mut buf[(start - offset) as usize..(end - offset) as usize];
                    self.pread_slot(s, (start - b * bs) as usize, dst)?;
                }
                Some(Rec::Zero) => copy_block(buf, offset, b, bs, None),
                // A commit moved it into the (new) base.
                None => {
                    let s = (b * bs).max(offset);
                    let t = ((b + 1) * bs).min(end);
                    base.read_at(&mut buf[(s - offset) as usize..(t - offset) as usize], s)?;
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.admit()?;
        self.check_broken()?;
        check_range(self.size, offset, data.len() as u64)?;
        let bs = self.bs as u64;
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            let b = at / bs;
            let off = (at - b * bs) as usize;
            let n = (self.block_len(b) - off).min(data.len() - pos);
            self.write_piece(b, off, &data[pos..pos + n])?;
            pos += n;
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, fua: bool) -> io::Result<()> {
        // Zero records cost no data space, so zeroing always "trims".
        self.zero_range(offset, len, fua)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        // Trimmed blocks read as zeros (partial blocks at the edges are zeroed too).
        self.zero_range(offset, len, fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.admit()?;
        self.check_broken()?;
        let mut j = lk(&self.journal);
        self.flush_locked(&mut j)
    }

    fn fast_zero(&self) -> bool {
        true
    }

    /// Prefetch: the base decodes the range into its block cache (blocks the delta
    /// holds are prefetched too, harmlessly).
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.admit()?;
        check_range(self.size, offset, len)?;
        let base = rd(&self.state).base.clone();
        base.cache(offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<DiskExtent>> {
        self.admit()?;
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let bs = self.bs as u64;
        let from = offset / bs;
        let to = (offset + len).div_ceil(bs).min(from + MAX_EXTENT_BLOCKS);
        let (delta, base) = {
            let st = rd(&self.state);
            let delta: Vec<(u64, Rec)> = st.map.range(from..to).map(|(b, r)| (*b, *r)).collect();
            (delta, st.base.clone())
        };
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut cursor = from;
        for (b, rec) in delta {
            if b > cursor {
                runs.extend(base.block_runs(cursor, b).map_err(io_err)?);
            }
            runs.push((b, 1, matches!(rec, Rec::Data(_))));
            cursor = b + 1;
        }
        if cursor < to {
            runs.extend(base.block_runs(cursor, to).map_err(io_err)?);
        }
        Ok(block_runs_to_extents(
            &runs,
            bs,
            offset,
            (offset + len).min(to * bs),
        ))
    }

    /// `read_at` as it reads when nothing has to wait: every lock free at once, the
    /// delta's slots in the page cache, the base's blocks cached or zero.
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if let Err(e) = self
            .admit()
            .and_then(|_| check_range(self.size, offset, buf.len() as u64))
        {
            return Some(Err(e));
        }
        if buf.is_empty() {
            return Some(Ok(()));
        }
        let bs = self.bs as u64;
        let end = offset + buf.len() as u64;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let (delta, base) = {
            let st = self.state.try_read().ok()?;
            let delta: Vec<u64> = st.map.range(first..=last).map(|(b, _)| *b).collect();
            (delta, st.base.clone())
        };
        let mut run = first;
        for stop in delta.iter().copied().chain(std::iter::once(last + 1)) {
            if stop > run {
                let s = (run * bs).max(offset);
                let t = (stop * bs).min(end);
                if !base.read_now(&mut buf[(s - offset) as usize..(t - offset) as usize], s) {
                    return None;
                }
            }
            run = stop + 1;
        }
        for b in delta {
            let _g = self.stripe(b).try_read().ok()?;
            let (rec, base) = {
                let st = self.state.try_read().ok()?;
                (st.map.get(&b).copied(), st.base.clone())
            };
            let s = (b * bs).max(offset);
            let t = ((b + 1) * bs).min(end);
            let dst = &mut buf[(s - offset) as usize..(t - offset) as usize];
            match rec {
                Some(Rec::Data(slot)) => {
                    let at = self.slot_offset(slot) + (s - b * bs);
                    if !crate::block_cache::pread_nowait(&self.data, dst, at) {
                        return None;
                    }
                }
                Some(Rec::Zero) => dst.fill(0),
                None => {
                    if !base.read_now(dst, s) {
                        return None;
                    }
                }
            }
        }
        Some(Ok(()))
    }

    fn try_extents(&self, offset: u64, len: u64) -> Option<io::Result<Vec<DiskExtent>>> {
        if let Err(e) = self
            .admit()
            .and_then(|_| check_range(self.size, offset, len))
        {
            return Some(Err(e));
        }
        if len == 0 {
            return Some(Ok(Vec::new()));
        }
        let bs = self.bs as u64;
        let from = offset / bs;
        let to = (offset + len).div_ceil(bs).min(from + MAX_EXTENT_BLOCKS);
        let (delta, base) = {
            let st = self.state.try_read().ok()?;
            let delta: Vec<(u64, Rec)> = st.map.range(from..to).map(|(b, r)| (*b, *r)).collect();
            (delta, st.base.clone())
        };
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut cursor = from;
        for (b, rec) in delta {
            if b > cursor {
                runs.extend(base.known_block_runs(cursor, b)?);
            }
            runs.push((b, 1, matches!(rec, Rec::Data(_))));
            cursor = b + 1;
        }
        if cursor < to {
            runs.extend(base.known_block_runs(cursor, to)?);
        }
        Some(Ok(block_runs_to_extents(
            &runs,
            bs,
            offset,
            (offset + len).min(to * bs),
        )))
    }
}

#[cfg(test)]
mod seal_tests {
    use super::*;

    const BS: usize = 4096;

    /// A store with one version of 8 blocks, all `0x01`.
    fn base(dir: &Path) -> (Arc<Store>, VersionId) {
        let store = Arc::new(Store::init(&dir.join("store")).unwrap());
        let mut s = WriteSession::begin(&store, "test").unwrap();
        let mut d = s.new_version(8 * BS as u64, BS as u32).unwrap();
        let blocks = (0..8).map(|_| BlockInput::Data(vec![1u8; BS])).collect();
        s.add_blocks(&mut d, blocks).unwrap();
        let t = CommitTarget {
            image: "img".into(),
            branch: "main".into(),
            expected: None,
            create_image: true,
            parents: Vec::new(),
            author: "test".into(),
            message: "test".into(),
        };
        let (id, _, _) = s.commit(d, &t).unwrap();
        (store, id)
    }

    /// After a seal every client request fails, the acknowledged writes are durable
    /// and a commit takes exactly them; after `detach` the directory can be removed
    /// while the disk object lives on.
    #[test]
    fn a_sealed_session_refuses_its_clients_and_commits_what_they_were_told() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, base) = base(tmp.path());
        let dir = tmp.path().join("s");
        let disk = SessionDisk::create(&dir, store.clone(), base).unwrap();
        disk.write_at(&[2u8; BS], 0, false).unwrap();
        disk.write_zeroes(BS as u64, BS as u64, true, false)
            .unwrap();
        disk.seal().unwrap();
        assert!(disk.is_sealed());
        // Durable without a client flush: the journal lists both blocks.
        assert_eq!(SessionDisk::inspect(&dir).unwrap().delta_blocks, 2);
        let mut buf = vec![0u8; BS];
        let errors = [
            disk.write_at(&[3u8; BS], 2 * BS as u64, false).err(),
            disk.write_zeroes(3 * BS as u64, BS as u64, true, false)
                .err(),
            disk.trim(3 * BS as u64, BS as u64, false).err(),
            disk.read_at(&mut buf, 0).err(),
            disk.flush().err(),
            disk.cache(0, BS as u64).err(),
            disk.extents(0, BS as u64).err(),
            disk.try_read_at(&mut buf, 0).and_then(|r| r.err()),
        ];
        for (i, e) in errors.into_iter().enumerate() {
            let e = e.unwrap_or_else(|| panic!("request {i} was served after the seal"));
            assert_eq!(e.kind(), io::ErrorKind::Other, "request {i}: {e}");
        }
        let mut t = CommitTarget {
            image: "img".into(),
            branch: "main".into(),
            expected: Some(base),
            create_image: false,
            parents: Vec::new(),
            author: "test".into(),
            message: "last".into(),
        };
        t.parents = vec![base];
        let c = disk.commit(&t).unwrap();
        assert_eq!(c.committed_blocks, 2);
        let v = VersionDisk::open(store.clone(), c.version).unwrap();
        let mut got = vec![0u8; 3 * BS];
        v.read_at(&mut got, 0).unwrap();
        assert!(got[..BS].iter().all(|b| *b == 2));
        assert!(got[BS..2 * BS].iter().all(|b| *b == 0));
        assert!(got[2 * BS..].iter().all(|b| *b == 1), "the refused write");
        assert!(SessionDisk::remove(&dir).is_err(), "still locked");
        disk.detach().unwrap();
        SessionDisk::remove(&dir).unwrap();
        assert!(disk.write_at(&[4u8; BS], 0, true).is_err());
        drop(disk);
        assert!(!dir.exists());
    }
}
