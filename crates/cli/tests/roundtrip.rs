//! Images go into the store and come back out identical, as `qemu-img compare` sees
//! them; history, refs, diff, dedup and verify behave as documented.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BS: u64 = 64 * KIB;

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("expected a number, got {v}"))
}

fn strings(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|x| s(x).to_string())
        .collect();
    out.sort();
    out
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    out.sort();
    out
}

/// `(offset, length)` of every range `strata diff --json A B` reports.
fn diff_ranges(store: &Store, a: &str, b: &str) -> Vec<(u64, u64)> {
    let d = store.json(&["diff", a, b]);
    d["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (u(&r["offset"]), u(&r["length"])))
        .collect()
}

/// Merge a set of changed blocks into the ranges diff reports (adjacent blocks
/// merged, the last block clipped to `size`).
fn block_ranges(blocks: &BTreeSet<u64>, bs: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        let off = b * bs;
        let len = bs.min(size - off);
        match out.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => out.push((off, len)),
        }
    }
    out
}

// ---- raw ----------------------------------------------------------------------------

#[test]
fn sparse_raw_round_trips_to_raw_and_qcow2_keeping_holes() {
    let st = Store::new();
    let src = st.file("src.raw");
    let size = 16 * MIB; // 256 blocks of 64 KiB
    sparse_file(&src, size);
    let data_blocks = [0u64, 1, 2, 10, 50, 51, 52, 53, 255];
    for (i, b) in data_blocks.iter().enumerate() {
        write_random(&src, b * BS, BS as usize, 100 + i as u64);
    }
    // A block with only a little data in it.
    write_random(&src, 30 * BS + 100, 1000, 7);
    // Blocks explicitly written with zeros: allocated in the file, zero in content.
    let zero_blocks = [20u64, 21, 22, 60];
    write_at(&src, 20 * BS, &vec![0u8; 3 * BS as usize]);
    write_at(&src, 60 * BS, &vec![0u8; BS as usize]);

    let mut data: BTreeSet<u64> = data_blocks.iter().copied().collect();
    data.insert(30);
    let zeros: BTreeSet<u64> = zero_blocks.iter().copied().collect();
    let nblocks = size / BS;

    // The file system must keep the holes, or there is nothing to check. (For raw
    // files qemu reports holes as present zeros: raw has no backing to fall to.)
    let src_kinds = map_kinds(&qemu_map(&src), BS, size);
    for b in 0..nblocks {
        let allocated = data.contains(&b) || zeros.contains(&b);
        assert_eq!(
            src_kinds[b as usize] == MapKind::Data,
            allocated,
            "source block {b}: {:?}",
            src_kinds[b as usize]
        );
    }

    let r = st.import(&src, "disk", &["-m", "sparse raw"]);
    assert_eq!(s(&r["format"]), "raw");
    assert_eq!(u(&r["virtual_size"]), size);
    assert_eq!(u(&r["block_size"]), BS);
    assert_eq!(u(&r["data_blocks"]), data.len() as u64);
    assert_eq!(u(&r["zero_blocks"]), zeros.len() as u64);
    assert_eq!(
        u(&r["unwritten_blocks"]),
        nblocks - data.len() as u64 - zeros.len() as u64
    );
    assert_eq!(u(&r["data_bytes"]), data.len() as u64 * BS);

    // -> raw: identical, data only where the source had data (zeros become holes).
    let raw = st.file("out.raw");
    st.export("disk", &raw, "raw");
    assert!(images_identical(&src, &raw));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), size);
    let raw_kinds = map_kinds(&qemu_map(&raw), BS, size);
    for b in 0..nblocks {
        assert_eq!(
            raw_kinds[b as usize] == MapKind::Data,
            data.contains(&b),
            "raw export block {b}: {:?}",
            raw_kinds[b as usize]
        );
    }

    // -> qcow2: identical, consistent, holes where the source had holes and zero
    // clusters where it had written zeros.
    let qcow = st.file("out.qcow2");
    st.export("disk", &qcow, "qcow2");
    assert!(images_identical(&src, &qcow));
    qemu_img(&["check", "-f", "qcow2", p(&qcow)]);
    let q_kinds = map_kinds(&qemu_map(&qcow), BS, size);
    for b in 0..nblocks {
        let want = if data.contains(&b) {
            MapKind::Data
        } else if zeros.contains(&b) {
            MapKind::Zero
        } else {
            MapKind::Hole
        };
        assert_eq!(q_kinds[b as usize], want, "qcow2 export block {b}");
    }

    // The exported qcow2 imports back to the very same block map.
    let before = st.json(&["show", "disk"]);
    let r2 = st.import(&qcow, "disk", &["-m", "re-import of the export"]);
    assert_eq!(r2["parent"], before["id"]);
    assert_eq!(u(&r2["new_chunks"]), 0);
    let after = st.json(&["show", "disk"]);
    assert_eq!(after["version"]["root"], before["version"]["root"]);
    assert!(diff_ranges(&st, "disk@main~1", "disk@main").is_empty());
    st.verify_ok();
}

