//! Replays the fuzz corpora (fuzz/corpus/<target>/) through the same entry points the
//! cargo-fuzz targets use, so every input a fuzzer ever kept stays a regression test
//! in the ordinary suite. The seeds named below are valid inputs and must parse.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "corpus {target} is empty");
    out
}

#[test]
fn pack_corpus() {
    for (name, data) in corpus("pack") {
        strata_store::pack::fuzz_pack(&data);
        if name.ends_with(".pack") {
            let entries = strata_store::pack::parse_pack(&data)
                .unwrap_or_else(|e| panic!("seed {name}: {e}"));
            assert!(!entries.is_empty());
        }
    }
}

#[test]
fn tree_node_corpus() {
    let mut valid = 0;
    for (_, data) in corpus("tree_node") {
        if let Ok(node) = strata_store::tree::Node::decode(&data) {
            assert_eq!(node.encode(), data, "decoding is canonical");
            valid += 1;
        }
    }
    assert!(valid >= 1);
}

#[test]
fn version_record_corpus() {
    for (name, data) in corpus("version_record") {
        let r = strata_store::Version::decode(&data);
        if name.ends_with(".json") {
            r.unwrap_or_else(|e| panic!("seed {name}: {e}"));
        }
    }
}

#[test]
fn qcow2_header_corpus() {
    for (name, data) in corpus("qcow2_header") {
        let r = strata_disk::qcow2::parse_header(&data);
        if name.ends_with(".qcow2.head") {
            r.unwrap_or_else(|e| panic!("seed {name}: {e}"));
        }
    }
}

#[test]
fn qcow2_image_corpus() {
    for (_, data) in corpus("qcow2_image") {
        strata_disk::qcow2::fuzz_open_and_read(&data);
    }
}
