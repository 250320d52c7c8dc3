//! SessionDisk against an in-memory model: random writes (unaligned, cross-block),
//! zeroing, trims, flushes, commits, reopens and resets; after every step random reads
//! must equal the model, and every commit must produce exactly the version a fresh
//! import of the model would (same tree root, same counts).

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use strata_block::{Disk, SessionDisk, VersionDisk};

#[derive(Clone, Debug)]
enum Op {
    Write {
        at: u32,
        len: usize,
        aligned: bool,
        seed: u64,
        fua: bool,
    },
    Zero {
        at: u32,
        len: usize,
        aligned: bool,
        trim: bool,
        fua: bool,
    },
    Flush,
    Commit,
    Reopen,
    Reset,
}

#[derive(Clone, Debug)]
struct Step {
    op: Op,
    read_at: u32,
    read_len: usize,
}

fn len_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        1usize..600,
        (1usize..4).prop_map(|k| k * 512),
        (1usize..4).prop_map(|k| k * 4096),
        1usize..20_000,
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (any::<u32>(), len_strategy(), any::<bool>(), any::<u64>(), prop::bool::weighted(0.1))
            .prop_map(|(at, len, aligned, seed, fua)| Op::Write { at, len, aligned, seed, fua }),
        3 => (any::<u32>(), len_strategy(), any::<bool>(), any::<bool>(), prop::bool::weighted(0.1))
            .prop_map(|(at, len, aligned, trim, fua)| Op::Zero { at, len, aligned, trim, fua }),
        2 => Just(Op::Flush),
        2 => Just(Op::Commit),
        1 => Just(Op::Reopen),
        1 => Just(Op::Reset),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    (op_strategy(), any::<u32>(), 0usize..30_000).prop_map(|(op, read_at, read_len)| Step {
        op,
        read_at,
        read_len,
    })
}

/// A range of at most `len` bytes at a position chosen by `at`, inside `size`.
fn range(size: usize, at: u32, len: usize, aligned: bool) -> (usize, usize) {
    let mut off = ((at as u64 * size as u64) >> 32) as usize;
    if aligned {
        off &= !511;
    }
    let len = len.min(size - off);
    (off, len)
}

