//! The store: a directory holding a catalog and packs, and the operations on it that
//! do not write objects (reading, refs, images, revisions).
//!
//! ```text
//! STORE/
//!   strata.json           format version and settings; written once by init
//!   catalog.sqlite        index, images, refs, versions, sessions (WAL mode)
//!   packs/ab/<32hex>.pack immutable packs, fanned out by the first two hex digits
//!   tmp/                  packs being written (<session>-<pack>.tmp)
//!   sessions/<id>.lock    one per live write session, flock'ed by its process
//!   gc.lock               flock'ed by the one gc that may run at a time
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::backend::{fsync_dir, Backend, LocalDir};
use crate::catalog::{self, now, Catalog, Location};
use crate::error::{IoContext, Result, StoreError};
use crate::id::{ChunkId, ObjectKind, VersionId};
use crate::pack;
use crate::tree::Node;
use crate::version::Version;

/// An object's kind and bytes, as [`Store::read_objects`] returns them.
pub type TypedObject = (ObjectKind, Vec<u8>);

/// The newest store format this build reads and writes.
pub const STORE_FORMAT: u32 = 1;
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
pub const DEFAULT_BRANCH: &str = "main";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreConfig {
    pub format: u32,
    /// How object ids are computed ("blake3"; keyed variants come with encryption).
    pub chunk_id: String,
    pub compression: String,
    pub compression_level: i32,
    pub created: i64,
}

pub struct Store {
    pub(crate) root: PathBuf,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) catalog: Mutex<Catalog>,
    pub(crate) config: StoreConfig,
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageInfo {
    pub name: String,
    pub block_size: u32,
    pub created: i64,
    pub branches: Vec<RefInfo>,
    pub tags: Vec<RefInfo>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RefInfo {
    pub name: String,
    pub version: String,
    pub updated: i64,
}

/// A copy-on-write disk session as the catalog records it.
#[derive(Clone, Debug, Serialize)]
pub struct DiskSessionInfo {
    pub name: String,
    /// The image its commits go to.
    pub image: String,
    /// The branch its commits move by default (`None`: commits must name one).
    pub branch: Option<String>,
    /// The version it stands on (hex).
    pub base: String,
    pub created: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefKind {
    Branch,
    Tag,
}

impl RefKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefKind::Branch => "branch",
            RefKind::Tag => "tag",
        }
    }
}

/// Check a user-supplied name of an image, branch or tag.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(StoreError::InvalidName {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("must be 1 to 128 characters");
    }
    if name.starts_with(['-', '.', '/']) || name.ends_with('/') || name.contains("//") {
        return bad("must not start with '-', '.' or '/', end with '/' or contain '//'");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')))
    {
        return bad(&format!(
            "{c:?} is not allowed (letters, digits, '-', '_', '.', '/')"
        ));
    }
    Ok(())
}

pub fn validate_block_size(bs: u64) -> Result<u32> {
    if bs.is_power_of_two() && (4096..=4 << 20).contains(&bs) {
        Ok(bs as u32)
    } else {
        Err(StoreError::InvalidBlockSize(bs))
    }
}

impl Store {
    /// Create a new store at `path` (a missing or empty directory).
    pub fn init(path: &Path) -> Result<Store> {
        if path.exists() {
            if !path.is_dir() {
                return Err(StoreError::NotADirectory(path.to_path_buf()));
            }
            if path.join("strata.json").exists() {
                return Err(StoreError::AlreadyExists {
                    path: path.to_path_buf(),
                });
            }
            let mut entries = std::fs::read_dir(path).at(path)?;
            if entries.next().is_some() {
                return Err(StoreError::Invalid(format!(
                    "{} is not empty; a store needs a directory of its own",
                    path.display()
                )));
            }
        } else {
            std::fs::create_dir_all(path).at(path)?;
        }
        for sub in ["packs", "tmp", "sessions"] {
            std::fs::create_dir_all(path.join(sub)).at(path.join(sub))?;
        }
        let config = StoreConfig {
            format: STORE_FORMAT,
            chunk_id: "blake3".into(),
            compression: "zstd".into(),
            compression_level: 3,
            created: now(),
        };
        let cat = Catalog::open(&path.join("catalog.sqlite"))?;
        cat.set_meta("format", &STORE_FORMAT.to_string())?;
        drop(cat);
        // strata.json last, written atomically: its presence means "a complete store".
        let tmp = path.join("strata.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&config).unwrap()).at(&tmp)?;
        File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp)?;
        std::fs::rename(&tmp, path.join("strata.json")).at(path)?;
        fsync_dir(path)?;
        Store::open(path)
    }

