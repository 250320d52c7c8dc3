//! Page references: content the receiver holds at *other* places.
//!
//! A same-place delta ([`crate::delta`]) helps only when block b of the new version
//! resembles block b of the old one. A gold-image update also copies content the old
//! version already holds somewhere else: files rewritten to new extents, binaries
//! copied, a package cache unpacked. rsync finds such content at any offset; Strata
//! finds it at the granularity filesystems allocate in, 4 KiB **pages**: the sender
//! keeps a [`PageIndex`] of the base version the receiver names (every distinct page
//! by a 64-bit key), and a block it sends names **runs** of pages of chunks the
//! receiver holds (found there, or unchanged at the same place of the block's base),
//! checked byte for byte before they are named. The pages no run covers travel as
//! **literal** bytes, raw inside the frame, so the batch's zstd stream compresses
//! them together with their neighbours ([`pages_body`] picks this form, a same-place
//! delta or the raw block by estimated size). The receiver assembles the block from
//! its own chunks ([`assemble`]) and checks it against the object's id.
//!
//! ## Index file (one per indexed version; bounded memory to build and to use)
//!
//! ```text
//! magic    "STRPIDX" 0x01                 8 bytes
//! version  [32]                           the indexed version's id
//! chunks   u64  records u64               little-endian counts
//! chunk table   chunks × [32]             distinct data chunks, in first-use order
//! buckets       65537 × u64               first record of each 16-bit key prefix
//! records       records × (key:u64 chunk:u32 page:u16 pad:u16), sorted by key
//! ```
//!
//! All-zero pages are not indexed (they compress to nothing anyway), and a key is
//! kept once. Building walks the version once, spilling records into 256 files by
//! their key's first byte and then sorting each on its own, so memory stays at one
//! leaf of blocks plus one spill file however large the image. A lookup reads one
//! bucket (a few records) from the file; only the bucket table (512 KiB) is in memory.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use strata_store::tree::{self, Span};
use strata_store::{ChunkId, Store, StoreError, VersionId};

use crate::frame::{Body, MAX_OBJECT};

/// The unit of page references.
pub const PAGE: usize = 4096;
/// At most this many distinct chunks and runs in one block's references (they travel
/// in the frame, and each costs the receiver a read).
pub const MAX_REF_CHUNKS: usize = 16;
pub const MAX_RUNS: usize = 64;

const MAGIC: &[u8; 8] = b"STRPIDX\x01";
const HEADER: u64 = 8 + 32 + 16;
const BUCKETS: usize = 1 << 16;
const RECORD: usize = 16;

/// Pages `at .. at + count` of an object are pages `first .. first + count` of chunk
/// number `chunk` of a frame's chunk list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    pub at: u16,
    pub chunk: u8,
    pub first: u16,
    pub count: u16,
}

/// The key of a page: the first 8 bytes of its BLAKE3 hash.
pub fn page_key(page: &[u8]) -> u64 {
    let h = blake3::hash(page);
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

fn io_err(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// A version's page index, open for lookups.
pub struct PageIndex {
    file: File,
    version: VersionId,
    chunks: u64,
    /// Record number where each 16-bit key prefix starts (65537 entries).
    buckets: Vec<u64>,
}

impl std::fmt::Debug for PageIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageIndex")
            .field("version", &self.version)
            .field("chunks", &self.chunks)
            .field("pages", &self.pages())
            .finish()
    }
}

