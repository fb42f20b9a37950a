//! Raw images: a regular file or a block device, guest offset = file offset.

use std::any::Any;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{
    BackingRef, CheckReport, CreateOptions, Extent, Format, ImageFile, Layer, Mapping, ReadBelow,
    SECTOR_SIZE,
};
use crate::error::{Error, Result};

pub struct RawLayer {
    file: ImageFile,
    size: AtomicU64,
}

pub fn open(file: ImageFile) -> Result<Arc<dyn Layer>> {
    let size = file.size()?;
    Ok(Arc::new(RawLayer {
        file,
        size: AtomicU64::new(size),
    }))
}

/// Create a sparse raw file; `-o preallocation=full` writes zeros, `falloc` reserves space.
pub fn create(path: &Path, mut options: CreateOptions) -> Result<()> {
    if options.backing.is_some() {
        return Err(Error::invalid("raw images cannot have a backing file"));
    }
    let preallocation = options.take("preallocation");
    options.finish(Format::Raw)?;
    let file = ImageFile::create(path)?;
    match preallocation.as_deref() {
        None | Some("off") => file.set_len(options.size)?,
        Some("full") => {
            file.write_zeros(0, options.size)?;
            file.set_len(options.size)?;
        }
        Some("falloc") => {
            file.set_len(options.size)?;
            file.reserve(0, options.size)?;
        }
        Some(other) => {
            return Err(Error::invalid(format!(
                "preallocation '{other}' is not one of off, falloc, full"
            )))
        }
    }
    file.sync()
}

impl Layer for RawLayer {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn file(&self) -> &ImageFile {
        &self.file
    }

    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn backing(&self) -> Option<BackingRef> {
        None
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        Ok(Extent {
            offset,
            len,
            mapping: Mapping::Data {
                file_offset: offset,
                shared: false,
            },
        })
    }

    fn status(&self, offset: u64, len: u64) -> Result<Extent> {
        let (len, data) = self.file.data_or_hole(offset, len)?;
        let mapping = if data {
            Mapping::Data {
                file_offset: offset,
                shared: false,
            }
        } else {
            Mapping::Zero
        };
        Ok(Extent {
            offset,
            len,
            mapping,
        })
    }

    fn write(&self, offset: u64, data: &[u8], _below: &dyn ReadBelow) -> Result<()> {
        self.file.write_at(data, offset)
    }

    fn discard(&self, offset: u64, len: u64, _below: &dyn ReadBelow) -> Result<()> {
        self.file.punch_hole(offset, len)
    }

    fn flush(&self) -> Result<()> {
        self.file.sync()
    }

    fn check(&self) -> Result<CheckReport> {
        let size = self.virtual_size();
        Ok(CheckReport {
            total_clusters: size.div_ceil(SECTOR_SIZE),
            allocated_clusters: size.div_ceil(SECTOR_SIZE),
            image_end_offset: size,
            ..CheckReport::default()
        })
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if self.file.is_block_device() {
            // A device is resized by its owner (LVM); pick up the size it has now.
            let device_size = self.file.size()?;
            if new_size > device_size {
                return Err(Error::invalid(format!(
                    "block device holds {device_size} bytes, cannot grow to {new_size}"
                ))
                .with_path(self.file.path()));
            }
        } else {
            self.file.set_len(new_size)?;
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn cluster_size(&self) -> u64 {
        SECTOR_SIZE
    }

    fn details(&self) -> serde_json::Value {
        serde_json::json!({ "block-device": self.file.is_block_device() })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
