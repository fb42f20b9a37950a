//! `create`: a new qcow2 file laid out as header, refcount table, refcount blocks, L1
//! table (qemu's order), with `-o` options compat, cluster_size, lazy_refcounts,
//! refcount_bits, preallocation (off, metadata) and compression_type.

use std::path::Path;
use std::sync::atomic::Ordering;

use super::header::{
    Compression, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS, V2_HEADER_LEN, V3_HEADER_LEN,
    V3_HEADER_LEN_COMPRESSION,
};
use super::refcount::entry_set;
use super::{Qcow2Layer, FLAG_COPIED};
use crate::error::{Error, Result};
use crate::image::{CreateOptions, Format, ImageFile, OpenMode};

/// Parse a byte size with an optional k/M/G suffix (powers of 1024), as qemu-img does.
fn parse_size(key: &str, text: &str) -> Result<u64> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') => (&text[..text.len() - 1], 20),
        Some(b'g' | b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| Error::invalid(format!("{key}: '{text}' is not a size")))
}

fn parse_switch(key: &str, text: &str) -> Result<bool> {
    match text {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        other => Err(Error::invalid(format!("{key}: '{other}' is not on or off"))),
    }
}

struct Settings {
    version: u32,
    cluster_bits: u32,
    lazy_refcounts: bool,
    refcount_order: u32,
    preallocate: bool,
    compression: Compression,
}

fn settings(options: &mut CreateOptions) -> Result<Settings> {
    let version = match options.take("compat").as_deref() {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(other) => {
            return Err(Error::invalid(format!(
                "compat '{other}' is not one of 0.10, 1.1 (v2, v3)"
            )))
        }
    };
    let cluster_size = match options.take("cluster_size") {
        Some(text) => parse_size("cluster_size", &text)?,
        None => 65536,
    };
    if !cluster_size.is_power_of_two()
        || !(1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS).contains(&cluster_size)
    {
        return Err(Error::invalid(format!(
            "cluster_size {cluster_size} must be a power of two from 512 to 2M"
        )));
    }
    let lazy_refcounts = match options.take("lazy_refcounts") {
        Some(text) => parse_switch("lazy_refcounts", &text)?,
        None => false,
    };
    if lazy_refcounts && version < 3 {
        return Err(Error::invalid("lazy_refcounts requires compat=1.1"));
    }
    let refcount_bits = match options.take("refcount_bits") {
        Some(text) => text
            .parse::<u32>()
            .map_err(|_| Error::invalid(format!("refcount_bits: '{text}' is not a number")))?,
        None => 16,
    };
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(Error::invalid(format!(
            "refcount_bits {refcount_bits} must be a power of two from 1 to 64"
        )));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(Error::invalid(
            "compat=0.10 images have 16-bit refcounts only",
        ));
    }
    let preallocate = match options.take("preallocation").as_deref() {
        None | Some("off") => false,
        Some("metadata") => true,
        Some(other) => {
            return Err(Error::invalid(format!(
                "preallocation '{other}' is not one of off, metadata"
            )))
        }
    };
    let compression = match options.take("compression_type").as_deref() {
        None | Some("zlib") => Compression::Zlib,
        Some("zstd") => Compression::Zstd,
        Some(other) => {
            return Err(Error::invalid(format!(
                "compression_type '{other}' is not one of zlib, zstd"
            )))
        }
    };
    if compression != Compression::Zlib && version < 3 {
        return Err(Error::invalid("compression_type requires compat=1.1"));
    }
    Ok(Settings {
        version,
        cluster_bits: cluster_size.trailing_zeros(),
        lazy_refcounts,
        refcount_order: refcount_bits.trailing_zeros(),
        preallocate,
        compression,
    })
}

