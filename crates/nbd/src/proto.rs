//! The NBD wire format: constants, and pure functions that parse what a client sends
//! and encode what the server answers.
//!
//! Nothing here does I/O, so each parser can be fed arbitrary bytes (the fuzz targets
//! `nbd_request` and `nbd_option` do exactly that). The protocol reference is
//! `doc/proto.md` of the NetworkBlockDevice/nbd project; names follow it without the
//! `NBD_` prefix. All integers on the wire are big-endian.

use std::fmt;

use strata_block::DiskExtent;

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: sent after `NBDMAGIC` in newstyle negotiation, and before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

/// Information types of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

/// Error values of replies.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server knows.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id it has in `NBD_OPT_SET_META_CONTEXT` replies and block status chunks.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Largest option payload accepted; a longer one ends the connection (nothing this
/// server understands comes close: names are at most 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest string (export name, query) accepted, as the protocol says.
pub const MAX_STRING_LEN: usize = 4096;
/// Largest READ or WRITE payload, advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Most queries accepted in one meta context option.
pub const MAX_META_QUERIES: u32 = 1024;
/// Most descriptors in one block status reply chunk.
pub const MAX_STATUS_DESCRIPTORS: usize = 16 * 1024;
/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an option header.
pub const OPTION_HEADER_LEN: usize = 16;

/// Which error ends the connection: the stream can no longer be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// A header did not start with the expected magic.
    BadMagic { expected: u64, found: u64 },
    /// The client set flags it may not set.
    BadClientFlags(u32),
    /// An option payload longer than [`MAX_OPTION_LEN`].
    OptionTooLong(u32),
    /// A write payload longer than [`MAX_PAYLOAD`]: the payload cannot be skipped safely.
    PayloadTooLong(u32),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadMagic { expected, found } => {
                write!(f, "bad magic {found:#x} (expected {expected:#x})")
            }
            ProtoError::BadClientFlags(flags) => write!(f, "unknown client flags {flags:#x}"),
            ProtoError::OptionTooLong(len) => {
                write!(f, "option of {len} bytes (at most {MAX_OPTION_LEN})")
            }
            ProtoError::PayloadTooLong(len) => {
                write!(f, "write payload of {len} bytes (at most {MAX_PAYLOAD})")
            }
        }
    }
}

impl std::error::Error for ProtoError {}

// ---------------------------------------------------------------------------------------
// Handshake

/// The 18 bytes the server opens with: magic, `IHAVEOPT`, handshake flags.
pub fn server_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// What the client answered to the greeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

pub fn parse_client_flags(raw: [u8; 4]) -> Result<ClientFlags, ProtoError> {
    let flags = u32::from_be_bytes(raw);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::BadClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// The header in front of every option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(raw: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(&raw[0..8]);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    let option = be_u32(&raw[8..12]);
    let len = be_u32(&raw[12..16]);
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLong(len));
    }
    Ok(OptionHeader { option, len })
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// Information types the client asked for, in its order (duplicates removed).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn wants(&self, info: u16) -> bool {
        self.requests.contains(&info)
    }
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A parsed option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaRequest),
    SetMetaContext(MetaRequest),
    /// An option this server does not implement (answered `NBD_REP_ERR_UNSUP`).
    Unknown(u32),
}

/// A known option whose payload is malformed: answered with `NBD_REP_ERR_INVALID`
/// carrying `message`, and negotiation goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidOption {
    pub message: String,
}

impl fmt::Display for InvalidOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn invalid<T>(message: impl Into<String>) -> Result<T, InvalidOption> {
    Err(InvalidOption {
        message: message.into(),
    })
}

/// A string as the protocol defines one: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(bytes: &[u8], what: &str) -> Result<String, InvalidOption> {
    if bytes.len() > MAX_STRING_LEN {
        return invalid(format!("{what} longer than {MAX_STRING_LEN} bytes"));
    }
    let s = match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(_) => return invalid(format!("{what} is not UTF-8")),
    };
    if s.contains('\0') {
        return invalid(format!("{what} contains NUL"));
    }
    Ok(s.to_owned())
}

