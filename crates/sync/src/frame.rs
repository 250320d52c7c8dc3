//! The object stream: how objects travel in one HTTP body.
//!
//! A transfer moves thousands of 64 KiB blocks; a request per block would drown in
//! round trips and headers, and compressing each block on its own loses to `rsync -z`
//! (measured on the gold-image update: 88.6 MB one by one against 59.9 MB), because
//! neighbouring blocks share content. So a batch of objects travels as **one zstd
//! stream** of simple frames, compressed together, parsed incrementally on arrival
//! with hard limits, each object verified by hash before anything keeps it.
//!
//! ```text
//! body    := zstd( stream )                       one zstd stream per HTTP body
//! stream  := magic frame* end
//! magic   := "STRXFER" 0x01                       8 bytes; the last byte is the format
//! frame   := type:u8 codec:u8 reserved:u16(=0) len:u32 id:[32] payload:[len]
//!                                                 40-byte header, little-endian
//! type    := 0 data | 1 tree | 2 version          an object (ObjectKind values)
//!          | 0x80 missing                         the sender does not hold `id` (len 0)
//!          | 0x81 error                           payload: UTF-8 message; ends the stream
//!          | 0xFF end                             len 0, id zero; a stream without it
//!                                                 was cut short
//! codec   := 0 raw                                payload = the object's bytes
//!          | 1 zstd-delta                         payload = base:[32] raw_len:u32 zframe
//!                                                 zframe: one zstd frame of the object,
//!                                                 compressed with the bytes of object
//!                                                 `base` (which the receiver holds) as
//!                                                 a raw-content prefix ("dictionary")
//!          | 2 pages                              payload = raw_len:u32 nchunks:u8
//!                                                 chunk:[32]*nchunks nruns:u8
//!                                                 run:(at:u16 chunk:u8 first:u16
//!                                                 count:u16)*nruns literal
//!                                                 pages at..at+count of the object are
//!                                                 pages first..first+count of the
//!                                                 listed chunk (which the receiver
//!                                                 holds); `literal` (raw) fills every
//!                                                 byte no run covers, in order (see
//!                                                 [`crate::pages`])
//!          | 3..=255 reserved                     (e.g. trained dictionaries) — refused
//! ```
//!
//! A raw object is compressed by the outer stream together with its neighbours; a
//! delta is already compressed (against the block the receiver holds at the same
//! place in its older version, see [`crate::delta`]) and passes through the outer
//! stream almost unchanged.
//!
//! **Limits.** A frame's payload is at most [`MAX_FRAME_PAYLOAD`] (the largest block,
//! 4 MiB, plus slack for a delta's header and zstd's worst case); anything longer is
//! refused before it is buffered. The decoder decompresses only as much as it needs
//! for the next frame, so memory stays at one frame plus zstd's window (capped at
//! 2^[`MAX_WINDOW_LOG`]) however large the stream claims to be.

use strata_store::{ChunkId, ObjectKind};

use crate::pages::{PageRun, MAX_REF_CHUNKS, MAX_RUNS};

use crate::error::{Result, SyncError};

pub const MAGIC: &[u8; 8] = b"STRXFER\x01";
pub const HEADER_LEN: usize = 40;
/// The largest object: the largest block size a store accepts.
pub const MAX_OBJECT: usize = 4 << 20;
/// The largest frame payload: an object plus room for a delta's header and zstd's
/// worst-case expansion.
pub const MAX_FRAME_PAYLOAD: usize = MAX_OBJECT + (64 << 10);
/// zstd windows larger than this are refused (a sender cannot make us allocate more).
pub const MAX_WINDOW_LOG: u32 = 24;

pub const TYPE_MISSING: u8 = 0x80;
pub const TYPE_ERROR: u8 = 0x81;
pub const TYPE_END: u8 = 0xFF;
pub const CODEC_RAW: u8 = 0;
pub const CODEC_DELTA: u8 = 1;
pub const CODEC_PAGES: u8 = 2;

