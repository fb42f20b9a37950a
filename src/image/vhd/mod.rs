//! VHD (Microsoft Virtual Hard Disk): fixed, dynamic and differencing images, with
//! blktap's batmap extension, compatible with what qemu-img, vhd-util/tapdisk and Windows
//! make.
//!
//! Files: `footer` (footer, checksum, geometry, clock), `header` (dynamic header and parent
//! locator entries), `locator` (locator payloads, parent name), `bitmap` (sector bitmaps
//! and their lock-free bounded cache), `batmap` (blktap's full-block map), `open`
//! (parsing and validating a file's layout), `write` (allocation, writes, discard, resize),
//! `create`, `check`.
//!
//! Memory: the BAT is held in full as atomics, 4 bytes per block (a 2 TiB VHD with 2 MiB
//! blocks: 4 MiB); the batmap one bit per block (128 KiB); sector bitmaps only in the
//! bounded [`bitmap::BitmapCache`] (at most 4 MiB).

mod batmap;
mod bitmap;
mod check;
mod create;
mod footer;
mod header;
mod locator;
mod open;
mod write;

use std::any::Any;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    BackingRef, CheckReport, Extent, Format, ImageFile, Layer, Mapping, ReadBelow, SECTOR_SIZE,
};
use crate::error::{Error, Result};

pub use create::create;
pub use footer::{DiskType, MAX_CREATE_SIZE};

use batmap::Batmap;
use bitmap::BitmapCache;
use footer::Footer;
use header::DynamicHeader;

/// BAT value of a block that is not allocated.
const UNUSED: u32 = u32::MAX;

/// A VHD carries the `conectix` cookie in its footer (at the end; dynamic images also keep
/// a copy at offset 0).
pub fn probe(head: &[u8], tail: &[u8]) -> bool {
    head.starts_with(footer::FOOTER_COOKIE) || tail.starts_with(footer::FOOTER_COOKIE)
}

pub fn open(file: ImageFile) -> Result<Arc<dyn Layer>> {
    Ok(Arc::new(VhdLayer::open(file)?))
}

/// One metadata structure's place in the file, for overlap and leak checks.
#[derive(Debug, Clone)]
struct Region {
    start: u64,
    end: u64,
    name: &'static str,
}

/// Why a BAT entry is not trusted (see `open::validate_bat`).
#[derive(Debug, Clone)]
enum Damage {
    /// The block ends past the file's data (which ends at `limit`).
    PastEnd { limit: u64 },
    /// The block overlaps a metadata structure.
    IntoMetadata(Region),
    /// The block overlaps the block of entry `other`.
    Overlaps { other: u32 },
}

#[derive(Debug, Clone)]
struct DamagedEntry {
    block: u32,
    damage: Damage,
}

/// What dynamic and differencing disks add to a fixed one.
struct Sparse {
    header: DynamicHeader,
    header_offset: u64,
    block_size: u64,
    sectors_per_block: usize,
    /// Bytes of a block's bitmap in the file (sector padded).
    bitmap_bytes: u64,
    /// Sector offsets of the blocks, `UNUSED` when not allocated.
    bat: Box<[AtomicU32]>,
    bitmaps: BitmapCache,
    batmap: Option<Batmap>,
    /// Header, BAT, batmap and parent locators.
    metadata: Vec<Region>,
    /// Parent locations, relative ones first.
    parent_candidates: Vec<String>,
    /// Untrusted BAT entries, sorted by block (empty for a sound image).
    damaged: Vec<DamagedEntry>,
}

impl Sparse {
    /// The error for block `block` when its BAT entry (value `entry`) is not trusted.
    fn damage(&self, path: &std::path::Path, block: u32, entry: u32) -> Option<Error> {
        if self.damaged.is_empty() {
            return None;
        }
        let index = self
            .damaged
            .binary_search_by_key(&block, |d| d.block)
            .ok()?;
        let start = u64::from(entry) * SECTOR_SIZE;
        let end = start + self.bitmap_bytes + self.block_size;
        let message = match &self.damaged[index].damage {
            Damage::PastEnd { limit } => {
                format!("block at {start}..{end} lies past the end of the file's data ({limit})")
            }
            Damage::IntoMetadata(region) => format!(
                "block at {start}..{end} overlaps the {} at {}..{}",
                region.name, region.start, region.end
            ),
            Damage::Overlaps { other } => {
                format!("block at {start}..{end} overlaps block {other}")
            }
        };
        Some(Error::corrupt(
            path,
            &format!("BAT entry {block}"),
            self.header.table_offset + u64::from(block) * 4,
            message,
        ))
    }

    /// The BAT entry of `block`: `UNUSED`, or a trusted sector offset.
    fn entry(&self, path: &std::path::Path, block: u32) -> Result<u32> {
        let entry = self
            .bat
            .get(block as usize)
            .map(|e| e.load(Ordering::Acquire))
            .ok_or_else(|| {
                Error::invalid(format!("block {block} lies past the BAT")).with_path(path)
            })?;
        if entry != UNUSED {
            if let Some(error) = self.damage(path, block, entry) {
                return Err(error);
            }
        }
        Ok(entry)
    }
}

