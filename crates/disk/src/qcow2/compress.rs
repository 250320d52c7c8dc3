//! Decompression of qcow2 compressed clusters.
//!
//! A compressed cluster is stored as a byte range that is neither cluster- nor
//! sector-aligned, and its length is only known to 512-byte-sector precision: the
//! stored range may end with the start of the next compressed cluster. So both
//! decoders stop as soon as one cluster of output has been produced and ignore
//! whatever input is left, as qemu does.
//!
//! * deflate (compression type 0): a raw deflate stream (no zlib header; qemu
//!   compresses with window bits -12, which a 32 KiB-window inflater reads fine).
//! * zstd (compression type 1): one zstd frame. The decoder's window is capped so
//!   that a crafted frame cannot make it allocate more than a cluster's worth.

use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use super::header::{CompressionType, MAX_CLUSTER_BITS};

/// Inflate `input` into exactly `out.len()` bytes, or say why it could not be done.
pub(crate) fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), String> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = Decompress::new(false);
    loop {
        let (in_pos, out_pos) = (d.total_in() as usize, d.total_out() as usize);
        if out_pos == out.len() {
            return Ok(());
        }
        let status = d
            .decompress(
                &input[in_pos..],
                &mut out[out_pos..],
                FlushDecompress::Finish,
            )
            .map_err(|e| format!("deflate data is corrupt: {e}"))?;
        let progressed = d.total_in() as usize != in_pos || d.total_out() as usize != out_pos;
        if d.total_out() as usize == out.len() {
            return Ok(());
        }
        if status == Status::StreamEnd || !progressed {
            return Err(format!(
                "deflate data ends after {} of {} bytes",
                d.total_out(),
                out.len()
            ));
        }
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let err = |e: std::io::Error| format!("zstd data is corrupt: {e}");
    let mut d = Decoder::new().map_err(err)?;
    // The frame was produced from one cluster; a window larger than the biggest
    // cluster can only come from a crafted frame and would cost memory.
    d.set_parameter(DParameter::WindowLogMax(MAX_CLUSTER_BITS + 1))
        .map_err(err)?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    let mut hint = 0;
    while outb.pos() < outb.capacity() {
        let (in_pos, out_pos) = (inb.pos(), outb.pos());
        hint = d.run(&mut inb, &mut outb).map_err(err)?;
        if inb.pos() == in_pos && outb.pos() == out_pos {
            return Err(format!(
                "zstd data ends after {} of {} bytes",
                outb.pos(),
                outb.capacity()
            ));
        }
    }
    // A frame that still has output pending decompresses to more than a cluster.
    if hint != 0 {
        return Err("zstd frame decompresses to more than one cluster".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn raw_deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn deflate_with_trailing_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut c = raw_deflate(&data);
        c.extend_from_slice(&[0xff; 300]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Deflate, &c, &mut out).unwrap();
        assert_eq!(out, data);
        // Too little input is an error, not a short cluster.
        let mut out = vec![0u8; 4096];
        assert!(decompress(CompressionType::Deflate, &c[..c.len() / 3], &mut out).is_err());
        // Output larger than the stream: error.
        let mut out = vec![0u8; 8192];
        assert!(decompress(CompressionType::Deflate, &raw_deflate(&data), &mut out).is_err());
    }

    #[test]
    fn zstd_with_trailing_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 253) as u8).collect();
        let mut c = zstd::bulk::compress(&data, 3).unwrap();
        c.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
        let mut out = vec![0u8; 4096];
        assert!(decompress(
            CompressionType::Zstd,
            &[0x28, 0xb5, 0x2f, 0xfd, 1, 2],
            &mut out
        )
        .is_err());
        assert!(decompress(CompressionType::Zstd, &[], &mut out).is_err());
    }
}