impl PageIndex {
    /// Index every distinct non-zero page of version `vid` of `store` into `path`
    /// (written under a temporary name, then renamed: a crash leaves no half index).
    pub fn build(store: &Store, vid: &VersionId, path: &Path) -> Result<PageIndex, StoreError> {
        let version = store.load_version(vid)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let spill = tempfile::tempdir_in(dir).map_err(|e| io_err(dir, e))?;
        let mut spills: Vec<BufWriter<File>> = (0..256)
            .map(|i| {
                let p = spill.path().join(format!("{i:02x}"));
                File::create(&p)
                    .map(|f| BufWriter::with_capacity(32 << 10, f))
                    .map_err(|e| io_err(&p, e))
            })
            .collect::<Result<_, _>>()?;
        let table_path = spill.path().join("chunks");
        let mut table =
            BufWriter::new(File::create(&table_path).map_err(|e| io_err(&table_path, e))?);
        // Distinct chunks only: an image repeats blocks (one id at many places).
        let mut seen: HashSet<ChunkId> = HashSet::new();
        let mut chunks: u64 = 0;
        let t = version.tree();
        let mut load = |id: &ChunkId| store.load_node(id);
        tree::walk(
            &mut load,
            t.root,
            t.depth,
            0,
            version.blocks(),
            &mut |span| {
                let Span::Blocks { entries, .. } = span else {
                    return Ok(());
                };
                let ids: Vec<ChunkId> = tree::present_ids(entries)
                    .into_iter()
                    .filter(|id| seen.insert(*id))
                    .collect();
                let data = store.read_chunks(&ids)?;
                let keyed: Vec<Vec<(u64, u16)>> = {
                    use rayon::prelude::*;
                    data.par_iter()
                        .map(|d| {
                            d.chunks(PAGE)
                                .enumerate()
                                .filter(|(_, p)| p.len() == PAGE && p.iter().any(|&b| b != 0))
                                .map(|(i, p)| (page_key(p), i as u16))
                                .collect()
                        })
                        .collect()
                };
                for (id, pages) in ids.iter().zip(keyed) {
                    table.write_all(&id.0).map_err(|e| io_err(&table_path, e))?;
                    for (key, page) in pages {
                        let mut r = [0u8; RECORD];
                        r[..8].copy_from_slice(&key.to_le_bytes());
                        r[8..12].copy_from_slice(&(chunks as u32).to_le_bytes());
                        r[12..14].copy_from_slice(&page.to_le_bytes());
                        spills[(key >> 56) as usize]
                            .write_all(&r)
                            .map_err(|e| io_err(spill.path(), e))?;
                    }
                    chunks += 1;
                }
                Ok(())
            },
        )?;
        drop(seen);
        let table = table
            .into_inner()
            .map_err(|e| io_err(&table_path, e.into_error()))?;
        drop(table);
        let spills: Vec<File> = spills
            .into_iter()
            .map(|w| {
                w.into_inner()
                    .map_err(|e| io_err(spill.path(), e.into_error()))
            })
            .collect::<Result<_, _>>()?;
        drop(spills);

        let tmp = spill.path().join("index");
        let mut out = BufWriter::new(File::create(&tmp).map_err(|e| io_err(&tmp, e))?);
        let werr = |e| io_err(&tmp, e);
        out.write_all(MAGIC).map_err(werr)?;
        out.write_all(&vid.0).map_err(werr)?;
        out.write_all(&chunks.to_le_bytes()).map_err(werr)?;
        out.write_all(&0u64.to_le_bytes()).map_err(werr)?; // records: patched below
        let mut t = File::open(&table_path).map_err(|e| io_err(&table_path, e))?;
        std::io::copy(&mut t, &mut out).map_err(werr)?;
        // Sort each spill and lay the records out; the bucket table goes before them,
        // so the records are staged in a second file and appended.
        let staged = spill.path().join("records");
        let mut recs = BufWriter::new(File::create(&staged).map_err(|e| io_err(&staged, e))?);
        let mut buckets = vec![0u64; BUCKETS + 1];
        let mut n: u64 = 0;
        for i in 0..256usize {
            let p = spill.path().join(format!("{i:02x}"));
            let mut raw = Vec::new();
            File::open(&p)
                .and_then(|mut f| f.read_to_end(&mut raw))
                .map_err(|e| io_err(&p, e))?;
            let _ = std::fs::remove_file(&p);
            let mut rs: Vec<[u8; RECORD]> = raw
                .chunks_exact(RECORD)
                .map(|c| c.try_into().expect("record"))
                .collect();
            drop(raw);
            rs.sort_by_key(|r| key_of(r));
            rs.dedup_by_key(|r| key_of(r));
            for r in &rs {
                let b = (key_of(r) >> 48) as usize;
                buckets[b + 1] = n + 1;
                recs.write_all(r).map_err(|e| io_err(&staged, e))?;
                n += 1;
            }
        }
        // A bucket's end is the next bucket's start; empty buckets inherit.
        for b in 1..=BUCKETS {
            buckets[b] = buckets[b].max(buckets[b - 1]);
        }
        drop(
            recs.into_inner()
                .map_err(|e| io_err(&staged, e.into_error()))?,
        );
        for b in &buckets {
            out.write_all(&b.to_le_bytes()).map_err(werr)?;
        }
        let mut s = File::open(&staged).map_err(|e| io_err(&staged, e))?;
        std::io::copy(&mut s, &mut out).map_err(werr)?;
        let f = out.into_inner().map_err(|e| io_err(&tmp, e.into_error()))?;
        f.write_all_at(&n.to_le_bytes(), 48).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
        PageIndex::open(path)
    }

