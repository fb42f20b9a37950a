//! `img map [--json] [--layers] [-f FMT] FILE`: the guest address space as extents with
//! qemu-img map's fields, or (`--layers`) what each layer of the chain holds.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use serde_json::json;

use super::{format_arg, open_image, run_length, OutputArgs};
use crate::error::Result;
use crate::image::{Extent, Format, Image, Mapping};

#[derive(Debug, Args)]
pub struct MapArgs {
    /// Format of FILE (probed when omitted).
    #[arg(short = 'f', value_name = "FMT", value_parser = format_arg)]
    pub format: Option<Format>,
    #[command(flatten)]
    pub output: OutputArgs,
    /// List the extents of every layer on its own instead of the merged guest view.
    #[arg(long)]
    pub layers: bool,
    /// The image (with its chain) to map.
    pub file: PathBuf,
}

/// One extent of the guest view, in qemu-img map's JSON shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// The layer answering (0 = top); for bytes no layer holds, the bottom layer's depth.
    pub depth: usize,
    /// Some layer holds the range (as data or as explicit zeros).
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    /// Byte offset in the file of layer `depth`, where the data lies there unencoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl MapEntry {
    /// `next` continues `self` with the same attributes (and contiguous file offsets).
    fn continued_by(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// The guest view of `image`, merged like qemu-img map merges.
pub fn guest_map(image: &Image) -> Result<Vec<MapEntry>> {
    let size = image.virtual_size();
    let bottom = image.layers().len() - 1;
    let mut entries: Vec<MapEntry> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let status = image.block_status(pos, size - pos)?;
        let mut entry = MapEntry {
            start: pos,
            length: run_length(status.len, size - pos, pos)?,
            depth: status.depth.unwrap_or(bottom),
            present: status.depth.is_some(),
            zero: status.zero,
            data: !status.zero,
            compressed: false,
            offset: None,
        };
        if let Some(depth) = status.depth {
            // Where the bytes lie in that layer's file (map may cut the run shorter). A raw
            // file's hole is zero by status yet still has its offset, as qemu-img shows.
            let layer = &image.layers()[depth];
            let extent = layer.map(pos, entry.length)?;
            entry.length = run_length(extent.len, entry.length, pos)?;
            match extent.mapping {
                Mapping::Data { file_offset, .. } => entry.offset = Some(file_offset),
                Mapping::Encoded => entry.compressed = !status.zero,
                Mapping::Zero | Mapping::Parent => {}
            }
        }
        pos += entry.length;
        match entries.last_mut() {
            Some(last) if last.continued_by(&entry) => last.length += entry.length,
            _ => entries.push(entry),
        }
    }
    Ok(entries)
}

pub fn run(args: &MapArgs) -> Result<()> {
    let image = open_image(&args.file, args.format, true)?;
    let json_output = args.output.wants_json();
    if args.layers {
        return print_layers(&image, json_output);
    }
    let entries = guest_map(&image)?;
    if json_output {
        // qemu-img's layout: one entry per line.
        let lines: Vec<String> = entries
            .iter()
            .map(|e| serde_json::to_string(e).unwrap_or_default())
            .collect();
        println!("[{}]", lines.join(",\n"));
    } else {
        println!("Offset          Length          Mapped to       File");
        for entry in entries.iter().filter(|e| e.data) {
            let file = image.layers()[entry.depth].file().path().display();
            let mapped = match entry.offset {
                Some(offset) => format!("{offset:#x}"),
                None => "compressed".to_string(),
            };
            println!(
                "{:<16}{:<16}{:<16}{file}",
                format!("{:#x}", entry.start),
                format!("{:#x}", entry.length),
                mapped
            );
        }
    }
    Ok(())
}

fn kind(extent: &Extent) -> &'static str {
    match extent.mapping {
        Mapping::Data { shared: false, .. } => "data",
        Mapping::Data { shared: true, .. } => "shared-data",
        Mapping::Zero => "zero",
        Mapping::Parent => "parent",
        Mapping::Encoded => "encoded",
    }
}

fn print_layers(image: &Image, json_output: bool) -> Result<()> {
    let mut layers = Vec::new();
    for (depth, layer) in image.layers().iter().enumerate() {
        let extents = image.layer_extents(depth)?;
        let filename = layer.file().path().display().to_string();
        if json_output {
            let list: Vec<_> = extents
                .iter()
                .map(|e| {
                    let mut value = json!({ "start": e.offset, "length": e.len, "kind": kind(e) });
                    if let Mapping::Data { file_offset, .. } = e.mapping {
                        value["offset"] = json!(file_offset);
                    }
                    value
                })
                .collect();
            layers.push(json!({
                "depth": depth,
                "filename": filename,
                "format": layer.format().name(),
                "extents": list,
            }));
        } else {
            println!("layer {depth}: {filename} ({})", layer.format());
            for e in &extents {
                let at = match e.mapping {
                    Mapping::Data { file_offset, .. } => format!(" at {file_offset:#x}"),
                    _ => String::new(),
                };
                println!("    {:#x} +{:#x} {}{at}", e.offset, e.len, kind(e));
            }
        }
    }
    if json_output {
        let value = serde_json::Value::Array(layers);
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_else(|_| value.to_string())
        );
    }
    Ok(())
}
