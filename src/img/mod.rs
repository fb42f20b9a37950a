//! `ferrotap img`: qemu-img's verbs on the image layer, with qemu-img's flags, output
//! keys and exit codes, so scripts written for qemu-img keep working.
//!
//! Every verb is generic over [`Layer`](crate::image::Layer) and [`Image`]: nothing here
//! knows a format's layout. Each verb has a library function (used by `ferrotap demo` and
//! tests) and a `run` that parses nothing itself, prints, and returns the exit code.

pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod create;
pub mod info;
pub mod map;
pub mod progress;
pub mod resize;
pub mod size;

use std::collections::BTreeMap;
use std::path::Path;

use clap::{Args, Subcommand, ValueEnum};

use crate::error::{Error, Result};
use crate::image::{Format, Image, ImageOptions};

/// Guest bytes handled per step by the copying verbs: bounds their memory.
pub const CHUNK: u64 = 2 << 20;

/// The granularity at which copying verbs look for all-zero data to skip.
pub const ZERO_GRANULE: usize = 4096;

#[derive(Debug, Subcommand)]
pub enum ImgCommand {
    /// Create an image (raw, vhd or qcow2), optionally on a backing image.
    Create(create::CreateArgs),
    /// Show an image's format, sizes, backing file and chain.
    Info(info::InfoArgs),
    /// Check an image's metadata (exit 0 clean, 1 check failed, 2 corrupt, 3 leaks).
    Check(check::CheckArgs),
    /// Show where the guest's bytes live: allocated, zero or in a backing layer.
    Map(map::MapArgs),
    /// Copy an image (with its chain flattened) into a new image of any format.
    Convert(convert::ConvertArgs),
    /// Compare the guest contents of two images (exit 0 same, 1 differ, 2 error).
    Compare(compare::CompareArgs),
    /// Merge an image into its backing file (VHD coalesce, qcow2 commit).
    Commit(commit::CommitArgs),
    /// Change an image's virtual size.
    Resize(resize::ResizeArgs),
}

/// Run one verb; returns the process exit code.
pub fn run(command: &ImgCommand) -> i32 {
    match command {
        ImgCommand::Create(args) => exit_code(create::run(args)),
        ImgCommand::Info(args) => exit_code(info::run(args)),
        ImgCommand::Check(args) => check::run(args),
        ImgCommand::Map(args) => exit_code(map::run(args)),
        ImgCommand::Convert(args) => exit_code(convert::run(args)),
        ImgCommand::Compare(args) => compare::run(args),
        ImgCommand::Commit(args) => exit_code(commit::run(args)),
        ImgCommand::Resize(args) => exit_code(resize::run(args)),
    }
}

/// Print an error the way every verb does.
pub fn report_error(err: &Error) {
    eprintln!("ferrotap: {err}");
}

fn exit_code(result: Result<()>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(err) => {
            report_error(&err);
            1
        }
    }
}

/// clap value parser for `-f`, `-F`, `-O`.
pub fn format_arg(name: &str) -> std::result::Result<Format, String> {
    Format::parse(name).map_err(|e| e.to_string())
}

/// How a verb prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Human,
    Json,
}

/// `--output FMT` and its `--json` shorthand, shared by the verbs that report.
#[derive(Debug, Args)]
pub struct OutputArgs {
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Same as --output json.
    #[arg(long)]
    pub json: bool,
}

impl OutputArgs {
    pub fn wants_json(&self) -> bool {
        self.json || self.output == OutputFormat::Json
    }
}

/// Open `path` with its whole backing chain.
pub fn open_image(path: &Path, format: Option<Format>, read_only: bool) -> Result<Image> {
    Image::open(
        path,
        ImageOptions {
            read_only,
            format,
            ..ImageOptions::default()
        },
    )
}

