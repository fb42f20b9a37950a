//! qcow2, versions 2 and 3 (compat 0.10 and 1.1).
//!
//! Layout of this module: `header` (header, extensions, feature bits), `open` (opening
//! and validating an image, repairing a dirty one), `l2cache` (the
//! in-memory L1 table and the bounded lock-free L2 cache), `refcount` (refcounts of any
//! width, allocation, refcount table growth), `alloc` (writes, copy-on-write, discard,
//! resize), `compress` (compressed clusters), `check` (consistency check and refcount
//! rebuild), `create`, `snapshot` (the snapshot table, tolerated).
//!
//! Refcount policy: refcounts are always updated eagerly, in crash-safe order (a cluster
//! is counted before any table points at it; a pointer is removed before the count drops).
//! Because those writes are not synced one by one, a v3 image is marked dirty (incompatible
//! bit 0, synced) before its first metadata change and marked clean again at flush and on
//! close: a crash leaves the dirty bit set, and whoever opens the image next (ferrotap or
//! qemu) rebuilds the refcounts, exactly as for lazy_refcounts images. So lazy_refcounts
//! is honoured (such images are repaired when found dirty) but never needed. v2 images
//! have no dirty bit: their clusters are counted in batches that are synced before any L2
//! entry points at them (a crash can leak up to one batch, never double-allocate).
//!
//! Memory: the L1 table (8 bytes per L2 table, i.e. per 512 MiB of virtual disk with
//! 64 KiB clusters: 32 KiB for 2 TiB; at most 32 MiB), the L2 cache (at most 8 MiB, see
//! `l2cache`), the refcount table (8 bytes per refcount block; at most 8 MiB) and 4
//! refcount blocks. `check` also counts references in 2 bytes per host cluster while it
//! runs (64 MiB for a full 2 TiB image with 64 KiB clusters).

mod alloc;
mod check;
mod compress;
mod create;
mod header;
mod l2cache;
mod open;
mod refcount;
mod snapshot;

use std::any::Any;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::{BackingRef, CheckReport, Extent, Format, ImageFile, Layer, Mapping, ReadBelow};
use crate::error::{Error, ErrorKind, Result};
use compress::CompressedExtent;
use header::{field, Header, INCOMPAT_DIRTY};
use l2cache::{L1Table, L2Cache, L2Table};
use refcount::Refcounts;
use snapshot::SnapshotTable;

pub use create::create;

/// Bits 9..55 of L1 and standard L2 entries: a cluster offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const FLAG_COPIED: u64 = 1 << 63;
const FLAG_COMPRESSED: u64 = 1 << 62;
const FLAG_ZERO: u64 = 1;

/// qcow2 files start with `QFI\xfb`.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(header::MAGIC)
}

pub fn open(file: ImageFile) -> Result<Arc<dyn Layer>> {
    Ok(Arc::new(Qcow2Layer::open(file)?))
}

/// What one L2 entry says about its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster (0 when none).
    Zero {
        host: u64,
        copied: bool,
    },
    Data {
        host: u64,
        copied: bool,
    },
    Compressed(CompressedExtent),
}

/// State changed only under the metadata mutex.
struct Meta {
    refcounts: Refcounts,
    incompatible: u64,
}

pub struct Qcow2Layer {
    file: ImageFile,
    header: Header,
    cluster_bits: u32,
    /// log2 of the entries in one L2 table.
    l2_bits: u32,
    size: AtomicU64,
    l1: ArcSwap<L1Table>,
    l2_cache: L2Cache,
    /// Cluster-aligned end of the file as far as mapped clusters may reach.
    file_end: AtomicU64,
    /// The refcount table's place, for the metadata-overlap check of `map`.
    refcount_table: (AtomicU64, AtomicU64),
    meta: Mutex<Meta>,
    /// The image carried the corrupt bit at open: writes are refused.
    corrupt: bool,
    /// Every write must go through `Layer::write` (under the metadata lock): with
    /// O_DIRECT and clusters under 4 KiB, a metadata write's read-modify-write of its
    /// 4 KiB span could otherwise undo a concurrent in-place write to a neighbouring
    /// cluster in that span. Also set for corrupt images, whose writes are refused.
    writes_serialized: bool,
    /// We set the dirty bit and owe a clean header at flush or close.
    dirty_set: AtomicBool,
    snapshots: SnapshotTable,
    backing: Option<BackingRef>,
}

