//! Push and pull: move a version between a local store and a hub, sending only what
//! the receiver lacks.
//!
//! Both walk the version's tree **top down** and ask the receiver, a batch at a
//! time, which nodes it lacks. A receiver takes a tree node only after everything
//! the node names (see [`strata_store::WriteSession::add_received`]), so a node it
//! holds stands for its whole subtree: that subtree is skipped without being read.
//! Under a node it lacks, the children are asked about next; data blocks travel in
//! batches of `batch_bytes` with `streams` requests in flight; then the nodes follow,
//! children before parents, then the version record; finally the receiver moves a
//! branch by compare-and-swap.
//!
//! **Deltas.** Block b of the new version usually resembles block b of the version
//! the receiver already holds. When both trees have the same shape, the walk carries
//! the base tree's entry at the same place along, and each object travels as a zstd
//! delta against it when that is smaller (see [`crate::delta`]).
//!
//! **Resuming.** Whatever arrived whole is kept: a request cut mid-stream keeps the
//! objects before the cut and asks again for the rest (up to `retries` times), and a
//! failed run leaves what it received in the receiving store, so running it again
//! asks "which do you lack" again and resends only what was in flight.
//!
//! **gc.** Everything received is held by a write session (locally) or an upload
//! (on the hub), which pins what the receiver said it has and protects what it
//! wrote, until the branch that reaches it is set.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use strata_store::tree::{Node, FANOUT};
use strata_store::{
    BranchUpdate, ChunkId, Entry, ObjectKind, RefKind, Store, StoreError, Version, VersionId,
    WriteSession, DEFAULT_BRANCH,
};

use crate::api::Want;
use crate::client::{HubClient, Object, UploadObject};
use crate::error::{Result, SyncError};

/// Knobs shared by push and pull.
#[derive(Clone, Debug)]
pub struct TransferOptions {
    /// Uncompressed bytes of objects per request.
    pub batch_bytes: usize,
    /// Times a request whose connection failed is retried within one run (each
    /// retry asks only for what has not arrived).
    pub retries: u32,
    /// Send changed blocks as deltas against the receiver's block at the same place.
    pub delta: bool,
    /// Pull: let the hub also compress blocks against 4 KiB pages the local base
    /// version holds at other places (see [`crate::pages`]).
    pub pages: bool,
}

impl Default for TransferOptions {
    fn default() -> TransferOptions {
        TransferOptions {
            batch_bytes: 8 << 20,
            retries: 3,
            delta: true,
            pages: true,
        }
    }
}

/// The expected old value of the branch a transfer moves.
#[derive(Clone, Debug, Default)]
pub enum Expect {
    /// Whatever it is when the transfer starts (still compare-and-swap: a change
    /// during the transfer is a conflict).
    #[default]
    Current,
    /// This version (`None`: the branch must not exist).
    Value(Option<VersionId>),
}

#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    pub transfer: TransferOptions,
    /// Local branch to move (default: `rev` if it is a branch on the hub, else
    /// `main`).
    pub branch: Option<String>,
    pub expected: Expect,
    /// A local version to take deltas against (default: the local branch's tip).
    pub base: Option<VersionId>,
    /// Blocks to take from a local copy instead of the hub (see [`Seed`]).
    pub seed: Option<std::sync::Arc<dyn Seed>>,
}

#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    pub transfer: TransferOptions,
    /// The hub branch's expected old value.
    pub expected: Expect,
    /// A version the hub holds to send deltas against (default: the first parent,
    /// if the hub holds it).
    pub base: Option<VersionId>,
}

/// What a push or pull moved.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TransferStats {
    /// The version transferred (hex).
    pub version: String,
    /// The branch moved, and its old value (hex).
    pub branch: String,
    pub previous: Option<String>,
    /// Objects moved, by kind.
    pub data_objects: u64,
    pub tree_objects: u64,
    pub version_objects: u64,
    /// Their uncompressed size.
    pub logical_bytes: u64,
    /// Of the data and tree objects, how many travelled as deltas (pull: as received;
    /// push: as offered).
    pub deltas: u64,
    /// Pull: of those, how many were compressed against pages the local base holds
    /// at other places (see [`crate::pages`]).
    #[serde(default)]
    pub paged: u64,
    /// Body bytes on the wire, both directions (requests and answers).
    pub wire_sent: u64,
    pub wire_received: u64,
    /// Requests retried after a failed connection.
    pub retries: u64,
    /// Pull: data blocks taken from a seed instead of the hub, and their bytes.
    #[serde(default)]
    pub seeded: u64,
    #[serde(default)]
    pub seeded_bytes: u64,
}

