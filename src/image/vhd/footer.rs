//! The 512-byte VHD footer ("hard disk footer" of the Microsoft VHD specification), its
//! checksum, the CHS geometry and the VHD clock.
//!
//! Layout (big-endian): cookie 0..8, features 8, file format version 12, data offset 16,
//! time stamp 24, creator application 28..32, creator version 32, creator host OS 36,
//! original size 40, current size 48, disk geometry 56, disk type 60, checksum 64,
//! unique id 68..84, saved state 84, reserved 85..512.

use std::path::Path;

use crate::error::{Error, Result};

pub const FOOTER_SIZE: u64 = 512;
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// "Reserved" feature bit, which the specification says is always set.
const FEATURES_RESERVED: u32 = 2;
const FORMAT_VERSION: u32 = 0x0001_0000;
/// Data offset of a fixed disk (there is no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Largest disk ferrotap creates or grows to: qemu's and tapdisk's VHD limit (2040 GiB).
pub const MAX_CREATE_SIZE: u64 = 2040 << 30;
/// Largest disk ferrotap opens (some tools make VHDs of exactly 2 TiB).
pub const MAX_OPEN_SIZE: u64 = 2 << 40;
/// Seconds from the Unix epoch to the VHD epoch (2000-01-01 00:00:00 UTC).
const VHD_EPOCH: u64 = 946_684_800;

pub const CHECKSUM_OFFSET: usize = 64;
pub const DISK_TYPE_OFFSET: u64 = 60;
pub const DATA_OFFSET_OFFSET: u64 = 16;
pub const CURRENT_SIZE_OFFSET: u64 = 48;
const FORMAT_VERSION_OFFSET: u64 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    pub data_offset: u64,
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_os: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: u32,
    pub disk_type: DiskType,
    pub uuid: [u8; 16],
    pub saved_state: u8,
    /// Bytes 85..512: reserved by the specification; blktap keeps its "hidden" flag in
    /// the first one. Preserved when the footer is rewritten.
    pub reserved: [u8; RESERVED_LEN],
}

const RESERVED_AT: usize = 85;
const RESERVED_LEN: usize = FOOTER_SIZE as usize - RESERVED_AT;
/// Creator host OS ferrotap writes. blktap writes 0 and records the parent file's mtime as
/// the parent time stamp; this marks children that record the parent footer's time stamp
/// instead (Microsoft's convention), which `check_parent` can then verify.
pub const CREATOR_OS_FERROTAP: u32 = u32::from_be_bytes(*b"Lnx ");

pub fn be_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_be_bytes(b)
}

pub fn be_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

pub fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

pub fn put_u64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// The VHD checksum: one's complement of the byte sum, the checksum field counted as zero.
pub fn checksum(buf: &[u8], checksum_at: usize) -> u32 {
    let sum = buf.iter().enumerate().fold(0u32, |sum, (i, &b)| {
        if (checksum_at..checksum_at + 4).contains(&i) {
            sum
        } else {
            sum.wrapping_add(u32::from(b))
        }
    });
    !sum
}

impl Footer {
    /// A new footer for a disk of `size` bytes.
    pub fn new(disk_type: DiskType, size: u64, creator_version: u32) -> Footer {
        Footer {
            features: FEATURES_RESERVED,
            data_offset: if disk_type == DiskType::Fixed {
                NO_DATA_OFFSET
            } else {
                FOOTER_SIZE
            },
            timestamp: vhd_time_now(),
            // "tap\0": the creator XCP-ng's vhd-util writes. qemu then takes the size from
            // `current_size` rather than from the CHS geometry, and blktap looks for the
            // batmap when the creator version is 1.2 or later.
            creator_app: *b"tap\0",
            creator_version,
            creator_os: CREATOR_OS_FERROTAP,
            original_size: size,
            current_size: size,
            geometry: chs_geometry(size),
            disk_type,
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            saved_state: 0,
            reserved: [0; RESERVED_LEN],
        }
    }

