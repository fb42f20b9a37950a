//! Consistency check: count every reference to every host cluster (header, L1 tables of
//! the active state and of each snapshot, L2 tables, data and compressed clusters, the
//! snapshot table, the refcount table and blocks) and compare with the refcounts.
//! The same count rebuilds the refcounts of an image found dirty.

use super::compress::CompressedExtent;
use super::header::AUTOCLEAR_BITMAPS;
use super::{Meta, Qcow2Layer, FLAG_COMPRESSED, FLAG_COPIED, FLAG_ZERO, OFFSET_MASK};
use crate::error::{Error, Result};
use crate::image::{CheckReport, Finding};

/// Largest file `check` counts references for (2 bytes per cluster: 2 GiB of counters).
const MAX_CHECK_CLUSTERS: u64 = 1 << 30;
/// qemu's limits on a bitmap directory and on one bitmap table.
const MAX_BITMAP_BYTES: u64 = 64 << 20;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

struct Counter {
    refs: Vec<u16>,
    cluster_bits: u32,
    report: CheckReport,
}

impl Counter {
    /// Count one reference to every cluster of `[offset, offset+len)`.
    fn add(&mut self, offset: u64, len: u64, field: &str, at: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        if last >= self.refs.len() as u64 {
            self.report.corruptions.push(Finding {
                field: field.to_string(),
                offset: at,
                message: format!("reference to {offset:#x}+{len} lies past the end of the file"),
            });
            return;
        }
        for c in first..=last {
            let r = &mut self.refs[c as usize];
            *r = r.saturating_add(1);
        }
        let end = (last + 1) << self.cluster_bits;
        self.report.image_end_offset = self.report.image_end_offset.max(end);
    }

    fn corruption(&mut self, field: String, offset: u64, message: String) {
        self.report.corruptions.push(Finding {
            field,
            offset,
            message,
        });
    }
}

