//! The qcow2 header: a pure parser over the bytes of the first cluster.
//!
//! The header is the part of a qcow2 file that decides how everything else is
//! read, so it is validated in isolation, without touching the file: the parser
//! takes the first cluster (or as much of it as the file has) and either returns a
//! [`Header`] whose fields are internally consistent, or says what is wrong. It
//! never panics and never allocates in proportion to a header field, which makes it
//! a good fuzz target. Checks that need the file's size (tables inside the file)
//! are done by the image when it opens the file.
//!
//! Layout (all big-endian): version 2 has a fixed 72-byte header; version 3 adds
//! feature bitmaps, refcount order and `header_length` (>= 104), optionally
//! followed by additional fields such as `compression_type` at byte 104. Header
//! extensions (type, length, data padded to 8 bytes) follow the header up to the
//! backing file name or the end of the first cluster.

use std::fmt;

pub(crate) const MAGIC: &[u8; 4] = b"QFI\xfb";
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
/// qemu's implementation limit (2 MiB clusters); larger images would not open in
/// qemu either, and the limit bounds every per-cluster buffer we allocate.
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's limit on the active L1 table (32 MiB); also bounds our L1 allocation.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_BACKING_NAME: u64 = 1023;
pub(crate) const V2_HEADER_LEN: u32 = 72;
pub(crate) const V3_MIN_HEADER_LEN: u32 = 104;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Format names are short ("qcow2", "raw"); qemu itself stores at most 15 bytes.
const MAX_BACKING_FORMAT_LEN: u32 = 64;
const FEATURE_ENTRY_LEN: usize = 48;

/// How compressed clusters are compressed (header field at byte 104, v3 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (zlib without header), qemu's default.
    Deflate,
    Zstd,
}

/// One entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// A parsed, self-consistent qcow2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Raw bytes of the backing file name (not necessarily UTF-8); `None` if the
    /// image has no backing file.
    pub backing_file: Option<Vec<u8>>,
    /// Backing format from the header extension (`qemu-img create -F`).
    pub backing_format: Option<String>,
    /// External data file name extension, if present.
    pub data_file: Option<Vec<u8>>,
    pub feature_names: Vec<FeatureName>,
}

/// Why a header was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a valid qcow2 header (truncated, inconsistent, out of range).
    Malformed(String),
    /// A valid header that uses a feature this reader does not implement.
    Unsupported(String),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Malformed(r) => write!(f, "malformed header: {r}"),
            HeaderError::Unsupported(r) => write!(f, "unsupported feature: {r}"),
        }
    }
}

impl std::error::Error for HeaderError {}

fn malformed<T>(reason: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError::Malformed(reason.into()))
}

fn be32(b: &[u8], at: usize) -> Result<u32, HeaderError> {
    match b.get(at..at + 4) {
        Some(s) => Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]])),
        None => malformed(format!("truncated: need 4 bytes at offset {at}")),
    }
}

