//! Writes, discards and resizes, serialized by the allocation lock and ordered for crash
//! safety.
//!
//! A new block goes where the footer was (the footer moves after it), with its data
//! region aligned to 4 KiB so O_DIRECT I/O needs no bounce buffer. Order: bitmap and data,
//! then the footer at the new end (so the file always ends in a footer or, after a crash,
//! in an unreferenced tail that the copy of the footer at offset 0 recovers), a sync, then
//! the BAT entry that makes the block visible. In an allocated block new sectors' data is
//! written before the bitmap bits that make it visible, and the batmap after the bitmap.

use std::sync::atomic::Ordering;

use super::bitmap;
use super::footer::{DiskType, FOOTER_SIZE, MAX_CREATE_SIZE};
use super::{Meta, Sparse, VhdLayer, UNUSED};
use crate::error::{Error, Result};
use crate::image::{ReadBelow, SECTOR_SIZE};

/// Data regions of new blocks start on this boundary.
pub(super) const DATA_ALIGN: u64 = 4096;

/// What a write stores into the sectors it makes present.
#[derive(Clone, Copy)]
enum Payload<'a> {
    /// These bytes at this offset inside the block.
    Bytes { within: u64, data: &'a [u8] },
    /// Zeros over whole sectors `[start, end)` of the block.
    ZeroSectors { start: usize, end: usize },
}

impl Payload<'_> {
    fn sectors(&self) -> (usize, usize) {
        match *self {
            Payload::Bytes { within, data } => (
                (within / SECTOR_SIZE) as usize,
                (within + data.len() as u64).div_ceil(SECTOR_SIZE) as usize,
            ),
            Payload::ZeroSectors { start, end } => (start, end),
        }
    }
}