impl Qcow2Layer {
    /// Count references; with `copied_checks`, also verify the COPIED flags of the active
    /// tables against the refcounts.
    fn count_references(&self, meta: &mut Meta, copied_checks: bool) -> Result<Counter> {
        let cs = self.cs();
        let clusters = meta.refcounts.eof >> self.cluster_bits;
        if clusters > MAX_CHECK_CLUSTERS {
            return Err(Error::unsupported(format!(
                "image has {clusters} host clusters, more than check handles ({MAX_CHECK_CLUSTERS})"
            ))
            .with_path(self.path()));
        }
        let mut counter = Counter {
            refs: vec![0u16; clusters as usize],
            cluster_bits: self.cluster_bits,
            report: CheckReport::default(),
        };
        counter.add(0, cs, "header", 0);
        let l1 = self.l1.load_full();
        let entries: Vec<u64> = (0..l1.len()).filter_map(|i| l1.get(i)).collect();
        counter.add(l1.offset, l1.len() * 8, "l1_table_offset", 40);
        self.walk_l1(meta, &mut counter, &entries, l1.offset, copied_checks)?;
        let snapshots = &self.snapshots;
        if !snapshots.snapshots.is_empty() {
            counter.add(
                self.header.snapshots_offset,
                snapshots.table_bytes,
                "snapshots_offset",
                64,
            );
        }
        for s in &snapshots.snapshots {
            let mut bytes = vec![0u8; s.l1_size as usize * 8];
            self.file.read_at(&mut bytes, s.l1_table_offset)?;
            let entries: Vec<u64> = bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    u64::from_be_bytes(b)
                })
                .collect();
            counter.add(
                s.l1_table_offset,
                bytes.len() as u64,
                "snapshot L1 table",
                s.entry_offset,
            );
            self.walk_l1(meta, &mut counter, &entries, s.l1_table_offset, false)?;
        }
        self.count_bitmaps(&mut counter)?;
        let rc = &meta.refcounts;
        counter.add(
            rc.table_offset,
            rc.table_clusters * cs,
            "refcount_table_offset",
            48,
        );
        for (i, &block) in rc.table.iter().enumerate() {
            if block != 0 {
                counter.add(
                    block,
                    cs,
                    &format!("refcount table entry {i}"),
                    rc.table_offset + 8 * i as u64,
                );
            }
        }
        Ok(counter)
    }

    /// Persistent bitmaps own their directory, tables and data clusters. They count only
    /// while the auto-clear bit vouches for them: a writable open clears it (ferrotap does
    /// not maintain bitmaps), after which qemu too considers them gone and their clusters
    /// leaked (`qemu-img check -r leaks` reclaims them).
    fn count_bitmaps(&self, counter: &mut Counter) -> Result<()> {
        let Some(ext) = self.header.bitmaps else {
            return Ok(());
        };
        let writable = !self.file.read_only() && !self.corrupt;
        if self.header.autoclear & AUTOCLEAR_BITMAPS == 0 || writable {
            return Ok(());
        }
        let cs = self.cs();
        let file_len = self.file.size()?;
        let fits = |offset: u64, len: u64| {
            offset.is_multiple_of(cs) && offset.checked_add(len).is_some_and(|end| end <= file_len)
        };
        if ext.directory_size > MAX_BITMAP_BYTES || !fits(ext.directory_offset, ext.directory_size)
        {
            counter.corruption(
                "bitmaps extension".into(),
                ext.at,
                format!(
                    "bitmap directory at {:#x}+{} is misaligned, too large or past the end of the file",
                    ext.directory_offset, ext.directory_size
                ),
            );
            return Ok(());
        }
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.file.read_at(&mut dir, ext.directory_offset)?;
        counter.add(
            ext.directory_offset,
            ext.directory_size,
            "bitmap directory",
            ext.at,
        );
        let mut at = 0usize;
        for index in 0..ext.count {
            let entry_at = ext.directory_offset + at as u64;
            let field = format!("bitmap directory entry {index}");
            if at + 24 > dir.len() {
                counter.corruption(field, entry_at, "bitmap directory is truncated".into());
                break;
            }
            let e = &dir[at..];
            let table_offset = be64(e, 0);
            let table_entries = u64::from(be32(e, 8));
            let name_len = u16::from_be_bytes([e[18], e[19]]) as usize;
            let extra_len = be32(e, 20) as usize;
            at += (24 + extra_len + name_len).div_ceil(8) * 8;
            let table_bytes = table_entries * 8;
            if table_bytes > MAX_BITMAP_BYTES || !fits(table_offset, table_bytes) {
                counter.corruption(
                    field,
                    entry_at,
                    format!("bitmap table at {table_offset:#x} is misaligned or out of range"),
                );
                continue;
            }
            let mut table = vec![0u8; table_bytes as usize];
            self.file.read_at(&mut table, table_offset)?;
            counter.add(table_offset, table_bytes, &field, entry_at);
            for (j, chunk) in table.chunks_exact(8).enumerate() {
                let data = be64(chunk, 0) & OFFSET_MASK;
                if data != 0 {
                    counter.add(
                        data,
                        cs,
                        &format!("bitmap table entry {j} of table at {table_offset:#x}"),
                        table_offset + 8 * j as u64,
                    );
                }
            }
        }
        Ok(())
    }

    fn walk_l1(
        &self,
        meta: &mut Meta,
        counter: &mut Counter,
        entries: &[u64],
        l1_offset: u64,
        active: bool,
    ) -> Result<()> {
        let cs = self.cs();
        let clusters = counter.refs.len() as u64;
        let mut bytes = vec![0u8; cs as usize];
        for (i, &entry) in entries.iter().enumerate() {
            let l2 = entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let field = format!("L1 entry {i} of L1 table at {l1_offset:#x}");
            let at = l1_offset + 8 * i as u64;
            if !l2.is_multiple_of(cs) || (l2 >> self.cluster_bits) >= clusters {
                counter.corruption(
                    field,
                    at,
                    format!("L2 table offset {l2:#x} is misaligned or past the end of the file"),
                );
                continue;
            }
            counter.add(l2, cs, &field, at);
            if active {
                self.check_copied(meta, counter, entry, l2, field, at)?;
            }
            self.file.read_at(&mut bytes, l2)?;
            for (j, chunk) in bytes.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                let entry = u64::from_be_bytes(b);
                if entry == 0 {
                    continue;
                }
                let field = format!("L2 entry {j} of L2 table at {l2:#x}");
                let at = l2 + 8 * j as u64;
                if entry & FLAG_COMPRESSED != 0 {
                    let extent =
                        CompressedExtent::decode(entry & !FLAG_COMPRESSED, self.cluster_bits);
                    counter.add(extent.offset, extent.len, &field, at);
                    if active {
                        counter.report.allocated_clusters += 1;
                    }
                    continue;
                }
                let host = entry & OFFSET_MASK;
                if entry & FLAG_ZERO != 0 && self.header.version < 3 {
                    counter.corruption(field.clone(), at, "zero flag in a v2 image".into());
                }
                if host == 0 {
                    continue;
                }
                if !host.is_multiple_of(cs) {
                    counter.corruption(
                        field,
                        at,
                        format!("cluster offset {host:#x} is not cluster aligned"),
                    );
                    continue;
                }
                counter.add(host, cs, &field, at);
                if active {
                    counter.report.allocated_clusters += 1;
                    self.check_copied(meta, counter, entry, host, field, at)?;
                }
            }
        }
        Ok(())
    }

    /// In the active tables, COPIED must be set exactly when the refcount is 1.
    fn check_copied(
        &self,
        meta: &mut Meta,
        counter: &mut Counter,
        entry: u64,
        host: u64,
        field: String,
        at: u64,
    ) -> Result<()> {
        if (host >> self.cluster_bits) >= counter.refs.len() as u64 {
            return Ok(());
        }
        let refcount = meta.refcounts.get(&self.file, host >> self.cluster_bits)?;
        if (refcount == 1) != (entry & FLAG_COPIED != 0) {
            counter.corruption(
                field,
                at,
                format!(
                    "COPIED flag is {} but the refcount of {host:#x} is {refcount}",
                    entry & FLAG_COPIED != 0
                ),
            );
        }
        Ok(())
    }

    pub(super) fn check_locked(&self, meta: &mut Meta) -> Result<CheckReport> {
        let mut counter = self.count_references(meta, true)?;
        let cs = self.cs();
        for c in 0..counter.refs.len() as u64 {
            let refcount = meta.refcounts.get(&self.file, c)?;
            let refs = u64::from(counter.refs[c as usize]);
            if refcount == refs {
                continue;
            }
            let finding = Finding {
                field: format!("refcount of cluster {c}"),
                offset: c * cs,
                message: format!("refcount {refcount}, references {refs}"),
            };
            if refcount < refs {
                counter.report.corruptions.push(finding);
            } else {
                counter.report.leaks.push(finding);
            }
        }
        counter.report.total_clusters = self.virtual_size_now().div_ceil(cs);
        Ok(counter.report)
    }

    /// Set every refcount to the number of references (an image found dirty).
    pub(super) fn rebuild_refcounts(&self, meta: &mut Meta) -> Result<()> {
        let counter = self.count_references(meta, false)?;
        if let Some(bad) = counter.report.corruptions.first() {
            return Err(Error::corrupt(
                self.path(),
                &bad.field,
                bad.offset,
                format!(
                    "cannot rebuild the refcounts of this dirty image: {}",
                    bad.message
                ),
            ));
        }
        for c in 0..counter.refs.len() as u64 {
            let want = u64::from(counter.refs[c as usize]);
            if meta.refcounts.get(&self.file, c)? != want {
                meta.refcounts.set(&self.file, c, want)?;
            }
        }
        meta.refcounts.reset_free_hint();
        Ok(())
    }
}
