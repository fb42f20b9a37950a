//! The 1024-byte dynamic disk header of dynamic and differencing VHDs.
//!
//! Layout (big-endian): cookie 0..8 ("cxsparse"), data offset 8 (unused, all ones),
//! table offset 16, header version 24, max table entries 28, block size 32, checksum 36,
//! parent unique id 40..56, parent time stamp 56, reserved 60, parent unicode name
//! 64..576 (UTF-16BE), eight parent locator entries of 24 bytes from 576, reserved 768..1024.
//! A locator entry: platform code 0, platform data space 4, data length 8, reserved 12,
//! data offset 16.

use std::path::Path;

use super::footer::{be_u32, be_u64, checksum, put_u32, put_u64};
use crate::error::{Error, Result};

pub const HEADER_SIZE: u64 = 1024;
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
const HEADER_VERSION: u32 = 0x0001_0000;
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// Block sizes ferrotap accepts: powers of two in this range (the bitmap of a block then
/// stays at most 64 KiB).
pub const MIN_BLOCK_SIZE: u64 = 4096;
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;

pub const CHECKSUM_OFFSET: usize = 36;
pub const TABLE_OFFSET_OFFSET: u64 = 16;
pub const MAX_TABLE_ENTRIES_OFFSET: u64 = 28;
pub const BLOCK_SIZE_OFFSET: u64 = 32;
pub const PARENT_UUID_OFFSET: u64 = 40;
pub const PARENT_TIMESTAMP_OFFSET: u64 = 56;
pub const PARENT_NAME_OFFSET: u64 = 64;
pub const LOCATORS_OFFSET: u64 = 576;
pub const LOCATOR_ENTRY_SIZE: u64 = 24;
pub const LOCATOR_COUNT: usize = 8;

/// Platform codes of parent locators.
pub const PLATFORM_NONE: u32 = 0;
pub const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
pub const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
pub const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");
const PLATFORM_WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
const PLATFORM_WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
const PLATFORM_MAC: u32 = u32::from_be_bytes(*b"Mac ");

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocatorEntry {
    pub code: u32,
    /// Space reserved for the locator data: sectors per the specification, bytes as
    /// blktap and Windows actually write it.
    pub data_space: u32,
    pub data_length: u32,
    pub data_offset: u64,
}