/// An object's bytes as they travel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Raw(Vec<u8>),
    /// One zstd frame of the object compressed against object `base`.
    Delta {
        base: ChunkId,
        raw_len: u32,
        zframe: Vec<u8>,
    },
    /// Runs of pages of chunks the receiver holds, and the bytes they leave.
    Pages {
        raw_len: u32,
        chunks: Vec<ChunkId>,
        runs: Vec<PageRun>,
        literal: Vec<u8>,
    },
}

impl Body {
    /// Bytes the body occupies in a frame.
    pub fn wire_len(&self) -> usize {
        match self {
            Body::Raw(b) => b.len(),
            Body::Delta { zframe, .. } => 36 + zframe.len(),
            Body::Pages {
                chunks,
                runs,
                literal,
                ..
            } => 6 + 32 * chunks.len() + 7 * runs.len() + literal.len(),
        }
    }
}

/// One parsed frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Object {
        kind: ObjectKind,
        id: ChunkId,
        body: Body,
    },
    Missing(ChunkId),
    Error(String),
    End,
}

fn header(ty: u8, codec: u8, len: usize, id: &ChunkId) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = ty;
    h[1] = codec;
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h[8..40].copy_from_slice(&id.0);
    h
}

/// Append the encoding of `frame` (uncompressed) to `out`.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) {
    match frame {
        Frame::Object { kind, id, body } => match body {
            Body::Raw(raw) => {
                out.extend_from_slice(&header(*kind as u8, CODEC_RAW, raw.len(), id));
                out.extend_from_slice(raw);
            }
            Body::Delta {
                base,
                raw_len,
                zframe,
            } => {
                out.extend_from_slice(&header(*kind as u8, CODEC_DELTA, 36 + zframe.len(), id));
                out.extend_from_slice(&base.0);
                out.extend_from_slice(&raw_len.to_le_bytes());
                out.extend_from_slice(zframe);
            }
            Body::Pages {
                raw_len,
                chunks,
                runs,
                literal,
            } => {
                out.extend_from_slice(&header(*kind as u8, CODEC_PAGES, body.wire_len(), id));
                out.extend_from_slice(&raw_len.to_le_bytes());
                out.push(chunks.len() as u8);
                for c in chunks {
                    out.extend_from_slice(&c.0);
                }
                out.push(runs.len() as u8);
                for r in runs {
                    out.extend_from_slice(&r.at.to_le_bytes());
                    out.push(r.chunk);
                    out.extend_from_slice(&r.first.to_le_bytes());
                    out.extend_from_slice(&r.count.to_le_bytes());
                }
                out.extend_from_slice(literal);
            }
        },
        Frame::Missing(id) => out.extend_from_slice(&header(TYPE_MISSING, 0, 0, id)),
        Frame::Error(msg) => {
            let m = &msg.as_bytes()[..msg.len().min(64 << 10)];
            out.extend_from_slice(&header(TYPE_ERROR, 0, m.len(), &ChunkId([0; 32])));
            out.extend_from_slice(m);
        }
        Frame::End => out.extend_from_slice(&header(TYPE_END, 0, 0, &ChunkId([0; 32]))),
    }
}

/// Parses uncompressed frames from bytes pushed in pieces of any size.
#[derive(Default)]
pub struct FrameParser {
    buf: Vec<u8>,
    pos: usize,
    magic_seen: bool,
    ended: bool,
}

impl FrameParser {
    pub fn new() -> FrameParser {
        FrameParser::default()
    }