    /// Open an index written by [`PageIndex::build`], checking its shape.
    pub fn open(path: &Path) -> Result<PageIndex, StoreError> {
        let file = File::open(path).map_err(|e| io_err(path, e))?;
        let bad = |m: &str| StoreError::Invalid(format!("page index {}: {m}", path.display()));
        let mut h = [0u8; HEADER as usize];
        file.read_exact_at(&mut h, 0).map_err(|e| io_err(path, e))?;
        if &h[..8] != MAGIC {
            return Err(bad("not a page index"));
        }
        let version = ChunkId(h[8..40].try_into().expect("32"));
        let chunks = u64::from_le_bytes(h[40..48].try_into().expect("8"));
        let records = u64::from_le_bytes(h[48..56].try_into().expect("8"));
        let len = file.metadata().map_err(|e| io_err(path, e))?.len();
        let expect = HEADER + chunks * 32 + (BUCKETS as u64 + 1) * 8 + records * RECORD as u64;
        if len != expect {
            return Err(bad("wrong length"));
        }
        let mut raw = vec![0u8; (BUCKETS + 1) * 8];
        file.read_exact_at(&mut raw, HEADER + chunks * 32)
            .map_err(|e| io_err(path, e))?;
        let buckets: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8")))
            .collect();
        if buckets.windows(2).any(|w| w[0] > w[1]) || buckets[BUCKETS] != records {
            return Err(bad("bad bucket table"));
        }
        Ok(PageIndex {
            file,
            version,
            chunks,
            buckets,
        })
    }

    /// The indexed version.
    pub fn version(&self) -> VersionId {
        self.version
    }

    /// Distinct pages indexed.
    pub fn pages(&self) -> u64 {
        self.buckets[BUCKETS]
    }

    fn records_at(&self) -> u64 {
        HEADER + self.chunks * 32 + (BUCKETS as u64 + 1) * 8
    }

    /// Where a page with this key is: (chunk, page within it).
    pub fn lookup(&self, key: u64) -> std::io::Result<Option<(ChunkId, u16)>> {
        let b = (key >> 48) as usize;
        let (lo, hi) = (self.buckets[b], self.buckets[b + 1]);
        if lo == hi {
            return Ok(None);
        }
        let mut raw = vec![0u8; ((hi - lo) as usize) * RECORD];
        self.file
            .read_exact_at(&mut raw, self.records_at() + lo * RECORD as u64)?;
        let recs: Vec<&[u8]> = raw.chunks_exact(RECORD).collect();
        let Ok(i) = recs.binary_search_by_key(&key, |r| key_of(r)) else {
            return Ok(None);
        };
        let r = recs[i];
        let chunk = u32::from_le_bytes(r[8..12].try_into().expect("4")) as u64;
        let page = u16::from_le_bytes(r[12..14].try_into().expect("2"));
        if chunk >= self.chunks {
            return Ok(None);
        }
        let mut id = [0u8; 32];
        self.file.read_exact_at(&mut id, HEADER + chunk * 32)?;
        Ok(Some((ChunkId(id), page)))
    }
}

