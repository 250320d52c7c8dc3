//! SessionDisk under several threads at once: no lost updates when threads write
//! different parts of the same blocks, acknowledged writes visible to every reader,
//! and commits taken while writers run capture one consistent point in time.
//! (No timing: threads wait for each other's progress through counters.)

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use strata_block::{Disk, SessionDisk, VersionDisk};
use strata_store::VersionId;

const SECTOR: usize = 512;

/// The content of sector `s` after its `seq`-th write.
fn sector_content(s: u64, seq: u64) -> Vec<u8> {
    let mut v = Prng::new(s << 32 | seq).bytes(SECTOR);
    v[..8].copy_from_slice(&s.to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    v
}

/// Which write of sector `s` `got` is: 0 for the base content.
fn sector_seq(s: u64, got: &[u8], base: &[u8]) -> Option<u64> {
    if got == base {
        return Some(0);
    }
    let seq = u64::from_le_bytes(got[8..16].try_into().unwrap());
    (seq > 0 && got == sector_content(s, seq)).then_some(seq)
}

fn wait_for(counters: &[AtomicU64], at_least: u64) {
    while counters
        .iter()
        .any(|c| c.load(Ordering::Acquire) < at_least)
    {
        std::thread::yield_now();
    }
}

#[test]
fn threads_sharing_blocks_lose_no_updates_and_see_acknowledged_writes() {
    const BS: usize = 16384;
    const BLOCKS: usize = 32;
    const THREADS: u64 = 4;
    const WRITES: u64 = 4000;
    const COMMITS: u64 = 10;
    let sectors = (BLOCKS * BS / SECTOR) as u64;
    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let model = random_model(&mut Prng::new(4), BS, BLOCKS, 0);
    let (base, _) = import(&store, "img", &model);
    let disk = Arc::new(SessionDisk::create(&tmp.path().join("s"), store.clone(), base).unwrap());
    let base_bytes = Arc::new(model.bytes.clone());
    // Per sector: the last acknowledged write, and the last one started.
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..sectors).map(|_| AtomicU64::new(0)).collect());
    let issued: Arc<Vec<AtomicU64>> = Arc::new((0..sectors).map(|_| AtomicU64::new(0)).collect());
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));

    // Thread t owns the sectors s with s % THREADS == t: every block is shared by all.
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (disk, acked, issued, progress) = (
                disk.clone(),
                acked.clone(),
                issued.clone(),
                progress.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Prng::new(100 + t);
                for i in 1..=WRITES {
                    // Mostly all threads sweep the blocks in step, so that they meet
                    // in blocks not yet in the delta (read-modify-write); sometimes
                    // anywhere.
                    let k = if i.is_multiple_of(4) {
                        rng.below(sectors / THREADS)
                    } else {
                        i % (sectors / THREADS)
                    };
                    let s = k * THREADS + t;
                    let seq = issued[s as usize].load(Ordering::Relaxed) + 1;
                    issued[s as usize].store(seq, Ordering::Release);
                    let fua = i.is_multiple_of(97);
                    disk.write_at(&sector_content(s, seq), s * SECTOR as u64, fua)
                        .unwrap();
                    acked[s as usize].store(seq, Ordering::Release);
                    if i.is_multiple_of(113) {
                        disk.flush().unwrap();
                    }
                    progress[t as usize].store(i, Ordering::Release);
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let (disk, acked, issued, stop, base_bytes) = (
                disk.clone(),
                acked.clone(),
                issued.clone(),
                stop.clone(),
                base_bytes.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Prng::new(200 + r);
                let mut reads = 0u64;
                while !stop.load(Ordering::Acquire) || reads < 50 {
                    let first = rng.below(sectors);
                    let n = 1 + rng.below(64.min(sectors - first));
                    let before: Vec<u64> = (first..first + n)
                        .map(|s| acked[s as usize].load(Ordering::Acquire))
                        .collect();
                    let mut buf = vec![0u8; n as usize * SECTOR];
                    disk.read_at(&mut buf, first * SECTOR as u64).unwrap();
                    for (i, got) in buf.chunks(SECTOR).enumerate() {
                        let s = first + i as u64;
                        let base = &base_bytes[s as usize * SECTOR..(s as usize + 1) * SECTOR];
                        let seq = sector_seq(s, got, base)
                            .unwrap_or_else(|| panic!("sector {s} holds garbage"));
                        assert!(
                            seq >= before[i],
                            "sector {s}: read {seq}, {} was acknowledged",
                            before[i]
                        );
                        assert!(seq <= issued[s as usize].load(Ordering::Acquire));
                    }
                    reads += 1;
                    if reads.is_multiple_of(16) {
                        // Stats while writes, flushes and commits run (no deadlock).
                        let st = disk.stats();
                        assert!(st.delta_blocks <= BLOCKS as u64);
                        assert_eq!(st.delta_blocks, st.data_blocks + st.zero_blocks);
                    }
                }
            })
        })
        .collect();

    // Commits while everything runs (each empties the delta, so blocks go through
    // read-modify-write again); each must hold, per sector, a write no older than the
    // one acknowledged before it started.
    let mut tip = base;
    for round in 1..=COMMITS {
        wait_for(&progress, round * WRITES / (COMMITS + 1));
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Acquire)).collect();
        let r = disk.commit(&target("img", Some(tip))).unwrap();
        tip = r.version;
        let after: Vec<u64> = issued.iter().map(|a| a.load(Ordering::Acquire)).collect();
        let v = read_all(&VersionDisk::open(store.clone(), r.version).unwrap());
        for (s, got) in v.chunks(SECTOR).enumerate() {
            let base = &base_bytes[s * SECTOR..(s + 1) * SECTOR];
            let seq = sector_seq(s as u64, got, base).expect("committed garbage");
            assert!(before[s] <= seq && seq <= after[s], "sector {s}: {seq}");
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Release);
    for r in readers {
        r.join().unwrap();
    }
    // Every sector holds its last write: no read-modify-write lost another's update.
    let all = read_all(&*disk);
    for (s, got) in all.chunks(SECTOR).enumerate() {
        let last = acked[s].load(Ordering::Acquire);
        let base = &base_bytes[s * SECTOR..(s + 1) * SECTOR];
        assert_eq!(sector_seq(s as u64, got, base), Some(last), "sector {s}");
    }
    let r = disk.commit(&target("img", Some(tip))).unwrap();
    assert_eq!(r.remaining_blocks, 0);
    assert_eq!(read_all(&VersionDisk::open(store, r.version).unwrap()), all);
}