    /// Parse and validate a footer read from `at` in `path`.
    pub fn parse(buf: &[u8], path: &Path, at: u64) -> Result<Footer> {
        if buf.len() < FOOTER_SIZE as usize || &buf[..8] != FOOTER_COOKIE {
            return Err(Error::corrupt(
                path,
                "footer cookie",
                at,
                "no 'conectix' cookie: not a VHD footer",
            ));
        }
        let stored = be_u32(buf, CHECKSUM_OFFSET);
        let computed = checksum(&buf[..FOOTER_SIZE as usize], CHECKSUM_OFFSET);
        if stored != computed {
            return Err(Error::corrupt(
                path,
                "footer checksum",
                at + CHECKSUM_OFFSET as u64,
                format!("stored {stored:#010x}, computed {computed:#010x}"),
            ));
        }
        let version = be_u32(buf, FORMAT_VERSION_OFFSET as usize);
        if version >> 16 != 1 {
            return Err(Error::corrupt(
                path,
                "footer file format version",
                at + FORMAT_VERSION_OFFSET,
                format!("version {version:#010x} is not 1.x"),
            ));
        }
        let disk_type = match be_u32(buf, DISK_TYPE_OFFSET as usize) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            other => {
                return Err(Error::corrupt(
                    path,
                    "footer disk type",
                    at + DISK_TYPE_OFFSET,
                    format!("disk type {other} is not fixed (2), dynamic (3) or differencing (4)"),
                ))
            }
        };
        let current_size = be_u64(buf, CURRENT_SIZE_OFFSET as usize);
        if !current_size.is_multiple_of(512) || current_size > MAX_OPEN_SIZE {
            return Err(Error::corrupt(
                path,
                "footer current size",
                at + CURRENT_SIZE_OFFSET,
                format!("size {current_size} is not a multiple of 512 or exceeds {MAX_OPEN_SIZE}"),
            ));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&buf[28..32]);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[68..84]);
        Ok(Footer {
            features: be_u32(buf, 8),
            data_offset: be_u64(buf, DATA_OFFSET_OFFSET as usize),
            timestamp: be_u32(buf, 24),
            creator_app,
            creator_version: be_u32(buf, 32),
            creator_os: be_u32(buf, 36),
            original_size: be_u64(buf, 40),
            current_size,
            geometry: be_u32(buf, 56),
            disk_type,
            uuid,
            saved_state: buf[84],
            reserved: buf[RESERVED_AT..FOOTER_SIZE as usize]
                .try_into()
                .unwrap_or([0; RESERVED_LEN]),
        })
    }

    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE as usize] {
        let mut buf = [0u8; FOOTER_SIZE as usize];
        buf[..8].copy_from_slice(FOOTER_COOKIE);
        put_u32(&mut buf, 8, self.features);
        put_u32(&mut buf, FORMAT_VERSION_OFFSET as usize, FORMAT_VERSION);
        put_u64(&mut buf, DATA_OFFSET_OFFSET as usize, self.data_offset);
        put_u32(&mut buf, 24, self.timestamp);
        buf[28..32].copy_from_slice(&self.creator_app);
        put_u32(&mut buf, 32, self.creator_version);
        put_u32(&mut buf, 36, self.creator_os);
        put_u64(&mut buf, 40, self.original_size);
        put_u64(&mut buf, CURRENT_SIZE_OFFSET as usize, self.current_size);
        put_u32(&mut buf, 56, self.geometry);
        put_u32(&mut buf, DISK_TYPE_OFFSET as usize, self.disk_type.code());
        buf[68..84].copy_from_slice(&self.uuid);
        buf[84] = self.saved_state;
        buf[RESERVED_AT..].copy_from_slice(&self.reserved);
        let sum = checksum(&buf, CHECKSUM_OFFSET);
        put_u32(&mut buf, CHECKSUM_OFFSET, sum);
        buf
    }

    /// A resize. The original size changes too: it is "informational" in the
    /// specification, but libvhdi serves it as the disk's size.
    pub fn set_size(&mut self, size: u64) {
        self.original_size = size;
        self.current_size = size;
        self.geometry = chs_geometry(size);
    }

    /// blktap's "hidden" flag, the first reserved byte.
    pub fn blktap_hidden(&self) -> bool {
        self.reserved[0] != 0
    }

    /// Made by blktap (vhd-util, tapdisk), whose conventions (batmap, parent time stamp
    /// taken from the parent file's mtime) apply.
    pub fn created_by_blktap(&self) -> bool {
        self.creator_app.starts_with(b"tap")
    }

    /// The parent time stamp follows blktap's convention (the parent file's mtime, which
    /// tapdisk no longer checks) rather than the parent footer's time stamp.
    pub fn parent_timestamp_is_mtime(&self) -> bool {
        self.created_by_blktap() && self.creator_os != CREATOR_OS_FERROTAP
    }

    pub fn creator_app_name(&self) -> String {
        String::from_utf8_lossy(&self.creator_app)
            .trim_end_matches(['\0', ' '])
            .to_string()
    }
}

