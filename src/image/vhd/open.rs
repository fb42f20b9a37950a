//! Opening a VHD: find the footer, then (dynamic and differencing disks) the header, BAT,
//! batmap and parent locators, validating every offset and size against the file before
//! anything is allocated or trusted.

use std::sync::atomic::{AtomicU32, AtomicU64};

use parking_lot::Mutex;

use super::batmap::{self, Batmap};
use super::bitmap::BitmapCache;
use super::footer::{self, DiskType, Footer, FOOTER_SIZE, MAX_OPEN_SIZE};
use super::header::{
    self, DynamicHeader, HEADER_SIZE, LOCATORS_OFFSET, LOCATOR_ENTRY_SIZE, PLATFORM_MACX,
    PLATFORM_NONE, PLATFORM_W2KU, PLATFORM_W2RU,
};
use super::locator::{self, MAX_LOCATOR_BYTES};
use super::{Damage, DamagedEntry, Meta, Region, Sparse, VhdLayer, UNUSED};
use crate::error::{Error, Result};
use crate::image::{ImageFile, SECTOR_SIZE};

/// Bytes the BAT of `entries` blocks takes, sector padded (at least one sector).
pub(super) fn bat_bytes(entries: u32) -> u64 {
    (u64::from(entries) * 4).div_ceil(SECTOR_SIZE).max(1) * SECTOR_SIZE
}

/// Where a VHD's footer was found.
struct FoundFooter {
    footer: Footer,
    /// Offset of the footer at the end, or `None` when only the copy at offset 0 was
    /// valid (a crash while a block was appended).
    end_offset: Option<u64>,
}

fn find_footer(file: &ImageFile, file_len: u64) -> Result<FoundFooter> {
    let path = file.path();
    if file_len < FOOTER_SIZE {
        return Err(Error::corrupt(
            path,
            "footer",
            0,
            format!("file of {file_len} bytes is too short for a VHD footer"),
        ));
    }
    let end = file_len - FOOTER_SIZE;
    let mut buf = [0u8; FOOTER_SIZE as usize];
    file.read_at(&mut buf, end)?;
    if buf.starts_with(footer::FOOTER_COOKIE) {
        return Ok(FoundFooter {
            footer: Footer::parse(&buf, path, end)?,
            end_offset: Some(end),
        });
    }
    let end_error = Footer::parse(&buf, path, end).err();
    // No footer at the end: a block was being appended when the host crashed. Dynamic
    // disks keep a copy at offset 0 (blktap reads it the same way).
    if end > 0 {
        let mut head = [0u8; FOOTER_SIZE as usize];
        file.read_at(&mut head, 0)?;
        if let Ok(copy) = Footer::parse(&head, path, 0) {
            if copy.disk_type != DiskType::Fixed {
                return Ok(FoundFooter {
                    footer: copy,
                    end_offset: None,
                });
            }
        }
    }
    Err(end_error.unwrap_or_else(|| Error::corrupt(path, "footer cookie", end, "no footer")))
}

impl VhdLayer {
    pub(super) fn open(file: ImageFile) -> Result<VhdLayer> {
        let file_len = file.size()?;
        let found = find_footer(&file, file_len)?;
        let footer = found.footer;
        let path = file.path().to_path_buf();
        let footer_at = found.end_offset.unwrap_or(0);
        let (sparse, next_block) = match footer.disk_type {
            DiskType::Fixed => {
                let end = found.end_offset.unwrap_or(0);
                if footer.current_size > end {
                    return Err(Error::corrupt(
                        &path,
                        "footer current size",
                        footer_at + footer::CURRENT_SIZE_OFFSET,
                        format!(
                            "fixed disk of {} bytes but the file holds only {end} bytes before \
                             its footer (truncated?)",
                            footer.current_size
                        ),
                    ));
                }
                (None, end)
            }
            DiskType::Dynamic | DiskType::Differencing => {
                // Blocks and metadata must end before the footer (or the file's end when
                // the footer is missing at the end).
                let limit = if file.is_block_device() {
                    file_len - FOOTER_SIZE
                } else {
                    found.end_offset.unwrap_or(file_len)
                };
                let sparse = open_sparse(&file, &footer, footer_at, limit)?;
                // Blocks past the end are damaged entries, not data to allocate after.
                let data_end = sparse
                    .bat
                    .iter()
                    .map(|e| e.load(std::sync::atomic::Ordering::Relaxed))
                    .filter(|&e| e != UNUSED)
                    .map(|e| u64::from(e) * SECTOR_SIZE + sparse.bitmap_bytes + sparse.block_size)
                    .filter(|&end| end <= limit)
                    .chain(sparse.metadata.iter().map(|r| r.end))
                    .max()
                    .unwrap_or(0);
                let next_block = match found.end_offset {
                    Some(end) if !file.is_block_device() => data_end.max(end),
                    _ => data_end,
                };
                (Some(sparse), next_block)
            }
        };
        let footer_offset = if file.is_block_device() {
            Some(file_len - FOOTER_SIZE)
        } else {
            found.end_offset
        };
        Ok(VhdLayer {
            disk_type: footer.disk_type,
            size: AtomicU64::new(footer.current_size),
            uuid: footer.uuid,
            timestamp: footer.timestamp,
            parent_timestamp_is_mtime: footer.parent_timestamp_is_mtime(),
            creator: footer.creator_app_name(),
            sparse,
            meta: Mutex::new(Meta {
                footer,
                next_block: next_block.div_ceil(SECTOR_SIZE) * SECTOR_SIZE,
                footer_offset,
            }),
            file,
        })
    }
}

