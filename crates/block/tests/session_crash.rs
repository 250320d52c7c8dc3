//! Crash recovery: a child process (this test binary, re-run with an environment
//! variable) writes, zeroes, flushes and commits through a SessionDisk and reports on
//! a pipe which operations it started and which were made durable; the parent kills it
//! with SIGKILL at a random moment, reopens the session and checks that it opens and
//! that every page reads as its state after some operation no older than the last one
//! known durable for it (nothing flushed is lost, nothing reads as garbage). Then the
//! next child continues from what survived, many times over.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use strata_block::session::failpoint;
use strata_block::{Disk, SessionDisk};
use strata_store::{RefKind, Store};

const BS: usize = 16384;
const BLOCKS: usize = 48;
const TAIL: usize = 5000;
const PAGE: usize = 4096;
const RUNS: u64 = 24;
const OPS_PER_RUN: u64 = 3000;
const CHILD_ENV: &str = "STRATA_BLOCK_CRASH_CHILD";
/// Runs with a seed of `FAILPOINT_SEEDS + step` die at that step of the commit that is
/// their operation number `FAILPOINT_OPS` (see `strata_block::session::failpoint`).
const FAILPOINT_SEEDS: u64 = 1 << 32;
const FAILPOINT_OPS: u64 = 40;
const STEPS: u32 = 6;

fn abort_step(seed: u64) -> u32 {
    seed.checked_sub(FAILPOINT_SEEDS).map_or(0, |s| s as u32)
}

#[derive(Debug)]
enum Op {
    Write {
        off: usize,
        data: Vec<u8>,
        fua: bool,
    },
    Zero {
        off: usize,
        len: usize,
        trim: bool,
        fua: bool,
    },
    Flush,
    Commit,
}

/// The operations of the run with `seed` (deterministic, so the parent knows what the
/// child did from the numbers it reported). One run in three commits often, so that
/// kills land inside commits.
fn ops(seed: u64, size: usize) -> impl Iterator<Item = Op> {
    let mut rng = Prng::new(seed);
    let abort_at = abort_step(seed);
    let commit_heavy = seed.is_multiple_of(3) && abort_at == 0;
    (0..OPS_PER_RUN).map(move |i| {
        if abort_at > 0 && i == FAILPOINT_OPS {
            return Op::Commit;
        }
        let mut kind = rng.below(100);
        if commit_heavy && kind >= 60 {
            kind = 99;
        }
        if abort_at > 0 && kind >= 95 {
            kind = 90; // a flush: the only commit is the one that dies
        }
        let len = match rng.below(4) {
            0 => 1 + rng.below(600) as usize,
            1 => 512 * (1 + rng.below(8) as usize),
            2 => PAGE * (1 + rng.below(6) as usize),
            _ => 1 + rng.below(40_000) as usize,
        };
        let mut off = rng.below(size as u64) as usize;
        if rng.below(2) == 0 {
            off &= !511;
        }
        let len = len.min(size - off);
        let fua = rng.below(20) == 0;
        match kind {
            0..=69 => Op::Write {
                off,
                data: rng.bytes(len),
                fua,
            },
            70..=83 => Op::Zero {
                off,
                len,
                trim: rng.below(2) == 0,
                fua,
            },
            84..=94 => Op::Flush,
            _ => Op::Commit,
        }
    })
}

