//! Verify: re-read and re-hash everything, and say exactly what is hurt.
//!
//! 1. Every pack is read whole. Its own index and every entry header are checked
//!    against each other, and every object the catalog places in it is decoded and
//!    re-hashed. A damaged object is named with its pack and offset.
//! 2. Every version the catalog lists or a ref names is walked: a version is affected
//!    if its record, any of its tree nodes or any of its data is damaged or missing.
//!    Results per tree node are memoised, so shared subtrees are checked once.
//! 3. Refs that name unknown versions are reported; pack files nobody claims are
//!    counted (gc removes them) but are not damage.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rayon::prelude::*;
use serde::Serialize;

use crate::catalog::{self, Location};
use crate::error::Result;
use crate::id::{ChunkId, ObjectKind, VersionId};
use crate::pack;
use crate::store::Store;
use crate::tree::{Entry, Node};
use crate::version::Version;

#[derive(Clone, Debug, Serialize)]
pub struct DamagedObject {
    pub id: String,
    pub kind: &'static str,
    pub pack: String,
    pub offset: u64,
    pub reason: String,
    /// Versions that depend on this object.
    pub affects: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BadPack {
    pub pack: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct AffectedVersion {
    pub version: String,
    /// Refs that point at it, as `image:branch` or `image@tag`.
    pub refs: Vec<String>,
    /// The damaged or missing objects it depends on.
    pub objects: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub packs: u64,
    pub objects: u64,
    pub bytes: u64,
    pub versions: u64,
    pub damaged: Vec<DamagedObject>,
    pub missing: Vec<String>,
    pub bad_packs: Vec<BadPack>,
    pub affected_versions: Vec<AffectedVersion>,
    pub dangling_refs: Vec<String>,
    pub unclaimed_packs: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.damaged.is_empty()
            && self.missing.is_empty()
            && self.bad_packs.is_empty()
            && self.affected_versions.is_empty()
            && self.dangling_refs.is_empty()
    }
}

/// What checking one pack found.
struct PackCheck {
    bad: Option<BadPack>,
    damaged: Vec<DamagedObject>,
    bytes: u64,
    objects: u64,
}

fn check_pack(store: &Store, name: &str, size: u64, rows: &[Location]) -> PackCheck {
    let damaged = |loc: &Location, reason: String| DamagedObject {
        id: loc.entry.id.to_hex(),
        kind: loc.entry.kind.name(),
        pack: store.backend.describe(name),
        offset: loc.entry.offset,
        reason,
        affects: Vec::new(),
    };
    let bytes = match store.backend.pack_size(name).and_then(|actual| {
        if actual != size {
            Err(crate::error::StoreError::BadPack {
                pack: name.into(),
                reason: format!("is {actual} bytes, the catalog recorded {size}"),
            })
        } else {
            store.backend.read_range(name, 0, size as usize)
        }
    }) {
        Ok(b) => b,
        Err(e) => {
            let reason = e.to_string();
            let objs = rows
                .iter()
                .map(|l| damaged(l, format!("pack unreadable: {reason}")))
                .collect();
            return PackCheck {
                bad: Some(BadPack {
                    pack: store.backend.describe(name),
                    reason,
                }),
                damaged: objs,
                bytes: 0,
                objects: rows.len() as u64,
            };
        }
    };
    let bad = pack::parse_pack(&bytes).err().map(|reason| BadPack {
        pack: store.backend.describe(name),
        reason,
    });
    let objs = rows
        .par_iter()
        .filter_map(|loc| {
            let end = loc.entry.offset.checked_add(loc.entry.span())?;
            let r = match bytes.get(loc.entry.offset as usize..end as usize) {
                Some(buf) => pack::decode_entry(&loc.entry, buf).map(|_| ()),
                None => Err(crate::error::StoreError::Corrupt {
                    id: loc.entry.id,
                    reason: "lies past the end of its pack".into(),
                }),
            };
            r.err().map(|e| damaged(loc, e.to_string()))
        })
        .collect();
    PackCheck {
        bad,
        damaged: objs,
        bytes: bytes.len() as u64,
        objects: rows.len() as u64,
    }
}

/// Outcome of checking one subtree: the damaged or missing objects under it.
type Hurt = Vec<ChunkId>;

struct Walker<'a> {
    store: &'a Store,
    bad: &'a HashSet<ChunkId>,
    memo: HashMap<ChunkId, Hurt>,
    missing: BTreeSet<ChunkId>,
}