/// State changed by writers, serialized by the allocation lock.
struct Meta {
    footer: Footer,
    /// Where the next block's bitmap may start (blocks are then aligned; see `write`).
    next_block: u64,
    /// Where the footer is on disk now: after the last block in a regular file, at the
    /// end of a block device; `None` after a crash left no footer at the end.
    footer_offset: Option<u64>,
}

pub struct VhdLayer {
    file: ImageFile,
    disk_type: DiskType,
    size: AtomicU64,
    uuid: [u8; 16],
    timestamp: u32,
    /// The child records the parent's mtime (blktap), not its footer time stamp.
    parent_timestamp_is_mtime: bool,
    creator: String,
    sparse: Option<Sparse>,
    meta: Mutex<Meta>,
}

impl VhdLayer {
    pub fn disk_type(&self) -> DiskType {
        self.disk_type
    }

    /// The footer's unique id, which children record as their parent's.
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// The footer's time stamp (seconds since 2000-01-01 UTC).
    pub fn timestamp(&self) -> u32 {
        self.timestamp
    }

    /// Block size of a dynamic or differencing disk.
    pub fn block_size(&self) -> Option<u64> {
        self.sparse.as_ref().map(|s| s.block_size)
    }

    pub fn has_batmap(&self) -> bool {
        self.sparse.as_ref().is_some_and(|s| s.batmap.is_some())
    }

    /// How unstored sectors read: the parent's bytes, or zeros in a dynamic disk.
    fn unstored(&self) -> Mapping {
        if self.disk_type == DiskType::Differencing {
            Mapping::Parent
        } else {
            Mapping::Zero
        }
    }

    fn read_bitmap(&self, sparse: &Sparse, entry: u32) -> Result<Box<[u8]>> {
        let mut bits = vec![0u8; sparse.bitmap_bytes as usize].into_boxed_slice();
        self.file
            .read_at(&mut bits, u64::from(entry) * SECTOR_SIZE)?;
        Ok(bits)
    }

    /// Map within one block, as far as the BAT and batmap (always in memory) tell.
    fn map_block(&self, sparse: &Sparse, offset: u64, len: u64) -> Result<BlockMapping> {
        let block = offset / sparse.block_size;
        let within = offset % sparse.block_size;
        let len = len.min(sparse.block_size - within);
        let entry = sparse.entry(self.file.path(), block as u32)?;
        if entry == UNUSED {
            return Ok(BlockMapping::Known(Extent {
                offset,
                len,
                mapping: self.unstored(),
            }));
        }
        let data_start = u64::from(entry) * SECTOR_SIZE + sparse.bitmap_bytes;
        let data = Mapping::Data {
            file_offset: data_start + within,
            shared: false,
        };
        let block = block as u32;
        if sparse.batmap.as_ref().is_some_and(|b| b.is_full(block)) {
            return Ok(BlockMapping::Known(Extent {
                offset,
                len,
                mapping: data,
            }));
        }
        Ok(BlockMapping::NeedsBitmap(BitmapQuery {
            block,
            entry,
            offset,
            within,
            len,
            stored: data,
            unstored: self.unstored(),
        }))
    }

    fn parent_name(&self) -> Option<String> {
        self.sparse
            .as_ref()
            .filter(|_| self.disk_type == DiskType::Differencing)
            .map(|s| locator::decode_parent_name(&s.header.parent_name))
    }
}

/// A fixed disk stores every byte at its own offset.
fn fixed_extent(offset: u64, len: u64) -> Extent {
    Extent {
        offset,
        len,
        mapping: Mapping::Data {
            file_offset: offset,
            shared: false,
        },
    }
}

/// What the BAT says about a range within one block.
enum BlockMapping {
    Known(Extent),
    /// The block is allocated but not known full: its sector bitmap decides.
    NeedsBitmap(BitmapQuery),
}

/// A range of an allocated block, to be answered from the block's sector bitmap.
struct BitmapQuery {
    block: u32,
    /// The block's BAT entry: where its bitmap starts, in sectors.
    entry: u32,
    offset: u64,
    /// `offset` within the block.
    within: u64,
    /// At most to the block's end.
    len: u64,
    stored: Mapping,
    unstored: Mapping,
}

impl BitmapQuery {
    /// The extent from `offset` over which the bitmap says the same.
    fn answer(&self, bits: &[u8]) -> Extent {
        let sector = (self.within / SECTOR_SIZE) as usize;
        let last = (self.within + self.len).div_ceil(SECTOR_SIZE) as usize;
        let (stored, run) = bitmap::run(bits, sector, last - sector);
        let run_end = (sector + run) as u64 * SECTOR_SIZE;
        Extent {
            offset: self.offset,
            len: (run_end - self.within).min(self.len),
            mapping: if stored { self.stored } else { self.unstored },
        }
    }
}

fn uuid_string(bytes: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*bytes).hyphenated().to_string()
}

impl Layer for VhdLayer {
    fn format(&self) -> Format {
        Format::Vhd
    }