impl TransferStats {
    pub fn objects(&self) -> u64 {
        self.data_objects + self.tree_objects + self.version_objects
    }

    fn count(&mut self, kind: ObjectKind, raw: usize) {
        match kind {
            ObjectKind::Data => self.data_objects += 1,
            ObjectKind::Tree => self.tree_objects += 1,
            ObjectKind::Version => self.version_objects += 1,
        }
        self.logical_bytes += raw as u64;
    }
}

/// Run blocking store work from async code without stalling the other tasks of a
/// multi-threaded runtime (on a current-thread runtime it simply runs).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Run `f` again after a transient failure, up to `retries` times.
async fn retried<T, F, Fut>(retries: u32, f: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if e.is_transient() && attempt < retries => {
                attempt += 1;
                tokio::time::sleep(backoff(attempt)).await;
            }
            r => return r,
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.min(6))
}

/// The node at the same place in the base tree, when there is one of the right level.
fn base_node(local: &Store, base: Option<ChunkId>, level: u8) -> Option<Node> {
    let node = local.load_node(&base?).ok()?;
    (node.level == level).then_some(node)
}

/// An object of the walk: its id, its counterpart in the base tree, and the first
/// block it covers.
type Item = (ChunkId, Option<ChunkId>, u64);

/// Children of `node` (at `level`, covering blocks from `first`) paired with the base
/// tree's entries at the same places.
fn children(node: &Node, base: Option<&Node>, first: u64) -> Vec<Item> {
    let span = strata_store::tree::entry_span(node.level);
    node.entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let id = e.id()?;
            let b = base.and_then(|b| b.entries.get(i)).and_then(Entry::id);
            Some((id, b.filter(|b| *b != id), first + i as u64 * span))
        })
        .collect()
}

fn dedup<T>(items: Vec<T>, id: impl Fn(&T) -> ChunkId) -> Vec<T> {
    let mut seen = HashSet::new();
    items.into_iter().filter(|t| seen.insert(id(t))).collect()
}

/// Blocks a point may already hold outside its store, e.g. an old copy of the image
/// on its disk or a DVD. Seeding takes from it only blocks that hash to exactly what
/// the version lists at that place.
pub trait Seed: Send + Sync + std::fmt::Debug {
    /// The `len` bytes of block `index`, if the seed has them.
    fn block(&self, index: u64, len: usize) -> Option<Vec<u8>>;
}

// ---- pull ----------------------------------------------------------------------------

/// What [`fetch`] brought: every object asked for, verified.
struct Fetched {
    objects: Vec<Object>,
    deltas: u64,
    paged: u64,
    retries: u64,
}

/// Download one batch completely: keep what arrives whole, ask again for the rest
/// after a cut (up to `retries`), refetch a damaged object once (without a delta),
/// then give up.
async fn fetch(
    client: &HubClient,
    image: &str,
    wants: Vec<Want>,
    bases: &Store,
    retries: u32,
    mut pages_of: Option<VersionId>,
) -> Result<Fetched> {
    let mut pending = wants;
    let mut got = Vec::with_capacity(pending.len());
    let mut damaged: HashSet<ChunkId> = HashSet::new();
    let (mut attempt, mut deltas, mut paged) = (0u32, 0u64, 0u64);
    loop {
        let d = client.download_with(image, &pending, bases, pages_of).await;
        deltas += d.deltas;
        paged += d.paged;
        if let Some(id) = d.missing.first() {
            return Err(SyncError::Missing {
                side: "hub",
                id: *id,
            });
        }
        let arrived: HashSet<ChunkId> = d.objects.iter().map(|o| o.id).collect();
        got.extend(d.objects);
        pending.retain(|w| !arrived.contains(&w.id));
        for (id, reason) in d.corrupt {
            if !damaged.insert(id) {
                return Err(SyncError::Corrupt { id, reason });
            }
            tracing::warn!(%id, %reason, "damaged object from the hub; fetching it again");
            // The base may be what went wrong (or a page it referenced, e.g. of a
            // base not wholly local): ask for the object whole.
            for w in pending.iter_mut().filter(|w| w.id == id) {
                w.base = None;
            }
            pages_of = None;
        }
        match d.error {
            None if pending.is_empty() => {
                return Ok(Fetched {
                    objects: got,
                    deltas,
                    paged,
                    retries: attempt as u64,
                })
            }
            None if pending.iter().all(|w| damaged.contains(&w.id)) => continue,
            None => {
                return Err(SyncError::Protocol(format!(
                    "hub left out {} requested objects",
                    pending.len()
                )))
            }
            Some(e) if e.is_transient() && attempt < retries => {
                attempt += 1;
                tracing::info!(error = %e, attempt, left = pending.len(), "download cut; resuming");
                tokio::time::sleep(backoff(attempt)).await;
            }
            Some(e) => return Err(e),
        }
    }
}

