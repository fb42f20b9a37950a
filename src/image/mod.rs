//! The image layer: one abstraction over raw, VHD and qcow2 files, and chains of them.
//!
//! A [`Layer`] is one file of one format. It maps a guest byte range to an [`Extent`]:
//! data at an offset of its own file, zeros, or "ask the parent". An [`Image`] is a chain of
//! layers (top first): reads fall through to parents, writes go to the top layer, which
//! copies up from the layers below whatever part of a new block the write does not cover.
//!
//! Hot path: [`Layer::map`] takes no lock; when it returns [`Mapping::Data`] that is not
//! shared, the caller does the I/O on the layer's file directly. Everything that changes
//! metadata goes through [`Layer::write`] / [`Layer::discard`], which each format
//! serializes per image and orders for crash safety (data before the pointer to it).

pub mod chain;
pub mod file;
pub mod qcow2;
pub mod raw;
pub mod vhd;

use std::any::Any;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

pub use chain::{Image, ImageOptions, MAX_CHAIN_DEPTH};
pub use file::{ImageFile, OpenMode};

use crate::error::{Error, Result};

/// Guest sector size of the blkif protocol and of VHD.
pub const SECTOR_SIZE: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Vhd,
    Qcow2,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parse a format name; qemu's "vpc" is accepted for VHD.
    pub fn parse(name: &str) -> Result<Format> {
        match name {
            "raw" => Ok(Format::Raw),
            "vhd" | "vpc" => Ok(Format::Vhd),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::invalid(format!(
                "unknown image format '{other}' (expected raw, vhd or qcow2)"
            ))),
        }
    }

    /// Recognize a format from the first and last 512 bytes of a file. Anything that is
    /// neither qcow2 nor VHD is raw.
    pub fn probe(head: &[u8], tail: &[u8]) -> Format {
        if qcow2::probe(head) {
            Format::Qcow2
        } else if vhd::probe(head, tail) {
            Format::Vhd
        } else {
            Format::Raw
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the bytes of an extent come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Stored contiguously in this layer's file from `file_offset`. `shared` data is also
    /// referenced elsewhere (a qcow2 snapshot): read it in place, but writes must go
    /// through [`Layer::write`] so the layer copies it first.
    Data { file_offset: u64, shared: bool },
    /// Reads as zeros, and hides whatever the parent holds there.
    Zero,
    /// Not stored in this layer: read the parent (zeros when there is none).
    Parent,
    /// Stored in this layer in a form only the layer can decode (a compressed cluster):
    /// read it with [`Layer::read_encoded`].
    Encoded,
}

/// A run of guest bytes with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest byte offset where the extent starts.
    pub offset: u64,
    /// Length in bytes, at least 1.
    pub len: u64,
    pub mapping: Mapping,
}

/// What a layer records about its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// Candidate locations in the order to try them (VHD keeps several parent locators);
    /// relative ones are relative to the directory of the child.
    pub paths: Vec<String>,
    /// The parent's format when the child records it (qcow2 backing_fmt).
    pub format: Option<Format>,
    /// The on-disk field that names the parent, and its byte offset, for errors.
    pub field: &'static str,
    pub field_offset: u64,
}

/// The parent a new image is created on.
pub struct CreateBacking {
    /// The name to record in the child, as the user gave it.
    pub name: String,
    pub format: Format,
    /// The parent's top layer, opened (VHD records its UUID and timestamp).
    pub layer: Arc<dyn Layer>,
}

impl CreateBacking {
    /// Open the parent at `path` read-only, to be recorded as `name`; `format` is probed
    /// when not given.
    pub fn open(name: &str, path: &Path, format: Option<Format>) -> Result<CreateBacking> {
        let layer = open_layer(path, format, OpenMode::read_only())?;
        Ok(CreateBacking {
            name: name.to_string(),
            format: layer.format(),
            layer,
        })
    }
}

/// Parameters of `img create`, format-neutral; `options` holds `-o key=value` pairs that
/// each format validates (unknown keys are an error).
pub struct CreateOptions {
    pub size: u64,
    pub backing: Option<CreateBacking>,
    pub options: BTreeMap<String, String>,
}

impl CreateOptions {
    /// `size` bytes, no backing file, no `-o` options.
    pub fn new(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            backing: None,
            options: BTreeMap::new(),
        }
    }

    /// Add `-o key=value` pairs.
    pub fn with_options(mut self, pairs: &[(&str, &str)]) -> CreateOptions {
        self.options
            .extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    pub fn with_backing(mut self, backing: Option<CreateBacking>) -> CreateOptions {
        self.backing = backing;
        self
    }

    /// Take an option out of `options`, so that leftovers can be reported as unknown.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.options.remove(key)
    }

    /// Error on options no format consumed.
    pub fn finish(&self, format: Format) -> Result<()> {
        match self.options.keys().next() {
            None => Ok(()),
            Some(key) => Err(Error::invalid(format!(
                "option '{key}' is not supported by format {format}"
            ))),
        }
    }
}

