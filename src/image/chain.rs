//! A chain of layers, top first: the guest's view of a disk.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{open_layer, BackingRef, Extent, Format, Layer, Mapping, OpenMode, ReadBelow};
use crate::error::{Error, ErrorKind, Result};

/// Longest chain ferrotap opens; deeper ones are refused as corrupt or malicious.
/// (XCP-ng keeps VHD chains under 30; qcow2 snapshot chains are shorter still.)
pub const MAX_CHAIN_DEPTH: usize = 64;

/// How to open a chain.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImageOptions {
    /// Open the top layer read-only too (parents always are).
    pub read_only: bool,
    /// O_DIRECT on every layer.
    pub direct: bool,
    /// Format of the top layer; probed when `None`.
    pub format: Option<Format>,
    /// Open only the top layer, leaving its parent unopened (reads of unallocated
    /// ranges then return zeros). For inspecting a layer on its own.
    pub no_backing: bool,
}

/// An opened chain: `layers[0]` is the top (the only one written), the last is the base.
pub struct Image {
    layers: Vec<Arc<dyn Layer>>,
}

/// Where a run of guest bytes is answered from, across the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    pub offset: u64,
    pub len: u64,
    /// Index of the layer that holds the bytes, or `None` when no layer does.
    pub depth: Option<usize>,
    /// The bytes read as zeros.
    pub zero: bool,
}

impl Image {
    /// Open `path` and every parent it names.
    pub fn open(path: &Path, options: ImageOptions) -> Result<Image> {
        let top_mode = OpenMode {
            read_only: options.read_only,
            direct: options.direct,
        };
        let parent_mode = OpenMode {
            read_only: true,
            direct: options.direct,
        };
        let mut layers: Vec<Arc<dyn Layer>> = Vec::new();
        let mut seen = HashSet::new();
        // The next file to open, and the child's record that named it (for errors).
        let mut next = Some((path.to_path_buf(), options.format, top_mode));
        let mut named_by: Option<(PathBuf, BackingRef)> = None;
        while let Some((layer_path, format, mode)) = next.take() {
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!("backing chain deeper than {MAX_CHAIN_DEPTH} layers"),
                )
                .with_path(path));
            }
            let layer = open_layer(&layer_path, format, mode)?;
            if !seen.insert(layer.file().identity()?) {
                let err = Error::new(
                    ErrorKind::Corrupt,
                    format!("backing chain loops back to {}", layer_path.display()),
                );
                return Err(match named_by {
                    Some((child, backing)) => err
                        .with_path(&child)
                        .with_field(backing.field)
                        .at(backing.field_offset),
                    None => err.with_path(path),
                });
            }
            if let Some(child) = layers.last() {
                child.check_parent(layer.as_ref())?;
            }
            if !options.no_backing {
                if let Some(backing) = layer.backing() {
                    let parent = resolve_backing(&layer_path, &backing)?;
                    next = Some((parent, backing.format, parent_mode));
                    named_by = Some((layer_path.clone(), backing));
                }
            }
            layers.push(layer);
        }
        Ok(Image { layers })
    }

    /// A chain from layers already opened (top first). Used by tests and by `img` commands
    /// that build a chain by hand.
    pub fn from_layers(layers: Vec<Arc<dyn Layer>>) -> Result<Image> {
        if layers.is_empty() {
            return Err(Error::invalid("an image needs at least one layer"));
        }
        Ok(Image { layers })
    }

    pub fn layers(&self) -> &[Arc<dyn Layer>] {
        &self.layers
    }

    pub fn top(&self) -> &Arc<dyn Layer> {
        &self.layers[0]
    }

    pub fn virtual_size(&self) -> u64 {
        self.top().virtual_size()
    }

    pub fn read_only(&self) -> bool {
        self.top().file().read_only()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::invalid(format!(
                "range {offset}+{len} lies past the end of the {size}-byte disk"
            ))
            .with_path(self.top().file().path())),
        }
    }

    /// Fill `buf` with the guest bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        read_layers(&self.layers, buf, offset)
    }

    /// Fill `buf` with the guest bytes at `offset` as layer `depth` and those below it see
    /// them (zeros past the chain's last layer).
    pub fn read_below_layer(&self, depth: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        read_layers(self.layers.get(depth..).unwrap_or_default(), buf, offset)
    }

    /// Write guest bytes at `offset` into the top layer.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, data.len() as u64)?;
        let top = self.top();
        if top.file().read_only() {
            return Err(Error::read_only(top.file().path()));
        }
        let below = Below(&self.layers[1..]);
        let mut done = 0usize;
        while done < data.len() {
            let pos = offset + done as u64;
            let extent = top.map(pos, (data.len() - done) as u64)?;
            let n = extent.len as usize;
            let piece = &data[done..done + n];
            match extent.mapping {
                // Fast path: allocated, unshared data is overwritten in place.
                Mapping::Data {
                    file_offset,
                    shared: false,
                } => top.file().write_at(piece, file_offset)?,
                _ => top.write(pos, piece, &below)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Make `[offset, offset+len)` read as zeros, deallocating where the format allows.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        let top = self.top();
        if top.file().read_only() {
            return Err(Error::read_only(top.file().path()));
        }
        top.discard(offset, len, &Below(&self.layers[1..]))
    }

    /// Make every completed write durable (only the top layer is ever written).
    pub fn flush(&self) -> Result<()> {
        self.top().flush()
    }

    /// Allocation status of the first run of `[offset, offset+len)`.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_range(offset, len)?;
        let mut len = len;
        for (depth, layer) in self.layers.iter().enumerate() {
            if offset >= layer.virtual_size() {
                break;
            }
            let extent = layer.status(offset, len.min(layer.virtual_size() - offset))?;
            len = extent.len;
            match extent.mapping {
                Mapping::Parent => continue,
                Mapping::Zero => {
                    return Ok(BlockStatus {
                        offset,
                        len,
                        depth: Some(depth),
                        zero: true,
                    })
                }
                Mapping::Data { .. } | Mapping::Encoded => {
                    return Ok(BlockStatus {
                        offset,
                        len,
                        depth: Some(depth),
                        zero: false,
                    })
                }
            }
        }
        Ok(BlockStatus {
            offset,
            len,
            depth: None,
            zero: true,
        })
    }

    /// Every extent of one layer, merged where adjacent runs have the same kind.
    pub fn layer_extents(&self, depth: usize) -> Result<Vec<Extent>> {
        let layer = self
            .layers
            .get(depth)
            .ok_or_else(|| Error::invalid(format!("the chain has no layer {depth}")))?;
        let size = layer.virtual_size();
        let mut extents: Vec<Extent> = Vec::new();
        let mut offset = 0;
        while offset < size {
            let extent = layer.status(offset, size - offset)?;
            offset += extent.len;
            if let Some(last) = extents.last_mut() {
                if mergeable(last, &extent) {
                    last.len += extent.len;
                    continue;
                }
            }
            extents.push(extent);
        }
        Ok(extents)
    }
}

