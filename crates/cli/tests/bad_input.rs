//! Bad input is refused with a clear message, a non-zero exit, and no change to the
//! store: images, refs, stats and pack files are as before and `verify` is clean.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A store holding one small image `keep` (tagged `t1`), and its source file.
fn store_with_image() -> (Store, PathBuf) {
    let st = Store::new();
    let f = st.file("keep.raw");
    sparse_file(&f, 2 * MIB);
    write_random(&f, 0, 300_000, 1);
    write_text(&f, MIB, 200_000, 2);
    st.import(&f, "keep", &["-m", "the only version"]);
    st.json(&["tag", "add", "keep@main", "t1"]);
    (st, f)
}

/// Run `args`, expect a clean failure whose stderr contains every one of `phrases`,
/// then check the store is as it was at `before`.
fn refused(st: &Store, before: &Snapshot, args: &[&str], phrases: &[&str]) -> String {
    let err = st.fails(args);
    for ph in phrases {
        assert!(
            err.to_lowercase().contains(&ph.to_lowercase()),
            "strata {args:?}: expected {ph:?} in the error:\n{err}"
        );
    }
    st.assert_unchanged(before);
    err
}

/// A qcow2 (v3, 64 KiB clusters) of 8 MiB with data in its first 1 MiB and at 3 MiB,
/// made the way qemu makes overlays: create, then write. Checked clean by qemu-img.
fn good_qcow2(st: &Store, name: &str) -> PathBuf {
    let q = st.file(name);
    qemu_img(&["create", "-q", "-f", "qcow2", p(&q), "8M"]);
    qemu_io("qcow2", &q, "write -P 0xab 0 1M");
    qemu_io("qcow2", &q, "write -P 0xcd 3M 256k");
    qemu_img(&["check", "-q", "-f", "qcow2", p(&q)]);
    q
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A copy of `src` named `name` with `bytes` written at `offset`.
fn patched(st: &Store, src: &Path, name: &str, offset: u64, bytes: &[u8]) -> PathBuf {
    let dst = st.file(name);
    std::fs::copy(src, &dst).unwrap();
    write_at(&dst, offset, bytes);
    dst
}

// ---- damaged qcow2 files ------------------------------------------------------------

#[test]
fn truncated_qcow2_is_refused() {
    let (st, _) = store_with_image();
    let before = st.snapshot();
    let good = good_qcow2(&st, "good.qcow2");
    let bytes = std::fs::read(&good).unwrap();
    let len = bytes.len() as u64;
    let l1 = be_u64(&bytes, 40);
    let l2 = be_u64(&bytes, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    assert!(
        l1 > 0 && l2 > l1,
        "unexpected layout: L1 {l1:#x}, L2 {l2:#x}"
    );
    let mut cuts = vec![
        4,          // the magic alone
        50,         // inside the header
        104,        // the v3 header without its extensions
        300,        // inside the header extensions
        65536,      // header cluster only
        l1 + 4,     // half an L1 entry
        l2 + 100,   // inside the L2 table
        l2 + 65536, // before the data
        len / 2,    // inside the data
        len - 1,    // one byte short
    ];
    cuts.sort();
    cuts.dedup();
    for cut in cuts {
        assert!(cut < len);
        let t = st.file(&format!("cut-{cut}.qcow2"));
        std::fs::write(&t, &bytes[..cut as usize]).unwrap();
        let err = refused(
            &st,
            &before,
            &["import", p(&t), "trunc"],
            &["not a valid qcow2 image"],
        );
        assert!(
            err.contains(&format!("cut-{cut}.qcow2")),
            "names the file: {err}"
        );
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
    }
}

#[test]
fn qcow2_with_corrupted_header_fields_is_refused() {
    let (st, _) = store_with_image();
    let before = st.snapshot();
    let good = good_qcow2(&st, "good.qcow2");
    let bytes = std::fs::read(&good).unwrap();
    let l1 = be_u64(&bytes, 40);
    let l2 = be_u64(&bytes, l1 as usize) & 0x00ff_ffff_ffff_fe00;
    let copied = 1u64 << 63;
    let cases: Vec<(&str, u64, Vec<u8>, &str)> = vec![
        ("magic", 0, b"QFI\0".to_vec(), "bad magic"),
        ("version", 4, 7u32.to_be_bytes().to_vec(), "qcow2 version 7"),
        (
            "cluster-bits-big",
            20,
            40u32.to_be_bytes().to_vec(),
            "cluster_bits",
        ),
        (
            "cluster-bits-small",
            20,
            8u32.to_be_bytes().to_vec(),
            "cluster_bits",
        ),
        ("size", 24, (1u64 << 62).to_be_bytes().to_vec(), "L1 table"),
        ("crypt", 32, 1u32.to_be_bytes().to_vec(), "encryption"),
        (
            "l1-size",
            36,
            0x7fff_ffffu32.to_be_bytes().to_vec(),
            "L1 table",
        ),
        (
            "l1-offset-past-end",
            40,
            0xffff_ffff_0003_0000u64.to_be_bytes().to_vec(),
            "past the end of the file",
        ),
        (
            "l1-offset-unaligned",
            40,
            (l1 + 1).to_be_bytes().to_vec(),
            "not aligned",
        ),
        (
            "backing-name-offset",
            8,
            0x7f00_0000u64.to_be_bytes().to_vec(),
            "backing file name",
        ),
        (
            "incompatible-feature",
            72,
            0x80u64.to_be_bytes().to_vec(),
            "incompatible feature",
        ),
        (
            "l1-entry-past-end",
            l1,
            (copied | 0x7fff_0000).to_be_bytes().to_vec(),
            "past the end of the file",
        ),
        (
            "l1-entry-unaligned",
            l1,
            (copied | 0x1000).to_be_bytes().to_vec(),
            "not cluster-aligned",
        ),
        (
            "l2-entry-past-end",
            l2,
            (copied | 0x7fff_0000).to_be_bytes().to_vec(),
            "past the end of the file",
        ),
    ];
    for (name, offset, patch, phrase) in cases {
        let f = patched(&st, &good, &format!("{name}.qcow2"), offset, &patch);
        // Detection would call a file without the magic raw; name the format.
        let fmt: &[&str] = if name == "magic" {
            &["--format", "qcow2"]
        } else {
            &[]
        };
        let mut args = vec!["import", p(&f), "bad"];
        args.extend_from_slice(fmt);
        let err = refused(&st, &before, &args, &[phrase]);
        assert!(err.contains(&format!("{name}.qcow2")), "{name}: {err}");
    }
}

#[test]
fn qcow2_with_missing_backing_file_is_refused() {
    let (st, _) = store_with_image();
    let before = st.snapshot();
    let base = good_qcow2(&st, "base.qcow2");
    let top = st.file("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&base),
        "-F",
        "qcow2",
        p(&top),
    ]);
    qemu_io("qcow2", &top, "write -P 0x11 2M 64k");
    std::fs::remove_file(&base).unwrap();
    let err = refused(
        &st,
        &before,
        &["import", p(&top), "orphan"],
        &["backing file", "not found"],
    );
    assert!(err.contains("base.qcow2"), "names the missing file: {err}");

    // A relative name that resolves to nothing, too.
    let rel = st.file("rel.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&rel), "8M"]);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "no-such-base.qcow2",
        "-F",
        "qcow2",
        p(&rel),
    ]);
    let err = refused(
        &st,
        &before,
        &["import", p(&rel), "keep"],
        &["backing file", "not found"],
    );
    assert!(err.contains("no-such-base.qcow2"), "{err}");
}

