//! The native qcow2 writer, judged by qemu: `qemu-img check` must find no errors
//! or leaks, `qemu-img compare` must find the image identical to a raw file with
//! the same writes, and `qemu-img map` must show zero writes as zero clusters.

mod common;

use common::*;
use strata_disk::{DiskError, ExtentKind, Format, OpenOptions};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Block {
    Data,
    Zero,
    Skip,
}

/// Write the same random sequence of blocks to a qcow2 and a raw image, and
/// return the block plan.
fn write_both(
    dir: &tempfile::TempDir,
    size: u64,
    block: u64,
    seed: u64,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Vec<(u64, u64, Block)>,
) {
    let qcow = path_in(dir, "out.qcow2");
    let raw = path_in(dir, "out.raw");
    let mut q = strata_disk::create(&qcow, Format::Qcow2, size, block as u32).unwrap();
    let mut r = strata_disk::create(&raw, Format::Raw, size, block as u32).unwrap();
    let mut rng = Rng(seed);
    let mut plan = Vec::new();
    let mut off = 0;
    while off < size {
        let len = block.min(size - off);
        let kind = match rng.below(3) {
            0 => Block::Data,
            1 => Block::Zero,
            _ => Block::Skip,
        };
        match kind {
            Block::Data => {
                let data = rng.bytes(len as usize);
                q.write_data(off, &data).unwrap();
                r.write_data(off, &data).unwrap();
            }
            Block::Zero => {
                q.write_zeroes(off, len).unwrap();
                r.write_zeroes(off, len).unwrap();
            }
            Block::Skip => {}
        }
        plan.push((off, len, kind));
        off += len;
    }
    q.finish().unwrap();
    r.finish().unwrap();
    (qcow, raw, plan)
}

fn assert_qemu_accepts(qcow: &std::path::Path, raw: &std::path::Path) {
    let check = qemu_img(&["check", "-f", "qcow2", p(qcow)]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(!check.contains("leak"), "{check}");
    let cmp = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", p(qcow), p(raw)]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
}

/// Check every planned block against qemu's map and our reader's map.
fn assert_maps(qcow: &std::path::Path, plan: &[(u64, u64, Block)], cluster: u64) {
    let qmap = qemu_map(qcow, "qcow2");
    let img = strata_disk::open(qcow, &OpenOptions::default()).unwrap();
    let ours = our_map(img.as_ref());
    let kind_at = |map: &[strata_disk::Extent], off: u64| {
        map.iter()
            .find(|e| e.offset <= off && off < e.offset + e.len)
            .map(|e| e.kind)
            .unwrap()
    };
    for &(off, len, kind) in plan {
        // Blocks smaller than a cluster share it with their neighbours; only
        // whole-cluster blocks have a kind of their own.
        if off % cluster != 0 || len % cluster != 0 {
            continue;
        }
        let expected = match kind {
            Block::Data => ExtentKind::Data,
            Block::Zero => ExtentKind::Zero,
            Block::Skip => ExtentKind::Unallocated,
        };
        for at in [off, off + len - 1] {
            assert_eq!(kind_at(&qmap, at), expected, "qemu map at {at}: {qmap:?}");
            assert_eq!(kind_at(&ours, at), expected, "our map at {at}: {ours:?}");
        }
    }
}

#[test]
fn random_blocks_64k() {
    let dir = tempdir();
    let size = (10 << 20) + 1536; // not a multiple of the cluster size
    let (qcow, raw, plan) = write_both(&dir, size, 64 << 10, 1);
    assert_qemu_accepts(&qcow, &raw);
    assert_maps(&qcow, &plan, 64 << 10);
    let img = strata_disk::open(&qcow, &OpenOptions::default()).unwrap();
    assert_eq!(img.format(), Format::Qcow2);
    assert_eq!(read_all(img.as_ref()), std::fs::read(&raw).unwrap());
    let info = qemu_img(&["info", "--output=json", p(&qcow)]);
    assert!(info.contains("\"cluster-size\": 65536"), "{info}");
}

#[test]
fn blocks_larger_than_the_largest_cluster() {
    let dir = tempdir();
    let (qcow, raw, plan) = write_both(&dir, 40 << 20, 4 << 20, 2);
    assert_qemu_accepts(&qcow, &raw);
    assert_maps(&qcow, &plan, 2 << 20);
    let info = qemu_img(&["info", "--output=json", p(&qcow)]);
    assert!(info.contains("\"cluster-size\": 2097152"), "{info}");
}

#[test]
fn blocks_smaller_than_the_smallest_cluster() {
    // 1536-byte blocks: several per 4 KiB cluster, and clusters mixing data,
    // zeros and gaps.
    let dir = tempdir();
    let (qcow, raw, plan) = write_both(&dir, 3 << 20, 1536, 3);
    assert_qemu_accepts(&qcow, &raw);
    assert_maps(&qcow, &plan, 4096);
    let img = strata_disk::open(&qcow, &OpenOptions::default()).unwrap();
    assert_eq!(read_all(img.as_ref()), std::fs::read(&raw).unwrap());
}

#[test]
fn large_sparse_image_spans_many_tables() {
    // 200 GiB with 64 KiB clusters: 400 L2 tables' worth of guest space, of which
    // a few are written, far apart; the file stays small.
    let dir = tempdir();
    let size = 200u64 << 30;
    let qcow = path_in(&dir, "big.qcow2");
    let mut w = strata_disk::create(&qcow, Format::Qcow2, size, 64 << 10).unwrap();
    let mut rng = Rng(4);
    let mut written = Vec::new();
    for i in 0..20u64 {
        let off = i * (10u64 << 30) + (rng.below(1000) << 16);
        let data = rng.bytes(128 << 10);
        w.write_data(off, &data).unwrap();
        w.write_zeroes(off + (128 << 10), 64 << 10).unwrap();
        written.push((off, data));
    }
    w.finish().unwrap();
    let check = qemu_img(&["check", p(&qcow)]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(std::fs::metadata(&qcow).unwrap().len() < 16 << 20);
    let img = strata_disk::open(&qcow, &OpenOptions::default()).unwrap();
    assert_eq!(img.virtual_size(), size);
    for (off, data) in &written {
        let mut buf = vec![0u8; data.len()];
        img.read_at(&mut buf, *off).unwrap();
        assert_eq!(&buf, data);
        let map = img.extents(*off, (192 << 10) + 4096).unwrap();
        let kinds: Vec<_> = map.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [ExtentKind::Data, ExtentKind::Zero, ExtentKind::Unallocated],
            "{map:?}"
        );
    }
    // qemu reads the same bytes at one of the offsets.
    let (off, data) = &written[7];
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("read -P 0 {} 64k", off + (128 << 10)),
            p(&qcow),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("read 65536/65536") && !text.contains("fail"),
        "{text}"
    );
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            &format!("read -P {} {} 1", data[0], off),
            p(&qcow),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("read 1/1") && !text.contains("fail"),
        "{text}"
    );
}