/// Refuse to create `target` over a file that `image` (a chain) reads from: creating
/// truncates the file, which would destroy the data being copied or backed onto.
pub fn refuse_overwriting(target: &Path, image: &Image) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(target) else {
        return Ok(());
    };
    for layer in image.layers() {
        if layer.file().identity()? == (meta.dev(), meta.ino()) {
            return Err(Error::invalid(format!(
                "{} is part of the source chain ({}); refusing to overwrite it",
                target.display(),
                layer.file().path().display()
            )));
        }
    }
    Ok(())
}

/// Split `-o a=b,c=d` (given any number of times) into key/value pairs; a later value for a
/// key replaces an earlier one, as in qemu-img.
pub fn parse_options(lists: &[String]) -> Result<BTreeMap<String, String>> {
    let mut options = BTreeMap::new();
    for list in lists {
        for item in list.split(',').filter(|item| !item.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                Error::invalid(format!("option '{item}' is not of the form key=value"))
            })?;
            if key.is_empty() {
                return Err(Error::invalid(format!("option '{item}' has no key")));
            }
            options.insert(key.to_string(), value.to_string());
        }
    }
    Ok(options)
}

/// The length of a run a layer reported for a request of `asked` bytes at `offset`, kept
/// within the request; an empty run is an error rather than an endless loop.
pub fn run_length(reported: u64, asked: u64, offset: u64) -> Result<u64> {
    if reported == 0 {
        return Err(Error::invalid("the image layer reported an empty extent").at(offset));
    }
    Ok(reported.min(asked))
}

/// Calls `write` for every run of `data` (guest bytes at `offset`) that is not all zeros,
/// looking at aligned granules of [`ZERO_GRANULE`] bytes. Returns the bytes skipped.
pub fn for_each_nonzero_run(
    data: &[u8],
    offset: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    let granule = ZERO_GRANULE as u64;
    let mut skipped = 0;
    let mut run_start: Option<usize> = None;
    let mut pos = 0usize;
    while pos < data.len() {
        // Granules are aligned to guest offsets, so the first may be short.
        let abs = offset + pos as u64;
        let end = ((abs / granule + 1) * granule - offset).min(data.len() as u64) as usize;
        let zero = data[pos..end].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(start)) => {
                write(offset + start as u64, &data[start..pos])?;
                run_start = None;
            }
            _ => {}
        }
        if zero {
            skipped += (end - pos) as u64;
        }
        pos = end;
    }
    if let Some(start) = run_start {
        write(offset + start as u64, &data[start..])?;
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_and_override() {
        let options =
            parse_options(&["cluster_size=4k,compat=1.1".into(), "compat=0.10".into()]).unwrap();
        assert_eq!(options.get("cluster_size").unwrap(), "4k");
        assert_eq!(options.get("compat").unwrap(), "0.10");
        assert!(parse_options(&["novalue".into()]).is_err());
        assert!(parse_options(&["=x".into()]).is_err());
    }

    #[test]
    fn nonzero_runs_skip_zero_granules() {
        let mut data = vec![0u8; 5 * ZERO_GRANULE];
        data[100] = 1; // granule 0 (offset 1000 shifts alignment: first granule is short)
        data[3 * ZERO_GRANULE + 7] = 2;
        let offset = 1000u64;
        let mut runs = Vec::new();
        let skipped = for_each_nonzero_run(&data, offset, |at, piece| {
            runs.push((at, piece.len()));
            Ok(())
        })
        .unwrap();
        let written: usize = runs.iter().map(|r| r.1).sum();
        assert_eq!(written as u64 + skipped, data.len() as u64);
        // Every non-zero byte is inside a written run.
        for (i, &b) in data.iter().enumerate() {
            if b != 0 {
                let at = offset + i as u64;
                assert!(runs.iter().any(|&(s, l)| s <= at && at < s + l as u64));
            }
        }
        // Runs start on granule boundaries except at the buffer start.
        for &(s, _) in &runs {
            assert!(s == offset || s % ZERO_GRANULE as u64 == 0);
        }
        assert_eq!(runs.len(), 2);
    }
}