/// A cursor over an option payload.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], InvalidOption> {
        if self.data.len() < n {
            return invalid(format!("option data too short for {what}"));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
    fn u16(&mut self, what: &str) -> Result<u16, InvalidOption> {
        Ok(u16::from_be_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32, InvalidOption> {
        Ok(be_u32(self.take(4, what)?))
    }
    fn string(&mut self, what: &str) -> Result<String, InvalidOption> {
        let len = self.u32(what)? as usize;
        if len > MAX_STRING_LEN {
            return invalid(format!("{what} longer than {MAX_STRING_LEN} bytes"));
        }
        parse_string(self.take(len, what)?, what)
    }
    fn end(&self) -> Result<(), InvalidOption> {
        if self.data.is_empty() {
            Ok(())
        } else {
            invalid(format!("{} trailing bytes in option", self.data.len()))
        }
    }
}

/// Parse an option's payload. Unknown options parse as [`ClientOption::Unknown`]
/// whatever their payload; known ones with a malformed payload give [`InvalidOption`].
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, InvalidOption> {
    let no_data = |o: ClientOption| {
        if data.is_empty() {
            Ok(o)
        } else {
            invalid("this option takes no data")
        }
    };
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(data, "export name")?)),
        // The client SHOULD send no data, and the server SHOULD ignore any.
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_data(ClientOption::List),
        OPT_STARTTLS => no_data(ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => no_data(ClientOption::StructuredReply),
        OPT_INFO | OPT_GO => {
            let mut c = Cursor { data };
            let name = c.string("export name")?;
            let count = c.u16("information request count")?;
            if c.data.len() != count as usize * 2 {
                return invalid(format!(
                    "{count} information requests need {} bytes, {} present",
                    count as usize * 2,
                    c.data.len()
                ));
            }
            let mut requests = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let info = c.u16("information request")?;
                if !requests.contains(&info) {
                    requests.push(info);
                }
            }
            c.end()?;
            let req = InfoRequest { name, requests };
            Ok(if option == OPT_GO {
                ClientOption::Go(req)
            } else {
                ClientOption::Info(req)
            })
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let mut c = Cursor { data };
            let export = c.string("export name")?;
            let count = c.u32("query count")?;
            if count > MAX_META_QUERIES {
                return invalid(format!("{count} queries (at most {MAX_META_QUERIES})"));
            }
            let mut queries = Vec::with_capacity(count as usize);
            for _ in 0..count {
                queries.push(c.string("query")?);
            }
            c.end()?;
            let req = MetaRequest { export, queries };
            Ok(if option == OPT_SET_META_CONTEXT {
                ClientOption::SetMetaContext(req)
            } else {
                ClientOption::ListMetaContext(req)
            })
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Resolve meta context queries against the contexts this server has
/// (`base:allocation` only). `list` selects the `NBD_OPT_LIST_META_CONTEXT` rules (no
/// queries means all contexts; `base:` is a wildcard); otherwise those of
/// `NBD_OPT_SET_META_CONTEXT` (no queries selects nothing; `base:` is ignored).
/// Queries in unknown namespaces are ignored; a query without a namespace is invalid.
/// Returns whether `base:allocation` matched.
pub fn match_meta_queries(queries: &[String], list: bool) -> Result<bool, InvalidOption> {
    if queries.is_empty() {
        return Ok(list);
    }
    let mut matched = false;
    for q in queries {
        let Some((ns, leaf)) = q.split_once(':') else {
            return invalid(format!("query {q:?} has no namespace"));
        };
        if ns.is_empty() {
            return invalid(format!("query {q:?} has an empty namespace"));
        }
        if ns == "base" && (leaf == "allocation" || (list && leaf.is_empty())) {
            matched = true;
        }
    }
    Ok(matched)
}

/// An option reply: magic, option, type, length, data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_REP_SERVER` data: name length, name, description.
pub fn rep_server_data(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// `NBD_REP_META_CONTEXT` data: id and name.
pub fn rep_meta_context_data(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_INFO_EXPORT` data.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` data.
pub fn info_string(info: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// Block size constraints as advertised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

impl BlockSizes {
    /// Constraints for a byte-addressable disk whose natural block size is
    /// `disk_block`: minimum 1, preferred the disk's block size made a power of two in
    /// [512, 2 MiB], maximum [`MAX_PAYLOAD`].
    pub fn for_disk(disk_block: u32) -> BlockSizes {
        let clamped = disk_block.clamp(512, 2 * 1024 * 1024);
        // Largest power of two not above the clamped size.
        let preferred = 1u32 << (31 - clamped.leading_zeros());
        BlockSizes {
            minimum: 1,
            preferred,
            maximum: MAX_PAYLOAD,
        }
    }

    /// `NBD_INFO_BLOCK_SIZE` data.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(14);
        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        b.extend_from_slice(&self.minimum.to_be_bytes());
        b.extend_from_slice(&self.preferred.to_be_bytes());
        b.extend_from_slice(&self.maximum.to_be_bytes());
        b
    }
}

/// What a server sends after `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes
/// unless the client asked for none.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.extend_from_slice(&[0u8; 124]);
    }
    b
}

/// What a disk can do, as transmission flags say it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportCaps {
    pub read_only: bool,
    pub multi_conn: bool,
    /// Structured replies were negotiated (enables `NBD_FLAG_SEND_DF`).
    pub structured: bool,
}

/// Transmission flags that say what this server implements for a disk.
pub fn transmission_flags(caps: ExportCaps) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
    if caps.read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if caps.structured {
        flags |= FLAG_SEND_DF;
    }
    if caps.multi_conn {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    flags
}

// ---------------------------------------------------------------------------------------
// Transmission

/// A command as the client named it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Unknown(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Command {
        match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// Command flags that are valid on this command (FUA is accepted on all, as the
    /// protocol says clients set it on other commands too).
    fn allowed_flags(self, structured: bool) -> u16 {
        match self {
            Command::Read if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => CMD_FLAG_FUA,
        }
    }
}

