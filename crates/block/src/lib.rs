//! # strata-block: block devices over the store
//!
//! Everything that reads an image block by block — export today, the NBD server and
//! the point's lazily fetched sessions next — reads through one small trait,
//! [`BlockDevice`]. Devices compose like nbdkit filters: a copy-on-write delta over a
//! base version, a lazy fetcher under it, each its own type, each testable alone.
//!
//! Layers:
//!
//! * [`VersionDevice`]: a read-only [`BlockDevice`] over one immutable version, which
//!   reads a whole leaf's worth of blocks at a time so that sequential readers (export)
//!   get batched, parallel chunk reads.
//! * [`VersionDisk`]: the same version as a randomly addressable, read-only [`Disk`]
//!   (what a server exports), with a bounded cache of tree nodes and a local file of
//!   decoded blocks ([`block_cache`]); [`VersionDisks`] shares one per version.
//! * [`SessionDisk`]: a writable [`Disk`] — a base version plus a durable
//!   copy-on-write delta in a local directory — that commits new versions while
//!   clients keep writing. See [`session`].

pub mod block_cache;
pub mod disk;
mod lru;
pub mod session;
pub mod upstream;
pub mod version_disk;

use std::sync::Arc;

pub use block_cache::{BlockCacheConfig, BlockCacheStats};
pub use disk::{Disk, DiskExtent};
pub use session::{CommitReport, SessionDisk, SessionInfo, SessionStats};
pub use upstream::Upstream;
pub use version_disk::{VersionDisk, VersionDisks};

use strata_store::tree::{self, Span};
use strata_store::{ChunkId, Entry, Store, StoreError, Version, VersionId};

/// The state of one block as a device reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Block {
    /// Never written: reads as zeros; an upper layer may supply content instead.
    Unwritten,
    /// Explicitly zero.
    Zero,
    /// Content (the last block of an image may be shorter than the block size).
    Data(Arc<Vec<u8>>),
}

/// A run of blocks as a device reports it, in order.
#[derive(Clone, Debug)]
pub enum Run {
    /// `count` blocks from `start` that are all unwritten, or all zero.
    Uniform { start: u64, count: u64, zero: bool },
    /// Blocks with content, `data[i]` being block `start + i`.
    Blocks { start: u64, blocks: Vec<Block> },
}

/// A disk as a sequence of fixed-size blocks.
pub trait BlockDevice: Send + Sync {
    fn block_size(&self) -> u32;
    fn virtual_size(&self) -> u64;
    fn blocks(&self) -> u64 {
        self.virtual_size().div_ceil(self.block_size() as u64)
    }
    /// Read the blocks of `[from, to)` in order, handing them to `visit` in runs.
    fn read_runs(
        &self,
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(Run) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
}

/// A read-only device over one committed version.
pub struct VersionDevice {
    store: Arc<Store>,
    id: VersionId,
    version: Version,
}

impl VersionDevice {
    pub fn open(store: Arc<Store>, id: VersionId) -> Result<VersionDevice, StoreError> {
        let version = store.load_version(&id)?;
        Ok(VersionDevice { store, id, version })
    }

    pub fn id(&self) -> VersionId {
        self.id
    }

    pub fn version(&self) -> &Version {
        &self.version
    }
}

impl BlockDevice for VersionDevice {
    fn block_size(&self) -> u32 {
        self.version.block_size
    }

    fn virtual_size(&self) -> u64 {
        self.version.virtual_size
    }

    fn read_runs(
        &self,
        from: u64,
        to: u64,
        visit: &mut dyn FnMut(Run) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let tree = self.version.tree();
        let store = &self.store;
        let mut load = |id: &ChunkId| store.load_node(id);
        tree::walk(
            &mut load,
            tree.root,
            tree.depth,
            from,
            to,
            &mut |span| match span {
                Span::Uniform {
                    start,
                    count,
                    entry,
                } => visit(Run::Uniform {
                    start,
                    count,
                    zero: entry == Entry::Zero,
                }),
                Span::Blocks { start, entries } => {
                    // One leaf at a time: its data chunks are fetched in one parallel batch.
                    let ids = tree::present_ids(entries);
                    let mut data = store.read_chunks(&ids)?.into_iter();
                    let blocks = entries
                        .iter()
                        .map(|e| match e {
                            Entry::Unwritten => Block::Unwritten,
                            Entry::Zero => Block::Zero,
                            Entry::Present(_) => Block::Data(Arc::new(
                                data.next().expect("one chunk per present entry"),
                            )),
                        })
                        .collect();
                    visit(Run::Blocks { start, blocks })
                }
            },
        )
    }
}
