//! Replays the NBD fuzz corpora (fuzz/corpus/nbd_*/) through the same entry points the
//! cargo-fuzz targets use, so every input a fuzzer kept stays a regression test. The
//! seeds (files named `seed-*`) are valid inputs and must be handled as such.

use std::collections::BTreeSet;
use std::path::PathBuf;

use strata_nbd::proto::*;

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
fn nbd_request_corpus() {
    let mut seeds = 0;
    for (name, data) in corpus("nbd_request") {
        fuzz_request(&data);
        if name.starts_with("seed-") {
            seeds += 1;
            let raw: &[u8; REQUEST_LEN] = data[..REQUEST_LEN].try_into().unwrap();
            parse_request(raw).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        }
    }
    assert!(seeds >= 10);
}

#[test]
fn nbd_option_corpus() {
    let mut seeds = 0;
    for (name, data) in corpus("nbd_option") {
        fuzz_option(&data);
        if name.starts_with("seed-") {
            seeds += 1;
            let code = u32::from_be_bytes(data[..4].try_into().unwrap());
            parse_option(code, &data[4..]).unwrap_or_else(|e| panic!("seed {name}: {e}"));
        }
    }
    assert!(seeds >= 10);
}

/// Walk what the server sent for a session seed: greeting, option replies up to the
/// final ACK of NBD_OPT_GO, then structured chunks and simple replies (without data:
/// the structured seed reads only through structured replies). The cookies answered.
fn answered_cookies(out: &[u8]) -> BTreeSet<u64> {
    let be32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().unwrap());
    let be64 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap());
    assert_eq!(&out[..8], b"NBDMAGIC");
    let mut p = 18;
    loop {
        assert_eq!(be64(&out[p..]), OPT_REPLY_MAGIC);
        let (opt, ty, len) = (
            be32(&out[p + 8..]),
            be32(&out[p + 12..]),
            be32(&out[p + 16..]),
        );
        p += 20 + len as usize;
        if opt == OPT_GO && ty == REP_ACK {
            break;
        }
    }
    let mut done = BTreeSet::new();
    while p < out.len() {
        match be32(&out[p..]) {
            SIMPLE_REPLY_MAGIC => {
                done.insert(be64(&out[p + 8..]));
                p += 16;
            }
            STRUCTURED_REPLY_MAGIC => {
                let flags = u16::from_be_bytes([out[p + 4], out[p + 5]]);
                let cookie = be64(&out[p + 8..]);
                let len = be32(&out[p + 16..]);
                if flags & REPLY_FLAG_DONE != 0 {
                    done.insert(cookie);
                }
                p += 20 + len as usize;
            }
            m => panic!("unexpected magic {m:#x} at {p}"),
        }
    }
    done
}

#[test]
fn nbd_session_corpus() {
    for (name, data) in corpus("nbd_session") {
        let out = strata_nbd::fuzz_session(&data);
        if name.starts_with("seed-") {
            assert!(out.starts_with(b"NBDMAGIC"), "seed {name}");
        }
        if name == "seed-structured" {
            // Every request but the final DISC is answered.
            assert_eq!(answered_cookies(&out), (1..=12).collect(), "seed {name}");
        }
    }
}
