//! The native qcow2 reader against images made by qemu-img and qemu-io: every
//! image is read whole and compared byte for byte with `qemu-img convert -O raw`,
//! and its allocation map with `qemu-img map`.

mod common;

use common::*;
use strata_disk::qcow2::Qcow2Image;
use strata_disk::{DiskError, ExtentKind, Format, OpenOptions};

/// A mix of writes that start and end inside clusters, across several L2 tables'
/// worth of small clusters.
const PATTERNS: &[&str] = &[
    "write -P 0xab 0 64k",
    "write -P 0x12 1000k 4k",
    "write -P 0x34 3000k 100k",
    "write -P 0x56 5k 3k",
    "write -P 0x78 7m 1m",
];

#[test]
fn v3_cluster_sizes() {
    for cluster in ["4k", "64k", "2M"] {
        let dir = tempdir();
        let img = path_in(&dir, "v3.qcow2");
        create_qcow2(&img, "9000k", &format!("cluster_size={cluster}"));
        qemu_io("qcow2", &img, PATTERNS);
        let ours = assert_matches_qemu(&img);
        assert_eq!(ours.format(), Format::Qcow2);
        assert!(ours
            .extents(0, u64::MAX)
            .unwrap()
            .iter()
            .any(|e| e.kind == ExtentKind::Data));
    }
}

#[test]
fn v2_compat_0_10() {
    let dir = tempdir();
    let img = path_in(&dir, "v2.qcow2");
    create_qcow2(&img, "9000k", "compat=0.10");
    qemu_io("qcow2", &img, PATTERNS);
    // In v2, zero writes must allocate real zero data (no zero flag exists).
    qemu_io("qcow2", &img, &["write -z 0 4k"]);
    let q = Qcow2Image::open(&img, &OpenOptions::default()).unwrap();
    assert_eq!(q.header().version, 2);
    assert_matches_qemu(&img);
}

#[test]
fn tiny_512_byte_clusters() {
    let dir = tempdir();
    let img = path_in(&dir, "c512.qcow2");
    create_qcow2(&img, "2M", "cluster_size=512");
    qemu_io(
        "qcow2",
        &img,
        &["write -P 0x11 0 700", "write -P 0x22 100k 33k"],
    );
    assert_matches_qemu(&img);
}

#[test]
fn zero_clusters_are_zero_extents() {
    let dir = tempdir();
    let img = path_in(&dir, "zero.qcow2");
    create_qcow2(&img, "4M", "cluster_size=64k");
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0xcd 0 1m",
            // Over allocated data: zero flag with a preallocated host offset.
            "write -z 128k 128k",
            // Over unallocated space, and with unmap: plain zero clusters.
            "write -z 2m 192k",
            "write -z -u 512k 64k",
        ],
    );
    let ours = assert_matches_qemu(&img);
    let map = our_map(ours.as_ref());
    let zero: Vec<_> = map.iter().filter(|e| e.kind == ExtentKind::Zero).collect();
    assert!(
        zero.iter()
            .any(|e| e.offset == 128 << 10 && e.len == 128 << 10),
        "{map:?}"
    );
    assert!(
        zero.iter()
            .any(|e| e.offset == 2 << 20 && e.len == 192 << 10),
        "{map:?}"
    );
    let mut buf = vec![0xffu8; 128 << 10];
    ours.read_at(&mut buf, 128 << 10).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

/// A raw file half compressible text, half random, in 64 KiB stripes.
fn mixed_raw(path: &std::path::Path, size: usize) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut data = vec![0u8; size];
    for (i, chunk) in data.chunks_mut(64 << 10).enumerate() {
        match i % 4 {
            0 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = b"strata disk image "[j % 18]),
            1 => chunk.copy_from_slice(&rng.bytes(chunk.len())),
            2 => {} // zeros
            _ => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j / 7) as u8),
        }
    }
    std::fs::write(path, data).unwrap();
}

