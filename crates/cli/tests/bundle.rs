//! `strata bundle export|import`: versions carried in files between stores, checked
//! with qemu-img compare, `strata verify`, and damaged bundles that must be refused
//! without harm.

mod common;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A 48 MiB image: random, text and repeated regions, zero gaps; then v2 rewrites
/// 3 MiB in place and appends 2 MiB of text. Returns (v1 copy, v2 file).
fn two_versions(st: &Store) -> (std::path::PathBuf, std::path::PathBuf) {
    let img = st.file("disk.raw");
    sparse_file(&img, 48 * MIB);
    write_random(&img, 0, 8 * MIB as usize, 1);
    write_text(&img, 12 * MIB, 10 * MIB as usize, 2);
    for i in 0..8 {
        write_at(&img, 30 * MIB + i * 256 * 1024, &[0x5a; 64 * 1024]);
    }
    st.import(&img, "gold", &["-m", "v1"]);
    let v1 = st.file("v1.raw");
    std::fs::copy(&img, &v1).unwrap();
    write_random(&img, 2 * MIB, 3 * MIB as usize, 3);
    write_text(&img, 40 * MIB, 2 * MIB as usize, 4);
    st.import(&img, "gold", &["-m", "v2"]);
    (v1, img)
}

#[test]
fn whole_and_incremental_bundles_carry_versions_exactly() {
    let a = Store::new();
    let (v1, v2) = two_versions(&a);
    let full = a.file("v1.bundle");
    let inc = a.file("v2-since-v1.bundle");
    let ex1 = a.json(&["bundle", "export", "gold@main~1", p(&full)]);
    let ex2 = a.json(&["bundle", "export", "gold", p(&inc), "--since", "main~1"]);
    assert_eq!(u(&ex1["version_objects"]), 1);
    assert_eq!(ex2["since"], ex1["version"]);
    // The incremental bundle holds the changed blocks (5 MiB of 64 KiB blocks, some
    // as deltas), not the image: far smaller than the whole one.
    assert!(u(&ex2["data_objects"]) <= 80 + 2, "{ex2:#}");
    assert!(
        u(&ex2["file_bytes"]) * 2 < u(&ex1["file_bytes"]),
        "incremental {ex2:#} vs whole {ex1:#}"
    );
    assert_eq!(
        u(&ex1["file_bytes"]),
        std::fs::metadata(&full).unwrap().len()
    );
    // No partial file is left beside the bundle.
    let leftovers: Vec<_> = std::fs::read_dir(a.dir())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.contains("strata-partial").then_some(n)
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let b = Store::new();
    let im1 = b.json(&["bundle", "import", p(&full)]);
    assert_eq!(im1["image"], "gold");
    assert_eq!(im1["previous"], Value::Null);
    assert_eq!(
        u(&im1["new_objects"]),
        u(&ex1["data_objects"]) + u(&ex1["tree_objects"]) + 1
    );
    b.assert_exports_as("gold", "raw", &v1);
    let im2 = b.json(&["bundle", "import", p(&inc)]);
    assert_eq!(im2["previous"], ex1["version"], "fast-forwards main");
    assert_eq!(im2["version"], ex2["version"]);
    b.assert_exports_as("gold", "raw", &v2);
    b.assert_exports_as("gold@main~1", "qcow2", &v1);
    assert_eq!(b.version_id("gold"), a.version_id("gold"));
    b.verify_ok();
    // History made of bundles reads like the original.
    let log = b.json(&["log", "gold"]);
    assert_eq!(log.as_array().unwrap().len(), 2, "{log:#}");

    // Importing again changes nothing and stores nothing new.
    let again = b.json(&["bundle", "import", p(&inc)]);
    assert_eq!(u(&again["new_objects"]), 0);

    // Into another image and branch of a store that only has the whole version.
    let c = Store::new();
    c.json(&[
        "bundle",
        "import",
        p(&full),
        "--image",
        "win/gold",
        "--branch",
        "stable",
    ]);
    c.assert_exports_as("win/gold:stable", "raw", &v1);
    // A whole bundle of v2 into a store holding v1 under another name: only what
    // is new is stored (dedup across images).
    let whole2 = a.file("v2.bundle");
    a.json(&["bundle", "export", "gold", p(&whole2)]);
    let im = c.json(&["bundle", "import", p(&whole2)]);
    assert!(
        u(&im["new_objects"]) < u(&im["data_objects"]) / 2,
        "shared blocks were stored again: {im:#}"
    );
    c.assert_exports_as("gold", "raw", &v2);
    c.verify_ok();
}