impl Qcow2Layer {
    fn virtual_size_now(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    /// The cached L2 table of `l1_index` (at `offset`), reading it on a miss.
    fn l2_table(&self, l1_index: u64, offset: u64) -> Result<Arc<L2Table>> {
        if let Some(table) = self.l2_cache.get(l1_index, offset) {
            return Ok(table);
        }
        let _meta = self.meta.lock();
        self.load_l2_locked(l1_index, offset)
    }

    /// Like `l2_table`, for callers that hold the metadata lock.
    fn load_l2_locked(&self, l1_index: u64, offset: u64) -> Result<Arc<L2Table>> {
        if let Some(table) = self.l2_cache.get(l1_index, offset) {
            return Ok(table);
        }
        let mut bytes = vec![0u8; self.cs() as usize];
        self.file.read_at(&mut bytes, offset)?;
        let table = Arc::new(L2Table::from_bytes(l1_index, offset, &bytes));
        self.l2_cache.insert(Arc::clone(&table));
        Ok(table)
    }

    /// The L1 entry of `l1_index` (0 past the table).
    fn l1_entry(&self, l1_index: u64) -> u64 {
        self.l1.load().get(l1_index).unwrap_or(0)
    }

    /// Decode and validate one L2 entry.
    fn classify(&self, entry: u64, table: &L2Table, index: u64) -> Result<Cluster> {
        let bad = |msg: String| {
            Error::corrupt(
                self.path(),
                &format!("L2 entry {index} of L2 table at {:#x}", table.offset),
                table.offset + index * 8,
                msg,
            )
        };
        let cs = self.cs();
        let file_end = self.file_end.load(Ordering::Acquire);
        if entry & FLAG_COMPRESSED != 0 {
            if entry & FLAG_COPIED != 0 {
                return Err(bad("compressed cluster with the COPIED flag".into()));
            }
            let extent = CompressedExtent::decode(entry & !FLAG_COMPRESSED, self.cluster_bits);
            if extent.offset < cs || extent.offset >= file_end {
                return Err(bad(format!(
                    "compressed data at {:#x} lies in the header or past the end of the file",
                    extent.offset
                )));
            }
            self.check_not_metadata(extent.offset, extent.len, &bad)?;
            return Ok(Cluster::Compressed(extent));
        }
        let host = entry & OFFSET_MASK;
        let copied = entry & FLAG_COPIED != 0;
        if host != 0 {
            if !host.is_multiple_of(cs) {
                return Err(bad(format!(
                    "cluster offset {host:#x} is not cluster aligned"
                )));
            }
            if host + cs > file_end {
                return Err(bad(format!(
                    "cluster at {host:#x} lies past the end of the file"
                )));
            }
            self.check_not_metadata(host, cs, &bad)?;
        }
        if entry & FLAG_ZERO != 0 {
            if self.header.version < 3 {
                return Err(bad("zero flag in a version 2 image".into()));
            }
            return Ok(Cluster::Zero { host, copied });
        }
        if host == 0 {
            return Ok(Cluster::Unallocated);
        }
        Ok(Cluster::Data { host, copied })
    }

    /// Data must not lie in the L1 or refcount table (O(1): two range tests).
    fn check_not_metadata(
        &self,
        start: u64,
        len: u64,
        bad: &dyn Fn(String) -> Error,
    ) -> Result<()> {
        let l1 = self.l1.load();
        let l1_end = l1.offset + l1.len() * 8;
        if l1.len() > 0 && start < l1_end && start + len > l1.offset {
            return Err(bad(format!(
                "cluster at {start:#x} points into the L1 table at {:#x}",
                l1.offset
            )));
        }
        let rt = self.refcount_table.0.load(Ordering::Acquire);
        let rt_end = rt + self.refcount_table.1.load(Ordering::Acquire);
        if start < rt_end && start + len > rt {
            return Err(bad(format!(
                "cluster at {start:#x} points into the refcount table at {rt:#x}"
            )));
        }
        Ok(())
    }

    /// The entry for one guest cluster (lock-free on a cache hit). `lock_held`: the
    /// caller holds the metadata mutex (a miss must not take it again).
    fn lookup(&self, guest_cluster: u64, lock_held: bool) -> Result<Cluster> {
        let l1_index = guest_cluster >> self.l2_bits;
        let l2_offset = self.l1_entry(l1_index) & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Cluster::Unallocated);
        }
        let table = if lock_held {
            self.load_l2_locked(l1_index, l2_offset)?
        } else {
            self.l2_table(l1_index, l2_offset)?
        };
        let index = guest_cluster & (self.l2_entries() - 1);
        self.classify(table.get(index), &table, index)
    }

    fn mapping(&self, cluster: Cluster, in_cluster: u64) -> Mapping {
        match cluster {
            Cluster::Unallocated => Mapping::Parent,
            Cluster::Zero { .. } => Mapping::Zero,
            Cluster::Compressed(_) => Mapping::Encoded,
            Cluster::Data { host, copied } => Mapping::Data {
                file_offset: host + in_cluster,
                shared: !copied || self.writes_serialized,
            },
        }
    }

    /// Map `[offset, offset+len)` as far as the L1 table (always in memory) tells.
    fn map_range(&self, offset: u64, len: u64) -> Result<RangeMapping> {
        let guest_cluster = offset >> self.cluster_bits;
        let l1_index = guest_cluster >> self.l2_bits;
        let table_end = (l1_index + 1) << (self.l2_bits + self.cluster_bits);
        let max_len = len.min(table_end - offset);
        let l2_offset = self.l1_entry(l1_index) & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(RangeMapping::Known(Extent {
                offset,
                len: max_len,
                mapping: Mapping::Parent,
            }));
        }
        Ok(RangeMapping::NeedsTable(TableQuery {
            offset,
            max_len,
            l1_index,
            l2_offset,
        }))
    }

    /// Answer a range from its L2 table: the first cluster's kind, extended over the
    /// following entries of the same kind (O(1) per cluster).
    fn map_in_table(&self, query: &TableQuery, table: &L2Table) -> Result<Extent> {
        let cs = self.cs();
        let (offset, max_len) = (query.offset, query.max_len);
        let in_cluster = offset & (cs - 1);
        let mut index = (offset >> self.cluster_bits) & (self.l2_entries() - 1);
        let first = self.classify(table.get(index), table, index)?;
        let mut got = (cs - in_cluster).min(max_len);
        let mut clusters = 1;
        while got < max_len {
            index += 1;
            let next = self.classify(table.get(index), table, index)?;
            let continues = match (first, next) {
                (
                    Cluster::Data { host, copied },
                    Cluster::Data {
                        host: next_host,
                        copied: next_copied,
                    },
                ) => copied == next_copied && next_host == host + clusters * cs,
                (Cluster::Unallocated, Cluster::Unallocated)
                | (Cluster::Zero { .. }, Cluster::Zero { .. })
                | (Cluster::Compressed(_), Cluster::Compressed(_)) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            got += cs.min(max_len - got);
            clusters += 1;
        }
        Ok(Extent {
            offset,
            len: got,
            mapping: self.mapping(first, in_cluster),
        })
    }

    /// Read a compressed cluster whole.
    fn read_compressed(&self, extent: CompressedExtent, out: &mut [u8]) -> Result<()> {
        let file_len = self.file.size()?;
        let len = extent.len.min(file_len.saturating_sub(extent.offset)) as usize;
        let mut input = vec![0u8; len];
        self.file.read_at(&mut input, extent.offset)?;
        compress::decompress(self.header.compression, &input, out).map_err(|msg| {
            Error::corrupt(
                self.path(),
                "compressed cluster",
                extent.offset,
                format!("{} data: {msg}", self.header.compression.name()),
            )
        })
    }

    fn write_incompatible(&self, bits: u64) -> Result<()> {
        self.file
            .write_at(&bits.to_be_bytes(), field::INCOMPATIBLE_FEATURES)
    }

    fn refuse_if_corrupt(&self) -> Result<()> {
        if self.corrupt {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "the image is marked corrupt (incompatible feature bit 1): writes are refused, \
                 reads are allowed; repair it with qemu-img check -r all",
            )
            .with_path(self.path())
            .with_field("incompatible_features")
            .at(field::INCOMPATIBLE_FEATURES));
        }
        Ok(())
    }

    /// Publish what `map` validates against after a metadata change.
    fn publish(&self, meta: &Meta) {
        self.file_end
            .fetch_max(meta.refcounts.eof, Ordering::AcqRel);
        self.refcount_table
            .0
            .store(meta.refcounts.table_offset, Ordering::Release);
        self.refcount_table.1.store(
            meta.refcounts.table_clusters << self.cluster_bits,
            Ordering::Release,
        );
    }

    /// Make everything durable and the header clean (v3 dirty bit cleared).
    fn flush_locked(&self, meta: &mut Meta) -> Result<()> {
        meta.refcounts.release_reserve(&self.file)?;
        self.file.sync()?;
        if self.dirty_set.swap(false, Ordering::AcqRel) {
            meta.incompatible &= !INCOMPAT_DIRTY;
            self.write_incompatible(meta.incompatible)?;
        }
        Ok(())
    }
}

