//! Image format names and content-based format detection.
//!
//! Detection looks only at magic numbers, never at file names: operators rename
//! images freely, and a `.img` may be anything. Every format we recognise has a
//! fixed signature near the start of the file, except VHD ("vpc" in qemu's
//! terms), whose *fixed* variant is a raw disk followed by a 512-byte footer, so
//! the end of the file is checked too. Anything without a known signature is raw,
//! which is also what `qemu-img` would conclude.
//!
//! Detection is only used for the image the operator names. Backing files of a
//! qcow2 chain are never probed: their format comes from the qcow2 header (see
//! `qcow2.rs`), because probing a backing file that a guest could have written
//! raw bytes into lets the guest choose how the host interprets it.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::str::FromStr;

use crate::{DiskError, Result};

/// A disk image format, named as `qemu-img` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
    Vdi,
    /// Microsoft VHD (Virtual PC), called "vpc" by qemu.
    Vpc,
}

impl Format {
    /// All formats, in the order they are listed in messages.
    pub const ALL: [Format; 6] = [
        Format::Raw,
        Format::Qcow2,
        Format::Vmdk,
        Format::Vhdx,
        Format::Vdi,
        Format::Vpc,
    ];

    /// The `qemu-img` name of the format (`-f` / `-O` argument).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Vpc => "vpc",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A format name that is not one of [`Format::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown image format '{0}' (expected one of: raw, qcow2, vmdk, vhdx, vdi, vpc)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        if let Some(f) = Format::ALL.iter().find(|f| f.name() == lower) {
            return Ok(*f);
        }
        // "vhd" is what most people call the vpc format; accepting it costs nothing.
        if lower == "vhd" {
            return Ok(Format::Vpc);
        }
        Err(UnknownFormat(s.to_string()))
    }
}

const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
const VMDK_SPARSE_MAGIC: &[u8] = b"KDMV";
/// ESX 3 "COWD" sparse extents, which qemu's vmdk driver also reads.
const VMDK_COWD_MAGIC: &[u8] = b"COWD";
const VMDK_DESCRIPTOR: &[u8] = b"# Disk DescriptorFile";
const VHDX_MAGIC: &[u8] = b"vhdxfile";
const VDI_MAGIC_OFFSET: usize = 0x40;
const VDI_MAGIC: u32 = 0xbeda_107f;
const VPC_COOKIE: &[u8] = b"conectix";
const VPC_FOOTER_LEN: u64 = 512;

/// Detect the format of the image at `path` from its content.
///
/// Errors: the path cannot be opened or read, or is a directory.
pub fn detect_format(path: &Path) -> Result<Format> {
    let io_err = |source: io::Error| DiskError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (file, size) = crate::raw::open_image_file(path)?;

    let mut head = [0u8; 512];
    let head_len = read_up_to(&file, &mut head, 0).map_err(io_err)?;
    let head = &head[..head_len];

    let mut tail = [0u8; VPC_FOOTER_LEN as usize];
    let tail = if size >= VPC_FOOTER_LEN {
        let n = read_up_to(&file, &mut tail, size - VPC_FOOTER_LEN).map_err(io_err)?;
        &tail[..n]
    } else {
        &tail[..0]
    };
    Ok(detect_bytes(head, tail))
}

/// Detect a format from the first bytes of an image (`head`, up to 512 bytes) and
/// its last 512 bytes (`tail`, empty when the image is shorter). Pure, for tests.
pub fn detect_bytes(head: &[u8], tail: &[u8]) -> Format {
    if head.starts_with(QCOW2_MAGIC) {
        Format::Qcow2
    } else if head.starts_with(VMDK_SPARSE_MAGIC)
        || head.starts_with(VMDK_COWD_MAGIC)
        || head.starts_with(VMDK_DESCRIPTOR)
    {
        Format::Vmdk
    } else if head.starts_with(VHDX_MAGIC) {
        Format::Vhdx
    } else if head
        .get(VDI_MAGIC_OFFSET..VDI_MAGIC_OFFSET + 4)
        .is_some_and(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]) == VDI_MAGIC)
    {
        Format::Vdi
    } else if head.starts_with(VPC_COOKIE) || tail.starts_with(VPC_COOKIE) {
        // Dynamic VHDs carry a copy of the footer at offset 0; fixed ones only at the end.
        Format::Vpc
    } else {
        Format::Raw
    }
}

/// Read as many bytes as are available at `offset`, up to `buf.len()`.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
            assert_eq!(f.to_string(), f.name());
        }
        assert_eq!("QCOW2".parse::<Format>().unwrap(), Format::Qcow2);
        assert_eq!("vhd".parse::<Format>().unwrap(), Format::Vpc);
        let err = "qcow3".parse::<Format>().unwrap_err();
        assert!(err.to_string().contains("'qcow3'"), "{err}");
        assert!(err.to_string().contains("vmdk"), "{err}");
    }

    #[test]
    fn magic_bytes() {
        assert_eq!(detect_bytes(b"QFI\xfb\0\0\0\x03", &[]), Format::Qcow2);
        assert_eq!(detect_bytes(b"KDMV\x01\0\0\0", &[]), Format::Vmdk);
        assert_eq!(
            detect_bytes(b"# Disk DescriptorFile\nversion=1\n", &[]),
            Format::Vmdk
        );
        assert_eq!(detect_bytes(b"vhdxfile\0\0", &[]), Format::Vhdx);
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&VDI_MAGIC.to_le_bytes());
        assert_eq!(detect_bytes(&vdi, &[]), Format::Vdi);
        assert_eq!(detect_bytes(b"conectix", &[]), Format::Vpc);
        let mut footer = vec![0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        assert_eq!(detect_bytes(&[0u8; 512], &footer), Format::Vpc);
        assert_eq!(detect_bytes(&[0u8; 512], &[0u8; 512]), Format::Raw);
        assert_eq!(detect_bytes(&[], &[]), Format::Raw);
        // A short head must not be indexed past its end.
        assert_eq!(detect_bytes(&[0u8; 0x42], &[]), Format::Raw);
    }
}