/// A request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Bytes of payload that follow the header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }
}

/// Parse a request header. Only a wrong magic is fatal; everything else is judged by
/// [`check_request`] so that it can be answered with an error.
pub fn parse_request(raw: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = be_u32(&raw[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: REQUEST_MAGIC as u64,
            found: magic as u64,
        });
    }
    Ok(Request {
        flags: u16::from_be_bytes([raw[4], raw[5]]),
        command: Command::from_u16(u16::from_be_bytes([raw[6], raw[7]])),
        cookie: be_u64(&raw[8..16]),
        offset: be_u64(&raw[16..24]),
        length: be_u32(&raw[24..28]),
    })
}

/// Encode a request header (for clients and tests).
pub fn encode_request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// What the connection negotiated, as far as judging requests goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransmissionParams {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub allocation_context: bool,
    /// The disk can zero without writing data (else FAST_ZERO fails with ENOTSUP).
    pub fast_zero: bool,
}

/// How to treat a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Carry it out.
    Execute,
    /// Answer with this error (after consuming any payload).
    Reject(u32),
    /// End the connection: the stream cannot be followed any further.
    Disconnect(ProtoError),
}

/// Judge a request against the export. Pure, so that every rule can be tested and
/// fuzzed: a write payload over [`MAX_PAYLOAD`] disconnects (it cannot be skipped
/// without reading it), every other fault is an error reply.
pub fn check_request(req: &Request, p: &TransmissionParams) -> Verdict {
    use Command::*;
    if req.command == Write && req.length > MAX_PAYLOAD {
        return Verdict::Disconnect(ProtoError::PayloadTooLong(req.length));
    }
    if let Unknown(_) = req.command {
        return Verdict::Reject(EINVAL);
    }
    if req.flags & !req.command.allowed_flags(p.structured) != 0 {
        return Verdict::Reject(EINVAL);
    }
    let end = req.offset.checked_add(req.length as u64);
    let in_bounds = matches!(end, Some(end) if end <= p.size);
    match req.command {
        Disc | Flush => Verdict::Execute,
        Read => {
            if req.length > MAX_PAYLOAD || !in_bounds {
                Verdict::Reject(EINVAL)
            } else {
                Verdict::Execute
            }
        }
        Write | WriteZeroes | Trim => {
            if p.read_only {
                Verdict::Reject(EPERM)
            } else if !in_bounds {
                // The protocol asks for ENOSPC on writes past the end, EINVAL on trims.
                Verdict::Reject(if req.command == Trim { EINVAL } else { ENOSPC })
            } else if req.command == WriteZeroes && req.has(CMD_FLAG_FAST_ZERO) && !p.fast_zero {
                Verdict::Reject(ENOTSUP)
            } else {
                Verdict::Execute
            }
        }
        Cache => {
            if in_bounds {
                Verdict::Execute
            } else {
                Verdict::Reject(EINVAL)
            }
        }
        BlockStatus => {
            if !p.structured || !p.allocation_context || !in_bounds || req.length == 0 {
                Verdict::Reject(EINVAL)
            } else {
                Verdict::Execute
            }
        }
        Unknown(_) => Verdict::Reject(EINVAL),
    }
}