/// What the L1 table says about a guest range.
enum RangeMapping {
    Known(Extent),
    /// An L2 table decides: the range's own, which may have to be read first.
    NeedsTable(TableQuery),
}

/// A guest range within one L2 table's reach.
struct TableQuery {
    offset: u64,
    /// At most to the end of what the table maps.
    max_len: u64,
    l1_index: u64,
    l2_offset: u64,
}

impl Drop for Qcow2Layer {
    fn drop(&mut self) {
        if self.file.read_only() || self.corrupt {
            return;
        }
        let meta = self.meta.get_mut();
        // Errors cannot be reported from drop; a dirty bit left behind is repaired on open.
        let clean = meta.refcounts.release_reserve(&self.file).is_ok() && self.file.sync().is_ok();
        if clean && self.dirty_set.swap(false, Ordering::AcqRel) {
            meta.incompatible &= !INCOMPAT_DIRTY;
            let bits = meta.incompatible;
            if self.write_incompatible(bits).is_ok() {
                let _ = self.file.sync();
            }
        }
    }
}

impl Layer for Qcow2Layer {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn file(&self) -> &ImageFile {
        &self.file
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn backing(&self) -> Option<BackingRef> {
        self.backing.clone()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        match self.map_range(offset, len)? {
            RangeMapping::Known(extent) => Ok(extent),
            RangeMapping::NeedsTable(query) => {
                let table = self.l2_table(query.l1_index, query.l2_offset)?;
                self.map_in_table(&query, &table)
            }
        }
    }

