//! The catalog: a SQLite database beside the packs.
//!
//! It holds what must change atomically and be found quickly: the chunk index (which
//! pack and offset holds each object), images and their refs (branches and tags), a
//! listing of versions, and the write sessions in progress with the objects they have
//! pinned against gc. SQLite in WAL mode lets several processes read and write one
//! store at once; every multi-row change is one transaction, so a process killed at
//! any point leaves either all of a change or none of it.
//!
//! The packs are the source of truth for object content; the index can be rebuilt
//! from the pack indexes. Refs and the version listing live only here.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::error::Result;
use crate::id::{ChunkId, ObjectKind};
use crate::pack::PackEntry;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks(
    rowid INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    pack INTEGER NOT NULL REFERENCES packs(id),
    offset INTEGER NOT NULL,
    codec INTEGER NOT NULL,
    raw_len INTEGER NOT NULL,
    stored_len INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack);
CREATE TABLE IF NOT EXISTS images(
    name TEXT PRIMARY KEY,
    block_size INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS refs(
    image TEXT NOT NULL REFERENCES images(name),
    kind TEXT NOT NULL CHECK (kind IN ('branch', 'tag')),
    name TEXT NOT NULL,
    version BLOB NOT NULL,
    updated INTEGER NOT NULL,
    PRIMARY KEY(image, kind, name)
);
CREATE TABLE IF NOT EXISTS versions(
    id BLOB PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions(
    id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    started INTEGER NOT NULL,
    purpose TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS session_packs(
    pack TEXT PRIMARY KEY,
    session TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS session_pins(
    session TEXT NOT NULL,
    ids BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS session_pins_by_session ON session_pins(session);
-- Images whose history lives only as long as refs name it: gc does not follow the
-- parents of versions it reaches from their refs (retention by restore-point tags).
CREATE TABLE IF NOT EXISTS history_by_refs(image TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS disk_sessions(
    name TEXT PRIMARY KEY,
    image TEXT NOT NULL,
    branch TEXT,
    base BLOB NOT NULL,
    created INTEGER NOT NULL
);
"#;

/// Location of an object as the index records it.
#[derive(Clone, Debug)]
pub struct Location {
    pub rowid: i64,
    pub pack: String,
    pub entry: PackEntry,
}

pub struct Catalog {
    pub(crate) conn: Connection,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog> {
        let conn = Connection::open(path)?;
        // Writers in other processes hold the lock for short transactions only;
        // waiting is right, failing is not.
        conn.busy_timeout(Duration::from_secs(120))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode never corrupts and survives any process crash; only a power
        // cut may lose the newest transactions. Transactions that publish something
        // (refs, gc's deletions) use `write_durable`, whose fsync also covers all the
        // transactions before it.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Catalog { conn })
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    /// Like [`Catalog::write`], but the commit is fsynced before this returns: a ref
    /// moved here survives a power cut, and so does every earlier transaction.
    pub fn write_durable<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction) -> Result<T>,
    ) -> Result<T> {
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        let out = self.write(f);
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        out
    }

    /// Run `f` in an IMMEDIATE transaction: the write lock is taken up front, so two
    /// writers never deadlock upgrading a read lock.
    pub fn write<T>(&mut self, f: impl FnOnce(&rusqlite::Transaction) -> Result<T>) -> Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }
}

pub(crate) fn row_location(r: &rusqlite::Row) -> rusqlite::Result<Location> {
    let id: Vec<u8> = r.get(1)?;
    let kind: u8 = r.get(2)?;
    Ok(Location {
        rowid: r.get(0)?,
        pack: r.get(3)?,
        entry: PackEntry {
            id: ChunkId::from_slice(&id).unwrap_or(ChunkId([0; 32])),
            kind: ObjectKind::from_u8(kind).unwrap_or(ObjectKind::Data),
            codec: r.get(5)?,
            domain: 0,
            offset: r.get::<_, i64>(4)? as u64,
            raw_len: r.get::<_, i64>(6)? as u32,
            stored_len: r.get::<_, i64>(7)? as u32,
        },
    })
}

pub(crate) const LOCATION_COLUMNS: &str =
    "c.rowid, c.id, c.kind, p.name, c.offset, c.codec, c.raw_len, c.stored_len";

/// Look up one object.
pub fn locate(conn: &Connection, id: &ChunkId) -> Result<Option<Location>> {
    let sql = format!(
        "SELECT {LOCATION_COLUMNS} FROM chunks c JOIN packs p ON p.id = c.pack WHERE c.id = ?"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([&id.0[..]], row_location)
        .optional()?)
}

/// Which of `ids` are in the index (rowids, in the order given; `None` if absent).
pub fn rowids(conn: &Connection, ids: &[ChunkId]) -> Result<Vec<Option<i64>>> {
    let mut stmt = conn.prepare_cached("SELECT rowid FROM chunks WHERE id = ?")?;
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(
            stmt.query_row([&id.0[..]], |r| r.get::<_, i64>(0))
                .optional()?,
        );
    }
    Ok(out)
}

/// Record a pack and all its entries in the index (inside the caller's transaction).
pub fn insert_pack(
    tx: &rusqlite::Transaction,
    name: &str,
    size: u64,
    entries: &[PackEntry],
    relocate: bool,
) -> Result<()> {
    tx.execute(
        "INSERT INTO packs(name, size) VALUES(?, ?)",
        params![name, size as i64],
    )?;
    let pack_id = tx.last_insert_rowid();
    // A writer that raced another to store the same object keeps the first copy; gc
    // moving objects to a new pack (`relocate`) points the index at the new copy.
    let mut stmt = tx.prepare_cached(if relocate {
        "INSERT INTO chunks(id, kind, pack, offset, codec, raw_len, stored_len)
         VALUES(?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT(id) DO UPDATE SET pack = excluded.pack, offset = excluded.offset,
             codec = excluded.codec, stored_len = excluded.stored_len"
    } else {
        "INSERT INTO chunks(id, kind, pack, offset, codec, raw_len, stored_len)
         VALUES(?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT(id) DO NOTHING"
    })?;
    for e in entries {
        stmt.execute(params![
            &e.id.0[..],
            e.kind as u8,
            pack_id,
            e.offset as i64,
            e.codec,
            e.raw_len,
            e.stored_len
        ])?;
    }
    Ok(())
}