fn be64(b: &[u8], at: usize) -> Result<u64, HeaderError> {
    match b.get(at..at + 8) {
        Some(s) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            Ok(u64::from_be_bytes(a))
        }
        None => malformed(format!("truncated: need 8 bytes at offset {at}")),
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128-bit with 32 subclusters (incompatible bit 4).
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0
    }

    /// Number of entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        let entry = if self.extended_l2() { 16 } else { 8 };
        self.cluster_size() / entry
    }

    /// Number of L1 entries needed to map the virtual size.
    pub fn l1_entries_needed(&self) -> u64 {
        let clusters = self.size.div_ceil(self.cluster_size());
        clusters.div_ceil(self.l2_entries())
    }

    /// Name of feature bit `bit` of kind `kind` from the feature name table.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.as_str())
    }

    /// Backing file name for messages (lossy if not UTF-8).
    pub fn backing_file_display(&self) -> Option<String> {
        self.backing_file
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

/// Parse and validate a qcow2 header from the first cluster of the file (`bytes`
/// may be shorter if the file is shorter; anything the header needs beyond it is
/// reported as truncation).
pub fn parse_header(bytes: &[u8]) -> Result<Header, HeaderError> {
    if bytes.len() < V2_HEADER_LEN as usize {
        return malformed(format!(
            "truncated: {} bytes, a qcow2 header needs at least {V2_HEADER_LEN}",
            bytes.len()
        ));
    }
    if &bytes[0..4] != MAGIC {
        return malformed("bad magic (expected \"QFI\\xfb\")");
    }
    let version = be32(bytes, 4)?;
    if version != 2 && version != 3 {
        return Err(HeaderError::Unsupported(format!(
            "qcow2 version {version} (only 2 and 3 exist)"
        )));
    }
    let backing_file_offset = be64(bytes, 8)?;
    let backing_file_size = be32(bytes, 16)?;
    let cluster_bits = be32(bytes, 20)?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return malformed(format!(
            "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)"
        ));
    }
    let cluster_size = 1u64 << cluster_bits;
    let size = be64(bytes, 24)?;
    let crypt_method = be32(bytes, 32)?;
    let l1_size = be32(bytes, 36)?;
    let l1_table_offset = be64(bytes, 40)?;
    let refcount_table_offset = be64(bytes, 48)?;
    let refcount_table_clusters = be32(bytes, 56)?;
    let nb_snapshots = be32(bytes, 60)?;
    let snapshots_offset = be64(bytes, 64)?;

    let (incompatible, compatible, autoclear, refcount_order, header_length) = if version == 2 {
        (0, 0, 0, 4, V2_HEADER_LEN)
    } else {
        let header_length = be32(bytes, 100)?;
        if header_length < V3_MIN_HEADER_LEN {
            return malformed(format!(
                "header_length {header_length} is below the v3 minimum of {V3_MIN_HEADER_LEN}"
            ));
        }
        (
            be64(bytes, 72)?,
            be64(bytes, 80)?,
            be64(bytes, 88)?,
            be32(bytes, 96)?,
            header_length,
        )
    };
    if u64::from(header_length) > cluster_size {
        return malformed(format!(
            "header_length {header_length} exceeds the cluster size {cluster_size}"
        ));
    }
    if header_length as usize > bytes.len() {
        return malformed(format!(
            "truncated: header_length is {header_length} but only {} bytes are present",
            bytes.len()
        ));
    }
    if refcount_order > 6 {
        return malformed(format!("refcount_order {refcount_order} exceeds 6"));
    }

    // Compression type: an additional field, present only if header_length covers it.
    let compression_byte = if header_length > V3_MIN_HEADER_LEN {
        bytes[V3_MIN_HEADER_LEN as usize]
    } else {
        0
    };
    let compression_bit = incompatible & INCOMPAT_COMPRESSION != 0;
    if compression_bit != (compression_byte != 0) {
        return malformed(format!(
            "compression type {compression_byte} disagrees with the compression-type feature bit ({})",
            if compression_bit { "set" } else { "clear" }
        ));
    }
    let compression_type = match compression_byte {
        0 => CompressionType::Deflate,
        1 => CompressionType::Zstd,
        other => {
            return Err(HeaderError::Unsupported(format!(
                "compression type {other} (known: 0 zlib, 1 zstd)"
            )))
        }
    };

    // Header extensions run from the end of the header to the backing file name
    // (or the end of the first cluster).
    if backing_file_offset > cluster_size {
        return malformed(format!(
            "backing file name offset {backing_file_offset} is outside the first cluster"
        ));
    }
    let ext_end = if backing_file_offset != 0 {
        backing_file_offset
    } else {
        cluster_size
    };
    let mut backing_format = None;
    let mut data_file = None;
    let mut feature_names = Vec::new();
    let mut off = u64::from(header_length);
    while off < ext_end {
        // No room for another extension header (in the area, or in a file shorter
        // than one cluster) ends the list, like an end marker would. A file that
        // short is caught later: its L1 table cannot be inside it.
        if off + 8 > ext_end || off + 8 > bytes.len() as u64 {
            break;
        }
        let ext_type = be32(bytes, off as usize)?;
        let ext_len = be32(bytes, off as usize + 4)?;
        off += 8;
        if ext_type == EXT_END {
            break;
        }
        let data_end = off + u64::from(ext_len);
        if off > ext_end || data_end > ext_end {
            return malformed(format!(
                "header extension {ext_type:#010x} of {ext_len} bytes runs past the end of the extension area ({ext_end})"
            ));
        }
        let Some(data) = bytes.get(off as usize..data_end as usize) else {
            return malformed(format!(
                "truncated: header extension {ext_type:#010x} runs past the end of the file"
            ));
        };
        match ext_type {
            EXT_BACKING_FORMAT => {
                if ext_len > MAX_BACKING_FORMAT_LEN {
                    return malformed(format!("backing format extension is {ext_len} bytes long"));
                }
                match std::str::from_utf8(data) {
                    Ok(s) => backing_format = Some(s.to_string()),
                    Err(_) => return malformed("backing format name is not UTF-8"),
                }
            }
            EXT_FEATURE_TABLE => {
                for entry in data.chunks_exact(FEATURE_ENTRY_LEN) {
                    let name = &entry[2..];
                    let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                    feature_names.push(FeatureName {
                        kind: entry[0],
                        bit: entry[1],
                        name: String::from_utf8_lossy(name).into_owned(),
                    });
                }
            }
            EXT_DATA_FILE => data_file = Some(data.to_vec()),
            // Bitmaps, encryption header pointer, unknown: nothing a reader needs.
            _ => {}
        }
        off = data_end.next_multiple_of(8);
    }

    let backing_file = if backing_file_offset != 0 && backing_file_size != 0 {
        let len = u64::from(backing_file_size);
        if len > MAX_BACKING_NAME || backing_file_offset + len > cluster_size {
            return malformed(format!(
                "backing file name of {len} bytes at offset {backing_file_offset} is too long \
                 (at most {MAX_BACKING_NAME} bytes, inside the first cluster)"
            ));
        }
        match bytes.get(backing_file_offset as usize..(backing_file_offset + len) as usize) {
            Some(name) => Some(name.to_vec()),
            None => {
                return malformed("truncated: the backing file name is past the end of the file")
            }
        }
    } else {
        None
    };

    let header = Header {
        version,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible_features: incompatible,
        compatible_features: compatible,
        autoclear_features: autoclear,
        refcount_order,
        header_length,
        compression_type,
        backing_file,
        backing_format,
        data_file,
        feature_names,
    };
    check_supported(&header)?;
    check_geometry(&header)?;
    Ok(header)
}