#[test]
fn empty_and_tiny_images() {
    for size in [0u64, 512, 1000] {
        let dir = tempdir();
        let qcow = path_in(&dir, "t.qcow2");
        let mut w = strata_disk::create(&qcow, Format::Qcow2, size, 65536).unwrap();
        if size > 0 {
            w.write_data(0, &vec![0x77; size as usize]).unwrap();
        }
        w.finish().unwrap();
        let check = qemu_img(&["check", p(&qcow)]);
        assert!(check.contains("No errors were found"), "{size}: {check}");
        let img = strata_disk::open(&qcow, &OpenOptions::default()).unwrap();
        // Sizes are whole sectors, as qemu requires.
        assert_eq!(img.virtual_size(), size.next_multiple_of(512));
        let content = read_all(img.as_ref());
        assert!(content[..size as usize].iter().all(|&b| b == 0x77));
        assert!(content[size as usize..].iter().all(|&b| b == 0));
    }
}

#[test]
fn writer_refuses_misuse() {
    let dir = tempdir();
    let qcow = path_in(&dir, "m.qcow2");
    let mut w = strata_disk::create(&qcow, Format::Qcow2, 1 << 20, 65536).unwrap();
    // The file must not exist already.
    assert!(matches!(
        strata_disk::create(&qcow, Format::Qcow2, 1 << 20, 65536),
        Err(DiskError::Io { .. })
    ));
    w.write_data(65536, &[1u8; 65536]).unwrap();
    let err = w.write_data(0, &[1u8; 65536]).unwrap_err();
    assert!(err.to_string().contains("ascending"), "{err}");
    let err = w.write_zeroes(1 << 20, 65536).unwrap_err();
    assert!(matches!(err, DiskError::OutOfRange { .. }), "{err}");
    let raw = path_in(&dir, "m.raw");
    std::fs::write(&raw, b"").unwrap();
    assert!(strata_disk::create(&raw, Format::Raw, 1 << 20, 65536).is_err());
    assert!(matches!(
        strata_disk::create(&path_in(&dir, "x.vmdk"), Format::Vmdk, 1 << 20, 65536),
        Err(DiskError::Unsupported { .. })
    ));
}