impl VhdLayer {
    fn writable(&self) -> Result<()> {
        if self.file.read_only() {
            Err(Error::read_only(self.file.path()))
        } else {
            Ok(())
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size.load(Ordering::Acquire);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::invalid(format!(
                "range {offset}+{len} lies past the end of the {size}-byte disk"
            ))
            .with_path(self.file.path())),
        }
    }

    pub(super) fn write_bytes(
        &self,
        offset: u64,
        data: &[u8],
        below: &dyn ReadBelow,
    ) -> Result<()> {
        self.writable()?;
        self.check_range(offset, data.len() as u64)?;
        let Some(sparse) = &self.sparse else {
            return self.file.write_at(data, offset);
        };
        let mut meta = self.meta.lock();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let within = pos % sparse.block_size;
            let n = ((sparse.block_size - within) as usize).min(data.len() - done);
            let block = (pos / sparse.block_size) as u32;
            let payload = Payload::Bytes {
                within,
                data: &data[done..done + n],
            };
            self.store(sparse, &mut meta, block, payload, below)?;
            done += n;
        }
        Ok(())
    }

    pub(super) fn discard_range(&self, offset: u64, len: u64, below: &dyn ReadBelow) -> Result<()> {
        self.writable()?;
        self.check_range(offset, len)?;
        let Some(sparse) = &self.sparse else {
            return self.file.punch_hole(offset, len);
        };
        let mut meta = self.meta.lock();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = (pos / sparse.block_size) as u32;
            let within = pos % sparse.block_size;
            let n = (sparse.block_size - within).min(end - pos);
            self.discard_in_block(sparse, &mut meta, block, within, n, below)?;
            pos += n;
        }
        Ok(())
    }

    fn discard_in_block(
        &self,
        sparse: &Sparse,
        meta: &mut Meta,
        block: u32,
        within: u64,
        len: u64,
        below: &dyn ReadBelow,
    ) -> Result<()> {
        let differencing = self.disk_type == DiskType::Differencing;
        let entry = self.entry(sparse, block)?;
        // In a dynamic disk, sectors of an unallocated block already read as zeros.
        if entry == UNUSED && !differencing {
            return Ok(());
        }
        let end = within + len;
        let first_full = within.div_ceil(SECTOR_SIZE);
        let last_full = end / SECTOR_SIZE;
        if first_full >= last_full {
            let zeros = vec![0u8; len as usize];
            let payload = Payload::Bytes {
                within,
                data: &zeros,
            };
            return self.store(sparse, meta, block, payload, below);
        }
        let head = first_full * SECTOR_SIZE - within;
        if head > 0 {
            let zeros = vec![0u8; head as usize];
            let payload = Payload::Bytes {
                within,
                data: &zeros,
            };
            self.store(sparse, meta, block, payload, below)?;
        }
        let tail = end - last_full * SECTOR_SIZE;
        if tail > 0 {
            let zeros = vec![0u8; tail as usize];
            let payload = Payload::Bytes {
                within: last_full * SECTOR_SIZE,
                data: &zeros,
            };
            self.store(sparse, meta, block, payload, below)?;
        }
        let (start, end) = (first_full as usize, last_full as usize);
        if differencing {
            // The range must hide the parent: make the sectors present, holding zeros.
            self.store(
                sparse,
                meta,
                block,
                Payload::ZeroSectors { start, end },
                below,
            )
        } else {
            // Present sectors become zeros; absent ones already read as zeros.
            let entry = self.entry(sparse, block)?;
            let data_start = u64::from(entry) * SECTOR_SIZE + sparse.bitmap_bytes;
            self.file.punch_hole(
                data_start + start as u64 * SECTOR_SIZE,
                (end - start) as u64 * SECTOR_SIZE,
            )
        }
    }

    fn entry(&self, sparse: &Sparse, block: u32) -> Result<u32> {
        sparse.entry(self.file.path(), block)
    }

    /// Store `payload` into `block`, allocating it if needed; sectors the payload covers
    /// only in part are completed from their present data, from the layers below
    /// (differencing) or with zeros (dynamic).
    fn store(
        &self,
        sparse: &Sparse,
        meta: &mut Meta,
        block: u32,
        payload: Payload,
        below: &dyn ReadBelow,
    ) -> Result<()> {
        let entry = self.entry(sparse, block)?;
        let (first, last) = payload.sectors();
        if entry == UNUSED {
            let mut bits = vec![0u8; sparse.bitmap_bytes as usize].into_boxed_slice();
            let fill = self.sector_fill(sparse, block, first, last, payload, below)?;
            bitmap::set_range(&mut bits, first, last);
            return self.allocate(sparse, meta, block, bits, first, fill);
        }
        let block_start = u64::from(entry) * SECTOR_SIZE;
        let data_start = block_start + sparse.bitmap_bytes;
        let mut bits: Box<[u8]> = if sparse.batmap.as_ref().is_some_and(|b| b.is_full(block)) {
            vec![0xffu8; sparse.bitmap_bytes as usize].into_boxed_slice()
        } else {
            sparse.bitmaps.with(
                block,
                || self.read_bitmap(sparse, entry),
                |bits| Box::<[u8]>::from(bits),
            )?
        };
        let mut sector = first;
        while sector < last {
            let (present, run) = bitmap::run(&bits, sector, last - sector);
            let run_end = sector + run;
            if present {
                self.overwrite_present(data_start, sector, run_end, payload)?;
            } else {
                let fill = self.sector_fill(sparse, block, sector, run_end, payload, below)?;
                match fill {
                    Some(buf) => self
                        .file
                        .write_at(&buf, data_start + sector as u64 * SECTOR_SIZE)?,
                    None => self.file.punch_hole(
                        data_start + sector as u64 * SECTOR_SIZE,
                        (run_end - sector) as u64 * SECTOR_SIZE,
                    )?,
                }
            }
            sector = run_end;
        }
        if bitmap::set_range(&mut bits, first, last) {
            let first_byte = first / 8 / SECTOR_SIZE as usize * SECTOR_SIZE as usize;
            let last_byte = ((last - 1) / 8 / SECTOR_SIZE as usize + 1) * SECTOR_SIZE as usize;
            self.file.write_at(
                &bits[first_byte..last_byte],
                block_start + first_byte as u64,
            )?;
            self.publish_bitmap(sparse, block, bits)?;
        }
        Ok(())
    }

    /// Overwrite the part of `payload` that falls in present sectors `[start, end)`.
    fn overwrite_present(
        &self,
        data_start: u64,
        start: usize,
        end: usize,
        payload: Payload,
    ) -> Result<()> {
        let (from, to) = (start as u64 * SECTOR_SIZE, end as u64 * SECTOR_SIZE);
        match payload {
            Payload::Bytes { within, data } => {
                let lo = from.max(within);
                let hi = to.min(within + data.len() as u64);
                let slice = &data[(lo - within) as usize..(hi - within) as usize];
                self.file.write_at(slice, data_start + lo)
            }
            Payload::ZeroSectors { .. } => self.file.punch_hole(data_start + from, to - from),
        }
    }

    /// Full-sector contents for sectors `[start, end)` that are not present yet: the
    /// payload's bytes, completed at the edges from below or zeros. `None` for zeros.
    fn sector_fill(
        &self,
        sparse: &Sparse,
        block: u32,
        start: usize,
        end: usize,
        payload: Payload,
        below: &dyn ReadBelow,
    ) -> Result<Option<Vec<u8>>> {
        let Payload::Bytes { within, data } = payload else {
            return Ok(None);
        };
        let from = start as u64 * SECTOR_SIZE;
        let to = end as u64 * SECTOR_SIZE;
        let mut buf = vec![0u8; (to - from) as usize];
        let guest_base = u64::from(block) * sparse.block_size;
        let lo = from.max(within);
        let hi = to.min(within + data.len() as u64);
        if self.disk_type == DiskType::Differencing {
            if lo > from {
                let head = &mut buf[..SECTOR_SIZE as usize];
                below.read_below(head, guest_base + from)?;
            }
            if hi < to {
                let tail_start = buf.len() - SECTOR_SIZE as usize;
                below.read_below(&mut buf[tail_start..], guest_base + to - SECTOR_SIZE)?;
            }
        }
        buf[(lo - from) as usize..(hi - from) as usize]
            .copy_from_slice(&data[(lo - within) as usize..(hi - within) as usize]);
        Ok(Some(buf))
    }

    /// Append a new block holding `bits` and, from sector `first`, `fill` (zeros when
    /// `None`), then make it visible.
    fn allocate(
        &self,
        sparse: &Sparse,
        meta: &mut Meta,
        block: u32,
        bits: Box<[u8]>,
        first: usize,
        fill: Option<Vec<u8>>,
    ) -> Result<()> {
        let path = self.file.path();
        let start = (meta.next_block + sparse.bitmap_bytes).div_ceil(DATA_ALIGN) * DATA_ALIGN
            - sparse.bitmap_bytes;
        let end = start + sparse.bitmap_bytes + sparse.block_size;
        let entry = u32::try_from(start / SECTOR_SIZE)
            .ok()
            .filter(|&e| e != UNUSED)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "a block at byte {start} is beyond what a BAT entry can address"
                ))
                .with_path(path)
            })?;
        if self.file.is_block_device() && meta.footer_offset.is_some_and(|f| end > f) {
            return Err(Error::invalid(format!(
                "no room for block {block} on the device (needs {end} bytes before the footer)"
            ))
            .with_path(path));
        }
        let data_start = start + sparse.bitmap_bytes;
        self.file.write_at(&bits, start)?;
        match fill {
            Some(buf) => self
                .file
                .write_at(&buf, data_start + first as u64 * SECTOR_SIZE)?,
            // A new block's data region is fresh space, except after a crash recovery
            // (the next block then starts before the file's end): clear that.
            None => {
                if start < self.file.size()? {
                    self.file.punch_hole(data_start, sparse.block_size)?;
                }
            }
        }
        if !self.file.is_block_device() {
            self.write_footer_at(meta, end)?;
        }
        self.file.sync()?;
        self.file.write_at(
            &entry.to_be_bytes(),
            sparse.header.table_offset + u64::from(block) * 4,
        )?;
        sparse.bat[block as usize].store(entry, Ordering::Release);
        meta.next_block = end;
        self.publish_bitmap(sparse, block, bits)
    }

    /// After a bitmap reached the file: let readers see it, and mark the block in the
    /// batmap once every sector is present.
    fn publish_bitmap(&self, sparse: &Sparse, block: u32, bits: Box<[u8]>) -> Result<()> {
        let full = bitmap::all_set(&bits, sparse.sectors_per_block);
        sparse.bitmaps.store(block, bits);
        if let (true, Some(batmap)) = (full, &sparse.batmap) {
            if let Some(byte) = batmap.mark_full(block) {
                batmap.write_change(&self.file, byte)?;
            }
        }
        Ok(())
    }

    /// Write the footer at `offset` (a regular file's new end), trimming whatever a crash
    /// left after it.
    fn write_footer_at(&self, meta: &mut Meta, offset: u64) -> Result<()> {
        self.file.write_at(&meta.footer.to_bytes(), offset)?;
        let end = offset + FOOTER_SIZE;
        if self.file.size()? > end {
            self.file.set_len(end)?;
        }
        meta.footer_offset = Some(offset);
        Ok(())
    }

    pub(super) fn resize_to(&self, new_size: u64) -> Result<()> {
        self.writable()?;
        let path = self.file.path();
        if !new_size.is_multiple_of(SECTOR_SIZE) {
            return Err(
                Error::invalid(format!("size {new_size} is not a multiple of 512")).with_path(path),
            );
        }
        if new_size > MAX_CREATE_SIZE {
            return Err(Error::invalid(format!(
                "size {new_size} exceeds the VHD maximum of 2040 GiB ({MAX_CREATE_SIZE} bytes)"
            ))
            .with_path(path));
        }
        let mut meta = self.meta.lock();
        let old_size = meta.footer.current_size;
        if new_size == old_size {
            return Ok(());
        }
        match &self.sparse {
            None => self.resize_fixed(&mut meta, old_size, new_size)?,
            Some(sparse) => {
                let capacity = u64::from(sparse.header.max_table_entries) * sparse.block_size;
                if new_size > capacity {
                    return Err(Error::invalid(format!(
                        "size {new_size} exceeds what the BAT addresses: max table entries {} \
                         x block size {} = {capacity} bytes",
                        sparse.header.max_table_entries, sparse.block_size
                    ))
                    .with_path(path)
                    .with_field("max table entries"));
                }
                if new_size < old_size {
                    self.check_shrink(sparse, new_size)?;
                }
                meta.footer.set_size(new_size);
                let footer = meta.footer.to_bytes();
                match meta.footer_offset {
                    Some(at) => self.file.write_at(&footer, at)?,
                    None => {
                        let at = meta.next_block;
                        self.write_footer_at(&mut meta, at)?;
                    }
                }
                self.file.write_at(&footer, 0)?;
            }
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Shrinking must not drop allocated sectors.
    fn check_shrink(&self, sparse: &Sparse, new_size: u64) -> Result<()> {
        let first_block = new_size / sparse.block_size;
        for block in first_block..sparse.bat.len() as u64 {
            let entry = self.entry(sparse, block as u32)?;
            if entry == UNUSED {
                continue;
            }
            let block_base = block * sparse.block_size;
            let keep = new_size.saturating_sub(block_base) / SECTOR_SIZE;
            let bits = self.read_bitmap(sparse, entry)?;
            let (present, run) = bitmap::run(
                &bits,
                keep as usize,
                sparse.sectors_per_block - keep as usize,
            );
            if present || (keep as usize + run) < sparse.sectors_per_block {
                return Err(Error::invalid(format!(
                    "cannot shrink to {new_size}: block {block} holds data past the new end"
                ))
                .with_path(self.file.path()));
            }
        }
        Ok(())
    }

    fn resize_fixed(&self, meta: &mut Meta, old_size: u64, new_size: u64) -> Result<()> {
        let path = self.file.path();
        if self.file.is_block_device() {
            return Err(
                Error::invalid("a fixed VHD on a block device cannot be resized").with_path(path),
            );
        }
        if new_size < old_size {
            let mut pos = new_size;
            while pos < old_size {
                let (len, data) = self.file.data_or_hole(pos, old_size - pos)?;
                if data {
                    return Err(Error::invalid(format!(
                        "cannot shrink to {new_size}: data is stored at {pos}"
                    ))
                    .with_path(path));
                }
                pos += len;
            }
        }
        meta.footer.set_size(new_size);
        // The new footer first: a crash leaves a valid (if larger) disk.
        self.file.write_at(&meta.footer.to_bytes(), new_size)?;
        if new_size > old_size {
            self.file
                .write_zeros(old_size, FOOTER_SIZE.min(new_size - old_size))?;
        } else {
            self.file.set_len(new_size + FOOTER_SIZE)?;
        }
        meta.footer_offset = Some(new_size);
        meta.next_block = new_size;
        Ok(())
    }
}
