//! Pack files: many objects in one immutable file.
//!
//! A store of millions of 64 KiB blocks would be millions of small files if every
//! object had its own; scans (verify, gc) and object storage (one request per
//! object) both suffer. Objects are therefore appended to packs of up to
//! [`TARGET_PACK_SIZE`] bytes, written once, never modified, and removed or rewritten
//! whole by gc.
//!
//! ```text
//! pack     := header entry* index footer
//! header   := "STRPACK\0" format:u16 flags:u16 reserved:u32 pack_id:[16]      (32 bytes)
//! entry    := "SENT" kind:u8 codec:u8 domain:u8 reserved:u8
//!             raw_len:u32 stored_len:u32 id:[32] reserved:u32              (52 bytes)
//!             payload:[stored_len]
//! index    := count:u32 (id:[32] kind:u8 codec:u8 domain:u8 pad:u8
//!             offset:u64 raw_len:u32 stored_len:u32)*                       (52 bytes each)
//! footer   := index_offset:u64 index_len:u32 index_hash:[32] "STRPEND\0"   (52 bytes)
//! ```
//! All integers are little-endian. `offset` is where the entry header starts. The
//! header in front of every payload makes a pack readable front to back even if its
//! index is lost; the index at the end lets a reader (or an object store range
//! request) learn a pack's contents without reading it all.
//!
//! `codec` 0 is stored as is, 1 is zstd. `domain` 0 is plain content; other values are
//! reserved for encryption domains (keyed ids and AEAD payloads) so that encryption
//! can be added without changing this layout.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result, StoreError};
use crate::id::{ChunkId, ObjectKind};

pub const PACK_MAGIC: &[u8; 8] = b"STRPACK\0";
pub const PACK_END_MAGIC: &[u8; 8] = b"STRPEND\0";
pub const ENTRY_MAGIC: &[u8; 4] = b"SENT";
pub const PACK_FORMAT: u16 = 1;
pub const HEADER_LEN: u64 = 32;
pub const ENTRY_HEADER_LEN: u64 = 52;
pub const INDEX_ENTRY_LEN: usize = 52;
pub const FOOTER_LEN: u64 = 52;
/// Packs are closed once they pass this size: large enough that a 100 GiB image is a
/// few thousand files (or object-store objects), small enough that gc can rewrite one
/// cheaply.
pub const TARGET_PACK_SIZE: u64 = 64 << 20;
/// No object is larger than the largest block (4 MiB) plus compression slack; anything
/// bigger in a header is damage, and must not make a reader allocate it.
pub const MAX_OBJECT_LEN: u32 = 8 << 20;

pub const CODEC_NONE: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;

/// Where an object lives inside a pack, and how it is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub kind: ObjectKind,
    pub codec: u8,
    pub domain: u8,
    /// Offset of the entry header in the pack.
    pub offset: u64,
    pub raw_len: u32,
    pub stored_len: u32,
}

impl PackEntry {
    /// Bytes the entry occupies in the pack: its header and payload.
    pub fn span(&self) -> u64 {
        ENTRY_HEADER_LEN + self.stored_len as u64
    }
}

thread_local! {
    /// One zstd context per thread and level: setting one up per 64 KiB block costs
    /// a few percent of an import.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Encode an object for storage: zstd at `level` unless that does not make it smaller.
pub fn encode_payload(raw: &[u8], level: i32) -> (u8, Vec<u8>) {
    let compressed = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().is_none_or(|(l, _)| *l != level) {
            *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        c.as_mut()?.1.compress(raw).ok()
    });
    match compressed {
        Some(c) if c.len() < raw.len() => (CODEC_ZSTD, c),
        _ => (CODEC_NONE, raw.to_vec()),
    }
}

fn decompress(payload: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut()
            .expect("decompressor was just created")
            .decompress(payload, capacity)
    })
}

/// Decode and check a stored object: decompress, then re-hash against its id.
pub fn decode_payload(entry: &PackEntry, payload: &[u8]) -> Result<Vec<u8>> {
    let corrupt = |reason: String| StoreError::Corrupt {
        id: entry.id,
        reason,
    };
    let raw = match entry.codec {
        CODEC_NONE => payload.to_vec(),
        CODEC_ZSTD => decompress(payload, entry.raw_len as usize)
            .map_err(|e| corrupt(format!("zstd: {e}")))?,
        c => return Err(corrupt(format!("unknown codec {c}"))),
    };
    if raw.len() != entry.raw_len as usize {
        return Err(corrupt(format!(
            "decoded to {} bytes, expected {}",
            raw.len(),
            entry.raw_len
        )));
    }
    if ChunkId::for_object(entry.kind, &raw) != entry.id {
        return Err(corrupt("content does not match its hash".into()));
    }
    Ok(raw)
}