fn mergeable(a: &Extent, b: &Extent) -> bool {
    match (a.mapping, b.mapping) {
        (
            Mapping::Data {
                file_offset: fa,
                shared: sa,
            },
            Mapping::Data {
                file_offset: fb,
                shared: sb,
            },
        ) => sa == sb && fa + a.len == fb,
        (x, y) => x == y,
    }
}

/// The layers under the one being written, as a [`ReadBelow`].
struct Below<'a>(&'a [Arc<dyn Layer>]);

impl ReadBelow for Below<'_> {
    fn read_below(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_layers(self.0, buf, offset)
    }
}

/// Read through `layers` (top first); bytes no layer holds, or past a layer's end, are zeros.
fn read_layers(layers: &[Arc<dyn Layer>], buf: &mut [u8], offset: u64) -> Result<()> {
    let Some((layer, parents)) = layers.split_first() else {
        buf.fill(0);
        return Ok(());
    };
    let size = layer.virtual_size();
    let inside = if offset >= size {
        0
    } else {
        (size - offset).min(buf.len() as u64) as usize
    };
    buf[inside..].fill(0);
    let mut done = 0usize;
    while done < inside {
        let pos = offset + done as u64;
        let extent = layer.map(pos, (inside - done) as u64)?;
        let n = extent.len as usize;
        let piece = &mut buf[done..done + n];
        match extent.mapping {
            Mapping::Data { file_offset, .. } => layer.file().read_at(piece, file_offset)?,
            Mapping::Zero => piece.fill(0),
            Mapping::Parent => read_layers(parents, piece, pos)?,
            Mapping::Encoded => layer.read_encoded(pos, piece)?,
        }
        done += n;
    }
    Ok(())
}

/// Find a parent among the candidate locations a child records.
fn resolve_backing(child: &Path, backing: &BackingRef) -> Result<PathBuf> {
    let dir = child.parent().unwrap_or_else(|| Path::new("."));
    for candidate in &backing.paths {
        let candidate_path = Path::new(candidate);
        let full = if candidate_path.is_absolute() {
            candidate_path.to_path_buf()
        } else {
            dir.join(candidate_path)
        };
        if full.exists() {
            return Ok(full);
        }
    }
    Err(Error::invalid(format!(
        "backing file not found (tried: {})",
        backing.paths.join(", ")
    ))
    .with_path(child)
    .with_field(backing.field)
    .at(backing.field_offset))
}
