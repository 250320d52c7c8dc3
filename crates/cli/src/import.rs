//! Import: read a disk image file and commit it as a new version.
//!
//! A reader thread walks the file's allocation map and reads only the blocks that
//! hold data, a batch (16 MiB) at a time, while the store hashes, deduplicates and
//! compresses the previous batch on all cores. Two batches in flight bound memory.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use strata_disk::{DiskImage, ExtentKind, OpenOptions};
use strata_store::{
    BlockInput, CommitTarget, PreparedBlocks, Store, VersionId, WriteSession, WriteStats,
};

use crate::output;

/// Bytes read and handed to the store at a time.
const BATCH_BYTES: u64 = 16 << 20;

pub struct ImportRequest<'a> {
    pub file: &'a Path,
    pub image: &'a str,
    pub branch: &'a str,
    pub message: &'a str,
    pub author: String,
    pub format: Option<strata_disk::Format>,
    pub block_size: Option<u64>,
    pub max_backing_depth: usize,
    pub quiet: bool,
}

#[derive(Debug, Serialize)]
pub struct ImportReport {
    pub image: String,
    pub branch: String,
    pub version: String,
    pub parent: Option<String>,
    pub format: &'static str,
    pub virtual_size: u64,
    pub block_size: u32,
    #[serde(flatten)]
    pub stats: WriteStats,
    pub seconds: f64,
}

/// Classify one block from the extents that overlap it.
fn block_kind(extents: &[strata_disk::Extent], start: u64, end: u64) -> ExtentKind {
    let mut kind = ExtentKind::Unallocated;
    for e in extents {
        if e.offset < end && e.offset + e.len > start {
            match e.kind {
                ExtentKind::Data => return ExtentKind::Data,
                ExtentKind::Zero => kind = ExtentKind::Zero,
                ExtentKind::Unallocated => {}
            }
        }
    }
    kind
}

/// Read blocks `[first, first + count)` of `img` as store input: holes and zero ranges
/// are not read, runs of data blocks are read with one call each.
fn read_batch(img: &dyn DiskImage, bs: u64, first: u64, count: u64) -> Result<Vec<BlockInput>> {
    let size = img.virtual_size();
    let start = first * bs;
    let end = ((first + count) * bs).min(size);
    let extents = img
        .extents(start, end - start)
        .context("reading the allocation map")?;
    let kinds: Vec<ExtentKind> = (0..count)
        .map(|i| {
            let s = start + i * bs;
            block_kind(&extents, s, (s + bs).min(size))
        })
        .collect();
    let mut out = Vec::with_capacity(count as usize);
    let mut i = 0usize;
    while i < kinds.len() {
        match kinds[i] {
            ExtentKind::Unallocated => {
                out.push(BlockInput::Unwritten);
                i += 1;
            }
            ExtentKind::Zero => {
                out.push(BlockInput::Zero);
                i += 1;
            }
            ExtentKind::Data => {
                // Read straight into the block's own buffer: no staging copy.
                let off = start + i as u64 * bs;
                let len = bs.min(size - off);
                let mut buf = vec![0u8; len as usize];
                img.read_at(&mut buf, off)
                    .with_context(|| format!("reading {len} bytes at offset {off}"))?;
                out.push(BlockInput::Data(buf));
                i += 1;
            }
        }
    }
    Ok(out)
}

pub fn import(store: &Store, req: &ImportRequest) -> Result<ImportReport> {
    let started = std::time::Instant::now();
    let opts = OpenOptions {
        format: req.format,
        max_backing_depth: req.max_backing_depth,
        temp_dir: Some(store.root().join("tmp")),
    };
    let img = strata_disk::open(req.file, &opts)?;
    let size = img.virtual_size();
    let existing_bs = store.image_block_size(req.image)?;
    let bs = match (existing_bs, req.block_size) {
        (Some(have), Some(asked)) if have as u64 != asked => bail!(
            "image {:?} has {} blocks; --block-size {} cannot change that (import into a new image instead)",
            req.image,
            output::bytes(have as u64),
            output::bytes(asked)
        ),
        (Some(have), _) => have,
        (None, asked) => {
            strata_store::validate_block_size(asked.unwrap_or(strata_store::DEFAULT_BLOCK_SIZE as u64))?
        }
    };
    if existing_bs.is_none() {
        strata_store::validate_name(req.image)?;
    }
    strata_store::validate_name(req.branch)?;

    let mut session = WriteSession::begin(store, &format!("import {}", req.file.display()))?;
    let tip = session.pin_branch(req.image, req.branch)?;
    // A new branch of an existing image grows from the image's default branch.
    let parent: Option<VersionId> = match tip {
        Some(t) => Some(t),
        None if existing_bs.is_some() => {
            session.pin_branch(req.image, strata_store::DEFAULT_BRANCH)?
        }
        None => None,
    };
    let mut draft = session.new_version(size, bs)?;
    let total_blocks = draft.blocks_total();
    let batch = (BATCH_BYTES / bs as u64).max(1);
    let bar = output::byte_bar(size, "import", req.quiet);

    std::thread::scope(|scope| -> Result<()> {
        // The reader thread also hashes, so hashing of one batch overlaps with the
        // compression of the one before.
        let (tx, rx) = crossbeam_channel::bounded::<Result<PreparedBlocks>>(2);
        let img = &img;
        scope.spawn(move || {
            let mut first = 0;
            while first < total_blocks {
                let count = batch.min(total_blocks - first);
                let r = read_batch(&**img, bs as u64, first, count).map(PreparedBlocks::new);
                let failed = r.is_err();
                if tx.send(r).is_err() || failed {
                    return;
                }
                first += count;
            }
        });
        for blocks in rx {
            let blocks = blocks?;
            let n = blocks.len() as u64;
            session.add_prepared(&mut draft, blocks)?;
            bar.inc(n * bs as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();

    let target = CommitTarget {
        image: req.image.to_string(),
        branch: req.branch.to_string(),
        expected: tip,
        create_image: true,
        parents: parent.into_iter().collect(),
        author: req.author.clone(),
        message: req.message.to_string(),
    };
    let (vid, _, stats) = session.commit(draft, &target)?;
    Ok(ImportReport {
        image: req.image.to_string(),
        branch: req.branch.to_string(),
        version: vid.to_hex(),
        parent: parent.map(|p| p.to_hex()),
        format: img.format().name(),
        virtual_size: size,
        block_size: bs,
        stats,
        seconds: started.elapsed().as_secs_f64(),
    })
}