// ---- qcow2 backing chains -----------------------------------------------------------

/// base (converted from a raw file) <- mid <- top, every layer written by qemu-io,
/// top larger than its backing file; all layers of qcow2 `compat`.
fn backing_chain_round_trips(compat: &str) {
    let st = Store::new();
    let src = st.file("base-src.raw");
    sparse_file(&src, 32 * MIB);
    write_random(&src, 0, 2 * MIB as usize, 1);
    write_text(&src, 5 * MIB, MIB as usize, 2);
    write_random(&src, 20 * MIB + 12345, 70000, 3);
    let base = st.file("base.qcow2");
    let mid = st.file("mid.qcow2");
    let top = st.file("top.qcow2");
    let opt = format!("compat={compat}");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &opt,
        p(&src),
        p(&base),
    ]);
    // Relative backing names, resolved against the overlay's directory.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opt,
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&mid),
    ]);
    qemu_io("qcow2", &mid, "write -P 0x33 1M 512k");
    qemu_io("qcow2", &mid, "write -P 0x44 16M 64k");
    qemu_io("qcow2", &mid, "write -z 5M 256k");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opt,
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        p(&top),
        "40M",
    ]);
    qemu_io("qcow2", &top, "write -P 0x55 2M 4k");
    qemu_io("qcow2", &top, "write -P 0x66 34M 1M");
    qemu_io("qcow2", &top, "write -z 0 64k");
    qemu_io("qcow2", &top, "write -P 0x77 20M 512");
    let info: Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        "--backing-chain",
        p(&top),
    ]))
    .unwrap();
    assert_eq!(
        info.as_array().unwrap().len(),
        3,
        "a chain of three: {info}"
    );

    let r = st.import(&top, "vm", &[]);
    assert_eq!(s(&r["format"]), "qcow2");
    assert_eq!(u(&r["virtual_size"]), 40 * MIB);
    st.assert_exports_as("vm", "qcow2", &top);
    st.assert_exports_as("vm", "raw", &top);
    let q = st.file("vm.qcow2");
    st.export("vm", &q, "qcow2");
    qemu_img(&["check", "-f", "qcow2", p(&q)]);
    // The lower layers on their own are different images.
    assert!(!images_identical(&mid, &q));
    st.verify_ok();
}

#[test]
fn qcow2_v3_backing_chain_round_trips() {
    backing_chain_round_trips("1.1");
}

#[test]
fn qcow2_v2_backing_chain_round_trips() {
    backing_chain_round_trips("0.10");
}

// ---- compressed qcow2 ---------------------------------------------------------------

#[test]
fn qcow2_with_compressed_clusters_round_trips() {
    let st = Store::new();
    let src = st.file("src.raw");
    sparse_file(&src, 16 * MIB);
    write_text(&src, 0, 6 * MIB as usize, 11);
    write_random(&src, 8 * MIB, MIB as usize, 12);
    write_text(&src, 15 * MIB + 4321, 100_000, 13);

    let mut first: Option<Value> = None;
    for (name, opts) in [("zlib", None), ("zstd", Some("compression_type=zstd"))] {
        let q = st.file(&format!("{name}.qcow2"));
        let mut args = vec!["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"];
        if let Some(o) = opts {
            args.extend_from_slice(&["-o", o]);
        }
        args.extend_from_slice(&[p(&src), p(&q)]);
        qemu_img(&args);
        assert!(
            compressed_clusters(&q) > 0,
            "{name}: qemu-img convert -c made no compressed clusters"
        );
        let r = st.import(&q, name, &[]);
        assert_eq!(s(&r["format"]), "qcow2");
        st.assert_exports_as(name, "qcow2", &q);
        st.assert_exports_as(name, "raw", &src);
        match &first {
            None => first = Some(r),
            Some(f) => {
                // Same content, whatever the compression: every block deduplicated.
                assert_eq!(u(&r["new_chunks"]), 0, "{r:#}");
                assert_eq!(u(&r["new_stored_bytes"]), 0);
                assert_eq!(r["data_blocks"], f["data_blocks"]);
                assert_eq!(u(&r["reused_chunks"]), u(&f["data_blocks"]));
            }
        }
    }
    st.verify_ok();
}

// ---- other formats through qemu-img -------------------------------------------------