struct Puller<'a> {
    local: &'a Store,
    client: &'a HubClient,
    image: &'a str,
    session: WriteSession<'a>,
    opts: &'a TransferOptions,
    block_size: usize,
    virtual_size: u64,
    seed: Option<std::sync::Arc<dyn Seed>>,
    /// The local base version, wholly held: blocks may come as references to its
    /// pages.
    pages_of: Option<VersionId>,
    stats: TransferStats,
}

impl<'a> Puller<'a> {
    /// Of `items` (object, its counterpart in the base tree), the ones the local store
    /// lacks, as requests (with the base for a delta when deltas are on); those it
    /// holds are pinned by the session.
    fn lacking(&mut self, items: Vec<Item>) -> Result<Vec<(Want, u64)>> {
        let items = dedup(items, |i| i.0);
        let ids: Vec<ChunkId> = items.iter().map(|(id, _, _)| *id).collect();
        let lacking: HashSet<ChunkId> = blocking(|| self.session.lacking(&ids))?
            .into_iter()
            .collect();
        Ok(items
            .iter()
            .filter(|(id, _, _)| lacking.contains(id))
            .map(|(id, base, first)| {
                let want = Want {
                    id: *id,
                    base: base.filter(|_| self.opts.delta),
                };
                (want, *first)
            })
            .collect())
    }

    /// Take what the seed holds of `wants` (data blocks, each with its block index),
    /// verified by hash, into the store; return the rest.
    fn seeded(&mut self, wants: Vec<(Want, u64)>) -> Result<Vec<(Want, u64)>> {
        use rayon::prelude::*;
        let Some(seed) = self.seed.clone() else {
            return Ok(wants);
        };
        let (bs, size) = (self.block_size as u64, self.virtual_size);
        let found: Vec<Option<Vec<u8>>> = wants
            .par_iter()
            .map(|(w, index)| {
                let len = bs.min(size.saturating_sub(index * bs)) as usize;
                seed.block(*index, len)
                    .filter(|raw| ChunkId::for_object(ObjectKind::Data, raw) == w.id)
            })
            .collect();
        let mut rest = Vec::new();
        let mut take: Vec<(ChunkId, Vec<u8>)> = Vec::new();
        for (w, raw) in wants.into_iter().zip(found) {
            match raw {
                Some(raw) => take.push((w.0.id, raw)),
                None => rest.push(w),
            }
        }
        for part in take.chunks(256) {
            let refs: Vec<(ObjectKind, ChunkId, &[u8])> = part
                .iter()
                .map(|(id, raw)| (ObjectKind::Data, *id, raw.as_slice()))
                .collect();
            blocking(|| self.session.add_received(&refs))?;
            self.stats.seeded += part.len() as u64;
            self.stats.seeded_bytes += part.iter().map(|(_, r)| r.len() as u64).sum::<u64>();
        }
        Ok(rest)
    }

