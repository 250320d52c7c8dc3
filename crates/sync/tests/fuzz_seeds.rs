//! The fuzz corpus seeds (fuzz/corpus/transfer_frames) are real streams written by
//! the encoder (`frames.raw` uncompressed, `stream.zst` as sent); this checks they
//! still parse, so the fuzzer starts from valid input after format changes too.

use strata_store::{ChunkId, ObjectKind};
use strata_sync::frame::{encode_frame, Body, Frame, FrameReader, FrameWriter, MAGIC};

fn frames() -> Vec<Frame> {
    let raw = b"a block of data".repeat(20);
    vec![
        Frame::Object {
            kind: ObjectKind::Data,
            id: ChunkId::of(&raw),
            body: Body::Raw(raw.clone()),
        },
        Frame::Object {
            kind: ObjectKind::Data,
            id: ChunkId([5; 32]),
            body: Body::Delta {
                base: ChunkId::of(&raw),
                raw_len: raw.len() as u32,
                zframe: strata_sync::delta::encode(&raw, &raw, 3).unwrap(),
            },
        },
        Frame::Missing(ChunkId([7; 32])),
    ]
}

#[test]
fn seeds_parse() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/transfer_frames");
    let mut w = FrameWriter::new(3).unwrap();
    for f in &frames() {
        w.frame(f).unwrap();
    }
    let compressed = w.finish().unwrap();
    let mut plain = MAGIC.to_vec();
    for f in &frames() {
        encode_frame(f, &mut plain);
    }
    encode_frame(&Frame::End, &mut plain);
    // The committed seeds are exactly what today's encoder writes.
    assert_eq!(std::fs::read(dir.join("frames.raw")).unwrap(), plain);
    let _ = compressed;
    let mut r = FrameReader::new().unwrap();
    r.push(&std::fs::read(dir.join("stream.zst")).unwrap());
    let mut n = 0;
    while let Some(_f) = r.next_frame().unwrap() {
        n += 1;
    }
    assert_eq!(n, 4);
    strata_sync::fuzz_frames(&std::fs::read(dir.join("frames.raw")).unwrap());
}

/// Every input the fuzzer kept (fuzz/corpus/transfer_frames) goes through the same
/// entry point again: a parser change that makes one of them panic fails here, in
/// the ordinary suite, not only under cargo fuzz.
#[test]
fn whole_corpus_replays_without_panics() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/transfer_frames");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        strata_sync::fuzz_frames(&data);
        n += 1;
    }
    assert!(n >= 2, "the corpus has the two seeds at least");
}

/// The bundle corpus (fuzz/corpus/bundle) replays through the fuzzing entry point;
/// its seeds are real bundles, and the self-contained ones still import.
#[test]
fn bundle_corpus_replays_and_its_whole_seeds_import() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/bundle");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let imported = strata_sync::bundle::fuzz_import(&data);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "whole.bundle" || name == "tiny.bundle" {
            assert!(imported, "{name} no longer imports");
        }
        n += 1;
    }
    assert!(n >= 3, "the corpus has its three seeds at least");
}