    /// Bytes buffered but not yet parsed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Whether the end frame (or an error frame) was seen.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// How many more bytes the next frame needs before [`FrameParser::next_frame`]
    /// can return it (0 if it can now).
    pub fn wants(&self) -> usize {
        let have = self.buffered();
        if !self.magic_seen {
            return MAGIC.len().saturating_sub(have);
        }
        if have < HEADER_LEN {
            return HEADER_LEN - have;
        }
        let b = &self.buf[self.pos..];
        let len = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
        (HEADER_LEN + len.min(MAX_FRAME_PAYLOAD + 1)).saturating_sub(have)
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `None` if more bytes are needed. Every malformation
    /// is an error (never a panic), and so is anything after the end frame.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        let bad = |m: String| Err(SyncError::Protocol(m));
        if self.ended {
            if self.buffered() > 0 {
                return bad("bytes after the end of the object stream".into());
            }
            return Ok(None);
        }
        if !self.magic_seen {
            if self.buffered() < MAGIC.len() {
                if !MAGIC.starts_with(&self.buf[self.pos..]) {
                    return bad("not a Strata object stream".into());
                }
                return Ok(None);
            }
            if &self.buf[self.pos..self.pos + MAGIC.len()] != MAGIC {
                return bad("not a Strata object stream (bad magic or format)".into());
            }
            self.pos += MAGIC.len();
            self.magic_seen = true;
        }
        let b = &self.buf[self.pos..];
        if b.len() < HEADER_LEN {
            return Ok(None);
        }
        let (ty, codec) = (b[0], b[1]);
        if b[2] != 0 || b[3] != 0 {
            return bad("reserved bytes of a frame header are not zero".into());
        }
        let len = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return bad(format!(
                "frame of {len} bytes is longer than the limit ({MAX_FRAME_PAYLOAD})"
            ));
        }
        let id = ChunkId::from_slice(&b[8..40]).expect("32 bytes");
        if b.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = &b[HEADER_LEN..HEADER_LEN + len];
        let frame = match ty {
            0..=2 => {
                let kind = ObjectKind::from_u8(ty).expect("0..=2 are kinds");
                let body = match codec {
                    CODEC_RAW => {
                        if len > MAX_OBJECT {
                            return bad(format!("object of {len} bytes is too large"));
                        }
                        Body::Raw(payload.to_vec())
                    }
                    CODEC_DELTA => {
                        if len < 36 {
                            return bad("delta frame shorter than its header".into());
                        }
                        let raw_len = u32::from_le_bytes(payload[32..36].try_into().unwrap());
                        if raw_len as usize > MAX_OBJECT {
                            return bad(format!("delta of a {raw_len}-byte object is too large"));
                        }
                        Body::Delta {
                            base: ChunkId::from_slice(&payload[..32]).expect("32 bytes"),
                            raw_len,
                            zframe: payload[36..].to_vec(),
                        }
                    }
                    CODEC_PAGES => match parse_pages(payload) {
                        Ok(b) => b,
                        Err(m) => return bad(m),
                    },
                    c => return bad(format!("unknown object codec {c}")),
                };
                Frame::Object { kind, id, body }
            }
            TYPE_MISSING if len == 0 && codec == 0 => Frame::Missing(id),
            TYPE_ERROR if codec == 0 => {
                self.ended = true;
                Frame::Error(String::from_utf8_lossy(payload).into_owned())
            }
            TYPE_END if len == 0 && codec == 0 && id.0 == [0; 32] => {
                self.ended = true;
                Frame::End
            }
            t => return bad(format!("malformed frame of type {t:#x}")),
        };
        self.pos += HEADER_LEN + len;
        Ok(Some(frame))
    }
}

