//! `img info [--json] [--backing-chain] [-f FMT] FILE`, with qemu-img info's JSON keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use serde_json::{json, Map, Value};

use super::size::human_size;
use super::{format_arg, OutputArgs};
use crate::error::Result;
use crate::image::{Format, Image, ImageOptions, Layer};

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Format of FILE (probed when omitted).
    #[arg(short = 'f', value_name = "FMT", value_parser = format_arg)]
    pub format: Option<Format>,
    #[command(flatten)]
    pub output: OutputArgs,
    /// Describe every layer of the chain, not only FILE.
    #[arg(long)]
    pub backing_chain: bool,
    /// The image to describe.
    pub file: PathBuf,
}

pub fn run(args: &InfoArgs) -> Result<()> {
    let options = ImageOptions {
        read_only: true,
        format: args.format,
        ..ImageOptions::default()
    };
    // The whole chain when it opens; FILE alone (with a warning) when a parent is missing
    // or broken, so info still tells what FILE records.
    let (image, chain_opened) = match Image::open(&args.file, options) {
        Ok(image) => (image, true),
        Err(err) if !args.backing_chain => {
            let alone = Image::open(
                &args.file,
                ImageOptions {
                    no_backing: true,
                    ..options
                },
            )?;
            eprintln!("ferrotap: warning: {err}");
            (alone, false)
        }
        Err(err) => return Err(err),
    };
    let layers = image.layers();
    let describe = |depth: usize| -> Result<Value> {
        let name = if depth == 0 {
            args.file.clone()
        } else {
            layers[depth].file().path().to_path_buf()
        };
        layer_info(&name, &layers[depth], layers.get(depth + 1))
    };
    let json_output = args.output.wants_json();
    if args.backing_chain {
        let infos = (0..layers.len())
            .map(describe)
            .collect::<Result<Vec<_>>>()?;
        if json_output {
            println!("{}", pretty(&Value::Array(infos)));
        } else {
            let blocks: Vec<String> = infos.iter().map(human).collect();
            print!("{}", blocks.join("\n"));
        }
        return Ok(());
    }
    let mut info = describe(0)?;
    if chain_opened {
        if let Value::Object(map) = &mut info {
            map.insert("chain".into(), chain_summary(&args.file, layers));
        }
    }
    if json_output {
        println!("{}", pretty(&info));
    } else {
        print!("{}", human(&info));
    }
    Ok(())
}

/// One layer, with qemu-img info's keys. `parent` is the opened parent, when there is one.
pub fn layer_info(
    name: &Path,
    layer: &Arc<dyn Layer>,
    parent: Option<&Arc<dyn Layer>>,
) -> Result<Value> {
    let mut info = Map::new();
    info.insert("filename".into(), json!(name.display().to_string()));
    info.insert("format".into(), json!(layer.format().name()));
    info.insert("virtual-size".into(), json!(layer.virtual_size()));
    info.insert("actual-size".into(), json!(layer.file().allocated_bytes()?));
    if layer.format() != Format::Raw {
        info.insert("cluster-size".into(), json!(layer.cluster_size()));
    }
    if let Some(backing) = layer.backing() {
        if let Some(recorded) = backing.paths.first() {
            info.insert("backing-filename".into(), json!(recorded));
        }
        let full = match parent {
            Some(parent) => Some(absolute(parent.file().path())),
            None => backing
                .paths
                .first()
                .map(|recorded| absolute(&relative_to(name, recorded))),
        };
        if let Some(full) = full {
            info.insert(
                "full-backing-filename".into(),
                json!(full.display().to_string()),
            );
        }
        let format = backing.format.or(parent.map(|p| p.format()));
        if let Some(format) = format {
            info.insert("backing-filename-format".into(), json!(format.name()));
        }
    }
    info.insert(
        "format-specific".into(),
        json!({ "type": layer.format().name(), "data": layer.details() }),
    );
    Ok(Value::Object(info))
}

/// The chain as a list, top first.
fn chain_summary(top_name: &Path, layers: &[Arc<dyn Layer>]) -> Value {
    let entries = layers
        .iter()
        .enumerate()
        .map(|(depth, layer)| {
            let name = if depth == 0 {
                top_name.to_path_buf()
            } else {
                layer.file().path().to_path_buf()
            };
            json!({
                "depth": depth,
                "filename": name.display().to_string(),
                "format": layer.format().name(),
                "virtual-size": layer.virtual_size(),
            })
        })
        .collect();
    Value::Array(entries)
}

fn relative_to(child: &Path, recorded: &str) -> PathBuf {
    let recorded = Path::new(recorded);
    match child.parent() {
        Some(dir) if recorded.is_relative() => dir.join(recorded),
        _ => recorded.to_path_buf(),
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// qemu-img info's human layout.
fn human(info: &Value) -> String {
    let field = |key: &str| info.get(key).cloned().unwrap_or(Value::Null);
    let text = |key: &str| match field(key) {
        Value::String(s) => s,
        other => other.to_string(),
    };
    let number = |key: &str| field(key).as_u64().unwrap_or(0);
    let mut out = String::new();
    out.push_str(&format!("image: {}\n", text("filename")));
    out.push_str(&format!("file format: {}\n", text("format")));
    let size = number("virtual-size");
    out.push_str(&format!(
        "virtual size: {} ({size} bytes)\n",
        human_size(size)
    ));
    out.push_str(&format!(
        "disk size: {}\n",
        human_size(number("actual-size"))
    ));
    if info.get("cluster-size").is_some() {
        out.push_str(&format!("cluster_size: {}\n", number("cluster-size")));
    }
    if info.get("backing-filename").is_some() {
        out.push_str(&format!(
            "backing file: {} (actual path: {})\n",
            text("backing-filename"),
            text("full-backing-filename")
        ));
    }
    if info.get("backing-filename-format").is_some() {
        out.push_str(&format!(
            "backing file format: {}\n",
            text("backing-filename-format")
        ));
    }
    if let Some(Value::Object(data)) = info.pointer("/format-specific/data") {
        if !data.is_empty() {
            out.push_str("Format specific information:\n");
            human_object(&mut out, data, 1);
        }
    }
    if let Some(Value::Array(chain)) = info.get("chain") {
        out.push_str("backing chain:\n");
        for layer in chain {
            out.push_str(&format!(
                "    {}: {} ({})\n",
                layer["depth"],
                layer["filename"].as_str().unwrap_or("?"),
                layer["format"].as_str().unwrap_or("?")
            ));
        }
    }
    out
}

fn human_object(out: &mut String, object: &Map<String, Value>, indent: usize) {
    let pad = "    ".repeat(indent);
    for (key, value) in object {
        match value {
            Value::Object(inner) => {
                out.push_str(&format!("{pad}{key}:\n"));
                human_object(out, inner, indent + 1);
            }
            Value::String(s) => out.push_str(&format!("{pad}{key}: {s}\n")),
            other => out.push_str(&format!("{pad}{key}: {other}\n")),
        }
    }
}