    fn file(&self) -> &ImageFile {
        &self.file
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn backing(&self) -> Option<BackingRef> {
        let sparse = self.sparse.as_ref()?;
        if self.disk_type != DiskType::Differencing {
            return None;
        }
        // blktap's convention: a nil parent id means the parent is a raw file.
        let format = if sparse.header.has_parent_uuid() {
            Format::Vhd
        } else {
            Format::Raw
        };
        Some(BackingRef {
            paths: sparse.parent_candidates.clone(),
            format: Some(format),
            field: "parent locators",
            field_offset: sparse.header_offset + header::LOCATORS_OFFSET,
        })
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let Some(sparse) = &self.sparse else {
            return Ok(fixed_extent(offset, len));
        };
        match self.map_block(sparse, offset, len)? {
            BlockMapping::Known(extent) => Ok(extent),
            BlockMapping::NeedsBitmap(query) => sparse.bitmaps.with(
                query.block,
                || self.read_bitmap(sparse, query.entry),
                |bits| query.answer(bits),
            ),
        }
    }

    fn map_cached(&self, offset: u64, len: u64) -> Result<Option<Extent>> {
        let Some(sparse) = &self.sparse else {
            return Ok(Some(fixed_extent(offset, len)));
        };
        Ok(match self.map_block(sparse, offset, len)? {
            BlockMapping::Known(extent) => Some(extent),
            BlockMapping::NeedsBitmap(query) => sparse
                .bitmaps
                .with_cached(query.block, |bits| query.answer(bits)),
        })
    }

    fn write(&self, offset: u64, data: &[u8], below: &dyn ReadBelow) -> Result<()> {
        self.write_bytes(offset, data, below)
    }

    fn discard(&self, offset: u64, len: u64, below: &dyn ReadBelow) -> Result<()> {
        self.discard_range(offset, len, below)
    }

    fn flush(&self) -> Result<()> {
        self.file.sync()
    }

    fn check(&self) -> Result<CheckReport> {
        check::check(self)
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_to(new_size)
    }

    fn check_parent(&self, parent: &dyn Layer) -> Result<()> {
        let Some(sparse) = &self.sparse else {
            return Ok(());
        };
        if self.disk_type != DiskType::Differencing {
            return Ok(());
        }
        let path = self.file.path();
        let header_offset = sparse.header_offset;
        let recorded = sparse.header.parent_uuid;
        let Some(parent_vhd) = parent.as_any().downcast_ref::<VhdLayer>() else {
            if sparse.header.has_parent_uuid() {
                return Err(Error::corrupt(
                    path,
                    "parent unique id",
                    header_offset + header::PARENT_UUID_OFFSET,
                    format!(
                        "records parent {} but the parent {} is a {} file, not a VHD",
                        uuid_string(&recorded),
                        parent.file().path().display(),
                        parent.format()
                    ),
                ));
            }
            return Ok(());
        };
        if recorded != parent_vhd.uuid {
            return Err(Error::corrupt(
                path,
                "parent unique id",
                header_offset + header::PARENT_UUID_OFFSET,
                format!(
                    "records parent {} but {} has unique id {}",
                    uuid_string(&recorded),
                    parent.file().path().display(),
                    uuid_string(&parent_vhd.uuid)
                ),
            ));
        }
        // Microsoft's convention (and ferrotap's): the parent's footer time stamp. vhd-util
        // records the parent file's mtime instead and tapdisk no longer checks it (hiding
        // or coalescing a parent changes its mtime), so only the id binds its children.
        if !self.parent_timestamp_is_mtime && sparse.header.parent_timestamp != parent_vhd.timestamp
        {
            return Err(Error::corrupt(
                path,
                "parent time stamp",
                header_offset + header::PARENT_TIMESTAMP_OFFSET,
                format!(
                    "records {} but the footer of {} says {}",
                    sparse.header.parent_timestamp,
                    parent.file().path().display(),
                    parent_vhd.timestamp
                ),
            ));
        }
        Ok(())
    }

    fn cluster_size(&self) -> u64 {
        self.block_size().unwrap_or(SECTOR_SIZE)
    }

    fn details(&self) -> serde_json::Value {
        let mut details = serde_json::json!({
            "subformat": self.disk_type.name(),
            "uuid": uuid_string(&self.uuid),
            "creator-app": self.creator,
            // blktap's flag for chain nodes no VM uses directly (vhd-util set-field hidden).
            "hidden": self.meta.lock().footer.blktap_hidden(),
        });
        if let Some(sparse) = &self.sparse {
            details["block-size"] = sparse.block_size.into();
            details["max-table-entries"] = sparse.header.max_table_entries.into();
            details["batmap"] = match &sparse.batmap {
                Some(batmap) => serde_json::json!({
                    "present": true,
                    "version": format!("{}.{}", batmap.version >> 16, batmap.version & 0xffff),
                }),
                None => serde_json::json!({ "present": false }),
            };
            if self.disk_type == DiskType::Differencing {
                details["parent-uuid"] = uuid_string(&sparse.header.parent_uuid).into();
                details["parent-name"] = self.parent_name().unwrap_or_default().into();
            }
        }
        details
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