#[test]
fn qcow2_backing_loops_and_too_deep_chains_are_refused() {
    let (st, _) = store_with_image();
    let before = st.snapshot();
    let a = st.file("a.qcow2");
    let b = st.file("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&a), "8M"]);
    qemu_io("qcow2", &a, "write -P 0x01 0 64k");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&a),
        "-F",
        "qcow2",
        p(&b),
    ]);
    qemu_io("qcow2", &b, "write -P 0x02 1M 64k");
    qemu_img(&["rebase", "-u", "-b", p(&b), "-F", "qcow2", p(&a)]);
    for f in [&a, &b] {
        refused(
            &st,
            &before,
            &["import", p(f), "loop"],
            &["backing chain loop"],
        );
    }
    // A file that is its own backing file.
    let selfish = st.file("self.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&selfish), "8M"]);
    qemu_img(&[
        "rebase",
        "-u",
        "-b",
        "self.qcow2",
        "-F",
        "qcow2",
        p(&selfish),
    ]);
    refused(
        &st,
        &before,
        &["import", p(&selfish), "keep"],
        &["backing chain loop"],
    );

    // d1 <- d2 <- d3 <- d4 is three backing files deep.
    let mut prev: Option<PathBuf> = None;
    for i in 1..=4 {
        let d = st.file(&format!("d{i}.qcow2"));
        match &prev {
            None => qemu_img(&["create", "-q", "-f", "qcow2", p(&d), "8M"]),
            Some(b) => qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                p(b),
                "-F",
                "qcow2",
                p(&d),
            ]),
        };
        prev = Some(d);
    }
    let d4 = prev.unwrap();
    refused(
        &st,
        &before,
        &["import", p(&d4), "deep", "--max-backing-depth", "2"],
        &["deeper than the limit of 2"],
    );
}

