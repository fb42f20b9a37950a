//! Refcounts of any width (1 to 64 bits) and cluster allocation.
//!
//! Everything here runs under the image's metadata mutex. The refcount table is kept in
//! memory (at most 8 MiB, qemu's limit); refcount blocks go through a small write-through
//! cache of `BLOCK_CACHE` blocks. New clusters come from the lowest free cluster at or
//! after a hint, else from the end of the file; when the file grows past what the refcount
//! blocks cover, new blocks (which may have to count themselves) and, if needed, a bigger
//! refcount table are allocated at the end of the file, written before the table entry or
//! header field that points at them.

use super::header::{field, MAX_REFCOUNT_TABLE_BYTES};
use crate::error::{Error, Result};
use crate::image::ImageFile;

const BLOCK_CACHE: usize = 4;
/// Bits 9..63 of a refcount table entry hold the block offset.
const RT_OFFSET_MASK: u64 = !0x1ff;

pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    entries_per_block: u64,
    pub table_offset: u64,
    pub table_clusters: u64,
    pub table: Vec<u64>,
    cache: Vec<(u64, Vec<u8>)>,
    cache_next: usize,
    /// First byte past every cluster in use or reserved (cluster aligned).
    pub eof: u64,
    /// No cluster below this index is free (except ones freed later, which lower it).
    free_hint: u64,
    /// Clusters counted but not yet used (v2 batches allocations around one sync).
    reserve: Vec<u64>,
}

/// Read entry `i` of a refcount block.
pub fn entry_get(buf: &[u8], i: u64, order: u32) -> u64 {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            u64::from(buf[i / per_byte] >> shift) & ((1u64 << bits) - 1)
        }
        3 => u64::from(buf[i]),
        4 => u64::from(u16::from_be_bytes([buf[2 * i], buf[2 * i + 1]])),
        5 => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&buf[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(b))
        }
        _ => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[8 * i..8 * i + 8]);
            u64::from_be_bytes(b)
        }
    }
}

/// Set entry `i` of a refcount block; returns the byte range that changed.
pub fn entry_set(buf: &mut [u8], i: u64, order: u32, value: u64) -> (usize, usize) {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let byte = &mut buf[i / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
            (i / per_byte, 1)
        }
        3 => {
            buf[i] = value as u8;
            (i, 1)
        }
        4 => {
            buf[2 * i..2 * i + 2].copy_from_slice(&(value as u16).to_be_bytes());
            (2 * i, 2)
        }
        5 => {
            buf[4 * i..4 * i + 4].copy_from_slice(&(value as u32).to_be_bytes());
            (4 * i, 4)
        }
        _ => {
            buf[8 * i..8 * i + 8].copy_from_slice(&value.to_be_bytes());
            (8 * i, 8)
        }
    }
}