    fn map_cached(&self, offset: u64, len: u64) -> Result<Option<Extent>> {
        match self.map_range(offset, len)? {
            RangeMapping::Known(extent) => Ok(Some(extent)),
            RangeMapping::NeedsTable(query) => {
                match self.l2_cache.get(query.l1_index, query.l2_offset) {
                    Some(table) => self.map_in_table(&query, &table).map(Some),
                    None => Ok(None),
                }
            }
        }
    }

    fn read_encoded(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.cs();
        let mut cluster_buf = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = (pos & (cs - 1)) as usize;
            let n = (cs as usize - in_cluster).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            // The entry is looked up again: a write may have replaced it since `map`.
            match self.lookup(pos >> self.cluster_bits, false)? {
                Cluster::Compressed(extent) => {
                    cluster_buf.resize(cs as usize, 0);
                    self.read_compressed(extent, &mut cluster_buf)?;
                    piece.copy_from_slice(&cluster_buf[in_cluster..in_cluster + n]);
                }
                Cluster::Data { host, .. } => self.file.read_at(piece, host + in_cluster as u64)?,
                Cluster::Zero { .. } => piece.fill(0),
                Cluster::Unallocated if self.backing.is_none() => piece.fill(0),
                Cluster::Unallocated => {
                    return Err(
                        Error::invalid("compressed cluster was discarded while being read")
                            .with_path(self.path())
                            .at(pos),
                    )
                }
            }
            done += n;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], below: &dyn ReadBelow) -> Result<()> {
        self.refuse_if_corrupt()?;
        let mut meta = self.meta.lock();
        let result = self.write_locked(&mut meta, offset, data, below);
        self.publish(&meta);
        result
    }

    fn discard(&self, offset: u64, len: u64, below: &dyn ReadBelow) -> Result<()> {
        self.refuse_if_corrupt()?;
        let mut meta = self.meta.lock();
        let result = self.discard_locked(&mut meta, offset, len, below);
        self.publish(&meta);
        result
    }

    fn flush(&self) -> Result<()> {
        if self.file.read_only() || self.corrupt {
            return Ok(());
        }
        let mut meta = self.meta.lock();
        self.flush_locked(&mut meta)
    }

    fn check(&self) -> Result<CheckReport> {
        let mut meta = self.meta.lock();
        if !self.file.read_only() && !self.corrupt {
            meta.refcounts.release_reserve(&self.file)?;
        }
        self.check_locked(&mut meta)
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.refuse_if_corrupt()?;
        let mut meta = self.meta.lock();
        let result = self.resize_locked(&mut meta, new_size);
        self.publish(&meta);
        result
    }

    fn cluster_size(&self) -> u64 {
        self.cs()
    }

    fn details(&self) -> serde_json::Value {
        let meta = self.meta.lock();
        let h = &self.header;
        serde_json::json!({
            "compat": if h.version == 2 { "0.10" } else { "1.1" },
            "version": h.version,
            "cluster-size": self.cs(),
            "refcount-bits": 1u32 << h.refcount_order,
            "lazy-refcounts": h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
            "dirty": meta.incompatible & INCOMPAT_DIRTY != 0,
            "corrupt": self.corrupt,
            "compression-type": h.compression.name(),
            "snapshots": self.snapshots.snapshots.len(),
            "backing-format": h.backing_format,
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
