//! Object identities.
//!
//! Every object in the store (a block of data, a tree node, a version record) is
//! named by the BLAKE3 hash of its uncompressed bytes. The name is the only way to
//! reach an object, so a damaged object is detected by re-hashing it.

use std::fmt;

/// The 32-byte content address of a stored object.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Hash `data` into its identity. (Encrypted domains will use BLAKE3's keyed mode
    /// here, so ids stay 32 bytes and the on-disk formats do not change.)
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// The id of an object of `kind`. Data is plain BLAKE3; tree nodes and version
    /// records hash in their own derived-key domains, so no data block can ever have
    /// the id of a node or record (a crafted disk block cannot stand in for metadata).
    pub fn for_object(kind: ObjectKind, data: &[u8]) -> ChunkId {
        let context = match kind {
            ObjectKind::Data => return ChunkId::of(data),
            ObjectKind::Tree => "strata 2026-11 tree node",
            ObjectKind::Version => "strata 2026-11 version record",
        };
        let mut h = blake3::Hasher::new_derive_key(context);
        h.update(data);
        ChunkId(*h.finalize().as_bytes())
    }

    pub fn from_slice(b: &[u8]) -> Option<ChunkId> {
        Some(ChunkId(b.try_into().ok()?))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<ChunkId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkId(out))
    }

    /// Short form for humans (12 hex digits), as `git` abbreviates commits.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.short())
    }
}

/// A version is named by the id of its version record.
pub type VersionId = ChunkId;

/// What an object is. Stored in pack entries and the index so that gc can walk trees
/// without decoding data chunks, and verify can report what kind of object is hurt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectKind {
    /// A block of image content.
    Data = 0,
    /// A node of a version's block-map tree.
    Tree = 1,
    /// A version record (metadata and the root of its tree).
    Version = 2,
}

impl ObjectKind {
    pub fn from_u8(v: u8) -> Option<ObjectKind> {
        match v {
            0 => Some(ObjectKind::Data),
            1 => Some(ObjectKind::Tree),
            2 => Some(ObjectKind::Version),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ObjectKind::Data => "data",
            ObjectKind::Tree => "tree",
            ObjectKind::Version => "version",
        }
    }
}

/// Random identity for packs and sessions: 16 bytes from the OS, as hex.
pub fn random_hex16() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("the OS random source is available");
    hex::encode(b)
}
