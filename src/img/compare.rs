//! `img compare [-f FMT] [-F FMT] [-s] A B`: compare guest contents like qemu-img compare.
//! Exit 0 "Images are identical.", 1 "Content mismatch at offset N!", 2 on error. As in
//! qemu-img, N is the offset of the first differing 512-byte sector, and when the sizes
//! differ the longer image's extra part must read as zeros (unless -s, strict, is given).
//! Unlike qemu-img's -s, ours does not also require the same allocation: only contents
//! and sizes count.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{format_arg, open_image, report_error, run_length, CHUNK};
use crate::error::Result;
use crate::image::{Format, Image, SECTOR_SIZE};

pub const EXIT_IDENTICAL: i32 = 0;
pub const EXIT_DIFFERENT: i32 = 1;
pub const EXIT_ERROR: i32 = 2;

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Format of A (probed when omitted).
    #[arg(short = 'f', value_name = "FMT", value_parser = format_arg)]
    pub format_a: Option<Format>,
    /// Format of B (probed when omitted).
    #[arg(short = 'F', value_name = "FMT", value_parser = format_arg)]
    pub format_b: Option<Format>,
    /// Strict: images of different sizes are different.
    #[arg(short = 's')]
    pub strict: bool,
    /// Show a progress bar (accepted for qemu-img compatibility).
    #[arg(short = 'p')]
    pub progress: bool,
    /// First image (with its chain).
    pub a: PathBuf,
    /// Second image (with its chain).
    pub b: PathBuf,
}

/// The outcome of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Identical {
        size_mismatch: bool,
    },
    /// The first differing 512-byte sector starts here.
    Mismatch {
        offset: u64,
        size_mismatch: bool,
    },
    /// Strict mode and the sizes differ.
    SizeMismatch,
}

pub fn run(args: &CompareArgs) -> i32 {
    let result = compare_files(&args.a, args.format_a, &args.b, args.format_b, args.strict);
    match result {
        Ok(Comparison::Identical { size_mismatch }) => {
            if size_mismatch {
                println!("Warning: Image size mismatch!");
            }
            println!("Images are identical.");
            EXIT_IDENTICAL
        }
        Ok(Comparison::Mismatch {
            offset,
            size_mismatch,
        }) => {
            if size_mismatch {
                println!("Warning: Image size mismatch!");
            }
            println!("Content mismatch at offset {offset}!");
            EXIT_DIFFERENT
        }
        Ok(Comparison::SizeMismatch) => {
            println!("Strict mode: Image size mismatch!");
            EXIT_DIFFERENT
        }
        Err(err) => {
            report_error(&err);
            EXIT_ERROR
        }
    }
}

pub fn compare_files(
    a: &Path,
    format_a: Option<Format>,
    b: &Path,
    format_b: Option<Format>,
    strict: bool,
) -> Result<Comparison> {
    let image_a = open_image(a, format_a, true)?;
    let image_b = open_image(b, format_b, true)?;
    compare(&image_a, &image_b, strict)
}

/// Compare the guest contents of two images.
pub fn compare(a: &Image, b: &Image, strict: bool) -> Result<Comparison> {
    let size_a = a.virtual_size();
    let size_b = b.virtual_size();
    let size_mismatch = size_a != size_b;
    if strict && size_mismatch {
        return Ok(Comparison::SizeMismatch);
    }
    let common = size_a.min(size_b);
    let mut buf_a = vec![0u8; CHUNK as usize];
    let mut buf_b = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < common {
        // Runs both sides report as zero are skipped whole; the rest is read in chunks.
        let status_a = a.block_status(pos, common - pos)?;
        let status_b = b.block_status(pos, common - pos)?;
        let run = run_length(status_a.len.min(status_b.len), common - pos, pos)?;
        let both_zero = status_a.zero && status_b.zero;
        let len = if both_zero { run } else { run.min(CHUNK) };
        if !both_zero {
            let (da, db) = (&mut buf_a[..len as usize], &mut buf_b[..len as usize]);
            a.read_at(da, pos)?;
            b.read_at(db, pos)?;
            if let Some(i) = da.iter().zip(db.iter()).position(|(x, y)| x != y) {
                return Ok(Comparison::Mismatch {
                    offset: sector_start(pos + i as u64),
                    size_mismatch,
                });
            }
        }
        pos += len;
    }
    // The longer image's tail must read as zeros.
    let longer = if size_a > size_b { a } else { b };
    if let Some(offset) = first_nonzero(longer, common, longer.virtual_size(), &mut buf_a)? {
        return Ok(Comparison::Mismatch {
            offset: sector_start(offset),
            size_mismatch,
        });
    }
    Ok(Comparison::Identical { size_mismatch })
}

/// The first non-zero guest byte of `image` in `[start, end)`.
pub fn first_nonzero(image: &Image, start: u64, end: u64, buf: &mut [u8]) -> Result<Option<u64>> {
    let mut pos = start;
    while pos < end {
        let status = image.block_status(pos, end - pos)?;
        let run = run_length(status.len, end - pos, pos)?;
        let len = if status.zero {
            run
        } else {
            run.min(buf.len() as u64)
        };
        if !status.zero {
            let data = &mut buf[..len as usize];
            image.read_at(data, pos)?;
            if let Some(i) = data.iter().position(|&x| x != 0) {
                return Ok(Some(pos + i as u64));
            }
        }
        pos += len;
    }
    Ok(None)
}

fn sector_start(offset: u64) -> u64 {
    offset - offset % SECTOR_SIZE
}