#[test]
fn a_file_that_is_not_the_format_asked_is_refused() {
    let (st, keep) = store_with_image();
    let before = st.snapshot();
    refused(
        &st,
        &before,
        &["import", p(&keep), "x", "--format", "qcow2"],
        &["not a valid qcow2 image", "bad magic"],
    );
    refused(
        &st,
        &before,
        &["import", p(&keep), "x", "--format", "vmdk"],
        &["qemu-img failed", "vmdk"],
    );
    refused(
        &st,
        &before,
        &["import", p(&keep), "x", "--format", "vhdx"],
        &["qemu-img failed"],
    );
    refused(
        &st,
        &before,
        &["import", p(&keep), "x", "--format", "qcow3"],
        &["unknown image format 'qcow3'"],
    );
    // Not a file at all.
    refused(
        &st,
        &before,
        &["import", p(st.dir()), "x"],
        &["is a directory"],
    );
    refused(
        &st,
        &before,
        &["import", p(&st.file("no-such.raw")), "x"],
        &["no-such.raw", "No such file"],
    );
    // --block-size that is no block size.
    refused(
        &st,
        &before,
        &["import", p(&keep), "x", "--block-size", "3000"],
        &["invalid block size 3000"],
    );
    refused(
        &st,
        &before,
        &["import", p(&keep), "x", "--block-size", "8M"],
        &["invalid block size"],
    );
    refused(
        &st,
        &before,
        &["import", p(&keep), "keep", "--block-size", "4K"],
        &["cannot change"],
    );
}

// ---- names, revisions, refs ---------------------------------------------------------

#[test]
fn images_and_revisions_that_do_not_exist_are_refused() {
    let (st, _) = store_with_image();
    let before = st.snapshot();
    let out = st.file("out.raw");
    let o = p(&out);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["export", "nope", o], "no image named \"nope\""),
        (
            vec!["export", "keep@nope", o],
            "no branch, tag or version \"nope\"",
        ),
        (
            vec!["export", "keep:dev", o],
            "no branch, tag or version \"dev\"",
        ),
        (vec!["show", "keep@main~1"], "has no parent"),
        (vec!["show", "keep@t1~3"], "has no parent"),
        (vec!["show", "keep@main~x"], "is not a number"),
        (vec!["show", "keep@"], "empty revision"),
        (vec!["show", "@main"], "missing image name"),
        (vec!["log", "nope"], "no image named"),
        (
            vec!["log", "keep@00000000"],
            "no branch, tag or version \"00000000\"",
        ),
        // Fewer than 4 hex digits is never taken for a version id.
        (vec!["log", "keep@a"], "no branch, tag or version \"a\""),
        (vec!["diff", "keep@main", "nope@main"], "no image named"),
        (
            vec!["diff", "keep@main", "keep@zzz"],
            "no branch, tag or version",
        ),
        (
            vec!["tag", "add", "keep@nope", "t2"],
            "no branch, tag or version",
        ),
        (vec!["tag", "add", "nope@main", "t2"], "no image named"),
        (vec!["tag", "ls", "nope"], "no image named"),
        (
            vec!["tag", "rm", "keep", "nope"],
            "has no tag named \"nope\"",
        ),
        (vec!["tag", "rm", "nope", "t1"], "no image named"),
        (
            vec!["branch", "rm", "keep", "dev"],
            "has no branch named \"dev\"",
        ),
        (
            vec!["branch", "rm", "keep", "t1"],
            "has no branch named \"t1\"",
        ),
        (vec!["branch", "ls", "nope"], "no image named"),
        (
            vec!["branch", "add", "keep@main", "t1"],
            "already has a tag named \"t1\"",
        ),
        (
            vec!["branch", "add", "keep@main", "main"],
            "already has a branch named \"main\"",
        ),
        (vec!["clone", "nope@main", "c"], "no image named"),
        (vec!["clone", "keep@nope", "c"], "no branch, tag or version"),
        (vec!["clone", "keep@main", "keep"], "already exists"),
        (vec!["rm", "nope"], "no image named"),
    ];
    for (args, phrase) in cases {
        refused(&st, &before, &args, &[phrase]);
    }
    assert!(!out.exists());
}

