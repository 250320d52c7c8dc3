//! Seeding a point from a disk image it already has.
//!
//! A laptop re-imaged from last year's gold DVD, a branch server holding an exported
//! raw copy: most of a new version's blocks are already on the disk, just not in the
//! store. [`ImageSeed`] offers the blocks of a local raw or qcow2 image (any format
//! `strata-disk` reads) to a pull, which takes a block only where the image's bytes
//! at the same place hash to exactly the id the version lists; everything else still
//! comes from the hub. A wrong, stale or damaged image therefore costs only the time
//! to read it, never a wrong block.

use std::path::Path;

use strata_disk::{DiskImage, OpenOptions};

use crate::{PointError, Result};

pub struct ImageSeed {
    image: Box<dyn DiskImage>,
    block_size: u64,
}

impl std::fmt::Debug for ImageSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSeed")
            .field("image", &self.image)
            .field("block_size", &self.block_size)
            .finish()
    }
}

impl ImageSeed {
    /// Open `path` (format detected) as a seed for versions of `block_size`.
    pub fn open(path: &Path, block_size: u32) -> Result<ImageSeed> {
        let image = strata_disk::open(path, &OpenOptions::default())
            .map_err(|e| PointError::Invalid(format!("seed image: {e}")))?;
        Ok(ImageSeed {
            image,
            block_size: block_size as u64,
        })
    }
}

impl strata_sync::Seed for ImageSeed {
    fn block(&self, index: u64, len: usize) -> Option<Vec<u8>> {
        let offset = index.checked_mul(self.block_size)?;
        if offset.checked_add(len as u64)? > self.image.virtual_size() {
            return None;
        }
        let mut buf = vec![0u8; len];
        self.image.read_at(&mut buf, offset).ok()?;
        Some(buf)
    }
}
