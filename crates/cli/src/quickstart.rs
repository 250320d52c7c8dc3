//! `strata quickstart`: the whole loop on a sample image, in a store of its own.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use strata_store::{RefKind, Store};

use crate::cli::{Cli, Command};
use crate::commands::{self, Ctx};
use crate::import::{ImportReport, ImportRequest};
use crate::output;

/// A deterministic generator, so every quickstart shows the same numbers.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Text-like, compressible content, as files on a real disk mostly are.
fn fill(buf: &mut [u8], rng: &mut XorShift) {
    const WORDS: [&str; 16] = [
        "strata ", "block ", "version ", "disk ", "image ", "gold ", "point ", "hub ", "desktop ",
        "kernel ", "config ", "user ", "data ", "sync ", "delta ", "tree\n",
    ];
    let mut i = 0;
    while i < buf.len() {
        let w = WORDS[(rng.next() % 16) as usize].as_bytes();
        let n = w.len().min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[..n]);
        i += n;
    }
}

/// A 64 MiB raw disk: scattered "files" and large never-written gaps.
fn make_sample(path: &Path) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(64 << 20)?;
    let mut rng = XorShift(0x5eed_5eed_5eed_5eed);
    let mut buf = vec![0u8; 1 << 20];
    for mib in [0u64, 1, 2, 3, 8, 9, 16, 17, 18, 40, 41, 63] {
        fill(&mut buf, &mut rng);
        f.write_all_at(&buf, mib << 20)?;
    }
    f.sync_all()?;
    Ok(())
}

/// The "update": rewrite 2 MiB of files and add 1 MiB more.
fn update_sample(path: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut rng = XorShift(0xdead_beef_cafe_f00d);
    let mut buf = vec![0u8; 1 << 20];
    for mib in [8u64, 9, 30] {
        fill(&mut buf, &mut rng);
        f.write_all_at(&buf, mib << 20)?;
    }
    f.sync_all()?;
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
    let _ = std::io::stdout().flush();
}

/// Run a strata command as a person would type it (text output).
fn strata(ctx: &Ctx, args: &[&str]) -> Result<()> {
    use clap::Parser;
    let mut argv = vec![
        "strata".to_string(),
        "--store".into(),
        ctx.store_path.display().to_string(),
    ];
    if ctx.quiet {
        argv.push("--quiet".into());
    }
    argv.extend(args.iter().map(|s| s.to_string()));
    let cli = Cli::try_parse_from(&argv)?;
    if matches!(cli.command, Command::Quickstart { .. }) {
        anyhow::bail!("quickstart cannot run itself");
    }
    commands::run(cli)?;
    Ok(())
}

fn import(store: &Store, file: &Path, message: &str) -> Result<ImportReport> {
    crate::import::import(
        store,
        &ImportRequest {
            file,
            image: "demo",
            branch: "main",
            message,
            author: "quickstart".into(),
            format: None,
            block_size: None,
            max_backing_depth: 16,
            quiet: true,
        },
    )
}

pub fn run(ctx: &Ctx, dir: Option<PathBuf>) -> Result<ExitCode> {
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            d
        }
        None => tempfile::Builder::new()
            .prefix("strata-quickstart-")
            .tempdir()?
            .keep(),
    };
    let store_path = dir.join("store");
    let sample = dir.join("sample.raw");
    if ctx.json {
        // One document: what each step produced.
        let store = Store::init(&store_path)?;
        make_sample(&sample)?;
        let v1 = import(&store, &sample, "gold v1")?;
        let id1 = store.resolve("demo", None)?;
        store.create_ref("demo", RefKind::Tag, "v1", &id1)?;
        update_sample(&sample)?;
        let v2 = import(&store, &sample, "gold v2: patched")?;
        let log: Vec<serde_json::Value> = store
            .history(&store.resolve("demo", None)?, 10)?
            .into_iter()
            .map(|(id, v)| serde_json::json!({"id": id.to_hex(), "version": v}))
            .collect();
        output::print_json(&serde_json::json!({
            "store": store_path,
            "sample": sample,
            "imports": [v1, v2],
            "log": log,
            "diff": commands::diff_report(&store, "demo@v1", "demo@main")?,
            "stats": strata_store::stats::stats(&store)?,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let sub = Ctx {
        store_path: store_path.clone(),
        json: false,
        quiet: ctx.quiet,
    };
    step(&format!("strata init {}", store_path.display()));
    commands::init(&sub, &store_path)?;
    step("a 64 MiB sample disk with 12 MiB of files");
    make_sample(&sample)?;
    println!("{}", sample.display());
    let sample_s = sample.display().to_string();
    step("strata import sample.raw demo -m 'gold v1'");
    strata(&sub, &["import", &sample_s, "demo", "-m", "gold v1"])?;
    strata(&sub, &["tag", "add", "demo", "v1"])?;
    step("update 3 MiB of the disk, then import it again");
    update_sample(&sample)?;
    strata(
        &sub,
        &["import", &sample_s, "demo", "-m", "gold v2: patched"],
    )?;
    step("strata log demo");
    strata(&sub, &["log", "demo"])?;
    step("strata diff demo@v1 demo@main");
    strata(&sub, &["diff", "demo@v1", "demo@main"])?;
    step("strata stats");
    strata(&sub, &["stats"])?;
    println!(
        "\nThe store is in {}. Try:\n  export STRATA_STORE={}\n  strata export demo@v1 v1.qcow2 --format qcow2\n  strata verify",
        store_path.display(),
        store_path.display()
    );
    Ok(ExitCode::SUCCESS)
}
