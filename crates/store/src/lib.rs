//! # strata-store: a content-addressed, versioned block store
//!
//! This crate keeps disk images as immutable versions of a block map. It knows
//! nothing about image formats or network protocols; it stores blocks and answers
//! what a version holds.
//!
//! * **Objects** — blocks of data, tree nodes and version records — are named by the
//!   BLAKE3 hash of their bytes ([`ChunkId`]), compressed with zstd, and stored once
//!   however many versions use them. All-zero blocks are never stored.
//! * **Packs** ([`pack`]) bundle objects into immutable files of up to 64 MiB behind a
//!   small [`Backend`] trait (local directory now, object storage later).
//! * **The catalog** ([`catalog`]) is a SQLite database: the index from object to pack,
//!   images, branches and tags (moved only by compare-and-swap), and the write
//!   sessions in progress.
//! * **Trees** ([`tree`]) map block numbers to objects as Merkle trees, so versions
//!   share unchanged subtrees and a diff only visits what changed.
//! * **Sessions** ([`session`]) write new versions; **gc** ([`gc`]) removes what no
//!   ref reaches while sessions run; **verify** ([`verify`]) re-hashes everything.
//!
//! `docs/architecture.md` at the repository root describes the on-disk layout whole.

pub mod backend;
pub mod catalog;
pub mod error;
pub mod gc;
pub mod id;
pub mod pack;
pub mod session;
pub mod stats;
pub mod store;
pub mod tree;
pub mod verify;
pub mod version;

pub use backend::{Backend, LocalDir};
pub use error::{Result, StoreError};
pub use id::{ChunkId, ObjectKind, VersionId};
pub use session::{
    BlockInput, BranchUpdate, CommitTarget, PreparedBlocks, VersionDraft, WriteSession, WriteStats,
};
pub use store::{
    validate_block_size, validate_name, DiskSessionInfo, ImageInfo, RefInfo, RefKind, Store,
    DEFAULT_BLOCK_SIZE, DEFAULT_BRANCH,
};
pub use tree::{Entry, TreeRef};
pub use version::Version;
