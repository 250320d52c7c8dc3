//! The block cache of served versions: hits read the bytes the store holds, each data
//! block is decoded and written once however many readers want it, corrupt chunks are
//! never cached, zero blocks never touch the cache, and sessions over one base share
//! it.

mod common;

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use common::*;
use strata_block::{BlockCacheConfig, Disk, SessionDisk, VersionDisk, VersionDisks};
use strata_store::{Entry, Store, VersionId};

/// Cache everything, however full the test machine's disk is.
fn always() -> BlockCacheConfig {
    BlockCacheConfig {
        enabled: true,
        min_free_bytes: Some(0),
    }
}

/// `n` blocks of `bs` plus a short tail block of `tail` bytes: unique random data,
/// except every 5th block zero and every 7th unwritten.
fn mixed_model(seed: u64, bs: usize, n: usize, tail: usize) -> Model {
    let mut rng = Prng::new(seed);
    let blocks = n + usize::from(tail > 0);
    let mut m = Model {
        bs,
        bytes: vec![0; n * bs + tail],
        kinds: vec![Kind::Data; blocks],
    };
    for b in 0..blocks {
        let r = m.block_range(b);
        if b % 7 == 3 {
            m.kinds[b] = Kind::Unwritten;
        } else if b % 5 == 1 {
            m.kinds[b] = Kind::Zero;
        } else {
            rng.fill(&mut m.bytes[r]);
        }
    }
    m
}

fn data_blocks(disk: &VersionDisk) -> u64 {
    (0..disk.blocks())
        .filter(|&b| matches!(disk.entry(b).unwrap(), Entry::Present(_)))
        .count() as u64
}

fn setup(
    seed: u64,
    bs: usize,
    n: usize,
    tail: usize,
) -> (tempfile::TempDir, Arc<Store>, VersionId, Model) {
    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let model = mixed_model(seed, bs, n, tail);
    let (id, _) = import(&store, "img", &model);
    (tmp, store, id, model)
}

#[test]
fn hits_read_the_same_bytes_as_the_store() {
    let (_tmp, store, id, model) = setup(1, 4096, 300, 1000);
    let disks = VersionDisks::with_config(store.clone(), always());
    let disk = disks.get(id).unwrap();
    let data = data_blocks(&disk);
    assert!(data > 100);

    // Cold: every data block is decoded and cached once; zero blocks are not.
    assert_eq!(read_all(&*disk), model.bytes);
    let s = disk.cache_stats();
    assert_eq!(s.fills, data);
    assert_eq!(s.cached_blocks, data);
    assert_eq!(s.hits, 0);
    let data_bytes: u64 = (0..model.blocks())
        .filter(|&b| model.kinds[b] == Kind::Data)
        .map(|b| model.block_range(b).len() as u64)
        .sum();
    assert_eq!(s.filled_bytes, data_bytes);

    // Warm: unaligned reads of every size come from the cache and match the model.
    let mut rng = Prng::new(9);
    for _ in 0..500 {
        let off = rng.below(model.bytes.len() as u64);
        let len = rng.below((model.bytes.len() as u64 - off).min(5 * 4096) + 1);
        let mut buf = vec![0xAAu8; len as usize];
        disk.read_at(&mut buf, off).unwrap();
        assert_eq!(buf, &model.bytes[off as usize..(off + len) as usize]);
        // What the page cache holds reads at once, and the same.
        let mut now = vec![0x55u8; len as usize];
        if let Some(r) = disk.try_read_at(&mut now, off) {
            r.unwrap();
            assert_eq!(now, buf);
        }
        check_extents(&*disk, &model.bytes, off, len);
    }
    let s = disk.cache_stats();
    assert_eq!(s.fills, data, "nothing decoded twice");
    assert!(s.hits > 0);
    assert_eq!(s.uncached_reads, 0);
    assert!(s.filling);
    // Extents come from the state map now, and agree with the tree's.
    assert_eq!(
        disk.known_block_runs(0, disk.blocks()).unwrap(),
        VersionDisk::open(store.clone(), id)
            .unwrap()
            .block_runs(0, disk.blocks())
            .unwrap()
    );
    // The cache file has no name: the directory stays empty.
    let cache = store.root().join("cache");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
}