/// A simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header (payload follows).
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A complete `NBD_REPLY_TYPE_ERROR` chunk, with the DONE flag.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = truncate_utf8(message, 1024);
    let mut b = Vec::with_capacity(26 + msg.len());
    b.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b
}

/// A complete `NBD_REPLY_TYPE_NONE` chunk with the DONE flag.
pub fn done_chunk(cookie: u64) -> [u8; 20] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

/// A complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn hole_chunk(cookie: u64, done: bool, offset: u64, len: u32) -> Vec<u8> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12));
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// The header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `len` data bytes
/// follow it.
pub fn data_chunk_header(cookie: u64, done: bool, offset: u64, len: u32) -> Vec<u8> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&chunk_header(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        8 + len,
    ));
    b.extend_from_slice(&offset.to_be_bytes());
    b
}

/// A complete `NBD_REPLY_TYPE_BLOCK_STATUS` chunk with the DONE flag.
pub fn block_status_chunk(cookie: u64, context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len() as u32;
    let mut b = Vec::with_capacity(20 + len as usize);
    b.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len,
    ));
    b.extend_from_slice(&context.to_be_bytes());
    for &(l, f) in descriptors {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// `base:allocation` flags of an extent.
pub fn allocation_flags(e: &DiskExtent) -> u32 {
    (if e.hole { STATE_HOLE } else { 0 }) | (if e.zero { STATE_ZERO } else { 0 })
}

/// Turn what a disk reported for a block status request of `length` bytes into
/// descriptors: zero-length extents dropped, the total clipped to `length`, neighbours
/// with equal flags merged, at most [`MAX_STATUS_DESCRIPTORS`] (one with `req_one`).
/// Never empty: with nothing usable it reports the whole range as allocated data,
/// which the protocol says is always safe.
pub fn status_descriptors(extents: &[DiskExtent], length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let max = if req_one { 1 } else { MAX_STATUS_DESCRIPTORS };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = length as u64;
    for e in extents {
        if left == 0 {
            break;
        }
        if e.len == 0 {
            continue;
        }
        let len = e.len.min(left);
        let flags = allocation_flags(e);
        left -= len;
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += len as u32,
            _ => {
                if out.len() == max {
                    break;
                }
                out.push((len as u32, flags));
            }
        }
    }
    if out.is_empty() && length > 0 {
        out.push((length, 0));
    }
    out
}

/// One piece of a structured read reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPiece {
    /// Bytes that must be read and sent (`offset` is absolute).
    Data { offset: u64, len: u32 },
    /// Bytes that read as zeros and are sent as a hole chunk.
    Hole { offset: u64, len: u32 },
}

