//! A 100 GiB image must work in bounded memory: import it sparse, diff two versions of
//! it, export it, and compare with qemu-img, watching the peak memory of each step.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

fn strata(store: &Path, args: &[&str]) -> (String, u64) {
    // GNU time reports the peak resident set of the command in KiB.
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(env!("CARGO_BIN_EXE_strata"))
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("run strata under /usr/bin/time");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "strata {args:?} failed: {stderr}");
    let rss_kib: u64 = stderr
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {stderr:?}"));
    (String::from_utf8_lossy(&out.stdout).into_owned(), rss_kib)
}

#[test]
fn hundred_gib_sparse_image_in_bounded_memory() {
    assert!(
        Path::new("/usr/bin/time").exists(),
        "/usr/bin/time (Debian package time, installed by scripts/test) is missing"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let img = dir.path().join("big.raw");
    let size: u64 = 100 << 30;
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(size).unwrap();
    // Data scattered over the whole image: 1 MiB every 10 GiB, and the very end.
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for gib in (0..100).step_by(10) {
        f.write_all_at(&chunk, gib << 30).unwrap();
    }
    f.write_all_at(&chunk[..4096], size - 4096).unwrap();
    drop(f);

    strata(&store, &["init"]);
    let (_, rss_import) = strata(&store, &["import", img.to_str().unwrap(), "big"]);
    // Change one block in the middle and import again.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&[0xee; 65536], 55 << 30).unwrap();
    drop(f);
    let (_, rss_import2) = strata(&store, &["import", img.to_str().unwrap(), "big"]);
    let (diff, rss_diff) = strata(&store, &["--json", "diff", "big@main~1", "big@main"]);
    let diff: serde_json::Value = serde_json::from_str(&diff).unwrap();
    assert_eq!(diff["changed_bytes"], 65536);
    assert_eq!(diff["ranges"][0]["offset"], 55u64 << 30);

    let out = dir.path().join("out.qcow2");
    let (_, rss_export) = strata(
        &store,
        &["export", "big", out.to_str().unwrap(), "--format", "qcow2"],
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&img)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    for (step, kib) in [
        ("import", rss_import),
        ("re-import", rss_import2),
        ("diff", rss_diff),
        ("export", rss_export),
    ] {
        eprintln!("{step}: peak RSS {} MiB", kib / 1024);
        // The image is 100 GiB; the work must not scale with it.
        assert!(kib < 256 * 1024, "{step} used {} MiB", kib / 1024);
    }
}