fn encode_entry_header(e: &PackEntry) -> [u8; ENTRY_HEADER_LEN as usize] {
    let mut h = [0u8; ENTRY_HEADER_LEN as usize];
    h[0..4].copy_from_slice(ENTRY_MAGIC);
    h[4] = e.kind as u8;
    h[5] = e.codec;
    h[6] = e.domain;
    h[8..12].copy_from_slice(&e.raw_len.to_le_bytes());
    h[12..16].copy_from_slice(&e.stored_len.to_le_bytes());
    h[16..48].copy_from_slice(&e.id.0);
    h
}

/// Parse an entry header found at `offset`; `None` if it is not one.
pub fn parse_entry_header(b: &[u8], offset: u64) -> Option<PackEntry> {
    if b.len() < ENTRY_HEADER_LEN as usize || &b[0..4] != ENTRY_MAGIC {
        return None;
    }
    let raw_len = u32::from_le_bytes(b[8..12].try_into().ok()?);
    let stored_len = u32::from_le_bytes(b[12..16].try_into().ok()?);
    if raw_len > MAX_OBJECT_LEN || stored_len > MAX_OBJECT_LEN {
        return None;
    }
    Some(PackEntry {
        id: ChunkId::from_slice(&b[16..48])?,
        kind: ObjectKind::from_u8(b[4])?,
        codec: b[5],
        domain: b[6],
        offset,
        raw_len,
        stored_len,
    })
}

/// Check that the bytes read at an index location are the entry the index promised,
/// then decode it. `buf` holds the entry header followed by the payload.
pub fn decode_entry(expected: &PackEntry, buf: &[u8]) -> Result<Vec<u8>> {
    let found = parse_entry_header(buf, expected.offset);
    match found {
        Some(h) if h == *expected => {}
        _ => {
            return Err(StoreError::Corrupt {
                id: expected.id,
                reason: format!(
                    "entry header at offset {} does not match the index",
                    expected.offset
                ),
            })
        }
    }
    decode_payload(expected, &buf[ENTRY_HEADER_LEN as usize..])
}

pub fn encode_index(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * INDEX_ENTRY_LEN);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&[e.kind as u8, e.codec, e.domain, 0]);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
    }
    out
}

/// Parse a pack index (the bytes between index_offset and the footer).
pub fn parse_index(b: &[u8]) -> std::result::Result<Vec<PackEntry>, String> {
    if b.len() < 4 {
        return Err("index shorter than its count".into());
    }
    let count = u32::from_le_bytes(b[0..4].try_into().unwrap()) as usize;
    if b.len() != 4 + count.saturating_mul(INDEX_ENTRY_LEN) {
        return Err(format!(
            "index of {} bytes cannot hold {count} entries",
            b.len()
        ));
    }
    let mut out = Vec::with_capacity(count);
    for rec in b[4..].chunks_exact(INDEX_ENTRY_LEN) {
        let kind = ObjectKind::from_u8(rec[32]).ok_or("unknown object kind in index")?;
        let entry = PackEntry {
            id: ChunkId::from_slice(&rec[0..32]).unwrap(),
            kind,
            codec: rec[33],
            domain: rec[34],
            offset: u64::from_le_bytes(rec[36..44].try_into().unwrap()),
            raw_len: u32::from_le_bytes(rec[44..48].try_into().unwrap()),
            stored_len: u32::from_le_bytes(rec[48..52].try_into().unwrap()),
        };
        if entry.raw_len > MAX_OBJECT_LEN || entry.stored_len > MAX_OBJECT_LEN {
            return Err("object length in index is implausible".into());
        }
        out.push(entry);
    }
    Ok(out)
}

/// Parse a footer; returns (index_offset, index_len, index_hash).
pub fn parse_footer(b: &[u8]) -> std::result::Result<(u64, u32, [u8; 32]), String> {
    if b.len() != FOOTER_LEN as usize {
        return Err("footer has the wrong length".into());
    }
    if &b[44..52] != PACK_END_MAGIC {
        return Err("footer magic missing (pack truncated or not a pack)".into());
    }
    let off = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let len = u32::from_le_bytes(b[8..12].try_into().unwrap());
    Ok((off, len, b[12..44].try_into().unwrap()))
}

