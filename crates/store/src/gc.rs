//! Garbage collection: remove what no ref reaches, while other processes keep writing.
//!
//! 1. **Dead sessions.** A session whose process is gone (its lock file is no longer
//!    flock'ed) loses its pins and pack registrations; its unfinished temporary packs
//!    are deleted.
//! 2. **Mark** (no lock held). Starting from every ref and every pin of a live session,
//!    walk versions (with their ancestors), tree nodes and data, recording the catalog
//!    row of every object reached in a compressed bitmap — about one bit per object,
//!    so millions of objects need a few MB.
//! 3. **Sweep decision** (one write transaction). Refs and pins may have changed during
//!    the mark, so both are read again and whatever is new is marked (only new
//!    subtrees are walked). Still inside the transaction, every unmarked object outside
//!    packs that live sessions are writing is removed from the index. A session that
//!    finds an object present pins it in the same kind of transaction, so it either
//!    pinned before this point (and the object was marked) or finds it gone afterwards
//!    (and writes it again) — see [`crate::session`].
//! 4. **Reclaim.** Packs left without live objects are deleted; packs with more than
//!    [`REWRITE_DEAD_FRACTION`] dead bytes are rewritten with their live objects only,
//!    the index switched to the new copy in one transaction, then the old file deleted.
//!    Readers that raced the switch look the object up again. Small packs (under
//!    [`SMALL_PACK_SIZE`], left by small uploads and sync rounds) are merged the same
//!    way into full-size packs once there are [`MERGE_MIN_PACKS`] of them.
//! 5. **Orphans.** Pack files that no index row and no live session claims (left by a
//!    process killed between writing a pack and indexing it) are deleted.
//!
//! Every step is safe to interrupt with `kill -9`: the index only ever points at
//! complete packs, and whatever an interrupted gc leaves is found by the next one.

use std::collections::{HashMap, HashSet};
use std::fs::File;

use roaring::RoaringTreemap;
use rusqlite::{params, Connection};
use serde::Serialize;

use crate::catalog;
use crate::error::{IoContext, Result, StoreError};
use crate::id::{ChunkId, ObjectKind};
use crate::pack;
use crate::session::{end_session, WriteSession};
use crate::store::Store;
use crate::tree::{Entry, Node};
use crate::version::Version;

/// A pack is rewritten once more than this fraction of its bytes is dead.
pub const REWRITE_DEAD_FRACTION: f64 = 0.25;
/// Packs smaller than this are "small": every small upload or sync round writes one
/// (a hub taking a check-in of tens of KiB from each of thousands of points writes
/// thousands a day), and each costs a file, an open and a seek on read.
pub const SMALL_PACK_SIZE: u64 = pack::TARGET_PACK_SIZE / 16;
/// Once there are this many small packs, gc merges them into full-size ones.
pub const MERGE_MIN_PACKS: usize = 8;

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dead_sessions: u64,
    pub marked_objects: u64,
    pub deleted_objects: u64,
    pub deleted_versions: u64,
    pub packs_deleted: u64,
    pub packs_rewritten: u64,
    /// Of the packs rewritten, small ones merged together.
    pub packs_merged: u64,
    pub orphan_packs_deleted: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Phases reported to a progress display.
#[derive(Clone, Copy, Debug)]
pub enum GcPhase {
    Mark,
    Sweep,
    Rewrite,
}

impl GcPhase {
    /// What the phase does, for a progress display.
    pub fn describe(self) -> &'static str {
        match self {
            GcPhase::Mark => "marking what refs reach",
            GcPhase::Sweep => "sweeping",
            GcPhase::Rewrite => "rewriting packs",
        }
    }
}

/// The live part of a pack.
struct PackUse {
    name: String,
    size: u64,
    objects: u64,
    /// Entry headers and payloads of live objects.
    bytes: u64,
}

impl PackUse {
    /// Bytes a rewrite would free: the file minus what a pack of only the live
    /// objects would need.
    fn reclaimable(&self) -> u64 {
        let needed = pack::HEADER_LEN
            + self.bytes
            + 4
            + self.objects * pack::INDEX_ENTRY_LEN as u64
            + pack::FOOTER_LEN;
        self.size.saturating_sub(needed)
    }
}

struct Marker<'a> {
    store: &'a Store,
    marks: RoaringTreemap,
    /// Walk versions' parents (off for refs of `history_by_refs` images).
    follow_parents: bool,
}