fn key_of(r: &[u8]) -> u64 {
    u64::from_le_bytes(r[..8].try_into().expect("8"))
}

/// Where each page of `target` can be had from chunks the receiver holds: its
/// same-place `base` when the page is unchanged there, else wherever `index` finds
/// it. Candidates are checked byte for byte against the chunks (`read`), so a key
/// collision only costs a literal page. Consecutive pages from consecutive places
/// merge into runs; at most [`MAX_REF_CHUNKS`] chunks and [`MAX_RUNS`] runs.
fn find_runs(
    target: &[u8],
    id: &ChunkId,
    base: Option<(ChunkId, &[u8])>,
    index: Option<&PageIndex>,
    read: impl FnOnce(&[ChunkId]) -> Option<Vec<Vec<u8>>>,
) -> (Vec<ChunkId>, Vec<PageRun>) {
    let full = target.len() / PAGE;
    let page = |i: usize| &target[i * PAGE..(i + 1) * PAGE];
    // Per target page: (chunk, page) where it may be.
    let mut cand: Vec<Option<(ChunkId, u16)>> = vec![None; full];
    for (i, c) in cand.iter_mut().enumerate() {
        let p = page(i);
        if p.iter().all(|&b| b == 0) {
            continue; // zeros compress to nothing in the stream
        }
        if let Some((bid, b)) = base {
            if b.get(i * PAGE..(i + 1) * PAGE) == Some(p) {
                *c = Some((bid, i as u16));
                continue;
            }
        }
        if let Some(Ok(Some((cid, cp)))) = index.map(|x| x.lookup(page_key(p))) {
            if cid != *id {
                *c = Some((cid, cp));
            }
        }
    }
    let mut chunks: Vec<ChunkId> = Vec::new();
    for (cid, _) in cand.iter().flatten() {
        if !chunks.contains(cid) && chunks.len() < MAX_REF_CHUNKS {
            chunks.push(*cid);
        }
    }
    if chunks.is_empty() {
        return (chunks, Vec::new());
    }
    // Read the candidates' chunks (the base is at hand) and keep exact matches only.
    let others: Vec<ChunkId> = chunks
        .iter()
        .filter(|c| base.map(|(b, _)| b) != Some(**c))
        .copied()
        .collect();
    let read_back = if others.is_empty() {
        Some(Vec::new())
    } else {
        read(&others).filter(|h| h.len() == others.len())
    };
    let held = |c: &ChunkId| -> Option<&[u8]> {
        if let Some((_, bytes)) = base.filter(|(b, _)| b == c) {
            return Some(bytes);
        }
        let i = others.iter().position(|o| o == c)?;
        read_back.as_ref()?.get(i).map(|v| v.as_slice())
    };
    let mut runs: Vec<PageRun> = Vec::new();
    let mut prev: Option<(u8, u16)> = None;
    for (i, c) in cand.iter().enumerate() {
        let Some((cid, cp)) = c else {
            prev = None;
            continue;
        };
        let Some(ci) = chunks.iter().position(|x| x == cid) else {
            prev = None;
            continue;
        };
        let from = *cp as usize * PAGE;
        if held(cid).and_then(|b| b.get(from..from + PAGE)) != Some(page(i)) {
            prev = None;
            continue;
        }
        let ci = ci as u8;
        let extends = matches!(prev, Some((pc, pp)) if pc == ci && pp.checked_add(1) == Some(*cp));
        if extends {
            runs.last_mut().expect("a run to extend").count += 1;
        } else if runs.len() < MAX_RUNS {
            runs.push(PageRun {
                at: i as u16,
                chunk: ci,
                first: *cp,
                count: 1,
            });
        } else {
            break;
        }
        prev = Some((ci, *cp));
    }
    // Only chunks some run uses stay in the list.
    let mut kept: Vec<ChunkId> = Vec::new();
    let mut remap = vec![u8::MAX; chunks.len()];
    for r in &mut runs {
        let c = r.chunk as usize;
        if remap[c] == u8::MAX {
            remap[c] = kept.len() as u8;
            kept.push(chunks[c]);
        }
        r.chunk = remap[c];
    }
    (kept, runs)
}