pub fn create(path: &Path, mut options: CreateOptions) -> Result<()> {
    let s = settings(&mut options)?;
    options.finish(Format::Qcow2)?;
    let mut size = options.size;
    if size == 0 {
        if let Some(backing) = &options.backing {
            size = backing.layer.virtual_size();
        }
    }
    let size = size.next_multiple_of(512);
    if size > MAX_VIRTUAL_SIZE {
        return Err(Error::invalid(format!(
            "virtual size {size} is absurd (at most 2^62 bytes)"
        )));
    }
    if s.preallocate && options.backing.is_some() {
        return Err(Error::invalid(
            "preallocation=metadata cannot be combined with a backing file",
        ));
    }
    let cs = 1u64 << s.cluster_bits;
    let l2_span = cs * (cs / 8);
    let l1_size = size.div_ceil(l2_span).max(1);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(Error::invalid(format!(
            "virtual size {size} needs an L1 table over 32 MiB with {cs}-byte clusters; \
             the most this cluster size allows is {} bytes",
            (MAX_L1_BYTES / 8) * l2_span
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let entries_per_block = (cs * 8) >> s.refcount_order;
    // Fixed point: enough refcount blocks to count every metadata cluster, themselves
    // and the table included.
    let (mut table_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + table_clusters + blocks + l1_clusters;
        let need_blocks = total.div_ceil(entries_per_block);
        let need_table = (need_blocks * 8).div_ceil(cs);
        if need_blocks == blocks && need_table == table_clusters {
            break;
        }
        blocks = need_blocks.max(blocks);
        table_clusters = need_table.max(table_clusters);
    }
    let total = 1 + table_clusters + blocks + l1_clusters;
    let table_offset = cs;
    let blocks_offset = table_offset + table_clusters * cs;
    let l1_offset = blocks_offset + blocks * cs;

    let mut header = Header {
        version: s.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: s.cluster_bits,
        size,
        l1_size: l1_size as u32,
        l1_table_offset: l1_offset,
        refcount_table_offset: table_offset,
        refcount_table_clusters: table_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: if s.compression == Compression::Zlib {
            0
        } else {
            INCOMPAT_COMPRESSION
        },
        compatible: if s.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: 0,
        refcount_order: s.refcount_order,
        header_length: match s.version {
            2 => V2_HEADER_LEN,
            _ if s.compression != Compression::Zlib => V3_HEADER_LEN_COMPRESSION,
            _ => V3_HEADER_LEN,
        },
        compression: s.compression,
        backing_file: options.backing.as_ref().map(|b| b.name.clone()),
        backing_format: options.backing.as_ref().map(|b| {
            // qemu calls VHD "vpc".
            match b.format {
                Format::Vhd => "vpc".to_string(),
                other => other.name().to_string(),
            }
        }),
        backing_format_offset: 0,
        feature_names: Vec::new(),
        bitmaps: None,
    };
    if header.backing_file.as_ref().is_some_and(|n| n.len() > 1023) {
        return Err(Error::invalid("backing file name longer than 1023 bytes"));
    }
    let mut head = header.encode(true);
    if head.len() as u64 > cs {
        // Small clusters: the feature name table is optional.
        head = header.encode(false);
    }
    if head.len() as u64 > cs {
        return Err(Error::invalid(format!(
            "the header and backing file name need {} bytes, more than one {cs}-byte cluster",
            head.len()
        )));
    }
    header.backing_file_size = header.backing_file.as_ref().map_or(0, |n| n.len() as u32);

    let file = ImageFile::create(path)?;
    file.set_len(total * cs)?;
    file.write_at(&head, 0)?;
    let mut table = vec![0u8; (table_clusters * cs) as usize];
    for b in 0..blocks {
        let at = (b * 8) as usize;
        table[at..at + 8].copy_from_slice(&(blocks_offset + b * cs).to_be_bytes());
    }
    file.write_at(&table, table_offset)?;
    for b in 0..blocks {
        let mut block = vec![0u8; cs as usize];
        let first = b * entries_per_block;
        for c in first..total.min(first + entries_per_block) {
            entry_set(&mut block, c - first, s.refcount_order, 1);
        }
        file.write_at(&block, blocks_offset + b * cs)?;
    }
    // The L1 table lies in the zeros of the new file's tail.
    file.sync()?;
    drop(file);
    if s.preallocate {
        let file = ImageFile::open(path, OpenMode::default())?;
        let layer = Qcow2Layer::open(file)?;
        layer.preallocate_metadata()?;
        layer.file.sync()?;
    }
    Ok(())
}

impl Qcow2Layer {
    /// Map every guest cluster to its own host cluster (left sparse in the file): the L2
    /// tables and data clusters of each L1 entry are allocated together at the end.
    fn preallocate_metadata(&self) -> Result<()> {
        let mut meta = self.meta.lock();
        let cs = self.cs();
        let guest_clusters = self.virtual_size_now().div_ceil(cs);
        let l1 = self.l1.load_full();
        let mut first = 0;
        let mut l1_index = 0;
        while first < guest_clusters {
            let count = (guest_clusters - first).min(self.l2_entries());
            let start = meta.refcounts.alloc_at_end(&self.file, count + 1)?;
            let mut table = vec![0u8; cs as usize];
            for i in 0..count {
                let host = start + (i + 1) * cs;
                table[(i * 8) as usize..(i * 8 + 8) as usize]
                    .copy_from_slice(&(host | FLAG_COPIED).to_be_bytes());
            }
            self.file.write_at(&table, start)?;
            let entry = start | FLAG_COPIED;
            self.file
                .write_at(&entry.to_be_bytes(), l1.offset + l1_index * 8)?;
            if let Some(e) = l1.entries.get(l1_index as usize) {
                e.store(entry, Ordering::Release);
            }
            first += count;
            l1_index += 1;
        }
        let end = meta.refcounts.eof;
        if self.file.size()? < end {
            self.file.set_len(end)?;
        }
        self.publish(&meta);
        Ok(())
    }
}
