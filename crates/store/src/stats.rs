//! Store-wide figures: what all versions hold logically, and what that costs on disk.

use serde::Serialize;

use crate::error::Result;
use crate::store::Store;

#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreStats {
    pub images: u64,
    pub versions: u64,
    /// Sum of the virtual sizes of all versions.
    pub logical_bytes: u64,
    /// Sum over all versions of the bytes in data blocks (zero and unwritten excluded).
    pub logical_data_bytes: u64,
    /// Distinct data blocks and their uncompressed size.
    pub unique_chunks: u64,
    pub unique_bytes: u64,
    /// Bytes of data blocks after compression.
    pub stored_data_bytes: u64,
    /// Bytes of tree nodes and version records after compression.
    pub stored_metadata_bytes: u64,
    pub packs: u64,
    /// Size of all pack files (data, metadata and pack overhead).
    pub stored_bytes: u64,
    /// logical_data_bytes / unique_bytes.
    pub dedup_ratio: f64,
    /// unique_bytes / stored_data_bytes.
    pub compression_ratio: f64,
}

pub fn stats(store: &Store) -> Result<StoreStats> {
    let mut s = StoreStats::default();
    for (_, v) in store.list_versions()? {
        s.versions += 1;
        s.logical_bytes += v.virtual_size;
        s.logical_data_bytes += v.data_bytes;
    }
    let cat = store.cat();
    let c = &cat.conn;
    s.images = c.query_row("SELECT count(*) FROM images", [], |r| r.get::<_, i64>(0))? as u64;
    let (n, raw, stored): (i64, i64, i64) = c.query_row(
        "SELECT count(*), coalesce(sum(raw_len), 0), coalesce(sum(stored_len), 0) FROM chunks WHERE kind = 0",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    s.unique_chunks = n as u64;
    s.unique_bytes = raw as u64;
    s.stored_data_bytes = stored as u64;
    s.stored_metadata_bytes = c.query_row(
        "SELECT coalesce(sum(stored_len), 0) FROM chunks WHERE kind <> 0",
        [],
        |r| r.get::<_, i64>(0),
    )? as u64;
    let (packs, size): (i64, i64) = c.query_row(
        "SELECT count(*), coalesce(sum(size), 0) FROM packs",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    s.packs = packs as u64;
    s.stored_bytes = size as u64;
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    s.dedup_ratio = ratio(s.logical_data_bytes, s.unique_bytes);
    s.compression_ratio = ratio(s.unique_bytes, s.stored_data_bytes);
    Ok(s)
}
