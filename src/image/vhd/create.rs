//! `img create -f vhd`: fixed, dynamic and differencing disks, laid out as vhd-util lays
//! them: footer copy at 0, dynamic header at 512, BAT at 1536, then (by default) the
//! batmap header and map, then the parent locators; blocks follow, and the footer ends the
//! file.
//!
//! Options: `subformat=dynamic|fixed`, `block_size=BYTES` (power of two, 4 KiB..256 MiB,
//! default 2 MiB), `batmap=on|off` (default on).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::batmap::{self, Batmap};
use super::footer::{vhd_time, DiskType, Footer, FOOTER_SIZE, MAX_CREATE_SIZE};
use super::header::{
    DynamicHeader, LocatorEntry, DEFAULT_BLOCK_SIZE, HEADER_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE,
    PLATFORM_MACX, PLATFORM_W2KU, PLATFORM_W2RU,
};
use super::locator;
use super::open::bat_bytes;
use super::VhdLayer;
use crate::error::{Error, Result};
use crate::image::{CreateBacking, CreateOptions, Format, ImageFile, SECTOR_SIZE};

fn parse_block_size(text: &str) -> Result<u64> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let shift = match unit {
        "" | "B" | "b" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        _ => return Err(Error::invalid(format!("block_size '{text}' is not a size"))),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| Error::invalid(format!("block_size '{text}' is not a size")))?;
    let bytes = value
        .checked_shl(shift)
        .filter(|b| b >> shift == value)
        .ok_or_else(|| Error::invalid(format!("block_size '{text}' is too large")))?;
    if !bytes.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bytes) {
        return Err(Error::invalid(format!(
            "block_size {bytes} is not a power of two between {MIN_BLOCK_SIZE} and \
             {MAX_BLOCK_SIZE}"
        )));
    }
    Ok(bytes)
}

fn parse_switch(name: &str, value: Option<String>) -> Result<bool> {
    match value.as_deref() {
        None | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(Error::invalid(format!(
            "{name} '{other}' is not one of on, off"
        ))),
    }
}

/// What a differencing disk records about its parent.
struct ParentRecord {
    uuid: [u8; 16],
    timestamp: u32,
    name: [u8; 512],
    absolute: PathBuf,
    relative: PathBuf,
}

fn parent_record(child: &Path, backing: &CreateBacking) -> Result<ParentRecord> {
    let parent_path = backing.layer.file().path();
    let absolute = std::fs::canonicalize(parent_path)
        .map_err(|e| Error::io("resolve parent path", e).with_path(parent_path))?;
    let child_dir = match child.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let child_dir = std::fs::canonicalize(child_dir)
        .map_err(|e| Error::io("resolve directory", e).with_path(child_dir))?;
    let relative = locator::relative_path(&child_dir, &absolute);
    let file_name = absolute
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = locator::encode_parent_name(&file_name)?;
    let (uuid, timestamp) = match backing.layer.as_any().downcast_ref::<VhdLayer>() {
        Some(parent) => (parent.uuid(), parent.timestamp()),
        None if backing.format == Format::Raw => {
            // blktap's convention for a raw parent: no id, the file's mtime.
            let meta = std::fs::metadata(&absolute)
                .map_err(|e| Error::io("stat", e).with_path(&absolute))?;
            ([0u8; 16], vhd_time(meta.mtime().max(0) as u64))
        }
        None => {
            return Err(Error::unsupported(format!(
                "a differencing VHD needs a VHD or raw parent, not {}",
                backing.format
            )))
        }
    };
    Ok(ParentRecord {
        uuid,
        timestamp,
        name,
        absolute,
        relative,
    })
}

pub fn create(path: &Path, mut options: CreateOptions) -> Result<()> {
    let subformat = options.take("subformat");
    let block_size = options.take("block_size");
    let batmap_option = options.take("batmap");
    options.finish(Format::Vhd)?;
    let backing = options.backing.take();
    let mut size = options.size;
    if size == 0 {
        if let Some(backing) = &backing {
            size = backing.layer.virtual_size();
        }
    }
    let size = size.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    if size > MAX_CREATE_SIZE {
        return Err(Error::invalid(format!(
            "size {size} exceeds the VHD maximum of 2040 GiB ({MAX_CREATE_SIZE} bytes)"
        )));
    }
    let fixed = match subformat.as_deref() {
        None | Some("dynamic") => false,
        Some("fixed") => true,
        Some(other) => {
            return Err(Error::invalid(format!(
                "subformat '{other}' is not one of dynamic, fixed"
            )))
        }
    };
    if fixed {
        if backing.is_some() {
            return Err(Error::invalid("a fixed VHD cannot have a backing file"));
        }
        if block_size.is_some() || batmap_option.is_some() {
            return Err(Error::invalid(
                "block_size and batmap apply to dynamic and differencing VHDs only",
            ));
        }
        return create_fixed(path, size);
    }
    let block_size = match block_size {
        Some(text) => parse_block_size(&text)?,
        None => DEFAULT_BLOCK_SIZE,
    };
    let with_batmap = parse_switch("batmap", batmap_option)?;
    let parent = backing
        .as_ref()
        .map(|backing| parent_record(path, backing))
        .transpose()?;
    create_sparse(path, size, block_size, with_batmap, parent)
}

