//! [`Upstream`]: where a [`VersionDisk`](crate::VersionDisk) gets the objects its
//! local store lacks — the hook behind streaming start on a point.
//!
//! A point attaches a session to a version that lives on the hub. Rather than pull
//! the whole version first, the point builds a *lazy* `VersionDisk` over the version
//! record it fetched and an `Upstream` (implemented by `strata-point` over the hub
//! client; this crate stays free of HTTP), like an nbdkit filter between the disk and
//! its plugin. The disk reads its local store first and asks the upstream only on a
//! miss: for a tree node, or for the data chunks of the blocks being read.
//!
//! Nothing an upstream returns is trusted: [`fetch_nodes`] and [`fetch_chunks`]
//! check every object against its id (tree nodes in their derived-key domain) before
//! the disk uses it, so a damaged or forged object is an error — never wrong bytes.
//! Where fetched objects are kept (the point puts data chunks in its store and holds
//! tree nodes aside until the version is complete) is the upstream's business.

use std::io;

use strata_store::tree::Node;
use strata_store::{ChunkId, ObjectKind, StoreError};

/// A source of objects a lazy [`VersionDisk`](crate::VersionDisk) lacks locally.
/// Calls come from threads that may block (never from an event loop); an
/// implementation may wait for a while (a hub that is away) but must give up
/// within a bounded time with an error, which the disk reports as EIO.
pub trait Upstream: Send + Sync {
    /// The raw (uncompressed, encoded) bytes of tree nodes `ids`, in order.
    fn nodes(&self, ids: &[ChunkId]) -> io::Result<Vec<Vec<u8>>>;
    /// The raw bytes of data chunks `ids`, in order.
    fn chunks(&self, ids: &[ChunkId]) -> io::Result<Vec<Vec<u8>>>;
    /// Blocks a reader wanted that were not local (a hint for prefetch order:
    /// what a VM reads next is usually near what it just read).
    fn missed(&self, _blocks: &[u64]) {}
}

fn upstream_err(e: io::Error) -> StoreError {
    StoreError::Io {
        path: "upstream".into(),
        source: e,
    }
}

fn check_count(got: usize, want: usize) -> Result<(), StoreError> {
    if got != want {
        return Err(StoreError::Invalid(format!(
            "upstream returned {got} objects for {want} requested"
        )));
    }
    Ok(())
}

/// Fetch data chunks `ids` from `up`, each verified against its id.
pub fn fetch_chunks(up: &dyn Upstream, ids: &[ChunkId]) -> Result<Vec<Vec<u8>>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let got = up.chunks(ids).map_err(upstream_err)?;
    check_count(got.len(), ids.len())?;
    for (id, raw) in ids.iter().zip(&got) {
        if ChunkId::for_object(ObjectKind::Data, raw) != *id {
            return Err(StoreError::Corrupt {
                id: *id,
                reason: format!(
                    "data chunk from upstream ({} bytes) does not match its id",
                    raw.len()
                ),
            });
        }
    }
    Ok(got)
}

/// Fetch tree nodes `ids` from `up`, each verified against its id and decoded.
pub fn fetch_nodes(up: &dyn Upstream, ids: &[ChunkId]) -> Result<Vec<Node>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let got = up.nodes(ids).map_err(upstream_err)?;
    check_count(got.len(), ids.len())?;
    ids.iter()
        .zip(got)
        .map(|(id, raw)| {
            if ChunkId::for_object(ObjectKind::Tree, &raw) != *id {
                return Err(StoreError::Corrupt {
                    id: *id,
                    reason: "tree node from upstream does not match its id".into(),
                });
            }
            Node::decode(&raw).map_err(|reason| StoreError::Corrupt { id: *id, reason })
        })
        .collect()
}
