//! `strata bundle export|import`: a version carried in a file (see
//! [`strata_sync::bundle`] for the format and what is verified).
//!
//! An export is written under a temporary name and renamed into place once complete
//! and synced, so a stick pulled out mid-copy never holds a file that looks whole;
//! an import verifies every object before any branch moves.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use strata_sync::bundle::{self, BundleStats, ExportOptions, ImportOptions};

use crate::cli::BundleCommand;
use crate::commands::Ctx;
use crate::output::{byte_bar, bytes, print_json};
use crate::spec::rev_spec;

#[derive(Serialize)]
struct ExportReport {
    image: String,
    version: String,
    since: Option<String>,
    file: PathBuf,
    #[serde(flatten)]
    stats: BundleStats,
    seconds: f64,
}

#[derive(Serialize)]
struct ImportReport {
    image: String,
    branch: String,
    version: String,
    previous: Option<String>,
    since: Option<String>,
    #[serde(flatten)]
    stats: BundleStats,
    seconds: f64,
}

pub fn run(ctx: &Ctx, c: BundleCommand) -> Result<ExitCode> {
    match c {
        BundleCommand::Export {
            spec,
            file,
            since,
            level,
            force,
        } => export(ctx, &spec, file, since, level, force),
        BundleCommand::Import {
            file,
            image,
            branch,
            force,
        } => import(ctx, file, image, branch, force),
    }
}

fn export(
    ctx: &Ctx,
    spec: &str,
    file: PathBuf,
    since: Option<String>,
    level: i32,
    force: bool,
) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let store = ctx.open()?;
    let s = rev_spec(spec)?;
    let vid = store.resolve(&s.image, s.rev.as_deref())?;
    let since = since
        .map(|r| store.resolve(&s.image, Some(&r)))
        .transpose()
        .context("resolving --since")?;
    if file.is_dir() {
        bail!("{} is a directory", file.display());
    }
    if file.exists() && !force {
        bail!("{} exists; pass --force to replace it", file.display());
    }
    let name = file
        .file_name()
        .with_context(|| format!("{}: not a file name", file.display()))?;
    let tmp = file.with_file_name(format!(".{}.strata-partial", name.to_string_lossy()));
    let version = store.load_version(&vid)?;
    let bs = version.block_size as u64;
    let bar = byte_bar(version.virtual_size, "bundle", ctx.hide_progress());
    let result = (|| -> Result<_> {
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let (header, stats) = bundle::export(
            &store,
            &s.image,
            &vid,
            &ExportOptions {
                since,
                level,
                ..ExportOptions::default()
            },
            &mut w,
            &|blocks| bar.set_position((blocks * bs).min(version.virtual_size)),
        )?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &file)?;
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).ok();
        }
        Ok((header, stats))
    })();
    bar.finish_and_clear();
    let (header, stats) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.context(format!("writing bundle {}", file.display())));
        }
    };
    let r = ExportReport {
        image: header.image,
        version: header.version,
        since: header.since,
        file,
        stats,
        seconds: started.elapsed().as_secs_f64(),
    };
    if ctx.json {
        print_json(&r);
    } else {
        println!(
            "{}@{} -> {} ({} objects, {} of blocks{}, {} file) in {:.1}s",
            r.image,
            &r.version[..12],
            r.file.display(),
            r.stats.data_objects + r.stats.tree_objects + r.stats.version_objects,
            bytes(r.stats.logical_bytes),
            match &r.since {
                Some(s) => format!(", changes since {}, {} deltas", &s[..12], r.stats.deltas),
                None => String::new(),
            },
            bytes(r.stats.file_bytes),
            r.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn import(
    ctx: &Ctx,
    file: PathBuf,
    image: Option<String>,
    branch: String,
    force: bool,
) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let store = ctx.open()?;
    let f = File::open(&file).with_context(|| format!("opening {}", file.display()))?;
    let size = f.metadata()?.len();
    let bar = byte_bar(size, "import", ctx.hide_progress());
    let opts = ImportOptions {
        image,
        branch: branch.clone(),
        force,
    };
    let r = bundle::import(&store, BufReader::with_capacity(1 << 20, f), &opts, &|n| {
        bar.set_position(n)
    });
    bar.finish_and_clear();
    let (header, stats, previous) =
        r.with_context(|| format!("importing bundle {}", file.display()))?;
    let r = ImportReport {
        image: opts.image.unwrap_or(header.image),
        branch,
        version: header.version,
        previous: previous.map(|v| v.to_hex()),
        since: header.since,
        stats,
        seconds: started.elapsed().as_secs_f64(),
    };
    if ctx.json {
        print_json(&r);
    } else {
        println!(
            "{}:{} -> {} ({} objects verified, {} new, {} of blocks) in {:.1}s",
            r.image,
            r.branch,
            &r.version[..12],
            r.stats.data_objects + r.stats.tree_objects + r.stats.version_objects,
            r.stats.new_objects,
            bytes(r.stats.logical_bytes),
            r.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}