#[test]
fn invalid_names_are_refused() {
    let (st, keep) = store_with_image();
    let before = st.snapshot();
    let k = p(&keep);
    let long = "a".repeat(129);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["import", k, "bad name"], "invalid name \"bad name\""),
        (vec!["import", k, ".hidden"], "invalid name \".hidden\""),
        (vec!["import", k, "/abs"], "invalid name \"/abs\""),
        (vec!["import", k, "a//b"], "invalid name \"a//b\""),
        (vec!["import", k, "trail/"], "invalid name \"trail/\""),
        (vec!["import", k, "--", "-x"], "invalid name \"-x\""),
        (vec!["import", k, &long], "1 to 128 characters"),
        (vec!["import", k, "größe"], "invalid name"),
        (vec!["import", k, "tab\tname"], "invalid name"),
        (vec!["import", k, "keep:bad~1"], "invalid name \"bad~1\""),
        (vec!["import", k, "keep:a:b"], "invalid name \"a:b\""),
        (vec!["import", k, "new:.dot"], "invalid name \".dot\""),
        (vec!["import", k, "keep@t1"], "use IMAGE or IMAGE:BRANCH"),
        (vec!["import", k, "keep:"], "expected IMAGE or IMAGE:BRANCH"),
        (vec!["import", k, ":main"], "expected IMAGE or IMAGE:BRANCH"),
        (
            vec!["tag", "add", "keep@main", "v 1"],
            "invalid name \"v 1\"",
        ),
        (vec!["tag", "add", "keep@main", ".v"], "invalid name \".v\""),
        (
            vec!["branch", "add", "keep@main", "x~1"],
            "invalid name \"x~1\"",
        ),
        (
            vec!["branch", "add", "keep@main", "a@b"],
            "invalid name \"a@b\"",
        ),
        (vec!["clone", "keep@main", "a b"], "invalid name \"a b\""),
        (vec!["clone", "keep@main", "ok/"], "invalid name \"ok/\""),
    ];
    for (args, phrase) in cases {
        refused(&st, &before, &args, &[phrase]);
    }
}

