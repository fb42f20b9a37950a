//! `img convert [-p] [-f FMT] -O FMT [-o OPTS] IN OUT`: copy the guest contents of IN (its
//! chain flattened) into a new image. Sparse-aware: ranges block status reports as zero are
//! never read, and all-zero granules of what is read are never written, so the target
//! allocates only real data. Memory is bounded by one [`CHUNK`](super::CHUNK).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Args;

use super::progress::Progress;
use super::{
    for_each_nonzero_run, format_arg, open_image, parse_options, refuse_overwriting, run_length,
    CHUNK,
};
use crate::error::Result;
use crate::image::{self, CreateOptions, Format, Image};

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Show a progress bar (on a terminal only).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Format of IN (probed when omitted).
    #[arg(short = 'f', value_name = "FMT", value_parser = format_arg)]
    pub format: Option<Format>,
    /// Format of OUT.
    #[arg(short = 'O', value_name = "FMT", value_parser = format_arg, default_value = "raw")]
    pub output_format: Format,
    /// Options for OUT, key=value[,key=value...] (may be repeated).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Source image; its whole chain is read.
    pub input: PathBuf,
    /// New image to create (an existing file is replaced).
    pub output: PathBuf,
}

/// What a copy did, in guest bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes written to the target.
    pub written: u64,
    /// Bytes skipped because they read as zeros.
    pub skipped: u64,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let options = parse_options(&args.options)?;
    let progress = |total| Progress::new(args.progress, total, "convert");
    convert(
        &args.input,
        args.format,
        &args.output,
        args.output_format,
        options,
        progress,
    )?;
    Ok(())
}

/// Convert `input` into a new `output_format` image at `output` of the same virtual size.
pub fn convert(
    input: &Path,
    input_format: Option<Format>,
    output: &Path,
    output_format: Format,
    options: BTreeMap<String, String>,
    progress: impl FnOnce(u64) -> Progress,
) -> Result<CopyStats> {
    let source = open_image(input, input_format, true)?;
    refuse_overwriting(output, &source)?;
    let size = source.virtual_size();
    image::create(
        output,
        output_format,
        CreateOptions {
            size,
            backing: None,
            options,
        },
    )?;
    let target = open_image(output, Some(output_format), false)?;
    let bar = progress(size);
    let stats = copy_range(&source, &target, 0, size, &bar)?;
    target.flush()?;
    bar.finish();
    Ok(stats)
}

/// Copy guest bytes `[start, end)` from `source` to `target`, skipping zeros (the target
/// must already read zeros there, as a new image does).
pub fn copy_range(
    source: &Image,
    target: &Image,
    start: u64,
    end: u64,
    progress: &Progress,
) -> Result<CopyStats> {
    let mut stats = CopyStats::default();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = start;
    while pos < end {
        // Zero runs are skipped whole, however long; data is read a chunk at a time.
        let status = source.block_status(pos, end - pos)?;
        let run = run_length(status.len, end - pos, pos)?;
        let len = if status.zero { run } else { run.min(CHUNK) };
        if status.zero {
            stats.skipped += len;
        } else {
            let data = &mut buf[..len as usize];
            source.read_at(data, pos)?;
            stats.skipped += for_each_nonzero_run(data, pos, |at, piece| {
                stats.written += piece.len() as u64;
                target.write_at(piece, at)
            })?;
        }
        progress.advance(len);
        pos += len;
    }
    Ok(stats)
}
