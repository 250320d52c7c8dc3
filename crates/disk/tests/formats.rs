//! Format detection, raw images, and the formats read through qemu-img.

mod common;

use std::io::Write;
use std::os::unix::fs::FileExt;

use common::*;
use strata_disk::qemu_img::{check_available, ConvertedImage};
use strata_disk::raw::RawImage;
use strata_disk::{detect_format, DiskError, DiskImage, Extent, ExtentKind, Format, OpenOptions};

/// A sparse raw file of 8 MiB with data at [1M, 1M+64K) and [5M, 5M+4K).
fn sparse_raw(path: &std::path::Path) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(8 << 20).unwrap();
    let mut rng = Rng(11);
    let a = rng.bytes(64 << 10);
    let b = rng.bytes(4 << 10);
    f.write_all_at(&a, 1 << 20).unwrap();
    f.write_all_at(&b, 5 << 20).unwrap();
    f.sync_all().unwrap();
    let mut content = vec![0u8; 8 << 20];
    content[1 << 20..(1 << 20) + a.len()].copy_from_slice(&a);
    content[5 << 20..(5 << 20) + b.len()].copy_from_slice(&b);
    content
}

fn ext(offset: u64, len: u64, kind: ExtentKind) -> Extent {
    Extent { offset, len, kind }
}

#[test]
fn raw_sparse_extents() {
    let dir = tempdir();
    let path = path_in(&dir, "disk.img");
    let content = sparse_raw(&path);
    let img = RawImage::open(&path).unwrap();
    assert_eq!(img.format(), Format::Raw);
    assert_eq!(img.virtual_size(), 8 << 20);
    use ExtentKind::*;
    assert_eq!(
        img.extents(0, u64::MAX).unwrap(),
        [
            ext(0, 1 << 20, Unallocated),
            ext(1 << 20, 64 << 10, Data),
            ext((1 << 20) + (64 << 10), (4 << 20) - (64 << 10), Unallocated),
            ext(5 << 20, 4 << 10, Data),
            ext((5 << 20) + 4096, (3 << 20) - 4096, Unallocated),
        ]
    );
    // A window that starts and ends inside extents is clipped to it.
    assert_eq!(
        img.extents((1 << 20) + 100, 64 << 10).unwrap(),
        [
            ext((1 << 20) + 100, (64 << 10) - 100, Data),
            ext((1 << 20) + (64 << 10), 100, Unallocated),
        ]
    );
    assert_eq!(read_all(&img), content);
    let mut buf = [0u8; 10];
    assert!(matches!(
        img.read_at(&mut buf, (8 << 20) - 5),
        Err(DiskError::OutOfRange { .. })
    ));
}

#[test]
fn raw_writer_leaves_zero_ranges_as_holes() {
    let dir = tempdir();
    let path = path_in(&dir, "out.raw");
    let mut w = strata_disk::create(&path, Format::Raw, 4 << 20, 65536).unwrap();
    w.write_data(0, &[0xaa; 65536]).unwrap();
    w.write_zeroes(65536, 2 << 20).unwrap();
    w.write_data(3 << 20, &[0xbb; 4096]).unwrap();
    assert!(matches!(
        w.write_data(4 << 20, &[1]),
        Err(DiskError::OutOfRange { .. })
    ));
    w.finish().unwrap();
    let img = strata_disk::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(img.virtual_size(), 4 << 20);
    use ExtentKind::*;
    assert_eq!(
        img.extents(0, 4 << 20).unwrap(),
        [
            ext(0, 65536, Data),
            ext(65536, (3 << 20) - 65536, Unallocated),
            ext(3 << 20, 4096, Data),
            ext((3 << 20) + 4096, (1 << 20) - 4096, Unallocated),
        ]
    );
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 3 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0xbb));
}