/// One finding of `img check`.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub field: String,
    pub offset: u64,
    pub message: String,
}

/// The result of a consistency check, with qemu-img check's categories.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Metadata that is wrong and may lose or expose data (exit code 2).
    pub corruptions: Vec<Finding>,
    /// Space allocated but referenced by nothing (exit code 3 when nothing worse).
    pub leaks: Vec<Finding>,
    /// Blocks or clusters allocated in this layer.
    pub allocated_clusters: u64,
    /// Total blocks or clusters of the virtual disk.
    pub total_clusters: u64,
    /// First byte past the last used byte of the file.
    pub image_end_offset: u64,
}

/// Reads from the layers below the one being written (zeros past their end or where none).
pub trait ReadBelow {
    fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// One file of one format. All methods take `&self`: a layer is shared by every queue
/// thread; formats keep their metadata behind atomics and an allocation lock.
pub trait Layer: Send + Sync {
    fn format(&self) -> Format;
    fn file(&self) -> &ImageFile;
    fn virtual_size(&self) -> u64;
    /// The parent this layer needs, if any.
    fn backing(&self) -> Option<BackingRef>;

    /// The first extent of `[offset, offset+len)`; `offset + len <= virtual_size()`, `len > 0`.
    /// Lock-free, O(1) per block or cluster.
    fn map(&self, offset: u64, len: u64) -> Result<Extent>;

    /// Like `map`, but `None` where the answer needs metadata that is not in memory (a VHD
    /// sector bitmap, a qcow2 L2 table): never reads the file. The datapath's queue threads
    /// map with this, and leave a miss to a thread that may block on the read.
    fn map_cached(&self, offset: u64, len: u64) -> Result<Option<Extent>> {
        self.map(offset, len).map(Some)
    }

    /// Like `map`, but may look harder for zeros (holes in a raw file) for block status.
    fn status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.map(offset, len)
    }

    /// Read bytes that `map` called [`Mapping::Encoded`].
    fn read_encoded(&self, offset: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::unsupported("layer has no encoded data")
            .with_path(self.file().path())
            .at(offset))
    }

    /// Write `data` at guest `offset`, allocating what it needs. Whatever part of a newly
    /// allocated block or cluster the write does not cover is copied from `below`.
    fn write(&self, offset: u64, data: &[u8], below: &dyn ReadBelow) -> Result<()>;

    /// Make `[offset, offset+len)` read as zeros, releasing space where the format allows.
    fn discard(&self, offset: u64, len: u64, below: &dyn ReadBelow) -> Result<()>;

    /// Make every completed write (data and metadata) durable.
    fn flush(&self) -> Result<()>;

    /// Check the metadata for corruption and leaks.
    fn check(&self) -> Result<CheckReport>;

    /// Change the virtual size.
    fn resize(&self, new_size: u64) -> Result<()>;

    /// Verify that `parent` is the layer this one was made on (VHD: UUID and timestamp).
    fn check_parent(&self, _parent: &dyn Layer) -> Result<()> {
        Ok(())
    }

    /// Allocation unit in bytes (VHD block, qcow2 cluster, raw: 512).
    fn cluster_size(&self) -> u64;

    /// Format-specific facts for `img info` (subformat, cluster size, compat, ...).
    fn details(&self) -> serde_json::Value;

    fn as_any(&self) -> &dyn Any;
}

/// Create an image file of `format` at `path`.
pub fn create(path: &Path, format: Format, options: CreateOptions) -> Result<()> {
    let result = match format {
        Format::Raw => raw::create(path, options),
        Format::Vhd => vhd::create(path, options),
        Format::Qcow2 => qcow2::create(path, options),
    };
    result.map_err(|e| e.with_path(path))
}

/// Open one file as a layer of `format` (probed when `None`).
pub fn open_layer(path: &Path, format: Option<Format>, mode: OpenMode) -> Result<Arc<dyn Layer>> {
    let file = ImageFile::open(path, mode)?;
    let format = match format {
        Some(f) => f,
        None => probe_file(&file)?,
    };
    let result = match format {
        Format::Raw => raw::open(file),
        Format::Vhd => vhd::open(file),
        Format::Qcow2 => qcow2::open(file),
    };
    result.map_err(|e| e.with_path(path))
}

fn probe_file(file: &ImageFile) -> Result<Format> {
    let len = file.size()?;
    let mut head = [0u8; 512];
    let mut tail = [0u8; 512];
    let head_len = len.min(512) as usize;
    file.read_at(&mut head[..head_len], 0)?;
    if len >= 512 {
        file.read_at(&mut tail, len - 512)?;
    }
    Ok(Format::probe(&head[..head_len], &tail[..head_len]))
}