/// The payload of a `pages` frame, checked against the limits of [`crate::pages`]
/// (whether the runs fit the object is checked when it is assembled).
fn parse_pages(p: &[u8]) -> std::result::Result<Body, String> {
    let short = || "page-reference frame shorter than its header".to_string();
    let raw_len = u32::from_le_bytes(p.get(..4).ok_or_else(short)?.try_into().unwrap());
    if raw_len as usize > MAX_OBJECT {
        return Err(format!("a {raw_len}-byte object is too large"));
    }
    let nchunks = *p.get(4).ok_or_else(short)? as usize;
    if nchunks > MAX_REF_CHUNKS {
        return Err(format!(
            "{nchunks} referenced chunks (at most {MAX_REF_CHUNKS})"
        ));
    }
    let mut at = 5;
    let chunks: Vec<ChunkId> = (0..nchunks)
        .map(|i| ChunkId::from_slice(p.get(at + 32 * i..at + 32 * (i + 1))?))
        .collect::<Option<_>>()
        .ok_or_else(short)?;
    at += 32 * nchunks;
    let nruns = *p.get(at).ok_or_else(short)? as usize;
    at += 1;
    if nruns > MAX_RUNS {
        return Err(format!("{nruns} page runs (at most {MAX_RUNS})"));
    }
    let mut runs = Vec::with_capacity(nruns);
    for _ in 0..nruns {
        let r = p.get(at..at + 7).ok_or_else(short)?;
        let run = PageRun {
            at: u16::from_le_bytes([r[0], r[1]]),
            chunk: r[2],
            first: u16::from_le_bytes([r[3], r[4]]),
            count: u16::from_le_bytes([r[5], r[6]]),
        };
        if run.chunk as usize >= nchunks || run.count == 0 {
            return Err("page run names no chunk or no pages".into());
        }
        runs.push(run);
        at += 7;
    }
    Ok(Body::Pages {
        raw_len,
        chunks,
        runs,
        literal: p[at..].to_vec(),
    })
}

/// Decompresses a body pushed in pieces and parses its frames, decompressing only as
/// much as the next frame needs.
pub struct FrameReader {
    zstd: zstd::stream::raw::Decoder<'static>,
    input: Vec<u8>,
    input_pos: usize,
    parser: FrameParser,
    out: Vec<u8>,
    /// Decompressed bytes so far (the logical size of the stream).
    pub logical: u64,
}

impl FrameReader {
    pub fn new() -> Result<FrameReader> {
        let mut zstd = zstd::stream::raw::Decoder::new()?;
        zstd.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(MAX_WINDOW_LOG))?;
        Ok(FrameReader {
            zstd,
            input: Vec::new(),
            input_pos: 0,
            parser: FrameParser::new(),
            out: vec![0u8; 128 << 10],
            logical: 0,
        })
    }

    /// Add compressed bytes as they arrive.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.input_pos == self.input.len() {
            self.input.clear();
            self.input_pos = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    pub fn ended(&self) -> bool {
        self.parser.ended()
    }

    /// The next frame, or `None` until more input is pushed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        use zstd::stream::raw::Operation;
        loop {
            if let Some(f) = self.parser.next_frame()? {
                return Ok(Some(f));
            }
            if self.parser.ended() {
                return Ok(None);
            }
            // Decompress no more than the next frame still needs (at least a little,
            // so headers come through), keeping memory at one frame.
            let want = self.parser.wants().clamp(HEADER_LEN, self.out.len());
            let input = &self.input[self.input_pos..];
            let st = self
                .zstd
                .run_on_buffers(input, &mut self.out[..want])
                .map_err(|e| SyncError::Protocol(format!("compressed stream: {e}")))?;
            self.input_pos += st.bytes_read;
            if st.bytes_written == 0 {
                if st.bytes_read == 0 || self.input_pos == self.input.len() {
                    return Ok(None);
                }
                continue;
            }
            self.logical += st.bytes_written as u64;
            self.parser.push(&self.out[..st.bytes_written]);
        }
    }

    /// Input still buffered; after the end frame anything left is trailing garbage
    /// (beyond the zstd epilogue).
    pub fn finish(&mut self) -> Result<()> {
        if !self.parser.ended() {
            return Err(SyncError::Truncated);
        }
        Ok(())
    }
}