#[test]
fn detection_of_every_format() {
    let dir = tempdir();
    let cases: &[(&str, &str, Format)] = &[
        ("qcow2", "", Format::Qcow2),
        ("vmdk", "", Format::Vmdk),
        ("vmdk", "subformat=monolithicFlat", Format::Vmdk),
        ("vmdk", "subformat=streamOptimized", Format::Vmdk),
        ("vhdx", "", Format::Vhdx),
        ("vdi", "", Format::Vdi),
        ("vpc", "", Format::Vpc),
        ("vpc", "subformat=fixed", Format::Vpc),
        ("raw", "", Format::Raw),
    ];
    for (i, (fmt, opts, expected)) in cases.iter().enumerate() {
        // Names that say nothing: detection must look at the content.
        let path = path_in(&dir, &format!("image{i}.img"));
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p(&path), "4M"]);
        qemu_img(&args);
        assert_eq!(detect_format(&path).unwrap(), *expected, "{fmt} {opts}");
    }
    // Not there, or not a file.
    assert!(matches!(
        detect_format(&path_in(&dir, "missing")),
        Err(DiskError::Io { .. })
    ));
    let err = detect_format(dir.path()).unwrap_err();
    assert!(err.to_string().contains("directory"), "{err}");
    let err = strata_disk::open(dir.path(), &OpenOptions::default()).unwrap_err();
    assert!(err.to_string().contains("directory"), "{err}");
    let err = strata_disk::open(
        dir.path(),
        &OpenOptions {
            format: Some(Format::Qcow2),
            ..OpenOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("directory"), "{err}");
}

#[test]
fn qemu_img_formats_read_like_the_source() {
    check_available().expect("qemu-img must be installed for these tests");
    let dir = tempdir();
    let raw = path_in(&dir, "src.raw");
    let content = sparse_raw(&raw);
    let cases: &[(&str, &str, Format)] = &[
        ("vmdk", "", Format::Vmdk),
        ("vmdk", "subformat=streamOptimized", Format::Vmdk),
        ("vmdk", "subformat=monolithicFlat", Format::Vmdk),
        ("vhdx", "", Format::Vhdx),
        ("vdi", "", Format::Vdi),
        // force_size keeps the exact size instead of rounding to a CHS geometry.
        ("vpc", "force_size=on", Format::Vpc),
        ("vpc", "subformat=fixed,force_size=on", Format::Vpc),
    ];
    let temp = tempdir();
    for (i, (fmt, opts, expected)) in cases.iter().enumerate() {
        let img = path_in(&dir, &format!("conv{i}.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([p(&raw), p(&img)]);
        qemu_img(&args);
        let opened = strata_disk::open(
            &img,
            &OpenOptions {
                temp_dir: Some(temp.path().to_path_buf()),
                ..OpenOptions::default()
            },
        )
        .unwrap();
        assert_eq!(opened.format(), *expected, "{fmt} {opts}");
        assert_eq!(opened.virtual_size(), content.len() as u64, "{fmt} {opts}");
        assert_eq!(read_all(opened.as_ref()), content, "{fmt} {opts}");
        // The conversion keeps holes, so the importer can still skip them.
        let map = our_map(opened.as_ref());
        assert!(
            map.iter()
                .any(|e| e.kind == ExtentKind::Unallocated && e.len >= 1 << 20),
            "{fmt} {opts}: {map:?}"
        );
        assert_eq!(std::fs::read_dir(temp.path()).unwrap().count(), 1);
        drop(opened);
        // The temporary file goes away with the image.
        assert_eq!(std::fs::read_dir(temp.path()).unwrap().count(), 0, "{fmt}");
    }
}

#[test]
fn qemu_img_failures_carry_its_message() {
    let dir = tempdir();
    // Not a vhdx at all.
    let junk = path_in(&dir, "junk.vhdx");
    std::fs::File::create(&junk)
        .unwrap()
        .write_all(&[0x42; 4096])
        .unwrap();
    let err = ConvertedImage::open(&junk, Format::Vhdx, &OpenOptions::default()).unwrap_err();
    match &err {
        DiskError::QemuImg { path, reason } => {
            assert_eq!(path, &junk);
            assert!(reason.contains("vhdx"), "{reason}");
        }
        other => panic!("expected a qemu-img error, got {other}"),
    }
    // No qemu-img at all.
    let vdi = path_in(&dir, "x.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", p(&vdi), "1M"]);
    let missing = path_in(&dir, "no-such-qemu-img");
    let err = ConvertedImage::open_with(&missing, &vdi, Format::Vdi, &OpenOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, DiskError::QemuImg { reason, .. } if reason.contains("installed")),
        "{err}"
    );
    assert!(strata_disk::qemu_img::check_available_with(&missing).is_err());
}