#[test]
fn vmdk_vhdx_vdi_and_vpc_sources_import_through_qemu_img() {
    let st = Store::new();
    let src = st.file("src.raw");
    sparse_file(&src, 12 * MIB);
    write_random(&src, 0, 300_000, 21);
    write_text(&src, 4 * MIB, 2 * MIB as usize, 22);
    write_random(&src, 12 * MIB - 70_000, 70_000, 23);
    for (fmt, opts) in [
        ("vmdk", None),
        ("vmdk", Some("subformat=streamOptimized")),
        ("vhdx", None),
        ("vdi", None),
        ("vpc", None),
    ] {
        let name = format!("{fmt}{}", if opts.is_some() { "-stream" } else { "" });
        let f = st.file(&format!("{name}.img"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        if let Some(o) = opts {
            args.extend_from_slice(&["-o", o]);
        }
        args.extend_from_slice(&[p(&src), p(&f)]);
        qemu_img(&args);
        let r = st.import(&f, &name, &[]);
        assert_eq!(s(&r["format"]), fmt, "{name}");
        assert_eq!(u(&r["virtual_size"]), virtual_size(&f), "{name}");
        st.assert_exports_as(&name, "qcow2", &f);
        st.assert_exports_as(&name, "raw", &f);
        if fmt != "vpc" {
            // (VHD rounds the size to its disk geometry; the others keep it.)
            st.assert_exports_as(&name, "raw", &src);
        }
    }
    st.verify_ok();
}

// ---- block sizes --------------------------------------------------------------------

#[test]
fn block_sizes_4k_and_1m_with_an_unaligned_virtual_size() {
    let st = Store::new();
    let size = 10 * MIB + 12345;
    let src = st.file("odd.raw");
    sparse_file(&src, size);
    write_random(&src, 3 * 4096, 3 * 4096, 31);
    write_text(&src, 3 * MIB + 777, 200_000, 32);
    write_random(&src, 6 * MIB - 10, 20, 33);
    // The last, partial block of every block size.
    write_random(&src, size - 5000, 5000, 34);
    for (arg, bs) in [("4K", 4 * KIB), ("1M", MIB)] {
        let name = format!("odd-{arg}");
        let r = st.import(&src, &name, &["--block-size", arg]);
        assert_eq!(u(&r["block_size"]), bs);
        assert_eq!(u(&r["virtual_size"]), size);
        assert_eq!(u(&r["blocks"]), size.div_ceil(bs));
        let show = st.json(&["show", &name]);
        assert_eq!(u(&show["version"]["block_size"]), bs);
        assert_eq!(u(&show["version"]["virtual_size"]), size);

        let raw = st.file(&format!("{name}.raw"));
        st.export(&name, &raw, "raw");
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), size);
        assert_eq!(std::fs::read(&raw).unwrap(), std::fs::read(&src).unwrap());
        assert!(images_identical(&src, &raw));

        let q = st.file(&format!("{name}.qcow2"));
        st.export(&name, &q, "qcow2");
        qemu_img(&["check", "-f", "qcow2", p(&q)]);
        // qcow2 sizes are whole 512-byte sectors.
        assert_eq!(virtual_size(&q), size.div_ceil(512) * 512);
        assert!(images_identical(&src, &q));

        // A later version of the image keeps its block size.
        let fails = st.fails(&["import", p(&src), &name, "--block-size", "64K"]);
        assert!(fails.contains("cannot change"), "{fails}");
    }
    st.verify_ok();
}

// ---- history, refs, diff, clone -----------------------------------------------------