#[test]
fn bundle_import_refuses_what_does_not_fit() {
    let a = Store::new();
    two_versions(&a);
    let full = a.file("v1.bundle");
    let inc = a.file("inc.bundle");
    a.ok(&["bundle", "export", "gold@main~1", p(&full)]);
    a.ok(&["bundle", "export", "gold", p(&inc), "--since", "main~1"]);
    // Exporting onto an existing file needs --force.
    let err = a.fails(&["bundle", "export", "gold", p(&full)]);
    assert!(err.contains("--force"), "{err}");

    let b = Store::new();
    // Changes since a version this store lacks.
    let err = b.fails(&["bundle", "import", p(&inc)]);
    assert!(err.contains("lacks"), "{err}");
    assert_eq!(b.json(&["images"]).as_array().unwrap().len(), 0);

    // A branch that went elsewhere is not overwritten without --force.
    let other = b.file("other.raw");
    sparse_file(&other, 48 * MIB);
    write_random(&other, 0, MIB as usize, 99);
    b.import(&other, "gold", &[]);
    let before = b.version_id("gold");
    let err = b.fails(&["bundle", "import", p(&full)]);
    assert!(
        err.contains("not an ancestor") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(b.version_id("gold"), before);
    let forced = b.json(&["bundle", "import", p(&full), "--force"]);
    assert_eq!(forced["previous"].as_str(), Some(before.as_str()));
    b.verify_ok();

    // Not a bundle at all.
    let junk = b.file("junk.bundle");
    std::fs::write(&junk, b"hello, this is not a bundle").unwrap();
    let err = b.fails(&["bundle", "import", p(&junk)]);
    assert!(err.contains("not a strata bundle"), "{err}");
    let err = b.fails(&["bundle", "import", p(&b.file("absent.bundle"))]);
    assert!(err.contains("absent.bundle"), "{err}");
}

/// Truncated and bit-flipped bundles are refused with a clear error; the receiving
/// store keeps its refs, and after gc it is exactly as before and verifies clean.
#[test]
fn damaged_bundles_are_refused_without_harm() {
    let a = Store::new();
    let (v1, _) = two_versions(&a);
    let full = a.file("v1.bundle");
    a.ok(&["bundle", "export", "gold@main~1", p(&full)]);
    let bytes = std::fs::read(&full).unwrap();
    let len = bytes.len() as u64;
    let hlen = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as u64;
    let stream_start = 12 + hlen;

    let b = Store::new();
    let keep = b.file("keep.raw");
    sparse_file(&keep, 8 * MIB);
    write_text(&keep, 0, 4 * MIB as usize, 7);
    b.import(&keep, "mine", &[]);
    b.ok(&["gc"]);
    let before = b.snapshot();

    let mut rng = Rng::new(0xb0d1e);
    let damaged = b.file("damaged.bundle");
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in [
        4,
        11,
        stream_start - 1,
        stream_start + 3,
        len / 3,
        len / 2,
        len - 40,
        len - 1,
    ] {
        cases.push((format!("cut at {cut}"), bytes[..cut as usize].to_vec()));
    }
    for _ in 0..10 {
        let at = stream_start + rng.below(len - stream_start);
        let mut d = bytes.clone();
        d[at as usize] ^= 1 << rng.below(8);
        cases.push((format!("bit flipped at {at}"), d));
    }
    let mut header_lies = bytes.clone();
    header_lies[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
    cases.push(("huge header length".into(), header_lies));
    let mut future = bytes.clone();
    future[7] = 9;
    cases.push(("future format".into(), future));

    for (what, data) in &cases {
        std::fs::write(&damaged, data).unwrap();
        let out = b.run(&["bundle", "import", p(&damaged)]);
        let err = assert_clean_failure(&["bundle", "import", what], &out);
        assert!(err.contains("bundle"), "{what}: {err}");
        assert_eq!(b.json(&["images"]), before.images, "{what}: refs changed");
        b.ok(&["gc"]);
        b.assert_unchanged(&before);
    }
    // The intact bundle still imports and is the version.
    b.json(&["bundle", "import", p(&full)]);
    b.assert_exports_as("gold", "raw", &v1);
}
