//! Opening an image: header, backing reference, L1 table, refcount table and snapshot
//! table, each validated against the file; a dirty image opened writable is repaired.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::header::{field, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::l2cache::{L1Table, L2Cache};
use super::refcount::Refcounts;
use super::{snapshot, Meta, Qcow2Layer, OFFSET_MASK};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{BackingRef, Format, ImageFile};

impl Qcow2Layer {
    pub(super) fn open(file: ImageFile) -> Result<Qcow2Layer> {
        let file_len = file.size()?;
        let header = Header::read(&file, file_len)?;
        let cs = header.cluster_size();
        let backing = Self::backing_ref(&file, &header)?;
        let file_end = file_len.next_multiple_of(cs);
        let l1 = Self::read_l1(&file, &header, file_end)?;
        let refcounts = Refcounts::load(
            &file,
            header.cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters),
            file_len,
        )?;
        let snapshots = snapshot::read(&file, &header, file_len)?;
        let layer = Qcow2Layer {
            cluster_bits: header.cluster_bits,
            l2_bits: header.cluster_bits - 3,
            size: AtomicU64::new(header.size),
            l1: ArcSwap::from_pointee(L1Table::new(header.l1_table_offset, l1)),
            l2_cache: L2Cache::new(cs),
            file_end: AtomicU64::new(file_end),
            refcount_table: (
                AtomicU64::new(header.refcount_table_offset),
                AtomicU64::new(u64::from(header.refcount_table_clusters) * cs),
            ),
            meta: Mutex::new(Meta {
                refcounts,
                incompatible: header.incompatible,
            }),
            corrupt: header.incompatible & INCOMPAT_CORRUPT != 0,
            writes_serialized: header.incompatible & INCOMPAT_CORRUPT != 0
                || (file.is_direct() && cs < file.direct_align() as u64),
            dirty_set: AtomicBool::new(false),
            snapshots,
            backing,
            header,
            file,
        };
        if !layer.file.read_only() && !layer.corrupt {
            layer.prepare_for_writes()?;
        }
        Ok(layer)
    }

    /// On a writable open: repair a dirty image and drop auto-clear bits we do not keep.
    fn prepare_for_writes(&self) -> Result<()> {
        let mut meta = self.meta.lock();
        if meta.incompatible & INCOMPAT_DIRTY != 0 {
            self.rebuild_refcounts(&mut meta)?;
            self.file.sync()?;
            meta.incompatible &= !INCOMPAT_DIRTY;
            self.write_incompatible(meta.incompatible)?;
            self.file.sync()?;
        }
        if self.header.autoclear != 0 {
            self.file
                .write_at(&0u64.to_be_bytes(), field::AUTOCLEAR_FEATURES)?;
            self.file.sync()?;
        }
        Ok(())
    }

    fn backing_ref(file: &ImageFile, header: &Header) -> Result<Option<BackingRef>> {
        let Some(name) = &header.backing_file else {
            return Ok(None);
        };
        let format = match header.backing_format.as_deref() {
            None => None,
            // qemu's protocol drivers name raw data too.
            Some("file" | "host_device") => Some(Format::Raw),
            Some(f) => Some(Format::parse(f).map_err(|_| {
                Error::new(
                    ErrorKind::Unsupported,
                    format!("backing file format '{f}' is not supported (raw, vpc/vhd, qcow2)"),
                )
                .with_path(file.path())
                .with_field("backing format extension")
                .at(header.backing_format_offset)
            })?),
        };
        let candidate = Path::new(name);
        let full: PathBuf = if candidate.is_absolute() {
            candidate.to_path_buf()
        } else {
            file.path()
                .parent()
                .unwrap_or_else(|| Path::new("."))
                .join(candidate)
        };
        if let Ok(meta) = std::fs::metadata(&full) {
            use std::os::unix::fs::MetadataExt;
            if (meta.dev(), meta.ino()) == file.identity()? {
                return Err(Error::corrupt(
                    file.path(),
                    "backing file name",
                    header.backing_file_offset,
                    format!("backing file '{name}' is the image itself"),
                ));
            }
        }
        Ok(Some(BackingRef {
            paths: vec![name.clone()],
            format,
            field: "backing file name",
            field_offset: header.backing_file_offset,
        }))
    }

    fn read_l1(file: &ImageFile, header: &Header, file_end: u64) -> Result<Vec<u64>> {
        let cs = header.cluster_size();
        let mut bytes = vec![0u8; header.l1_size as usize * 8];
        file.read_at(&mut bytes, header.l1_table_offset)?;
        let l1_end = header.l1_table_offset + bytes.len() as u64;
        let rt_start = header.refcount_table_offset;
        let rt_end = rt_start + u64::from(header.refcount_table_clusters) * cs;
        let mut entries = Vec::with_capacity(header.l1_size as usize);
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            let entry = u64::from_be_bytes(b);
            let offset = entry & OFFSET_MASK;
            let at = header.l1_table_offset + 8 * i as u64;
            let bad = |msg: String| Error::corrupt(file.path(), &format!("L1 entry {i}"), at, msg);
            if offset != 0 {
                if !offset.is_multiple_of(cs) {
                    return Err(bad(format!(
                        "L2 table offset {offset:#x} is not cluster aligned"
                    )));
                }
                if offset + cs > file_end {
                    return Err(bad(format!(
                        "L2 table at {offset:#x} lies past the end of the file"
                    )));
                }
                if offset < l1_end && offset + cs > header.l1_table_offset {
                    return Err(bad(format!(
                        "L2 table at {offset:#x} overlaps the L1 table"
                    )));
                }
                if offset < rt_end && offset + cs > rt_start {
                    return Err(bad(format!(
                        "L2 table at {offset:#x} overlaps the refcount table"
                    )));
                }
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}