/// Block content for thread `t`'s `seq`-th write, recording which writes of every
/// thread had been acknowledged when it started.
fn seq_block(bs: usize, t: u64, seq: u64, seen: &[u64]) -> Vec<u8> {
    let mut v = Prng::new(t << 40 | seq).bytes(bs);
    v[..8].copy_from_slice(&(t + 1).to_le_bytes());
    v[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, x) in seen.iter().enumerate() {
        v[16 + 8 * i..24 + 8 * i].copy_from_slice(&x.to_le_bytes());
    }
    v
}

#[test]
fn commits_while_writing_capture_one_point_in_time() {
    const BS: usize = 4096;
    const THREADS: usize = 4;
    const K: u64 = 8; // blocks per thread
    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let blocks = THREADS * K as usize;
    let model = Model {
        bs: BS,
        bytes: vec![0; blocks * BS],
        kinds: vec![Kind::Unwritten; blocks],
    };
    let (base, _) = import(&store, "img", &model);
    let disk = Arc::new(SessionDisk::create(&tmp.path().join("s"), store.clone(), base).unwrap());
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    // Thread t writes seq 1, 2, ... to its blocks t*K + (seq - 1) % K, in turn.
    let writers: Vec<_> = (0..THREADS as u64)
        .map(|t| {
            let (disk, acked, started, stop) =
                (disk.clone(), acked.clone(), started.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seq = 0u64;
                while !stop.load(Ordering::Acquire) {
                    seq += 1;
                    started[t as usize].store(seq, Ordering::Release);
                    let seen: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Acquire)).collect();
                    let block = t * K + (seq - 1) % K;
                    disk.write_at(
                        &seq_block(BS, t, seq, &seen),
                        block * BS as u64,
                        seq.is_multiple_of(50),
                    )
                    .unwrap();
                    acked[t as usize].store(seq, Ordering::Release);
                    if seq.is_multiple_of(64) {
                        disk.flush().unwrap();
                    }
                }
                seq
            })
        })
        .collect();

    // Check that `content` is thread prefixes, returns each thread's last write in it.
    let check = |content: &[u8]| -> Vec<u64> {
        let mut last = vec![0u64; THREADS];
        let mut seen_by: Vec<Vec<u64>> = Vec::new();
        for (t, last_t) in last.iter_mut().enumerate() {
            let mut seqs = Vec::new();
            for j in 0..K as usize {
                let b = t * K as usize + j;
                let blk = &content[b * BS..(b + 1) * BS];
                if blk.iter().all(|&x| x == 0) {
                    seqs.push(0);
                    continue;
                }
                let owner = u64::from_le_bytes(blk[..8].try_into().unwrap());
                let seq = u64::from_le_bytes(blk[8..16].try_into().unwrap());
                assert_eq!(owner, t as u64 + 1, "block {b} holds another thread's data");
                let seen: Vec<u64> = (0..THREADS)
                    .map(|i| u64::from_le_bytes(blk[16 + 8 * i..24 + 8 * i].try_into().unwrap()))
                    .collect();
                assert_eq!(
                    blk,
                    seq_block(BS, t as u64, seq, &seen),
                    "block {b} is torn"
                );
                assert_eq!((seq - 1) % K, j as u64, "block {b} holds seq {seq}");
                seen_by.push(seen);
                seqs.push(seq);
            }
            let s = *seqs.iter().max().unwrap();
            // A prefix of the thread's writes: each block holds its latest write <= s.
            for (j, &got) in seqs.iter().enumerate() {
                let want = if s > j as u64 {
                    s - (s - 1 - j as u64) % K
                } else {
                    0
                };
                assert_eq!(
                    got, want,
                    "thread {t} block {j}: not a prefix ending at {s}"
                );
            }
            *last_t = s;
        }
        // Causality: a write in the state implies every write acknowledged before it
        // started is in the state too.
        for seen in seen_by {
            for (u, &x) in seen.iter().enumerate() {
                assert!(
                    x <= last[u],
                    "thread {u}: {x} was acknowledged before a write included, but only {} is in",
                    last[u]
                );
            }
        }
        last
    };

    let mut tip: VersionId = base;
    for round in 1..=6u64 {
        wait_for(&acked, round * 40);
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Acquire)).collect();
        let r = disk.commit(&target("img", Some(tip))).unwrap();
        let after: Vec<u64> = started.iter().map(|a| a.load(Ordering::Acquire)).collect();
        tip = r.version;
        let content = read_all(&VersionDisk::open(store.clone(), r.version).unwrap());
        let last = check(&content);
        for t in 0..THREADS {
            assert!(
                before[t] <= last[t] && last[t] <= after[t],
                "round {round} thread {t}: {} not in [{}, {}]",
                last[t],
                before[t],
                after[t]
            );
        }
    }
    stop.store(true, Ordering::Release);
    let finals: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let content = read_all(&*disk);
    assert_eq!(check(&content), finals);
    let r = disk.commit(&target("img", Some(tip))).unwrap();
    assert_eq!(
        read_all(&VersionDisk::open(store, r.version).unwrap()),
        content
    );
}
