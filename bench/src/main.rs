//! ferrotap-bench: ferrotap's benchmarks. `image` measures the image layer (raw, VHD,
//! qcow2; preallocated and empty) beside fio on the same raw file, in one run, on each
//! backing directory given. `point` is the child process that measures one ferrotap point.
//! `ring` measures `ferrotap serve` on xensim under the simulated blkfront, beside fio with
//! io_uring. `nbd` measures `ferrotap nbd` beside qemu-nbd and nbdkit under fio's nbd
//! engine.

#![deny(clippy::unwrap_used)]

mod fio;
mod histogram;
mod nbd;
mod pattern;
mod point;
mod procfs;
mod report;
mod ring;
mod ring_report;
mod suite;

use clap::Parser;

use pattern::Workload;

/// Errors are messages for the person running the benchmark.
pub type Result<T> = std::result::Result<T, String>;

/// How fio submits: synchronous calls (beside the image layer) or io_uring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    Psync,
    IoUring,
}

impl IoEngine {
    pub fn fio_name(self) -> &'static str {
        match self {
            IoEngine::Psync => "psync",
            IoEngine::IoUring => "io_uring",
        }
    }
}

/// The parameters fio and ferrotap share for one measured point.
#[derive(Debug, Clone)]
pub struct PointConfig {
    pub workload: Workload,
    pub engine: IoEngine,
    /// Requests in flight per job (1 with psync).
    pub iodepth: u64,
    pub jobs: u64,
    /// Bytes each job works in, starting at `i*stride` for job i.
    pub slice: u64,
    /// Distance between the starts of two jobs' ranges: `slice` gives each job its own
    /// part of the file, 0 lets every job roam the same range.
    pub stride: u64,
    pub runtime_ms: u64,
    /// Unmeasured time before the measurement (not with `one_pass`), so that every system
    /// starts with its file's kernel structures as warm in the CPU caches as the others'.
    pub ramp_ms: u64,
    /// Stop after one pass over the slice instead of at the runtime, if that comes first.
    pub one_pass: bool,
    pub direct: bool,
    pub seed: u64,
}

/// One system's figures for one point.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Measured {
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// CPU time over wall time of the measured window, summed over jobs (100 = one core).
    pub cpu_pct: f64,
    /// Peak resident set of the measuring process.
    pub rss_mib: f64,
}

#[derive(Parser)]
#[command(name = "ferrotap-bench", about = "ferrotap's benchmarks")]
enum Cli {
    /// The image layer on raw, VHD and qcow2, beside fio on a raw file.
    Image(suite::ImageArgs),
    /// `ferrotap serve` on xensim under the simulated blkfront, beside fio (io_uring).
    Ring(ring::RingArgs),
    /// fio's nbd engine against `ferrotap nbd`, qemu-nbd and nbdkit on raw, qcow2 and VHD.
    Nbd(nbd::NbdArgs),
    /// (internal) Measure one ferrotap point and print its totals as JSON.
    #[command(hide = true)]
    Point(point::PointSpec),
}

fn main() {
    let result = match Cli::parse() {
        Cli::Image(args) => suite::run(&args),
        Cli::Ring(args) => ring::run(&args),
        Cli::Nbd(args) => nbd::run(&args),
        Cli::Point(spec) => point::run(&spec).and_then(|result| {
            serde_json::to_string(&result)
                .map(|line| println!("{line}"))
                .map_err(|e| e.to_string())
        }),
    };
    if let Err(message) = result {
        eprintln!("ferrotap-bench: {message}");
        std::process::exit(1);
    }
}
