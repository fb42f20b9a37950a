//! `img commit [-p] [-d] [-f FMT] FILE`: merge FILE (the top layer) into its parent, as VHD
//! coalesce and qemu-img commit do.
//!
//! Every extent the top layer holds (data, explicit zeros, compressed clusters: anything
//! `Layer::map` does not send to the parent) is read from the top and written into the
//! parent, which is opened read-write as its own chain (so a write there copies up from the
//! grandparent as any write does). Explicit zeros become a discard in the parent, whose
//! contract is to read zeros afterwards, unless the parent already reads zeros there. The
//! parent is grown first if the top is larger, then flushed at the end.
//!
//! The top layer is left as it was, with or without -d: it still holds exactly the data now
//! also in the parent, so the chain reads the same. Emptying it (qemu-img's default) would
//! need a "drop this allocation" operation that the layer API does not have; discard makes
//! ranges read as zeros, which would hide the parent. Delete or recreate the top to
//! reclaim its space.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use super::progress::Progress;
use super::{format_arg, open_image, run_length, CHUNK};
use crate::error::{Error, Result};
use crate::image::{Format, Image, Layer, Mapping};

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Show a progress bar (on a terminal only).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Do not empty FILE after the commit (ferrotap never empties it; see the docs).
    #[arg(short = 'd')]
    pub keep: bool,
    /// Format of FILE (probed when omitted).
    #[arg(short = 'f', value_name = "FMT", value_parser = format_arg)]
    pub format: Option<Format>,
    /// Print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The top image, merged into its backing file.
    pub file: PathBuf,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Guest bytes of data copied into the parent.
    pub copied: u64,
    /// Guest bytes the top held as zeros, made zero in the parent.
    pub zeroed: u64,
}

pub fn run(args: &CommitArgs) -> Result<()> {
    let stats = commit(&args.file, args.format, |total| {
        Progress::new(args.progress, total, "commit")
    })?;
    if !args.quiet {
        println!(
            "Image committed ({} bytes copied, {} bytes zeroed).",
            stats.copied, stats.zeroed
        );
    }
    Ok(())
}

/// Merge the top layer of `path` into its parent.
pub fn commit(
    path: &Path,
    format: Option<Format>,
    progress: impl FnOnce(u64) -> Progress,
) -> Result<CommitStats> {
    // Open the whole chain once: it resolves and validates the parent (UUID, loops).
    let chain = open_image(path, format, true)?;
    let top = chain.top().clone();
    let parent = chain.layers().get(1).cloned().ok_or_else(|| {
        Error::invalid("image has no backing file to commit into").with_path(path)
    })?;
    let parent_path = parent.file().path().to_path_buf();
    let parent_format = parent.format();
    drop(chain);
    drop(parent);
    // The top alone: every range read from it below is allocated in it.
    let source = Image::from_layers(vec![top.clone()])?;
    let target = open_image(&parent_path, Some(parent_format), false)?;
    let size = top.virtual_size();
    if target.virtual_size() < size {
        target.top().resize(size)?;
    }
    let bar = progress(size);
    let stats = merge(&top, &source, &target, &bar)?;
    target.flush()?;
    bar.finish();
    Ok(stats)
}

fn merge(
    top: &Arc<dyn Layer>,
    source: &Image,
    target: &Image,
    progress: &Progress,
) -> Result<CommitStats> {
    let size = top.virtual_size();
    let mut stats = CommitStats::default();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < size {
        // Unallocated and zero runs are handled whole; data is copied a chunk at a time.
        let extent = top.map(pos, size - pos)?;
        let mut len = run_length(extent.len, size - pos, pos)?;
        match extent.mapping {
            Mapping::Parent => {}
            Mapping::Zero => {
                let below = target.block_status(pos, len)?;
                if below.zero && below.len == len {
                    // Already zeros in the parent chain.
                } else {
                    target.discard(pos, len)?;
                }
                stats.zeroed += len;
            }
            Mapping::Data { .. } | Mapping::Encoded => {
                len = len.min(CHUNK);
                let data = &mut buf[..len as usize];
                source.read_at(data, pos)?;
                target.write_at(data, pos)?;
                stats.copied += len;
            }
        }
        progress.advance(len);
        pos += len;
    }
    Ok(stats)
}