impl Refcounts {
    /// Load and validate the refcount table.
    pub fn load(
        file: &ImageFile,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u64,
        file_len: u64,
    ) -> Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        let mut bytes = vec![0u8; (table_clusters * cs) as usize];
        file.read_at(&mut bytes, table_offset)?;
        let mut table = Vec::with_capacity(bytes.len() / 8);
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            let entry = u64::from_be_bytes(b);
            let offset = entry & RT_OFFSET_MASK;
            let at = table_offset + 8 * i as u64;
            if entry != 0 && (!offset.is_multiple_of(cs) || offset == 0 || entry != offset) {
                return Err(Error::corrupt(
                    file.path(),
                    &format!("refcount table entry {i}"),
                    at,
                    format!("refcount block offset {entry:#x} is not cluster aligned"),
                ));
            }
            if offset != 0 && offset.saturating_add(cs) > file_len.next_multiple_of(cs) {
                return Err(Error::corrupt(
                    file.path(),
                    &format!("refcount table entry {i}"),
                    at,
                    format!("refcount block at {offset:#x} lies past the end of the file"),
                ));
            }
            table.push(offset);
        }
        Ok(Refcounts {
            cluster_bits,
            order,
            entries_per_block: (cs * 8) >> order,
            table_offset,
            table_clusters,
            table,
            cache: Vec::new(),
            cache_next: 0,
            eof: file_len.next_multiple_of(cs),
            free_hint: 1,
            reserve: Vec::new(),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// Index in the cache of the block at `offset`, reading it on a miss.
    fn load_block(&mut self, file: &ImageFile, offset: u64) -> Result<usize> {
        if let Some(i) = self.cache.iter().position(|(o, _)| *o == offset) {
            return Ok(i);
        }
        let mut buf = vec![0u8; self.cs() as usize];
        file.read_at(&mut buf, offset)?;
        if self.cache.len() < BLOCK_CACHE {
            self.cache.push((offset, buf));
            return Ok(self.cache.len() - 1);
        }
        let slot = self.cache_next;
        self.cache_next = (self.cache_next + 1) % BLOCK_CACHE;
        self.cache[slot] = (offset, buf);
        Ok(slot)
    }

    /// Search for free clusters from the start again (after a rebuild).
    pub fn reset_free_hint(&mut self) {
        self.free_hint = 1;
    }

    pub fn get(&mut self, file: &ImageFile, cluster: u64) -> Result<u64> {
        let bi = cluster / self.entries_per_block;
        let block = match self.table.get(bi as usize) {
            Some(&b) if b != 0 => b,
            _ => return Ok(0),
        };
        let slot = self.load_block(file, block)?;
        Ok(entry_get(
            &self.cache[slot].1,
            cluster % self.entries_per_block,
            self.order,
        ))
    }

    /// Set the refcount of one cluster, allocating refcount blocks (and growing the
    /// table) when the cluster is not covered yet.
    pub fn set(&mut self, file: &ImageFile, cluster: u64, value: u64) -> Result<()> {
        if value > self.max_refcount() {
            return Err(Error::invalid(format!(
                "refcount of cluster {cluster} would exceed {} (refcount_bits {})",
                self.max_refcount(),
                1u32 << self.order
            ))
            .with_path(file.path()));
        }
        self.ensure_covered(file, cluster, 0)?;
        let bi = cluster / self.entries_per_block;
        let block = self.table[bi as usize];
        let slot = self.load_block(file, block)?;
        let (start, len) = entry_set(
            &mut self.cache[slot].1,
            cluster % self.entries_per_block,
            self.order,
            value,
        );
        file.write_at(
            &self.cache[slot].1[start..start + len],
            block + start as u64,
        )
    }

    /// Set `count` clusters from `first` to `value`, writing each block once.
    pub fn set_range(
        &mut self,
        file: &ImageFile,
        first: u64,
        count: u64,
        value: u64,
    ) -> Result<()> {
        let epb = self.entries_per_block;
        let mut c = first;
        let end = first + count;
        while c < end {
            self.ensure_covered(file, c, 0)?;
            let bi = c / epb;
            let block = self.table[bi as usize];
            let stop = end.min((bi + 1) * epb);
            let slot = self.load_block(file, block)?;
            let (mut lo, mut hi) = (usize::MAX, 0);
            for x in c..stop {
                let (at, len) = entry_set(&mut self.cache[slot].1, x % epb, self.order, value);
                lo = lo.min(at);
                hi = hi.max(at + len);
            }
            file.write_at(&self.cache[slot].1[lo..hi], block + lo as u64)?;
            c = stop;
        }
        Ok(())
    }

    /// Drop one reference; a cluster that reaches 0 is free again and its space is
    /// returned to the host.
    pub fn decrement(&mut self, file: &ImageFile, cluster: u64) -> Result<()> {
        let value = self.get(file, cluster)?;
        if value == 0 {
            return Err(Error::corrupt(
                file.path(),
                "refcount",
                cluster << self.cluster_bits,
                format!("cluster {cluster} is referenced but its refcount is already 0"),
            ));
        }
        self.set(file, cluster, value - 1)?;
        if value == 1 {
            self.free_hint = self.free_hint.min(cluster.max(1));
            file.punch_hole(cluster << self.cluster_bits, self.cs())?;
        }
        Ok(())
    }

    fn ensure_covered(&mut self, file: &ImageFile, cluster: u64, depth: u32) -> Result<()> {
        if depth > 16 {
            return Err(
                Error::invalid("refcount block allocation does not converge")
                    .with_path(file.path()),
            );
        }
        let cs = self.cs();
        let epb = self.entries_per_block;
        loop {
            let bi = cluster / epb;
            match self.table.get(bi as usize) {
                Some(&b) if b != 0 => return Ok(()),
                Some(_) => {}
                None => {
                    self.grow_table(file, bi)?;
                    continue;
                }
            }
            let block = self.eof / cs;
            self.eof += cs;
            let mut buf = vec![0u8; cs as usize];
            if block / epb == bi {
                // The new block covers itself.
                entry_set(&mut buf, block % epb, self.order, 1);
                file.write_at(&buf, block * cs)?;
            } else {
                file.write_at(&buf, block * cs)?;
                self.ensure_covered(file, block, depth + 1)?;
                self.set(file, block, 1)?;
            }
            self.table[bi as usize] = block * cs;
            file.write_at(&(block * cs).to_be_bytes(), self.table_offset + bi * 8)?;
        }
    }

    /// Replace the refcount table by a bigger one at the end of the file, with the blocks
    /// needed to count the new table and themselves.
    fn grow_table(&mut self, file: &ImageFile, needed_index: u64) -> Result<()> {
        let cs = self.cs();
        let epb = self.entries_per_block;
        let per_cluster = cs / 8;
        let old_len = self.table.len() as u64;
        let mut new_len = (needed_index + 1)
            .max(old_len + old_len / 2 + 1)
            .next_multiple_of(per_cluster);
        let (t0, table_clusters, end) = loop {
            if new_len * 8 > MAX_REFCOUNT_TABLE_BYTES {
                return Err(Error::invalid(
                    "the image file is too large: its refcount table would exceed 8 MiB",
                )
                .with_path(file.path()));
            }
            let table_clusters = new_len * 8 / cs;
            let t0 = self.eof / cs;
            let missing = |end: u64, table: &[u64]| {
                (t0 / epb..=(end - 1) / epb)
                    .filter(|&bi| table.get(bi as usize).is_none_or(|&b| b == 0))
                    .count() as u64
            };
            let mut blocks = 0;
            loop {
                let n = missing(t0 + table_clusters + blocks, &self.table);
                if n == blocks {
                    break;
                }
                blocks = n;
            }
            let end = t0 + table_clusters + blocks;
            if (end - 1) / epb >= new_len {
                new_len = (new_len * 2).next_multiple_of(per_cluster);
                continue;
            }
            break (t0, table_clusters, end);
        };
        let mut new_table = self.table.clone();
        new_table.resize(new_len as usize, 0);
        let mut next_block = t0 + table_clusters;
        let first_bi = t0 / epb;
        let last_bi = (end - 1) / epb;
        let mut fresh = Vec::new();
        for bi in first_bi..=last_bi {
            if new_table[bi as usize] == 0 {
                new_table[bi as usize] = next_block * cs;
                fresh.push(bi);
                next_block += 1;
            }
        }
        self.eof = end * cs;
        // Count the new table and blocks: in the new blocks, then in existing ones.
        for bi in first_bi..=last_bi {
            let lo = t0.max(bi * epb);
            let hi = end.min((bi + 1) * epb);
            let block = new_table[bi as usize];
            if fresh.contains(&bi) {
                let mut buf = vec![0u8; cs as usize];
                for c in lo..hi {
                    entry_set(&mut buf, c % epb, self.order, 1);
                }
                file.write_at(&buf, block)?;
            } else {
                let slot = self.load_block(file, block)?;
                for c in lo..hi {
                    entry_set(&mut self.cache[slot].1, c % epb, self.order, 1);
                }
                file.write_at(&self.cache[slot].1, block)?;
            }
        }
        let mut bytes: Vec<u8> = new_table.iter().flat_map(|e| e.to_be_bytes()).collect();
        bytes.resize((table_clusters * cs) as usize, 0);
        file.write_at(&bytes, t0 * cs)?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&(t0 * cs).to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        file.write_at(&fields, field::REFCOUNT_TABLE_OFFSET)?;
        let old_offset = self.table_offset;
        let old_clusters = self.table_clusters;
        self.table = new_table;
        self.table_offset = t0 * cs;
        self.table_clusters = table_clusters;
        for c in 0..old_clusters {
            self.decrement(file, old_offset / cs + c)?;
        }
        Ok(())
    }

    /// Take `count` contiguous clusters at the end of the file, counted once each.
    pub fn alloc_at_end(&mut self, file: &ImageFile, count: u64) -> Result<u64> {
        let start = self.eof;
        self.eof += count * self.cs();
        self.set_range(file, start / self.cs(), count, 1)?;
        Ok(start)
    }

    /// The lowest free cluster below the end of the file, if any.
    fn find_free(&mut self, file: &ImageFile) -> Result<Option<u64>> {
        let epb = self.entries_per_block;
        let end_cluster = self.eof / self.cs();
        let mut c = self.free_hint.max(1);
        while c < end_cluster {
            let bi = c / epb;
            let block = match self.table.get(bi as usize) {
                Some(&b) if b != 0 => b,
                _ => break,
            };
            let slot = self.load_block(file, block)?;
            let stop = end_cluster.min((bi + 1) * epb);
            while c < stop && entry_get(&self.cache[slot].1, c % epb, self.order) != 0 {
                c += 1;
            }
            if c < stop {
                break;
            }
        }
        if c < end_cluster {
            self.free_hint = c + 1;
            Ok(Some(c))
        } else {
            self.free_hint = end_cluster;
            Ok(None)
        }
    }

    /// `count` counted clusters: free ones below the end of the file first, the rest as
    /// one run at the end (counted with one write per refcount block).
    pub fn alloc_many(&mut self, file: &ImageFile, count: usize) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            match self.find_free(file)? {
                Some(c) => {
                    self.set(file, c, 1)?;
                    out.push(c << self.cluster_bits);
                }
                None => {
                    let rest = (count - out.len()) as u64;
                    let start = self.alloc_at_end(file, rest)?;
                    out.extend((0..rest).map(|i| start + (i << self.cluster_bits)));
                }
            }
        }
        Ok(out)
    }

    /// Clusters from batches that were counted and synced in one go: v2 images have no
    /// dirty bit, so a refcount must be durable before an L2 entry points at it.
    pub fn alloc_synced(
        &mut self,
        file: &ImageFile,
        count: usize,
        batch: usize,
    ) -> Result<Vec<u64>> {
        if self.reserve.len() < count {
            let more = self.alloc_many(file, batch.max(count - self.reserve.len()))?;
            file.sync()?;
            // Kept highest first, so that pops hand out ascending offsets.
            self.reserve.extend(more);
            self.reserve.sort_unstable_by(|a, b| b.cmp(a));
        }
        let keep = self.reserve.len() - count;
        let mut out = self.reserve.split_off(keep);
        out.reverse();
        Ok(out)
    }

    /// Give back the clusters counted for a batch but never used.
    pub fn release_reserve(&mut self, file: &ImageFile) -> Result<()> {
        while let Some(offset) = self.reserve.pop() {
            self.decrement(file, offset >> self.cluster_bits)?;
        }
        Ok(())
    }
}