    /// Nodes at `level` (with their base-tree counterparts), and everything under
    /// those the local store lacks.
    fn nodes(&mut self, level: u8, items: Vec<Item>) -> BoxFuture<'_, Result<()>> {
        async move {
            let (wants, firsts): (Vec<Want>, Vec<u64>) = self.lacking(items)?.into_iter().unzip();
            if wants.is_empty() {
                return Ok(());
            }
            let f = fetch(
                self.client,
                self.image,
                wants.clone(),
                self.local,
                self.opts.retries,
                None,
            )
            .await?;
            self.stats.deltas += f.deltas;
            self.stats.retries += f.retries;
            let mut by_id: HashMap<ChunkId, Object> =
                f.objects.into_iter().map(|o| (o.id, o)).collect();
            let mut nodes = Vec::with_capacity(wants.len());
            let mut below = Vec::new();
            for (w, first) in wants.iter().zip(firsts) {
                let o = by_id.remove(&w.id).ok_or(SyncError::Missing {
                    side: "hub",
                    id: w.id,
                })?;
                let node = (o.kind == ObjectKind::Tree)
                    .then(|| Node::decode(&o.raw).ok())
                    .flatten()
                    .filter(|n| n.level == level)
                    .ok_or_else(|| SyncError::Corrupt {
                        id: o.id,
                        reason: format!("expected a level-{level} tree node"),
                    })?;
                let base = blocking(|| base_node(self.local, w.base, level));
                below.extend(children(&node, base.as_ref(), first));
                nodes.push(o);
            }
            if level == 0 {
                self.data(below).await?;
            } else {
                for part in below.chunks(FANOUT) {
                    self.nodes(level - 1, part.to_vec()).await?;
                }
            }
            let refs: Vec<(ObjectKind, ChunkId, &[u8])> = nodes
                .iter()
                .map(|o| (o.kind, o.id, o.raw.as_slice()))
                .collect();
            blocking(|| self.session.add_received(&refs))?;
            for o in &nodes {
                self.stats.count(o.kind, o.raw.len());
            }
            Ok(())
        }
        .boxed()
    }

    /// Data blocks the local store lacks, in parallel batches.
    async fn data(&mut self, items: Vec<Item>) -> Result<()> {
        let wants = self.lacking(items)?;
        let wants: Vec<Want> = self.seeded(wants)?.into_iter().map(|(w, _)| w).collect();
        let per_batch = (self.opts.batch_bytes / self.block_size.max(1)).max(1);
        let (client, image, local, retries, pages_of) = (
            self.client,
            self.image,
            self.local,
            self.opts.retries,
            self.pages_of,
        );
        // Collected first: a stream over borrowed chunks trips the `Send` inference.
        let batches: Vec<Vec<Want>> = wants.chunks(per_batch).map(<[Want]>::to_vec).collect();
        let mut results = futures_util::stream::iter(batches)
            .map(|b| fetch(client, image, b, local, retries, pages_of))
            .buffer_unordered(client.streams());
        while let Some(r) = results.next().await {
            let Fetched {
                objects: objs,
                deltas,
                paged,
                retries,
            } = r?;
            if let Some(o) = objs.iter().find(|o| o.kind != ObjectKind::Data) {
                return Err(SyncError::Corrupt {
                    id: o.id,
                    reason: format!("expected data, got a {} object", o.kind.name()),
                });
            }
            let refs: Vec<(ObjectKind, ChunkId, &[u8])> = objs
                .iter()
                .map(|o| (o.kind, o.id, o.raw.as_slice()))
                .collect();
            blocking(|| self.session.add_received(&refs))?;
            self.stats.deltas += deltas;
            self.stats.paged += paged;
            self.stats.retries += retries;
            for o in &objs {
                self.stats.count(o.kind, o.raw.len());
            }
        }
        Ok(())
    }
}