    /// Open an existing store.
    pub fn open(path: &Path) -> Result<Store> {
        if path.exists() && !path.is_dir() {
            return Err(StoreError::NotADirectory(path.to_path_buf()));
        }
        let cfg_path = path.join("strata.json");
        let bytes = match std::fs::read(&cfg_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotAStore(path.to_path_buf()))
            }
            Err(e) => return Err(e).at(&cfg_path),
        };
        // Read the format number first, so a newer store gets the right error even if
        // the rest of its config has changed shape.
        let raw: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            StoreError::Invalid(format!("{}: not valid JSON: {e}", cfg_path.display()))
        })?;
        let format = raw.get("format").and_then(|f| f.as_u64()).ok_or_else(|| {
            StoreError::Invalid(format!("{}: no format number", cfg_path.display()))
        })? as u32;
        if format > STORE_FORMAT {
            return Err(StoreError::NewerFormat {
                path: path.to_path_buf(),
                found: format,
                supported: STORE_FORMAT,
            });
        }
        let config: StoreConfig = serde_json::from_value(raw)
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", cfg_path.display())))?;
        let catalog = Catalog::open(&path.join("catalog.sqlite"))?;
        Ok(Store {
            root: path.to_path_buf(),
            backend: Arc::new(LocalDir::new(path.join("packs"))),
            catalog: Mutex::new(catalog),
            config,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    pub(crate) fn cat(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- objects -------------------------------------------------------------------

    pub fn locate(&self, id: &ChunkId) -> Result<Option<Location>> {
        catalog::locate(&self.cat().conn, id)
    }

    /// Size of all indexed packs: what the store occupies.
    pub fn pack_bytes(&self) -> Result<u64> {
        Ok(self
            .cat()
            .conn
            .query_row("SELECT coalesce(sum(size), 0) FROM packs", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    pub(crate) fn read_at(&self, loc: &Location) -> Result<Vec<u8>> {
        let buf =
            self.backend
                .read_range(&loc.pack, loc.entry.offset, loc.entry.span() as usize)?;
        pack::decode_entry(&loc.entry, &buf)
    }

    /// Read an object and check it against its id.
    pub fn read_object(&self, id: &ChunkId, kind: ObjectKind) -> Result<Vec<u8>> {
        // gc may move an object to a new pack between lookup and read; look again once.
        for attempt in 0..2 {
            let loc = self.locate(id)?.ok_or(StoreError::MissingObject {
                id: *id,
                kind: kind.name(),
            })?;
            match self.read_at(&loc) {
                Err(StoreError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && attempt == 0 =>
                {
                    continue
                }
                other => return other,
            }
        }
        unreachable!("the loop returns on its second pass")
    }

    /// Where each of `ids` is, under one catalog lock (`None`: not in the store).
    fn locate_all(&self, ids: &[ChunkId]) -> Result<Vec<Option<Location>>> {
        let cat = self.cat();
        ids.iter()
            .map(|id| catalog::locate(&cat.conn, id))
            .collect()
    }

    /// Read many data chunks at once (in parallel), in the order given.
    pub fn read_chunks(&self, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>> {
        use rayon::prelude::*;
        let locs = self.locate_all(ids)?;
        ids.par_iter()
            .zip(locs.par_iter())
            .map(|(id, loc)| match loc {
                Some(loc) => match self.read_at(loc) {
                    Err(StoreError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        self.read_object(id, ObjectKind::Data)
                    }
                    other => other,
                },
                None => Err(StoreError::MissingObject {
                    id: *id,
                    kind: "data",
                }),
            })
            .collect()
    }

    /// Read many objects of any kind at once (in parallel), in the order given, each
    /// checked against its id: `None` for an id the store does not hold. (What a hub
    /// serves a download from.)
    pub fn read_objects(&self, ids: &[ChunkId]) -> Result<Vec<Option<TypedObject>>> {
        use rayon::prelude::*;
        let locs = self.locate_all(ids)?;
        ids.par_iter()
            .zip(locs.par_iter())
            .map(|(id, loc)| {
                let Some(loc) = loc else { return Ok(None) };
                let kind = loc.entry.kind;
                match self.read_at(loc) {
                    // gc moved it meanwhile: look it up again.
                    Err(StoreError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        match self.read_object(id, kind) {
                            Ok(raw) => Ok(Some((kind, raw))),
                            Err(StoreError::MissingObject { .. }) => Ok(None),
                            Err(e) => Err(e),
                        }
                    }
                    other => other.map(|raw| Some((kind, raw))),
                }
            })
            .collect()
    }

    pub fn load_node(&self, id: &ChunkId) -> Result<Node> {
        let b = self.read_object(id, ObjectKind::Tree)?;
        Node::decode(&b).map_err(|reason| StoreError::Corrupt { id: *id, reason })
    }

    pub fn load_version(&self, id: &VersionId) -> Result<Version> {
        let b = self.read_object(id, ObjectKind::Version)?;
        Version::decode(&b).map_err(|reason| StoreError::Corrupt { id: *id, reason })
    }

    // ---- images and refs -----------------------------------------------------------

    pub fn image_block_size(&self, image: &str) -> Result<Option<u32>> {
        Ok(self
            .cat()
            .conn
            .query_row(
                "SELECT block_size FROM images WHERE name = ?",
                [image],
                |r| r.get(0),
            )
            .optional()?)
    }

    pub fn images(&self) -> Result<Vec<ImageInfo>> {
        let names: Vec<(String, u32, i64)> = {
            let cat = self.cat();
            let mut stmt = cat
                .conn
                .prepare("SELECT name, block_size, created FROM images ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        names
            .into_iter()
            .map(|(name, block_size, created)| {
                Ok(ImageInfo {
                    branches: self.refs(&name, RefKind::Branch)?,
                    tags: self.refs(&name, RefKind::Tag)?,
                    name,
                    block_size,
                    created,
                })
            })
            .collect()
    }

    pub fn image(&self, name: &str) -> Result<ImageInfo> {
        self.images()?
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| StoreError::NoSuchImage(name.to_string()))
    }

    pub fn refs(&self, image: &str, kind: RefKind) -> Result<Vec<RefInfo>> {
        let cat = self.cat();
        let mut stmt = cat.conn.prepare_cached(
            "SELECT name, version, updated FROM refs WHERE image = ? AND kind = ? ORDER BY name",
        )?;
        let rows = stmt.query_map(params![image, kind.as_str()], |r| {
            let v: Vec<u8> = r.get(1)?;
            Ok(RefInfo {
                name: r.get(0)?,
                version: hex::encode(v),
                updated: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn get_ref(&self, image: &str, kind: RefKind, name: &str) -> Result<Option<VersionId>> {
        get_ref(&self.cat().conn, image, kind, name)
    }

    /// Keep `image`'s history only as far as its refs name versions (`true`), or
    /// with every ancestor of its refs (`false`, the default). A hub keeps a desktop's
    /// user disk this way: restore-point tags, pruned by a retention policy, decide
    /// which of its versions survive gc.
    pub fn set_history_by_refs(&self, image: &str, on: bool) -> Result<()> {
        let mut cat = self.cat();
        cat.write_durable(|tx| {
            if on {
                tx.execute(
                    "INSERT INTO history_by_refs(image) VALUES(?) ON CONFLICT DO NOTHING",
                    [image],
                )?;
            } else {
                tx.execute("DELETE FROM history_by_refs WHERE image = ?", [image])?;
            }
            Ok(())
        })
    }

    /// Create a branch or tag pointing at `version`; it must not exist yet.
    pub fn create_ref(
        &self,
        image: &str,
        kind: RefKind,
        name: &str,
        version: &VersionId,
    ) -> Result<()> {
        validate_name(name)?;
        let mut cat = self.cat();
        cat.write_durable(|tx| {
            ensure_image_exists(tx, image)?;
            let other = match kind {
                RefKind::Branch => RefKind::Tag,
                RefKind::Tag => RefKind::Branch,
            };
            for k in [kind, other] {
                if get_ref(tx, image, k, name)?.is_some() {
                    return Err(StoreError::RefExists {
                        image: image.into(),
                        what: k.as_str(),
                        name: name.into(),
                    });
                }
            }
            ensure_version_listed(tx, version)?;
            tx.execute(
                "INSERT INTO refs(image, kind, name, version, updated) VALUES(?, ?, ?, ?, ?)",
                params![image, kind.as_str(), name, &version.0[..], now()],
            )?;
            Ok(())
        })
    }

    pub fn delete_ref(&self, image: &str, kind: RefKind, name: &str) -> Result<VersionId> {
        let mut cat = self.cat();
        cat.write_durable(|tx| {
            ensure_image_exists(tx, image)?;
            let v = get_ref(tx, image, kind, name)?.ok_or_else(|| StoreError::NoSuchRef {
                image: image.into(),
                what: kind.as_str(),
                name: name.into(),
            })?;
            tx.execute(
                "DELETE FROM refs WHERE image = ? AND kind = ? AND name = ?",
                params![image, kind.as_str(), name],
            )?;
            Ok(v)
        })
    }

    /// Move branch `name` of `image` from `expected` to `new` atomically; fails with
    /// [`StoreError::RefConflict`] if it no longer points at `expected`.
    pub fn update_branch(
        &self,
        image: &str,
        name: &str,
        expected: Option<&VersionId>,
        new: &VersionId,
    ) -> Result<()> {
        let mut cat = self.cat();
        cat.write_durable(|tx| {
            ensure_image_exists(tx, image)?;
            ensure_version_listed(tx, new)?;
            cas_branch(tx, image, name, expected, new)
        })
    }

    /// Make a new image whose default branch points at `version` (sharing everything).
    pub fn clone_image(&self, new_image: &str, version: &VersionId) -> Result<()> {
        validate_name(new_image)?;
        let v = self.load_version(version)?;
        let mut cat = self.cat();
        cat.write_durable(|tx| {
            create_image(tx, new_image, v.block_size)?;
            ensure_version_listed(tx, version)?;
            cas_branch(tx, new_image, DEFAULT_BRANCH, None, version)
        })
    }

    /// Remove an image and all its refs; its data goes at the next gc unless shared.
    pub fn delete_image(&self, image: &str) -> Result<()> {
        let mut cat = self.cat();
        cat.write_durable(|tx| {
            ensure_image_exists(tx, image)?;
            tx.execute("DELETE FROM refs WHERE image = ?", [image])?;
            tx.execute("DELETE FROM images WHERE name = ?", [image])?;
            Ok(())
        })
    }

    // ---- disk sessions ---------------------------------------------------------------

    /// Register a copy-on-write disk session: its base version stays reachable (gc
    /// treats it as a root) until the session is removed.
    pub fn add_disk_session(&self, s: &DiskSessionInfo) -> Result<()> {
        validate_name(&s.name)?;
        let base = ChunkId::from_hex(&s.base)
            .ok_or_else(|| StoreError::Invalid(format!("bad base id {:?}", s.base)))?;
        let mut cat = self.cat();
        cat.write_durable(|tx| {
            ensure_version_listed(tx, &base)?;
            let n: i64 = tx.query_row(
                "SELECT count(*) FROM disk_sessions WHERE name = ?",
                [&s.name],
                |r| r.get(0),
            )?;
            if n > 0 {
                return Err(StoreError::Invalid(format!(
                    "a session named {:?} already exists",
                    s.name
                )));
            }
            tx.execute(
                "INSERT INTO disk_sessions(name, image, branch, base, created) VALUES(?, ?, ?, ?, ?)",
                params![s.name, s.image, s.branch, &base.0[..], now()],
            )?;
            Ok(())
        })
    }

    pub fn disk_sessions(&self) -> Result<Vec<DiskSessionInfo>> {
        let cat = self.cat();
        let mut stmt = cat.conn.prepare(
            "SELECT name, image, branch, base, created FROM disk_sessions ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(DiskSessionInfo {
                name: r.get(0)?,
                image: r.get(1)?,
                branch: r.get(2)?,
                base: hex::encode(r.get::<_, Vec<u8>>(3)?),
                created: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn disk_session(&self, name: &str) -> Result<DiskSessionInfo> {
        self.disk_sessions()?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| StoreError::Invalid(format!("no session named {name:?}")))
    }

    /// Record that session `name` now stands on `base` (after a commit).
    pub fn set_disk_session_base(&self, name: &str, base: &VersionId) -> Result<()> {
        let mut cat = self.cat();
        cat.write_durable(|tx| {
            ensure_version_listed(tx, base)?;
            tx.execute(
                "UPDATE disk_sessions SET base = ? WHERE name = ?",
                params![&base.0[..], name],
            )?;
            Ok(())
        })
    }

    pub fn remove_disk_session(&self, name: &str) -> Result<()> {
        let mut cat = self.cat();
        cat.write_durable(|tx| {
            if tx.execute("DELETE FROM disk_sessions WHERE name = ?", [name])? == 0 {
                return Err(StoreError::Invalid(format!("no session named {name:?}")));
            }
            Ok(())
        })
    }

    // ---- revisions -----------------------------------------------------------------

    /// Versions whose id starts with `prefix` (hex).
    pub fn versions_with_prefix(&self, prefix: &str) -> Result<Vec<VersionId>> {
        let lower = prefix.to_ascii_lowercase();
        if lower.is_empty() || !lower.bytes().all(|b| b.is_ascii_hexdigit()) || lower.len() > 64 {
            return Ok(Vec::new());
        }
        // Range scan on the binary key: [prefix padded with 0s, prefix padded with fs].
        let lo = ChunkId::from_hex(&format!("{lower:0<64}")).unwrap();
        let hi = ChunkId::from_hex(&format!("{lower:f<64}")).unwrap();
        let cat = self.cat();
        let mut stmt = cat
            .conn
            .prepare_cached("SELECT id FROM versions WHERE id >= ? AND id <= ? LIMIT 10")?;
        let rows = stmt.query_map(params![&lo.0[..], &hi.0[..]], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = Vec::new();
        for r in rows {
            if let Some(id) = ChunkId::from_slice(&r?) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Resolve `REV` of `image`: a branch, a tag, or a unique prefix (at least 4 hex
    /// digits) of a version id, followed by any number of `~N` (N-th first parent;
    /// `~` alone is `~1`). `None` means the default branch.
    pub fn resolve(&self, image: &str, rev: Option<&str>) -> Result<VersionId> {
        if self.image_block_size(image)?.is_none() {
            return Err(StoreError::NoSuchImage(image.to_string()));
        }
        let rev_str = rev.unwrap_or(DEFAULT_BRANCH);
        let bad = |reason: String| StoreError::BadRevision {
            image: image.to_string(),
            rev: rev_str.to_string(),
            reason,
        };
        let (base, steps) = split_ancestry(rev_str).map_err(bad)?;
        let mut id = if let Some(v) = self.get_ref(image, RefKind::Branch, base)? {
            v
        } else if let Some(v) = self.get_ref(image, RefKind::Tag, base)? {
            v
        } else if base.len() >= 4 && base.bytes().all(|b| b.is_ascii_hexdigit()) {
            let found = self.versions_with_prefix(base)?;
            match found.len() {
                0 => return Err(bad(format!("no branch, tag or version {base:?}"))),
                1 => found[0],
                _ => {
                    let list: Vec<String> = found.iter().map(|v| v.short()).collect();
                    return Err(bad(format!(
                        "prefix {base:?} is ambiguous: matches {}",
                        list.join(", ")
                    )));
                }
            }
        } else if rev.is_none() {
            return Err(bad(format!(
                "image has no {DEFAULT_BRANCH:?} branch; name a branch, tag or version"
            )));
        } else {
            return Err(bad(format!("no branch, tag or version {base:?}")));
        };
        for step in 0..steps {
            let v = self.load_version(&id)?;
            id = *v
                .parent_ids()
                .map_err(|reason| StoreError::Corrupt { id, reason })?
                .first()
                .ok_or_else(|| {
                    bad(format!(
                        "version {} has no parent ({} of {steps} steps back)",
                        id.short(),
                        step
                    ))
                })?;
        }
        Ok(id)
    }

    /// The first-parent history of `id`, newest first, at most `limit` entries.
    pub fn history(&self, id: &VersionId, limit: usize) -> Result<Vec<(VersionId, Version)>> {
        let mut out = Vec::new();
        let mut next = Some(*id);
        while let Some(cur) = next {
            if out.len() >= limit {
                break;
            }
            let v = match self.load_version(&cur) {
                Ok(v) => v,
                // A shallow store (a point, or one filled from a bundle) holds a
                // version without its ancestors: the history known here ends there.
                Err(StoreError::MissingObject { .. }) if !out.is_empty() => break,
                Err(e) => return Err(e),
            };
            next = v.parent_ids().ok().and_then(|p| p.first().copied());
            out.push((cur, v));
        }
        Ok(out)
    }

    /// Every version listed in the catalog with its record.
    pub fn list_versions(&self) -> Result<Vec<(VersionId, Version)>> {
        let cat = self.cat();
        let mut stmt = cat.conn.prepare("SELECT id, record FROM versions")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, rec) = row?;
            let id = ChunkId::from_slice(&id)
                .ok_or_else(|| StoreError::Invalid("bad version id in catalog".into()))?;
            let v = Version::decode(rec.as_bytes())
                .map_err(|reason| StoreError::Corrupt { id, reason })?;
            out.push((id, v));
        }
        Ok(out)
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(crate) fn sessions_dir(&self) -> PathBuf {
        self.root.join("sessions")
    }
}

/// Split "base~2~" into ("base", 3).
fn split_ancestry(rev: &str) -> std::result::Result<(&str, usize), String> {
    let mut parts = rev.split('~');
    let base = parts.next().unwrap_or("");
    if base.is_empty() {
        return Err("empty revision".into());
    }
    let mut steps = 0usize;
    for p in parts {
        steps += if p.is_empty() {
            1
        } else {
            p.parse::<usize>()
                .map_err(|_| format!("{p:?} after '~' is not a number"))?
        };
    }
    Ok((base, steps))
}

pub(crate) fn get_ref(
    conn: &rusqlite::Connection,
    image: &str,
    kind: RefKind,
    name: &str,
) -> Result<Option<VersionId>> {
    let v: Option<Vec<u8>> = conn
        .prepare_cached("SELECT version FROM refs WHERE image = ? AND kind = ? AND name = ?")?
        .query_row(params![image, kind.as_str(), name], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|v| ChunkId::from_slice(&v)))
}

pub(crate) fn ensure_image_exists(tx: &rusqlite::Connection, image: &str) -> Result<()> {
    let n: i64 = tx.query_row("SELECT count(*) FROM images WHERE name = ?", [image], |r| {
        r.get(0)
    })?;
    if n == 0 {
        return Err(StoreError::NoSuchImage(image.to_string()));
    }
    Ok(())
}

fn ensure_version_listed(tx: &rusqlite::Connection, v: &VersionId) -> Result<()> {
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
    Ok(())
}

pub(crate) fn create_image(tx: &rusqlite::Connection, image: &str, block_size: u32) -> Result<()> {
    validate_name(image)?;
    let exists: i64 = tx.query_row("SELECT count(*) FROM images WHERE name = ?", [image], |r| {
        r.get(0)
    })?;
    if exists > 0 {
        return Err(StoreError::ImageExists(image.to_string()));
    }
    tx.execute(
        "INSERT INTO images(name, block_size, created) VALUES(?, ?, ?)",
        params![image, block_size, now()],
    )?;
    Ok(())
}

/// Compare-and-swap of a branch inside the caller's transaction.
pub(crate) fn cas_branch(
    tx: &rusqlite::Connection,
    image: &str,
    name: &str,
    expected: Option<&VersionId>,
    new: &VersionId,
) -> Result<()> {
    let current = get_ref(tx, image, RefKind::Branch, name)?;
    if current.as_ref() != expected {
        return Err(StoreError::RefConflict {
            image: image.into(),
            branch: name.into(),
            expected: expected.map_or("no branch".into(), |v| v.short()),
            found: current.map_or("no branch".into(), |v| v.short()),
        });
    }
    if get_ref(tx, image, RefKind::Tag, name)?.is_some() {
        return Err(StoreError::RefExists {
            image: image.into(),
            what: "tag",
            name: name.into(),
        });
    }
    tx.execute(
        "INSERT INTO refs(image, kind, name, version, updated) VALUES(?, 'branch', ?, ?, ?)
         ON CONFLICT(image, kind, name) DO UPDATE SET version = excluded.version, updated = excluded.updated",
        params![image, name, &new.0[..], now()],
    )?;
    Ok(())
}