fn run(seed: u64, bs: usize, blocks: usize, tail: usize, steps: Vec<Step>) {
    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let mut rng = Prng::new(seed);
    let mut model = random_model(&mut rng, bs, blocks, tail);
    let (base_id, _) = import(&store, "img", &model);
    let dir = tmp.path().join("session");
    let mut disk = Some(SessionDisk::create(&dir, store.clone(), base_id).unwrap());
    let mut base_model = model.clone();
    let mut tip = base_id;
    // The delta as the model sees it: block -> recorded as zero.
    let mut delta: BTreeMap<usize, bool> = BTreeMap::new();
    let size = model.bytes.len();
    let mut refs = 0;
    for step in steps {
        let d = disk.as_ref().unwrap();
        match step.op {
            Op::Write {
                at,
                len,
                aligned,
                seed,
                fua,
            } => {
                let (off, len) = range(size, at, len, aligned);
                let data = Prng::new(seed).bytes(len);
                d.write_at(&data, off as u64, fua).unwrap();
                model.write(off, &data);
                for b in off / bs..(off + len).div_ceil(bs) {
                    delta.insert(b, false);
                }
            }
            Op::Zero {
                at,
                len,
                aligned,
                trim,
                fua,
            } => {
                let (off, len) = range(size, at, len, aligned);
                if trim {
                    d.trim(off as u64, len as u64, fua).unwrap();
                } else {
                    d.write_zeroes(off as u64, len as u64, false, fua).unwrap();
                }
                // What the session reads as zero before the op: recorded zero in the
                // delta, or untouched and not stored data in the base (all-zero data
                // is stored as a zero entry). Zeroing part of such a block is a no-op.
                let touched: Vec<(usize, bool)> = (off / bs..(off + len).div_ceil(bs))
                    .map(|b| {
                        let reads_zero = match delta.get(&b) {
                            Some(z) => *z,
                            None => {
                                base_model.kinds[b] != Kind::Data
                                    || base_model.bytes[base_model.block_range(b)]
                                        .iter()
                                        .all(|&x| x == 0)
                            }
                        };
                        (b, reads_zero)
                    })
                    .collect();
                model.zero(off, len);
                for (b, reads_zero) in touched {
                    let r = model.block_range(b);
                    let whole = off <= r.start && r.end <= off + len;
                    if whole || !reads_zero {
                        delta.insert(b, model.kinds[b] == Kind::Zero);
                    }
                }
            }
            Op::Flush => d.flush().unwrap(),
            Op::Commit => {
                let before = d.base();
                let r = d.commit(&target("img", Some(tip))).unwrap();
                assert_eq!(r.parent, before);
                assert_eq!(d.base(), r.version);
                assert_eq!(r.committed_blocks, delta.len() as u64);
                assert_eq!(r.remaining_blocks, 0);
                assert_eq!(r.record.parents, vec![before.to_hex()]);
                tip = r.version;
                // The version reads as the model...
                let v = VersionDisk::open(store.clone(), r.version).unwrap();
                assert_eq!(read_all(&v), model.bytes);
                // ...and is exactly what importing the model would make.
                refs += 1;
                let (_, reference) = import(&store, &format!("ref{refs}"), &model);
                assert_eq!(
                    r.record.root, reference.root,
                    "tree differs from a fresh import"
                );
                assert_eq!(r.record.depth, reference.depth);
                assert_eq!(r.record.data_blocks, reference.data_blocks);
                assert_eq!(r.record.zero_blocks, reference.zero_blocks);
                assert_eq!(r.record.data_bytes, reference.data_bytes);
                base_model = model.clone();
                delta.clear();
            }
            Op::Reopen => {
                drop(disk.take());
                disk = Some(SessionDisk::open(&dir, store.clone()).unwrap());
            }
            Op::Reset => {
                d.reset().unwrap();
                model = base_model.clone();
                delta.clear();
            }
        }
        let d = disk.as_ref().unwrap();
        let st = d.stats();
        assert_eq!(st.delta_blocks, delta.len() as u64);
        assert_eq!(
            st.zero_blocks,
            delta.values().filter(|z| **z).count() as u64
        );
        assert_eq!(st.base, d.base().to_hex());
        let (off, len) = range(size, step.read_at, step.read_len, false);
        let mut buf = vec![0x55u8; len];
        d.read_at(&mut buf, off as u64).unwrap();
        assert_eq!(buf, &model.bytes[off..off + len], "read of {len} at {off}");
        check_extents(d, &model.bytes, off as u64, len as u64);
    }
    let d = disk.take().unwrap();
    assert_eq!(read_all(&d), model.bytes);
    drop(d);
    // Closing flushed: a reopened session reads the same.
    let d = SessionDisk::open(&dir, store.clone()).unwrap();
    assert_eq!(read_all(&d), model.bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn session_matches_model(
        seed in any::<u64>(),
        bs in prop::sample::select(vec![4096usize, 8192]),
        blocks in 200usize..600,
        tail in prop::sample::select(vec![0usize, 1, 512, 3000]),
        steps in prop::collection::vec(step_strategy(), 1..40),
    ) {
        run(seed, bs, blocks, tail, steps);
    }
}

#[test]
fn a_small_disk_of_one_leaf() {
    // Depth 1: no subtree can be reused whole; every block goes through the leaf.
    let mut rng = Prng::new(3);
    let steps = (0..30)
        .map(|i| Step {
            op: match i % 6 {
                0..=2 => Op::Write {
                    at: rng.next() as u32,
                    len: 1 + rng.below(10_000) as usize,
                    aligned: false,
                    seed: rng.next(),
                    fua: false,
                },
                3 => Op::Zero {
                    at: rng.next() as u32,
                    len: rng.below(10_000) as usize,
                    aligned: false,
                    trim: true,
                    fua: false,
                },
                4 => Op::Commit,
                _ => Op::Reopen,
            },
            read_at: rng.next() as u32,
            read_len: rng.below(20_000) as usize,
        })
        .collect();
    run(11, 4096, 20, 700, steps);
}