/// Fetch version `rev` of `image` from the hub into `local`, only the objects it
/// lacks, and move a local branch to it (see [`PullOptions`]). On failure, what
/// arrived stays in the store (until the next gc), so running the pull again resumes.
pub async fn pull(
    local: &Store,
    client: &HubClient,
    image: &str,
    rev: &str,
    opts: &PullOptions,
) -> Result<TransferStats> {
    let wire0 = client.wire();
    // The first requests are retried like object fetches: a cut right at the start
    // must not cost a whole run.
    let (vid, version, record) =
        retried(opts.transfer.retries, || client.get_version(image, rev)).await?;
    let branch = match &opts.branch {
        Some(b) => b.clone(),
        None => {
            let summary = retried(opts.transfer.retries, || client.image(image)).await?;
            if summary.branches.iter().any(|b| b.name == rev) {
                rev.to_string()
            } else {
                DEFAULT_BRANCH.to_string()
            }
        }
    };
    let mut session = WriteSession::begin(local, &format!("pull {image}@{rev}"))?;
    let expected = match &opts.expected {
        Expect::Current => match local.get_ref(image, RefKind::Branch, &branch) {
            Ok(v) => v,
            Err(StoreError::NoSuchImage(_)) => None,
            Err(e) => return Err(e.into()),
        },
        Expect::Value(v) => *v,
    };
    // The base: a local version of the same shape, pinned while we read it.
    let base_vid = opts.base.or(expected).filter(|_| opts.transfer.delta);
    let base_root = match base_vid {
        Some(b) if session.lacking(&[b])?.is_empty() => local
            .load_version(&b)
            .ok()
            .filter(|bv| bv.depth == version.depth && bv.block_size == version.block_size)
            .and_then(|bv| bv.root_entry().ok()?.id()),
        _ => None,
    };
    // Page references need every block of the base here, which a version in the
    // store implies (a store takes a node only after its whole subtree).
    let pages_of = base_vid.filter(|_| base_root.is_some() && opts.transfer.pages);
    let mut p = Puller {
        local,
        client,
        image,
        session,
        opts: &opts.transfer,
        block_size: version.block_size as usize,
        virtual_size: version.virtual_size,
        seed: opts.seed.clone(),
        pages_of,
        stats: TransferStats::default(),
    };
    let moved = async {
        if !p.session.lacking(&[vid])?.is_empty() {
            if let Ok(Entry::Present(root)) = version.root_entry() {
                p.nodes(version.depth - 1, vec![(root, base_root, 0)])
                    .await?;
            }
            p.session
                .add_received(&[(ObjectKind::Version, vid, record.as_slice())])?;
            p.stats.count(ObjectKind::Version, record.len());
        }
        Ok::<(), SyncError>(())
    }
    .await;
    if let Err(e) = moved {
        // Keep what arrived whole: indexed, the next run finds it and pins it.
        let _ = p.session.flush();
        return Err(e);
    }
    let mut stats = p.stats;
    blocking(|| {
        p.session.commit_received(
            &vid,
            &BranchUpdate {
                image: image.to_string(),
                branch: branch.clone(),
                expected,
                create_image: true,
            },
        )
    })?;
    let wire = client.wire();
    stats.version = vid.to_hex();
    stats.branch = branch;
    stats.previous = expected.map(|v| v.to_hex());
    stats.wire_sent = wire.sent - wire0.sent;
    stats.wire_received = wire.received - wire0.received;
    Ok(stats)
}

// ---- push ----------------------------------------------------------------------------

struct Pusher<'a> {
    local: &'a Store,
    client: &'a HubClient,
    image: &'a str,
    upload: String,
    opts: &'a TransferOptions,
    block_size: usize,
    stats: TransferStats,
}

/// Read objects from the local store; every one must be there.
fn read_local(local: &Store, ids: &[ChunkId]) -> Result<Vec<(ObjectKind, Vec<u8>)>> {
    let objs = blocking(|| local.read_objects(ids))?;
    ids.iter()
        .zip(objs)
        .map(|(id, o)| {
            o.ok_or(SyncError::Missing {
                side: "local store",
                id: *id,
            })
        })
        .collect()
}

/// A delta base: its id and bytes.
type Base = (ChunkId, Vec<u8>);

/// Local bytes of delta bases (absent ones are simply not used).
fn read_bases(local: &Store, ids: &[Option<ChunkId>]) -> Result<Vec<Option<Base>>> {
    let want: Vec<ChunkId> = ids.iter().flatten().copied().collect();
    let mut got = blocking(|| local.read_objects(&want))?.into_iter();
    Ok(ids
        .iter()
        .map(|b| b.and_then(|b| got.next().flatten().map(|(_, raw)| (b, raw))))
        .collect())
}

