//! Helpers for tests that build real images with the machine's qemu-img/qemu-io.
//!
//! The tests fail (rather than skip) when qemu-img is missing: images made by
//! qemu are the ground truth these readers and writers are checked against.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use strata_disk::{DiskImage, Extent, ExtentKind};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run qemu-img with `args`, panicking with its output on failure.
pub fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

/// Run qemu-io on `img` of format `fmt` with each of `cmds` (`-c` arguments).
pub fn qemu_io(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(img));
    let out = Command::new("qemu-io")
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io (install qemu-utils): {e}"));
    // qemu-io may exit 0 even when a command failed; it says so in its output.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("rror"),
        "qemu-io {args:?}: {text}"
    );
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Create a qcow2 with `qemu-img create -f qcow2 -o OPTS path size`.
pub fn create_qcow2(path: &Path, size: &str, opts: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(p(path));
    args.push(size);
    qemu_img(&args);
}

/// The guest-visible content of `img` (format `fmt`) according to qemu-img.
pub fn qemu_raw(img: &Path, fmt: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    qemu_img(&["convert", "-f", fmt, "-O", "raw", p(img), p(&out)]);
    std::fs::read(out).unwrap()
}

/// The whole content of an image through our reader, read in uneven chunks so
/// that reads start and end inside clusters.
pub fn read_all(img: &dyn DiskImage) -> Vec<u8> {
    let size = img.virtual_size() as usize;
    let mut out = vec![0u8; size];
    let chunks = [4096usize, 65536 + 512, 1 << 20, 3 * 512, 200_000];
    let mut pos = 0;
    let mut i = 0;
    while pos < size {
        let n = chunks[i % chunks.len()].min(size - pos);
        img.read_at(&mut out[pos..pos + n], pos as u64).unwrap();
        pos += n;
        i += 1;
    }
    out
}

/// Allocation map of `img` according to `qemu-img map`, in our terms: not present
/// is `Unallocated`, data is `Data`, present zeros are `Zero`; merged.
pub fn qemu_map(img: &Path, fmt: &str) -> Vec<Extent> {
    let json = qemu_img(&["map", "--output=json", "-f", fmt, p(img)]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut out: Vec<Extent> = Vec::new();
    for e in v.as_array().unwrap() {
        let kind = if !e["present"].as_bool().unwrap() {
            ExtentKind::Unallocated
        } else if e["data"].as_bool().unwrap() {
            ExtentKind::Data
        } else {
            assert!(e["zero"].as_bool().unwrap(), "{e}");
            ExtentKind::Zero
        };
        let offset = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        push(&mut out, Extent { offset, len, kind });
    }
    out
}

/// Append, merging with the previous extent when they touch and agree.
pub fn push(out: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = out.last_mut() {
        if last.kind == e.kind && last.offset + last.len == e.offset {
            last.len += e.len;
            return;
        }
    }
    out.push(e);
}

/// Our allocation map of the whole image, checked to cover it exactly.
pub fn our_map(img: &dyn DiskImage) -> Vec<Extent> {
    let map = img.extents(0, img.virtual_size()).unwrap();
    let mut pos = 0;
    for e in &map {
        assert_eq!(e.offset, pos, "extents must be contiguous: {map:?}");
        assert!(e.len > 0, "{map:?}");
        pos += e.len;
    }
    assert_eq!(
        pos,
        img.virtual_size(),
        "extents must cover the image: {map:?}"
    );
    for w in map.windows(2) {
        assert_ne!(
            w[0].kind, w[1].kind,
            "adjacent extents must be merged: {map:?}"
        );
    }
    map
}

/// Open `img` with our reader and check content and map against qemu.
pub fn assert_matches_qemu(img: &Path) -> Box<dyn DiskImage> {
    let ours = strata_disk::open(img, &Default::default()).unwrap();
    let fmt = ours.format().name();
    let expected = qemu_raw(img, fmt);
    assert_eq!(ours.virtual_size(), expected.len() as u64);
    let got = read_all(ours.as_ref());
    if got != expected {
        let first = got.iter().zip(&expected).position(|(a, b)| a != b).unwrap();
        panic!(
            "{}: content differs from qemu-img at byte {first}",
            img.display()
        );
    }
    assert_eq!(
        our_map(ours.as_ref()),
        qemu_map(img, fmt),
        "{}",
        img.display()
    );
    ours
}

/// Deterministic pseudo-random bytes (xorshift), for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn path_in(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}
