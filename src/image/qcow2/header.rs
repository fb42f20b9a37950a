//! The qcow2 header (versions 2 and 3) and its extensions: parsing with validation of every
//! field against the file, and encoding for `create`.

use crate::error::{Error, ErrorKind, Result};
use crate::image::ImageFile;

pub const MAGIC: &[u8; 4] = b"QFI\xfb";

/// Byte offsets of the header fields (for error messages and in-place updates).
pub mod field {
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
}

pub const V2_HEADER_LEN: u32 = 72;
pub const V3_HEADER_LEN: u32 = 104;
/// v3 header with the compression_type byte and its padding.
pub const V3_HEADER_LEN_COMPRESSION: u32 = 112;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

pub const MIN_CLUSTER_BITS: u32 = 9;
/// 2 MiB: qemu's limit, and ours (an L2 table is one cluster, read whole).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's limits: the L1 table is at most 32 MiB, the refcount table 8 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name the format allows.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Virtual sizes are signed 64-bit in qemu; keep well below overflow.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 62;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// A parsed, validated header. Fields that change while the image is open (size, L1,
/// refcount table, feature bits) live in the layer; these are their values at open.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Offset of the backing format extension data (for error messages).
    pub backing_format_offset: u64,
    /// (type, bit, name) from the feature name table extension.
    pub feature_names: Vec<(u8, u8, String)>,
    /// The bitmaps extension, when present.
    pub bitmaps: Option<BitmapsExtension>,
}

/// Where the persistent dirty bitmaps' directory lies (their clusters are refcounted).
#[derive(Debug, Clone, Copy)]
pub struct BitmapsExtension {
    pub count: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
    /// Offset of the extension data (for error messages).
    pub at: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Name of an incompatible feature bit: from the image's own feature table, else ours.
    fn incompatible_name(&self, bit: u32) -> String {
        self.feature_names
            .iter()
            .find(|(kind, b, _)| *kind == 0 && u32::from(*b) == bit)
            .map(|(_, _, name)| name.clone())
            .unwrap_or_else(|| format!("unknown feature bit {bit}"))
    }

