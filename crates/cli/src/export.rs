//! Export: write a version to a raw or qcow2 file.
//!
//! The file is written under a temporary name beside the destination and renamed
//! into place only when complete, so an interrupted export never leaves a file that
//! looks finished. Unwritten blocks stay holes; zero blocks are holes in raw and zero
//! clusters in qcow2.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use strata_block::{Block, BlockDevice, Run, VersionDevice};
use strata_disk::Format;
use strata_store::{Store, StoreError, VersionId};

use crate::output;

#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub version: String,
    pub file: PathBuf,
    pub format: &'static str,
    pub virtual_size: u64,
    pub data_bytes: u64,
    pub seconds: f64,
}

fn disk_err(e: strata_disk::DiskError) -> StoreError {
    StoreError::Invalid(e.to_string())
}

pub fn export(
    store: Arc<Store>,
    id: VersionId,
    file: &Path,
    format: Format,
    force: bool,
    quiet: bool,
) -> Result<ExportReport> {
    let started = std::time::Instant::now();
    if !matches!(format, Format::Raw | Format::Qcow2) {
        bail!(
            "cannot export to {}: choose raw or qcow2 (then convert with qemu-img)",
            format.name()
        );
    }
    if file.exists() && !force {
        bail!("{} exists; pass --force to replace it", file.display());
    }
    if file.is_dir() {
        bail!("{} is a directory", file.display());
    }
    let dev = VersionDevice::open(store, id)?;
    let size = dev.virtual_size();
    let bs = dev.block_size() as u64;
    let name = file
        .file_name()
        .with_context(|| format!("{}: not a file name", file.display()))?;
    let tmp = file.with_file_name(format!(".{}.strata-partial", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let mut w = strata_disk::create(&tmp, format, size, bs as u32)?;
    let bar = output::byte_bar(size, "export", quiet);
    let mut data_bytes = 0u64;
    let result = dev.read_runs(0, dev.blocks(), &mut |run| {
        match run {
            Run::Uniform { start, count, zero } => {
                let off = start * bs;
                let len = (count * bs).min(size - off);
                if zero {
                    w.write_zeroes(off, len).map_err(disk_err)?;
                }
                bar.inc(len);
            }
            Run::Blocks { start, blocks } => {
                for (i, b) in blocks.iter().enumerate() {
                    let off = (start + i as u64) * bs;
                    let len = bs.min(size - off);
                    match b {
                        Block::Unwritten => {}
                        Block::Zero => w.write_zeroes(off, len).map_err(disk_err)?,
                        Block::Data(d) => {
                            w.write_data(off, d).map_err(disk_err)?;
                            data_bytes += d.len() as u64;
                        }
                    }
                    bar.inc(len);
                }
            }
        }
        Ok(())
    });
    let finished = result
        .map_err(anyhow::Error::from)
        .and_then(|()| w.finish().map_err(anyhow::Error::from));
    bar.finish_and_clear();
    if let Err(e) = finished {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("exporting to {}", file.display())));
    }
    std::fs::rename(&tmp, file).with_context(|| format!("renaming into {}", file.display()))?;
    Ok(ExportReport {
        version: id.to_hex(),
        file: file.to_path_buf(),
        format: format.name(),
        virtual_size: size,
        data_bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}