/// The literal bytes of `target`: every byte no run covers, in order.
fn literal_of(target: &[u8], runs: &[PageRun]) -> Vec<u8> {
    let mut out = Vec::with_capacity(target.len());
    let mut at = 0usize;
    for r in runs {
        let from = r.at as usize * PAGE;
        out.extend_from_slice(&target[at..from]);
        at = from + r.count as usize * PAGE;
    }
    out.extend_from_slice(&target[at..]);
    out
}

/// Rebuild an object from its runs (pages of the receiver's chunks, `chunk(i)`
/// giving chunk `i` of the list) and its literal bytes, which fill every page no run
/// covers. Runs must be in order, within the object and their chunks, and the
/// literal must be exactly what they leave.
pub fn assemble<'a>(
    raw_len: usize,
    runs: &[PageRun],
    literal: &[u8],
    mut chunk: impl FnMut(usize) -> Option<&'a [u8]>,
) -> Result<Vec<u8>, String> {
    if raw_len > MAX_OBJECT {
        return Err(format!("object of {raw_len} bytes is too large"));
    }
    let mut out = Vec::with_capacity(raw_len);
    let mut lit = 0usize;
    let mut take = |out: &mut Vec<u8>, n: usize| -> Result<(), String> {
        let l = literal
            .get(lit..lit + n)
            .ok_or("the literal bytes are shorter than the pages they fill")?;
        out.extend_from_slice(l);
        lit += n;
        Ok(())
    };
    for r in runs {
        let from = r.at as usize * PAGE;
        let to = from + r.count as usize * PAGE;
        if r.count == 0 || from < out.len() || to > raw_len {
            return Err("page runs overlap, are out of order or leave the object".into());
        }
        let gap = from - out.len();
        take(&mut out, gap)?;
        let c = chunk(r.chunk as usize)
            .ok_or_else(|| format!("a page run names chunk #{} which is not here", r.chunk))?;
        let src = r.first as usize * PAGE;
        let pages = c
            .get(src..src + r.count as usize * PAGE)
            .ok_or("a page run lies outside its chunk")?;
        out.extend_from_slice(pages);
    }
    let tail = raw_len - out.len();
    take(&mut out, tail)?;
    if lit != literal.len() {
        return Err("literal bytes left over after the object".into());
    }
    Ok(out)
}

