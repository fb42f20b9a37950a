//! One measurement of ferrotap's image layer, run in a child process of its own so that
//! its peak RSS is its own: `jobs` threads share one opened [`Image`], each doing
//! synchronous `read_at`/`write_at` (queue depth 1 per job, like fio's psync engine).

use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use ferrotap::image::file::AlignedBuf;
use ferrotap::image::{Format, Image, ImageOptions};
use serde::{Deserialize, Serialize};

use crate::histogram::Histogram;
use crate::pattern::{Offsets, Rng, Workload};
use crate::procfs::thread_cpu_ns;
use crate::Result;

/// What to measure; the parent passes it on the child's command line.
#[derive(clap::Args, Debug, Clone)]
pub struct PointSpec {
    /// Image file to open (its format is given, not probed).
    #[arg(long)]
    pub file: PathBuf,
    #[arg(long, value_parser = |s: &str| Format::parse(s).map_err(|e| e.to_string()))]
    pub format: Format,
    #[arg(long)]
    pub workload: Workload,
    #[arg(long)]
    pub jobs: u64,
    /// Bytes of the disk each job works in (job i owns [i*slice, (i+1)*slice)).
    #[arg(long)]
    pub slice: u64,
    #[arg(long)]
    pub runtime_ms: u64,
    /// Run this long unmeasured first (ignored with --one-pass).
    #[arg(long, default_value_t = 0)]
    pub ramp_ms: u64,
    /// Stop each job after one pass over its slice (first writes to an empty image).
    #[arg(long)]
    pub one_pass: bool,
    /// Open with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    #[arg(long)]
    pub seed: u64,
}

/// A measurement's raw totals, sent back to the parent as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
pub struct PointResult {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed_ns: u64,
    /// CPU time of the measuring threads over the measured window.
    pub cpu_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

struct JobResult {
    ops: u64,
    latencies: Histogram,
    elapsed: Duration,
    cpu_ns: u64,
}

pub fn run(spec: &PointSpec) -> Result<PointResult> {
    let image = Image::open(
        &spec.file,
        ImageOptions {
            read_only: !spec.workload.is_write(),
            direct: spec.direct,
            format: Some(spec.format),
            no_backing: false,
        },
    )
    .map_err(|e| format!("opening {}: {e}", spec.file.display()))?;
    let start_line = Barrier::new(spec.jobs as usize);
    let jobs: Vec<Result<JobResult>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..spec.jobs)
            .map(|job| {
                let (image, start_line) = (&image, &start_line);
                scope.spawn(move || run_job(spec, image, job, start_line))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a job panicked".into())))
            .collect()
    });
    let mut latencies = Histogram::new();
    let (mut ops, mut cpu_ns, mut elapsed) = (0, 0, Duration::ZERO);
    for job in jobs {
        let job = job?;
        ops += job.ops;
        cpu_ns += job.cpu_ns;
        elapsed = elapsed.max(job.elapsed);
        latencies.merge(&job.latencies);
    }
    Ok(PointResult {
        ops,
        bytes: ops * spec.workload.block_size(),
        elapsed_ns: elapsed.as_nanos() as u64,
        cpu_ns,
        p50_ns: latencies.percentile(50.0),
        p99_ns: latencies.percentile(99.0),
    })
}

fn run_job(spec: &PointSpec, image: &Image, job: u64, start_line: &Barrier) -> Result<JobResult> {
    let workload = spec.workload;
    let block_size = workload.block_size() as usize;
    let mut offsets = Offsets::new(workload, spec.seed, job, spec.slice);
    let max_ops = if spec.one_pass {
        offsets.pass_bytes() / workload.block_size()
    } else {
        u64::MAX
    };
    let mut buf = AlignedBuf::zeroed(block_size);
    Rng::new(spec.seed ^ job).fill(buf.as_mut_slice());
    let mut latencies = Histogram::new();
    let runtime = Duration::from_millis(spec.runtime_ms);
    start_line.wait();
    if !spec.one_pass {
        let ramp = Duration::from_millis(spec.ramp_ms);
        let ramp_start = Instant::now();
        while ramp_start.elapsed() < ramp {
            let offset = offsets.next_offset();
            do_io(image, workload, &mut buf, offset)?;
        }
    }
    let cpu_start = thread_cpu_ns()?;
    let start = Instant::now();
    let mut now = start;
    let mut ops = 0;
    while ops < max_ops && now - start < runtime {
        let offset = offsets.next_offset();
        let issued = Instant::now();
        do_io(image, workload, &mut buf, offset)?;
        let done = Instant::now();
        latencies.record((done - issued).as_nanos() as u64);
        now = done;
        ops += 1;
    }
    let cpu_ns = thread_cpu_ns()? - cpu_start;
    Ok(JobResult {
        ops,
        latencies,
        elapsed: now - start,
        cpu_ns,
    })
}

fn do_io(image: &Image, workload: Workload, buf: &mut AlignedBuf, offset: u64) -> Result<()> {
    let result = if workload.is_write() {
        image.write_at(buf.as_slice(), offset)
    } else {
        image.read_at(buf.as_mut_slice(), offset)
    };
    result.map_err(|e| format!("{workload} at {offset}: {e}"))
}
