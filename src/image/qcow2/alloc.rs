//! Everything that changes the mapping: writes (allocation and copy-on-write), discard and
//! resize. All of it runs under the metadata mutex, in crash-safe order: a new cluster is
//! counted, then its data is written, then the L2 entry (and for a new L2 table, the L1
//! entry) that makes it visible; references are removed before the count drops.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::header::{field, MAX_L1_BYTES, MAX_VIRTUAL_SIZE};
use super::l2cache::{L1Table, L2Table};
use super::{Cluster, Meta, Qcow2Layer, FLAG_COPIED, FLAG_ZERO, INCOMPAT_DIRTY, OFFSET_MASK};
use crate::error::{Error, Result};
use crate::image::ReadBelow;

/// v2 images count clusters in batches of this many around one sync.
const V2_ALLOC_BATCH: usize = 16;

impl Qcow2Layer {
    /// Before the first metadata change of a v3 image: set the dirty bit, durably.
    fn begin_change(&self, meta: &mut Meta) -> Result<()> {
        if self.header.version >= 3 && !self.dirty_set.load(Ordering::Acquire) {
            meta.incompatible |= INCOMPAT_DIRTY;
            self.write_incompatible(meta.incompatible)?;
            self.file.sync()?;
            self.dirty_set.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// `count` new, counted clusters.
    fn alloc_clusters(&self, meta: &mut Meta, count: usize) -> Result<Vec<u64>> {
        let offsets = if self.header.version >= 3 {
            meta.refcounts.alloc_many(&self.file, count)?
        } else {
            meta.refcounts
                .alloc_synced(&self.file, count, V2_ALLOC_BATCH)?
        };
        if let Some(&end) = offsets.iter().max() {
            self.file_end.fetch_max(end + self.cs(), Ordering::AcqRel);
        }
        Ok(offsets)
    }

    /// A new, counted cluster.
    fn alloc_cluster(&self, meta: &mut Meta) -> Result<u64> {
        self.alloc_clusters(meta, 1)?
            .first()
            .copied()
            .ok_or_else(|| Error::invalid("no cluster allocated").with_path(self.path()))
    }

    /// Drop the reference an L2 entry held (after the entry no longer holds it).
    fn drop_reference(&self, meta: &mut Meta, old: Cluster) -> Result<()> {
        match old {
            Cluster::Unallocated | Cluster::Zero { host: 0, .. } => Ok(()),
            Cluster::Zero { host, .. } | Cluster::Data { host, .. } => meta
                .refcounts
                .decrement(&self.file, host >> self.cluster_bits),
            Cluster::Compressed(extent) => {
                for c in extent.clusters(self.cluster_bits) {
                    meta.refcounts.decrement(&self.file, c)?;
                }
                Ok(())
            }
        }
    }

    fn set_l1_entry(&self, l1: &L1Table, index: u64, value: u64) -> Result<()> {
        self.file
            .write_at(&value.to_be_bytes(), l1.offset + index * 8)?;
        if let Some(e) = l1.entries.get(index as usize) {
            e.store(value, Ordering::Release);
        }
        Ok(())
    }

    fn set_l2_entry(&self, table: &L2Table, index: u64, value: u64) -> Result<()> {
        self.file
            .write_at(&value.to_be_bytes(), table.offset + index * 8)?;
        if let Some(e) = table.entries.get(index as usize) {
            e.store(value, Ordering::Release);
        }
        Ok(())
    }

    /// The L2 table of `l1_index`, ready to be changed: allocated if missing, copied if
    /// shared with a snapshot.
    fn l2_for_write(&self, meta: &mut Meta, l1_index: u64) -> Result<Arc<L2Table>> {
        let l1 = self.l1.load_full();
        let entry = l1.get(l1_index).ok_or_else(|| {
            Error::invalid(format!(
                "guest cluster past the L1 table (index {l1_index})"
            ))
            .with_path(self.path())
        })?;
        let old_offset = entry & OFFSET_MASK;
        if old_offset != 0 && entry & FLAG_COPIED != 0 {
            return self.load_l2_locked(l1_index, old_offset);
        }
        let new_offset = self.alloc_cluster(meta)?;
        let table = if old_offset == 0 {
            let bytes = vec![0u8; self.cs() as usize];
            self.file.write_at(&bytes, new_offset)?;
            Arc::new(L2Table::from_bytes(l1_index, new_offset, &bytes))
        } else {
            let old = self.load_l2_locked(l1_index, old_offset)?;
            let bytes = old.to_bytes();
            self.file.write_at(&bytes, new_offset)?;
            Arc::new(L2Table::from_bytes(l1_index, new_offset, &bytes))
        };
        self.set_l1_entry(&l1, l1_index, new_offset | FLAG_COPIED)?;
        self.l2_cache.insert(Arc::clone(&table));
        if old_offset != 0 {
            meta.refcounts
                .decrement(&self.file, old_offset >> self.cluster_bits)?;
        }
        Ok(table)
    }

    pub(super) fn write_locked(
        &self,
        meta: &mut Meta,
        offset: u64,
        data: &[u8],
        below: &dyn ReadBelow,
    ) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        self.begin_change(meta)?;
        let cs = self.cs();
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let in_cluster = pos & (cs - 1);
            if in_cluster == 0 && (data.len() - done) as u64 >= cs {
                let n = self.write_whole_clusters(meta, pos >> self.cluster_bits, &data[done..])?;
                if n > 0 {
                    done += n;
                    continue;
                }
            }
            let n = ((cs - in_cluster) as usize).min(data.len() - done);
            self.write_cluster(
                meta,
                pos >> self.cluster_bits,
                in_cluster,
                &data[done..done + n],
                below,
            )?;
            done += n;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.virtual_size_now();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::invalid(format!(
                "range {offset}+{len} lies past the end of the {size}-byte disk"
            ))
            .with_path(self.path())),
        }
    }

    /// Write `piece` at `in_cluster` of one guest cluster.
    fn write_cluster(
        &self,
        meta: &mut Meta,
        guest_cluster: u64,
        in_cluster: u64,
        piece: &[u8],
        below: &dyn ReadBelow,
    ) -> Result<()> {
        let cs = self.cs();
        let l1_index = guest_cluster >> self.l2_bits;
        let index = guest_cluster & (self.l2_entries() - 1);
        let table = self.l2_for_write(meta, l1_index)?;
        let old = self.classify(table.get(index), &table, index)?;
        if let Cluster::Data { host, copied: true } = old {
            // Allocated and ours alone (another writer got here first): in place.
            return self.file.write_at(piece, host + in_cluster);
        }
        let whole = in_cluster == 0 && piece.len() as u64 == cs;
        // A preallocated zero cluster that is ours alone is reused in place.
        let (host, reused) = match old {
            Cluster::Zero { host, copied: true } if host != 0 => (host, true),
            _ => (self.alloc_cluster(meta)?, false),
        };
        let zero_base = match old {
            Cluster::Zero { .. } => true,
            Cluster::Unallocated => self.backing.is_none(),
            _ => false,
        };
        if whole {
            self.file.write_at(piece, host)?;
        } else if zero_base && !reused && host >= self.file.size()? {
            // A new cluster past the end of the file reads as zeros already: extend the
            // file over it (sparse) and write only the piece.
            self.file.set_len(host + cs)?;
            self.file.write_at(piece, host + in_cluster)?;
        } else {
            let mut buf = vec![0u8; cs as usize];
            self.fill_old_contents(old, guest_cluster, &mut buf, below)?;
            buf[in_cluster as usize..in_cluster as usize + piece.len()].copy_from_slice(piece);
            self.file.write_at(&buf, host)?;
        }
        self.set_l2_entry(&table, index, host | FLAG_COPIED)?;
        if !reused {
            self.drop_reference(meta, old)?;
        }
        Ok(())
    }

    /// Write a run of whole guest clusters that all need new host clusters (within one
    /// L2 table) with one data write per contiguous host run and one L2 write. Returns the
    /// bytes written: 0 when the first cluster is not such a cluster.
    fn write_whole_clusters(&self, meta: &mut Meta, first: u64, data: &[u8]) -> Result<usize> {
        let cs = self.cs();
        let l1_index = first >> self.l2_bits;
        let index0 = first & (self.l2_entries() - 1);
        let max_run = (data.len() as u64 / cs).min(self.l2_entries() - index0);
        let table = self.l2_for_write(meta, l1_index)?;
        let mut olds = Vec::new();
        for k in 0..max_run {
            let old = self.classify(table.get(index0 + k), &table, index0 + k)?;
            match old {
                Cluster::Data { copied: true, .. } => break,
                Cluster::Zero { host, copied: true } if host != 0 => break,
                _ => olds.push(old),
            }
        }
        if olds.is_empty() {
            return Ok(0);
        }
        let hosts = self.alloc_clusters(meta, olds.len())?;
        let mut k = 0;
        while k < hosts.len() {
            let mut run = 1;
            while k + run < hosts.len() && hosts[k + run] == hosts[k] + run as u64 * cs {
                run += 1;
            }
            let start = k * cs as usize;
            self.file
                .write_at(&data[start..start + run * cs as usize], hosts[k])?;
            k += run;
        }
        let entries: Vec<u8> = hosts
            .iter()
            .flat_map(|h| (h | FLAG_COPIED).to_be_bytes())
            .collect();
        self.file.write_at(&entries, table.offset + index0 * 8)?;
        for (k, host) in hosts.iter().enumerate() {
            if let Some(e) = table.entries.get((index0 + k as u64) as usize) {
                e.store(host | FLAG_COPIED, Ordering::Release);
            }
        }
        for old in olds.iter() {
            self.drop_reference(meta, *old)?;
        }
        Ok(hosts.len() * cs as usize)
    }

    /// The current contents of a guest cluster that is about to be replaced.
    fn fill_old_contents(
        &self,
        old: Cluster,
        guest_cluster: u64,
        buf: &mut [u8],
        below: &dyn ReadBelow,
    ) -> Result<()> {
        match old {
            Cluster::Zero { .. } => buf.fill(0),
            Cluster::Data { host, .. } => self.file.read_at(buf, host)?,
            Cluster::Compressed(extent) => self.read_compressed(extent, buf)?,
            Cluster::Unallocated => {
                // Only the part inside the virtual disk comes from below.
                let start = guest_cluster << self.cluster_bits;
                let inside = self
                    .virtual_size_now()
                    .saturating_sub(start)
                    .min(buf.len() as u64) as usize;
                buf[inside..].fill(0);
                if inside > 0 {
                    below.read_below(&mut buf[..inside], start)?;
                }
            }
        }
        Ok(())
    }

    /// Whether a guest cluster reads as zeros without looking below.
    fn reads_zero(&self, cluster: Cluster) -> bool {
        match cluster {
            Cluster::Zero { .. } => true,
            Cluster::Unallocated => self.backing.is_none(),
            _ => false,
        }
    }

    pub(super) fn discard_locked(
        &self,
        meta: &mut Meta,
        offset: u64,
        len: u64,
        below: &dyn ReadBelow,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        self.begin_change(meta)?;
        let cs = self.cs();
        let size = self.virtual_size_now();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let guest_cluster = pos >> self.cluster_bits;
            let start = guest_cluster << self.cluster_bits;
            let cluster_end = (start + cs).min(size);
            let piece_end = end.min(start + cs);
            if pos == start && piece_end >= cluster_end {
                self.discard_cluster(meta, guest_cluster, cluster_end - start, below)?;
            } else {
                let old = self.lookup(guest_cluster, true)?;
                if !self.reads_zero(old) {
                    let zeros = vec![0u8; (piece_end - pos) as usize];
                    self.write_cluster(meta, guest_cluster, pos - start, &zeros, below)?;
                }
            }
            pos = piece_end;
        }
        Ok(())
    }

    /// Make one whole guest cluster (`len` bytes of it inside the disk) read as zeros.
    fn discard_cluster(
        &self,
        meta: &mut Meta,
        guest_cluster: u64,
        len: u64,
        below: &dyn ReadBelow,
    ) -> Result<()> {
        let old = self.lookup(guest_cluster, true)?;
        if self.reads_zero(old) && !matches!(old, Cluster::Zero { host, .. } if host != 0) {
            return Ok(());
        }
        if self.header.version < 3 && self.backing.is_some() {
            // v2 cannot say "zero" over a backing file: write zeros.
            let zeros = vec![0u8; len as usize];
            return self.write_cluster(meta, guest_cluster, 0, &zeros, below);
        }
        let l1_index = guest_cluster >> self.l2_bits;
        let index = guest_cluster & (self.l2_entries() - 1);
        let table = self.l2_for_write(meta, l1_index)?;
        let old = self.classify(table.get(index), &table, index)?;
        let new_entry = if self.header.version >= 3 {
            FLAG_ZERO
        } else {
            0
        };
        self.set_l2_entry(&table, index, new_entry)?;
        self.drop_reference(meta, old)
    }

    pub(super) fn resize_locked(&self, meta: &mut Meta, new_size: u64) -> Result<()> {
        if !new_size.is_multiple_of(512) || new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::invalid(format!(
                "qcow2 size {new_size} must be a multiple of 512 and at most 2^62"
            ))
            .with_path(self.path()));
        }
        let old_size = self.virtual_size_now();
        if new_size < old_size {
            self.check_unallocated_from(new_size, old_size)?;
        }
        self.begin_change(meta)?;
        let l2_span = self.cs() << self.l2_bits;
        let needed = new_size.div_ceil(l2_span);
        if needed > self.l1.load().len() {
            self.grow_l1(meta, needed)?;
        }
        self.file.write_at(&new_size.to_be_bytes(), field::SIZE)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Shrinking is allowed only over guest clusters nothing is stored in.
    fn check_unallocated_from(&self, new_size: u64, old_size: u64) -> Result<()> {
        let first = new_size.div_ceil(self.cs());
        let last = old_size.div_ceil(self.cs());
        let mut c = first;
        while c < last {
            let l1_index = c >> self.l2_bits;
            let next_table = (l1_index + 1) << self.l2_bits;
            let l2_offset = self.l1_entry(l1_index) & OFFSET_MASK;
            if l2_offset == 0 {
                c = next_table;
                continue;
            }
            let table = self.load_l2_locked(l1_index, l2_offset)?;
            while c < last.min(next_table) {
                // Zero flags without a cluster hold no data; anything else does.
                let entry = table.get(c & (self.l2_entries() - 1));
                if entry != 0 && entry != FLAG_ZERO {
                    return Err(Error::invalid(format!(
                        "cannot shrink to {new_size} bytes: guest offset {:#x} is allocated",
                        c << self.cluster_bits
                    ))
                    .with_path(self.path()));
                }
                c += 1;
            }
        }
        Ok(())
    }

    /// Grow the L1 table to `needed` entries: in place when its clusters have room, else
    /// into new clusters (written before the header points at them).
    fn grow_l1(&self, meta: &mut Meta, needed: u64) -> Result<()> {
        if needed * 8 > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "the L1 table would need {needed} entries, over the 32 MiB limit; \
                 use a larger cluster size"
            ))
            .with_path(self.path()));
        }
        let cs = self.cs();
        let old = self.l1.load_full();
        let mut entries: Vec<u64> = (0..old.len()).filter_map(|i| old.get(i)).collect();
        entries.resize(needed as usize, 0);
        let old_clusters = (old.len() * 8).div_ceil(cs);
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        if old.len() > 0 && needed * 8 <= old_clusters * cs {
            self.file
                .write_at(&bytes[old.len() as usize * 8..], old.offset + old.len() * 8)?;
            self.file
                .write_at(&(needed as u32).to_be_bytes(), field::L1_SIZE)?;
            self.l1.store(Arc::new(L1Table::new(old.offset, entries)));
            return Ok(());
        }
        let clusters = (needed * 8).div_ceil(cs);
        let offset = meta.refcounts.alloc_at_end(&self.file, clusters)?;
        let mut padded = bytes;
        padded.resize((clusters * cs) as usize, 0);
        self.file.write_at(&padded, offset)?;
        if self.header.version < 3 {
            self.file.sync()?;
        }
        let mut fields = [0u8; 12];
        fields[..4].copy_from_slice(&(needed as u32).to_be_bytes());
        fields[4..].copy_from_slice(&offset.to_be_bytes());
        self.file.write_at(&fields, field::L1_SIZE)?;
        self.file_end
            .fetch_max(offset + clusters * cs, Ordering::AcqRel);
        self.l1.store(Arc::new(L1Table::new(offset, entries)));
        if old.len() > 0 {
            for c in 0..old_clusters {
                meta.refcounts
                    .decrement(&self.file, (old.offset >> self.cluster_bits) + c)?;
            }
        }
        Ok(())
    }
}
