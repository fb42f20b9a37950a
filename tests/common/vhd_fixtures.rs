//! Test-side VHD knowledge, written from the VHD specification and blktap's batmap
//! description, independently of ferrotap's parser: a builder for vhd-util-layout files
//! and a parser that checks a file's footer, header, BAT, bitmaps and batmap.
#![allow(dead_code)]

use std::path::Path;

pub const SECTOR: usize = 512;
pub const UNUSED: u32 = 0xffff_ffff;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// One's complement of the byte sum, skipping the 4-byte checksum field at `skip`.
pub fn vhd_checksum(bytes: &[u8], skip: usize) -> u32 {
    let mut sum = 0u32;
    for (i, &b) in bytes.iter().enumerate() {
        if !(skip..skip + 4).contains(&i) {
            sum = sum.wrapping_add(b as u32);
        }
    }
    !sum
}

pub fn footer(disk_type: u32, size: u64, uuid: [u8; 16], creator_version: u32) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    let data_offset: u64 = if disk_type == 2 { u64::MAX } else { 512 };
    f[16..24].copy_from_slice(&data_offset.to_be_bytes());
    f[24..28].copy_from_slice(&0x2000_0000u32.to_be_bytes());
    f[28..32].copy_from_slice(b"tap\0");
    f[32..36].copy_from_slice(&creator_version.to_be_bytes());
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[56..60].copy_from_slice(&((1000u32 << 16) | (16 << 8) | 63).to_be_bytes());
    f[60..64].copy_from_slice(&disk_type.to_be_bytes());
    f[68..84].copy_from_slice(&uuid);
    let sum = vhd_checksum(&f, 64);
    f[64..68].copy_from_slice(&sum.to_be_bytes());
    f
}

/// A parent locator entry: (code, payload).
pub type Locator = ([u8; 4], Vec<u8>);

pub struct FixtureBlock {
    pub index: usize,
    /// Sectors present in this file.
    pub present: Vec<bool>,
    /// Data of the whole block (only present sectors are meaningful).
    pub data: Vec<u8>,
}