/// Builds a compressed body frame by frame; compressed bytes can be taken as they are
/// produced, so a body streams while it is built.
pub struct FrameWriter {
    enc: zstd::stream::write::Encoder<'static, Vec<u8>>,
    scratch: Vec<u8>,
    /// Uncompressed bytes written (the logical size of the stream).
    pub logical: u64,
    since_flush: usize,
}

/// The zstd level of transfer streams: 3 compresses 64 KiB disk blocks within a few
/// percent of much slower levels, at hundreds of MB/s per core.
pub const DEFAULT_LEVEL: i32 = 3;

impl FrameWriter {
    pub fn new(level: i32) -> Result<FrameWriter> {
        let mut w = FrameWriter {
            enc: zstd::stream::write::Encoder::new(Vec::new(), level)?,
            scratch: Vec::new(),
            logical: 0,
            since_flush: 0,
        };
        w.write_raw(MAGIC)?;
        Ok(w)
    }

    fn write_raw(&mut self, b: &[u8]) -> Result<()> {
        use std::io::Write;
        self.enc.write_all(b)?;
        self.logical += b.len() as u64;
        self.since_flush += b.len();
        Ok(())
    }

    pub fn frame(&mut self, f: &Frame) -> Result<()> {
        let mut s = std::mem::take(&mut self.scratch);
        s.clear();
        encode_frame(f, &mut s);
        let r = self.write_raw(&s);
        self.scratch = s;
        r
    }

    /// Compressed bytes produced so far (zstd emits them a block at a time).
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(self.enc.get_mut())
    }

    /// Push what is buffered out as a complete zstd block, so a receiver can use it
    /// now (a little worse compression; used every few MB when streaming).
    pub fn flush(&mut self) -> Result<()> {
        use std::io::Write;
        self.enc.flush()?;
        self.since_flush = 0;
        Ok(())
    }

    /// Uncompressed bytes written since the last flush.
    pub fn pending(&self) -> usize {
        self.since_flush
    }

    /// Write the end frame and close the zstd stream; returns the last bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.frame(&Frame::End)?;
        Ok(self.enc.finish()?)
    }

    /// Close the stream with an error frame instead of the end frame.
    pub fn finish_with_error(mut self, msg: &str) -> Result<Vec<u8>> {
        self.frame(&Frame::Error(msg.to_string()))?;
        Ok(self.enc.finish()?)
    }
}