/// Refuse what this reader does not implement, naming it.
fn check_supported(h: &Header) -> Result<(), HeaderError> {
    let unsupported = |s: String| Err(HeaderError::Unsupported(s));
    let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let names: Vec<String> = (0..64u8)
            .filter(|b| unknown & (1u64 << b) != 0)
            .map(|b| match h.feature_name(0, b) {
                Some(n) => format!("bit {b} ({n})"),
                None => format!("bit {b}"),
            })
            .collect();
        return unsupported(format!("unknown incompatible feature {}", names.join(", ")));
    }
    if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        return unsupported(
            "image is marked corrupt (run `qemu-img check -r all` on it first)".into(),
        );
    }
    if h.incompatible_features & INCOMPAT_DATA_FILE != 0 || h.data_file.is_some() {
        return unsupported("external data file".into());
    }
    match h.crypt_method {
        0 => {}
        1 => return unsupported("AES encryption".into()),
        2 => return unsupported("LUKS encryption".into()),
        m => return unsupported(format!("encryption method {m}")),
    }
    Ok(())
}

/// Internal consistency of the sizes and offsets (the file size is checked later).
fn check_geometry(h: &Header) -> Result<(), HeaderError> {
    let cluster_size = h.cluster_size();
    if h.extended_l2() && h.cluster_bits < 14 {
        return malformed(format!(
            "extended L2 entries need clusters of at least 16 KiB, not {cluster_size}"
        ));
    }
    let l1_bytes = u64::from(h.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return malformed(format!(
            "L1 table of {} entries exceeds the {} MiB limit",
            h.l1_size,
            MAX_L1_BYTES >> 20
        ));
    }
    let needed = h.l1_entries_needed();
    if u64::from(h.l1_size) < needed {
        return malformed(format!(
            "L1 table has {} entries but the virtual size {} needs {needed}",
            h.l1_size, h.size
        ));
    }
    if h.l1_size > 0 {
        if !h.l1_table_offset.is_multiple_of(cluster_size) {
            return malformed(format!(
                "L1 table offset {:#x} is not aligned to the cluster size {cluster_size}",
                h.l1_table_offset
            ));
        }
        if h.l1_table_offset == 0 {
            return malformed("L1 table overlaps the header at offset 0");
        }
        if h.l1_table_offset.checked_add(l1_bytes).is_none() {
            return malformed("L1 table offset overflows");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 header in a 64 KiB cluster.
    fn v3(size: u64) -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[0..4].copy_from_slice(MAGIC);
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&size.to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b
    }

    #[test]
    fn minimal_v3() {
        let h = parse_header(&v3(1 << 20)).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.l1_entries_needed(), 1);
        assert_eq!(h.compression_type, CompressionType::Deflate);
        assert_eq!(h.backing_file, None);
    }

    #[test]
    fn rejects_bad_values() {
        let mut b = v3(1 << 20);
        b[20..24].copy_from_slice(&22u32.to_be_bytes());
        assert!(
            matches!(parse_header(&b), Err(HeaderError::Malformed(m)) if m.contains("cluster_bits"))
        );

        let mut b = v3(1 << 40); // needs far more than one L1 entry
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        assert!(
            matches!(parse_header(&b), Err(HeaderError::Malformed(m)) if m.contains("L1 table has"))
        );

        let mut b = v3(1 << 20);
        b[72 + 7] = 1 << 5; // unknown incompatible bit 5
        assert!(
            matches!(parse_header(&b), Err(HeaderError::Unsupported(m)) if m.contains("bit 5"))
        );

        let mut b = v3(1 << 20);
        b[35] = 2;
        assert!(matches!(parse_header(&b), Err(HeaderError::Unsupported(m)) if m.contains("LUKS")));

        let mut b = v3(1 << 20);
        b[72 + 7] = INCOMPAT_CORRUPT as u8;
        assert!(
            matches!(parse_header(&b), Err(HeaderError::Unsupported(m)) if m.contains("corrupt"))
        );

        let b = v3(1 << 20);
        assert!(parse_header(&b[..100]).is_err());
        assert!(parse_header(&b[..50]).is_err());
    }

    #[test]
    fn extensions_and_backing_name() {
        let mut b = v3(1 << 20);
        // Backing format extension "qcow2", then end marker, then the name at 512.
        b[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[108..112].copy_from_slice(&5u32.to_be_bytes());
        b[112..117].copy_from_slice(b"qcow2");
        b[8..16].copy_from_slice(&512u64.to_be_bytes());
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        b[512..520].copy_from_slice(b"base.img");
        let h = parse_header(&b).unwrap();
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(h.backing_file.as_deref(), Some(&b"base.img"[..]));

        // An extension longer than the space before the backing name is refused.
        b[108..112].copy_from_slice(&1000u32.to_be_bytes());
        assert!(
            matches!(parse_header(&b), Err(HeaderError::Malformed(m)) if m.contains("extension"))
        );
    }
}