    /// Read and validate the header of `file` (whose length is `file_len`).
    pub fn read(file: &ImageFile, file_len: u64) -> Result<Header> {
        let path = file.path();
        let corrupt = |field: &str, at: u64, msg: String| Error::corrupt(path, field, at, msg);
        if file_len < u64::from(V2_HEADER_LEN) {
            return Err(corrupt(
                "header",
                0,
                format!("file is {file_len} bytes, shorter than a qcow2 header (72 bytes)"),
            ));
        }
        let mut fixed = [0u8; V3_HEADER_LEN as usize];
        let fixed_len = (file_len.min(u64::from(V3_HEADER_LEN))) as usize;
        file.read_at(&mut fixed[..fixed_len], 0)?;
        if &fixed[0..4] != MAGIC {
            return Err(corrupt("magic", 0, "not a qcow2 image (bad magic)".into()));
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("qcow2 version {version} is not supported (only 2 and 3)"),
            )
            .with_path(path)
            .with_field("version")
            .at(field::VERSION));
        }
        if version == 3 && fixed_len < V3_HEADER_LEN as usize {
            return Err(corrupt(
                "header_length",
                field::HEADER_LENGTH,
                format!("file is {file_len} bytes, shorter than a version 3 header"),
            ));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(
                "cluster_bits",
                field::CLUSTER_BITS,
                format!(
                    "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} (512 B to 2 MiB)"
                ),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(&fixed, 8),
            backing_file_size: be32(&fixed, 16),
            cluster_bits,
            size: be64(&fixed, 24),
            l1_size: be32(&fixed, 36),
            l1_table_offset: be64(&fixed, 40),
            refcount_table_offset: be64(&fixed, 48),
            refcount_table_clusters: be32(&fixed, 56),
            nb_snapshots: be32(&fixed, 60),
            snapshots_offset: be64(&fixed, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
            backing_format_offset: 0,
            feature_names: Vec::new(),
            bitmaps: None,
        };
        if version == 3 {
            h.incompatible = be64(&fixed, 72);
            h.compatible = be64(&fixed, 80);
            h.autoclear = be64(&fixed, 88);
            h.refcount_order = be32(&fixed, 96);
            h.header_length = be32(&fixed, 100);
            if h.header_length < V3_HEADER_LEN
                || !h.header_length.is_multiple_of(8)
                || u64::from(h.header_length) > cluster_size
            {
                return Err(corrupt(
                    "header_length",
                    field::HEADER_LENGTH,
                    format!(
                        "header_length {} must be a multiple of 8 between 104 and the cluster size",
                        h.header_length
                    ),
                ));
            }
            if h.refcount_order > 6 {
                return Err(corrupt(
                    "refcount_order",
                    field::REFCOUNT_ORDER,
                    format!("refcount_order {} exceeds 6 (64 bits)", h.refcount_order),
                ));
            }
        }
        // The whole first cluster: extensions and the backing file name live there.
        let head_len = file_len.min(cluster_size) as usize;
        let mut head = vec![0u8; head_len];
        file.read_at(&mut head, 0)?;
        if u64::from(h.header_length) > file_len {
            return Err(corrupt(
                "header_length",
                field::HEADER_LENGTH,
                format!(
                    "header of {} bytes is past the end of the file",
                    h.header_length
                ),
            ));
        }
        if version == 3 && h.header_length > V3_HEADER_LEN {
            h.compression = match head[field::COMPRESSION_TYPE as usize] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                other => {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("compression type {other} is not supported (zlib=0, zstd=1)"),
                    )
                    .with_path(path)
                    .with_field("compression_type")
                    .at(field::COMPRESSION_TYPE))
                }
            };
        }
        if (h.incompatible & INCOMPAT_COMPRESSION != 0) != (h.compression != Compression::Zlib) {
            return Err(corrupt(
                "incompatible_features",
                field::INCOMPATIBLE_FEATURES,
                "the compression type bit and the compression_type field disagree".into(),
            ));
        }
        h.parse_extensions(path, &head, file_len)?;
        h.validate_features(path, be32(&fixed, 32))?;
        h.validate_layout(path, file_len)?;
        Ok(h)
    }

    fn parse_extensions(
        &mut self,
        path: &std::path::Path,
        head: &[u8],
        file_len: u64,
    ) -> Result<()> {
        let cluster_size = self.cluster_size();
        // Extensions end where the backing file name starts, or at the end of cluster 0.
        let area_end = if self.backing_file_offset != 0 {
            self.backing_file_offset.min(head.len() as u64)
        } else {
            head.len() as u64
        } as usize;
        let mut at = self.header_length as usize;
        let mut seen = 0u32;
        while at + 8 <= area_end {
            let kind = be32(head, at);
            let len = be32(head, at + 4) as usize;
            let data = at + 8;
            if kind == EXT_END {
                break;
            }
            if data + len > area_end {
                return Err(Error::corrupt(
                    path,
                    "header extension length",
                    at as u64 + 4,
                    format!("extension {kind:#x} of {len} bytes runs past the header area"),
                ));
            }
            seen += 1;
            if seen > 1024 {
                return Err(Error::corrupt(
                    path,
                    "header extension",
                    at as u64,
                    "more than 1024 header extensions",
                ));
            }
            let bytes = &head[data..data + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    let name = std::str::from_utf8(bytes).map_err(|_| {
                        Error::corrupt(
                            path,
                            "backing format extension",
                            data as u64,
                            "backing format name is not UTF-8",
                        )
                    })?;
                    self.backing_format = Some(name.to_string());
                    self.backing_format_offset = data as u64;
                }
                EXT_BITMAPS if len >= 24 => {
                    self.bitmaps = Some(BitmapsExtension {
                        count: be32(bytes, 0),
                        directory_size: be64(bytes, 8),
                        directory_offset: be64(bytes, 16),
                        at: data as u64,
                    });
                }
                EXT_FEATURE_TABLE => {
                    for entry in bytes.chunks_exact(48) {
                        let name_bytes = &entry[2..48];
                        let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(46);
                        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
                        self.feature_names.push((entry[0], entry[1], name));
                    }
                }
                _ => {}
            }
            at = data + len.div_ceil(8) * 8;
        }
        if self.backing_file_offset != 0 {
            let off = self.backing_file_offset;
            let len = self.backing_file_size;
            if len == 0 || len > MAX_BACKING_NAME {
                return Err(Error::corrupt(
                    path,
                    "backing_file_size",
                    field::BACKING_FILE_SIZE,
                    format!("backing file name length {len} is not in 1..=1023"),
                ));
            }
            let end = off.saturating_add(u64::from(len));
            if end > cluster_size || end > file_len {
                return Err(Error::corrupt(
                    path,
                    "backing_file_offset",
                    field::BACKING_FILE_OFFSET,
                    format!(
                        "backing file name at {off:#x}+{len} lies outside the first cluster or the file"
                    ),
                ));
            }
            let name = std::str::from_utf8(&head[off as usize..end as usize]).map_err(|_| {
                Error::corrupt(
                    path,
                    "backing file name",
                    off,
                    "backing file name is not UTF-8",
                )
            })?;
            self.backing_file = Some(name.to_string());
        }
        Ok(())
    }

    fn validate_features(&self, path: &std::path::Path, crypt_method: u32) -> Result<()> {
        let unsupported = |field: &str, at: u64, msg: String| {
            Error::new(ErrorKind::Unsupported, msg)
                .with_path(path)
                .with_field(field)
                .at(at)
        };
        if crypt_method != 0 {
            return Err(unsupported(
                "crypt_method",
                field::CRYPT_METHOD,
                format!(
                    "encrypted qcow2 images are not supported (crypt_method {crypt_method}: {})",
                    match crypt_method {
                        1 => "AES",
                        2 => "LUKS",
                        _ => "unknown",
                    }
                ),
            ));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(
                "incompatible_features",
                field::INCOMPATIBLE_FEATURES,
                "qcow2 images with an external data file are not supported".into(),
            ));
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported(
                "incompatible_features",
                field::INCOMPATIBLE_FEATURES,
                "qcow2 images with extended L2 entries (subclusters) are not supported".into(),
            ));
        }
        let unknown = self.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|bit| unknown & (1u64 << bit) != 0)
                .map(|bit| self.incompatible_name(bit))
                .collect();
            return Err(unsupported(
                "incompatible_features",
                field::INCOMPATIBLE_FEATURES,
                format!(
                    "unknown incompatible features set: {} (bits {unknown:#x})",
                    names.join(", ")
                ),
            ));
        }
        Ok(())
    }

    fn validate_layout(&self, path: &std::path::Path, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let corrupt = |field: &str, at: u64, msg: String| Error::corrupt(path, field, at, msg);
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(
                "size",
                field::SIZE,
                format!("virtual size {} is absurd", self.size),
            ));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(
                "l1_size",
                field::L1_SIZE,
                format!(
                    "L1 table of {} entries exceeds the 32 MiB limit",
                    self.l1_size
                ),
            ));
        }
        let l2_span = cs * (cs / 8);
        if u64::from(self.l1_size) < self.size.div_ceil(l2_span) {
            return Err(corrupt(
                "l1_size",
                field::L1_SIZE,
                format!(
                    "L1 table of {} entries is too small for a virtual size of {}",
                    self.l1_size, self.size
                ),
            ));
        }
        if l1_bytes > 0 {
            check_table(
                path,
                "l1_table_offset",
                field::L1_TABLE_OFFSET,
                self.l1_table_offset,
                l1_bytes,
                cs,
                file_len,
            )?;
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES || self.refcount_table_clusters == 0 {
            return Err(corrupt(
                "refcount_table_clusters",
                field::REFCOUNT_TABLE_CLUSTERS,
                format!(
                    "refcount table of {} clusters is empty or exceeds the 8 MiB limit",
                    self.refcount_table_clusters
                ),
            ));
        }
        check_table(
            path,
            "refcount_table_offset",
            field::REFCOUNT_TABLE_OFFSET,
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        if self.nb_snapshots > super::snapshot::MAX_SNAPSHOTS {
            return Err(corrupt(
                "nb_snapshots",
                field::NB_SNAPSHOTS,
                format!("{} snapshots exceed the limit of 65536", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 {
            check_table(
                path,
                "snapshots_offset",
                field::SNAPSHOTS_OFFSET,
                self.snapshots_offset,
                1,
                cs,
                file_len,
            )?;
        }
        Ok(())
    }

    /// The header, its extensions and the backing file name, as written by `create`.
    /// Fits in one cluster (checked by the caller).
    pub fn encode(&self, feature_table: bool) -> Vec<u8> {
        let mut out = vec![0u8; self.header_length as usize];
        out[0..4].copy_from_slice(MAGIC);
        put32(&mut out, 4, self.version);
        put32(&mut out, 20, self.cluster_bits);
        put64(&mut out, 24, self.size);
        put32(&mut out, 36, self.l1_size);
        put64(&mut out, 40, self.l1_table_offset);
        put64(&mut out, 48, self.refcount_table_offset);
        put32(&mut out, 56, self.refcount_table_clusters);
        put32(&mut out, 60, self.nb_snapshots);
        put64(&mut out, 64, self.snapshots_offset);
        if self.version == 3 {
            put64(&mut out, 72, self.incompatible);
            put64(&mut out, 80, self.compatible);
            put64(&mut out, 88, self.autoclear);
            put32(&mut out, 96, self.refcount_order);
            put32(&mut out, 100, self.header_length);
            if self.header_length > V3_HEADER_LEN {
                out[field::COMPRESSION_TYPE as usize] = match self.compression {
                    Compression::Zlib => 0,
                    Compression::Zstd => 1,
                };
            }
        }
        let push_ext = |out: &mut Vec<u8>, kind: u32, data: &[u8]| {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(8) * 8, 0);
        };
        if let Some(format) = &self.backing_format {
            push_ext(&mut out, EXT_BACKING_FORMAT, format.as_bytes());
        }
        if self.version == 3 && feature_table {
            let mut table = Vec::new();
            for (kind, bit, name) in FEATURE_NAMES {
                let mut entry = [0u8; 48];
                entry[0] = *kind;
                entry[1] = *bit;
                entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&entry);
            }
            push_ext(&mut out, EXT_FEATURE_TABLE, &table);
        }
        push_ext(&mut out, EXT_END, &[]);
        if let Some(name) = &self.backing_file {
            let off = out.len() as u64;
            out.extend_from_slice(name.as_bytes());
            put64(&mut out, 8, off);
            put32(&mut out, 16, name.len() as u32);
        }
        out
    }
}

/// The feature name table ferrotap writes (type, bit, name), as qemu names them.
const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// A table must start on a cluster boundary, after the header cluster, and lie in the file.
pub fn check_table(
    path: &std::path::Path,
    name: &str,
    field_offset: u64,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    let end = offset.checked_add(len);
    if !offset.is_multiple_of(cluster_size) || offset == 0 {
        return Err(Error::corrupt(
            path,
            name,
            field_offset,
            format!("table offset {offset:#x} is not a nonzero multiple of the cluster size"),
        ));
    }
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::corrupt(
            path,
            name,
            field_offset,
            format!(
                "table at {offset:#x} of {len} bytes lies past the end of the file ({file_len} bytes)"
            ),
        )),
    }
}