impl LocatorEntry {
    /// Bytes reserved in the file, with blktap's reading of `data_space` (values under 512
    /// are sectors, multiples of 512 are bytes); `None` when it is neither.
    pub fn reserved_bytes(&self) -> Option<u64> {
        let space = u64::from(self.data_space);
        if space < 512 {
            Some(space * 512)
        } else if space.is_multiple_of(512) {
            Some(space)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    pub parent_name: [u8; 512],
    pub locators: [LocatorEntry; LOCATOR_COUNT],
}

impl DynamicHeader {
    pub fn new(table_offset: u64, max_table_entries: u32, block_size: u32) -> DynamicHeader {
        DynamicHeader {
            table_offset,
            max_table_entries,
            block_size,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: [0; 512],
            locators: [LocatorEntry::default(); LOCATOR_COUNT],
        }
    }

    /// Parse and validate the header read from `at` in `path`. Offsets and sizes are
    /// checked against the file later, when the whole layout is known.
    pub fn parse(buf: &[u8], path: &Path, at: u64) -> Result<DynamicHeader> {
        if buf.len() < HEADER_SIZE as usize || &buf[..8] != HEADER_COOKIE {
            return Err(Error::corrupt(
                path,
                "header cookie",
                at,
                "no 'cxsparse' cookie where the footer's data offset points",
            ));
        }
        let stored = be_u32(buf, CHECKSUM_OFFSET);
        let computed = checksum(&buf[..HEADER_SIZE as usize], CHECKSUM_OFFSET);
        if stored != computed {
            return Err(Error::corrupt(
                path,
                "header checksum",
                at + CHECKSUM_OFFSET as u64,
                format!("stored {stored:#010x}, computed {computed:#010x}"),
            ));
        }
        let version = be_u32(buf, 24);
        if version != HEADER_VERSION {
            return Err(Error::corrupt(
                path,
                "header version",
                at + 24,
                format!("version {version:#010x} is not 1.0"),
            ));
        }
        let block_size = be_u32(buf, BLOCK_SIZE_OFFSET as usize);
        let block = u64::from(block_size);
        if !block.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block) {
            return Err(Error::corrupt(
                path,
                "block size",
                at + BLOCK_SIZE_OFFSET,
                format!(
                    "block size {block} is not a power of two between {MIN_BLOCK_SIZE} and \
                     {MAX_BLOCK_SIZE}"
                ),
            ));
        }
        let mut locators = [LocatorEntry::default(); LOCATOR_COUNT];
        for (i, entry) in locators.iter_mut().enumerate() {
            let base = (LOCATORS_OFFSET + i as u64 * LOCATOR_ENTRY_SIZE) as usize;
            *entry = LocatorEntry {
                code: be_u32(buf, base),
                data_space: be_u32(buf, base + 4),
                data_length: be_u32(buf, base + 8),
                data_offset: be_u64(buf, base + 16),
            };
            match entry.code {
                PLATFORM_NONE | PLATFORM_W2KU | PLATFORM_W2RU | PLATFORM_MACX | PLATFORM_WI2R
                | PLATFORM_WI2K | PLATFORM_MAC => {}
                other => {
                    return Err(Error::corrupt(
                        path,
                        &format!("parent locator {i} platform code"),
                        at + base as u64,
                        format!("unknown platform code {other:#010x}"),
                    ))
                }
            }
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&buf[40..56]);
        let mut parent_name = [0u8; 512];
        let name_at = PARENT_NAME_OFFSET as usize;
        parent_name.copy_from_slice(&buf[name_at..name_at + 512]);
        Ok(DynamicHeader {
            table_offset: be_u64(buf, TABLE_OFFSET_OFFSET as usize),
            max_table_entries: be_u32(buf, MAX_TABLE_ENTRIES_OFFSET as usize),
            block_size,
            parent_uuid,
            parent_timestamp: be_u32(buf, PARENT_TIMESTAMP_OFFSET as usize),
            parent_name,
            locators,
        })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE as usize] {
        let mut buf = [0u8; HEADER_SIZE as usize];
        buf[..8].copy_from_slice(HEADER_COOKIE);
        put_u64(&mut buf, 8, u64::MAX);
        put_u64(&mut buf, TABLE_OFFSET_OFFSET as usize, self.table_offset);
        put_u32(&mut buf, 24, HEADER_VERSION);
        put_u32(
            &mut buf,
            MAX_TABLE_ENTRIES_OFFSET as usize,
            self.max_table_entries,
        );
        put_u32(&mut buf, BLOCK_SIZE_OFFSET as usize, self.block_size);
        buf[40..56].copy_from_slice(&self.parent_uuid);
        put_u32(
            &mut buf,
            PARENT_TIMESTAMP_OFFSET as usize,
            self.parent_timestamp,
        );
        let name_at = PARENT_NAME_OFFSET as usize;
        buf[name_at..name_at + 512].copy_from_slice(&self.parent_name);
        for (i, entry) in self.locators.iter().enumerate() {
            let base = (LOCATORS_OFFSET + i as u64 * LOCATOR_ENTRY_SIZE) as usize;
            put_u32(&mut buf, base, entry.code);
            put_u32(&mut buf, base + 4, entry.data_space);
            put_u32(&mut buf, base + 8, entry.data_length);
            put_u64(&mut buf, base + 16, entry.data_offset);
        }
        let sum = checksum(&buf, CHECKSUM_OFFSET);
        put_u32(&mut buf, CHECKSUM_OFFSET, sum);
        buf
    }

    pub fn has_parent_uuid(&self) -> bool {
        self.parent_uuid != [0; 16]
    }
}
