//! `img check` for VHD: the metadata as it is on disk now (footers, header, batmap
//! checksum), BAT entries past the end, into metadata or over each other (found when the
//! image was opened), the batmap against the bitmaps, and space no structure references.

use std::sync::atomic::Ordering;

use super::batmap;
use super::bitmap;
use super::footer::{Footer, FOOTER_SIZE};
use super::header::{DynamicHeader, HEADER_SIZE};
use super::write::DATA_ALIGN;
use super::{Region, VhdLayer, UNUSED};
use crate::error::{Error, Result};
use crate::image::{CheckReport, Finding, Layer, SECTOR_SIZE};

fn finding(field: &str, offset: u64, message: impl Into<String>) -> Finding {
    Finding {
        field: field.to_string(),
        offset,
        message: message.into(),
    }
}

fn from_error(error: &Error, offset: u64) -> Finding {
    finding(
        error.field().unwrap_or("metadata"),
        error.offset().unwrap_or(offset),
        error.to_string(),
    )
}

pub(super) fn check(layer: &VhdLayer) -> Result<CheckReport> {
    let file = &layer.file;
    let path = file.path();
    let meta = layer.meta.lock();
    let size = layer.virtual_size();
    let file_len = file.size()?;
    let mut report = CheckReport::default();

    match meta.footer_offset {
        Some(at) if at + FOOTER_SIZE <= file_len => {
            let mut buf = [0u8; FOOTER_SIZE as usize];
            file.read_at(&mut buf, at)?;
            match Footer::parse(&buf, path, at) {
                Err(e) => report.corruptions.push(from_error(&e, at)),
                Ok(on_disk) if on_disk != meta.footer => report.corruptions.push(finding(
                    "footer",
                    at,
                    "the footer on disk differs from the one the image was opened with",
                )),
                Ok(_) => {}
            }
        }
        _ => report.corruptions.push(finding(
            "footer",
            file_len.saturating_sub(FOOTER_SIZE),
            "no valid footer at the end of the file (the copy at offset 0 was used)",
        )),
    }
    let footer_end = meta
        .footer_offset
        .map_or(meta.next_block + FOOTER_SIZE, |at| at + FOOTER_SIZE);

    let Some(sparse) = &layer.sparse else {
        report.total_clusters = size.div_ceil(SECTOR_SIZE);
        report.allocated_clusters = report.total_clusters;
        report.image_end_offset = footer_end;
        return Ok(report);
    };

    let mut copy = [0u8; FOOTER_SIZE as usize];
    file.read_at(&mut copy, 0)?;
    match Footer::parse(&copy, path, 0) {
        Err(e) => report.corruptions.push(from_error(&e, 0)),
        Ok(copy) if copy != meta.footer => report.corruptions.push(finding(
            "footer copy",
            0,
            "the copy of the footer at offset 0 differs from the footer at the end",
        )),
        Ok(_) => {}
    }
    let mut header = vec![0u8; HEADER_SIZE as usize];
    file.read_at(&mut header, sparse.header_offset)?;
    if let Err(e) = DynamicHeader::parse(&header, path, sparse.header_offset) {
        report
            .corruptions
            .push(from_error(&e, sparse.header_offset));
    }

    let block_bytes = sparse.bitmap_bytes + sparse.block_size;
    let mut regions = sparse.metadata.clone();
    for (i, entry) in sparse.bat.iter().enumerate() {
        let entry = entry.load(Ordering::Acquire);
        if entry != UNUSED {
            report.allocated_clusters += 1;
            if let Some(damage) = sparse.damage(path, i as u32, entry) {
                report
                    .corruptions
                    .push(from_error(&damage, sparse.header.table_offset));
                continue;
            }
            let start = u64::from(entry) * SECTOR_SIZE;
            regions.push(Region {
                start,
                end: start + block_bytes,
                name: "block",
            });
        }
        if let Some(batmap) = &sparse.batmap {
            if !batmap.is_full(i as u32) {
                continue;
            }
            let field = format!("batmap bit {i}");
            if entry == UNUSED {
                report.corruptions.push(finding(
                    &field,
                    batmap.map_offset + i as u64 / 8,
                    format!("marks unallocated block {i} as fully allocated"),
                ));
            } else {
                let bits = layer.read_bitmap(sparse, entry)?;
                if !bitmap::all_set(&bits, sparse.sectors_per_block) {
                    report.corruptions.push(finding(
                        &field,
                        batmap.map_offset + i as u64 / 8,
                        format!(
                            "marks block {i} fully allocated but its bitmap at {} has absent \
                             sectors (tapdisk would read them from this file)",
                            u64::from(entry) * SECTOR_SIZE
                        ),
                    ));
                }
            }
        }
    }
    if let Some(batmap) = &sparse.batmap {
        if let Some(message) = batmap::verify_on_disk(file, batmap)? {
            report.corruptions.push(finding(
                "batmap checksum",
                batmap.header_offset + 24,
                message,
            ));
        }
    }
    report.total_clusters = size.div_ceil(sparse.block_size);

    regions.sort_by_key(|r| r.start);
    let mut pos = 0u64;
    for region in &regions {
        if region.start > pos {
            let gap = region.start - pos;
            // Up to one alignment unit before a block is the padding that aligns its data.
            let padding = region.name == "block" && gap < DATA_ALIGN;
            if !padding {
                report.leaks.push(finding(
                    "unreferenced space",
                    pos,
                    format!("{gap} bytes before the {} at {}", region.name, region.start),
                ));
            }
        }
        pos = pos.max(region.end);
    }
    let footer_at = footer_end - FOOTER_SIZE;
    if footer_at > pos && !file.is_block_device() {
        report.leaks.push(finding(
            "unreferenced space",
            pos,
            format!("{} bytes before the footer at {footer_at}", footer_at - pos),
        ));
    }
    report.image_end_offset = footer_end;
    Ok(report)
}