#[test]
fn reads_before_a_block_is_cached_do_not_answer_at_once() {
    let (_tmp, store, id, model) = setup(2, 4096, 40, 0);
    let disk = VersionDisks::with_config(store, always()).get(id).unwrap();
    let mut buf = vec![0u8; 4096];
    // Block 0 holds data and was never read: it needs decoding.
    assert!(disk.try_read_at(&mut buf, 0).is_none());
    assert!(disk.try_extents(0, 4096).is_none());
    disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, &model.bytes[..4096]);
    // Out of range is an error either way.
    let e = disk
        .try_read_at(&mut buf, disk.size() - 1)
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[test]
fn concurrent_readers_decode_each_block_once() {
    let (_tmp, store, id, model) = setup(3, 4096, 400, 123);
    let disk = VersionDisks::with_config(store, always()).get(id).unwrap();
    let model = Arc::new(model);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (disk, model) = (disk.clone(), model.clone());
            std::thread::spawn(move || {
                let mut rng = Prng::new(100 + t);
                let mut seen = HashSet::new();
                for i in 0..400 {
                    // Half the time all threads read the same few blocks at once.
                    let off = if i % 2 == 0 {
                        (i as u64 / 2 % 8) * 4096 + rng.below(100)
                    } else {
                        rng.below(model.bytes.len() as u64)
                    };
                    let len = rng.below((model.bytes.len() as u64 - off).min(40_000) + 1);
                    let mut buf = vec![0u8; len as usize];
                    disk.read_at(&mut buf, off).unwrap();
                    assert_eq!(buf, &model.bytes[off as usize..(off + len) as usize]);
                    for b in off / 4096..(off + len).div_ceil(4096) {
                        seen.insert(b);
                    }
                }
                seen
            })
        })
        .collect();
    let mut read: HashSet<u64> = HashSet::new();
    for t in threads {
        read.extend(t.join().unwrap());
    }
    let read_data = read
        .iter()
        .filter(|&&b| matches!(disk.entry(b).unwrap(), Entry::Present(_)))
        .count() as u64;
    let s = disk.cache_stats();
    assert_eq!(
        s.fills, read_data,
        "every data block read was decoded exactly once"
    );
    assert_eq!(s.cached_blocks, read_data);
    assert_eq!(s.uncached_reads, 0);
}

#[test]
fn a_corrupt_chunk_is_an_error_and_never_cached() {
    let (_tmp, store, id, model) = setup(4, 4096, 20, 0);
    let disk = VersionDisks::with_config(store.clone(), always())
        .get(id)
        .unwrap();
    // Block 2 holds unique data: damage the last byte of its payload in the pack.
    let Entry::Present(chunk) = disk.entry(2).unwrap() else {
        panic!("block 2 holds data")
    };
    let loc = store.locate(&chunk).unwrap().unwrap();
    let path = store.backend().describe(&loc.pack);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = loc.entry.offset + loc.entry.span() - 1;
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    drop(f);

    for _ in 0..2 {
        let mut buf = vec![0u8; 4096];
        assert!(disk.read_at(&mut buf, 2 * 4096).is_err());
        assert!(disk.try_read_at(&mut buf, 2 * 4096).is_none());
    }
    // A read spanning it fails whole; its neighbours still read and cache.
    let mut buf = vec![0u8; 3 * 4096];
    assert!(disk.read_at(&mut buf, 4096).is_err());
    let mut one = vec![0u8; 4096];
    disk.read_at(&mut one, 0).unwrap();
    assert_eq!(one, &model.bytes[..4096]);
    let s = disk.cache_stats();
    assert_eq!(s.fills, 1, "only block 0 was cached");
    // Nothing another reader waits for is left claimed: a second thread gets the
    // same error, not a hang.
    let d2 = disk.clone();
    let r = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        d2.read_at(&mut buf, 2 * 4096).is_err()
    })
    .join()
    .unwrap();
    assert!(r);
    let mut buf = vec![0u8; 4096];
    assert!(
        disk.try_read_at(&mut buf, 2 * 4096).is_none(),
        "block 2 was cached"
    );
}

#[test]
fn zero_and_unwritten_blocks_never_touch_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let bs = 8192;
    let mut model = Model {
        bs,
        bytes: vec![0; 600 * bs],
        kinds: vec![Kind::Unwritten; 600],
    };
    for b in 100..400 {
        model.kinds[b] = Kind::Zero;
    }
    // Data that is all zeros becomes a zero entry too.
    model.kinds[450] = Kind::Data;
    let (id, _) = import(&store, "empty", &model);
    let disk = VersionDisks::with_config(store.clone(), always())
        .get(id)
        .unwrap();
    assert_eq!(read_all(&*disk), model.bytes);
    let mut buf = vec![1u8; 100_000];
    assert!(disk.try_read_at(&mut buf, 12345).unwrap().is_ok());
    assert!(buf.iter().all(|&x| x == 0));
    let s = disk.cache_stats();
    assert_eq!((s.fills, s.filled_bytes, s.cached_blocks), (0, 0, 0));
    // Not even a cache directory was made: no file was ever needed.
    assert!(!store.root().join("cache").exists());
    let ext = disk.try_extents(0, disk.size()).unwrap().unwrap();
    assert!(ext.iter().all(|e| e.hole && e.zero));
}

