//! `img resize [-f FMT] [--shrink] FILE [+|-]SIZE`: change the virtual size via
//! `Layer::resize`. Shrinking needs --shrink, as in qemu-img, because it drops data.

use std::path::PathBuf;

use clap::Args;

use super::size::parse_size;
use super::{format_arg, open_image};
use crate::error::{Error, Result};
use crate::image::Format;

#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// Format of FILE (probed when omitted).
    #[arg(short = 'f', value_name = "FMT", value_parser = format_arg)]
    pub format: Option<Format>,
    /// Allow the new size to be smaller (data past it is lost).
    #[arg(long)]
    pub shrink: bool,
    /// Print nothing on success.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image whose top layer is resized.
    pub file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

pub fn run(args: &ResizeArgs) -> Result<()> {
    let new_size = resize(&args.file, args.format, &args.size, args.shrink)?;
    if !args.quiet {
        println!("Image resized to {new_size} bytes.");
    }
    Ok(())
}

/// Resize the top layer of `path`; returns the new virtual size.
pub fn resize(
    path: &std::path::Path,
    format: Option<Format>,
    size: &str,
    shrink: bool,
) -> Result<u64> {
    let image = open_image(path, format, false)?;
    let current = image.virtual_size();
    let new_size = if let Some(delta) = size.strip_prefix('+') {
        current
            .checked_add(parse_size(delta)?)
            .ok_or_else(|| Error::invalid("new size too large"))?
    } else if let Some(delta) = size.strip_prefix('-') {
        current
            .checked_sub(parse_size(delta)?)
            .ok_or_else(|| Error::invalid(format!("cannot shrink below zero from {current}")))?
    } else {
        parse_size(size)?
    };
    if new_size < current && !shrink {
        return Err(Error::invalid(
            "use the --shrink option to make an image smaller (data past the new end is lost)",
        )
        .with_path(path));
    }
    if new_size != current {
        image.top().resize(new_size)?;
        image.flush()?;
    }
    Ok(new_size)
}