/// Zero runs shorter than this are sent as data: a hole chunk is 32 bytes of framing.
pub const MIN_HOLE_CHUNK: u64 = 512;

/// Plan a structured read of `[offset, offset + length)` from the extents a disk
/// reported for it (in order, from `offset`): runs that read as zeros become holes,
/// the rest data; neighbours merge; whatever the extents do not cover is data. With
/// `df` (don't fragment) the whole range is one data piece. A range that would run
/// past `u64::MAX` is cut there (the server only plans reads inside the export).
pub fn plan_read(offset: u64, length: u32, extents: &[DiskExtent], df: bool) -> Vec<ReadPiece> {
    let length = length.min(u32::try_from(u64::MAX - offset).unwrap_or(u32::MAX));
    if length == 0 {
        return Vec::new();
    }
    if df {
        return vec![ReadPiece::Data {
            offset,
            len: length,
        }];
    }
    let mut out: Vec<ReadPiece> = Vec::new();
    let mut push = |zero: bool, off: u64, len: u64| {
        let zero = zero && len >= MIN_HOLE_CHUNK;
        match out.last_mut() {
            Some(ReadPiece::Data { len: l, .. }) if !zero => *l += len as u32,
            Some(ReadPiece::Hole { len: l, .. }) if zero => *l += len as u32,
            _ => out.push(if zero {
                ReadPiece::Hole {
                    offset: off,
                    len: len as u32,
                }
            } else {
                ReadPiece::Data {
                    offset: off,
                    len: len as u32,
                }
            }),
        }
    };
    let end = offset + length as u64;
    let mut pos = offset;
    for e in extents {
        if pos >= end {
            break;
        }
        if e.len == 0 {
            continue;
        }
        let len = e.len.min(end - pos);
        push(e.zero, pos, len);
        pos += len;
    }
    if pos < end {
        push(false, pos, end - pos);
    }
    out
}