/// Fuzzing entry point: `bytes` as an uncompressed frame sequence (split at every
/// position the first byte suggests) and as a compressed body must parse or fail
/// cleanly: no panic, no allocation beyond the limits.
pub fn fuzz_frames(bytes: &[u8]) {
    let split = bytes.first().map_or(1, |b| (*b as usize % 61) + 1);
    let mut p = FrameParser::new();
    // Without the magic nothing would be reached: try both as given and after it.
    for prefix in [&b""[..], &MAGIC[..]] {
        p = FrameParser::new();
        p.push(prefix);
        for piece in bytes.chunks(split) {
            p.push(piece);
            loop {
                match p.next_frame() {
                    Ok(Some(Frame::Object { body, .. })) => {
                        assert!(body.wire_len() <= MAX_FRAME_PAYLOAD);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
    drop(p);
    if let Ok(mut r) = FrameReader::new() {
        for piece in bytes.chunks(split * 7) {
            r.push(piece);
            loop {
                match r.next_frame() {
                    Ok(Some(Frame::Object {
                        body:
                            Body::Delta {
                                raw_len, zframe, ..
                            },
                        ..
                    })) => {
                        let base = vec![7u8; 4096];
                        let _ = crate::delta::decode(&base, &zframe, raw_len as usize);
                    }
                    Ok(Some(Frame::Object {
                        body: body @ Body::Pages { .. },
                        ..
                    })) => {
                        // Any chunk it names is "held": 3 pages of sevens.
                        struct Sevens;
                        impl crate::client::BaseSource for Sevens {
                            fn base(&self, _: &ChunkId) -> Option<Vec<u8>> {
                                Some(vec![7u8; 3 * 4096])
                            }
                        }
                        let _ = crate::delta::resolve(body, &Sevens);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Frame> {
        vec![
            Frame::Object {
                kind: ObjectKind::Data,
                id: ChunkId([1; 32]),
                body: Body::Raw(vec![5; 70_000]),
            },
            Frame::Object {
                kind: ObjectKind::Tree,
                id: ChunkId([2; 32]),
                body: Body::Delta {
                    base: ChunkId([3; 32]),
                    raw_len: 100,
                    zframe: vec![9; 20],
                },
            },
            Frame::Object {
                kind: ObjectKind::Data,
                id: ChunkId([5; 32]),
                body: Body::Pages {
                    raw_len: 4 * 4096 + 10,
                    chunks: vec![ChunkId([6; 32]), ChunkId([7; 32])],
                    runs: vec![
                        PageRun {
                            at: 0,
                            chunk: 1,
                            first: 3,
                            count: 2,
                        },
                        PageRun {
                            at: 3,
                            chunk: 0,
                            first: 0,
                            count: 1,
                        },
                    ],
                    literal: vec![8; 4096 + 10],
                },
            },
            Frame::Missing(ChunkId([4; 32])),
            Frame::End,
        ]
    }

    #[test]
    fn round_trip_through_zstd_in_every_split() {
        let mut w = FrameWriter::new(3).unwrap();
        let mut body = Vec::new();
        for f in &sample()[..4] {
            w.frame(f).unwrap();
            body.extend(w.take());
        }
        body.extend(w.finish().unwrap());
        assert!(body.len() < 2000, "zstd compressed the run: {}", body.len());
        for split in [1, 3, 40, 4096, body.len()] {
            let mut r = FrameReader::new().unwrap();
            let mut got = Vec::new();
            for piece in body.chunks(split) {
                r.push(piece);
                while let Some(f) = r.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, sample());
            r.finish().unwrap();
        }
    }

    #[test]
    fn limits_and_malformations_are_errors() {
        let mut p = FrameParser::new();
        p.push(MAGIC);
        let mut h = header(0, 0, MAX_FRAME_PAYLOAD + 1, &ChunkId([0; 32])).to_vec();
        p.push(&h);
        assert!(p.next_frame().is_err());

        let mut p = FrameParser::new();
        p.push(b"STRXFER\x02");
        assert!(p.next_frame().is_err());

        let mut p = FrameParser::new();
        p.push(MAGIC);
        h = header(0, 7, 0, &ChunkId([0; 32])).to_vec();
        p.push(&h);
        assert!(p.next_frame().is_err(), "unknown codec");

        let mut p = FrameParser::new();
        p.push(MAGIC);
        encode_frame(&Frame::End, &mut h);
        p.push(&header(TYPE_END, 0, 0, &ChunkId([0; 32])));
        p.push(b"x");
        assert_eq!(p.next_frame().unwrap(), Some(Frame::End));
        assert!(p.next_frame().is_err(), "trailing bytes");
    }

    #[test]
    fn truncated_stream_is_detected() {
        let mut w = FrameWriter::new(3).unwrap();
        for f in &sample()[..4] {
            w.frame(f).unwrap();
        }
        let body = w.finish().unwrap();
        let mut r = FrameReader::new().unwrap();
        r.push(&body[..body.len() / 2]);
        while r.next_frame().unwrap().is_some() {}
        assert!(matches!(r.finish(), Err(SyncError::Truncated)));
    }

    #[test]
    fn fuzz_entry_survives_junk() {
        fuzz_frames(b"");
        fuzz_frames(&[0xff; 300]);
        let mut body = MAGIC.to_vec();
        encode_frame(&sample()[1], &mut body);
        fuzz_frames(&body);
        let mut w = FrameWriter::new(1).unwrap();
        w.frame(&sample()[1]).unwrap();
        fuzz_frames(&w.finish().unwrap());
    }
}