impl<'a> Pusher<'a> {
    /// Upload one batch, re-asking "missing" and resending only that after a cut.
    async fn send(&self, items: Vec<(ChunkId, Option<ChunkId>)>) -> Result<(TransferStats, u64)> {
        let mut items = items;
        let mut attempt = 0u32;
        loop {
            let ids: Vec<ChunkId> = items.iter().map(|(id, _)| *id).collect();
            let bases: Vec<Option<ChunkId>> = items.iter().map(|(_, b)| *b).collect();
            let objs = read_local(self.local, &ids)?;
            let bases = read_bases(self.local, &bases)?;
            let mut st = TransferStats::default();
            let upload: Vec<UploadObject> = ids
                .iter()
                .zip(objs)
                .zip(bases)
                .map(|((id, (kind, raw)), base)| {
                    st.count(kind, raw.len());
                    st.deltas += base.is_some() as u64;
                    UploadObject {
                        kind,
                        id: *id,
                        raw,
                        base,
                    }
                })
                .collect();
            let err = match self.client.upload(self.image, &self.upload, upload).await {
                Ok(_) => return Ok((st, attempt as u64)),
                Err(e) => e,
            };
            if !err.is_transient() || attempt >= self.opts.retries {
                return Err(err);
            }
            attempt += 1;
            tracing::info!(error = %err, attempt, "upload cut; resuming");
            tokio::time::sleep(backoff(attempt)).await;
            // What arrived before the cut is on the hub: send the rest only.
            let lacking: HashSet<ChunkId> = loop {
                match self.client.missing(self.image, &self.upload, &ids).await {
                    Ok(l) => break l.into_iter().collect(),
                    Err(e) if e.is_transient() && attempt < self.opts.retries => {
                        attempt += 1;
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            items.retain(|(id, _)| lacking.contains(id));
            if items.is_empty() {
                return Ok((TransferStats::default(), attempt as u64));
            }
        }
    }

    fn absorb(&mut self, st: TransferStats, retries: u64) {
        self.stats.data_objects += st.data_objects;
        self.stats.tree_objects += st.tree_objects;
        self.stats.version_objects += st.version_objects;
        self.stats.logical_bytes += st.logical_bytes;
        self.stats.deltas += st.deltas;
        self.stats.retries += retries;
    }

    async fn lacking(&self, ids: &[ChunkId]) -> Result<HashSet<ChunkId>> {
        let mut attempt = 0;
        loop {
            match self.client.missing(self.image, &self.upload, ids).await {
                Ok(l) => return Ok(l.into_iter().collect()),
                Err(e) if e.is_transient() && attempt < self.opts.retries => {
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn nodes(
        &mut self,
        level: u8,
        items: Vec<(ChunkId, Option<ChunkId>)>,
    ) -> BoxFuture<'_, Result<()>> {
        async move {
            let items = dedup(items, |i| i.0);
            let ids: Vec<ChunkId> = items.iter().map(|(id, _)| *id).collect();
            let lacking = self.lacking(&ids).await?;
            let items: Vec<(ChunkId, Option<ChunkId>)> = items
                .into_iter()
                .filter(|(id, _)| lacking.contains(id))
                .map(|(id, b)| (id, b.filter(|_| self.opts.delta)))
                .collect();
            if items.is_empty() {
                return Ok(());
            }
            let ids: Vec<ChunkId> = items.iter().map(|(id, _)| *id).collect();
            let objs = read_local(self.local, &ids)?;
            let mut below = Vec::new();
            for ((id, base), (kind, raw)) in items.iter().zip(&objs) {
                let node = (*kind == ObjectKind::Tree)
                    .then(|| Node::decode(raw).ok())
                    .flatten()
                    .ok_or_else(|| {
                        SyncError::Store(StoreError::Corrupt {
                            id: *id,
                            reason: "expected a tree node".into(),
                        })
                    })?;
                let base = blocking(|| base_node(self.local, *base, level));
                // The hub's tree is not read by position: drop the block index.
                below.extend(
                    children(&node, base.as_ref(), 0)
                        .into_iter()
                        .map(|(id, b, _)| (id, b)),
                );
            }
            if level == 0 {
                self.data(below).await?;
            } else {
                for part in below.chunks(FANOUT) {
                    self.nodes(level - 1, part.to_vec()).await?;
                }
            }
            let (st, r) = self.send(items).await?;
            self.absorb(st, r);
            Ok(())
        }
        .boxed()
    }

    async fn data(&mut self, items: Vec<(ChunkId, Option<ChunkId>)>) -> Result<()> {
        let items = dedup(items, |i| i.0);
        let mut todo = Vec::new();
        for part in items.chunks(crate::api::MAX_IDS_PER_REQUEST) {
            let ids: Vec<ChunkId> = part.iter().map(|(id, _)| *id).collect();
            let lacking = self.lacking(&ids).await?;
            todo.extend(
                part.iter()
                    .filter(|(id, _)| lacking.contains(id))
                    .map(|(id, b)| (*id, b.filter(|_| self.opts.delta))),
            );
        }
        let per_batch = (self.opts.batch_bytes / self.block_size.max(1)).max(1);
        let results: Vec<Result<(TransferStats, u64)>> = {
            let this = &*self;
            let batches: Vec<Vec<(ChunkId, Option<ChunkId>)>> =
                todo.chunks(per_batch).map(<[_]>::to_vec).collect();
            futures_util::stream::iter(batches)
                .map(|b| this.send(b))
                .buffer_unordered(this.client.streams())
                .collect()
                .await
        };
        for r in results {
            let (st, retries) = r?;
            self.absorb(st, retries);
        }
        Ok(())
    }
}

/// Send version `version` of the local store to the hub's `image`, only the objects
/// the hub lacks, and move the hub's `branch` to it by compare-and-swap
/// ([`SyncError::Conflict`] if it moved). The hub must let this caller write
/// `image` (it owns it, or it does not exist yet and is created, owned by the
/// caller).
pub async fn push(
    local: &Store,
    client: &HubClient,
    image: &str,
    branch: &str,
    version: &VersionId,
    opts: &PushOptions,
) -> Result<TransferStats> {
    let wire0 = client.wire();
    // Pin the version locally for the duration (a local gc may run meanwhile).
    let mut pin = WriteSession::begin(local, &format!("push {image}:{branch}"))?;
    pin.pin_version(version)?;
    let (kind, record) = read_local(local, &[*version])?.remove(0);
    if kind != ObjectKind::Version {
        return Err(SyncError::Invalid(format!("{version} is not a version")));
    }
    let v = Version::decode(&record).map_err(|reason| StoreError::Corrupt {
        id: *version,
        reason,
    })?;
    // First: it claims the image for this point if it is new.
    let upload = client.begin_upload(image).await?;
    let expected = match &opts.expected {
        Expect::Value(v) => *v,
        Expect::Current => match client.image(image).await {
            Ok(s) => s
                .branches
                .iter()
                .find(|b| b.name == branch)
                .and_then(|b| ChunkId::from_hex(&b.version)),
            Err(SyncError::Hub { status: 404, .. }) => None,
            Err(e) => return Err(e),
        },
    };
    let mut p = Pusher {
        local,
        client,
        image,
        upload,
        opts: &opts.transfer,
        block_size: v.block_size as usize,
        stats: TransferStats::default(),
    };
    if !p.lacking(&[*version]).await?.is_empty() {
        // A base the hub holds (its "missing" answer pins it there) and we hold too.
        let base = opts
            .base
            .or_else(|| v.parent_ids().ok()?.first().copied())
            .filter(|_| opts.transfer.delta);
        let base_root = match base {
            Some(b) if p.lacking(&[b]).await?.is_empty() => local
                .load_version(&b)
                .ok()
                .filter(|bv| bv.depth == v.depth && bv.block_size == v.block_size)
                .and_then(|bv| bv.root_entry().ok()?.id()),
            _ => None,
        };
        if let Ok(Entry::Present(root)) = v.root_entry() {
            p.nodes(v.depth - 1, vec![(root, base_root)]).await?;
        }
        let (st, r) = p.send(vec![(*version, None)]).await?;
        p.absorb(st, r);
    }
    let updated = client
        .commit_upload(image, &p.upload, branch, expected.as_ref(), version)
        .await?;
    drop(pin);
    let mut stats = p.stats;
    let wire = client.wire();
    stats.version = updated.version;
    stats.branch = branch.to_string();
    stats.previous = expected.map(|v| v.to_hex());
    stats.wire_sent = wire.sent - wire0.sent;
    stats.wire_received = wire.received - wire0.received;
    Ok(stats)
}
