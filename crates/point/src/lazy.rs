//! Streaming start: a session whose base is still on the hub.
//!
//! `point attach` fetches only the version record and the tree nodes (a few KB per
//! GiB), creates the session over a *lazy* base ([`strata_block::VersionDisks::get_lazy`])
//! and returns; `point run` serves it at once. [`LazyBase`] is that base's
//! [`Upstream`]: a read of a block the store lacks fetches its chunk from the hub,
//! verified, and keeps it. A background [`LazyBase::prefetch`] fetches the rest,
//! first what lies just after what the VM has been reading.
//!
//! **Where fetched objects live.** Data chunks go into the point's store through one
//! long-lived receive [`WriteSession`] (data has no children, so the store accepts
//! it; the session pins it against gc). Tree nodes stay in memory and in a side file
//! in the session directory (`lazy-base`), because the store takes a node only after
//! its whole subtree — "node present ⇒ subtree present" is what lets transfers skip
//! shared subtrees. When every chunk is local, [`LazyBase::prefetch`] adds the nodes
//! bottom-up and the record, and commits a local ref `SESSION:main` to the version:
//! the base is then an ordinary local version (gc, verify and commits work), and the
//! session is registered in the store's catalog. Until then sync rounds do not commit
//! the session (its writes stay durable in its delta).
//!
//! **Hub away.** A read of a missing block retries for at most the fetch timeout,
//! then fails that one read (EIO on NBD): never a hang, never a wrong byte (every
//! object is checked against its id, here and again by the block layer).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use strata_block::Upstream;
use strata_store::tree::Node;
use strata_store::{
    BranchUpdate, ChunkId, DiskSessionInfo, Entry, ObjectKind, Store, Version, VersionId,
    WriteSession,
};
use strata_sync::{HubClient, NoBases, SyncError, Want};

use crate::{io_err, write_atomic, PointError, Result};

/// The side file in the session directory holding the version record and tree nodes.
pub const LAZY_FILE: &str = "lazy-base";
const MAGIC: &[u8; 8] = b"STRLAZY1";
/// Ids per download request (the hub allows many more; this keeps a batch's reply,
/// at 64 KiB blocks, at 4 MiB).
const BATCH: usize = 64;
/// Blocks of read history kept as prefetch hints.
const HINTS: usize = 32;

/// Progress of a lazily attached session's base (in `point-state.json`, shown by
/// `point status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LazyProgress {
    /// The hub image the base comes from.
    pub hub_image: String,
    /// Distinct data chunks of the base, and how many are local.
    pub blocks_total: u64,
    pub blocks_local: u64,
    /// Bytes of objects fetched from the hub (uncompressed) and objects fetched.
    pub bytes_fetched: u64,
    pub objects_fetched: u64,
}

impl LazyProgress {
    pub fn percent(&self) -> f64 {
        if self.blocks_total == 0 {
            100.0
        } else {
            100.0 * self.blocks_local as f64 / self.blocks_total as f64
        }
    }
}

/// The record and tree of a version on the hub, verified.
pub struct RemoteTree {
    pub image: String,
    pub id: VersionId,
    pub version: Version,
    pub record: Vec<u8>,
    /// Every tree node, by id.
    pub nodes: HashMap<ChunkId, Vec<u8>>,
}