/// Cylinders/heads/sectors-per-track for `size` bytes, by the algorithm of the VHD
/// specification's appendix (cylinders in the high 16 bits, then heads, then sectors).
pub fn chs_geometry(size: u64) -> u32 {
    let total = (size / 512).min(65535 * 16 * 255);
    let (sectors_per_track, heads, cylinder_times_heads);
    if total >= 65535 * 16 * 63 {
        sectors_per_track = 255;
        heads = 16;
        cylinder_times_heads = total / sectors_per_track;
    } else {
        let mut spt = 17;
        let mut cth = total / spt;
        let mut h = cth.div_ceil(1024);
        if h < 4 {
            h = 4;
        }
        if cth >= h * 1024 || h > 16 {
            spt = 31;
            h = 16;
            cth = total / spt;
        }
        if cth >= h * 1024 {
            spt = 63;
            h = 16;
            cth = total / spt;
        }
        sectors_per_track = spt;
        heads = h;
        cylinder_times_heads = cth;
    }
    let cylinders = (cylinder_times_heads / heads).min(65535);
    ((cylinders as u32) << 16) | ((heads as u32) << 8) | sectors_per_track as u32
}

/// A Unix time as a VHD time stamp (seconds since 2000-01-01 UTC, saturating).
pub fn vhd_time(unix_seconds: u64) -> u32 {
    unix_seconds
        .saturating_sub(VHD_EPOCH)
        .min(u64::from(u32::MAX)) as u32
}

pub fn vhd_time_now() -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    vhd_time(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_round_trips_and_checksums() {
        let footer = Footer::new(DiskType::Dynamic, 64 << 20, 0x0001_0003);
        let bytes = footer.to_bytes();
        let parsed = Footer::parse(&bytes, Path::new("x"), 0).expect("valid footer");
        assert_eq!(parsed, footer);
        let mut hidden = bytes;
        hidden[85] = 1;
        let sum = checksum(&hidden, CHECKSUM_OFFSET);
        put_u32(&mut hidden, CHECKSUM_OFFSET, sum);
        let parsed = Footer::parse(&hidden, Path::new("x"), 0).expect("hidden footer");
        assert_eq!(
            parsed.to_bytes(),
            hidden,
            "blktap's hidden flag survives a rewrite"
        );
        let mut bad = bytes;
        bad[100] ^= 1;
        let err = Footer::parse(&bad, Path::new("x"), 0).expect_err("bad checksum");
        assert_eq!(err.field(), Some("footer checksum"));
    }

    #[test]
    fn geometry_follows_the_specification() {
        // 64 MiB: 131072 sectors -> 17 spt, 8 heads, 963 cylinders.
        assert_eq!(chs_geometry(64 << 20), (963 << 16) | (8 << 8) | 17);
        // Capped at 65535/16/255.
        assert_eq!(chs_geometry(4 << 40), (65535 << 16) | (16 << 8) | 255);
    }
}