impl Marker<'_> {
    /// Mark both kinds of roots: with ancestors first, so a version both reach keeps
    /// its history.
    fn mark_all(&mut self, conn: &Connection, roots: &(Vec<ChunkId>, Vec<ChunkId>)) -> Result<()> {
        self.follow_parents = true;
        self.mark(conn, &roots.0)?;
        self.follow_parents = false;
        let r = self.mark(conn, &roots.1);
        self.follow_parents = true;
        r
    }

    /// Mark `roots` and everything they reach. Objects already marked are not walked
    /// again, which is what makes the second pass cheap.
    fn mark(&mut self, conn: &Connection, roots: &[ChunkId]) -> Result<()> {
        let mut stack: Vec<ChunkId> = roots.to_vec();
        while let Some(id) = stack.pop() {
            let loc = catalog::locate(conn, &id)?.ok_or(StoreError::MissingObject {
                id,
                kind: "object reachable from a ref",
            })?;
            if !self.marks.insert(loc.rowid as u64) {
                continue;
            }
            match loc.entry.kind {
                ObjectKind::Data => {}
                ObjectKind::Tree => {
                    let raw = self.store.read_at(&loc)?;
                    let node =
                        Node::decode(&raw).map_err(|reason| StoreError::Corrupt { id, reason })?;
                    let children = crate::tree::present_ids(&node.entries);
                    if node.level == 0 {
                        // Data chunks have no children: mark them here in one batch.
                        for (c, r) in children.iter().zip(catalog::rowids(conn, &children)?) {
                            let r = r.ok_or(StoreError::MissingObject {
                                id: *c,
                                kind: "data",
                            })?;
                            self.marks.insert(r as u64);
                        }
                    } else {
                        stack.extend(children);
                    }
                }
                ObjectKind::Version => {
                    let raw = self.store.read_at(&loc)?;
                    let v = Version::decode(&raw)
                        .map_err(|reason| StoreError::Corrupt { id, reason })?;
                    if let Ok(Entry::Present(root)) = v.root_entry() {
                        stack.push(root);
                    }
                    // A parent the store does not hold is the edge of a shallow
                    // history (a version pulled or pushed without its ancestors).
                    let parents = if self.follow_parents {
                        v.parent_ids()
                            .map_err(|reason| StoreError::Corrupt { id, reason })?
                    } else {
                        Vec::new()
                    };
                    for p in parents {
                        if catalog::locate(conn, &p)?.is_some() {
                            stack.push(p);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Every object that refs and live sessions' pins name directly: those whose
/// ancestors are kept too, and (second) versions of `history_by_refs` images, whose
/// ancestors live only if something else keeps them.
fn roots(conn: &Connection) -> Result<(Vec<ChunkId>, Vec<ChunkId>)> {
    let mut out = Vec::new();
    let mut shallow = Vec::new();
    let mut stmt =
        conn.prepare("SELECT version, image IN (SELECT image FROM history_by_refs) FROM refs")?;
    for r in stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, bool>(1)?)))? {
        let (v, by_refs) = r?;
        if by_refs {
            shallow.extend(ChunkId::from_slice(&v));
        } else {
            out.extend(ChunkId::from_slice(&v));
        }
    }
    // The base versions of copy-on-write disk sessions (see `Store::disk_sessions`).
    let mut stmt = conn.prepare("SELECT base FROM disk_sessions")?;
    for r in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))? {
        out.extend(ChunkId::from_slice(&r?));
    }
    let mut stmt = conn.prepare("SELECT ids FROM session_pins")?;
    for r in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))? {
        out.extend(r?.chunks_exact(32).filter_map(ChunkId::from_slice));
    }
    Ok((out, shallow))
}

/// Is the session's process gone? (Its lock file is missing or no longer locked.)
fn session_is_dead(store: &Store, id: &str) -> bool {
    let path = store.sessions_dir().join(format!("{id}.lock"));
    match File::options().write(true).open(&path) {
        Ok(f) => f.try_lock().is_ok(),
        Err(_) => true,
    }
}

