//! Helpers shared by the block-layer tests: a store in a temporary directory, versions
//! imported from an in-memory model, deterministic pseudo-random content.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use strata_block::Disk;
use strata_store::{BlockInput, CommitTarget, Store, Version, VersionId, WriteSession};

/// How a model block is imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Never written (imported as unwritten; reads as zeros).
    Unwritten,
    /// Explicitly zero.
    Zero,
    /// Content (imported as data; all-zero content becomes a zero entry).
    Data,
}

/// A disk's expected content and, per block, how it would be imported.
#[derive(Clone, Debug)]
pub struct Model {
    pub bs: usize,
    pub bytes: Vec<u8>,
    pub kinds: Vec<Kind>,
}

impl Model {
    pub fn blocks(&self) -> usize {
        self.kinds.len()
    }

    pub fn block_range(&self, b: usize) -> std::ops::Range<usize> {
        b * self.bs..((b + 1) * self.bs).min(self.bytes.len())
    }

    /// Apply a write.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        self.bytes[off..off + data.len()].copy_from_slice(data);
        for b in off / self.bs..(off + data.len()).div_ceil(self.bs) {
            self.kinds[b] = Kind::Data;
        }
    }

    /// Apply a write_zeroes or trim: whole blocks become zero blocks, partial ones
    /// get zeros written.
    pub fn zero(&mut self, off: usize, len: usize) {
        self.bytes[off..off + len].fill(0);
        for b in off / self.bs..(off + len).div_ceil(self.bs) {
            let r = self.block_range(b);
            // Zeroing part of a block leaves its kind: data stays data, and a block
            // that reads as zeros is left as it was.
            if off <= r.start && r.end <= off + len {
                self.kinds[b] = Kind::Zero;
            }
        }
    }

    pub fn inputs(&self) -> Vec<BlockInput> {
        (0..self.blocks())
            .map(|b| match self.kinds[b] {
                Kind::Unwritten => BlockInput::Unwritten,
                Kind::Zero => BlockInput::Zero,
                Kind::Data => BlockInput::Data(self.bytes[self.block_range(b)].to_vec()),
            })
            .collect()
    }
}

/// xorshift64*: small, deterministic, good enough for test data.
#[derive(Clone)]
pub struct Prng(pub u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

pub fn new_store(dir: &Path) -> Arc<Store> {
    Arc::new(Store::init(&dir.join("store")).unwrap())
}

pub fn target(image: &str, expected: Option<VersionId>) -> CommitTarget {
    CommitTarget {
        image: image.into(),
        branch: "main".into(),
        expected,
        create_image: expected.is_none(),
        parents: Vec::new(),
        author: "test".into(),
        message: "test".into(),
    }
}

/// Import `model` as a new version on `image`'s main branch.
pub fn import(store: &Store, image: &str, model: &Model) -> (VersionId, Version) {
    let mut s = WriteSession::begin(store, "test import").unwrap();
    let tip = s.pin_branch(image, "main").unwrap();
    let mut d = s
        .new_version(model.bytes.len() as u64, model.bs as u32)
        .unwrap();
    s.add_blocks(&mut d, model.inputs()).unwrap();
    let mut t = target(image, tip);
    t.parents = tip.into_iter().collect();
    let (id, v, _) = s.commit(d, &t).unwrap();
    (id, v)
}

/// A random model of `blocks` blocks plus `tail` bytes: runs of unwritten, zero, data
/// and repeated data blocks.
pub fn random_model(rng: &mut Prng, bs: usize, blocks: usize, tail: usize) -> Model {
    let n = blocks + usize::from(tail > 0);
    let size = blocks * bs + tail;
    let mut m = Model {
        bs,
        bytes: vec![0; size],
        kinds: vec![Kind::Unwritten; n],
    };
    let repeated = rng.bytes(bs);
    let mut b = 0;
    while b < n {
        // Mostly short runs, sometimes long ones (whole uniform leaves).
        let run = if rng.below(6) == 0 {
            200 + rng.below(400) as usize
        } else {
            1 + rng.below(40) as usize
        };
        let kind = rng.below(4);
        for x in b..(b + run).min(n) {
            let r = m.block_range(x);
            match kind {
                0 => m.kinds[x] = Kind::Unwritten,
                1 => m.kinds[x] = Kind::Zero,
                2 => {
                    m.kinds[x] = Kind::Data;
                    rng.fill(&mut m.bytes[r]);
                }
                _ => {
                    m.kinds[x] = Kind::Data;
                    let len = r.len();
                    m.bytes[r].copy_from_slice(&repeated[..len]);
                }
            }
        }
        b += run;
    }
    m
}

pub fn read_all(d: &dyn Disk) -> Vec<u8> {
    let mut buf = vec![0u8; d.size() as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

/// Check `extents(off, len)` against the expected content: they cover a prefix of the
/// range, in order, and every range reported as zero reads as zeros.
pub fn check_extents(d: &dyn Disk, expected: &[u8], off: u64, len: u64) {
    let ext = d.extents(off, len).unwrap();
    if len == 0 {
        return;
    }
    assert!(!ext.is_empty(), "no extents for {len} bytes at {off}");
    let mut pos = off;
    for e in &ext {
        assert!(e.len > 0);
        assert!(pos + e.len <= off + len, "extents run past the range");
        if e.zero {
            let r = &expected[pos as usize..(pos + e.len) as usize];
            assert!(
                r.iter().all(|&x| x == 0),
                "extent at {pos} (+{}) reported zero but is not",
                e.len
            );
        }
        pos += e.len;
    }
}