/// How object `raw` travels to a receiver that holds `base` (the same-place object)
/// and, with `index`, the version it covers: the smallest, by estimated bytes in the
/// batch's stream ([`crate::delta::stream_cost`]), of
/// * **pages**: pages found unchanged at their place or anywhere in the indexed
///   version as runs, the rest as literal bytes the stream compresses;
/// * a same-place **delta** (best for edits inside pages);
/// * the object **raw**.
pub fn pages_body(
    raw: Vec<u8>,
    id: &ChunkId,
    base: Option<(ChunkId, &[u8])>,
    index: Option<&PageIndex>,
    read: impl FnOnce(&[ChunkId]) -> Option<Vec<Vec<u8>>>,
    level: i32,
) -> Body {
    let base = base.filter(|(bid, _)| bid != id);
    let (chunks, runs) = find_runs(&raw, id, base, index, read);
    if runs.is_empty() && base.is_none() {
        return Body::Raw(raw);
    }
    // The literal is only needed (and only copied) when there are runs.
    let literal = (!runs.is_empty()).then(|| literal_of(&raw, &runs));
    let pages_cost = literal.as_ref().map_or(usize::MAX, |l| {
        6 + 32 * chunks.len() + 7 * runs.len() + crate::delta::stream_cost(l, level)
    });
    let raw_cost = crate::delta::stream_cost(&raw, level);
    let delta = base.and_then(|(bid, b)| Some((bid, crate::delta::encode(b, &raw, level).ok()?)));
    let delta_cost = delta.as_ref().map_or(usize::MAX, |(_, z)| 36 + z.len());
    if let Some(literal) = literal.filter(|_| pages_cost <= delta_cost && pages_cost < raw_cost) {
        return Body::Pages {
            raw_len: raw.len() as u32,
            chunks,
            runs,
            literal,
        };
    }
    match delta {
        Some((bid, z)) if delta_cost < raw_cost => Body::Delta {
            base: bid,
            raw_len: raw.len() as u32,
            zframe: z,
        },
        _ => Body::Raw(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(at: u16, chunk: u8, first: u16, count: u16) -> PageRun {
        PageRun {
            at,
            chunk,
            first,
            count,
        }
    }

    #[test]
    fn assemble_checks_every_bound() {
        let c: Vec<u8> = (0..4 * PAGE).map(|i| (i / PAGE) as u8 + 1).collect();
        // Object: literal page, pages 2-3 of the chunk, then a short literal tail.
        let lit: Vec<u8> = [vec![9u8; PAGE], vec![8u8; 100]].concat();
        let runs = [run(1, 0, 2, 2)];
        let o = assemble(3 * PAGE + 100, &runs, &lit, |_| Some(c.as_slice())).unwrap();
        assert_eq!(&o[..PAGE], &lit[..PAGE]);
        assert!(o[PAGE..2 * PAGE].iter().all(|&b| b == 3));
        assert!(o[2 * PAGE..3 * PAGE].iter().all(|&b| b == 4));
        assert_eq!(&o[3 * PAGE..], &lit[PAGE..]);
        let bad = |runs: &[PageRun], lit: &[u8], len: usize| {
            assemble(len, runs, lit, |i| (i == 0).then_some(c.as_slice())).is_err()
        };
        assert!(
            bad(&[run(1, 0, 3, 2)], &lit, 3 * PAGE + 100),
            "outside the chunk"
        );
        assert!(
            bad(&[run(1, 1, 0, 1)], &lit, 3 * PAGE + 100),
            "no such chunk"
        );
        assert!(
            bad(&[run(1, 0, 0, 1), run(1, 0, 0, 1)], &lit, 4 * PAGE),
            "overlap"
        );
        assert!(bad(&runs, &lit[1..], 3 * PAGE + 100), "literal short");
        assert!(
            bad(&runs, &[lit.clone(), vec![0]].concat(), 3 * PAGE + 100),
            "literal long"
        );
        assert!(
            bad(&[run(3, 0, 0, 1)], &lit, 3 * PAGE + 100),
            "leaves the object"
        );
        assert!(bad(&runs, &lit, MAX_OBJECT + 1), "too large");
    }

    #[test]
    fn unchanged_pages_reference_the_base_and_the_rest_is_literal() {
        let mut base = vec![0u8; 16 * PAGE];
        let mut x = 7u64;
        for b in base.iter_mut() {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            *b = (x >> 33) as u8;
        }
        let mut target = base.clone();
        target[5 * PAGE..6 * PAGE].fill(0xAB); // one page replaced
        let bid = ChunkId([1; 32]);
        let body = pages_body(
            target.clone(),
            &ChunkId([2; 32]),
            Some((bid, &base)),
            None,
            |_| None,
            3,
        );
        let resolved = match &body {
            Body::Pages {
                chunks,
                runs,
                literal,
                raw_len,
            } => {
                assert_eq!(chunks, &vec![bid]);
                assert_eq!(runs.len(), 2);
                assert_eq!(literal.len(), PAGE);
                assemble(*raw_len as usize, runs, literal, |_| Some(base.as_slice())).unwrap()
            }
            Body::Delta { zframe, .. } => {
                crate::delta::decode(&base, zframe, target.len()).unwrap()
            }
            Body::Raw(_) => panic!("neither pages nor a delta for a one-page change"),
        };
        assert_eq!(resolved, target);
    }
}