fn reap_dead_sessions(store: &Store) -> Result<u64> {
    // List temporary files before reading the session table: a session that starts
    // after the read creates its files after the listing, so they are never touched.
    let tmp_dir = store.tmp_dir();
    let tmp_files: Vec<String> = std::fs::read_dir(&tmp_dir)
        .at(&tmp_dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let sessions: Vec<String> = {
        let cat = store.cat();
        let mut stmt = cat.conn.prepare("SELECT id FROM sessions")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut dead = 0;
    let mut live = HashSet::new();
    for s in sessions {
        if session_is_dead(store, &s) {
            // A session that committed meanwhile has no row any more: not a death.
            if store.cat().write(|tx| end_session(tx, &s))? {
                dead += 1;
            }
            let _ = std::fs::remove_file(store.sessions_dir().join(format!("{s}.lock")));
        } else {
            live.insert(s);
        }
    }
    for f in tmp_files {
        let owner = f.split('-').next().unwrap_or("");
        if !live.contains(owner) {
            let _ = std::fs::remove_file(tmp_dir.join(&f));
        }
    }
    // Lock files of sessions that never made it into the table. A `.lock` name only
    // ever appears already locked (see `WriteSession::begin`); a `.lock.new` is
    // unlocked for an instant before that, so only old ones are removed.
    if let Ok(rd) = std::fs::read_dir(store.sessions_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name.strip_suffix(".lock") {
                if !live.contains(id) && session_is_dead(store, id) {
                    let _ = std::fs::remove_file(e.path());
                }
            } else if name.ends_with(".lock.new") {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(3600));
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(dead)
}

/// Run a full gc. `progress` is told which phase is running.
pub fn gc(store: &Store, progress: &mut dyn FnMut(GcPhase)) -> Result<GcReport> {
    let lock_path = store.root().join("gc.lock");
    let lock = File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .at(&lock_path)?;
    if lock.try_lock().is_err() {
        return Err(StoreError::GcBusy);
    }
    let mut report = GcReport {
        dead_sessions: reap_dead_sessions(store)?,
        ..Default::default()
    };
    report.bytes_before = store.pack_bytes()?;

    progress(GcPhase::Mark);
    let mut marker = Marker {
        store,
        marks: RoaringTreemap::new(),
        follow_parents: true,
    };
    {
        let cat = store.cat();
        let r = roots(&cat.conn)?;
        marker.mark_all(&cat.conn, &r)?;
    }

    progress(GcPhase::Sweep);
    // Per pack still indexed after the sweep: what its live objects occupy. What a
    // rewrite would reclaim is the rest of the file, whether its objects died in this
    // gc or in one that was killed before it could rewrite the pack.
    let mut live: HashMap<i64, PackUse> = HashMap::new();
    // Durable before any file is deleted: the index must never come back pointing at
    // packs that are gone.
    let empty_packs: Vec<String> = store.cat().write_durable(|tx| {
        let r = roots(tx)?;
        marker.mark_all(tx, &r)?;
        let protected: HashSet<String> = {
            let mut stmt = tx.prepare("SELECT pack FROM session_packs")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        // Versions whose records are unreachable leave the listing with them.
        let mut dead_versions = Vec::new();
        {
            let mut stmt = tx.prepare(
                "SELECT v.id, c.rowid FROM versions v LEFT JOIN chunks c ON c.id = v.id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<i64>>(1)?)))?;
            for row in rows {
                let (id, rowid) = row?;
                if !rowid.is_some_and(|r| marker.marks.contains(r as u64)) {
                    dead_versions.push(id);
                }
            }
        }
        for id in &dead_versions {
            tx.execute("DELETE FROM versions WHERE id = ?", [id])?;
        }
        report.deleted_versions = dead_versions.len() as u64;
        let mut dead = RoaringTreemap::new();
        {
            let mut stmt = tx.prepare(
                "SELECT c.rowid, c.pack, p.name, p.size, c.stored_len FROM chunks c JOIN packs p ON p.id = c.pack",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let (rowid, pack, name, size, len): (i64, i64, String, i64, i64) =
                    (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?);
                if protected.contains(&name) {
                    continue;
                }
                if marker.marks.contains(rowid as u64) {
                    let u = live.entry(pack).or_insert_with(|| PackUse {
                        name,
                        size: size as u64,
                        objects: 0,
                        bytes: 0,
                    });
                    u.objects += 1;
                    u.bytes += len as u64 + pack::ENTRY_HEADER_LEN;
                } else {
                    dead.insert(rowid as u64);
                }
            }
        }
        {
            let mut del = tx.prepare("DELETE FROM chunks WHERE rowid = ?")?;
            for r in dead.iter() {
                del.execute([r as i64])?;
            }
        }
        report.deleted_objects = dead.len();
        let mut empty = Vec::new();
        {
            let mut stmt = tx.prepare(
                "SELECT id, name FROM packs p WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.pack = p.id)",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
            for row in rows {
                let (id, name) = row?;
                if !protected.contains(&name) {
                    empty.push((id, name));
                }
            }
        }
        for (id, _) in &empty {
            tx.execute("DELETE FROM packs WHERE id = ?", [id])?;
        }
        Ok(empty.into_iter().map(|(_, n)| n).collect())
    })?;
    report.marked_objects = marker.marks.len();
    for name in &empty_packs {
        store.backend.delete_pack(name)?;
    }
    report.packs_deleted = empty_packs.len() as u64;

    progress(GcPhase::Rewrite);
    type Packs = Vec<(i64, PackUse)>;
    let (mut rewrite, small): (Packs, Packs) = live
        .into_iter()
        .filter(|(_, u)| {
            (u.reclaimable() as f64) > REWRITE_DEAD_FRACTION * u.size as f64
                || u.size < SMALL_PACK_SIZE
        })
        .partition(|(_, u)| (u.reclaimable() as f64) > REWRITE_DEAD_FRACTION * u.size as f64);
    if small.len() >= MERGE_MIN_PACKS {
        report.packs_merged = small.len() as u64;
        rewrite.extend(small);
    }
    // In pack order (oldest first), so merged objects keep roughly their write order.
    rewrite.sort_by_key(|(id, _)| *id);
    let rewrite: Vec<(i64, String)> = rewrite.into_iter().map(|(id, u)| (id, u.name)).collect();
    if !rewrite.is_empty() {
        rewrite_packs(store, &rewrite)?;
        report.packs_rewritten = rewrite.len() as u64;
    }

    report.orphan_packs_deleted = delete_orphans(store)?;
    report.bytes_after = store.pack_bytes()?;
    drop(lock);
    Ok(report)
}

/// Copy the live objects of `packs` into new packs, switch the index, delete the old.
fn rewrite_packs(store: &Store, packs: &[(i64, String)]) -> Result<()> {
    let mut session = WriteSession::begin(store, "gc: rewrite packs")?;
    session.set_relocate();
    for (pack_id, name) in packs {
        let live: Vec<catalog::Location> = {
            let cat = store.cat();
            let sql = format!(
                "SELECT {} FROM chunks c JOIN packs p ON p.id = c.pack WHERE c.pack = ? ORDER BY c.offset",
                catalog::LOCATION_COLUMNS
            );
            let mut stmt = cat.conn.prepare(&sql)?;
            let rows = stmt.query_map([pack_id], catalog::row_location)?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for loc in live {
            let buf =
                store
                    .backend
                    .read_range(name, loc.entry.offset, loc.entry.span() as usize)?;
            // Check before copying: gc must never spread damage into a fresh pack.
            pack::decode_entry(&loc.entry, &buf)?;
            session.append(
                loc.entry.kind,
                loc.entry.id,
                loc.entry.raw_len as usize,
                loc.entry.codec,
                &buf[pack::ENTRY_HEADER_LEN as usize..],
            )?;
        }
    }
    session.finish_without_commit()?;
    let gone: Vec<String> = store.cat().write_durable(|tx| {
        let mut gone = Vec::new();
        for (id, name) in packs {
            let n: i64 = tx.query_row("SELECT count(*) FROM chunks WHERE pack = ?", [id], |r| {
                r.get(0)
            })?;
            if n == 0 {
                tx.execute("DELETE FROM packs WHERE id = ?", params![id])?;
                gone.push(name.clone());
            }
        }
        Ok(gone)
    })?;
    for name in gone {
        store.backend.delete_pack(&name)?;
    }
    Ok(())
}

fn delete_orphans(store: &Store) -> Result<u64> {
    // Files first, claims second: a pack is registered to its session before its file
    // exists, and indexed before that registration ends.
    let files = store.backend.list_packs()?;
    let claimed: HashSet<String> = {
        let cat = store.cat();
        let mut stmt = cat
            .conn
            .prepare("SELECT name FROM packs UNION SELECT pack FROM session_packs")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut n = 0;
    for f in files {
        if !claimed.contains(&f) {
            store.backend.delete_pack(&f)?;
            n += 1;
        }
    }
    Ok(n)
}
