//! The hub's metadata: points, enrolment tokens, grants, image owners, audit log.
//!
//! Behind the [`MetaDb`] trait so that a PostgreSQL implementation (several hub
//! replicas sharing one database) can replace the embedded SQLite one without
//! touching the service. Secrets are never stored: tokens and credentials are kept
//! as BLAKE3 hashes (they are 256-bit random strings, so a fast hash is enough).

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use strata_sync::api::{AuditEntry, ChannelInfo, ChannelLogEntry, PointInfo};

pub type DbResult<T> = Result<T, DbError>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("metadata database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Invalid(String),
}

/// A 32-byte hash of a secret.
pub type SecretHash = [u8; 32];

pub fn hash_secret(s: &str) -> SecretHash {
    *blake3::hash(s.as_bytes()).as_bytes()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointRow {
    pub name: String,
    pub revoked: bool,
}

/// What the hub needs to remember besides the store.
pub trait MetaDb: Send + Sync {
    /// Remember a one-time enrolment token for point `name` (replacing an unused one).
    fn create_enrollment(&self, name: &str, token: &SecretHash, expires: i64) -> DbResult<()>;
    /// Consume a valid token: the point `name` (new, or re-enrolled) gets `credential`
    /// and is no longer revoked. `None` if the token is unknown, used or expired.
    fn redeem_enrollment(
        &self,
        token: &SecretHash,
        credential: &SecretHash,
        now: i64,
    ) -> DbResult<Option<String>>;
    fn point_by_credential(&self, credential: &SecretHash) -> DbResult<Option<PointRow>>;
    fn touch_point(&self, name: &str, now: i64) -> DbResult<()>;
    /// Revoke a point's credential; false if there is no such point.
    fn revoke_point(&self, name: &str) -> DbResult<bool>;
    fn points(&self) -> DbResult<Vec<PointInfo>>;
    fn point_exists(&self, name: &str) -> DbResult<bool>;
    fn grant(&self, point: &str, image: &str) -> DbResult<()>;
    fn revoke_grant(&self, point: &str, image: &str) -> DbResult<bool>;
    fn is_granted(&self, point: &str, image: &str) -> DbResult<bool>;
    fn owner(&self, image: &str) -> DbResult<Option<String>>;
    /// Make `point` the owner of `image` unless someone already is; returns the owner.
    fn claim(&self, image: &str, point: &str) -> DbResult<String>;
    fn audit(&self, actor: &str, action: &str, target: &str, detail: &str) -> DbResult<()>;
    /// The newest `limit` entries, newest first.
    fn audit_log(&self, limit: u32) -> DbResult<Vec<AuditEntry>>;
    /// A channel's whole log, oldest first (empty: no such channel).
    fn channel_log(&self, channel: &str) -> DbResult<Vec<ChannelLogEntry>>;
    /// A channel's newest entry: where it points (asked on every read a desktop's
    /// holder makes, so without reading the whole log).
    fn channel_head(&self, channel: &str) -> DbResult<Option<ChannelLogEntry>>;
    /// Every channel's current state.
    fn channels(&self) -> DbResult<Vec<ChannelInfo>>;
    /// Append `entry` to `channel`'s log — its `seq` must be one more than the log's
    /// last — if the log's last sequence number is still `entry.seq - 1`, and record it
    /// in the audit log, in one transaction. False (nothing written) if the channel
    /// moved meanwhile.
    fn channel_append(&self, channel: &str, entry: &ChannelLogEntry) -> DbResult<bool>;

    /// Record a new desktop (false if the name is taken).
    fn create_desktop(&self, d: &DesktopRow) -> DbResult<bool>;
    fn desktop(&self, name: &str) -> DbResult<Option<DesktopRow>>;
    fn desktops(&self) -> DbResult<Vec<DesktopRow>>;
    fn delete_desktop(&self, name: &str) -> DbResult<bool>;
    /// The desktop whose user disk is `image`, if any.
    fn desktop_by_user_image(&self, image: &str) -> DbResult<Option<DesktopRow>>;
    /// Make `point` the holder of desktop `name` — if it has none, or already is, or
    /// `force` — and audit it, in one transaction. Returns the desktop afterwards, or
    /// `Err(current)` (unchanged) when someone else holds it and `force` is off.
    fn check_out(
        &self,
        name: &str,
        point: &str,
        force: bool,
        actor: &str,
    ) -> DbResult<Result<DesktopRow, DesktopRow>>;
    /// Release `point`'s hold on desktop `name` and audit it as `actor`'s; false if
    /// it did not hold it.
    fn check_in(&self, name: &str, point: &str, actor: &str) -> DbResult<bool>;
    /// Has `point` ever held desktop `name`?
    fn held_before(&self, name: &str, point: &str) -> DbResult<bool>;
    /// The desktops `point` holds now.
    fn desktops_held_by(&self, point: &str) -> DbResult<Vec<DesktopRow>>;
    /// When `point` last made a request (to the minute), if ever.
    fn last_seen(&self, point: &str) -> DbResult<Option<i64>>;
    /// Count one more OS reset request of desktop `name` by `actor` and audit it, in
    /// one transaction. The desktop afterwards (`None`: no such desktop).
    fn request_os_reset(&self, name: &str, actor: &str) -> DbResult<Option<DesktopRow>>;
    /// Keep `report` (JSON) as desktop `name`'s newest report, from `point`.
    fn put_desktop_report(
        &self,
        name: &str,
        point: &str,
        received: i64,
        report: &str,
    ) -> DbResult<()>;
    /// Desktop `name`'s newest report: (point, received, JSON).
    fn desktop_report(&self, name: &str) -> DbResult<Option<(String, i64, String)>>;
}

/// A desktop as the hub's metadata keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesktopRow {
    pub name: String,
    pub channel: String,
    pub user_image: String,
    pub created: i64,
    pub holder: Option<String>,
    pub holder_since: Option<i64>,
    pub epoch: i64,
    /// OS resets requested so far, and the last one's time and actor.
    pub os_reset: i64,
    pub os_reset_time: Option<i64>,
    pub os_reset_by: Option<String>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS points(
    name TEXT PRIMARY KEY,
    credential BLOB UNIQUE,
    enrolled INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    last_seen INTEGER
);
CREATE TABLE IF NOT EXISTS enrollments(
    token BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    expires INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS grants(
    point TEXT NOT NULL,
    image TEXT NOT NULL,
    PRIMARY KEY(point, image)
);
CREATE TABLE IF NOT EXISTS owners(
    image TEXT PRIMARY KEY,
    point TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS channel_log(
    channel TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    image TEXT NOT NULL,
    version TEXT NOT NULL,
    previous TEXT,
    detail TEXT NOT NULL,
    PRIMARY KEY(channel, seq)
);
CREATE TABLE IF NOT EXISTS desktops(
    name TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    user_image TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL,
    holder TEXT,
    holder_since INTEGER,
    epoch INTEGER NOT NULL DEFAULT 0,
    os_reset INTEGER NOT NULL DEFAULT 0,
    os_reset_time INTEGER,
    os_reset_by TEXT
);
CREATE INDEX IF NOT EXISTS desktops_by_holder ON desktops(holder);
CREATE TABLE IF NOT EXISTS desktop_holders(
    desktop TEXT NOT NULL,
    point TEXT NOT NULL,
    since INTEGER NOT NULL,
    PRIMARY KEY(desktop, point)
);
CREATE TABLE IF NOT EXISTS desktop_reports(
    desktop TEXT PRIMARY KEY,
    point TEXT NOT NULL,
    received INTEGER NOT NULL,
    report TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit(
    id INTEGER PRIMARY KEY,
    time INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
"#;

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// [`MetaDb`] in an SQLite file beside the hub's store (WAL, one connection: the
/// hub's metadata traffic is a few small queries per request).
pub struct SqliteMeta {
    conn: Mutex<Connection>,
}

impl SqliteMeta {
    pub fn open(path: &Path) -> DbResult<SqliteMeta> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        conn.set_prepared_statement_cache_capacity(128);
        Ok(SqliteMeta {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f`, one autocommit write that is only a point's news (its last contact,
    /// its latest report), without waiting for it to reach the disk. A process crash
    /// still keeps it (WAL); a power cut may take it, until the next write that does
    /// wait (every other one) makes the WAL before it durable too. Both are sent again
    /// at the point's next contact anyway. Saves an fsync on most requests.
    fn relaxed<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> DbResult<T> {
        let c = self.conn();
        c.pragma_update(None, "synchronous", "NORMAL")?;
        let r = f(&c);
        c.pragma_update(None, "synchronous", "FULL")?;
        Ok(r?)
    }
}

/// Statements through the connection's statement cache: the hub runs the same few
/// dozen statements on every request, and compiling them again each time was 12%
/// of its CPU under the scale benchmark.
trait Cached {
    fn execute_cached<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn query_row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn execute_cached<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn query_row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// Bring a database made by an older hub up to [`SCHEMA`] (columns added since).
fn migrate(conn: &Connection) -> DbResult<()> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('desktops')")?;
    let columns: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for (column, decl) in [
        ("os_reset", "INTEGER NOT NULL DEFAULT 0"),
        ("os_reset_time", "INTEGER"),
        ("os_reset_by", "TEXT"),
    ] {
        if !columns.iter().any(|c| c == column) {
            conn.execute_batch(&format!("ALTER TABLE desktops ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

impl MetaDb for SqliteMeta {
    fn create_enrollment(&self, name: &str, token: &SecretHash, expires: i64) -> DbResult<()> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute_cached("DELETE FROM enrollments WHERE name = ?", [name])?;
        tx.execute_cached(
            "INSERT INTO enrollments(token, name, expires) VALUES(?, ?, ?)",
            params![&token[..], name, expires],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn redeem_enrollment(
        &self,
        token: &SecretHash,
        credential: &SecretHash,
        now: i64,
    ) -> DbResult<Option<String>> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let row: Option<(String, i64)> = tx
            .query_row_cached(
                "SELECT name, expires FROM enrollments WHERE token = ?",
                [&token[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((name, expires)) = row else {
            return Ok(None);
        };
        // One use only, valid or not.
        tx.execute_cached("DELETE FROM enrollments WHERE token = ?", [&token[..]])?;
        if expires < now {
            tx.commit()?;
            return Ok(None);
        }
        tx.execute_cached(
            "INSERT INTO points(name, credential, enrolled, revoked) VALUES(?, ?, ?, 0)
             ON CONFLICT(name) DO UPDATE SET credential = excluded.credential,
                 enrolled = excluded.enrolled, revoked = 0",
            params![name, &credential[..], now],
        )?;
        tx.commit()?;
        Ok(Some(name))
    }

    fn point_by_credential(&self, credential: &SecretHash) -> DbResult<Option<PointRow>> {
        Ok(self
            .conn()
            .query_row_cached(
                "SELECT name, revoked FROM points WHERE credential = ?",
                [&credential[..]],
                |r| {
                    Ok(PointRow {
                        name: r.get(0)?,
                        revoked: r.get::<_, i64>(1)? != 0,
                    })
                },
            )
            .optional()?)
    }

    fn touch_point(&self, name: &str, now: i64) -> DbResult<()> {
        self.relaxed(|c| {
            c.execute_cached(
                "UPDATE points SET last_seen = ? WHERE name = ? AND coalesce(last_seen, 0) < ? - 60",
                params![now, name, now],
            )
        })?;
        Ok(())
    }

    fn revoke_point(&self, name: &str) -> DbResult<bool> {
        Ok(self
            .conn()
            .execute_cached("UPDATE points SET revoked = 1 WHERE name = ?", [name])?
            > 0)
    }

    fn points(&self) -> DbResult<Vec<PointInfo>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached(
            "SELECT name, enrolled, revoked, last_seen FROM points ORDER BY name",
        )?;
        let rows: Vec<(String, i64, i64, Option<i64>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for (name, enrolled, revoked, last_seen) in rows {
            let list = |sql: &str| -> DbResult<Vec<String>> {
                let mut s = c.prepare_cached(sql)?;
                let v = s
                    .query_map([&name], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                Ok(v)
            };
            out.push(PointInfo {
                grants: list("SELECT image FROM grants WHERE point = ? ORDER BY image")?,
                owns: list("SELECT image FROM owners WHERE point = ? ORDER BY image")?,
                name,
                enrolled,
                revoked: revoked != 0,
                last_seen,
            });
        }
        Ok(out)
    }

    fn point_exists(&self, name: &str) -> DbResult<bool> {
        Ok(self.conn().query_row_cached(
            "SELECT count(*) FROM points WHERE name = ?",
            [name],
            |r| r.get::<_, i64>(0),
        )? > 0)
    }

    fn grant(&self, point: &str, image: &str) -> DbResult<()> {
        self.conn().execute_cached(
            "INSERT INTO grants(point, image) VALUES(?, ?) ON CONFLICT DO NOTHING",
            params![point, image],
        )?;
        Ok(())
    }

    fn revoke_grant(&self, point: &str, image: &str) -> DbResult<bool> {
        Ok(self.conn().execute_cached(
            "DELETE FROM grants WHERE point = ? AND image = ?",
            params![point, image],
        )? > 0)
    }

    fn is_granted(&self, point: &str, image: &str) -> DbResult<bool> {
        Ok(self.conn().query_row_cached(
            "SELECT count(*) FROM grants WHERE point = ? AND image = ?",
            params![point, image],
            |r| r.get::<_, i64>(0),
        )? > 0)
    }

    fn owner(&self, image: &str) -> DbResult<Option<String>> {
        Ok(self
            .conn()
            .query_row_cached("SELECT point FROM owners WHERE image = ?", [image], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn claim(&self, image: &str, point: &str) -> DbResult<String> {
        let c = self.conn();
        c.execute_cached(
            "INSERT INTO owners(image, point) VALUES(?, ?) ON CONFLICT DO NOTHING",
            params![image, point],
        )?;
        Ok(
            c.query_row_cached("SELECT point FROM owners WHERE image = ?", [image], |r| {
                r.get(0)
            })?,
        )
    }

    fn audit(&self, actor: &str, action: &str, target: &str, detail: &str) -> DbResult<()> {
        self.conn().execute_cached(
            "INSERT INTO audit(time, actor, action, target, detail) VALUES(?, ?, ?, ?, ?)",
            params![now(), actor, action, target, detail],
        )?;
        Ok(())
    }

    fn audit_log(&self, limit: u32) -> DbResult<Vec<AuditEntry>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached(
            "SELECT id, time, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT ?",
        )?;
        let rows = stmt.query_map([limit], |r| {
            Ok(AuditEntry {
                id: r.get(0)?,
                time: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                detail: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn channel_log(&self, channel: &str) -> DbResult<Vec<ChannelLogEntry>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached(&format!(
            "SELECT {CHANNEL_COLUMNS} FROM channel_log WHERE channel = ? ORDER BY seq"
        ))?;
        let rows = stmt.query_map([channel], channel_entry)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn channel_head(&self, channel: &str) -> DbResult<Option<ChannelLogEntry>> {
        Ok(self
            .conn()
            .query_row_cached(
                &format!(
                    "SELECT {CHANNEL_COLUMNS} FROM channel_log WHERE channel = ? ORDER BY seq DESC LIMIT 1"
                ),
                [channel],
                channel_entry,
            )
            .optional()?)
    }

    fn channels(&self) -> DbResult<Vec<ChannelInfo>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached(
            "SELECT channel, image, version, seq, time, actor FROM channel_log l
             WHERE seq = (SELECT max(seq) FROM channel_log WHERE channel = l.channel)
             ORDER BY channel",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ChannelInfo {
                name: r.get(0)?,
                image: r.get(1)?,
                version: r.get(2)?,
                seq: r.get(3)?,
                time: r.get(4)?,
                actor: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn channel_append(&self, channel: &str, e: &ChannelLogEntry) -> DbResult<bool> {
        let mut c = self.conn();
        // IMMEDIATE: the check and the insert see no other writer between them.
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let last: i64 = tx.query_row_cached(
            "SELECT coalesce(max(seq), 0) FROM channel_log WHERE channel = ?",
            [channel],
            |r| r.get(0),
        )?;
        if last != e.seq - 1 {
            return Ok(false);
        }
        tx.execute_cached(
            &format!("INSERT INTO channel_log(channel, {CHANNEL_COLUMNS}) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)"),
            params![
                channel, e.seq, e.time, e.actor, e.action, e.image, e.version, e.previous, e.detail
            ],
        )?;
        let detail = match &e.previous {
            Some(p) => format!("{}@{} (was {}) {}", e.image, e.version, p, e.detail),
            None => format!("{}@{} {}", e.image, e.version, e.detail),
        };
        tx.execute_cached(
            "INSERT INTO audit(time, actor, action, target, detail) VALUES(?, ?, ?, ?, ?)",
            params![
                e.time,
                e.actor,
                format!("channel.{}", e.action),
                channel,
                detail.trim_end()
            ],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn create_desktop(&self, d: &DesktopRow) -> DbResult<bool> {
        Ok(self.conn().execute_cached(
            &format!("INSERT INTO desktops({DESKTOP_COLUMNS}) VALUES(?, ?, ?, ?, NULL, NULL, 0, 0, NULL, NULL) ON CONFLICT DO NOTHING"),
            params![d.name, d.channel, d.user_image, d.created],
        )? > 0)
    }

    fn desktop(&self, name: &str) -> DbResult<Option<DesktopRow>> {
        Ok(self
            .conn()
            .query_row_cached(
                &format!("SELECT {DESKTOP_COLUMNS} FROM desktops WHERE name = ?"),
                [name],
                desktop_row,
            )
            .optional()?)
    }

    fn desktops(&self) -> DbResult<Vec<DesktopRow>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached(&format!(
            "SELECT {DESKTOP_COLUMNS} FROM desktops ORDER BY name"
        ))?;
        let rows = stmt.query_map([], desktop_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn delete_desktop(&self, name: &str) -> DbResult<bool> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute_cached("DELETE FROM desktop_holders WHERE desktop = ?", [name])?;
        tx.execute_cached("DELETE FROM desktop_reports WHERE desktop = ?", [name])?;
        let n = tx.execute_cached("DELETE FROM desktops WHERE name = ?", [name])?;
        tx.commit()?;
        Ok(n > 0)
    }

    fn desktop_by_user_image(&self, image: &str) -> DbResult<Option<DesktopRow>> {
        Ok(self
            .conn()
            .query_row_cached(
                &format!("SELECT {DESKTOP_COLUMNS} FROM desktops WHERE user_image = ?"),
                [image],
                desktop_row,
            )
            .optional()?)
    }

    fn check_out(
        &self,
        name: &str,
        point: &str,
        force: bool,
        actor: &str,
    ) -> DbResult<Result<DesktopRow, DesktopRow>> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let Some(d) = tx
            .query_row_cached(
                &format!("SELECT {DESKTOP_COLUMNS} FROM desktops WHERE name = ?"),
                [name],
                desktop_row,
            )
            .optional()?
        else {
            return Err(DbError::Invalid(format!("no desktop named {name:?}")));
        };
        match d.holder.as_deref() {
            Some(h) if h == point => return Ok(Ok(d)),
            Some(_) if !force => return Ok(Err(d)),
            _ => {}
        }
        let t = now();
        tx.execute_cached(
            "UPDATE desktops SET holder = ?, holder_since = ?, epoch = epoch + 1 WHERE name = ?",
            params![point, t, name],
        )?;
        tx.execute_cached(
            "INSERT INTO desktop_holders(desktop, point, since) VALUES(?, ?, ?) ON CONFLICT DO NOTHING",
            params![name, point, t],
        )?;
        let detail = match &d.holder {
            Some(h) => format!("to {point}, taken from {h}"),
            None => format!("to {point}"),
        };
        let action = if actor == "admin" {
            "desktop.transfer"
        } else {
            "desktop.checkout"
        };
        tx.execute_cached(
            "INSERT INTO audit(time, actor, action, target, detail) VALUES(?, ?, ?, ?, ?)",
            params![t, actor, action, name, detail],
        )?;
        let after = tx.query_row_cached(
            &format!("SELECT {DESKTOP_COLUMNS} FROM desktops WHERE name = ?"),
            [name],
            desktop_row,
        )?;
        tx.commit()?;
        Ok(Ok(after))
    }

    fn check_in(&self, name: &str, point: &str, actor: &str) -> DbResult<bool> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute_cached(
            "UPDATE desktops SET holder = NULL, holder_since = NULL, epoch = epoch + 1
             WHERE name = ? AND holder = ?",
            params![name, point],
        )?;
        if n > 0 {
            tx.execute_cached(
                "INSERT INTO audit(time, actor, action, target, detail) VALUES(?, ?, 'desktop.checkin', ?, ?)",
                params![now(), actor, name, format!("from {point}")],
            )?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    fn desktops_held_by(&self, point: &str) -> DbResult<Vec<DesktopRow>> {
        let c = self.conn();
        let mut stmt = c.prepare_cached(&format!(
            "SELECT {DESKTOP_COLUMNS} FROM desktops WHERE holder = ? ORDER BY name"
        ))?;
        let rows = stmt.query_map([point], desktop_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn last_seen(&self, point: &str) -> DbResult<Option<i64>> {
        Ok(self
            .conn()
            .query_row_cached(
                "SELECT last_seen FROM points WHERE name = ?",
                [point],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    fn held_before(&self, name: &str, point: &str) -> DbResult<bool> {
        Ok(self.conn().query_row_cached(
            "SELECT count(*) FROM desktop_holders WHERE desktop = ? AND point = ?",
            params![name, point],
            |r| r.get::<_, i64>(0),
        )? > 0)
    }

    fn request_os_reset(&self, name: &str, actor: &str) -> DbResult<Option<DesktopRow>> {
        let mut c = self.conn();
        let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let t = now();
        let n = tx.execute_cached(
            "UPDATE desktops SET os_reset = os_reset + 1, os_reset_time = ?, os_reset_by = ?
             WHERE name = ?",
            params![t, actor, name],
        )?;
        if n == 0 {
            return Ok(None);
        }
        let after = tx.query_row_cached(
            &format!("SELECT {DESKTOP_COLUMNS} FROM desktops WHERE name = ?"),
            [name],
            desktop_row,
        )?;
        let detail = format!(
            "#{}; applied by {} at its next start",
            after.os_reset,
            after.holder.as_deref().unwrap_or("the next holder")
        );
        tx.execute_cached(
            "INSERT INTO audit(time, actor, action, target, detail) VALUES(?, ?, 'desktop.reset-os', ?, ?)",
            params![t, actor, name, detail],
        )?;
        tx.commit()?;
        Ok(Some(after))
    }

    fn put_desktop_report(
        &self,
        name: &str,
        point: &str,
        received: i64,
        report: &str,
    ) -> DbResult<()> {
        self.relaxed(|c| {
            c.execute_cached(
                "INSERT INTO desktop_reports(desktop, point, received, report) VALUES(?, ?, ?, ?)
                 ON CONFLICT(desktop) DO UPDATE SET point = excluded.point,
                     received = excluded.received, report = excluded.report",
                params![name, point, received, report],
            )
        })?;
        Ok(())
    }

    fn desktop_report(&self, name: &str) -> DbResult<Option<(String, i64, String)>> {
        Ok(self
            .conn()
            .query_row_cached(
                "SELECT point, received, report FROM desktop_reports WHERE desktop = ?",
                [name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?)
    }
}

fn channel_entry(r: &rusqlite::Row) -> rusqlite::Result<ChannelLogEntry> {
    Ok(ChannelLogEntry {
        seq: r.get(0)?,
        time: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        image: r.get(4)?,
        version: r.get(5)?,
        previous: r.get(6)?,
        detail: r.get(7)?,
    })
}

const DESKTOP_COLUMNS: &str = "name, channel, user_image, created, holder, holder_since, epoch, \
                               os_reset, os_reset_time, os_reset_by";

fn desktop_row(r: &rusqlite::Row) -> rusqlite::Result<DesktopRow> {
    Ok(DesktopRow {
        name: r.get(0)?,
        channel: r.get(1)?,
        user_image: r.get(2)?,
        created: r.get(3)?,
        holder: r.get(4)?,
        holder_since: r.get(5)?,
        epoch: r.get(6)?,
        os_reset: r.get(7)?,
        os_reset_time: r.get(8)?,
        os_reset_by: r.get(9)?,
    })
}

const CHANNEL_COLUMNS: &str = "seq, time, actor, action, image, version, previous, detail";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolment_is_one_time_and_revocation_sticks() {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteMeta::open(&dir.path().join("hub.sqlite")).unwrap();
        let (t, c) = (hash_secret("tok"), hash_secret("cred"));
        db.create_enrollment("p1", &t, now() + 60).unwrap();
        assert_eq!(
            db.redeem_enrollment(&t, &c, now()).unwrap(),
            Some("p1".into())
        );
        assert_eq!(db.redeem_enrollment(&t, &c, now()).unwrap(), None);
        assert_eq!(
            db.point_by_credential(&c).unwrap(),
            Some(PointRow {
                name: "p1".into(),
                revoked: false
            })
        );
        assert!(db.revoke_point("p1").unwrap());
        assert!(db.point_by_credential(&c).unwrap().unwrap().revoked);
        let t2 = hash_secret("expired");
        db.create_enrollment("p2", &t2, now() - 1).unwrap();
        assert_eq!(db.redeem_enrollment(&t2, &c, now()).unwrap(), None);
        assert_eq!(db.claim("img", "p1").unwrap(), "p1");
        assert_eq!(db.claim("img", "p2").unwrap(), "p1");
        db.audit("admin", "grant", "p1", "img").unwrap();
        assert_eq!(db.audit_log(10).unwrap()[0].action, "grant");
    }

    /// A database made before OS resets existed gains their columns on open, and its
    /// desktops read as never reset.
    #[test]
    fn an_older_database_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.sqlite");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE desktops(name TEXT PRIMARY KEY, channel TEXT NOT NULL,
                     user_image TEXT NOT NULL UNIQUE, created INTEGER NOT NULL, holder TEXT,
                     holder_since INTEGER, epoch INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO desktops VALUES('d1', 'c', 'desktops/d1/user', 5, 'p1', 6, 1);",
            )
            .unwrap();
        }
        let db = SqliteMeta::open(&path).unwrap();
        let d = db.desktop("d1").unwrap().unwrap();
        assert_eq!(
            (d.holder.as_deref(), d.epoch, d.os_reset),
            (Some("p1"), 1, 0)
        );
        let d = db.request_os_reset("d1", "admin").unwrap().unwrap();
        assert_eq!((d.os_reset, d.os_reset_by.as_deref()), (1, Some("admin")));
        assert_eq!(db.audit_log(1).unwrap()[0].action, "desktop.reset-os");
        drop(db);
        // Opening again changes nothing.
        let db = SqliteMeta::open(&path).unwrap();
        assert_eq!(db.desktop("d1").unwrap().unwrap().os_reset, 1);
    }
}