/// Map an I/O error from a disk onto the protocol's error values, as
/// [`strata_block::Disk`] documents.
pub fn errno_of(e: &std::io::Error) -> u32 {
    use std::io::ErrorKind::*;
    match e.kind() {
        InvalidInput => EINVAL,
        PermissionDenied | ReadOnlyFilesystem => EPERM,
        StorageFull | QuotaExceeded | FileTooLarge => ENOSPC,
        Unsupported => ENOTSUP,
        OutOfMemory => ENOMEM,
        _ => EIO,
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Everything the `nbd_option` fuzz target checks: the first four bytes are the
/// option code, the rest its payload. Parsing must never panic, and whatever parses
/// must be internally consistent.
pub fn fuzz_option(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let option = be_u32(&data[..4]);
    match parse_option(option, &data[4..]) {
        Ok(ClientOption::Info(r)) | Ok(ClientOption::Go(r)) => {
            assert!(r.name.len() <= MAX_STRING_LEN);
            assert!(r.requests.len() <= u16::MAX as usize);
        }
        Ok(ClientOption::ListMetaContext(m)) | Ok(ClientOption::SetMetaContext(m)) => {
            assert!(m.queries.len() <= MAX_META_QUERIES as usize);
            let _ = match_meta_queries(&m.queries, true);
            let _ = match_meta_queries(&m.queries, false);
        }
        Ok(ClientOption::ExportName(name)) => assert!(name.len() <= MAX_STRING_LEN),
        Ok(_) | Err(_) => {}
    }
    if data.len() >= OPTION_HEADER_LEN {
        let _ = parse_option_header(data[..OPTION_HEADER_LEN].try_into().unwrap());
    }
}

/// Everything the `nbd_request` fuzz target checks: a request header (the first 28
/// bytes), judged against an export described by the next bytes; the extents that
/// follow drive the block status and read planners, whose output must stay inside
/// the request.
pub fn fuzz_request(data: &[u8]) {
    if data.len() < REQUEST_LEN {
        return;
    }
    let req = match parse_request(data[..REQUEST_LEN].try_into().unwrap()) {
        Ok(r) => r,
        Err(_) => return,
    };
    let rest = &data[REQUEST_LEN..];
    let size = if rest.len() >= 8 {
        be_u64(&rest[..8])
    } else {
        1 << 30
    };
    let bits = rest.get(8).copied().unwrap_or(0);
    let params = TransmissionParams {
        size,
        read_only: bits & 1 != 0,
        structured: bits & 2 != 0,
        allocation_context: bits & 4 != 0,
        fast_zero: bits & 8 != 0,
    };
    let verdict = check_request(&req, &params);
    if verdict == Verdict::Execute {
        let end = req.offset as u128 + req.length as u128;
        match req.command {
            Command::Read | Command::Write | Command::Trim | Command::WriteZeroes => {
                assert!(end <= size as u128);
                assert!(req.command == Command::Read || !params.read_only);
            }
            Command::Unknown(_) => panic!("unknown command executed"),
            _ => {}
        }
    }
    let extents: Vec<DiskExtent> = rest
        .get(9..)
        .unwrap_or(&[])
        .chunks_exact(5)
        .map(|c| DiskExtent {
            len: be_u32(&c[..4]) as u64,
            hole: c[4] & 1 != 0,
            zero: c[4] & 2 != 0,
        })
        .collect();
    let desc = status_descriptors(&extents, req.length, req.has(CMD_FLAG_REQ_ONE));
    let total: u64 = desc.iter().map(|d| d.0 as u64).sum();
    assert!(total <= req.length as u64);
    assert!(desc.iter().all(|d| d.0 > 0));
    assert!(desc.len() <= MAX_STATUS_DESCRIPTORS);
    if req.has(CMD_FLAG_REQ_ONE) {
        assert!(desc.len() <= 1);
    }
    let Some(end) = req.offset.checked_add(req.length as u64) else {
        return;
    };
    let pieces = plan_read(req.offset, req.length, &extents, req.has(CMD_FLAG_DF));
    let mut pos = req.offset;
    for p in &pieces {
        let (off, len) = match *p {
            ReadPiece::Data { offset, len } | ReadPiece::Hole { offset, len } => (offset, len),
        };
        assert_eq!(off, pos);
        assert!(len > 0);
        pos += len as u64;
    }
    assert_eq!(pos, end);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u64, hole: bool, zero: bool) -> DiskExtent {
        DiskExtent { len, hole, zero }
    }

    #[test]
    fn greeting_and_flags() {
        let g = server_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        assert_eq!(
            parse_client_flags(3u32.to_be_bytes()),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            parse_client_flags(4u32.to_be_bytes()),
            Err(ProtoError::BadClientFlags(4))
        );
    }

    #[test]
    fn option_header_limits() {
        let mut h = [0u8; 16];
        h[0..8].copy_from_slice(b"IHAVEOPT");
        h[8..12].copy_from_slice(&7u32.to_be_bytes());
        h[12..16].copy_from_slice(&MAX_OPTION_LEN.to_be_bytes());
        assert_eq!(
            parse_option_header(&h),
            Ok(OptionHeader {
                option: 7,
                len: MAX_OPTION_LEN
            })
        );
        h[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert_eq!(
            parse_option_header(&h),
            Err(ProtoError::OptionTooLong(MAX_OPTION_LEN + 1))
        );
        h[0] = b'X';
        assert!(matches!(
            parse_option_header(&h),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b
    }

    #[test]
    fn parses_go_and_info() {
        let p = go_payload("disk@main", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_NAME]);
        assert_eq!(
            parse_option(OPT_GO, &p),
            Ok(ClientOption::Go(InfoRequest {
                name: "disk@main".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
            }))
        );
        assert!(matches!(
            parse_option(OPT_INFO, &go_payload("", &[])),
            Ok(ClientOption::Info(_))
        ));
        // Name length beyond the payload, count mismatches, trailing bytes.
        let mut bad = go_payload("abc", &[1]);
        bad[3] = 50;
        assert!(parse_option(OPT_GO, &bad).is_err());
        let mut bad = go_payload("abc", &[1]);
        bad.push(0);
        assert!(parse_option(OPT_GO, &bad).is_err());
        let bad = go_payload("abc", &[1]);
        assert!(parse_option(OPT_GO, &bad[..bad.len() - 1]).is_err());
        assert!(parse_option(OPT_GO, &[]).is_err());
        // Not UTF-8, NUL.
        assert!(parse_option(OPT_GO, &go_payload("a\0b", &[])).is_err());
        let mut bad = go_payload("ab", &[]);
        bad[4] = 0xff;
        assert!(parse_option(OPT_GO, &bad).is_err());
    }

    fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(export.len() as u32).to_be_bytes());
        b.extend_from_slice(export.as_bytes());
        b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        b
    }

    #[test]
    fn parses_meta_context() {
        let p = meta_payload("x", &["base:allocation", "qemu:dirty-bitmap:a"]);
        assert_eq!(
            parse_option(OPT_SET_META_CONTEXT, &p),
            Ok(ClientOption::SetMetaContext(MetaRequest {
                export: "x".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:a".into()],
            }))
        );
        let mut huge = meta_payload("x", &[]);
        let n = huge.len();
        huge[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(OPT_LIST_META_CONTEXT, &huge).is_err());
        let p = meta_payload("x", &["base:allocation"]);
        assert!(parse_option(OPT_LIST_META_CONTEXT, &p[..p.len() - 2]).is_err());
    }

    #[test]
    fn meta_query_rules() {
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(match_meta_queries(&[], true), Ok(true));
        assert_eq!(match_meta_queries(&[], false), Ok(false));
        assert_eq!(match_meta_queries(&q(&["base:"]), true), Ok(true));
        assert_eq!(match_meta_queries(&q(&["base:"]), false), Ok(false));
        assert_eq!(
            match_meta_queries(&q(&["base:allocation"]), false),
            Ok(true)
        );
        assert_eq!(match_meta_queries(&q(&["base:other"]), true), Ok(false));
        assert_eq!(
            match_meta_queries(&q(&["qemu:dirty-bitmap:x"]), false),
            Ok(false)
        );
        assert!(match_meta_queries(&q(&["nocolon"]), false).is_err());
    }

    #[test]
    fn options_without_data() {
        assert_eq!(parse_option(OPT_LIST, &[]), Ok(ClientOption::List));
        assert!(parse_option(OPT_LIST, &[1]).is_err());
        assert!(parse_option(OPT_STARTTLS, &[1]).is_err());
        assert!(parse_option(OPT_STRUCTURED_REPLY, &[0]).is_err());
        assert_eq!(parse_option(OPT_ABORT, &[1, 2]), Ok(ClientOption::Abort));
        assert_eq!(parse_option(11, &[1, 2]), Ok(ClientOption::Unknown(11)));
        assert_eq!(
            parse_option(OPT_EXPORT_NAME, b"img@v1"),
            Ok(ClientOption::ExportName("img@v1".into()))
        );
    }

    #[test]
    fn request_round_trip_and_magic() {
        let raw = encode_request(CMD_FLAG_FUA, CMD_WRITE, 0xdead, 4096, 512);
        let r = parse_request(&raw).unwrap();
        assert_eq!(r.command, Command::Write);
        assert_eq!((r.cookie, r.offset, r.length), (0xdead, 4096, 512));
        assert!(r.fua());
        assert_eq!(r.payload_len(), 512);
        let mut bad = raw;
        bad[0] ^= 1;
        assert!(matches!(
            parse_request(&bad),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    fn params() -> TransmissionParams {
        TransmissionParams {
            size: 1 << 20,
            read_only: false,
            structured: true,
            allocation_context: true,
            fast_zero: true,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        parse_request(&encode_request(flags, command, 1, offset, length)).unwrap()
    }

    #[test]
    fn request_checks() {
        let p = params();
        assert_eq!(
            check_request(&req(CMD_READ, 0, 0, 4096), &p),
            Verdict::Execute
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, (1 << 20) - 1, 2), &p),
            Verdict::Reject(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, u64::MAX, 2), &p),
            Verdict::Reject(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &p),
            Verdict::Reject(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &p),
            Verdict::Disconnect(ProtoError::PayloadTooLong(MAX_PAYLOAD + 1))
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, 1 << 20, 1), &p),
            Verdict::Reject(ENOSPC)
        );
        assert_eq!(
            check_request(&req(99, 0, 0, 0), &p),
            Verdict::Reject(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_READ, CMD_FLAG_REQ_ONE, 0, 1), &p),
            Verdict::Reject(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &p),
            Verdict::Execute
        );
        let simple = TransmissionParams {
            structured: false,
            ..p
        };
        assert_eq!(
            check_request(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple),
            Verdict::Reject(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_BLOCK_STATUS, 0, 0, 1), &simple),
            Verdict::Reject(EINVAL)
        );
        let ro = TransmissionParams {
            read_only: true,
            ..p
        };
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(
                check_request(&req(cmd, 0, 0, 1), &ro),
                Verdict::Reject(EPERM)
            );
        }
        assert_eq!(
            check_request(&req(CMD_FLUSH, 0, 0, 0), &ro),
            Verdict::Execute
        );
        let slow = TransmissionParams {
            fast_zero: false,
            ..p
        };
        assert_eq!(
            check_request(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), &slow),
            Verdict::Reject(ENOTSUP)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1), &slow),
            Verdict::Execute
        );
    }

    #[test]
    fn descriptors() {
        let e = [
            ext(4096, true, true),
            ext(0, false, false),
            ext(4096, true, true),
            ext(8192, false, false),
        ];
        assert_eq!(
            status_descriptors(&e, 10000, false),
            vec![(8192, 3), (1808, 0)]
        );
        assert_eq!(status_descriptors(&e, 10000, true), vec![(8192, 3)]);
        assert_eq!(status_descriptors(&e, 100, true), vec![(100, 3)]);
        assert_eq!(status_descriptors(&[], 100, false), vec![(100, 0)]);
    }

    #[test]
    fn read_plans() {
        let e = [
            ext(4096, false, false),
            ext(8192, true, true),
            ext(100, false, true),
            ext(4096, false, false),
        ];
        assert_eq!(
            plan_read(1000, 20000, &e, false),
            vec![
                ReadPiece::Data {
                    offset: 1000,
                    len: 4096
                },
                ReadPiece::Hole {
                    offset: 5096,
                    len: 8192
                },
                ReadPiece::Data {
                    offset: 13288,
                    len: 7712
                },
            ]
        );
        assert_eq!(
            plan_read(0, 10, &e, true),
            vec![ReadPiece::Data { offset: 0, len: 10 }]
        );
        assert_eq!(plan_read(0, 0, &e, false), vec![]);
    }

    #[test]
    fn block_sizes() {
        assert_eq!(BlockSizes::for_disk(65536).preferred, 65536);
        assert_eq!(BlockSizes::for_disk(1).preferred, 512);
        assert_eq!(BlockSizes::for_disk(100_000).preferred, 65536);
        assert_eq!(BlockSizes::for_disk(u32::MAX).preferred, 2 * 1024 * 1024);
    }

    #[test]
    fn flags_reflect_caps() {
        let rw = transmission_flags(ExportCaps {
            read_only: false,
            multi_conn: true,
            structured: true,
        });
        assert_eq!(rw & FLAG_READ_ONLY, 0);
        assert_ne!(rw & FLAG_SEND_WRITE_ZEROES, 0);
        assert_ne!(rw & FLAG_SEND_DF, 0);
        let ro = transmission_flags(ExportCaps {
            read_only: true,
            multi_conn: false,
            structured: false,
        });
        assert_ne!(ro & FLAG_READ_ONLY, 0);
        assert_eq!(
            ro & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_DF),
            0
        );
        assert_eq!(ro & FLAG_CAN_MULTI_CONN, 0);
    }
}
