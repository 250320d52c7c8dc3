//! Formats read through `qemu-img`: vmdk, vhdx, vdi and vpc (VHD).
//!
//! These formats are rare on the import path and each has several sub-variants
//! (split/stream-optimized vmdk, differencing VHD/VHDX, ...). Rather than carry a
//! parser per variant, the image is converted once with
//! `qemu-img convert -f FMT -O raw` into a sparse temporary file, which is then
//! served like any raw image. qemu-img writes zero ranges as holes, so the
//! allocation map of the temporary file still lets the importer skip them (it
//! cannot tell "zero" from "unallocated" here; both are reported `Unallocated`).
//!
//! The format is always passed explicitly (`-f`), never probed, and paths are
//! made absolute so that qemu-img cannot mistake a file name for an option or a
//! protocol prefix (`nbd:...`). Conversion needs temporary space for the
//! allocated data of the image; the file is deleted when the image is dropped.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::raw::RawImage;
use crate::{DiskError, DiskImage, Extent, Format, OpenOptions, Result};

/// The qemu-img binary: `$STRATA_QEMU_IMG` if set, else `qemu-img` from `PATH`.
pub fn qemu_img_binary() -> PathBuf {
    std::env::var_os("STRATA_QEMU_IMG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-img"))
}

/// Check that qemu-img can be run; returns its version line.
pub fn check_available() -> Result<String> {
    check_available_with(&qemu_img_binary())
}

/// [`check_available`] for a specific binary.
pub fn check_available_with(binary: &Path) -> Result<String> {
    let out = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DiskError::QemuImg {
            path: binary.to_path_buf(),
            reason: format!(
                "cannot run {}: {e} (is qemu-img installed?)",
                binary.display()
            ),
        })?;
    if !out.status.success() {
        return Err(DiskError::QemuImg {
            path: binary.to_path_buf(),
            reason: format!(
                "`{} --version` failed ({}): {}",
                binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// An image converted to a temporary raw file by qemu-img.
#[derive(Debug)]
pub struct ConvertedImage {
    raw: RawImage,
    format: Format,
    source: PathBuf,
    // Dropped after `raw` (fields drop in declaration order), deleting the file.
    _dir: tempfile::TempDir,
}

impl ConvertedImage {
    /// Convert `path`, in `format`, with the default qemu-img binary.
    pub fn open(path: &Path, format: Format, opts: &OpenOptions) -> Result<ConvertedImage> {
        Self::open_with(&qemu_img_binary(), path, format, opts)
    }

    /// Convert `path` with a specific qemu-img binary.
    pub fn open_with(
        qemu_img: &Path,
        path: &Path,
        format: Format,
        opts: &OpenOptions,
    ) -> Result<ConvertedImage> {
        let fail = |reason: String| DiskError::QemuImg {
            path: path.to_path_buf(),
            reason,
        };
        let source = std::fs::canonicalize(path).map_err(|source| DiskError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut builder = tempfile::Builder::new();
        builder.prefix("strata-convert-");
        let dir = match &opts.temp_dir {
            Some(d) => builder.tempdir_in(d),
            None => builder.tempdir(),
        }
        .map_err(|source| DiskError::Io {
            path: opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir),
            source,
        })?;
        let dir_path = std::path::absolute(dir.path()).map_err(|source| DiskError::Io {
            path: dir.path().to_path_buf(),
            source,
        })?;
        let target = dir_path.join("image.raw");

        let args: Vec<OsString> = vec![
            "convert".into(),
            "-q".into(),
            "-f".into(),
            format.name().into(),
            "-O".into(),
            "raw".into(),
            source.clone().into(),
            target.clone().into(),
        ];
        tracing::debug!(binary = %qemu_img.display(), ?args, "converting through qemu-img");
        let out = Command::new(qemu_img)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                fail(format!(
                    "cannot run {}: {e} (is qemu-img installed? it is needed to read {} images)",
                    qemu_img.display(),
                    format.name()
                ))
            })?;
        if !out.status.success() {
            return Err(fail(format!(
                "`qemu-img convert -f {} -O raw` exited with {}: {}",
                format.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let raw = RawImage::open(&target)?;
        Ok(ConvertedImage {
            raw,
            format,
            source,
            _dir: dir,
        })
    }

    /// The image that was converted.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The temporary raw file holding the converted content.
    pub fn temp_path(&self) -> &Path {
        self.raw.path()
    }
}

impl DiskImage for ConvertedImage {
    fn format(&self) -> Format {
        self.format
    }

    fn virtual_size(&self) -> u64 {
        self.raw.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.raw.read_at(buf, offset)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.raw.extents(offset, len)
    }
}