#[test]
fn versions_refs_diff_and_clone() {
    let st = Store::new();
    let size = 8 * MIB; // 128 blocks
    let file = st.file("disk.raw");
    sparse_file(&file, size);
    for b in [0u64, 1, 2, 3, 4, 5, 16, 17, 80, 127] {
        write_random(&file, b * BS, BS as usize, 1000 + b);
    }
    let r1 = st.import(&file, "disk", &["-m", "first", "--author", "tester"]);
    let v1 = s(&r1["version"]).to_string();
    assert_eq!(r1["parent"], Value::Null);
    let v1_copy = st.file("v1.raw");
    std::fs::copy(&file, &v1_copy).unwrap();
    st.json(&["tag", "add", "disk@main", "v1"]);

    // Change known blocks: overwrite data, fill holes, zero a data block, touch
    // a few bytes in the middle of a block, and the last block.
    let mut changed = BTreeSet::new();
    for b in [3u64, 4, 5, 6] {
        write_random(&file, b * BS, BS as usize, 2000 + b);
        changed.insert(b);
    }
    write_random(&file, 40 * BS, BS as usize, 2040);
    changed.insert(40);
    write_at(&file, 16 * BS, &vec![0u8; BS as usize]);
    changed.insert(16);
    write_random(&file, 80 * BS + 1234, 100, 2080);
    changed.insert(80);
    write_random(&file, size - 10, 10, 2127);
    changed.insert(127);

    let r2 = st.import(&file, "disk", &["-m", "second"]);
    let v2 = s(&r2["version"]).to_string();
    assert_eq!(s(&r2["parent"]), v1);
    assert_eq!(u(&r2["new_chunks"]), 7, "{r2:#}");
    let v2_copy = st.file("v2.raw");
    std::fs::copy(&file, &v2_copy).unwrap();

    // log shows the child with its parent.
    let log = st.json(&["log", "disk"]);
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(s(&log[0]["id"]), v2);
    assert_eq!(strings(&log[0]["parents"]), vec![v1.clone()]);
    assert_eq!(s(&log[0]["message"]), "second");
    assert_eq!(s(&log[1]["id"]), v1);
    assert_eq!(s(&log[1]["author"]), "tester");
    assert!(log[1]["parents"].as_array().unwrap().is_empty());
    assert_eq!(
        st.json(&["log", "disk", "-n", "1"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let text = st.ok(&["log", "disk"]);
    assert!(
        text.contains(&format!("version {v2}")) && text.contains("second"),
        "{text}"
    );

    // diff reports exactly the blocks written.
    let expect = block_ranges(&changed, BS, size);
    assert_eq!(diff_ranges(&st, "disk@v1", "disk@main"), expect);
    assert_eq!(diff_ranges(&st, "disk@main", "disk@v1"), expect);
    let d = st.json(&["diff", "disk@v1", "disk@main"]);
    assert_eq!(u(&d["changed_blocks"]), changed.len() as u64);
    assert_eq!(
        u(&d["changed_bytes"]),
        expect.iter().map(|(_, l)| l).sum::<u64>()
    );
    assert_eq!((s(&d["a"]), s(&d["b"])), (v1.as_str(), v2.as_str()));
    assert!(diff_ranges(&st, "disk@v1", "disk@v1").is_empty());
    let stat = st.ok(&["diff", "--stat", "disk@v1", "disk@main"]);
    assert!(
        stat.contains(&format!("in {} ranges", expect.len())),
        "{stat}"
    );

    // Revisions: ~N, tags, branches, id prefixes.
    assert_eq!(st.version_id("disk@main~1"), v1);
    assert_eq!(st.version_id("disk@main~"), v1);
    assert_eq!(st.version_id("disk@v1"), v1);
    assert_eq!(st.version_id("disk:main"), v2);
    assert_eq!(st.version_id("disk"), v2);
    assert_eq!(st.version_id(&format!("disk@{}", &v2[..12])), v2);
    assert_eq!(st.version_id(&format!("disk@{}~1", &v2[..8])), v1);
    assert_eq!(
        st.version_id(&format!("disk@{}", v1[..10].to_uppercase())),
        v1
    );
    let shortest = (4..=64)
        .find(|&n| v1[..n] != v2[..n])
        .expect("distinct ids");
    assert_eq!(st.version_id(&format!("disk@{}", &v1[..shortest])), v1);
    assert_eq!(st.version_id(&format!("disk@{}", &v2[..shortest])), v2);
    let show = st.json(&["show", "disk@v1"]);
    assert_eq!(strings(&show["refs"]), vec!["disk@v1".to_string()]);
    assert_eq!(s(&show["version"]["message"]), "first");
    let show = st.ok(&["show", "disk@main"]);
    assert!(
        show.contains(&v2) && show.contains(&format!("parents   {v1}")),
        "{show}"
    );
    st.assert_exports_as("disk@v1", "raw", &v1_copy);
    st.assert_exports_as(&format!("disk@{}", &v1[..8]), "qcow2", &v1_copy);
    st.assert_exports_as("disk@main", "qcow2", &v2_copy);

    // images
    let imgs = st.json(&["images"]);
    let imgs = imgs.as_array().unwrap();
    assert_eq!(imgs.len(), 1);
    assert_eq!(s(&imgs[0]["name"]), "disk");
    assert_eq!(u(&imgs[0]["block_size"]), BS);
    assert_eq!(s(&imgs[0]["branches"][0]["name"]), "main");
    assert_eq!(s(&imgs[0]["branches"][0]["version"]), v2);
    assert_eq!(s(&imgs[0]["tags"][0]["name"]), "v1");
    assert_eq!(s(&imgs[0]["tags"][0]["version"]), v1);
    assert!(st.ok(&["images"]).contains("disk"));

    // branch add / ls / rm
    let b = st.json(&["branch", "add", "disk@v1", "old"]);
    assert_eq!(s(&b["version"]), v1);
    let ls = st.json(&["branch", "ls", "disk"]);
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|r| s(&r["name"]))
        .collect();
    assert_eq!(names, ["main", "old"]);
    assert_eq!(st.version_id("disk:old"), v1);
    st.assert_exports_as("disk:old", "raw", &v1_copy);
    let rm = st.json(&["branch", "rm", "disk", "old"]);
    assert_eq!(s(&rm["was"]), v1);
    let ls = st.json(&["branch", "ls", "disk"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert!(st
        .fails(&["show", "disk:old"])
        .contains("no branch, tag or version"));

    // tag add / ls / rm
    st.json(&["tag", "add", "disk@main", "v2"]);
    let ls = st.json(&["tag", "ls", "disk"]);
    let tags: Vec<(&str, &str)> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (s(&r["name"]), s(&r["version"])))
        .collect();
    assert_eq!(tags, [("v1", v1.as_str()), ("v2", v2.as_str())]);
    assert!(st
        .fails(&["tag", "add", "disk@main", "v1"])
        .contains("already has a tag"));
    assert!(st
        .fails(&["branch", "add", "disk@main", "v1"])
        .contains("already has a tag"));
    st.json(&["tag", "rm", "disk", "v2"]);
    assert_eq!(st.json(&["tag", "ls", "disk"]).as_array().unwrap().len(), 1);

    // Import onto a new branch: grows from main, main does not move.
    write_random(&file, 100 * BS, BS as usize, 3100);
    let r3 = st.import(&file, "disk:dev", &["-m", "on dev"]);
    let v3 = s(&r3["version"]).to_string();
    assert_eq!(s(&r3["branch"]), "dev");
    assert_eq!(s(&r3["parent"]), v2);
    assert_eq!(st.version_id("disk"), v2);
    assert_eq!(st.version_id("disk:dev"), v3);
    let log: Vec<String> = st
        .json(&["log", "disk:dev"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| s(&e["id"]).to_string())
        .collect();
    assert_eq!(log, [v3.clone(), v2.clone(), v1.clone()]);
    assert_eq!(diff_ranges(&st, "disk@main", "disk:dev"), [(100 * BS, BS)]);
    st.assert_exports_as("disk:dev", "raw", &file);

    // clone shares everything: no stored bytes added.
    let before = st.stats();
    let c = st.json(&["clone", "disk@v1", "copy"]);
    assert_eq!(s(&c["version"]), v1);
    let after = st.stats();
    assert_eq!(u(&after["stored_bytes"]), u(&before["stored_bytes"]));
    assert_eq!(
        u(&after["stored_data_bytes"]),
        u(&before["stored_data_bytes"])
    );
    assert_eq!(u(&after["packs"]), u(&before["packs"]));
    assert_eq!(u(&after["images"]), u(&before["images"]) + 1);
    assert_eq!(st.version_id("copy"), v1);
    st.assert_exports_as("copy", "raw", &v1_copy);
    // A version of the clone grows from the cloned version.
    let r4 = st.import(&v2_copy, "copy", &[]);
    assert_eq!(s(&r4["parent"]), v1);
    assert_eq!(u(&r4["new_chunks"]), 0);
    assert_ne!(s(&r4["version"]), v2, "different parent, different version");
    assert_eq!(diff_ranges(&st, "copy@main", "disk@main"), Vec::new());
    assert!(st
        .fails(&["clone", "disk@v1", "copy"])
        .contains("already exists"));

    // rm + gc keep everything still reachable.
    st.json(&["rm", "copy"]);
    assert!(st.fails(&["show", "copy"]).contains("no image named"));
    st.json(&["gc"]);
    st.assert_exports_as("disk@v1", "raw", &v1_copy);
    st.assert_exports_as("disk", "raw", &v2_copy);
    st.assert_exports_as("disk:dev", "raw", &file);
    st.verify_ok();
}

// ---- deduplication across clones ----------------------------------------------------

fn make_base(path: &Path) {
    sparse_file(path, 64 * MIB);
    for (i, start) in [0u64, 16, 40].into_iter().enumerate() {
        write_random(path, start * MIB, 8 * MIB as usize, 500 + i as u64);
    }
}

#[test]
fn ten_clones_with_small_changes_cost_little() {
    let st = Store::new();
    let work = st.file("work.raw");
    make_base(&work);
    let base = st.import(&work, "base", &["-m", "gold"]);
    let base_id = s(&base["version"]).to_string();
    let base_data_blocks = u(&base["data_blocks"]);
    assert_eq!(base_data_blocks, 24 * MIB / BS);
    let base_stats = st.stats();
    let base_stored = u(&base_stats["stored_data_bytes"]);

    let nblocks = 64 * MIB / BS;
    let per_variant = MIB / BS; // 16 blocks of 64 KiB
    let mut rng = Rng::new(42);
    for i in 0..10u64 {
        let name = format!("vm{i}");
        st.json(&["clone", "base@main", &name]);
        make_base(&work);
        let mut picked = BTreeSet::new();
        while (picked.len() as u64) < per_variant {
            picked.insert(rng.below(nblocks));
        }
        let fresh = picked.len() as u64;
        for (j, b) in picked.iter().enumerate() {
            write_random(&work, b * BS, BS as usize, 10_000 * (i + 1) + j as u64);
        }
        let r = st.import(&work, &name, &["-m", "variant"]);
        assert_eq!(s(&r["parent"]), base_id);
        assert_eq!(u(&r["new_chunks"]), fresh, "{r:#}");
        assert_eq!(u(&r["new_raw_bytes"]), fresh * BS);
        let in_holes = picked
            .iter()
            .filter(|b| {
                !((0..128).contains(*b) || (256..384).contains(*b) || (640..768).contains(*b))
            })
            .count() as u64;
        assert_eq!(u(&r["data_blocks"]), base_data_blocks + in_holes);
        assert_eq!(
            u(&r["reused_chunks"]),
            base_data_blocks - (fresh - in_holes)
        );
        let changed: BTreeSet<u64> = picked.clone();
        assert_eq!(
            diff_ranges(&st, "base", &name),
            block_ranges(&changed, BS, 64 * MIB)
        );
        st.assert_exports_as(&name, "raw", &work);
    }
    let stats = st.stats();
    let written = 10 * MIB;
    let stored = u(&stats["stored_data_bytes"]);
    let bound = base_stored + (written as f64 * 1.1) as u64 + 256 * KIB;
    assert!(
        stored < bound,
        "stored {stored} bytes, expected under {bound}: {stats:#}"
    );
    assert!(stored >= base_stored + written, "{stats:#}");
    let dedup = stats["dedup_ratio"].as_f64().unwrap();
    assert!(dedup > 5.0, "dedup ratio {dedup}: {stats:#}");
    assert_eq!(u(&stats["images"]), 11);
    assert_eq!(u(&stats["versions"]), 11);
    assert_eq!(
        u(&stats["unique_chunks"]),
        base_data_blocks + 10 * per_variant
    );
    st.verify_ok();
}

// ---- quickstart and --json ----------------------------------------------------------

/// Stops what `strata quickstart DIR` left running when dropped (the live half is
/// tested in `quickstart.rs`).
struct QuickstartStopper<'a>(&'a Path, std::path::PathBuf);

impl Drop for QuickstartStopper<'_> {
    fn drop(&mut self) {
        let out = strata_without_store(self.0, &["quickstart", "--stop", p(&self.1)]);
        assert!(
            out.status.success() || std::thread::panicking(),
            "quickstart --stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn quickstart_runs_and_prints_log_diff_and_stats() {
    let sandbox = tempfile::tempdir().unwrap();
    let dir = sandbox.path().join("qs");
    let _stop = QuickstartStopper(sandbox.path(), dir.clone());
    let out = strata_without_store(sandbox.path(), &["quickstart", p(&dir)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "strata log sample",
        "version ",
        "gold v2: patched",
        "strata diff sample@v1 sample@main",
        "changed in",
        "dedup ratio",
        "compression ratio",
        // Then the real thing.
        "strata channel publish sample@v1 sample/production",
        "strata point desktop start demo",
        "nbd+unix:///desktops/demo/user?socket=",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    let store = dir.join("store");
    let out = strata_without_store(
        sandbox.path(),
        &["--store", p(&store), "--json", "log", "sample"],
    );
    assert!(out.status.success());
    let log: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(log.as_array().unwrap().len(), 2);
    let out = strata_without_store(sandbox.path(), &["--store", p(&store), "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // --json: one document with what every step produced.
    let dir2 = sandbox.path().join("qs-json");
    let _stop2 = QuickstartStopper(sandbox.path(), dir2.clone());
    let out = strata_without_store(sandbox.path(), &["--json", "quickstart", p(&dir2)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "quickstart --json printed invalid JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert!(doc["store"].is_string());
    assert_eq!(doc["imports"].as_array().unwrap().len(), 2);
    assert!(doc["imports"][1]["version"].is_string());
    assert_eq!(doc["log"].as_array().unwrap().len(), 2);
    assert_eq!(u(&doc["diff"]["changed_bytes"]), 3 << 20);
    assert!(doc["stats"]["dedup_ratio"].as_f64().unwrap() > 1.0);
    assert!(s(&doc["nbd"]["os"]).starts_with("nbd+unix:///desktops/demo/os?socket="));
    assert_eq!(doc["qemu"][0], "qemu-system-x86_64");
}

#[test]
fn every_command_prints_valid_json() {
    let sandbox = tempfile::tempdir().unwrap();
    let path = sandbox.path().join("store");
    let out = strata_without_store(sandbox.path(), &["--json", "init", p(&path)]);
    assert!(out.status.success());
    let init: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(init["format"], Value::from(1));

    let st = Store::new();
    let f = st.file("a.raw");
    sparse_file(&f, 4 * MIB);
    write_random(&f, 0, 200_000, 1);
    // Store::json asserts success and exactly one JSON document on stdout.
    let r = st.json(&["import", p(&f), "img", "-m", "one"]);
    assert!(r["version"].is_string());
    write_random(&f, MIB, 4096, 2);
    st.json(&["import", p(&f), "img", "-m", "two"]);
    st.json(&["import", p(&f), "img:side"]);
    let out = st.file("out.raw");
    let e = st.json(&["export", "img@main~1", p(&out)]);
    assert_eq!(u(&e["virtual_size"]), 4 * MIB);
    st.json(&["export", "img", p(&out), "--format", "qcow2", "--force"]);
    assert!(st.json(&["images"]).is_array());
    assert!(st.json(&["log", "img"]).is_array());
    assert!(st.json(&["log", "img:side", "-n", "1"]).is_array());
    assert!(st.json(&["show", "img@main~1"])["id"].is_string());
    st.json(&["tag", "add", "img@main~1", "t1"]);
    assert!(st.json(&["tag", "ls", "img"]).is_array());
    st.json(&["tag", "rm", "img", "t1"]);
    st.json(&["branch", "add", "img@main", "b1"]);
    assert!(st.json(&["branch", "ls", "img"]).is_array());
    st.json(&["branch", "rm", "img", "b1"]);
    st.json(&["clone", "img@main", "img2"]);
    assert!(st.json(&["diff", "img@main~1", "img@main"])["ranges"].is_array());
    assert!(st.json(&["diff", "--stat", "img@main~1", "img2"])["changed_bytes"].is_u64());
    assert!(st.json(&["stats"])["stored_bytes"].is_u64());
    st.json(&["rm", "img2"]);
    assert!(st.json(&["gc"]).is_object());
    assert_eq!(st.json(&["verify"])["ok"], Value::Bool(true));

    // Failures with --json: `{"error": ...}` on stdout, a message on stderr.
    for args in [
        vec!["--json", "show", "nope"],
        vec!["--json", "export", "img@nope", p(&out)],
        vec!["--json", "import", "/nonexistent/file.raw", "img"],
    ] {
        let o = st.run(&args);
        assert_clean_failure(&args, &o);
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: invalid JSON ({e})"));
        assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
}

// ---- verify and damage --------------------------------------------------------------

/// A store with `disk` v1 (tagged v1, also cloned as `copy`) and v2 (one more block),
/// plus the pack files v1's import wrote and the ones v2's import added.
struct Damage {
    st: Store,
    v1: String,
    v2: String,
    v1_raw: std::path::PathBuf,
    v2_raw: std::path::PathBuf,
    v1_packs: Vec<std::path::PathBuf>,
    v2_packs: Vec<std::path::PathBuf>,
}

fn damage_setup() -> Damage {
    let st = Store::new();
    let f = st.file("disk.raw");
    sparse_file(&f, 4 * MIB);
    for b in 0..4u64 {
        write_random(&f, b * BS, BS as usize, 70 + b);
    }
    let v1 = s(&st.import(&f, "disk", &[])["version"]).to_string();
    let v1_raw = st.file("v1.raw");
    std::fs::copy(&f, &v1_raw).unwrap();
    let v1_packs = pack_files(st.path());
    st.json(&["tag", "add", "disk@main", "v1"]);
    write_random(&f, 40 * BS, BS as usize, 99);
    let v2 = s(&st.import(&f, "disk", &[])["version"]).to_string();
    let v2_packs: Vec<_> = pack_files(st.path())
        .into_iter()
        .filter(|p| !v1_packs.contains(p))
        .collect();
    st.json(&["clone", "disk@v1", "copy"]);
    st.verify_ok();
    Damage {
        st,
        v1,
        v2,
        v1_raw,
        v2_raw: f,
        v1_packs,
        v2_packs,
    }
}

/// The first object of `kind` found in `packs`, with the pack holding it.
fn find_object(packs: &[std::path::PathBuf], kind: u8) -> (std::path::PathBuf, PackObject) {
    for pack in packs {
        if let Some(o) = pack_entries(pack).into_iter().find(|o| o.kind == kind) {
            return (pack.clone(), o);
        }
    }
    panic!("no object of kind {kind} in {packs:?}");
}

/// Run `strata --json verify`, expect exit code 2, return the report.
fn verify_damaged(st: &Store) -> Value {
    let o = st.run(&["--json", "verify"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "verify should exit 2: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).expect("verify --json prints JSON");
    assert_eq!(v["ok"], Value::Bool(false));
    v["report"].clone()
}

/// Check the report names `object` of `kind` as the one damaged object, hurting
/// exactly `versions`, each with its `refs`.
fn assert_report(report: &Value, object: &str, kind: &str, versions: &[(&str, &[&str])]) {
    let damaged = report["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1, "{report:#}");
    assert_eq!(s(&damaged[0]["id"]), object);
    assert_eq!(s(&damaged[0]["kind"]), kind);
    assert!(s(&damaged[0]["pack"]).ends_with(".pack"), "{report:#}");
    let want: Vec<&str> = versions.iter().map(|(v, _)| *v).collect();
    assert_eq!(strings(&damaged[0]["affects"]), sorted(&want), "{report:#}");
    let affected = report["affected_versions"].as_array().unwrap();
    assert_eq!(affected.len(), versions.len(), "{report:#}");
    for (v, refs) in versions {
        let a = affected
            .iter()
            .find(|a| s(&a["version"]) == *v)
            .unwrap_or_else(|| panic!("{v} not listed as affected: {report:#}"));
        assert_eq!(strings(&a["refs"]), sorted(refs), "{report:#}");
        assert_eq!(strings(&a["objects"]), vec![object.to_string()]);
    }
    assert!(report["missing"].as_array().unwrap().is_empty());
}

#[test]
fn verify_names_a_damaged_shared_data_block_and_every_version_using_it() {
    let d = damage_setup();
    let (pack, obj) = find_object(&d.v1_packs, KIND_DATA);
    flip_byte(&pack, obj.payload_offset + obj.payload_len / 2, 0x20);
    let report = verify_damaged(&d.st);
    assert_report(
        &report,
        &obj.id,
        "data",
        &[(&d.v1, &["disk@v1", "copy:main"]), (&d.v2, &["disk:main"])],
    );
    let text = d.st.run(&["verify"]);
    assert_eq!(text.status.code(), Some(2));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("DAMAGED data {}", obj.id)), "{text}");
    assert!(text.contains("store DAMAGED"), "{text}");
    // Reading it is refused rather than returning wrong bytes.
    let err = d.st.fails(&["export", "disk@v1", p(&d.st.file("x.raw"))]);
    assert!(err.contains("damaged"), "{err}");
    assert!(!d.st.file("x.raw").exists());
}

#[test]
fn verify_names_a_damaged_block_only_the_newer_version_uses() {
    let d = damage_setup();
    let (pack, obj) = find_object(&d.v2_packs, KIND_DATA);
    flip_byte(&pack, obj.payload_offset + obj.payload_len / 2, 0x01);
    let report = verify_damaged(&d.st);
    assert_report(&report, &obj.id, "data", &[(&d.v2, &["disk:main"])]);
    // Versions that do not use it are still whole.
    d.st.assert_exports_as("disk@v1", "raw", &d.v1_raw);
    d.st.assert_exports_as("copy", "qcow2", &d.v1_raw);
}

#[test]
fn verify_names_a_damaged_tree_node_and_its_version() {
    let d = damage_setup();
    let (pack, obj) = find_object(&d.v1_packs, KIND_TREE);
    flip_byte(&pack, obj.payload_offset + obj.payload_len / 2, 0x10);
    let report = verify_damaged(&d.st);
    // v2 changed the image's only leaf, so v1's tree node is v1's alone.
    assert_report(
        &report,
        &obj.id,
        "tree",
        &[(&d.v1, &["disk@v1", "copy:main"])],
    );
    let err = d.st.fails(&["export", "disk@v1", p(&d.st.file("x.raw"))]);
    assert!(err.contains("damaged"), "{err}");
    d.st.assert_exports_as("disk@main", "raw", &d.v2_raw);
}

#[test]
fn verify_names_a_damaged_version_record() {
    let d = damage_setup();
    let (pack, obj) = find_object(&d.v1_packs, KIND_VERSION);
    assert_eq!(obj.id, d.v1);
    flip_byte(&pack, obj.payload_offset + obj.payload_len / 2, 0x04);
    let report = verify_damaged(&d.st);
    assert_report(
        &report,
        &d.v1,
        "version",
        &[(&d.v1, &["disk@v1", "copy:main"])],
    );
    d.st.assert_exports_as("disk@main", "raw", &d.v2_raw);
}