/// The child: run the operations, reporting `@W i` before operation `i`, `@F i` once a
/// flush (or commit) `i` has returned, `@A i` once a FUA operation `i` has returned.
#[test]
fn crash_child_process() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return; // not a child: nothing to do
    };
    let mut parts = spec.split('|');
    let (store_dir, dir, seed) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap().parse::<u64>().unwrap(),
    );
    let store = Arc::new(Store::open(Path::new(store_dir)).unwrap());
    let disk = SessionDisk::open(Path::new(dir), store.clone()).unwrap();
    let size = disk.size() as usize;
    for (i, op) in ops(seed, size).enumerate() {
        println!("@W {i}");
        match op {
            Op::Write { off, data, fua } => {
                disk.write_at(&data, off as u64, fua).unwrap();
                if fua {
                    println!("@A {i}");
                }
            }
            Op::Zero {
                off,
                len,
                trim,
                fua,
            } => {
                if trim {
                    disk.trim(off as u64, len as u64, fua).unwrap();
                } else {
                    disk.write_zeroes(off as u64, len as u64, true, fua)
                        .unwrap();
                }
                if fua {
                    println!("@A {i}");
                }
            }
            Op::Flush => {
                disk.flush().unwrap();
                println!("@F {i}");
            }
            Op::Commit => {
                if i as u64 == FAILPOINT_OPS {
                    failpoint::ABORT_AT.store(abort_step(seed), Ordering::Relaxed);
                }
                let tip = store.get_ref("img", RefKind::Branch, "main").unwrap();
                disk.commit(&target("img", tip)).unwrap();
                println!("@F {i}");
            }
        }
    }
    println!("@END");
}

/// Apply `op` to `bytes`; returns the byte range it touched.
fn apply(bytes: &mut [u8], op: &Op) -> Option<(usize, usize)> {
    match op {
        Op::Write { off, data, .. } => {
            bytes[*off..off + data.len()].copy_from_slice(data);
            Some((*off, data.len()))
        }
        Op::Zero { off, len, .. } => {
            bytes[*off..off + len].fill(0);
            Some((*off, *len))
        }
        Op::Flush | Op::Commit => None,
    }
}

/// What a child reported before it died.
struct Report {
    /// The last operation started.
    started: i64,
    /// The last flush or commit that returned (everything up to it is durable).
    durable: i64,
    /// FUA operations that returned.
    fua: Vec<i64>,
    status: ExitStatus,
    ended: bool,
}

/// Run a child with `seed`, killing it after `kill_after` lines of its report (never,
/// if `None`), and collect the report.
fn run_child(store: &Store, dir: &Path, seed: u64, kill_after: Option<u64>) -> Report {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{}|{}|{seed}", store.root().display(), dir.display()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut r = Report {
        started: -1,
        durable: -1,
        fua: Vec::new(),
        status: ExitStatus::from_raw(0),
        ended: false,
    };
    for (n, line) in lines.enumerate() {
        let line = line.unwrap();
        if Some(n as u64) == kill_after {
            child.kill().unwrap(); // SIGKILL; lines already in the pipe still come
        }
        let Some(at) = line.find('@') else { continue };
        let mut f = line[at + 1..].split_whitespace();
        let tag = f.next().unwrap();
        let i = f.next().map(|x| x.parse::<i64>().unwrap());
        match (tag, i) {
            ("W", Some(i)) => r.started = i,
            ("F", Some(i)) => r.durable = i,
            ("A", Some(i)) => r.fua.push(i),
            ("END", None) => r.ended = true,
            _ => panic!("unexpected line {line:?}"),
        }
    }
    r.status = child.wait().unwrap();
    r
}

/// Reopen the session after child `seed` died with report `r`, whose content was
/// `before` when it started; check every page against what the child did, and return
/// the content found.
fn check_recovery(store: &Arc<Store>, dir: &Path, seed: u64, before: &[u8], r: &Report) -> Vec<u8> {
    let size = before.len();
    let pages = size.div_ceil(PAGE);
    let page = |p: usize| p * PAGE..((p + 1) * PAGE).min(size);
    // Per page: its states after each operation that touched it.
    let mut states: Vec<Vec<(i64, Vec<u8>)>> = (0..pages)
        .map(|p| vec![(-1, before[page(p)].to_vec())])
        .collect();
    let mut lower = vec![r.durable; pages];
    let mut bytes = before.to_vec();
    for (i, op) in ops(seed, size).enumerate().take((r.started + 1) as usize) {
        let i = i as i64;
        if let Some((off, len)) = apply(&mut bytes, &op) {
            for p in off / PAGE..(off + len).div_ceil(PAGE) {
                states[p].push((i, bytes[page(p)].to_vec()));
                if r.fua.contains(&i) {
                    lower[p] = lower[p].max(i);
                }
            }
        }
    }
    let disk = SessionDisk::open(dir, store.clone())
        .unwrap_or_else(|e| panic!("seed {seed}: reopening after the crash: {e}"));
    let got = read_all(&disk);
    for p in 0..pages {
        let st = &states[p];
        // The state as of the last durable operation, or any later one.
        let first = st.iter().rposition(|(i, _)| *i <= lower[p]).unwrap();
        assert!(
            st[first..].iter().any(|(_, s)| s[..] == got[page(p)]),
            "seed {seed}, page {p}: content matches no state since operation {} \
             (operations 0..={} started, last durable {})",
            lower[p],
            r.started,
            r.durable
        );
    }
    got
}