#[test]
fn compressed_clusters_deflate_and_zstd() {
    for (cluster, ctype) in [
        ("64k", "zlib"),
        ("64k", "zstd"),
        ("4k", "zlib"),
        ("4k", "zstd"),
        ("2M", "zlib"),
        ("2M", "zstd"),
        ("512", "zlib"),
    ] {
        let dir = tempdir();
        let raw = path_in(&dir, "src.raw");
        mixed_raw(&raw, (5 << 20) + 4096);
        let img = path_in(&dir, "c.qcow2");
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster},compression_type={ctype}"),
            p(&raw),
            p(&img),
        ]);
        // `qemu-img map` reports compression only from qemu 8 on; `check` counts it.
        let check = qemu_img(&["check", "--output=json", p(&img)]);
        assert!(
            !check.contains("\"compressed-clusters\": 0,") && check.contains("compressed-clusters"),
            "{cluster} {ctype}: no compressed cluster"
        );
        let ours = assert_matches_qemu(&img);
        assert_eq!(ours.format(), Format::Qcow2);
        assert_eq!(read_all(ours.as_ref()), std::fs::read(&raw).unwrap());
    }
}

#[test]
fn extended_l2_subclusters() {
    let dir = tempdir();
    let base = path_in(&dir, "base.qcow2");
    create_qcow2(&base, "4M", "cluster_size=64k");
    qemu_io("qcow2", &base, &["write -P 0xbb 0 4m"]);
    let img = path_in(&dir, "ext.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=64k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&img),
        "5M",
    ]);
    // Subclusters are 2 KiB: partial writes leave other subclusters to the backing file.
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 0x01 2k 2k",
            "write -P 0x02 10k 6k",
            "write -z 20k 4k",
            "write -P 0x03 1m 64k",
            "write -z 2m 64k",
            "write -P 0x04 4200k 2k",
        ],
    );
    let q = Qcow2Image::open(&img, &OpenOptions::default()).unwrap();
    assert!(q.header().extended_l2());
    let ours = assert_matches_qemu(&img);
    let map = our_map(ours.as_ref());
    assert!(map
        .iter()
        .any(|e| e.kind == ExtentKind::Zero && e.offset == 20 << 10 && e.len == 4 << 10));

    // Compressed clusters in an extended-L2 image have no subclusters.
    let raw = path_in(&dir, "src.raw");
    mixed_raw(&raw, 1 << 20);
    let comp = path_in(&dir, "ext-c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on",
        "-f",
        "raw",
        p(&raw),
        p(&comp),
    ]);
    assert_matches_qemu(&comp);
}

/// base (6M) <- mid (8M) <- top (12M), created with relative backing names.
fn chain(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let base = path_in(dir, "base.qcow2");
    create_qcow2(&base, "6M", "cluster_size=64k");
    qemu_io(
        "qcow2",
        &base,
        &[
            "write -P 0x0b 0 6m",
            "write -z 1m 128k",
            "write -z -u 5m 64k",
        ],
    );
    let mid = path_in(dir, "mid.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&mid),
        "8M",
    ]);
    qemu_io(
        "qcow2",
        &mid,
        &["write -P 0x0c 512k 1m", "write -P 0x0d 7m 300k"],
    );
    let top = path_in(dir, "top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        p(&top),
        "12M",
    ]);
    // A zero write over backing data must read zeros, not the backing file.
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x0e 2m 4k",
            "write -z 4m 2m",
            "write -P 0x0f 11m 1k",
        ],
    );
    top
}

