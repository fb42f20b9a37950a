//! blktap's batmap extension: one bit per block, set when every sector of the block is
//! allocated, so tapdisk can skip reading that block's bitmap.
//!
//! vhd-util places a one-sector header right after the (sector-padded) BAT, then the map
//! in the following sectors. Header (big-endian): cookie "tdbatmap" 0..8, map offset 8
//! (bytes), map size 16 (sectors), version 20, checksum 24 (one's complement of the byte
//! sum of all map sectors; bytes are signed chars in version 1.1, unsigned from 1.2).
//! Bits are most significant first, like the sector bitmaps.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use super::footer::{be_u32, be_u64, put_u32, put_u64, Footer};
use crate::error::{Error, Result};
use crate::image::{ImageFile, SECTOR_SIZE};

pub const BATMAP_COOKIE: &[u8; 8] = b"tdbatmap";
pub const BATMAP_VERSION_1_1: u32 = 0x0001_0001;
pub const BATMAP_VERSION: u32 = 0x0001_0002;
const HEADER_CHECKSUM_OFFSET: u64 = 24;
/// Creator versions of blktap: from 1.2 every VHD has a batmap; 1.1 may have one.
const CREATOR_VERSION_NO_BATMAP: u32 = 0x0000_0001;
const CREATOR_VERSION_BATMAP_ALWAYS: u32 = 0x0001_0002;
/// The creator version ferrotap writes with a batmap (vhd-util's current, 1.3), and the
/// one it writes without (1.0: blktap then looks for a batmap header and finds none).
pub const CREATOR_VERSION_WITH_BATMAP: u32 = 0x0001_0003;
pub const CREATOR_VERSION_WITHOUT_BATMAP: u32 = 0x0001_0000;

/// Sectors a map for `entries` blocks takes (at least one, as vhd-util makes it).
pub fn map_sectors(entries: u32) -> u64 {
    (u64::from(entries).div_ceil(8))
        .div_ceil(SECTOR_SIZE)
        .max(1)
}

pub struct Batmap {
    pub header_offset: u64,
    pub map_offset: u64,
    pub size_sectors: u32,
    pub version: u32,
    bits: Box<[AtomicU8]>,
    /// Byte sum of the map as the checksum counts it; changed only under the image lock.
    sum: AtomicU32,
}

/// Whether blktap would look for a batmap in a VHD with this footer, and whether it must
/// find one (`Some(true)`), may find one (`Some(false)`), or never has one (`None`).
pub fn expected(footer: &Footer) -> Option<bool> {
    if !footer.created_by_blktap() || footer.creator_version <= CREATOR_VERSION_NO_BATMAP {
        None
    } else {
        Some(footer.creator_version >= CREATOR_VERSION_BATMAP_ALWAYS)
    }
}

fn checksum_byte(version: u32, byte: u8) -> u32 {
    if version == BATMAP_VERSION_1_1 {
        i32::from(byte as i8) as u32
    } else {
        u32::from(byte)
    }
}

impl Batmap {
    /// An empty batmap for `entries` blocks with its header at `header_offset`.
    pub fn new(header_offset: u64, entries: u32) -> Batmap {
        let sectors = map_sectors(entries);
        let bytes = (sectors * SECTOR_SIZE) as usize;
        Batmap {
            header_offset,
            map_offset: header_offset + SECTOR_SIZE,
            size_sectors: sectors as u32,
            version: BATMAP_VERSION,
            bits: (0..bytes).map(|_| AtomicU8::new(0)).collect(),
            sum: AtomicU32::new(0),
        }
    }