impl Walker<'_> {
    fn present(&mut self, ids: &[ChunkId]) -> Result<Vec<bool>> {
        let cat = self.store.cat();
        Ok(catalog::rowids(&cat.conn, ids)?
            .into_iter()
            .map(|r| r.is_some())
            .collect())
    }

    fn node(&mut self, id: ChunkId) -> Result<Hurt> {
        if let Some(h) = self.memo.get(&id) {
            return Ok(h.clone());
        }
        let mut hurt = Vec::new();
        if self.bad.contains(&id) {
            hurt.push(id);
        } else {
            match self.store.read_object(&id, ObjectKind::Tree) {
                Err(crate::error::StoreError::MissingObject { .. }) => {
                    self.missing.insert(id);
                    hurt.push(id);
                }
                Err(_) => hurt.push(id),
                Ok(raw) => match Node::decode(&raw) {
                    Err(_) => hurt.push(id),
                    Ok(node) => {
                        let kids = crate::tree::present_ids(&node.entries);
                        if node.level == 0 {
                            for (c, ok) in kids.iter().zip(self.present(&kids)?) {
                                if !ok {
                                    self.missing.insert(*c);
                                    hurt.push(*c);
                                } else if self.bad.contains(c) {
                                    hurt.push(*c);
                                }
                            }
                        } else {
                            for c in kids {
                                hurt.extend(self.node(c)?);
                            }
                        }
                    }
                },
            }
        }
        hurt.sort();
        hurt.dedup();
        self.memo.insert(id, hurt.clone());
        Ok(hurt)
    }

    fn version(&mut self, id: VersionId) -> Result<Hurt> {
        if self.bad.contains(&id) {
            return Ok(vec![id]);
        }
        match self.store.read_object(&id, ObjectKind::Version) {
            Err(crate::error::StoreError::MissingObject { .. }) => {
                self.missing.insert(id);
                Ok(vec![id])
            }
            Err(_) => Ok(vec![id]),
            Ok(raw) => match Version::decode(&raw) {
                Err(_) => Ok(vec![id]),
                Ok(v) => match v.root_entry() {
                    Ok(Entry::Present(root)) => self.node(root),
                    Ok(_) => Ok(Vec::new()),
                    Err(_) => Ok(vec![id]),
                },
            },
        }
    }
}

/// Check the whole store. `progress` receives bytes checked so far.
pub fn verify(store: &Store, progress: &(dyn Fn(u64) + Sync)) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let packs: Vec<(i64, String, u64)> = {
        let cat = store.cat();
        let mut stmt = cat
            .conn
            .prepare("SELECT id, name, size FROM packs ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    report.packs = packs.len() as u64;
    let done = std::sync::atomic::AtomicU64::new(0);
    let results: Vec<Result<PackCheck>> = packs
        .par_iter()
        .map(|(id, name, size)| {
            let rows: Vec<Location> = {
                let cat = store.cat();
                let sql = format!(
                    "SELECT {} FROM chunks c JOIN packs p ON p.id = c.pack WHERE c.pack = ?",
                    catalog::LOCATION_COLUMNS
                );
                let mut stmt = cat.conn.prepare_cached(&sql)?;
                let rows = stmt.query_map([id], catalog::row_location)?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            let check = check_pack(store, name, *size, &rows);
            let total =
                done.fetch_add(check.bytes, std::sync::atomic::Ordering::Relaxed) + check.bytes;
            progress(total);
            Ok(check)
        })
        .collect();
    for r in results {
        let check = r?;
        report.bad_packs.extend(check.bad);
        report.damaged.extend(check.damaged);
        report.bytes += check.bytes;
        report.objects += check.objects;
    }
    let bad: HashSet<ChunkId> = report
        .damaged
        .iter()
        .filter_map(|d| ChunkId::from_hex(&d.id))
        .collect();

    // Which refs name which versions, to say who is hurt in operators' terms.
    let mut ref_names: HashMap<ChunkId, Vec<String>> = HashMap::new();
    {
        let cat = store.cat();
        let mut stmt = cat
            .conn
            .prepare("SELECT image, kind, name, version FROM refs")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Vec<u8>>(3)?,
            ))
        })?;
        for row in rows {
            let (image, kind, name, v) = row?;
            if let Some(v) = ChunkId::from_slice(&v) {
                let label = if kind == "tag" {
                    format!("{image}@{name}")
                } else {
                    format!("{image}:{name}")
                };
                ref_names.entry(v).or_default().push(label);
            }
        }
    }
    let mut versions: BTreeSet<ChunkId> = {
        let cat = store.cat();
        let mut stmt = cat.conn.prepare("SELECT id FROM versions")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut s = BTreeSet::new();
        for r in rows {
            s.extend(ChunkId::from_slice(&r?));
        }
        s
    };
    for (v, names) in &ref_names {
        if !versions.contains(v) {
            report
                .dangling_refs
                .extend(names.iter().map(|n| format!("{n} -> {v}")));
        }
        versions.insert(*v);
    }
    report.versions = versions.len() as u64;
    let mut walker = Walker {
        store,
        bad: &bad,
        memo: HashMap::new(),
        missing: BTreeSet::new(),
    };
    let mut by_object: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for v in versions {
        let hurt = walker.version(v)?;
        if !hurt.is_empty() {
            for h in &hurt {
                by_object.entry(h.to_hex()).or_default().push(v.to_hex());
            }
            report.affected_versions.push(AffectedVersion {
                version: v.to_hex(),
                refs: ref_names.get(&v).cloned().unwrap_or_default(),
                objects: hurt.iter().map(|h| h.to_hex()).collect(),
            });
        }
    }
    report.missing = walker.missing.iter().map(|m| m.to_hex()).collect();
    // Unclaimed pack files are gc's business, but worth a line in the report.
    let claimed: HashSet<String> = {
        let cat = store.cat();
        let mut stmt = cat
            .conn
            .prepare("SELECT name FROM packs UNION SELECT pack FROM session_packs")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    report.unclaimed_packs = store
        .backend
        .list_packs()?
        .iter()
        .filter(|p| !claimed.contains(*p))
        .count() as u64;
    for d in &mut report.damaged {
        d.affects = by_object.remove(&d.id).unwrap_or_default();
    }
    Ok(report)
}
