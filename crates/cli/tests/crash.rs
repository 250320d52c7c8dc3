//! Durability under `kill -9` and concurrency, proven with real processes.
//!
//! Every test drives the real `strata` binary. Processes are killed with SIGKILL
//! (`Child::kill`) at seeded-random moments, imports and gcs run side by side, and
//! after every step the store must verify clean and every version that a ref (or
//! history) reaches must export byte-identical to the file it was imported from
//! (compared with `qemu-img compare`).
//!
//! Each step prints what happened (`eprintln!`), so a failure shows the moment of
//! the kill and the tips before and after. Run with `--nocapture` to watch.

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The store's default block size; test images change whole blocks of this size.
const BLOCK: usize = 64 << 10;

// ---------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------

/// xorshift64*: fast, deterministic, good enough to make incompressible data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Never zero; spread small seeds.
        Rng((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlockKind {
    Random,
    Text,
    Zero,
}

fn pick_kind(rng: &mut Rng) -> BlockKind {
    match rng.below(100) {
        0..=54 => BlockKind::Random,
        55..=79 => BlockKind::Text,
        _ => BlockKind::Zero,
    }
}

const WORDS: [&str; 16] = [
    "the ",
    "store ",
    "keeps ",
    "every ",
    "version ",
    "of ",
    "a ",
    "disk ",
    "image ",
    "as ",
    "blocks\n",
    "kernel: ",
    "[ok] ",
    "/usr/lib/",
    "0x7f3a ",
    "mount ",
];

/// Fill `buf` with content of `kind`: incompressible, text-like or zero.
fn fill_block(rng: &mut Rng, kind: BlockKind, buf: &mut [u8]) {
    match kind {
        BlockKind::Zero => buf.fill(0),
        BlockKind::Random => {
            for c in buf.chunks_mut(8) {
                let v = rng.next_u64().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
        }
        BlockKind::Text => {
            let mut i = 0;
            // A per-block line number keeps text blocks distinct from each other.
            let header = format!("log block {:016x}\n", rng.next_u64());
            let h = header.as_bytes();
            let n = h.len().min(buf.len());
            buf[..n].copy_from_slice(&h[..n]);
            i += n;
            while i < buf.len() {
                let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
                let n = w.len().min(buf.len() - i);
                buf[i..i + n].copy_from_slice(&w[..n]);
                i += n;
            }
        }
    }
}

/// Write a raw image of `size` bytes (a multiple of BLOCK) mixing random, text and
/// zero blocks. Zero blocks are left as holes half of the time.
fn make_image(path: &Path, size: u64, seed: u64) {
    let mut rng = Rng::new(seed);
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; BLOCK];
    for b in 0..size / BLOCK as u64 {
        // Block 0 is text, so no random bytes can look like another format's magic.
        let kind = if b == 0 {
            BlockKind::Text
        } else {
            pick_kind(&mut rng)
        };
        if kind == BlockKind::Zero && rng.below(2) == 0 {
            continue; // a hole
        }
        fill_block(&mut rng, kind, &mut buf);
        f.write_all_at(&buf, b * BLOCK as u64).unwrap();
    }
}

/// Copy `src` to `dst`, replacing about `fraction` of its blocks (never block 0)
/// with new content. Returns how many blocks changed.
fn mutate_image(src: &Path, dst: &Path, fraction: f64, seed: u64) -> u64 {
    fs::copy(src, dst).unwrap();
    let size = fs::metadata(dst).unwrap().len();
    let blocks = size / BLOCK as u64;
    let f = fs::OpenOptions::new().write(true).open(dst).unwrap();
    let mut rng = Rng::new(seed ^ 0x5EED);
    let threshold = (fraction * 1_000_000.0) as u64;
    let mut buf = vec![0u8; BLOCK];
    let mut changed = 0;
    for b in 1..blocks {
        if rng.below(1_000_000) < threshold {
            // Mostly new data: mutated blocks should cost the importer real work.
            let kind = match rng.below(10) {
                0..=7 => BlockKind::Random,
                8 => BlockKind::Text,
                _ => BlockKind::Zero,
            };
            fill_block(&mut rng, kind, &mut buf);
            f.write_all_at(&buf, b * BLOCK as u64).unwrap();
            changed += 1;
        }
    }
    changed
}

// ---------------------------------------------------------------------------------
// Running strata
// ---------------------------------------------------------------------------------

fn strata(store: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.env_remove("STRATA_STORE")
        .env_remove("STRATA_LOG")
        .arg("--store")
        .arg(store)
        .arg("--quiet");
    c
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "strata {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run a command that must succeed; returns its stdout.
fn run_ok(store: &Path, args: &[&str]) -> String {
    let out = strata(store).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "command failed:\n{}",
        describe(args, &out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run a command with `--json` that must succeed; returns its JSON document.
fn run_json(store: &Path, args: &[&str]) -> Value {
    let out = strata(store).arg("--json").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "command failed:\n{}",
        describe(args, &out)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}):\n{}", describe(args, &out)))
}

/// Import `file` into `target` (IMAGE or IMAGE:BRANCH); returns the version id.
fn import(store: &Path, file: &Path, target: &str, msg: &str) -> String {
    let v = run_json(
        store,
        &["import", file.to_str().unwrap(), target, "-m", msg],
    );
    v["version"].as_str().unwrap().to_string()
}

/// `strata verify` must exit 0 and say ok; returns the report.
fn verify_ok(store: &Path, when: &str) -> Value {
    let out = strata(store).args(["--json", "verify"]).output().unwrap();
    let text = describe(&["--json", "verify"], &out);
    assert!(out.status.success(), "verify failed {when}:\n{text}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], Value::Bool(true), "verify not ok {when}:\n{text}");
    v["report"].clone()
}

/// After a complete gc with nothing running: nothing unclaimed, no temporary files,
/// no session lock files, and a second gc finds nothing to do.
fn assert_clean_after_gc(store: &Path, when: &str) {
    let report = verify_ok(store, when);
    assert_eq!(
        report["unclaimed_packs"].as_u64(),
        Some(0),
        "unclaimed packs after gc {when}: {report}"
    );
    let tmp: Vec<_> = fs::read_dir(store.join("tmp"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        tmp.is_empty(),
        "STORE/tmp not empty after gc {when}: {tmp:?}"
    );
    let sessions: Vec<_> = fs::read_dir(store.join("sessions"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        sessions.is_empty(),
        "session lock files left after gc {when}: {sessions:?}"
    );
    let again = run_json(store, &["gc"]);
    for key in [
        "dead_sessions",
        "deleted_objects",
        "deleted_versions",
        "packs_deleted",
        "packs_rewritten",
        "orphan_packs_deleted",
    ] {
        assert_eq!(
            again[key].as_u64(),
            Some(0),
            "a second gc still had work ({key}) {when}: {again}"
        );
    }
}

/// Tip of a branch (`IMAGE` or `IMAGE:BRANCH` resolved as `log` does) and its parents.
fn tip(store: &Path, spec: &str) -> (String, Vec<String>) {
    let v = run_json(store, &["log", spec, "-n", "1"]);
    let top = &v[0];
    let parents = top["parents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    (top["id"].as_str().unwrap().to_string(), parents)
}

/// Are two raw files identical as disks? (`qemu-img compare`: 0 same, 1 different.)
fn same_disk(a: &Path, b: &Path) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare {} {} failed: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Export `spec` to a scratch file and return its path.
fn export(store: &Path, spec: &str, scratch: &Path) -> PathBuf {
    let out = scratch.join("export.raw");
    run_ok(store, &["export", spec, out.to_str().unwrap(), "--force"]);
    out
}

/// `spec` must export identical to `original`.
fn assert_exports(store: &Path, spec: &str, original: &Path, scratch: &Path, when: &str) {
    let out = export(store, spec, scratch);
    assert!(
        same_disk(&out, original),
        "{spec} no longer exports identical to {} {when}",
        original.display()
    );
    fs::remove_file(out).unwrap();
}

/// What a child ended with: exited on its own (with this status) or killed by us.
#[derive(Debug)]
enum Fate {
    Finished(ExitStatus),
    Killed,
}

/// SIGKILL `child` (unless it has already exited) and reap it.
fn kill_and_reap(child: &mut Child) -> (Fate, String) {
    let fate = match child.try_wait().unwrap() {
        Some(st) => Fate::Finished(st),
        None => {
            // Child::kill sends SIGKILL; the child may exit on its own just before.
            let _ = child.kill();
            let st = child.wait().unwrap();
            if st.signal() == Some(libc::SIGKILL) {
                Fate::Killed
            } else {
                Fate::Finished(st)
            }
        }
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    (fate, stderr)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        let dest = to.join(e.file_name());
        if t.is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), &dest).unwrap();
        }
    }
}

fn short(id: &str) -> &str {
    &id[..12.min(id.len())]
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn new_store(dir: &Path) -> PathBuf {
    let store = dir.join("store");
    run_ok(&store, &["init"]);
    store
}

// ---------------------------------------------------------------------------------
// 1. kill -9 during import
// ---------------------------------------------------------------------------------

/// Imports killed at random moments leave the old tip or a complete new version,
/// never damage; gc then removes everything they left.
#[test]
fn kill_9_during_import_leaves_old_tip_or_complete_version() {
    // Each import writes well over one pack (64 MiB) of new data, so kills also land
    // between a pack's rename into place and its indexing, and after some packs are
    // indexed but before the commit.
    const SIZE: u64 = 96 * MIB;
    const CHANGED: f64 = 0.95;
    const ITERATIONS: u64 = 25;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = new_store(d);
    let scratch = d.join("scratch");
    fs::create_dir(&scratch).unwrap();

    let v1_file = d.join("v1.raw");
    let v2_file = d.join("v2.raw");
    make_image(&v1_file, SIZE, 1);
    mutate_image(&v1_file, &v2_file, 0.25, 2);
    let v1 = import(&store, &v1_file, "img", "v1");
    run_ok(&store, &["tag", "add", "img@main", "v1"]);
    let v2 = import(&store, &v2_file, "img", "v2");
    run_ok(&store, &["tag", "add", "img@main", "v2"]);
    eprintln!("v1 {} v2 {}", short(&v1), short(&v2));
    let bigger = d.join("bigger.raw");

    // How long does a full import of such a file take? Measure twice on copies of the
    // store and keep the longer (the machine may be busy: kills that come too late
    // just let the import finish, which is checked too).
    let t_ms = (0..2)
        .map(|n| {
            let probe = d.join("probe");
            copy_dir(&store, &probe);
            mutate_image(&v2_file, &bigger, CHANGED, 900 + n);
            let t = Instant::now();
            import(&probe, &bigger, "img", "probe");
            let ms = t.elapsed().as_millis() as u64;
            fs::remove_dir_all(&probe).unwrap();
            ms
        })
        .max()
        .unwrap()
        .max(20);
    eprintln!("a full import takes about {t_ms} ms");

    let mut rng = Rng::new(0x1A7E);
    let (mut killed, mut finished) = (0, 0);
    for i in 0..ITERATIONS {
        let changed = mutate_image(&v2_file, &bigger, CHANGED, 100 + i);
        // Half the kills anywhere, half late (pack flushes and the commit come last);
        // some come after the import has finished.
        let delay = if i % 2 == 0 {
            rng.below(t_ms + 1)
        } else {
            t_ms * 3 / 5 + rng.below(t_ms * 3 / 5 + 1)
        };
        let mut child = strata(&store)
            .args(["import", bigger.to_str().unwrap(), "img", "-m", "x"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        sleep_ms(delay);
        let (fate, stderr) = kill_and_reap(&mut child);
        let (after, parents) = tip(&store, "img");
        let tmp_files = fs::read_dir(store.join("tmp")).unwrap().count();
        eprintln!(
            "import #{i}: {changed} blocks changed, kill after {delay} ms: {fate:?}; tip {} -> {}; {tmp_files} files left in tmp",
            short(&v2),
            short(&after)
        );
        if let Fate::Finished(st) = &fate {
            assert!(
                st.success(),
                "import #{i} failed on its own: {st}\n{stderr}"
            );
        }
        let when = format!("after import #{i} (killed after {delay} ms)");
        let report = verify_ok(&store, &when);
        eprintln!("  verify ok; unclaimed packs {}", report["unclaimed_packs"]);
        if after == v2 {
            // The old tip, still holding the old content.
            assert!(
                !matches!(fate, Fate::Finished(_)),
                "import #{i} finished but the tip did not move"
            );
            killed += 1;
        } else {
            // A new version: complete, on top of the old tip, holding the new file.
            assert_eq!(
                parents,
                vec![v2.clone()],
                "import #{i}: new tip has wrong parents"
            );
            let out = export(&store, "img", &scratch);
            assert!(
                same_disk(&out, &bigger),
                "import #{i}: new tip {} is not the imported file (a partial version?); same as the old tip: {}",
                short(&after),
                same_disk(&out, &v2_file)
            );
            fs::remove_file(out).unwrap();
            // Move main back to v2 (what the new version holds becomes garbage), so
            // every iteration starts from the same tip and the store stays small.
            run_ok(&store, &["branch", "rm", "img", "main"]);
            run_ok(&store, &["branch", "add", "img@v2", "main"]);
            finished += 1;
        }
        assert_eq!(tip(&store, "img@v1").0, v1);
        assert_eq!(tip(&store, "img@v2").0, v2);
        assert_eq!(tip(&store, "img").0, v2);
        assert_exports(&store, "img@v1", &v1_file, &scratch, &when);
        assert_exports(&store, "img@v2", &v2_file, &scratch, &when);

        if i % 5 == 4 {
            let r = run_json(&store, &["gc"]);
            eprintln!("  gc: {r}");
            let when = format!("{when}, then gc");
            assert_clean_after_gc(&store, &when);
            assert_eq!(tip(&store, "img").0, v2);
            assert_exports(&store, "img@v1", &v1_file, &scratch, &when);
            assert_exports(&store, "img@v2", &v2_file, &scratch, &when);
        }
    }
    eprintln!("{killed} imports killed, {finished} finished");
    // The last iteration ended with a gc: only v1 and v2 remain.
    let report = verify_ok(&store, "at the end");
    assert_eq!(report["versions"].as_u64(), Some(2), "{report}");
}

// ---------------------------------------------------------------------------------
// 2. kill -9 during gc
// ---------------------------------------------------------------------------------

/// A ref that survives gc and the file its version was imported from.
struct Expect {
    spec: &'static str,
    file: PathBuf,
}

/// A store where gc has real work: whole packs to delete and packs about half dead to
/// rewrite. Returns the store and the refs that must survive it.
fn store_with_garbage(d: &Path) -> (PathBuf, Vec<Expect>) {
    let store = new_store(d);
    let f = |n: &str| d.join(format!("{n}.raw"));
    // a1 on branch "old" (tagged too), a2 (half of a1's blocks changed) on main with
    // no parent: deleting "old" and its tag leaves a1's packs about half dead, so gc
    // rewrites them.
    make_image(&f("a1"), 96 * MIB, 10);
    mutate_image(&f("a1"), &f("a2"), 0.5, 11);
    import(&store, &f("a1"), "a:old", "a1");
    run_ok(&store, &["tag", "add", "a@old", "rel"]);
    import(&store, &f("a2"), "a:main", "a2");
    // b1 <- b2 on b:main, tag keep at b2; c cloned from b2 with c2 on top.
    make_image(&f("b1"), 48 * MIB, 20);
    mutate_image(&f("b1"), &f("b2"), 0.25, 21);
    mutate_image(&f("b2"), &f("c2"), 0.125, 22);
    import(&store, &f("b1"), "b", "b1");
    import(&store, &f("b2"), "b", "b2");
    run_ok(&store, &["tag", "add", "b@main", "keep"]);
    run_ok(&store, &["clone", "b@keep", "c"]);
    import(&store, &f("c2"), "c", "c2");
    // d: a whole image to delete, so gc also deletes whole packs.
    make_image(&f("d1"), 40 * MIB, 30);
    import(&store, &f("d1"), "d", "d1");

    run_ok(&store, &["branch", "rm", "a", "old"]);
    run_ok(&store, &["tag", "rm", "a", "rel"]);
    run_ok(&store, &["rm", "d"]);
    let expect = [
        ("a", "a2"),
        ("b", "b2"),
        ("b@keep", "b2"),
        ("b@main~1", "b1"),
        ("c", "c2"),
        ("c@main~1", "b2"),
    ]
    .into_iter()
    .map(|(spec, file)| Expect {
        spec,
        file: f(file),
    })
    .collect();
    let before = verify_ok(&store, "before any gc");
    assert_eq!(before["versions"].as_u64(), Some(6), "{before}");
    (store, expect)
}

fn stored_bytes(store: &Path) -> u64 {
    run_json(store, &["stats"])["stored_bytes"]
        .as_u64()
        .unwrap()
}

fn pack_files(store: &Path) -> usize {
    fs::read_dir(store.join("packs"))
        .unwrap()
        .flatten()
        .map(|e| fs::read_dir(e.path()).map_or(0, |r| r.count()))
        .sum()
}

/// An uninterrupted gc on a copy of `store`: its report and how long it took.
fn probe_gc(store: &Path, probe: &Path) -> (Value, u64) {
    copy_dir(store, probe);
    let t = Instant::now();
    let r = run_json(probe, &["gc"]);
    let ms = t.elapsed().as_millis() as u64;
    fs::remove_dir_all(probe).unwrap();
    eprintln!("uninterrupted gc ({ms} ms): {r}");
    assert!(
        r["packs_deleted"].as_u64().unwrap() > 0,
        "the setup gives gc no pack to delete: {r}"
    );
    assert!(
        r["packs_rewritten"].as_u64().unwrap() > 0,
        "the setup gives gc no pack to rewrite: {r}"
    );
    (r, ms)
}

/// What a pack's index and a few entry headers may add when the same live objects
/// are packed differently (a resumed gc need not split them into packs identically).
const PACKING_SLACK: u64 = MIB;

/// gc killed at random moments, over and over; after each kill the store verifies
/// and every ref exports intact. A gc that then completes must reclaim what an
/// uninterrupted gc reclaims (checked last, after all the safety checks).
#[test]
fn kill_9_during_gc_never_loses_live_data() {
    const ITERATIONS: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (store, expect) = store_with_garbage(d);
    let scratch = d.join("scratch");
    fs::create_dir(&scratch).unwrap();
    let stored_before = stored_bytes(&store);
    let pristine = d.join("pristine");
    copy_dir(&store, &pristine);
    let (probe, t_ms) = probe_gc(&pristine, &d.join("probe"));
    let t_ms = t_ms.max(20);
    let clean_bytes = probe["bytes_after"].as_u64().unwrap();
    eprintln!("stored before gc: {stored_before}, after an uninterrupted gc: {clean_bytes}");

    let mut rng = Rng::new(0x6C);
    // Chains of killed gcs ended by one that finished, and what they left stored.
    let mut chains: Vec<(u64, u64)> = Vec::new();
    let mut chain_start = 0;
    for i in 0..ITERATIONS {
        let delay = rng.below(t_ms + 1);
        let mut child = strata(&store)
            .args(["gc"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        sleep_ms(delay);
        let (fate, stderr) = kill_and_reap(&mut child);
        eprintln!(
            "gc #{i}: kill after {delay} ms: {fate:?}; {} pack files",
            pack_files(&store)
        );
        if let Fate::Finished(st) = &fate {
            assert!(st.success(), "gc #{i} failed on its own: {st}\n{stderr}");
        }
        let when = format!("after gc #{i} (killed after {delay} ms)");
        let report = verify_ok(&store, &when);
        eprintln!(
            "  verify ok: {} packs, {} versions, {} unclaimed",
            report["packs"], report["versions"], report["unclaimed_packs"]
        );
        for e in &expect {
            assert_exports(&store, e.spec, &e.file, &scratch, &when);
        }
        if matches!(fate, Fate::Finished(_)) {
            // A complete gc, after the killed ones since the last restore: it must have
            // finished their work. Then start over, so later kills hit real work again.
            let stored = stored_bytes(&store);
            eprintln!("  gcs #{chain_start}..#{i} left {stored} bytes stored; store restored");
            chains.push((i - chain_start, stored));
            fs::remove_dir_all(&store).unwrap();
            copy_dir(&pristine, &store);
            chain_start = i + 1;
        }
    }

    let r = run_json(&store, &["gc"]);
    eprintln!("final gc: {r}");
    assert_clean_after_gc(&store, "after the final gc");
    let after = verify_ok(&store, "after the final gc");
    assert_eq!(
        after["versions"].as_u64(),
        Some(4),
        "a1 and d1 should be gone: {after}"
    );
    let images = run_json(&store, &["images"]);
    let names: Vec<&str> = images
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    for e in &expect {
        assert_exports(&store, e.spec, &e.file, &scratch, "after the final gc");
    }
    chains.push((ITERATIONS - chain_start, stored_bytes(&store)));
    // Space: a gc that completes after interrupted ones reclaims what an
    // uninterrupted gc does.
    eprintln!("(killed gcs, bytes stored after the next complete gc): {chains:?}");
    let leaky: Vec<_> = chains
        .iter()
        .filter(|(_, stored)| *stored > clean_bytes + PACKING_SLACK)
        .collect();
    assert!(
        leaky.is_empty(),
        "after interrupted gcs, a complete gc left more stored than an uninterrupted \
         gc ({clean_bytes} bytes): (killed gcs, bytes) {leaky:?}"
    );
}

/// Deterministic: gc is killed as soon as its pack rewrite has begun (after its sweep
/// committed). The next gc must finish the job. With gc.rs computing a pack's dead
/// bytes only from the index rows its own sweep deletes, it cannot: the rows of the
/// dead objects are gone, so the half-dead packs are never rewritten.
#[test]
fn gc_killed_while_rewriting_packs_leaves_the_rest_to_the_next_gc() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (store, expect) = store_with_garbage(d);
    let scratch = d.join("scratch");
    fs::create_dir(&scratch).unwrap();
    let (probe, _) = probe_gc(&store, &d.join("probe"));
    let clean_bytes = probe["bytes_after"].as_u64().unwrap();

    // gc rewrites partially dead packs last, through a write session of its own: its
    // first temporary pack shows that the sweep is committed and the rewrite running.
    let mut child = strata(&store)
        .args(["gc"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tmp = store.join("tmp");
    while fs::read_dir(&tmp).unwrap().next().is_none() && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let (fate, stderr) = kill_and_reap(&mut child);
    assert!(
        matches!(fate, Fate::Killed),
        "gc finished before its rewrite could be interrupted: {fate:?}\n{stderr}"
    );
    eprintln!(
        "gc killed while rewriting; {} bytes stored",
        stored_bytes(&store)
    );
    verify_ok(&store, "after killing gc during its rewrite");
    for e in &expect {
        assert_exports(&store, e.spec, &e.file, &scratch, "after killing gc");
    }

    let r = run_json(&store, &["gc"]);
    eprintln!("next gc: {r}");
    assert_clean_after_gc(&store, "after the next gc");
    for e in &expect {
        assert_exports(&store, e.spec, &e.file, &scratch, "after the next gc");
    }
    let stored = stored_bytes(&store);
    assert!(
        stored <= clean_bytes + PACKING_SLACK,
        "the dead bytes of the packs whose rewrite was interrupted are never reclaimed: \
         {stored} bytes stored after the next gc, {clean_bytes} after an uninterrupted gc \
         (the next gc reported {r})"
    );
}

// ---------------------------------------------------------------------------------
// 3. gc while another process imports
// ---------------------------------------------------------------------------------

/// Run `strata gc` over and over (at least once) until `stop` is set; returns the
/// reports of all runs, which must all succeed.
fn gc_loop(
    store: PathBuf,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> std::thread::JoinHandle<Vec<Value>> {
    std::thread::spawn(move || {
        let mut rng = Rng::new(seed);
        let mut reports = Vec::new();
        loop {
            let out = strata(&store).args(["--json", "gc"]).output().unwrap();
            assert!(
                out.status.success(),
                "concurrent gc failed:\n{}",
                describe(&["--json", "gc"], &out)
            );
            let r: Value = serde_json::from_slice(&out.stdout).unwrap();
            eprintln!(
                "    gc {}: {} deleted objects, {} deleted versions, {} packs deleted, {} rewritten, {} dead sessions",
                reports.len(),
                r["deleted_objects"],
                r["deleted_versions"],
                r["packs_deleted"],
                r["packs_rewritten"],
                r["dead_sessions"]
            );
            reports.push(r);
            if stop.load(Ordering::SeqCst) {
                return reports;
            }
            sleep_ms(rng.below(15));
        }
    })
}

/// Import without panicking: the version id, or what went wrong.
fn try_import(store: &Path, file: &Path, target: &str, msg: &str) -> Result<String, String> {
    let args = [
        "--json",
        "import",
        file.to_str().unwrap(),
        target,
        "-m",
        msg,
    ];
    let out = strata(store).args(args).output().unwrap();
    if !out.status.success() {
        return Err(describe(&args, &out));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    Ok(v["version"].as_str().unwrap().to_string())
}

/// gc runs in a loop while another process imports content that shares most blocks
/// with a deleted image: the importer dedups against chunks gc considers garbage.
/// Nothing may be lost, and since no process dies no gc may reap a session.
#[test]
fn gc_during_import_of_content_it_considers_garbage_loses_nothing() {
    const ROUNDS: u64 = 8;
    const SIZE: u64 = 64 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = new_store(d);
    let scratch = d.join("scratch");
    fs::create_dir(&scratch).unwrap();
    let mut rng = Rng::new(0xC0C0);
    // (version, file) of everything imported into "live"; all must survive.
    let mut kept: Vec<(String, PathBuf)> = Vec::new();

    // Time an import like the ones below (of content the store holds as garbage), to
    // spread the start of the gcs over it.
    let t_ms = {
        let probe = d.join("probe");
        run_ok(&probe, &["init"]);
        let (p, p2) = (d.join("probe.raw"), d.join("probe-changed.raw"));
        make_image(&p, SIZE, 7);
        mutate_image(&p, &p2, 1.0 / 32.0, 8);
        import(&probe, &p, "x", "probe");
        run_ok(&probe, &["rm", "x"]);
        let t = Instant::now();
        import(&probe, &p2, "y", "probe");
        let ms = t.elapsed().as_millis() as u64;
        fs::remove_dir_all(&probe).unwrap();
        fs::remove_file(&p).unwrap();
        fs::remove_file(&p2).unwrap();
        ms.max(20)
    };
    eprintln!("an import takes about {t_ms} ms");

    for r in 0..ROUNDS {
        let a = d.join(format!("a{r}.raw"));
        let a2 = d.join(format!("a{r}-changed.raw"));
        // A' shares all but a few blocks with A, or only 60% of them: then A's packs,
        // pinned by the importer, are partly dead and gc rewrites them under it.
        let fraction = if r % 4 < 2 { 1.0 / 32.0 } else { 0.4 };
        make_image(&a, SIZE, 40 + r);
        mutate_image(&a, &a2, fraction, 50 + r);
        // A enters the store and becomes garbage: the blocks A' shares with it are
        // chunks gc wants to delete.
        let src = format!("src{r}");
        import(&store, &a, &src, "to be deleted");
        run_ok(&store, &["rm", &src]);

        let stop = Arc::new(AtomicBool::new(false));
        let gc_first = r % 2 == 0;
        // gc first: the import starts at some point of a gc (which takes less than an
        // import). Import first: gcs start while it is well under way.
        let delay = rng.below(if gc_first { t_ms / 2 } else { t_ms * 2 / 3 } + 1);
        eprintln!(
            "round {r}: {} first, the other after {delay} ms; {fraction} of the blocks changed",
            if gc_first { "gc loop" } else { "import" }
        );
        let mut gc_thread = None;
        if gc_first {
            gc_thread = Some(gc_loop(store.clone(), stop.clone(), r));
            sleep_ms(delay);
        }
        // Two imports in a row: A' onto live:main, then A itself (all garbage chunks)
        // onto live:orig.
        let importer = {
            let (store, a, a2) = (store.clone(), a.clone(), a2.clone());
            std::thread::spawn(move || {
                let first = try_import(&store, &a2, "live", &format!("round {r} changed"));
                let second = try_import(&store, &a, "live:orig", &format!("round {r} original"));
                (first, second)
            })
        };
        if !gc_first {
            sleep_ms(delay);
            gc_thread = Some(gc_loop(store.clone(), stop.clone(), r));
        }
        let imported = importer.join().unwrap();
        stop.store(true, Ordering::SeqCst);
        let gcs = gc_thread.unwrap().join().expect("a concurrent gc failed");
        let dead_sessions: u64 = gcs
            .iter()
            .map(|g| g["dead_sessions"].as_u64().unwrap())
            .sum();
        eprintln!(
            "round {r}: imports {:?} while {} gcs ran, which reaped {dead_sessions} sessions",
            (
                imported.0.as_deref().map(short),
                imported.1.as_deref().map(short)
            ),
            gcs.len()
        );
        let first = imported
            .0
            .unwrap_or_else(|e| panic!("round {r}: import of A' failed:\n{e}"));
        let second = imported
            .1
            .unwrap_or_else(|e| panic!("round {r}: import of A failed:\n{e}"));
        kept.push((first.clone(), a2.clone()));
        kept.push((second.clone(), a.clone()));

        let when = format!("after round {r}");
        verify_ok(&store, &when);
        assert_eq!(tip(&store, "live").0, first);
        assert_eq!(tip(&store, "live:orig").0, second);
        assert_exports(&store, "live", &a2, &scratch, &when);
        assert_exports(&store, "live:orig", &a, &scratch, &when);
        // Once more after a gc that runs alone: the new versions must own all they need.
        run_json(&store, &["gc"]);
        assert_clean_after_gc(&store, &when);
        for (v, file) in &kept {
            assert_exports(
                &store,
                &format!("live@{v}"),
                file,
                &scratch,
                &format!("{when}, then gc"),
            );
        }
        // No writer died, so no gc may have found a dead session: one that did took a
        // live (or just finished) writer for dead, and a live writer's pins and packs
        // are then no longer protected.
        assert_eq!(
            dead_sessions, 0,
            "round {r}: concurrent gcs reaped sessions although no writer died: {gcs:?}"
        );
    }
}

// ---------------------------------------------------------------------------------
// 4. two imports race for one branch
// ---------------------------------------------------------------------------------

fn spawn_import(store: &Path, file: &Path, target: &str) -> Child {
    strata(store)
        .args([
            "--json",
            "import",
            file.to_str().unwrap(),
            target,
            "-m",
            "race",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Two imports from the same tip to the same branch: one commits, the other fails
/// with the compare-and-swap conflict, and importing it again succeeds on top.
#[test]
fn concurrent_imports_to_one_branch_one_wins_other_conflicts() {
    const RACES: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = new_store(d);
    let scratch = d.join("scratch");
    fs::create_dir(&scratch).unwrap();

    let mut size = 64 * MIB;
    let base = d.join("base.raw");
    make_image(&base, size, 60);
    let v0 = import(&store, &base, "img", "base");
    let mut cur_id = v0.clone();
    // The file the tip was imported from (files are never overwritten).
    let mut cur_file = base.clone();
    // Every version ever committed to img, with its file: none may be lost.
    let mut history: Vec<(String, PathBuf)> = vec![(v0, base.clone())];

    let mut races = 0;
    let mut attempt = 0;
    while races < RACES {
        attempt += 1;
        assert!(
            attempt <= RACES + 3,
            "the imports never overlapped, even at {} MiB",
            size / MIB
        );
        let x = d.join(format!("x{attempt}.raw"));
        let y = d.join(format!("y{attempt}.raw"));
        // Both start from the current tip's content and change half of it differently.
        mutate_image(&cur_file, &x, 0.5, 1000 + attempt);
        mutate_image(&cur_file, &y, 0.5, 2000 + attempt);
        // Both read the tip as they start, long before either can commit.
        let cx = spawn_import(&store, &x, "img");
        let cy = spawn_import(&store, &y, "img");
        let ox = cx.wait_with_output().unwrap();
        let oy = cy.wait_with_output().unwrap();
        let dx = describe(&["import", "x"], &ox);
        let dy = describe(&["import", "y"], &oy);
        let id_of = |o: &Output| -> String {
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            v["version"].as_str().unwrap().to_string()
        };
        let summary = |o: &Output| -> String {
            if o.status.success() {
                format!("committed {}", short(&id_of(o)))
            } else {
                format!(
                    "{}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                )
            }
        };
        eprintln!(
            "race {attempt} ({} MiB) from {}:\n  x: {}\n  y: {}",
            size / MIB,
            short(&cur_id),
            summary(&ox),
            summary(&oy)
        );
        match (ox.status.success(), oy.status.success()) {
            (true, true) => {
                // They did not overlap: the second saw the first's tip. Nothing is lost;
                // try again with bigger images.
                let (ix, iy) = (id_of(&ox), id_of(&oy));
                let (t, parents) = tip(&store, "img");
                let (first, second, first_file, second_file) = if t == iy {
                    (ix, iy, &x, &y)
                } else {
                    (iy, ix, &y, &x)
                };
                assert_eq!(t, second);
                assert_eq!(
                    parents,
                    vec![first.clone()],
                    "both imports succeeded but not one after the other"
                );
                verify_ok(&store, &format!("after race {attempt}"));
                assert_exports(
                    &store,
                    &format!("img@{first}"),
                    first_file,
                    &scratch,
                    "after a sequential race",
                );
                assert_exports(
                    &store,
                    "img",
                    second_file,
                    &scratch,
                    "after a sequential race",
                );
                history.push((first, first_file.clone()));
                history.push((second, second_file.clone()));
                size *= 2;
                eprintln!("  no overlap; retrying at {} MiB", size / MIB);
                cur_file = d.join(format!("cur{attempt}.raw"));
                make_image(&cur_file, size, 600 + attempt);
                cur_id = import(&store, &cur_file, "img", "bigger base");
                history.push((cur_id.clone(), cur_file.clone()));
                continue;
            }
            (false, false) => panic!("both imports failed:\n{dx}\n{dy}"),
            _ => {}
        }
        let (won, lost, won_file, lost_file, lost_out) = if ox.status.success() {
            (id_of(&ox), "y", &x, &y, &dy)
        } else {
            (id_of(&oy), "x", &y, &x, &dx)
        };
        assert!(
            lost_out.contains("moved while"),
            "the losing import ({lost}) did not fail with the compare-and-swap conflict:\n{lost_out}"
        );
        eprintln!("  winner {}, {lost} lost with a conflict", short(&won));
        let log = run_json(&store, &["log", "img", "-n", "2"]);
        assert_eq!(
            log[0]["id"].as_str(),
            Some(won.as_str()),
            "winner is not on top: {log}"
        );
        assert_eq!(log[0]["parents"], serde_json::json!([cur_id]), "{log}");
        assert_eq!(log[1]["id"].as_str(), Some(cur_id.as_str()), "{log}");
        verify_ok(&store, &format!("after race {attempt}"));
        assert_exports(
            &store,
            "img",
            won_file,
            &scratch,
            &format!("after race {attempt}"),
        );
        assert_exports(
            &store,
            "img@main~1",
            &cur_file,
            &scratch,
            &format!("after race {attempt}"),
        );
        history.push((won.clone(), won_file.clone()));
        // The loser's data is not lost: importing it again now succeeds on the winner.
        let again = import(&store, lost_file, "img", "retry after conflict");
        assert_eq!(tip(&store, "img"), (again.clone(), vec![won.clone()]));
        assert_exports(
            &store,
            "img",
            lost_file,
            &scratch,
            &format!("after retrying race {attempt}"),
        );
        history.push((again.clone(), lost_file.clone()));
        cur_id = again;
        cur_file = lost_file.clone();
        races += 1;
    }

    run_json(&store, &["gc"]);
    assert_clean_after_gc(&store, "after the races");
    for (v, file) in &history {
        assert_exports(
            &store,
            &format!("img@{v}"),
            file,
            &scratch,
            "after the races and gc",
        );
    }
}