    /// Read the batmap whose header sits at `header_offset`. `required`: the footer says
    /// there must be one; otherwise a missing cookie means there is none (`Ok(None)`).
    /// `limit` is where the map must end (the footer's offset).
    pub fn read(
        file: &ImageFile,
        header_offset: u64,
        entries: u32,
        required: bool,
        limit: u64,
    ) -> Result<Option<Batmap>> {
        let path = file.path();
        if header_offset + SECTOR_SIZE > limit {
            if required {
                return Err(Error::corrupt(
                    path,
                    "batmap header",
                    header_offset,
                    "the footer announces a batmap but the file ends before its header",
                ));
            }
            return Ok(None);
        }
        let mut header = [0u8; SECTOR_SIZE as usize];
        file.read_at(&mut header, header_offset)?;
        if &header[..8] != BATMAP_COOKIE {
            if required {
                return Err(Error::corrupt(
                    path,
                    "batmap cookie",
                    header_offset,
                    "no 'tdbatmap' cookie after the BAT, though the creator (blktap 1.2 or \
                     later) always writes a batmap",
                ));
            }
            return Ok(None);
        }
        let map_offset = be_u64(&header, 8);
        let size_sectors = be_u32(&header, 16);
        let version = be_u32(&header, 20);
        let stored = be_u32(&header, HEADER_CHECKSUM_OFFSET as usize);
        if version > BATMAP_VERSION {
            return Err(Error::corrupt(
                path,
                "batmap version",
                header_offset + 20,
                format!("version {version:#010x} is newer than 1.2"),
            ));
        }
        let needed = map_sectors(entries);
        if size_sectors == 0 || u64::from(size_sectors) > needed + 8 {
            return Err(Error::corrupt(
                path,
                "batmap size",
                header_offset + 16,
                format!("{size_sectors} sectors for {entries} blocks (expected {needed})"),
            ));
        }
        let map_bytes = u64::from(size_sectors) * SECTOR_SIZE;
        if !map_offset.is_multiple_of(SECTOR_SIZE)
            || map_offset < header_offset + SECTOR_SIZE
            || map_offset
                .checked_add(map_bytes)
                .is_none_or(|end| end > limit)
        {
            return Err(Error::corrupt(
                path,
                "batmap offset",
                header_offset + 8,
                format!(
                    "map at {map_offset} ({map_bytes} bytes) is unaligned, overlaps its header \
                     or lies past the end of the data ({limit})"
                ),
            ));
        }
        let mut map = vec![0u8; map_bytes as usize];
        file.read_at(&mut map, map_offset)?;
        let sum = map
            .iter()
            .fold(0u32, |s, &b| s.wrapping_add(checksum_byte(version, b)));
        if !sum != stored {
            return Err(Error::corrupt(
                path,
                "batmap checksum",
                header_offset + HEADER_CHECKSUM_OFFSET,
                format!("stored {stored:#010x}, computed {:#010x}", !sum),
            ));
        }
        Ok(Some(Batmap {
            header_offset,
            map_offset,
            size_sectors,
            version,
            bits: map.into_iter().map(AtomicU8::new).collect(),
            sum: AtomicU32::new(sum),
        }))
    }

    pub fn checksum(&self) -> u32 {
        !self.sum.load(Ordering::Relaxed)
    }

    pub fn header_bytes(&self) -> [u8; SECTOR_SIZE as usize] {
        let mut header = [0u8; SECTOR_SIZE as usize];
        header[..8].copy_from_slice(BATMAP_COOKIE);
        put_u64(&mut header, 8, self.map_offset);
        put_u32(&mut header, 16, self.size_sectors);
        put_u32(&mut header, 20, self.version);
        put_u32(
            &mut header,
            HEADER_CHECKSUM_OFFSET as usize,
            self.checksum(),
        );
        header
    }

    /// The map bytes `[start, start+len)` as they are in memory.
    pub fn map_bytes(&self, start: usize, len: usize) -> Vec<u8> {
        self.bits[start..start + len]
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .collect()
    }

    pub fn map_len(&self) -> usize {
        self.bits.len()
    }

    /// Block `block` is marked fully allocated. Lock-free.
    pub fn is_full(&self, block: u32) -> bool {
        let byte = block as usize >> 3;
        match self.bits.get(byte) {
            Some(b) => b.load(Ordering::Acquire) & (0x80 >> (block & 7)) != 0,
            None => false,
        }
    }

    /// Mark `block` full in memory (callers hold the image lock); returns the index of the
    /// changed byte, or `None` when nothing changed or the map does not cover the block.
    pub fn mark_full(&self, block: u32) -> Option<usize> {
        let byte = block as usize >> 3;
        let cell = self.bits.get(byte)?;
        let old = cell.load(Ordering::Acquire);
        let new = old | (0x80 >> (block & 7));
        if new == old {
            return None;
        }
        cell.store(new, Ordering::Release);
        let sum = self.sum.load(Ordering::Relaxed);
        self.sum.store(
            sum.wrapping_sub(checksum_byte(self.version, old))
                .wrapping_add(checksum_byte(self.version, new)),
            Ordering::Relaxed,
        );
        Some(byte)
    }

    /// Write the map sector holding byte `byte`, then the header with the new checksum.
    pub fn write_change(&self, file: &ImageFile, byte: usize) -> Result<()> {
        let sector = byte / SECTOR_SIZE as usize * SECTOR_SIZE as usize;
        let bytes = self.map_bytes(sector, SECTOR_SIZE as usize);
        file.write_at(&bytes, self.map_offset + sector as u64)?;
        file.write_at(&self.header_bytes(), self.header_offset)
    }

    /// Write header and whole map (at creation).
    pub fn write_all(&self, file: &ImageFile) -> Result<()> {
        file.write_at(&self.map_bytes(0, self.map_len()), self.map_offset)?;
        file.write_at(&self.header_bytes(), self.header_offset)
    }
}

/// Re-read the on-disk batmap checksum for `img check`.
pub fn verify_on_disk(file: &ImageFile, batmap: &Batmap) -> Result<Option<String>> {
    let mut map = vec![0u8; batmap.map_len()];
    file.read_at(&mut map, batmap.map_offset)?;
    let mut header = [0u8; SECTOR_SIZE as usize];
    file.read_at(&mut header, batmap.header_offset)?;
    let stored = be_u32(&header, HEADER_CHECKSUM_OFFSET as usize);
    let sum = map.iter().fold(0u32, |s, &b| {
        s.wrapping_add(checksum_byte(batmap.version, b))
    });
    Ok((!sum != stored).then(|| format!("stored {stored:#010x}, computed {:#010x}", !sum)))
}
