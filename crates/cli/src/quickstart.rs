//! `strata quickstart [DIR]`: the whole thing on a sample image, in one directory.
//!
//! First a tour of the store (`DIR/store`): a 64 MiB sample disk is imported, updated
//! and imported again, and the log, the diff and the statistics are shown. Then the
//! real thing ([`live`]): a hub (`DIR/hub`) started on a free port of 127.0.0.1 with
//! the sample published to channel `sample/production`, a point (`DIR/point`) whose
//! agent serves NBD on `DIR/nbd.sock`, and desktop `demo` checked out to it; both
//! disks are read back with a real NBD client, and the NBD URIs and the qemu command
//! are printed. The hub and the agent keep running after the command exits, until
//! `strata quickstart --stop DIR`.
//!
//! DIR defaults to `$XDG_DATA_HOME/strata/quickstart` (beside the default store,
//! rather than the current directory: `cargo run` from a checkout would otherwise
//! leave it in the work tree). A DIR must be new, empty, or a stopped quickstart's
//! (which is then made afresh); one whose servers still run is refused.

#[path = "quickstart_live.rs"]
mod live;

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};

use strata_store::{RefKind, Store};

use crate::cli::{Cli, Command};
use crate::commands::{self, Ctx};
use crate::import::{ImportReport, ImportRequest};
use crate::output;

use live::IMAGE;

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
            image: IMAGE,
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

/// The directory used when none is given.
fn default_dir() -> PathBuf {
    let store = crate::default_store_path();
    store
        .parent()
        .map(|p| p.join("quickstart"))
        .unwrap_or_else(|| PathBuf::from("strata-quickstart"))
}

/// Make `dir` ready for a new quickstart: new, empty, or a stopped quickstart's
/// (whose files are removed). Returns its absolute path and whether an old
/// quickstart was replaced; records it as starting.
fn prepare(dir: &Path) -> Result<(PathBuf, bool)> {
    let mut afresh = false;
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        if dir.join(live::STATE_FILE).exists() {
            let old = live::State::load(dir)?;
            let running = old.running();
            if !running.is_empty() {
                let what: Vec<String> = running
                    .iter()
                    .map(|p| format!("{} pid {}", p.role, p.pid))
                    .collect();
                bail!(
                    "a quickstart is running in {} ({}); stop it first with `strata quickstart --stop {}`",
                    dir.display(),
                    what.join(", "),
                    live::shell_quote(&dir.display().to_string())
                );
            }
            for name in live::ENTRIES {
                let p = dir.join(name);
                match std::fs::symlink_metadata(&p) {
                    Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
                    Ok(_) => std::fs::remove_file(&p),
                    Err(_) => continue,
                }
                .with_context(|| format!("removing {}", p.display()))?;
            }
            afresh = true;
        } else if std::fs::read_dir(dir)?.next().is_some() {
            bail!(
                "{} is not empty and holds no quickstart (no {}): give a new or empty directory",
                dir.display(),
                live::STATE_FILE
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir).with_context(|| dir.display().to_string())?;
    // The longest socket path, DIR/point/point.sock, must fit sockaddr_un (108 bytes
    // with the NUL).
    let longest = dir.join("point").join("point.sock");
    if longest.as_os_str().len() > 107 {
        bail!(
            "{} is too long a path for the Unix sockets made in it (at most 90 bytes): choose a shorter DIR",
            dir.display()
        );
    }
    live::State::new(&dir).save()?;
    Ok((dir, afresh))
}

pub fn run(ctx: &Ctx, dir: Option<PathBuf>, stop: bool) -> Result<ExitCode> {
    let given = dir.is_some();
    let dir = dir.unwrap_or_else(default_dir);
    if stop {
        live::stop(&dir, ctx.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (dir, afresh) = prepare(&dir)?;
    if afresh && !ctx.json {
        println!(
            "(starting afresh in {}: the previous quickstart's files are removed)",
            dir.display()
        );
    }
    let store_path = dir.join("store");
    let sample = dir.join("sample.raw");
    let image = IMAGE;
    if ctx.json {
        // One document: what each step produced.
        let store = Store::init(&store_path)?;
        make_sample(&sample)?;
        let v1 = import(&store, &sample, "gold v1")?;
        let id1 = store.resolve(image, None)?;
        store.create_ref(image, RefKind::Tag, "v1", &id1)?;
        update_sample(&sample)?;
        let v2 = import(&store, &sample, "gold v2: patched")?;
        let log: Vec<serde_json::Value> = store
            .history(&store.resolve(image, None)?, 10)?
            .into_iter()
            .map(|(id, v)| serde_json::json!({"id": id.to_hex(), "version": v}))
            .collect();
        let mut doc = serde_json::json!({
            "store": store_path,
            "sample": sample,
            "imports": [v1, v2],
            "log": log,
            "diff": commands::diff_report(&store, &format!("{image}@v1"), &format!("{image}@main"))?,
            "stats": strata_store::stats::stats(&store)?,
        });
        drop(store);
        let running =
            live::Live::new(&dir, live::State::load(&dir)?, false, !given)?.start(&store_path)?;
        if let (Some(d), Some(r)) = (doc.as_object_mut(), running.as_object()) {
            d.extend(r.clone());
        }
        output::print_json(&doc);
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
    step(&format!("strata import sample.raw {image} -m 'gold v1'"));
    strata(&sub, &["import", &sample_s, image, "-m", "gold v1"])?;
    strata(&sub, &["tag", "add", image, "v1"])?;
    step("update 3 MiB of the disk, then import it again");
    update_sample(&sample)?;
    strata(
        &sub,
        &["import", &sample_s, image, "-m", "gold v2: patched"],
    )?;
    step(&format!("strata log {image}"));
    strata(&sub, &["log", image])?;
    let (a, b) = (format!("{image}@v1"), format!("{image}@main"));
    step(&format!("strata diff {a} {b}"));
    strata(&sub, &["diff", &a, &b])?;
    step("strata stats");
    strata(&sub, &["stats"])?;
    println!(
        "\n\nNow the real thing: a hub with {image} published to channel {}, a point with desktop {} checked out, served over NBD.",
        live::CHANNEL,
        live::DESKTOP
    );
    live::Live::new(&dir, live::State::load(&dir)?, true, !given)?.start(&store_path)?;
    Ok(ExitCode::SUCCESS)
}