#[test]
fn backing_chain_of_three() {
    let dir = tempdir();
    let top = chain(&dir);
    let ours = assert_matches_qemu(&top);
    let map = our_map(ours.as_ref());
    // Past the end of the 8M mid image, unwritten ranges have nothing behind them.
    assert!(map.iter().any(|e| e.kind == ExtentKind::Unallocated
        && e.offset <= 8 << 20
        && e.offset + e.len >= 10 << 20));
    // A zero cluster in the top image hides the backing data below it.
    assert!(map
        .iter()
        .any(|e| e.kind == ExtentKind::Zero && e.offset == 4 << 20 && e.len == 2 << 20));
    // Opening through a relative path from another working directory works too:
    // backing names are resolved against the image's directory, not the cwd.
    let q = Qcow2Image::open(&top, &OpenOptions::default()).unwrap();
    let mid = q.backing().unwrap();
    assert_eq!(mid.format(), Format::Qcow2);
    assert_eq!(mid.virtual_size(), 8 << 20);
}

#[test]
fn backing_chain_reads_from_many_threads() {
    let dir = tempdir();
    let top = chain(&dir);
    let expected = qemu_raw(&top, "qcow2");
    let img = strata_disk::open(&top, &OpenOptions::default()).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (img, expected) = (&img, &expected);
            s.spawn(move || {
                let mut rng = Rng(t + 1);
                for _ in 0..200 {
                    let len = rng.below(300_000) as usize + 1;
                    let off = rng.below(expected.len() as u64 - len as u64) as usize;
                    let mut buf = vec![0u8; len];
                    img.read_at(&mut buf, off as u64).unwrap();
                    assert_eq!(buf, expected[off..off + len]);
                }
            });
        }
    });
}

#[test]
fn backing_depth_limit() {
    let dir = tempdir();
    let top = chain(&dir);
    let opts = |d| OpenOptions {
        max_backing_depth: d,
        ..OpenOptions::default()
    };
    assert!(Qcow2Image::open(&top, &opts(2)).is_ok());
    let err = Qcow2Image::open(&top, &opts(1)).unwrap_err();
    assert!(matches!(err, DiskError::Backing { .. }), "{err}");
    assert!(
        err.to_string().contains("deeper than the limit of 1"),
        "{err}"
    );
}

#[test]
fn raw_backing_file() {
    let dir = tempdir();
    let base = path_in(&dir, "base.raw");
    let mut rng = Rng(7);
    std::fs::write(&base, rng.bytes(3 << 20)).unwrap();
    let top = path_in(&dir, "top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        p(&base),
        "-F",
        "raw",
        p(&top),
        "4M",
    ]);
    qemu_io("qcow2", &top, &["write -P 0x42 1m 10k"]);
    let ours = strata_disk::open(&top, &OpenOptions::default()).unwrap();
    assert_eq!(read_all(ours.as_ref()), qemu_raw(&top, "qcow2"));
    let map = our_map(ours.as_ref());
    assert_eq!(map.last().unwrap().kind, ExtentKind::Unallocated); // past the 3M base
}

#[test]
fn missing_backing_file_is_named() {
    let dir = tempdir();
    let top = chain(&dir);
    std::fs::remove_file(path_in(&dir, "base.qcow2")).unwrap();
    let err = Qcow2Image::open(&top, &OpenOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DiskError::Backing { .. }), "{msg}");
    assert!(
        msg.contains("base.qcow2") && msg.contains("not found"),
        "{msg}"
    );
    assert!(msg.contains("mid.qcow2"), "the image naming it: {msg}");
}

#[test]
fn backing_loop_is_detected() {
    let dir = tempdir();
    let a = path_in(&dir, "a.qcow2");
    let b = path_in(&dir, "b.qcow2");
    create_qcow2(&b, "1M", "");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        p(&a),
        "1M",
    ]);
    qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", "a.qcow2", p(&b)]);
    let err = Qcow2Image::open(&a, &OpenOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DiskError::Backing { .. }), "{msg}");
    assert!(
        msg.contains("loop") && msg.contains("a.qcow2") && msg.contains("b.qcow2"),
        "{msg}"
    );

    // An image that is its own backing file.
    let c = path_in(&dir, "c.qcow2");
    create_qcow2(&c, "1M", "");
    qemu_img(&["rebase", "-u", "-F", "qcow2", "-b", "c.qcow2", p(&c)]);
    let err = strata_disk::open(&c, &OpenOptions::default()).unwrap_err();
    assert!(err.to_string().contains("loop"), "{err}");
}