impl RemoteTree {
    /// Fetch the record of `image@rev` and all its tree nodes (level by level).
    pub async fn fetch(client: &HubClient, image: &str, rev: &str) -> Result<RemoteTree> {
        let (id, version, record) = client.get_version(image, rev).await?;
        let mut nodes = HashMap::new();
        let mut level_ids: Vec<ChunkId> = match version.root_entry() {
            Ok(Entry::Present(r)) => vec![r],
            _ => Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        for level in (0..version.depth).rev() {
            if level_ids.is_empty() {
                break;
            }
            let raws = download(client, image, &level_ids, ObjectKind::Tree, deadline).await?;
            let mut next = Vec::new();
            for (id, raw) in level_ids.iter().zip(raws) {
                let node = decode_node(id, &raw)?;
                if node.level != level {
                    return Err(corrupt(id, "tree node at the wrong level"));
                }
                if level > 0 {
                    next.extend(strata_store::tree::present_ids(&node.entries));
                }
                nodes.insert(*id, raw);
            }
            let mut seen = HashSet::new();
            next.retain(|i| seen.insert(*i) && !nodes.contains_key(i));
            level_ids = next;
        }
        Ok(RemoteTree {
            image: image.to_string(),
            id,
            version,
            record,
            nodes,
        })
    }

    /// Write to `dir/lazy-base`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        let img = self.image.as_bytes();
        b.extend_from_slice(&(img.len() as u32).to_le_bytes());
        b.extend_from_slice(img);
        b.extend_from_slice(&(self.record.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.record);
        for (id, raw) in &self.nodes {
            b.extend_from_slice(&id.0);
            b.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            b.extend_from_slice(raw);
        }
        write_atomic(&dir.join(LAZY_FILE), &b, 0o644)
    }

    /// Read `dir/lazy-base`, checking every object against its id.
    pub fn load(dir: &Path) -> Result<RemoteTree> {
        let path = dir.join(LAZY_FILE);
        let b = std::fs::read(&path).map_err(io_err(&path))?;
        let bad = || PointError::Invalid(format!("{}: damaged", path.display()));
        let pos = std::cell::Cell::new(0usize);
        let take = |n: usize| -> Result<&[u8]> {
            let p = pos.get();
            let s = b.get(p..p + n).ok_or_else(bad)?;
            pos.set(p + n);
            Ok(s)
        };
        if take(8)? != MAGIC {
            return Err(bad());
        }
        let n = u32::from_le_bytes(take(4)?.try_into().unwrap()) as usize;
        let image = String::from_utf8(take(n)?.to_vec()).map_err(|_| bad())?;
        let n = u32::from_le_bytes(take(4)?.try_into().unwrap()) as usize;
        let record = take(n)?.to_vec();
        let id = ChunkId::for_object(ObjectKind::Version, &record);
        let version = Version::decode(&record).map_err(|_| bad())?;
        let mut nodes = HashMap::new();
        while pos.get() < b.len() {
            let nid = ChunkId::from_slice(take(32)?).ok_or_else(bad)?;
            let n = u32::from_le_bytes(take(4)?.try_into().unwrap()) as usize;
            let raw = take(n)?.to_vec();
            if ChunkId::for_object(ObjectKind::Tree, &raw) != nid {
                return Err(bad());
            }
            nodes.insert(nid, raw);
        }
        Ok(RemoteTree {
            image,
            id,
            version,
            record,
            nodes,
        })
    }

    /// Present data entries `(block, chunk)` in block order.
    pub fn data_blocks(&self) -> Result<Vec<(u64, ChunkId)>> {
        let mut out = Vec::new();
        let root = self
            .version
            .root_entry()
            .map_err(|reason| PointError::Invalid(format!("version record: {reason}")))?;
        self.walk(root, self.version.depth as i32 - 1, 0, &mut out)?;
        Ok(out)
    }

    fn walk(&self, e: Entry, level: i32, base: u64, out: &mut Vec<(u64, ChunkId)>) -> Result<()> {
        let Entry::Present(id) = e else {
            return Ok(());
        };
        if level < 0 {
            out.push((base, id));
            return Ok(());
        }
        let raw = self.nodes.get(&id).ok_or_else(|| {
            PointError::Invalid(format!("tree node {} was not fetched", id.short()))
        })?;
        let node = decode_node(&id, raw)?;
        let span = strata_store::tree::entry_span(level as u8);
        for (i, c) in node.entries.iter().enumerate() {
            self.walk(*c, level - 1, base + i as u64 * span, out)?;
        }
        Ok(())
    }
}

fn corrupt(id: &ChunkId, reason: &str) -> PointError {
    PointError::Sync(SyncError::Corrupt {
        id: *id,
        reason: reason.into(),
    })
}

fn decode_node(id: &ChunkId, raw: &[u8]) -> Result<Node> {
    Node::decode(raw).map_err(|r| corrupt(id, &r))
}

/// Download `ids` (objects of `kind`) completely, retrying after failures of the
/// hub or the link until `deadline`. Every object arrives verified (the client checks
/// it against its id); a damaged one is asked for again.
async fn download(
    client: &HubClient,
    image: &str,
    ids: &[ChunkId],
    kind: ObjectKind,
    deadline: Instant,
) -> Result<Vec<Vec<u8>>> {
    let mut got: HashMap<ChunkId, Vec<u8>> = HashMap::new();
    let mut attempt = 0u32;
    for part in ids.chunks(4096) {
        let mut pending: Vec<ChunkId> = part.to_vec();
        pending.retain(|i| !got.contains_key(i));
        while !pending.is_empty() {
            let wants: Vec<Want> = pending.iter().map(|&id| Want { id, base: None }).collect();
            let left = deadline.saturating_duration_since(Instant::now());
            let err =
                match tokio::time::timeout(left, client.download(image, &wants, &NoBases)).await {
                    Err(_) => Some(SyncError::Transport(
                        "no answer from the hub within the fetch timeout".to_string(),
                    )),
                    Ok(d) => {
                        if let Some(id) = d.missing.first() {
                            return Err(SyncError::Missing {
                                side: "hub",
                                id: *id,
                            }
                            .into());
                        }
                        for o in d.objects {
                            if o.kind != kind {
                                return Err(corrupt(&o.id, "object of the wrong kind"));
                            }
                            got.insert(o.id, o.raw);
                        }
                        pending.retain(|i| !got.contains_key(i));
                        match d.error {
                            Some(e) if !e.is_transient() => return Err(e.into()),
                            Some(e) => Some(e),
                            None if pending.is_empty() => None,
                            None if !d.corrupt.is_empty() => {
                                tracing::warn!(
                                    n = d.corrupt.len(),
                                    "damaged objects from the hub; asking again"
                                );
                                None
                            }
                            None => {
                                return Err(PointError::Invalid(format!(
                                    "hub left out {} requested objects",
                                    pending.len()
                                )))
                            }
                        }
                    }
                };
            if let Some(e) = err {
                if Instant::now() >= deadline {
                    return Err(e.into());
                }
                attempt += 1;
                let wait = Duration::from_millis(100u64 << attempt.min(4))
                    .min(deadline.saturating_duration_since(Instant::now()));
                tracing::debug!(error = %e, attempt, "fetch from the hub failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
    ids.iter()
        .map(|id| {
            got.get(id)
                .cloned()
                .ok_or_else(|| PointError::Invalid(format!("object {} not fetched", id.short())))
        })
        .collect()
}

/// The distinct data chunks of `tree` (how many) and those the store lacks, each
/// under the first block that holds it.
fn lacking_chunks(
    tree: &RemoteTree,
    ws: &mut WriteSession<'static>,
) -> Result<(u64, BTreeSet<(u64, ChunkId)>)> {
    let mut first: HashMap<ChunkId, u64> = HashMap::new();
    for (b, id) in tree.data_blocks()? {
        first.entry(id).or_insert(b);
    }
    let ids: Vec<ChunkId> = first.keys().copied().collect();
    let lacking: HashSet<ChunkId> = ws.lacking(&ids)?.into_iter().collect();
    let total = first.len() as u64;
    let pending = first
        .into_iter()
        .filter(|(id, _)| lacking.contains(id))
        .map(|(id, b)| (b, id))
        .collect();
    Ok((total, pending))
}

/// What a [`LazyBase`] needs from its owner.
pub struct LazyConfig {
    /// How long a read of a missing block waits for the hub before failing.
    pub fetch_timeout: Duration,
    /// Runtime on which fetches run (reads come from threads outside it).
    pub runtime: tokio::runtime::Handle,
}

/// The [`Upstream`] of a lazily attached session's base; see the module docs.
pub struct LazyBase {
    session: String,
    dir: PathBuf,
    tree: RemoteTree,
    store: Arc<Store>,
    client: HubClient,
    cfg: LazyConfig,
    /// Receives fetched data chunks until the base is complete (then `None`).
    receiver: Mutex<Option<WriteSession<'static>>>,
    /// Chunks still to fetch, by first block.
    pending: Mutex<BTreeSet<(u64, ChunkId)>>,
    total: u64,
    bytes: AtomicU64,
    objects: AtomicU64,
    recent: Mutex<VecDeque<u64>>,
    done: AtomicBool,
}

impl LazyBase {
    /// The base of session `session` (directory `dir`, holding `lazy-base`).
    pub fn open(
        session: &str,
        dir: &Path,
        store: Arc<Store>,
        client: HubClient,
        cfg: LazyConfig,
    ) -> Result<Arc<LazyBase>> {
        let tree = RemoteTree::load(dir)?;
        let mut receiver =
            WriteSession::begin_owned(store.clone(), &format!("stream base of session {session}"))?;
        let (total, pending) = lacking_chunks(&tree, &mut receiver)?;
        Ok(Arc::new(LazyBase {
            session: session.to_string(),
            dir: dir.to_path_buf(),
            tree,
            store,
            client,
            cfg,
            receiver: Mutex::new(Some(receiver)),
            pending: Mutex::new(pending),
            total,
            bytes: AtomicU64::new(0),
            objects: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            done: AtomicBool::new(false),
        }))
    }

    pub fn id(&self) -> VersionId {
        self.tree.id
    }

    pub fn version(&self) -> &Version {
        &self.tree.version
    }

    pub fn progress(&self) -> LazyProgress {
        let left = self.pending.lock().unwrap().len() as u64;
        LazyProgress {
            hub_image: self.tree.image.clone(),
            blocks_total: self.total,
            blocks_local: self.total - left.min(self.total),
            bytes_fetched: self.bytes.load(Ordering::Relaxed),
            objects_fetched: self.objects.load(Ordering::Relaxed),
        }
    }

    /// Whether the base has become an ordinary local version.
    pub fn is_materialised(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Fetch `ids` from the hub (until `deadline`) and keep them in the store.
    async fn fetch_and_keep(&self, ids: &[ChunkId], deadline: Instant) -> Result<Vec<Vec<u8>>> {
        let raws = download(
            &self.client,
            &self.tree.image,
            ids,
            ObjectKind::Data,
            deadline,
        )
        .await?;
        self.keep(ids, &raws)?;
        Ok(raws)
    }

    fn keep(&self, ids: &[ChunkId], raws: &[Vec<u8>]) -> Result<()> {
        {
            let mut r = self.receiver.lock().unwrap();
            if let Some(ws) = r.as_mut() {
                let objs: Vec<(ObjectKind, ChunkId, &[u8])> = ids
                    .iter()
                    .zip(raws)
                    .map(|(id, raw)| (ObjectKind::Data, *id, raw.as_slice()))
                    .collect();
                ws.add_received(&objs)?;
                // Indexed at once: the next read finds them in the store.
                ws.flush()?;
            }
        }
        let got: HashSet<ChunkId> = ids.iter().copied().collect();
        self.pending
            .lock()
            .unwrap()
            .retain(|(_, id)| !got.contains(id));
        self.bytes
            .fetch_add(raws.iter().map(|r| r.len() as u64).sum(), Ordering::Relaxed);
        self.objects.fetch_add(raws.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The next batch to prefetch: after the most recent read hint if there is one
    /// (readahead), else from the start.
    fn next_batch(&self) -> Vec<ChunkId> {
        let hint = self.recent.lock().unwrap().pop_back();
        let pending = self.pending.lock().unwrap();
        let from = hint.unwrap_or(0);
        let mut out: Vec<ChunkId> = pending
            .range((from, ChunkId([0; 32]))..)
            .take(BATCH)
            .map(|(_, id)| *id)
            .collect();
        if out.len() < BATCH {
            let more: Vec<ChunkId> = pending
                .iter()
                .take(BATCH - out.len())
                .map(|(_, id)| *id)
                .filter(|id| !out.contains(id))
                .collect();
            out.extend(more);
        }
        out
    }

    /// Fetch every chunk the store lacks, in batches, then make the base a local
    /// version (see the module docs). Waits out a hub that is away (retrying with
    /// back-off); `report` is called after every batch. Returns when the base is
    /// local.
    pub async fn prefetch(self: Arc<Self>, report: impl Fn(&LazyProgress)) -> Result<()> {
        let mut failures = 0u32;
        loop {
            let batch = self.next_batch();
            if batch.is_empty() {
                let me = self.clone();
                let made = tokio::task::spawn_blocking(move || me.materialise())
                    .await
                    .map_err(|e| PointError::Invalid(format!("materialising: {e}")))
                    .and_then(|r| r);
                match made {
                    Ok(()) => break,
                    Err(e) => {
                        // A base left half-local would be served lazily for ever and
                        // never committed: look again at what the store lacks, and
                        // try again after a pause.
                        failures += 1;
                        let wait = Duration::from_secs(1 << failures.min(5));
                        tracing::warn!(session = %self.session, error = %e, "could not make the base local; retrying in {wait:?}");
                        tokio::time::sleep(wait).await;
                        let me = self.clone();
                        // Failing that too, the next round tries both again.
                        match tokio::task::spawn_blocking(move || me.reopen()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                tracing::warn!(session = %self.session, error = %e, "could not look again at what the store lacks")
                            }
                            Err(e) => {
                                tracing::warn!(session = %self.session, error = %e, "looking again at what the store lacks ended abnormally")
                            }
                        }
                        continue;
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            let me = self.clone();
            match me.fetch_and_keep(&batch, deadline).await {
                Ok(_) => {
                    failures = 0;
                    report(&self.progress());
                }
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_secs(1 << failures.min(5));
                    tracing::warn!(session = %self.session, error = %e, "prefetch failed; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                }
            }
        }
        report(&self.progress());
        Ok(())
    }

    /// After a failed [`materialise`](Self::materialise): a new receiver, and the
    /// chunks the store lacks (a failed write session may have taken some with it)
    /// pending again.
    fn reopen(&self) -> Result<()> {
        if self.is_materialised() {
            return Ok(());
        }
        let mut r = self.receiver.lock().unwrap();
        let mut ws = match r.take() {
            Some(ws) => ws,
            None => WriteSession::begin_owned(
                self.store.clone(),
                &format!("stream base of session {}", self.session),
            )?,
        };
        *self.pending.lock().unwrap() = lacking_chunks(&self.tree, &mut ws)?.1;
        *r = Some(ws);
        Ok(())
    }

    /// Every chunk is local: add the tree bottom-up and the record, commit a ref
    /// `SESSION:main` to the version and register the session in the catalog.
    fn materialise(&self) -> Result<()> {
        let Some(mut ws) = self.receiver.lock().unwrap().take() else {
            if self.is_materialised() {
                return Ok(());
            }
            return Err(PointError::Invalid(format!(
                "the base of session {} is being made local elsewhere",
                self.session
            )));
        };
        let vid = self.tree.id;
        if !ws.lacking(&[vid])?.is_empty() {
            let mut by_level: Vec<Vec<(ChunkId, &[u8])>> = Vec::new();
            for (id, raw) in &self.tree.nodes {
                let l = decode_node(id, raw)?.level as usize;
                if by_level.len() <= l {
                    by_level.resize_with(l + 1, Vec::new);
                }
                by_level[l].push((*id, raw.as_slice()));
            }
            for level in by_level {
                let objs: Vec<(ObjectKind, ChunkId, &[u8])> = level
                    .into_iter()
                    .map(|(id, raw)| (ObjectKind::Tree, id, raw))
                    .collect();
                ws.add_received(&objs)?;
            }
            ws.add_received(&[(ObjectKind::Version, vid, self.tree.record.as_slice())])?;
        }
        let exists = self
            .store
            .get_ref(&self.session, strata_store::RefKind::Branch, "main")
            .ok()
            .flatten();
        match exists {
            Some(v) if v == vid => ws.finish_without_commit()?,
            Some(v) => {
                return Err(PointError::Invalid(format!(
                    "{}:main is at {}, not at the session's base {}",
                    self.session,
                    v.short(),
                    vid.short()
                )))
            }
            None => {
                ws.commit_received(
                    &vid,
                    &BranchUpdate {
                        image: self.session.clone(),
                        branch: "main".into(),
                        expected: None,
                        create_image: true,
                    },
                )?;
            }
        }
        if self.store.disk_session(&self.session).is_err() {
            self.store.add_disk_session(&DiskSessionInfo {
                name: self.session.clone(),
                image: self.session.clone(),
                branch: Some("main".into()),
                base: vid.to_hex(),
                created: strata_store::catalog::now(),
            })?;
        }
        self.done.store(true, Ordering::Release);
        let _ = std::fs::remove_file(self.dir.join(LAZY_FILE));
        tracing::info!(session = %self.session, "base is local");
        Ok(())
    }
}

impl Upstream for LazyBase {
    fn nodes(&self, ids: &[ChunkId]) -> io::Result<Vec<Vec<u8>>> {
        ids.iter()
            .map(|id| {
                self.tree.nodes.get(id).cloned().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("tree node {} unknown", id.short()),
                    )
                })
            })
            .collect()
    }

    fn chunks(&self, ids: &[ChunkId]) -> io::Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + self.cfg.fetch_timeout;
        let (tx, rx) = std::sync::mpsc::channel();
        let (client, image, ids2) = (self.client.clone(), self.tree.image.clone(), ids.to_vec());
        self.cfg.runtime.spawn(async move {
            let r = download(&client, &image, &ids2, ObjectKind::Data, deadline).await;
            let _ = tx.send(r);
        });
        // The task gives up at the deadline; the margin covers its last attempt.
        let raws = match rx.recv_timeout(self.cfg.fetch_timeout + Duration::from_secs(5)) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("fetching from the hub: {e}"),
                ))
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "fetching from the hub timed out",
                ))
            }
        };
        self.keep(ids, &raws).map_err(io::Error::other)?;
        Ok(raws)
    }

    fn missed(&self, blocks: &[u64]) {
        let mut r = self.recent.lock().unwrap();
        for &b in blocks {
            r.push_back(b + 1);
            if r.len() > HINTS {
                r.pop_front();
            }
        }
    }
}