/// Parse a whole pack held in memory: header, every entry front to back, and the
/// index, which must agree with the entries. Used by verify and by the fuzz target.
pub fn parse_pack(b: &[u8]) -> std::result::Result<Vec<PackEntry>, String> {
    if b.len() < (HEADER_LEN + FOOTER_LEN) as usize || &b[0..8] != PACK_MAGIC {
        return Err("not a pack (bad header magic)".into());
    }
    let format = u16::from_le_bytes(b[8..10].try_into().unwrap());
    if format != PACK_FORMAT {
        return Err(format!("unsupported pack format {format}"));
    }
    let (ioff, ilen, ihash) = parse_footer(&b[b.len() - FOOTER_LEN as usize..])?;
    let iend = ioff
        .checked_add(ilen as u64)
        .filter(|&e| e == b.len() as u64 - FOOTER_LEN)
        .ok_or("index location in footer is out of range")?;
    let index_bytes = &b[ioff as usize..iend as usize];
    if blake3::hash(index_bytes).as_bytes() != &ihash {
        return Err("index checksum mismatch".into());
    }
    let index = parse_index(index_bytes)?;
    let mut pos = HEADER_LEN;
    for e in &index {
        if e.offset != pos {
            return Err(format!(
                "index says entry {} is at {}, but the previous entry ends at {pos}",
                e.id, e.offset
            ));
        }
        let end = pos
            .checked_add(e.span())
            .filter(|&end| end <= ioff)
            .ok_or_else(|| format!("entry {} runs past the index", e.id))?;
        match parse_entry_header(&b[pos as usize..end as usize], pos) {
            Some(h) if h == *e => {}
            _ => return Err(format!("entry header at {pos} does not match the index")),
        }
        pos = end;
    }
    if pos != ioff {
        return Err("bytes between the last entry and the index".into());
    }
    Ok(index)
}

/// Fuzzing entry point: parse `bytes` as a pack and decode every entry its index
/// lists. Errors are expected; panics and huge allocations are bugs.
#[doc(hidden)]
pub fn fuzz_pack(bytes: &[u8]) {
    if let Ok(entries) = parse_pack(bytes) {
        for e in entries {
            let start = e.offset as usize;
            let end = start + e.span() as usize;
            let _ = decode_entry(&e, &bytes[start..end]);
        }
    }
}

/// Appends objects to a new pack file in a temporary location.
/// How much a pack writer buffers in the page cache before starting its writeback.
const WRITEBACK_STEP: u64 = 8 << 20;

pub struct PackWriter {
    pub name: String,
    path: PathBuf,
    writeback_from: u64,
    file: BufWriter<File>,
    offset: u64,
    entries: Vec<PackEntry>,
}

impl PackWriter {
    /// Start a pack named `name` (32 hex digits) at `path` (a temporary file).
    pub fn create(name: String, path: PathBuf) -> Result<PackWriter> {
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .at(&path)?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        let mut header = [0u8; HEADER_LEN as usize];
        header[0..8].copy_from_slice(PACK_MAGIC);
        header[8..10].copy_from_slice(&PACK_FORMAT.to_le_bytes());
        hex::decode_to_slice(&name, &mut header[16..32])
            .map_err(|_| StoreError::Invalid(format!("pack name {name:?} is not 32 hex digits")))?;
        file.write_all(&header).at(&path)?;
        Ok(PackWriter {
            name,
            path,
            writeback_from: 0,
            file,
            offset: HEADER_LEN,
            entries: Vec::new(),
        })
    }

    /// Append one encoded object; returns where it went.
    pub fn append(
        &mut self,
        id: ChunkId,
        kind: ObjectKind,
        raw_len: usize,
        codec: u8,
        payload: &[u8],
    ) -> Result<PackEntry> {
        let entry = PackEntry {
            id,
            kind,
            codec,
            domain: 0,
            offset: self.offset,
            raw_len: raw_len as u32,
            stored_len: payload.len() as u32,
        };
        self.file
            .write_all(&encode_entry_header(&entry))
            .at(&self.path)?;
        self.file.write_all(payload).at(&self.path)?;
        self.offset += entry.span();
        self.entries.push(entry);
        if self.offset - self.writeback_from >= WRITEBACK_STEP {
            self.start_writeback()?;
        }
        Ok(entry)
    }

