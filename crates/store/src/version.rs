//! Version records.
//!
//! A version is immutable: its id is the hash of this record, and the record names the
//! root of its block-map tree and its parents. Records are JSON (fields in a fixed
//! order, so the bytes and therefore the id are deterministic) because they are small,
//! rare, and worth being able to read with a text editor during a post-mortem.

use serde::{Deserialize, Serialize};

use crate::id::{ChunkId, VersionId};
use crate::tree::{Entry, TreeRef};

pub const VERSION_FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub format: u32,
    /// The image this version was first made for (informational: a clone shares it).
    pub image: String,
    pub parents: Vec<String>,
    /// Seconds since the Unix epoch.
    pub time: i64,
    pub author: String,
    pub message: String,
    pub virtual_size: u64,
    pub block_size: u32,
    /// Root of the block map: "u" (all unwritten), "z" (all zero) or a node id in hex.
    pub root: String,
    pub depth: u8,
    /// Blocks holding data (for stats without walking the tree).
    pub data_blocks: u64,
    /// Blocks explicitly zero.
    pub zero_blocks: u64,
    /// Bytes of data blocks (the last block of an image may be short).
    pub data_bytes: u64,
}

impl Version {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("version records always serialize")
    }

    pub fn decode(b: &[u8]) -> Result<Version, String> {
        let v: Version = serde_json::from_slice(b).map_err(|e| format!("version record: {e}"))?;
        if v.format != VERSION_FORMAT {
            return Err(format!("unsupported version record format {}", v.format));
        }
        v.root_entry()?;
        v.parent_ids()?;
        if !(12..=22).contains(&v.block_size.trailing_zeros()) || !v.block_size.is_power_of_two() {
            return Err(format!("implausible block size {}", v.block_size));
        }
        if crate::tree::depth_for(v.blocks()) != v.depth {
            return Err("tree depth does not match the virtual size".into());
        }
        Ok(v)
    }

    pub fn root_entry(&self) -> Result<Entry, String> {
        Ok(match self.root.as_str() {
            "u" => Entry::Unwritten,
            "z" => Entry::Zero,
            h => Entry::Present(ChunkId::from_hex(h).ok_or("bad root id in version record")?),
        })
    }

    pub fn encode_root(e: Entry) -> String {
        match e {
            Entry::Unwritten => "u".into(),
            Entry::Zero => "z".into(),
            Entry::Present(id) => id.to_hex(),
        }
    }

    pub fn tree(&self) -> TreeRef {
        TreeRef {
            root: self.root_entry().unwrap_or(Entry::Unwritten),
            depth: self.depth,
        }
    }

    pub fn parent_ids(&self) -> Result<Vec<VersionId>, String> {
        self.parents
            .iter()
            .map(|p| ChunkId::from_hex(p).ok_or_else(|| format!("bad parent id {p:?}")))
            .collect()
    }

    pub fn blocks(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size as u64)
    }
}
