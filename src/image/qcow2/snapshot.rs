//! The internal snapshot table: parsed (bounded) so that `check` counts the snapshots'
//! L1 tables and clusters. The active L1 is what ferrotap serves; snapshots are never
//! loaded, created or deleted here.

use super::header::{check_table, Header, MAX_L1_BYTES};
use crate::error::{Error, Result};
use crate::image::ImageFile;

/// qemu's limits on the snapshot table.
pub const MAX_SNAPSHOTS: u32 = 65536;
const MAX_TABLE_BYTES: u64 = 64 << 20;
const ENTRY_FIXED: usize = 40;

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// Where this entry starts in the file (for error messages).
    pub entry_offset: u64,
}

/// The snapshot table: its entries and the bytes it spans.
#[derive(Debug, Clone, Default)]
pub struct SnapshotTable {
    pub snapshots: Vec<Snapshot>,
    pub table_bytes: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

pub fn read(file: &ImageFile, header: &Header, file_len: u64) -> Result<SnapshotTable> {
    let path = file.path();
    let count = header.nb_snapshots;
    if count == 0 {
        return Ok(SnapshotTable::default());
    }
    // Read the table in one piece, bounded by the file and qemu's 64 MiB limit.
    let start = header.snapshots_offset;
    let avail = (file_len - start).min(MAX_TABLE_BYTES) as usize;
    let mut table = vec![0u8; avail];
    file.read_at(&mut table, start)?;
    let mut snapshots = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    for index in 0..count {
        let entry_offset = start + at as u64;
        let truncated = || {
            Error::corrupt(
                path,
                &format!("snapshot table entry {index}"),
                entry_offset,
                "snapshot table runs past the end of the file or its 64 MiB limit",
            )
        };
        if at + ENTRY_FIXED > table.len() {
            return Err(truncated());
        }
        let e = &table[at..];
        let l1_table_offset = u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
        let l1_size = be32(e, 8);
        let id_len = be16(e, 12);
        let name_len = be16(e, 14);
        let extra_len = be32(e, 36) as usize;
        let len = ENTRY_FIXED + extra_len + id_len + name_len;
        if extra_len > 1024 || at + len > table.len() {
            return Err(truncated());
        }
        let field = format!("L1 table of snapshot {index}");
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(
                path,
                &field,
                entry_offset + 8,
                format!("snapshot L1 table of {l1_size} entries exceeds the 32 MiB limit"),
            ));
        }
        if l1_size > 0 {
            check_table(
                path,
                &field,
                entry_offset,
                l1_table_offset,
                u64::from(l1_size) * 8,
                header.cluster_size(),
                file_len,
            )?;
        }
        snapshots.push(Snapshot {
            l1_table_offset,
            l1_size,
            entry_offset,
        });
        at += len.div_ceil(8) * 8;
    }
    Ok(SnapshotTable {
        snapshots,
        table_bytes: at as u64,
    })
}