fn setup(tmp: &Path) -> (Arc<Store>, std::path::PathBuf, Vec<u8>) {
    let store = new_store(tmp);
    let model = random_model(&mut Prng::new(77), BS, BLOCKS, TAIL);
    let (base, _) = import(&store, "img", &model);
    let dir = tmp.join("session");
    drop(SessionDisk::create(&dir, store.clone(), base).unwrap());
    (store, dir, model.bytes)
}

#[test]
fn killed_writers_lose_nothing_flushed_and_never_leave_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, dir, mut cur) = setup(tmp.path());
    let mut rng = Prng::new(78);
    let (mut killed, mut in_commit) = (0, 0);
    for run in 0..RUNS {
        let seed = 1000 + run;
        let r = run_child(&store, &dir, seed, Some(1 + rng.below(300)));
        if r.status.signal() == Some(SIGKILL) {
            killed += 1;
        } else {
            assert!(
                r.ended && r.status.success(),
                "run {run}: the child failed by itself: {:?}",
                r.status
            );
        }
        if r.started >= 0 && r.durable < r.started {
            let last = ops(seed, cur.len()).nth(r.started as usize).unwrap();
            in_commit += usize::from(matches!(last, Op::Commit));
        }
        cur = check_recovery(&store, &dir, seed, &cur, &r);
    }
    eprintln!("{killed} of {RUNS} children killed, {in_commit} of them inside a commit");
    assert!(
        killed > RUNS / 2,
        "only {killed} of {RUNS} children were killed"
    );
}

const SIGKILL: i32 = 9;

#[test]
fn a_crash_at_any_step_of_a_commit_leaves_the_old_or_the_new_state() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, dir, mut cur) = setup(tmp.path());
    for step in 1..=STEPS {
        let seed = FAILPOINT_SEEDS + step as u64;
        let old_base = SessionDisk::open(&dir, store.clone()).unwrap().base();
        let r = run_child(&store, &dir, seed, None);
        assert_eq!(
            r.status.signal(),
            Some(SIGKILL),
            "step {step}: {:?}",
            r.status
        );
        assert_eq!(r.started, FAILPOINT_OPS as i64);
        cur = check_recovery(&store, &dir, seed, &cur, &r);
        let disk = SessionDisk::open(&dir, store.clone()).unwrap();
        let tip = store
            .get_ref("img", RefKind::Branch, "main")
            .unwrap()
            .unwrap();
        assert_ne!(tip, old_base, "step {step}: the version was not committed");
        if step >= 5 {
            // Switched: the new version is the base and the delta is empty.
            assert_eq!(disk.base(), tip, "step {step}");
            assert_eq!(disk.stats().delta_blocks, 0, "step {step}");
            let v = strata_block::VersionDisk::open(store.clone(), tip).unwrap();
            assert_eq!(read_all(&v), cur, "step {step}");
        } else {
            // Killed after the branch moved but before the session switched: reopening
            // adopts the published version as the base and keeps the whole delta.
            assert_eq!(disk.base(), tip, "step {step}: the commit was not adopted");
            assert!(disk.stats().delta_blocks > 0, "step {step}");
            assert_eq!(read_all(&disk), cur, "step {step}");
        }
        // Either way the session goes on: commit it (against the branch's real tip).
        let c = disk.commit(&target("img", Some(tip))).unwrap();
        let v = strata_block::VersionDisk::open(store.clone(), c.version).unwrap();
        assert_eq!(read_all(&v), cur, "step {step}");
    }
}