    /// Ask the kernel to start writing what we have so far, without waiting, so that
    /// the fsync when the pack is finished waits for the tail only and the disk works
    /// while the cores compress.
    fn start_writeback(&mut self) -> Result<()> {
        use std::os::fd::AsRawFd;
        self.file.flush().at(&self.path)?;
        let fd = self.file.get_ref().as_raw_fd();
        let (from, len) = (self.writeback_from, self.offset - self.writeback_from);
        // SAFETY: plain syscall on a descriptor we own; failure only loses the hint.
        unsafe {
            libc::sync_file_range(
                fd,
                from as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.writeback_from = self.offset;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.offset
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write index and footer and fsync. The file is complete but still temporary:
    /// the backend makes it part of the store.
    pub fn finish(mut self) -> Result<FinishedPack> {
        let index = encode_index(&self.entries);
        let mut footer = Vec::with_capacity(FOOTER_LEN as usize);
        footer.extend_from_slice(&self.offset.to_le_bytes());
        footer.extend_from_slice(&(index.len() as u32).to_le_bytes());
        footer.extend_from_slice(blake3::hash(&index).as_bytes());
        footer.extend_from_slice(PACK_END_MAGIC);
        self.file.write_all(&index).at(&self.path)?;
        self.file.write_all(&footer).at(&self.path)?;
        let file = self
            .file
            .into_inner()
            .map_err(|e| e.into_error())
            .at(&self.path)?;
        file.sync_all().at(&self.path)?;
        let size = self.offset + index.len() as u64 + FOOTER_LEN;
        Ok(FinishedPack {
            name: self.name,
            path: self.path,
            size,
            entries: self.entries,
        })
    }
}

/// A complete pack file waiting to be handed to the backend.
pub struct FinishedPack {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub entries: Vec<PackEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_parse_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let name = "00112233445566778899aabbccddeeff".to_string();
        let mut w = PackWriter::create(name, dir.path().join("p.tmp")).unwrap();
        let mut written = Vec::new();
        for i in 0..20u8 {
            let raw = vec![i; 1000 + i as usize];
            let (codec, payload) = encode_payload(&raw, 3);
            let e = w
                .append(
                    ChunkId::of(&raw),
                    ObjectKind::Data,
                    raw.len(),
                    codec,
                    &payload,
                )
                .unwrap();
            written.push((e, raw));
        }
        let fin = w.finish().unwrap();
        let bytes = std::fs::read(&fin.path).unwrap();
        assert_eq!(bytes.len() as u64, fin.size);
        let parsed = parse_pack(&bytes).unwrap();
        assert_eq!(parsed, fin.entries);
        for (e, raw) in written {
            let buf = &bytes[e.offset as usize..(e.offset + e.span()) as usize];
            assert_eq!(decode_entry(&e, buf).unwrap(), raw);
        }
    }

    #[test]
    fn every_flipped_byte_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let name = "00112233445566778899aabbccddeeff".to_string();
        let mut w = PackWriter::create(name, dir.path().join("p.tmp")).unwrap();
        let raw: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (codec, payload) = encode_payload(&raw, 3);
        let e = w
            .append(
                ChunkId::of(&raw),
                ObjectKind::Data,
                raw.len(),
                codec,
                &payload,
            )
            .unwrap();
        let fin = w.finish().unwrap();
        let bytes = std::fs::read(&fin.path).unwrap();
        for pos in 0..bytes.len() {
            let mut b = bytes.clone();
            b[pos] ^= 0x40;
            let in_entry = (pos as u64) >= e.offset && (pos as u64) < e.offset + e.span();
            if in_entry {
                let buf = &b[e.offset as usize..(e.offset + e.span()) as usize];
                // Reserved header bytes carry no meaning; all others must be caught.
                let rel = pos as u64 - e.offset;
                if (7..8).contains(&rel) || (48..52).contains(&rel) {
                    continue;
                }
                assert!(decode_entry(&e, buf).is_err(), "flip at {pos} not detected");
            } else if (10..32).contains(&pos) {
                // Header flags, reserved bytes and the pack id: informational only.
            } else {
                assert!(
                    parse_pack(&b).is_err(),
                    "flip at {pos} not detected by parse"
                );
            }
        }
    }
}
