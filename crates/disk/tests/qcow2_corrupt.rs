//! Damaged qcow2 files: truncation and random byte mutations of a small real image
//! must produce errors, never panics or unbounded allocations.

mod common;

use std::path::Path;
use std::sync::OnceLock;

use common::*;
use proptest::prelude::*;
use strata_disk::qcow2::parse_header;
use strata_disk::{DiskError, Format, OpenOptions};

/// A small image (4 KiB clusters, 256 KiB) with data, compressed and zero
/// clusters, as bytes.
fn small_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = tempdir();
        let raw = path_in(&dir, "src.raw");
        let mut data = vec![0u8; 256 << 10];
        for (i, b) in data.iter_mut().enumerate().take(64 << 10) {
            *b = (i / 5) as u8; // compressible
        }
        let mut rng = Rng(3);
        data[100 << 10..120 << 10].copy_from_slice(&rng.bytes(20 << 10));
        std::fs::write(&raw, &data).unwrap();
        let img = path_in(&dir, "small.qcow2");
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            p(&raw),
            p(&img),
        ]);
        qemu_io(
            "qcow2",
            &img,
            &[
                "write -P 0x5a 200k 12k",
                "write -z 8k 8k",
                "write -z 150k 4k",
            ],
        );
        std::fs::read(&img).unwrap()
    })
}

/// Open and read the image at `path` completely (bounded), returning the first
/// error. Whatever the bytes, this must return instead of panicking.
fn exercise(path: &Path) -> Result<(), DiskError> {
    // The format is given, as detection would (rightly) call a file whose magic
    // was damaged raw.
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        ..OpenOptions::default()
    };
    let img = strata_disk::open(path, &opts)?;
    let size = img.virtual_size();
    img.extents(0, size)?;
    let limit = size.min(4 << 20);
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0;
    while pos < limit {
        let n = (limit - pos).min(buf.len() as u64) as usize;
        img.read_at(&mut buf[..n], pos)?;
        pos += n as u64;
    }
    // Unaligned small reads take the partial-cluster paths.
    let mut small = [0u8; 777];
    if size > 777 + 1000 {
        img.read_at(&mut small, 1000)?;
    }
    Ok(())
}

#[test]
fn intact_image_reads_like_qemu() {
    let dir = tempdir();
    let path = path_in(&dir, "ok.qcow2");
    std::fs::write(&path, small_image()).unwrap();
    exercise(&path).unwrap();
    assert_matches_qemu(&path);
}

#[test]
fn truncated_files_are_errors() {
    let full = small_image();
    let dir = tempdir();
    let path = path_in(&dir, "cut.qcow2");
    let mut cuts: Vec<usize> = vec![0, 1, 4, 50, 71, 72, 100, 104, 111, 512];
    for c in (4096..full.len()).step_by(4096) {
        cuts.extend([c - 1, c, c + 1000]);
    }
    for cut in cuts.into_iter().filter(|&c| c < full.len()) {
        std::fs::write(&path, &full[..cut]).unwrap();
        let result = exercise(&path);
        // Every byte of this image is metadata or data that some read needs, so
        // any truncation must be noticed.
        let err = result.expect_err(&format!("truncation at {cut} went unnoticed"));
        if cut >= 104 {
            assert!(
                matches!(err, DiskError::Malformed { .. } | DiskError::Io { .. }),
                "cut at {cut}: {err}"
            );
        }
    }
}

#[test]
fn flipped_header_bytes_do_not_panic() {
    let full = small_image();
    let dir = tempdir();
    let path = path_in(&dir, "flip.qcow2");
    for i in 0..256 {
        let mut bytes = full.to_vec();
        bytes[i] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let result = exercise(&path);
        // Magic, version and cluster_bits are checked, not guessed.
        if i < 8 || (20..24).contains(&i) {
            assert!(result.is_err(), "flipping byte {i} was accepted");
        }
    }
}

/// Offsets of metadata in the small image: header, L1 table, L2 tables.
fn metadata_offsets() -> Vec<u64> {
    let b = small_image();
    let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(40);
    let l1_size = u32::from_be_bytes(b[36..40].try_into().unwrap()) as u64;
    let mut regions = vec![(0, 512), (l1, l1_size * 8)];
    for i in 0..l1_size {
        let l2 = be64((l1 + i * 8) as usize) & 0x00ff_ffff_ffff_fe00;
        if l2 != 0 {
            regions.push((l2, 4096));
        }
    }
    regions
        .into_iter()
        .flat_map(|(start, len)| start..start + len)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn mutated_metadata_never_panics(
        mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
    ) {
        static META: OnceLock<Vec<u64>> = OnceLock::new();
        let meta = META.get_or_init(metadata_offsets);
        let mut bytes = small_image().to_vec();
        for (index, value) in mutations {
            let at = *index.get(meta) as usize;
            bytes[at] = value;
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bytes).unwrap();
        let _ = exercise(file.path());
        strata_disk::qcow2::fuzz_open_and_read(&bytes);
    }

    #[test]
    fn parse_header_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1200)) {
        let _ = parse_header(&bytes);
    }

    #[test]
    fn parse_header_on_mutated_real_header(
        mutations in proptest::collection::vec((0usize..1024, any::<u8>()), 1..6)
    ) {
        let mut bytes = small_image()[..4096].to_vec();
        for (at, value) in mutations {
            bytes[at] = value;
        }
        if let Ok(h) = parse_header(&bytes) {
            // Whatever was accepted is internally consistent.
            prop_assert!((9..=21).contains(&h.cluster_bits));
            prop_assert!(u64::from(h.l1_size) >= h.l1_entries_needed());
            prop_assert!(u64::from(h.l1_size) * 8 <= 32 << 20);
        }
    }
}