#[test]
fn ambiguous_version_prefix_is_refused() {
    let (st, _) = store_with_image();
    // Versions are named by hashes: make versions until two share 4 hex digits (the
    // shortest prefix taken as an id). About 320 are needed on average; three
    // branches of one image are imported in parallel to get there sooner.
    let tiny = st.file("tiny.raw");
    sparse_file(&tiny, 4096);
    st.import(&tiny, "many", &["--block-size", "4K"]);
    let seen: Mutex<HashMap<String, String>> = Mutex::new(HashMap::new());
    let found: Mutex<Option<(String, String)>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let count = AtomicUsize::new(0);
    const LIMIT: usize = 3000;
    std::thread::scope(|scope| {
        for t in 0..3 {
            let (seen, found, stop, count, tiny, st) = (&seen, &found, &stop, &count, &tiny, &st);
            scope.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    if n >= LIMIT {
                        break;
                    }
                    let target = format!("many:b{t}");
                    let msg = format!("v{n}");
                    let r = st.import(tiny, &target, &["-m", &msg]);
                    let id = r["version"].as_str().unwrap().to_string();
                    let mut seen = seen.lock().unwrap();
                    if let Some(other) = seen.insert(id[..4].to_string(), id.clone()) {
                        if other != id {
                            *found.lock().unwrap() = Some((other, id));
                            stop.store(true, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
    });
    let (a, b) = found
        .into_inner()
        .unwrap()
        .unwrap_or_else(|| panic!("no 4-digit collision in {LIMIT} versions"));
    let before = st.snapshot();
    let prefix = &a[..4];
    let err = refused(
        &st,
        &before,
        &["show", &format!("many@{prefix}")],
        &["is ambiguous"],
    );
    assert!(
        err.contains(&a[..12]) && err.contains(&b[..12]),
        "lists both: {err}"
    );
    refused(
        &st,
        &before,
        &["export", &format!("many@{prefix}~1"), p(&st.file("x.raw"))],
        &["is ambiguous"],
    );
    // A longer prefix that tells them apart works.
    let n = (4..64).find(|&n| a[..n] != b[..n]).unwrap();
    assert_eq!(st.version_id(&format!("many@{}", &a[..n])), a);
    assert_eq!(st.version_id(&format!("many@{}", &b[..n])), b);
}

// ---- stores -------------------------------------------------------------------------

#[test]
fn a_store_path_that_is_a_file_or_not_a_store_is_refused() {
    let sandbox = tempfile::tempdir().unwrap();
    let file = sandbox.path().join("not-a-dir");
    std::fs::write(&file, b"precious").unwrap();
    for args in [
        vec!["--store", p(&file), "images"],
        vec!["--store", p(&file), "stats"],
        vec!["init", p(&file)],
    ] {
        let o = strata_without_store(sandbox.path(), &args);
        let err = assert_clean_failure(&args, &o);
        assert!(err.contains("exists and is not a directory"), "{err}");
    }
    // Through $STRATA_STORE too.
    let st = Store::uninitialised(&file);
    let src = st.file("a.raw");
    sparse_file(&src, MIB);
    let err = st.fails(&["import", p(&src), "x"]);
    assert!(err.contains("is not a directory"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    // A directory that is not a store is not made into one by accident.
    let empty = sandbox.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let st = Store::uninitialised(&empty);
    for args in [vec!["images"], vec!["import", p(&src), "x"], vec!["verify"]] {
        let err = st.fails(&args);
        assert!(err.contains("is not a Strata store"), "{err}");
        assert!(err.contains("strata init"), "says what to do: {err}");
    }
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    let missing = sandbox.path().join("missing");
    let err = Store::uninitialised(&missing).fails(&["stats"]);
    assert!(err.contains("is not a Strata store"), "{err}");
    assert!(!missing.exists());
}

/// Every file under `dir` with its content, for before/after comparisons.
fn tree_contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                out.push((path.clone(), Vec::new()));
                stack.push(path);
            } else {
                let data = std::fs::read(&path).unwrap();
                out.push((path, data));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_store_of_a_newer_format_is_refused() {
    let (st, keep) = store_with_image();
    let cfg = st.path().join("strata.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&cfg).unwrap()).unwrap();
    v["format"] = Value::from(99);
    v["something_new"] = Value::from("a field this build does not know");
    std::fs::write(&cfg, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    let before = tree_contents(st.path());
    let out = st.file("out.raw");
    for args in [
        vec!["images"],
        vec!["stats"],
        vec!["verify"],
        vec!["gc"],
        vec!["log", "keep"],
        vec!["import", p(&keep), "keep"],
        vec!["export", "keep", p(&out)],
        vec!["tag", "rm", "keep", "t1"],
        vec!["rm", "keep"],
    ] {
        let err = st.fails(&args);
        assert!(err.contains("uses format 99"), "{args:?}: {err}");
        assert!(err.contains("newer than this build supports"), "{err}");
        assert!(err.contains("upgrade strata"), "{err}");
    }
    assert!(!out.exists());
    assert_eq!(tree_contents(st.path()), before, "the store was modified");
}

#[test]
fn init_refuses_a_non_empty_directory_and_an_existing_store() {
    let (st, _) = store_with_image();
    let before = st.snapshot();
    let contents = tree_contents(st.path());
    let err = st.fails(&["init", p(st.path())]);
    assert!(err.contains("already holds a Strata store"), "{err}");
    let err = st.fails(&["init"]);
    assert!(err.contains("already holds a Strata store"), "{err}");
    assert_eq!(tree_contents(st.path()), contents);
    st.assert_unchanged(&before);

    let sandbox = tempfile::tempdir().unwrap();
    let dir = sandbox.path().join("busy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let args = ["init", p(&dir)];
    let o = strata_without_store(sandbox.path(), &args);
    let err = assert_clean_failure(&args, &o);
    assert!(err.contains("is not empty"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1, "init left files behind");
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"mine");
}

// ---- export -------------------------------------------------------------------------

#[test]
fn export_does_not_overwrite_without_force() {
    let (st, keep) = store_with_image();
    let before = st.snapshot();
    let out = st.file("exists.raw");
    std::fs::write(&out, b"do not touch").unwrap();
    for fmt in ["raw", "qcow2"] {
        refused(
            &st,
            &before,
            &["export", "keep", p(&out), "--format", fmt],
            &["exists; pass --force to replace it"],
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"do not touch");
    }
    refused(
        &st,
        &before,
        &["export", "keep", p(st.dir()), "--force"],
        &["is a directory"],
    );
    refused(
        &st,
        &before,
        &["export", "keep", p(&st.file("x.vmdk")), "--format", "vmdk"],
        &["choose raw or qcow2"],
    );
    refused(
        &st,
        &before,
        &["export", "keep", p(&st.file("x.img")), "--format", "qcow3"],
        &["unknown image format"],
    );
    refused(
        &st,
        &before,
        &["export", "keep", p(&st.file("no-such-dir/x.raw"))],
        &["no-such-dir"],
    );
    // No half-written files next to the destinations.
    let names: Vec<String> = std::fs::read_dir(st.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("partial")),
        "left partial files: {names:?}"
    );
    // With --force it is replaced by the image.
    st.json(&["export", "keep", p(&out), "--force"]);
    assert!(images_identical(&keep, &out));
}

// ---- a full disk --------------------------------------------------------------------

/// A tmpfs mounted for the duration of a test; unmounted on drop, whatever happens.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        let opt = format!("size={size}");
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &opt, "tmpfs", p(dir)])
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds it open; detach it so the directory can go.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

#[test]
fn a_full_disk_during_import_leaves_the_store_intact() {
    let mountpoint = tempfile::tempdir().unwrap();
    let _tmpfs = match Tmpfs::mount(mountpoint.path(), "24m") {
        Ok(m) => m,
        Err(reason) => {
            eprintln!("SKIPPED a_full_disk_during_import_leaves_the_store_intact: {reason}");
            return;
        }
    };
    let st = Store::at(&mountpoint.path().join("store"));
    // Sources and exports live in the scratch directory, on the real disk.
    let small = st.file("small.raw");
    sparse_file(&small, 4 * MIB);
    write_random(&small, 0, MIB as usize, 5);
    let small_id = st.import(&small, "small", &[])["version"]
        .as_str()
        .unwrap()
        .to_string();
    let before = st.snapshot();

    // 40 MiB of random data cannot be compressed into 24 MiB.
    let big = st.file("big.raw");
    write_random(&big, 0, 40 * MIB as usize, 6);
    for target in ["big", "small", "small:grow"] {
        let err = refused(
            &st,
            &before,
            &["import", p(&big), target],
            &["No space left on device"],
        );
        assert!(err.contains("importing"), "{err}");
    }
    assert!(st.fails(&["log", "big"]).contains("no image named"));
    let log = st.json(&["log", "small"]);
    assert_eq!(log.as_array().unwrap().len(), 1);
    assert_eq!(log[0]["id"].as_str().unwrap(), small_id);
    st.assert_exports_as("small", "raw", &small);
    st.assert_exports_as("small", "qcow2", &small);

    // The space the failed imports used was given back: a small import fits again.
    write_random(&small, 2 * MIB, MIB as usize, 7);
    let r = st.import(&small, "small", &[]);
    assert_eq!(r["parent"].as_str().unwrap(), small_id);
    st.assert_exports_as("small", "raw", &small);
    st.verify_ok();
}