fn create_fixed(path: &Path, size: u64) -> Result<()> {
    let file = ImageFile::create(path)?;
    let footer = Footer::new(
        DiskType::Fixed,
        size,
        batmap::CREATOR_VERSION_WITHOUT_BATMAP,
    );
    file.set_len(size)?;
    file.write_at(&footer.to_bytes(), size)?;
    file.sync()
}

fn create_sparse(
    path: &Path,
    size: u64,
    block_size: u64,
    with_batmap: bool,
    parent: Option<ParentRecord>,
) -> Result<()> {
    let entries = u32::try_from(size.div_ceil(block_size))
        .map_err(|_| Error::invalid("too many blocks for a VHD BAT"))?;
    let disk_type = if parent.is_some() {
        DiskType::Differencing
    } else {
        DiskType::Dynamic
    };
    let creator_version = if with_batmap {
        batmap::CREATOR_VERSION_WITH_BATMAP
    } else {
        batmap::CREATOR_VERSION_WITHOUT_BATMAP
    };
    let footer = Footer::new(disk_type, size, creator_version);
    let header_offset = FOOTER_SIZE;
    let table_offset = header_offset + HEADER_SIZE;
    let mut cursor = table_offset + bat_bytes(entries);
    let batmap = with_batmap.then(|| Batmap::new(cursor, entries));
    if let Some(batmap) = &batmap {
        cursor = batmap.map_offset + u64::from(batmap.size_sectors) * SECTOR_SIZE;
    }
    let mut header = DynamicHeader::new(table_offset, entries, block_size as u32);
    let mut locator_payloads = Vec::new();
    if let Some(parent) = &parent {
        header.parent_uuid = parent.uuid;
        header.parent_timestamp = parent.timestamp;
        header.parent_name = parent.name;
        let payloads = [
            (PLATFORM_W2KU, locator::encode_w2ku(&parent.absolute)),
            (PLATFORM_W2RU, locator::encode_w2ru(&parent.relative)),
            (PLATFORM_MACX, locator::encode_macx(&parent.absolute)),
        ];
        for (slot, (code, payload)) in payloads.into_iter().enumerate() {
            let space = (payload.len() as u64).div_ceil(SECTOR_SIZE).max(1) * SECTOR_SIZE;
            header.locators[slot] = LocatorEntry {
                code,
                // Bytes, as blktap and Windows write it (see LocatorEntry::reserved_bytes).
                data_space: space as u32,
                data_length: payload.len() as u32,
                data_offset: cursor,
            };
            locator_payloads.push((cursor, payload));
            cursor += space;
        }
    }

    let file = ImageFile::create(path)?;
    let footer_bytes = footer.to_bytes();
    file.write_at(&footer_bytes, 0)?;
    file.write_at(&header.to_bytes(), header_offset)?;
    let mut bat = vec![0xffu8; bat_bytes(entries) as usize];
    // The padding after the last entry is zero, as vhd-util leaves it.
    bat[entries as usize * 4..].fill(0);
    file.write_at(&bat, table_offset)?;
    if let Some(batmap) = &batmap {
        batmap.write_all(&file)?;
    }
    for (offset, payload) in &locator_payloads {
        let mut padded = payload.clone();
        padded.resize(
            payload.len().div_ceil(SECTOR_SIZE as usize).max(1) * SECTOR_SIZE as usize,
            0,
        );
        file.write_at(&padded, *offset)?;
    }
    file.write_at(&footer_bytes, cursor)?;
    file.sync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_are_validated() {
        assert_eq!(parse_block_size("2097152").expect("2 MiB"), 2 << 20);
        assert_eq!(parse_block_size("512K").expect("512 KiB"), 512 << 10);
        assert!(parse_block_size("3000").is_err());
        assert!(parse_block_size("1024M").is_err());
        assert!(parse_block_size("x").is_err());
    }
}