#[test]
fn backing_format_must_be_recorded() {
    let dir = tempdir();
    let base = path_in(&dir, "base.qcow2");
    create_qcow2(&base, "1M", "");
    let top = path_in(&dir, "top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&top),
        "1M",
    ]);
    // Remove the format: patch the backing-format extension into an unknown one,
    // which readers must ignore.
    let mut bytes = std::fs::read(&top).unwrap();
    let magic = 0xe279_2acau32.to_be_bytes();
    let at = bytes
        .windows(4)
        .position(|w| w == magic)
        .expect("backing format extension");
    bytes[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(&top, &bytes).unwrap();

    let err = Qcow2Image::open(&top, &OpenOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DiskError::Backing { .. }), "{msg}");
    assert!(msg.contains("base.qcow2"), "{msg}");
    assert!(msg.contains("backing format is not recorded"), "{msg}");
    assert!(
        msg.contains("qemu-img rebase") && msg.contains("-F"),
        "{msg}"
    );
}

#[test]
fn refused_features() {
    let dir = tempdir();
    // LUKS encryption.
    let enc = path_in(&dir, "enc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=secret",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        p(&enc),
        "1M",
    ]);
    let err = Qcow2Image::open(&enc, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(&err, DiskError::Unsupported { feature, .. } if feature.contains("LUKS")),
        "{err}"
    );

    // External data file.
    let ext = path_in(&dir, "ext.qcow2");
    let data = path_in(&dir, "ext.data");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", p(&data)),
        p(&ext),
        "1M",
    ]);
    let err = Qcow2Image::open(&ext, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(&err, DiskError::Unsupported { feature, .. } if feature.contains("external data file")),
        "{err}"
    );

    // The corrupt bit (incompatible feature bit 1), set by hand.
    let bad = path_in(&dir, "corrupt.qcow2");
    create_qcow2(&bad, "1M", "");
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes[79] |= 2;
    std::fs::write(&bad, &bytes).unwrap();
    let err = Qcow2Image::open(&bad, &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(&err, DiskError::Unsupported { feature, .. } if feature.contains("corrupt")),
        "{err}"
    );

    // The dirty bit alone is fine for reading.
    let dirty = path_in(&dir, "dirty.qcow2");
    create_qcow2(&dirty, "1M", "");
    qemu_io("qcow2", &dirty, &["write -P 0x99 0 4k"]);
    let mut bytes = std::fs::read(&dirty).unwrap();
    bytes[79] |= 1;
    std::fs::write(&dirty, &bytes).unwrap();
    let q = Qcow2Image::open(&dirty, &OpenOptions::default()).unwrap();
    let mut buf = [0u8; 4096];
    strata_disk::DiskImage::read_at(&q, &mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x99));
}

#[test]
fn out_of_range_reads_are_errors() {
    let dir = tempdir();
    let img = path_in(&dir, "r.qcow2");
    create_qcow2(&img, "1M", "");
    let q = strata_disk::open(&img, &OpenOptions::default()).unwrap();
    let mut buf = [0u8; 2];
    assert!(matches!(
        q.read_at(&mut buf, (1 << 20) - 1),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        q.read_at(&mut buf, u64::MAX),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(q.extents(1 << 20, 100).unwrap().is_empty());
    assert_eq!(q.extents(1000, u64::MAX).unwrap()[0].offset, 1000);
}

#[test]
fn backing_file_must_be_a_file() {
    let dir = tempdir();
    let fifo = path_in(&dir, "fifo");
    let out = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(out.success());
    let top = path_in(&dir, "top.qcow2");
    create_qcow2(&top, "1M", "");
    qemu_img(&["rebase", "-u", "-F", "raw", "-b", "fifo", p(&top)]);
    // Opening the FIFO would block forever; it must be refused instead.
    let err = Qcow2Image::open(&top, &OpenOptions::default()).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}