fn open_sparse(file: &ImageFile, footer: &Footer, footer_at: u64, limit: u64) -> Result<Sparse> {
    let path = file.path();
    let header_offset = footer.data_offset;
    if header_offset < FOOTER_SIZE
        || header_offset
            .checked_add(HEADER_SIZE)
            .is_none_or(|end| end > limit)
    {
        return Err(Error::corrupt(
            path,
            "footer data offset",
            footer_at + footer::DATA_OFFSET_OFFSET,
            format!(
                "dynamic header at {header_offset} does not lie between the footer copy and the \
                 end of the file ({limit})"
            ),
        ));
    }
    let mut buf = vec![0u8; HEADER_SIZE as usize];
    file.read_at(&mut buf, header_offset)?;
    let header = DynamicHeader::parse(&buf, path, header_offset)?;
    if footer.disk_type == DiskType::Differencing && header.parent_uuid == footer.uuid {
        return Err(Error::corrupt(
            path,
            "parent unique id",
            header_offset + header::PARENT_UUID_OFFSET,
            "equals the disk's own unique id: the disk names itself as its parent",
        ));
    }
    let block_size = u64::from(header.block_size);
    let entries = header.max_table_entries;
    let needed = footer.current_size.div_ceil(block_size);
    let sane = MAX_OPEN_SIZE.div_ceil(block_size);
    if u64::from(entries) < needed || u64::from(entries) > sane {
        return Err(Error::corrupt(
            path,
            "max table entries",
            header_offset + header::MAX_TABLE_ENTRIES_OFFSET,
            format!(
                "{entries} entries: a disk of {} bytes in blocks of {block_size} needs \
                 {needed}, and more than {sane} would exceed {MAX_OPEN_SIZE} bytes",
                footer.current_size
            ),
        ));
    }
    let table_offset = header.table_offset;
    let table_len = bat_bytes(entries);
    let table_end = table_offset.checked_add(table_len);
    let overlaps_header = table_offset < header_offset + HEADER_SIZE
        && table_end.is_some_and(|end| end > header_offset);
    if table_offset < FOOTER_SIZE
        || table_offset % SECTOR_SIZE != 0
        || overlaps_header
        || table_end.is_none_or(|end| end > limit)
    {
        return Err(Error::corrupt(
            path,
            "table offset",
            header_offset + header::TABLE_OFFSET_OFFSET,
            format!(
                "BAT of {table_len} bytes at {table_offset} is unaligned, overlaps the header \
                 or lies past the end of the file ({limit})"
            ),
        ));
    }
    let mut raw = vec![0u8; (u64::from(entries) * 4) as usize];
    file.read_at(&mut raw, table_offset)?;
    let bat: Box<[AtomicU32]> = raw
        .chunks_exact(4)
        .map(|c| AtomicU32::new(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
        .collect();

    let mut metadata = vec![
        Region {
            start: 0,
            end: FOOTER_SIZE,
            name: "footer copy",
        },
        Region {
            start: header_offset,
            end: header_offset + HEADER_SIZE,
            name: "dynamic header",
        },
        Region {
            start: table_offset,
            end: table_offset + table_len,
            name: "BAT",
        },
    ];

    let batmap = match batmap::expected(footer) {
        None => None,
        Some(required) => Batmap::read(file, table_offset + table_len, entries, required, limit)?,
    };
    if let Some(batmap) = &batmap {
        metadata.push(Region {
            start: batmap.header_offset,
            end: batmap.header_offset + SECTOR_SIZE,
            name: "batmap header",
        });
        metadata.push(Region {
            start: batmap.map_offset,
            end: batmap.map_offset + u64::from(batmap.size_sectors) * SECTOR_SIZE,
            name: "batmap",
        });
    }

    let parent_candidates = if footer.disk_type == DiskType::Differencing {
        read_locators(file, &header, header_offset, limit, &mut metadata)?
    } else {
        Vec::new()
    };

    let sectors_per_block = (block_size / SECTOR_SIZE) as usize;
    let bitmap_bytes = (sectors_per_block as u64)
        .div_ceil(8)
        .div_ceil(SECTOR_SIZE)
        .max(1)
        * SECTOR_SIZE;
    let damaged = validate_bat(&bat, bitmap_bytes + block_size, limit, &metadata);

    Ok(Sparse {
        header_offset,
        block_size,
        sectors_per_block,
        bitmap_bytes,
        bat,
        bitmaps: BitmapCache::new(bitmap_bytes),
        batmap,
        metadata,
        parent_candidates,
        damaged,
        header,
    })
}

/// Read the parent locators of a differencing disk; returns the parent's candidate paths
/// (relative ones first, then absolute ones, then the header's parent name).
fn read_locators(
    file: &ImageFile,
    header: &DynamicHeader,
    header_offset: u64,
    limit: u64,
    metadata: &mut Vec<Region>,
) -> Result<Vec<String>> {
    let path = file.path();
    let mut relative = Vec::new();
    let mut absolute = Vec::new();
    for (i, entry) in header.locators.iter().enumerate() {
        if entry.code == PLATFORM_NONE {
            continue;
        }
        let field_offset = header_offset + LOCATORS_OFFSET + i as u64 * LOCATOR_ENTRY_SIZE;
        let reserved = entry.reserved_bytes();
        let length = u64::from(entry.data_length);
        let valid = reserved.is_some_and(|space| {
            length <= space
                && length <= MAX_LOCATOR_BYTES
                && entry.data_offset >= FOOTER_SIZE
                && entry
                    .data_offset
                    .checked_add(space)
                    .is_some_and(|end| end <= limit)
        });
        let Some(space) = reserved.filter(|_| valid) else {
            return Err(Error::corrupt(
                path,
                &format!("parent locator {i}"),
                field_offset,
                format!(
                    "data of {length} bytes in {} of space at {} does not fit in the file ({limit})",
                    entry.data_space, entry.data_offset
                ),
            ));
        };
        metadata.push(Region {
            start: entry.data_offset,
            end: entry.data_offset + space,
            name: "parent locator",
        });
        if !matches!(entry.code, PLATFORM_W2KU | PLATFORM_W2RU | PLATFORM_MACX) {
            continue;
        }
        let mut payload = vec![0u8; length as usize];
        file.read_at(&mut payload, entry.data_offset)?;
        if let Some(location) = locator::decode(entry.code, &payload) {
            let list = if location.starts_with('/') {
                &mut absolute
            } else {
                &mut relative
            };
            if !list.contains(&location) {
                list.push(location);
            }
        }
    }
    let name = locator::decode_parent_name(&header.parent_name);
    relative.append(&mut absolute);
    if !name.is_empty() && !name.contains('/') && !relative.contains(&name) {
        relative.push(name);
    }
    if relative.is_empty() {
        return Err(Error::corrupt(
            path,
            "parent locator",
            header_offset + LOCATORS_OFFSET,
            "differencing disk without a usable parent locator or parent name",
        ));
    }
    Ok(relative)
}

/// Every allocated block must lie inside the file, clear of the metadata and of the other
/// blocks. Entries that do not are not trusted: returned sorted by block, they make reads
/// and writes of their block fail (naming the entry) and `check` report them, while the
/// rest of the disk stays usable, as qemu and tapdisk treat such images.
fn validate_bat(
    bat: &[AtomicU32],
    block_bytes: u64,
    limit: u64,
    metadata: &[Region],
) -> Vec<DamagedEntry> {
    let mut damaged = Vec::new();
    let mut blocks: Vec<(u64, u32)> = Vec::new();
    for (i, entry) in bat.iter().enumerate() {
        let entry = entry.load(std::sync::atomic::Ordering::Relaxed);
        if entry == UNUSED {
            continue;
        }
        let block = i as u32;
        let start = u64::from(entry) * SECTOR_SIZE;
        let end = start + block_bytes;
        if end > limit {
            damaged.push(DamagedEntry {
                block,
                damage: Damage::PastEnd { limit },
            });
        } else if let Some(region) = metadata.iter().find(|r| start < r.end && end > r.start) {
            damaged.push(DamagedEntry {
                block,
                damage: Damage::IntoMetadata(region.clone()),
            });
        } else {
            blocks.push((start, block));
        }
    }
    blocks.sort_unstable();
    for pair in blocks.windows(2) {
        let (first_start, first) = pair[0];
        let (second_start, second) = pair[1];
        if second_start < first_start + block_bytes {
            // Writing either would overwrite the other: neither is trusted.
            damaged.push(DamagedEntry {
                block: second,
                damage: Damage::Overlaps { other: first },
            });
            damaged.push(DamagedEntry {
                block: first,
                damage: Damage::Overlaps { other: second },
            });
        }
    }
    damaged.sort_by_key(|d| d.block);
    damaged.dedup_by_key(|d| d.block);
    damaged
}
