//! `img check [--output json] [-f FMT] FILE`: the top layer's metadata check, with
//! qemu-img check's exit codes: 0 clean, 1 the check could not complete, 2 corruptions,
//! 3 leaks only. (63, "format cannot be checked", never happens: every format checks.)

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::{format_arg, report_error, OutputArgs};
use crate::error::Result;
use crate::image::{open_layer, CheckReport, Finding, Format, OpenMode};

pub const EXIT_CLEAN: i32 = 0;
pub const EXIT_CHECK_FAILED: i32 = 1;
pub const EXIT_CORRUPT: i32 = 2;
pub const EXIT_LEAKS: i32 = 3;

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Format of FILE (probed when omitted).
    #[arg(short = 'f', value_name = "FMT", value_parser = format_arg)]
    pub format: Option<Format>,
    #[command(flatten)]
    pub output: OutputArgs,
    /// The image whose own metadata is checked (its parents are not opened).
    pub file: PathBuf,
}

/// The exit code a report calls for.
pub fn exit_code_of(report: &CheckReport) -> i32 {
    if !report.corruptions.is_empty() {
        EXIT_CORRUPT
    } else if !report.leaks.is_empty() {
        EXIT_LEAKS
    } else {
        EXIT_CLEAN
    }
}

/// Check one layer on its own (its parents are not opened: only its own metadata counts).
pub fn check_layer(
    path: &std::path::Path,
    format: Option<Format>,
) -> Result<(Format, CheckReport)> {
    let layer = open_layer(path, format, OpenMode::read_only())?;
    Ok((layer.format(), layer.check()?))
}

pub fn run(args: &CheckArgs) -> i32 {
    let (format, report) = match check_layer(&args.file, args.format) {
        Ok(result) => result,
        Err(err) => {
            report_error(&err);
            return EXIT_CHECK_FAILED;
        }
    };
    if args.output.wants_json() {
        let value = json!({
            "filename": args.file.display().to_string(),
            "format": format.name(),
            "check-errors": 0,
            "corruptions": report.corruptions.len(),
            "leaks": report.leaks.len(),
            "image-end-offset": report.image_end_offset,
            "total-clusters": report.total_clusters,
            "allocated-clusters": report.allocated_clusters,
            "corruption-findings": report.corruptions,
            "leak-findings": report.leaks,
        });
        match serde_json::to_string_pretty(&value) {
            Ok(text) => println!("{text}"),
            Err(_) => println!("{value}"),
        }
    } else {
        print_human(&report);
    }
    exit_code_of(&report)
}

/// One finding as a line; a message that already names its field (a layer passing on a
/// full error) is not prefixed with the field again.
fn finding_line(finding: &Finding) -> String {
    if finding.message.contains(&finding.field) {
        finding.message.clone()
    } else {
        format!(
            "{} at offset {:#x}: {}",
            finding.field, finding.offset, finding.message
        )
    }
}

fn print_human(report: &CheckReport) {
    for finding in &report.corruptions {
        println!("ERROR {}", finding_line(finding));
    }
    for finding in &report.leaks {
        println!("Leaked {}", finding_line(finding));
    }
    if !report.corruptions.is_empty() {
        println!(
            "\n{} errors were found on the image.\n\
             Data may be corrupted, or further writes to the image may corrupt it.",
            report.corruptions.len()
        );
    }
    if !report.leaks.is_empty() {
        println!(
            "\n{} leaked clusters were found on the image.\n\
             This means waste of disk space, but no harm to data.",
            report.leaks.len()
        );
    }
    if report.corruptions.is_empty() && report.leaks.is_empty() {
        println!("No errors were found on the image.");
    }
    if report.total_clusters > 0 {
        let percent = report.allocated_clusters as f64 * 100.0 / report.total_clusters as f64;
        println!(
            "{}/{} = {percent:.2}% allocated",
            report.allocated_clusters, report.total_clusters
        );
    }
    println!("Image end offset: {}", report.image_end_offset);
}