#[test]
fn a_disabled_or_full_cache_still_reads_right() {
    let (_tmp, store, id, model) = setup(5, 4096, 100, 10);
    for config in [
        BlockCacheConfig {
            enabled: false,
            min_free_bytes: None,
        },
        BlockCacheConfig {
            enabled: true,
            min_free_bytes: Some(u64::MAX / 4),
        },
    ] {
        let disk = VersionDisks::with_config(store.clone(), config)
            .get(id)
            .unwrap();
        assert_eq!(read_all(&*disk), model.bytes);
        assert_eq!(read_all(&*disk), model.bytes);
        let s = disk.cache_stats();
        assert_eq!(s.fills, 0);
        assert!(!s.filling);
        assert!(s.uncached_reads > 0);
        let mut buf = vec![0u8; 4096];
        assert!(disk.try_read_at(&mut buf, 0).is_none());
    }
}

#[test]
fn sessions_over_one_base_share_its_disk_and_cache() {
    let (tmp, store, id, model) = setup(6, 4096, 200, 0);
    let disks = VersionDisks::with_config(store.clone(), always());
    for name in ["vm1", "vm2"] {
        drop(SessionDisk::create(&tmp.path().join(name), store.clone(), id).unwrap());
    }
    let a = SessionDisk::open_shared(&tmp.path().join("vm1"), &disks).unwrap();
    let b = SessionDisk::open_shared(&tmp.path().join("vm2"), &disks).unwrap();
    let base = disks.get(id).unwrap();
    assert!(Arc::ptr_eq(&a.base_disk(), &b.base_disk()));
    assert!(Arc::ptr_eq(&a.base_disk(), &base));

    // vm1 reads everything: every data block is decoded once, into the shared cache.
    assert_eq!(read_all(&a), model.bytes);
    let data = data_blocks(&base);
    assert_eq!(base.cache_stats().fills, data);
    // vm2 reads it all from the cache.
    let hits = base.cache_stats().hits;
    assert_eq!(read_all(&b), model.bytes);
    let s = base.cache_stats();
    assert_eq!(s.fills, data);
    assert!(s.hits >= hits + data);

    // A write to vm1 (partial: read-modify-write of a cached base block) is vm1's
    // alone; reads race it on another thread and see the old or the new bytes.
    let mut expected_a = model.bytes.clone();
    let a = Arc::new(a);
    let reader = {
        let a = a.clone();
        let old = model.bytes[4096..8192].to_vec();
        std::thread::spawn(move || {
            let mut seen_new = false;
            for _ in 0..2000 {
                let mut buf = vec![0u8; 4096];
                match a.try_read_at(&mut buf, 4096) {
                    Some(r) => r.unwrap(),
                    None => a.read_at(&mut buf, 4096).unwrap(),
                }
                let new = buf[100..200].iter().all(|&x| x == 0xEE);
                assert!(new || buf == old, "a read saw a half-written block");
                if new {
                    seen_new = true;
                } else {
                    assert!(!seen_new, "a read went back to the old bytes");
                }
            }
        })
    };
    a.write_at(&[0xEE; 100], 4096 + 100, false).unwrap();
    expected_a[4096 + 100..4096 + 200].fill(0xEE);
    reader.join().unwrap();
    assert_eq!(read_all(&*a), expected_a);
    assert_eq!(read_all(&b), model.bytes);
    let mut buf = vec![0u8; 4096];
    // (None where the file system cannot read without waiting: RWF_NOWAIT.)
    if let Some(r) = a.try_read_at(&mut buf, 4096) {
        r.unwrap();
        assert_eq!(buf, &expected_a[4096..8192]);
    }

    // A commit of vm1 moves it to a new base; vm2 keeps the old one.
    let r = a.commit(&target("img", Some(id))).unwrap();
    assert!(Arc::ptr_eq(&a.base_disk(), &disks.get(r.version).unwrap()));
    assert!(Arc::ptr_eq(&b.base_disk(), &base));
    assert_eq!(read_all(&*a), expected_a);

    // Closed everywhere, a version's disk (and cache) goes: the next user gets a
    // fresh one.
    drop((a, b, base));
    let again = disks.get(id).unwrap();
    assert_eq!(again.cache_stats().fills, 0);
}

#[test]
fn a_cache_hint_prefetches_into_the_block_cache() {
    let (tmp, store, id, model) = setup(7, 4096, 2000, 0);
    let disks = VersionDisks::with_config(store.clone(), always());
    drop(SessionDisk::create(&tmp.path().join("vm"), store.clone(), id).unwrap());
    let s = SessionDisk::open_shared(&tmp.path().join("vm"), &disks).unwrap();
    let base = s.base_disk();
    let data = data_blocks(&base);
    // NBD_CMD_CACHE over the whole disk: every data block decoded once, nothing read
    // back yet.
    s.cache(0, s.size()).unwrap();
    let st = base.cache_stats();
    assert_eq!((st.fills, st.cached_blocks), (data, data));
    s.cache(0, s.size()).unwrap();
    assert_eq!(base.cache_stats().fills, data);
    assert_eq!(read_all(&s), model.bytes);
    assert_eq!(base.cache_stats().fills, data);
}