/// A dynamic (parent None) or differencing VHD laid out as vhd-util lays it: footer copy,
/// header at 512, BAT at 1536, batmap header right after the BAT, the map after it,
/// parent locators, then the blocks and the footer. Batmap bits are set for the blocks
/// whose sectors are all present. Returns the footer's uuid.
pub fn build_vhd_util_layout(
    path: &Path,
    size: u64,
    block_size: u64,
    parent: Option<([u8; 16], &str)>,
    blocks: &[FixtureBlock],
) -> [u8; 16] {
    let uuid: [u8; 16] = rand_uuid();
    let entries = size.div_ceil(block_size) as usize;
    let spb = (block_size / 512) as usize;
    let bitmap_bytes = (spb / 8).div_ceil(SECTOR).max(1) * SECTOR;
    let bat_bytes = (entries * 4).div_ceil(SECTOR).max(1) * SECTOR;
    let batmap_header_at = 1536 + bat_bytes;
    let batmap_sectors = entries.div_ceil(8).div_ceil(SECTOR).max(1);
    let batmap_at = batmap_header_at + SECTOR;
    let mut cursor = batmap_at + batmap_sectors * SECTOR;

    let mut header = vec![0u8; 1024];
    header[0..8].copy_from_slice(b"cxsparse");
    header[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    header[16..24].copy_from_slice(&1536u64.to_be_bytes());
    header[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    header[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    header[32..36].copy_from_slice(&(block_size as u32).to_be_bytes());
    let mut locator_data = Vec::new();
    if let Some((parent_uuid, parent_name)) = parent {
        header[40..56].copy_from_slice(&parent_uuid);
        header[56..60].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        for (i, unit) in parent_name.encode_utf16().enumerate() {
            header[64 + 2 * i..66 + 2 * i].copy_from_slice(&unit.to_be_bytes());
        }
        // blktap writes every locator with the relative path; W2ru with ".\".
        let relative: Vec<u8> = format!(".\\{parent_name}")
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        let macx = format!("file://./{parent_name}").into_bytes();
        let locators: [Locator; 2] = [(*b"MacX", macx), (*b"W2ru", relative)];
        for (i, (code, payload)) in locators.into_iter().enumerate() {
            let space = payload.len().div_ceil(SECTOR) * SECTOR;
            let base = 576 + 24 * i;
            header[base..base + 4].copy_from_slice(&code);
            header[base + 4..base + 8].copy_from_slice(&(space as u32).to_be_bytes());
            header[base + 8..base + 12].copy_from_slice(&(payload.len() as u32).to_be_bytes());
            header[base + 16..base + 24].copy_from_slice(&(cursor as u64).to_be_bytes());
            locator_data.push((cursor, payload));
            cursor += space;
        }
    }
    let sum = vhd_checksum(&header, 36);
    header[36..40].copy_from_slice(&sum.to_be_bytes());

    let disk_type = if parent.is_some() { 4 } else { 3 };
    let foot = footer(disk_type, size, uuid, 0x0001_0003);
    let mut file = vec![0u8; cursor];
    file[0..512].copy_from_slice(&foot);
    file[512..1536].copy_from_slice(&header);
    let mut bat = vec![UNUSED; entries];
    let mut batmap = vec![0u8; batmap_sectors * SECTOR];
    for block in blocks {
        let start = file.len();
        bat[block.index] = (start / SECTOR) as u32;
        let mut bitmap = vec![0u8; bitmap_bytes];
        for (s, &p) in block.present.iter().enumerate() {
            if p {
                bitmap[s / 8] |= 0x80 >> (s % 8);
            }
        }
        if block.present.iter().all(|&p| p) {
            batmap[block.index / 8] |= 0x80 >> (block.index % 8);
        }
        file.extend_from_slice(&bitmap);
        file.extend_from_slice(&block.data);
    }
    for (i, entry) in bat.iter().enumerate() {
        file[1536 + 4 * i..1540 + 4 * i].copy_from_slice(&entry.to_be_bytes());
    }
    for b in &mut file[1536 + 4 * entries..1536 + bat_bytes] {
        *b = 0;
    }
    let mut bm_header = vec![0u8; SECTOR];
    bm_header[0..8].copy_from_slice(b"tdbatmap");
    bm_header[8..16].copy_from_slice(&(batmap_at as u64).to_be_bytes());
    bm_header[16..20].copy_from_slice(&(batmap_sectors as u32).to_be_bytes());
    bm_header[20..24].copy_from_slice(&0x0001_0002u32.to_be_bytes());
    let bm_sum = !batmap.iter().fold(0u32, |s, &b| s.wrapping_add(b as u32));
    bm_header[24..28].copy_from_slice(&bm_sum.to_be_bytes());
    file[batmap_header_at..batmap_header_at + SECTOR].copy_from_slice(&bm_header);
    file[batmap_at..batmap_at + batmap.len()].copy_from_slice(&batmap);
    for (at, payload) in locator_data {
        file[at..at + payload.len()].copy_from_slice(&payload);
    }
    file.extend_from_slice(&foot);
    std::fs::write(path, file).unwrap();
    uuid
}

fn rand_uuid() -> [u8; 16] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&nanos.to_le_bytes());
    uuid[15] ^= std::process::id() as u8;
    uuid
}

/// A VHD file as the specification describes it, parsed and checked independently.
#[derive(Debug)]
pub struct ParsedVhd {
    pub disk_type: u32,
    pub size: u64,
    pub uuid: [u8; 16],
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub table_offset: u64,
    pub block_size: u64,
    pub bat: Vec<u32>,
    pub bitmap_bytes: usize,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    pub parent_name: String,
    /// (code, decoded payload) of every locator.
    pub locators: Vec<(String, String)>,
    pub batmap: Option<ParsedBatmap>,
    pub file: Vec<u8>,
}

#[derive(Debug)]
pub struct ParsedBatmap {
    pub header_offset: u64,
    pub offset: u64,
    pub sectors: u32,
    pub version: u32,
    pub checksum_ok: bool,
    pub map: Vec<u8>,
}

impl ParsedVhd {
    /// Parse `path`, asserting the footer (end and copy) and header checksums.
    pub fn parse(path: &Path) -> ParsedVhd {
        let file = std::fs::read(path).unwrap();
        let foot = &file[file.len() - 512..];
        assert_eq!(&foot[0..8], b"conectix", "footer cookie at the end");
        assert_eq!(be32(foot, 64), vhd_checksum(foot, 64), "footer checksum");
        let disk_type = be32(foot, 60);
        let size = be64(foot, 48);
        let mut parsed = ParsedVhd {
            disk_type,
            size,
            uuid: foot[68..84].try_into().unwrap(),
            creator_app: foot[28..32].try_into().unwrap(),
            creator_version: be32(foot, 32),
            table_offset: 0,
            block_size: 0,
            bat: Vec::new(),
            bitmap_bytes: 0,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: Vec::new(),
            batmap: None,
            file: Vec::new(),
        };
        if disk_type == 2 {
            assert_eq!(
                file.len() as u64,
                size + 512,
                "fixed disk: data then footer"
            );
            parsed.file = file;
            return parsed;
        }
        assert_eq!(
            &file[0..512],
            foot,
            "footer copy at offset 0 equals the footer"
        );
        let header_at = be64(foot, 16) as usize;
        let h = &file[header_at..header_at + 1024];
        assert_eq!(&h[0..8], b"cxsparse");
        assert_eq!(be32(h, 36), vhd_checksum(h, 36), "header checksum");
        parsed.table_offset = be64(h, 16);
        let entries = be32(h, 28) as usize;
        parsed.block_size = be32(h, 32) as u64;
        let t = parsed.table_offset as usize;
        parsed.bat = (0..entries).map(|i| be32(&file, t + 4 * i)).collect();
        let spb = (parsed.block_size / 512) as usize;
        parsed.bitmap_bytes = (spb / 8).div_ceil(SECTOR).max(1) * SECTOR;
        parsed.parent_uuid = h[40..56].try_into().unwrap();
        parsed.parent_timestamp = be32(h, 56);
        let units: Vec<u16> = h[64..576]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        parsed.parent_name = String::from_utf16(&units).unwrap();
        for i in 0..8 {
            let e = &h[576 + 24 * i..600 + 24 * i];
            let code = &e[0..4];
            if code == [0, 0, 0, 0] {
                continue;
            }
            let len = be32(e, 8) as usize;
            let at = be64(e, 16) as usize;
            let payload = &file[at..at + len];
            let text = match code {
                b"MacX" => String::from_utf8(payload.to_vec()).unwrap(),
                _ => String::from_utf16(
                    &payload
                        .chunks(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect::<Vec<_>>(),
                )
                .unwrap(),
            };
            parsed
                .locators
                .push((String::from_utf8_lossy(code).into_owned(), text));
        }
        let bat_bytes = (entries * 4).div_ceil(SECTOR).max(1) * SECTOR;
        let bm_at = t + bat_bytes;
        if &file[bm_at..bm_at + 8] == b"tdbatmap" {
            let offset = be64(&file, bm_at + 8);
            let sectors = be32(&file, bm_at + 16);
            let version = be32(&file, bm_at + 20);
            let stored = be32(&file, bm_at + 24);
            let map = file[offset as usize..offset as usize + sectors as usize * SECTOR].to_vec();
            let sum = map.iter().fold(0u32, |s, &b| s.wrapping_add(b as u32));
            parsed.batmap = Some(ParsedBatmap {
                header_offset: bm_at as u64,
                offset,
                sectors,
                version,
                checksum_ok: !sum == stored,
                map,
            });
        }
        parsed.file = file;
        parsed
    }

    pub fn bitmap(&self, block: usize) -> Option<&[u8]> {
        let entry = self.bat[block];
        (entry != UNUSED).then(|| {
            let at = entry as usize * SECTOR;
            &self.file[at..at + self.bitmap_bytes]
        })
    }

    pub fn block_full(&self, block: usize) -> bool {
        let spb = (self.block_size / 512) as usize;
        self.bitmap(block)
            .is_some_and(|bits| (0..spb).all(|s| bits[s / 8] & (0x80 >> (s % 8)) != 0))
    }

    /// Assert the structural invariants: blocks inside the file, after the metadata
    /// (batmap included), not overlapping; a batmap with a good checksum whose bits are
    /// exactly the fully allocated blocks.
    pub fn assert_consistent(&self) {
        let footer_at = self.file.len() as u64 - 512;
        let block_bytes = self.bitmap_bytes as u64 + self.block_size;
        let mut metadata_end =
            self.table_offset + (self.bat.len() as u64 * 4).div_ceil(512).max(1) * 512;
        if let Some(bm) = &self.batmap {
            assert!(bm.checksum_ok, "batmap checksum");
            assert_eq!(bm.version, 0x0001_0002);
            assert_eq!(
                bm.header_offset, metadata_end,
                "batmap header right after the BAT"
            );
            metadata_end = metadata_end.max(bm.offset + bm.sectors as u64 * 512);
            for block in 0..self.bat.len() {
                let bit = bm.map[block / 8] & (0x80 >> (block % 8)) != 0;
                assert_eq!(bit, self.block_full(block), "batmap bit of block {block}");
            }
        }
        let mut starts: Vec<u64> = Vec::new();
        for &entry in &self.bat {
            if entry == UNUSED {
                continue;
            }
            let start = entry as u64 * 512;
            assert!(
                start >= metadata_end,
                "block at {start} inside metadata (< {metadata_end})"
            );
            assert!(
                start + block_bytes <= footer_at,
                "block at {start} past the footer"
            );
            starts.push(start);
        }
        starts.sort();
        for w in starts.windows(2) {
            assert!(
                w[0] + block_bytes <= w[1],
                "blocks at {} and {} overlap",
                w[0],
                w[1]
            );
        }
    }
}
