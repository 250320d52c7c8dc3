//! Deltas: an object compressed against an object the receiver already holds.
//!
//! When a point that holds version V1 pulls V2, block b of V2 usually differs from
//! block b of V1 in a few places (a file rewritten in place, a changed inode table).
//! zstd compresses the new block with the old one as a *prefix*, a raw-content
//! dictionary, so what travels is roughly the edit, not the block. The receiver
//! decompresses with the same prefix and checks the result against the object's id,
//! so a wrong or damaged base can never yield a wrong block, only a refused one.

use crate::error::{Result, SyncError};
use crate::frame::{Body, MAX_OBJECT, MAX_WINDOW_LOG};
use strata_store::ChunkId;

/// How object `raw` travels to a receiver that holds `base` (id, bytes): as a delta
/// against it when that is smaller than the object, else as its bytes (which the
/// batch's stream compresses with its neighbours). A base equal to the object
/// itself is never used. Pushes and bundles use this rule; the hub's downloads
/// weigh the stream's gain ([`crate::pages::pages_body`]).
pub fn smaller_body(
    raw: Vec<u8>,
    id: &ChunkId,
    base: Option<(ChunkId, &[u8])>,
    level: i32,
) -> Body {
    if let Some((bid, b)) = base.filter(|(bid, _)| bid != id) {
        if let Ok(z) = encode(b, &raw, level) {
            if z.len() + 36 < raw.len() {
                return Body::Delta {
                    base: bid,
                    raw_len: raw.len() as u32,
                    zframe: z,
                };
            }
        }
    }
    Body::Raw(raw)
}

/// What raw bytes are estimated to cost inside a batch's zstd stream: 0.8x of their
/// size compressed alone. The stream does better than "alone" because neighbouring
/// blocks share content; a delta is already compressed and gains nothing from it.
/// Measured on the gold-image update of `bench/transfer.sh` at 256 MiB
/// (`delta-model`): taking a delta whenever it beat the raw size sent 5.17 MB, only
/// when it beat 0.8x of the block compressed alone 4.84 MB. On a user's day of
/// random writes the same rule cost 2% more than [`smaller_body`]'s (the random
/// bytes gain nothing from the stream), so pushes keep that one.
pub fn stream_cost(raw: &[u8], level: i32) -> usize {
    zstd::bulk::compress(raw, level).map_or(raw.len(), |z| z.len()) * 4 / 5
}

use zstd::zstd_safe::{CCtx, CParameter, DCtx, DParameter};

/// Compress `target` with `base` as a prefix dictionary at `level`.
pub fn encode(base: &[u8], target: &[u8], level: i32) -> Result<Vec<u8>> {
    let mut c = CCtx::create();
    let err = |e: usize| {
        SyncError::Protocol(format!(
            "zstd delta: {}",
            zstd::zstd_safe::get_error_name(e)
        ))
    };
    c.set_parameter(CParameter::CompressionLevel(level))
        .map_err(err)?;
    // The window must reach back over the whole base.
    let window = (base.len() + target.len())
        .next_power_of_two()
        .trailing_zeros()
        .clamp(10, MAX_WINDOW_LOG);
    c.set_parameter(CParameter::WindowLog(window))
        .map_err(err)?;
    c.ref_prefix(base).map_err(err)?;
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(target.len()));
    c.compress2(&mut out, target).map_err(err)?;
    Ok(out)
}

/// Undo [`encode`]: `raw_len` is the object's size (at most [`MAX_OBJECT`]).
pub fn decode(base: &[u8], zframe: &[u8], raw_len: usize) -> Result<Vec<u8>> {
    if raw_len > MAX_OBJECT {
        return Err(SyncError::Protocol(format!(
            "delta of {raw_len} bytes is too large"
        )));
    }
    let err = |e: usize| {
        SyncError::Protocol(format!(
            "zstd delta: {}",
            zstd::zstd_safe::get_error_name(e)
        ))
    };
    let mut d = DCtx::create();
    d.set_parameter(DParameter::WindowLogMax(MAX_WINDOW_LOG))
        .map_err(err)?;
    d.ref_prefix(base).map_err(err)?;
    let mut out = Vec::with_capacity(raw_len);
    let n = d.decompress(&mut out, zframe).map_err(err)?;
    if n != raw_len {
        return Err(SyncError::Protocol(format!(
            "delta decoded to {n} bytes, expected {raw_len}"
        )));
    }
    Ok(out)
}

/// An object's bytes from the body it travelled in: a delta is decoded against its
/// base, which `bases` must supply. `Err` says why the object cannot be had (the
/// caller refuses it; its id is checked by the caller either way).
pub fn resolve(
    body: Body,
    bases: &dyn crate::client::BaseSource,
) -> std::result::Result<Vec<u8>, String> {
    match body {
        Body::Raw(r) => Ok(r),
        Body::Delta {
            base,
            raw_len,
            zframe,
        } => {
            let b = bases
                .base(&base)
                .ok_or_else(|| format!("its delta base {base} is not here"))?;
            decode(&b, &zframe, raw_len as usize).map_err(|e| e.to_string())
        }
        Body::Pages {
            raw_len,
            chunks,
            runs,
            literal,
        } => {
            let held: Vec<Option<Vec<u8>>> = chunks.iter().map(|c| bases.base(c)).collect();
            crate::pages::assemble(raw_len as usize, &runs, &literal, |i| {
                held.get(i)?.as_deref()
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_of_a_small_edit_is_small_and_exact() {
        let mut base = vec![0u8; 65536];
        let mut x = 12345u64;
        for b in base.iter_mut() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (x >> 33) as u8;
        }
        let mut target = base.clone();
        target[1000..1100].fill(0xAB);
        let d = encode(&base, &target, 3).unwrap();
        assert!(d.len() < 400, "delta is {} bytes", d.len());
        assert_eq!(decode(&base, &d, target.len()).unwrap(), target);
        // The wrong base cannot produce the right bytes (and a short output is refused).
        let other = vec![1u8; 65536];
        assert_ne!(decode(&other, &d, target.len()).ok(), Some(target.clone()));
        assert!(decode(&base, &d, target.len() + 1).is_err());
    }
}
