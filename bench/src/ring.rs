//! The ring benchmark: `ferrotap serve` on a simulated Xen host (xensim), driven by the
//! simulated blkfront (`ferrotap xensim blkfront`, a process of its own) as load generator,
//! beside `fio --ioengine=io_uring --direct=1` on the same file (reads: each format's
//! image; writes: the raw image), in one run. Also the idle cost of a serve process, and
//! (`--options`) serve's options compared.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ferrotap::image::Format;
use ferrotap::xensim::blkfront::{Blkfront, FrontConfig};
use serde::Deserialize;

use crate::pattern::Workload;
use crate::procfs::{peak_rss_kib, process_cpu_ns, run_monitored, threads_schedstat};
use crate::ring_report::{FioReference, RingConfig, RingReport, RingSkip};
use crate::suite::{preallocated_image, Backing, TempFile, MIB};
use crate::{fio, IoEngine, Measured, PointConfig, Result};

#[derive(clap::Args, Debug)]
pub struct RingArgs {
    /// Under two minutes: raw and qcow2 on the first backing, 1 queue, 4 KiB random reads
    /// at QD1 and QD32 and 1 MiB sequential reads.
    #[arg(long)]
    quick: bool,
    /// Compare serve's options (engine, grant mode, fixed buffers, polling) on random 4 KiB
    /// and sequential 1 MiB reads of a raw image, 1 queue, instead of the full matrix: on
    /// the first default backing (tmpfs), or on every `--dir` given.
    #[arg(long)]
    options: bool,
    /// Directory to put the images in (repeat for several backings); default: /dev/shm
    /// (tmpfs) and /var/tmp (disk); --quick uses the first only.
    #[arg(long = "dir")]
    dirs: Vec<PathBuf>,
    /// Measured time per point and round, in milliseconds (default 1500; 1200 with --quick).
    #[arg(long)]
    runtime_ms: Option<u64>,
    /// Unmeasured run of the same workload just before each measurement, in milliseconds
    /// (default 300).
    #[arg(long)]
    ramp_ms: Option<u64>,
    /// Rounds per point, the systems taking turns; rows give the median round (default 5;
    /// 3 with --quick or --options).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=99))]
    rounds: Option<u64>,
    /// Virtual size of every image, in MiB (default 1024; 256 with --quick).
    #[arg(long)]
    size_mib: Option<u64>,
    /// How long the idle serve process is watched, in milliseconds (default 3000).
    #[arg(long)]
    idle_ms: Option<u64>,
    /// The frontend does not offer feature-persistent (every data page is grant-copied);
    /// by default it does, as Linux's blkfront does.
    #[arg(long)]
    front_copy: bool,
    /// An extra argument for every `ferrotap serve` of the matrix (repeat), e.g.
    /// `--serve-arg=--fixed-buffers`.
    #[arg(long = "serve-arg", allow_hyphen_values = true)]
    serve_args: Vec<String>,
    /// Only these points of the matrix (repeat): workload names as in the table, e.g.
    /// `--workload randread-4k-qd1 --workload randread-4k-qd32`.
    #[arg(long = "workload", value_name = "NAME")]
    only_workloads: Vec<String>,
    /// Only these queue counts (repeat; the full matrix has 1 and 2).
    #[arg(long = "queues", value_name = "N")]
    only_queues: Vec<u32>,
    /// Only these formats for ferrotap (repeat: raw, vhd, qcow2); fio reads their files and
    /// writes the raw one.
    #[arg(long = "format", value_name = "FORMAT")]
    only_formats: Vec<String>,
    /// The load generator's hybrid wait: the blkfront spins this many microseconds on its
    /// ring for responses before sleeping in poll() (its `--poll-us`), as fio's polled
    /// completions would (with several requests in flight only when the host has a core
    /// for each blkfront and each serve queue, and not while its waits average over twice
    /// the window); 0: it sleeps at once.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_FRONT_POLL_US)]
    front_poll_us: u64,
    /// The ferrotap binary (default: the one built next to ferrotap-bench).
    #[arg(long)]
    ferrotap: Option<PathBuf>,
    /// Where to write the JSON results (default bench/results/ring.json, ring-quick.json
    /// with --quick, ring-options.json with --options).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The blkfront's response polling window by default (`--front-poll-us`). Long enough to
/// cover a whole burst of a disk at QD32 with 1 queue (responses about every 300 µs):
/// against a 100 µs window, which ran out on those waits and slept, bracketed manual runs
/// (fio before and after each pair) gave 0.96-1.00x fio against 0.89-0.92x (medians of 18
/// pairs, higher in 11), as a sleeping blkfront's wake-up (30-45 µs here) no longer sits
/// between each burst's responses and its refill.
const DEFAULT_FRONT_POLL_US: u64 = 500;
/// Base of the seeds of the random patterns (see `Turn::seed`).
const SEED: u64 = 0x5eed_f00d;
/// Requests of the x86_64 protocol in one ring page (32 of 112 bytes after the header).
const REQUESTS_PER_RING_PAGE: u32 = 32;
/// Idle CPU counts as none up to this: 0.1% of a core is 1 ms a second, the cost of a few
/// hundred wake-ups; a serve that sleeps shows 0.
pub const IDLE_CPU_LIMIT_PCT: f64 = 0.1;

/// One access pattern at one queue depth per queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingWorkload {
    pub pattern: Workload,
    /// Requests in flight per queue (fio: per job).
    pub iodepth: u32,
}

impl RingWorkload {
    const fn new(pattern: Workload, iodepth: u32) -> RingWorkload {
        RingWorkload { pattern, iodepth }
    }

    pub fn name(self) -> String {
        format!("{}-qd{}", self.pattern.name(), self.iodepth)
    }

    /// The blkfront's `--workload` for the pattern.
    fn front_kind(self) -> &'static str {
        match self.pattern {
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::SeqRead => "seqread",
            Workload::SeqWrite => "seqwrite",
        }
    }

    /// The smallest ring (2^order pages) that holds `iodepth` requests: the blkfront never
    /// has more requests in flight than its ring has entries.
    fn ring_page_order(self) -> u32 {
        let pages = self.iodepth.div_ceil(REQUESTS_PER_RING_PAGE).max(1);
        pages.next_power_of_two().trailing_zeros()
    }
}

const FULL_WORKLOADS: [RingWorkload; 8] = [
    RingWorkload::new(Workload::RandRead, 1),
    RingWorkload::new(Workload::RandRead, 32),
    RingWorkload::new(Workload::RandRead, 128),
    RingWorkload::new(Workload::RandWrite, 1),
    RingWorkload::new(Workload::RandWrite, 32),
    RingWorkload::new(Workload::RandWrite, 128),
    RingWorkload::new(Workload::SeqRead, 8),
    RingWorkload::new(Workload::SeqWrite, 8),
];
const QUICK_WORKLOADS: [RingWorkload; 3] = [
    RingWorkload::new(Workload::RandRead, 1),
    RingWorkload::new(Workload::RandRead, 32),
    RingWorkload::new(Workload::SeqRead, 8),
];
/// The issue asks for 4 KiB random reads at QD32; QD1 shows latency (where polling
/// matters) and 1 MiB reads what the grant mode costs with 256 segments a request.
const OPTIONS_WORKLOADS: [RingWorkload; 3] = [
    RingWorkload::new(Workload::RandRead, 1),
    RingWorkload::new(Workload::RandRead, 32),
    RingWorkload::new(Workload::SeqRead, 8),
];

/// How a ferrotap system is set up: serve's options and the frontend's grant mode.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// `--engine` (None: serve's default).
    engine: Option<&'static str>,
    /// The frontend offers feature-persistent (else serve runs `--no-persistent`).
    persistent: bool,
    fixed_buffers: bool,
    /// `--poll-us` (None: serve's default).
    poll_us: Option<u64>,
    /// Other serve arguments, as given.
    extra: Vec<String>,
    /// "ferrotap" for the matrix, the options spelled out in the options comparison.
    label: String,
}

impl Variant {
    fn default_settings(persistent: bool, extra: Vec<String>) -> Variant {
        Variant {
            engine: None,
            persistent,
            fixed_buffers: false,
            poll_us: None,
            extra,
            label: "ferrotap".into(),
        }
    }

    fn spelled_out(
        engine: &'static str,
        persistent: bool,
        fixed_buffers: bool,
        poll_us: u64,
    ) -> Variant {
        let grants = if persistent { "persistent" } else { "copy" };
        let fixed = if fixed_buffers { ",fixed-buffers" } else { "" };
        Variant {
            engine: Some(engine),
            persistent,
            fixed_buffers,
            poll_us: Some(poll_us),
            extra: Vec::new(),
            label: format!("ferrotap[engine={engine},grants={grants}{fixed},poll-us={poll_us}]"),
        }
    }

    /// Every combination worth choosing between: fixed buffers are io_uring's and serve
    /// only the grant-copy buffers.
    fn options_grid() -> Vec<Variant> {
        let mut grid = Vec::new();
        for poll_us in [0, 100] {
            for (engine, persistent, fixed) in [
                ("uring", false, false),
                ("uring", false, true),
                ("uring", true, false),
                ("aio", false, false),
                ("aio", true, false),
            ] {
                grid.push(Variant::spelled_out(engine, persistent, fixed, poll_us));
            }
        }
        grid
    }

    fn serve_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(engine) = self.engine {
            args.extend(["--engine".to_string(), engine.to_string()]);
        }
        if !self.persistent {
            args.push("--no-persistent".into());
        }
        if self.fixed_buffers {
            args.push("--fixed-buffers".into());
        }
        if let Some(poll_us) = self.poll_us {
            args.extend(["--poll-us".to_string(), poll_us.to_string()]);
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// What is measured at one point: fio on one format's image file, or ferrotap serving it.
#[derive(Debug, Clone)]
enum System {
    Fio(Format),
    Ferrotap(Format, Variant),
}

impl System {
    fn label(&self) -> &str {
        match self {
            System::Fio(_) => "fio",
            System::Ferrotap(_, variant) => &variant.label,
        }
    }

    fn format(&self) -> Format {
        match self {
            System::Fio(format) | System::Ferrotap(format, _) => *format,
        }
    }
}

/// fio's runs on one file around the ferrotap runs compared with them (indices into the
/// systems of the run).
#[derive(Debug, PartialEq)]
struct Bracket {
    fio: usize,
    members: Vec<usize>,
}

/// The order of a point's runs in a round. Reads: each format's ferrotap runs between two
/// fio runs on that format's own file. Over a virtual disk whose host caches what it reads,
/// a file read more lately reads faster; with fio on the raw file alone, the raw file was
/// read three times a round and VHD and qcow2 once, which favoured raw. Writes: every
/// ferrotap run between two fio runs on the raw file (fio writing into a VHD or qcow2 file
/// would overwrite its metadata).
fn brackets(systems: &[System], workload: RingWorkload) -> Vec<Bracket> {
    let fio_on = |format: Format| {
        systems
            .iter()
            .position(|s| matches!(s, System::Fio(f) if *f == format))
    };
    let mut out: Vec<Bracket> = Vec::new();
    for (s, system) in systems.iter().enumerate() {
        let System::Ferrotap(format, _) = system else {
            continue;
        };
        let reference = if workload.pattern.is_write() {
            Format::Raw
        } else {
            *format
        };
        let Some(fio) = fio_on(reference) else {
            continue;
        };
        match out.iter_mut().find(|b| b.fio == fio) {
            Some(bracket) => bracket.members.push(s),
            None => out.push(Bracket {
                fio,
                members: vec![s],
            }),
        }
    }
    out
}

/// fio's IOPS may differ by this much, over the higher, between its runs before and after
/// a bracket for the bracket's figures to be kept at the first try. Over the disk of a
/// shared virtual machine fio's QD32 IOPS moved 13k -> 16k, 15k -> 25k and 38k -> 19k
/// across single brackets (~7 s), and a ferrotap run inside one is compared with a
/// reference that was never there.
const STEADY_DRIFT: f64 = 0.15;
/// Tries of a bracket at most (but one with --quick), per point and round, while fio
/// drifts more than that; the steadiest is kept. The choice looks at fio's runs only,
/// never at ferrotap's figures.
const BRACKET_TRIES: usize = 3;

/// One try of a bracket: fio's run before, the members' runs, fio's run after.
#[derive(Debug)]
struct BracketRun {
    opening: Option<Measured>,
    /// (system, its turn counted from fio's opening run, its figures)
    members: Vec<(usize, usize, Measured)>,
    closing: Option<Measured>,
    /// The closing run's turn, counted from the opening run.
    last: usize,
}

impl BracketRun {
    /// How far fio's IOPS moved across the bracket, over the higher of its two runs; none
    /// without both.
    fn drift(&self) -> Option<f64> {
        let (before, after) = (self.opening?.iops, self.closing?.iops);
        let high = before.max(after);
        (high > 0.0).then(|| (before - after).abs() / high)
    }

    /// Each member's fio reference, interpolated to its turn; none without both fio runs.
    fn references(&self) -> Vec<(usize, FioReference)> {
        let (Some(opening), Some(closing)) = (&self.opening, &self.closing) else {
            return Vec::new();
        };
        self.members
            .iter()
            .map(|&(s, at, _)| {
                let weight = at as f64 / self.last as f64;
                (s, FioReference::between(opening, closing, weight))
            })
            .collect()
    }
}

/// Run a bracket once: fio first and again after the members. A shared machine drifts
/// within seconds (the disk's own QD32 IOPS went 7k -> 57k over 16 runs in a row of
/// 1.8 s), so each ferrotap run is compared with fio interpolated to its turn. `turn`
/// counts the runs `measure` made.
fn run_bracket(
    bracket: &Bracket,
    turn: &Cell<usize>,
    measure: &mut impl FnMut(usize) -> Option<Measured>,
) -> BracketRun {
    let first = turn.get();
    let opening = measure(bracket.fio);
    let mut members = Vec::new();
    for &s in &bracket.members {
        let at = turn.get() - first;
        if let Some(m) = measure(s) {
            members.push((s, at, m));
        }
    }
    let last = turn.get() - first;
    // Without an opening run or any member there is nothing to compare.
    let closing = if opening.is_some() && !members.is_empty() {
        measure(bracket.fio)
    } else {
        None
    };
    BracketRun {
        opening,
        members,
        closing,
        last,
    }
}

/// Run a bracket until fio held steady across it (`STEADY_DRIFT`), `tries_at_most` times
/// at most, and keep the steadiest try. Returns it and the number of tries.
fn measure_bracket(
    bracket: &Bracket,
    tries_at_most: usize,
    turn: &Cell<usize>,
    mut measure: impl FnMut(usize) -> Option<Measured>,
) -> (BracketRun, usize) {
    let mut kept = run_bracket(bracket, turn, &mut measure);
    let mut tries = 1;
    while tries < tries_at_most {
        // A failed fio run gives no drift to judge by: keep what there is.
        let Some(drift) = kept.drift() else {
            break;
        };
        if drift <= STEADY_DRIFT {
            break;
        }
        eprintln!(
            "   fio moved {:.0}% across the bracket: measuring it again",
            drift * 100.0
        );
        let again = run_bracket(bracket, turn, &mut measure);
        tries += 1;
        if again.drift().is_some_and(|d| d < drift) {
            kept = again;
        }
    }
    (kept, tries)
}

/// Sizes, times and binaries of a run.
pub struct RingPlan {
    pub ferrotap: PathBuf,
    pub size: u64,
    pub runtime_ms: u64,
    pub ramp_ms: u64,
    pub rounds: u64,
    pub idle_ms: u64,
    /// The blkfront's `--poll-us`.
    pub front_poll_us: u64,
    /// Tries of a bracket while fio drifts across it (`measure_bracket`).
    pub bracket_tries: usize,
}

/// A simulated Xen host: a fresh short directory under /dev/shm (its socket paths must fit
/// in sun_path), removed when dropped.
struct SimHost(PathBuf);

impl SimHost {
    fn new() -> Result<SimHost> {
        for attempt in 0..1000u32 {
            let dir = PathBuf::from(format!("/dev/shm/xsim.{}.{attempt}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(SimHost(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("creating {}: {e}", dir.display())),
            }
        }
        Err("no free /dev/shm/xsim.* directory".into())
    }

    fn control(&self) -> PathBuf {
        self.0.join("control")
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `ferrotap serve` on a simulated host; closed (or killed) when dropped.
struct Serve {
    child: Child,
    host: SimHost,
}

/// How long serve may take to open its image and bind its control socket.
const SERVE_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long serve may take to exit after `close`.
const SERVE_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Serve {
    fn start(plan: &RingPlan, image: &Path, format: Format, variant: &Variant) -> Result<Serve> {
        let host = SimHost::new()?;
        let log = std::fs::File::create(host.0.join("serve.log"))
            .map_err(|e| format!("creating serve's log: {e}"))?;
        let mut cmd = Command::new(&plan.ferrotap);
        cmd.arg("serve")
            .arg("--image")
            .arg(image)
            .args(["--format", format.name()])
            .arg("--control")
            .arg(host.control())
            .arg("--xensim")
            .arg(&host.0)
            .args(variant.serve_args())
            // A failure is reported from the log's last lines: no backtrace there.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let shown = format!("ferrotap serve {}", variant.serve_args().join(" "));
        let child = cmd.spawn().map_err(|e| format!("starting {shown}: {e}"))?;
        let mut serve = Serve { child, host };
        let started = Instant::now();
        loop {
            if UnixStream::connect(serve.host.control()).is_ok() {
                return Ok(serve);
            }
            if let Ok(Some(status)) = serve.child.try_wait() {
                return Err(format!("{shown} exited ({status}): {}", serve.log_tail()));
            }
            if started.elapsed() > SERVE_START_TIMEOUT {
                return Err(format!("{shown} did not open its control socket"));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of serve's stderr, for error messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.host.0.join("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Ask serve to close, and wait for it to exit.
    fn close(mut self) -> Result<()> {
        let reply = control_request(&self.host.control(), r#"{"op":"close"}"#);
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return reply.map(drop),
                Ok(Some(status)) => {
                    return Err(format!(
                        "ferrotap serve exited with {status}: {}",
                        self.log_tail()
                    ))
                }
                Ok(None) if started.elapsed() < SERVE_CLOSE_TIMEOUT => {
                    thread::sleep(Duration::from_millis(10));
                }
                Ok(None) => return Err("ferrotap serve did not exit after close".into()),
                Err(e) => return Err(format!("waiting for ferrotap serve: {e}")),
            }
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One request line on serve's control socket; its reply line.
fn control_request(control: &Path, request: &str) -> Result<String> {
    let mut stream = UnixStream::connect(control)
        .map_err(|e| format!("connecting to {}: {e}", control.display()))?;
    stream
        .set_read_timeout(Some(SERVE_CLOSE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(|e| format!("writing to {}: {e}", control.display()))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("reading from {}: {e}", control.display()))?;
    if reply.contains(r#""ok":true"#) {
        Ok(reply)
    } else {
        Err(format!("serve answered {request} with {}", reply.trim()))
    }
}

/// The blkfront's JSON summary (the fields the benchmark uses).
#[derive(Debug, Deserialize)]
struct FrontReport {
    ops: u64,
    errors: u64,
    seconds: f64,
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Run the blkfront against `serve` for `seconds`.
fn run_blkfront(
    plan: &RingPlan,
    serve: &Serve,
    variant: &Variant,
    workload: RingWorkload,
    queues: u32,
    seconds: f64,
    seed: u64,
) -> Result<FrontReport> {
    let mut cmd = Command::new(&plan.ferrotap);
    cmd.args(["xensim", "blkfront"])
        .arg("--dir")
        .arg(&serve.host.0)
        .arg("--control")
        .arg(serve.host.control())
        .args(["--queues", &queues.to_string()])
        .args(["--ring-page-order", &workload.ring_page_order().to_string()])
        .args(["--workload", workload.front_kind()])
        .args(["--block-size", &workload.pattern.block_size().to_string()])
        .args(["--iodepth", &workload.iodepth.to_string()])
        .args(["--seconds", &format!("{seconds:.3}")])
        .args(["--seed", &seed.to_string()])
        .args(["--region-bytes", &plan.size.to_string()])
        .args(["--poll-us", &plan.front_poll_us.to_string()])
        .arg("--json")
        .env("RUST_BACKTRACE", "0");
    if variant.persistent {
        cmd.arg("--persistent");
    }
    let run = run_monitored(cmd).map_err(|e| format!("{e} (serve: {})", serve.log_tail()))?;
    let report: FrontReport = serde_json::from_str(run.stdout.trim())
        .map_err(|e| format!("the blkfront's output {:?}: {e}", run.stdout))?;
    if report.errors > 0 {
        return Err(format!(
            "the blkfront saw {} errors in {} requests (serve: {})",
            report.errors,
            report.ops,
            serve.log_tail()
        ));
    }
    Ok(report)
}

/// One measurement of ferrotap: a fresh serve on `image`, an unmeasured ramp, then the
/// measured run, with serve's CPU time over the run and its peak RSS.
fn measure_ferrotap(
    plan: &RingPlan,
    image: &Path,
    format: Format,
    variant: &Variant,
    workload: RingWorkload,
    queues: u32,
    seed: u64,
) -> Result<Measured> {
    let serve = Serve::start(plan, image, format, variant)?;
    if plan.ramp_ms > 0 {
        let ramp = plan.ramp_ms as f64 / 1000.0;
        // Offsets of its own: the measured run must not re-read what the ramp just read.
        run_blkfront(plan, &serve, variant, workload, queues, ramp, seed + 1)?;
    }
    let cpu_before = process_cpu_ns(serve.pid())?;
    let seconds = plan.runtime_ms as f64 / 1000.0;
    let report = run_blkfront(plan, &serve, variant, workload, queues, seconds, seed)?;
    if report.ops == 0 {
        return Err(format!("no request completed in {seconds} s"));
    }
    let cpu_ns = process_cpu_ns(serve.pid())? - cpu_before;
    let peak_kib = peak_rss_kib(serve.pid()).ok_or("serve's /proc/PID/status is gone")?;
    serve.close()?;
    Ok(Measured {
        iops: report.iops,
        mib_s: report.mib_s,
        p50_us: report.p50_us,
        p99_us: report.p99_us,
        // Over the blkfront's I/O window; the window of the sample also holds its connect
        // and disconnect, so this errs on the high side.
        cpu_pct: cpu_ns as f64 / (report.seconds.max(1e-3) * 1e9) * 100.0,
        rss_mib: peak_kib as f64 / 1024.0,
    })
}

/// fio's configuration for the same point: one job per queue at the same depth; random
/// patterns roam the whole image like the blkfront's queues, sequential jobs each own a
/// slice like its queues do.
fn fio_config(
    plan: &RingPlan,
    backing: &Backing,
    workload: RingWorkload,
    queues: u32,
    seed: u64,
) -> PointConfig {
    let jobs = u64::from(queues);
    let (slice, stride) = if workload.pattern.is_random() {
        (plan.size, 0)
    } else {
        let slice =
            plan.size / jobs / workload.pattern.block_size() * workload.pattern.block_size();
        (slice, slice)
    };
    PointConfig {
        workload: workload.pattern,
        engine: IoEngine::IoUring,
        iodepth: u64::from(workload.iodepth),
        jobs,
        slice,
        stride,
        runtime_ms: plan.runtime_ms,
        ramp_ms: plan.ramp_ms,
        one_pass: false,
        direct: backing.direct,
        seed,
    }
}

/// Serve with no frontend, or with a frontend connected and sending nothing: its CPU and
/// wake-ups over `plan.idle_ms` (precise, from its threads' schedstat) and its peak RSS.
fn measure_idle(plan: &RingPlan, image: &Path, variant: &Variant, connected: bool) -> Result<Idle> {
    let serve = Serve::start(plan, image, Format::Raw, variant)?;
    let front = if connected {
        let config = FrontConfig {
            persistent: variant.persistent,
            iodepth: 32,
            ..FrontConfig::new(serve.host.0.clone(), serve.host.control())
        };
        Some(Blkfront::connect(&config).map_err(|e| format!("connecting a blkfront: {e}"))?)
    } else {
        None
    };
    let info = control_request(&serve.host.control(), r#"{"op":"info"}"#)?;
    if info.contains(r#""connected":true"#) != connected {
        return Err(format!("serve's info while idle: {}", info.trim()));
    }
    // Let the connection settle (queue threads started, first waits entered).
    thread::sleep(Duration::from_millis(200));
    let (cpu_before, slices_before) = threads_schedstat(serve.pid())?;
    let watched = Instant::now();
    thread::sleep(Duration::from_millis(plan.idle_ms));
    let (cpu_after, slices_after) = threads_schedstat(serve.pid())?;
    let elapsed = watched.elapsed();
    let cpu_ns = cpu_after.saturating_sub(cpu_before);
    let wakeups = slices_after.saturating_sub(slices_before);
    let peak_kib = peak_rss_kib(serve.pid()).ok_or("serve's /proc/PID/status is gone")?;
    if let Some(mut front) = front {
        front
            .disconnect()
            .map_err(|e| format!("disconnecting the blkfront: {e}"))?;
    }
    serve.close()?;
    let seconds = elapsed.as_secs_f64().max(1e-3);
    Ok(Idle {
        measured: Measured {
            iops: 0.0,
            mib_s: 0.0,
            p50_us: 0.0,
            p99_us: 0.0,
            cpu_pct: cpu_ns as f64 / (seconds * 1e9) * 100.0,
            rss_mib: peak_kib as f64 / 1024.0,
        },
        wakeups_per_s: wakeups as f64 / seconds,
    })
}

/// An idle serve's figures.
struct Idle {
    measured: Measured,
    /// Times serve's threads were scheduled in, per second: 0 when it truly sleeps.
    wakeups_per_s: f64,
}

/// The ferrotap binary next to ferrotap-bench (run.sh builds both).
pub fn default_ferrotap() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| format!("locating ferrotap-bench: {e}"))?;
    let bin = exe.with_file_name("ferrotap");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} is missing: cargo build --release -p ferrotap (run.sh does)",
            bin.display()
        ))
    }
}

/// One point of the matrix: a workload at a number of queues on one backing.
struct Point {
    workload: RingWorkload,
    queues: u32,
}

pub fn run(args: &RingArgs) -> Result<()> {
    let started = Instant::now();
    let fio_version = fio::version()?;
    let mut dirs = if args.dirs.is_empty() {
        vec![PathBuf::from("/dev/shm"), PathBuf::from("/var/tmp")]
    } else {
        args.dirs.clone()
    };
    // The quick run keeps to one backing; the options comparison to the first unless
    // backings are named.
    if args.quick || (args.options && args.dirs.is_empty()) {
        dirs.truncate(1);
    }
    let plan = RingPlan {
        ferrotap: match &args.ferrotap {
            Some(path) => path.clone(),
            None => default_ferrotap()?,
        },
        size: args.size_mib.unwrap_or(if args.quick { 256 } else { 1024 }) * MIB,
        runtime_ms: args
            .runtime_ms
            .unwrap_or(if args.quick { 1200 } else { 1500 }),
        ramp_ms: args.ramp_ms.unwrap_or(300),
        // The full run's verdicts are the issue's: five rounds, so that two runs caught in a
        // slow spell of the shared disk still leave the median.
        rounds: args
            .rounds
            .unwrap_or(if args.quick || args.options { 3 } else { 5 }),
        idle_ms: args.idle_ms.unwrap_or(3000),
        // --quick is a check in under two minutes: one try, however fio drifts.
        bracket_tries: if args.quick { 1 } else { BRACKET_TRIES },
        front_poll_us: args.front_poll_us,
    };
    // Sequential jobs each own a whole number of MiB for up to 2 queues.
    if plan.size < 2 * MIB {
        return Err("images need at least 2 MiB".into());
    }
    let (formats, workloads, queue_counts, variants): (&[Format], &[RingWorkload], &[u32], _) =
        if args.options {
            (
                &[Format::Raw],
                &OPTIONS_WORKLOADS,
                &[1],
                Variant::options_grid(),
            )
        } else if args.quick {
            (
                &[Format::Raw, Format::Qcow2],
                &QUICK_WORKLOADS,
                &[1],
                vec![Variant::default_settings(
                    !args.front_copy,
                    args.serve_args.clone(),
                )],
            )
        } else {
            (
                &crate::suite::FORMATS,
                &FULL_WORKLOADS,
                &[1, 2],
                vec![Variant::default_settings(
                    !args.front_copy,
                    args.serve_args.clone(),
                )],
            )
        };
    let out = args.out.clone().unwrap_or_else(|| {
        let name = if args.options {
            "ring-options.json"
        } else if args.quick {
            "ring-quick.json"
        } else {
            "ring.json"
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(name)
    });
    let mut report = RingReport::new(RingConfig {
        fio: fio_version,
        mode: if args.options {
            "options"
        } else if args.quick {
            "quick"
        } else {
            "full"
        },
        image_size_mib: plan.size / MIB,
        runtime_ms: plan.runtime_ms,
        ramp_ms: plan.ramp_ms,
        rounds: plan.rounds,
        idle_ms: plan.idle_ms,
        front_persistent: !args.front_copy,
        front_poll_us: args.front_poll_us,
        serve_args: args.serve_args.clone(),
        seed: SEED,
        steady_drift_pct: STEADY_DRIFT * 100.0,
        bracket_tries: plan.bracket_tries,
        qcow2: "compat 1.1 (v3), 64 KiB clusters",
        vhd: "dynamic, 2 MiB blocks",
    });
    let formats: Vec<Format> = formats
        .iter()
        .copied()
        .filter(|f| args.only_formats.is_empty() || args.only_formats.iter().any(|o| o == f.name()))
        .collect();
    let points: Vec<Point> = workloads
        .iter()
        .filter(|w| args.only_workloads.is_empty() || args.only_workloads.contains(&w.name()))
        .flat_map(|&workload| {
            queue_counts
                .iter()
                .filter(|q| args.only_queues.is_empty() || args.only_queues.contains(q))
                .map(move |&queues| Point { workload, queues })
        })
        .collect();
    if points.is_empty() || formats.is_empty() {
        return Err("--workload/--queues/--format leave nothing to measure".into());
    }
    // fio writes to the raw image of each round, made even when ferrotap's raw is left out
    // (and only then: reads need no file but the formats' own).
    let mut image_formats = formats.clone();
    let writes = points.iter().any(|p| p.workload.pattern.is_write());
    if writes && !image_formats.contains(&Format::Raw) {
        image_formats.insert(0, Format::Raw);
    }
    // fio on every image file: each format's own for reads, raw for writes (`brackets`).
    let mut systems: Vec<System> = image_formats.iter().map(|&f| System::Fio(f)).collect();
    for variant in &variants {
        systems.extend(
            formats
                .iter()
                .map(|&f| System::Ferrotap(f, variant.clone())),
        );
    }
    for dir in &dirs {
        let backing = Backing::probe(dir)?;
        eprintln!(
            "== {} ({}): {}",
            backing.label(),
            backing.fs_type,
            if backing.direct {
                "O_DIRECT for every system"
            } else {
                "no O_DIRECT here: buffered I/O for every system"
            }
        );
        run_backing(
            &plan,
            &backing,
            &image_formats,
            &points,
            &systems,
            &mut report,
        );
        report.add_backing(&backing);
    }
    if !args.options {
        let first = Backing::probe(&dirs[0])?;
        run_idle(&plan, &first, args, &mut report);
    }
    report.finish();
    print!("{}", report.render());
    report.write_json(&out)?;
    println!(
        "results: {} ({:.0} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_backing(
    plan: &RingPlan,
    backing: &Backing,
    formats: &[Format],
    points: &[Point],
    systems: &[System],
    report: &mut RingReport,
) {
    // measured[point][system]: one entry per round that succeeded.
    let mut measured = vec![vec![Vec::<Measured>::new(); systems.len()]; points.len()];
    // references[point][system]: for each round a ferrotap system measured, fio's figures
    // interpolated to that system's turn between fio's runs before and after it.
    let mut references = vec![vec![Vec::<FioReference>::new(); systems.len()]; points.len()];
    let mut failed = vec![vec![false; systems.len()]; points.len()];
    for round in 1..=plan.rounds {
        // Fresh images every round: on tmpfs the same syscalls cost up to ~15% more or less
        // from one file to another, so the median over rounds is also one over files.
        let mut images: Vec<(Format, TempFile)> = Vec::new();
        for &format in formats {
            match preallocated_image(backing, format, plan.size) {
                Ok(file) => images.push((format, file)),
                Err(reason) => report.skip(RingSkip {
                    system: "ferrotap".into(),
                    workload: None,
                    format: format.name(),
                    backing: backing.label(),
                    queues: None,
                    reason,
                }),
            }
        }
        let image_of = |system: &System| {
            images
                .iter()
                .find(|(f, _)| *f == system.format())
                .map(|(_, image)| image)
        };
        for (p, point) in points.iter().enumerate() {
            // Turns count every run of the point in this round, so that each has a seed of
            // its own.
            let turn = Cell::new(0usize);
            let mut measure = |s: usize, report: &mut RingReport| {
                let system = &systems[s];
                let image = image_of(system)?; // could not be made; the skip says why
                if failed[p][s] {
                    return None;
                }
                let at = Turn {
                    round,
                    index: turn.get(),
                };
                turn.set(turn.get() + 1);
                let m = measure_turn(plan, backing, point, system, image, at, report);
                if m.is_none() {
                    failed[p][s] = true;
                }
                m
            };
            for bracket in brackets(systems, point.workload) {
                let (kept, attempts) =
                    measure_bracket(&bracket, plan.bracket_tries, &turn, |s| measure(s, report));
                if attempts > 1 {
                    report.count_remeasured(attempts - 1);
                }
                for m in kept.opening.iter().chain(&kept.closing) {
                    measured[p][bracket.fio].push(*m);
                }
                for &(s, _, m) in &kept.members {
                    measured[p][s].push(m);
                }
                for (s, reference) in kept.references() {
                    references[p][s].push(reference);
                }
            }
        }
    }
    for (p, point) in points.iter().enumerate() {
        for (s, system) in systems.iter().enumerate() {
            // A system that failed in any round gets no row (its skip entry says why).
            if !failed[p][s] && !measured[p][s].is_empty() {
                report.add(
                    system.label(),
                    point.workload.name(),
                    Some(point.workload.iodepth),
                    system.format(),
                    backing,
                    point.queues,
                    &measured[p][s],
                );
                if references[p][s].len() == measured[p][s].len() {
                    report.set_fio_reference(&references[p][s]);
                }
            }
        }
    }
}

/// A run's place in the benchmark: its round, and its turn within the round at its point
/// (fio's opening run is turn 0, its closing run the last).
#[derive(Clone, Copy)]
struct Turn {
    round: u64,
    index: usize,
}

impl Turn {
    /// Every run of a round, fio's opening and closing runs included, reads offsets of its
    /// own. A run re-reading offsets another read seconds before is faster on a virtual disk
    /// whose host caches what it reads: in a slow spell fio re-reading its offsets ran at
    /// 19k-39k IOPS (4 KiB random reads, QD32) and at 7k-15k with fresh ones, so with one
    /// seed for all, fio's closing run, the same offsets as its opening run, was favoured.
    /// Even seeds: a ferrotap run's ramp takes the odd one after its seed.
    fn seed(self) -> u64 {
        SEED + self.round * 1000 + self.index as u64 * 2
    }
}

/// Measure `system` at `point` on `image` once, printing the figures; None when it failed
/// (the skip entry says why).
fn measure_turn(
    plan: &RingPlan,
    backing: &Backing,
    point: &Point,
    system: &System,
    image: &TempFile,
    at: Turn,
    report: &mut RingReport,
) -> Option<Measured> {
    let round = at.round;
    let result = match system {
        System::Fio(_) => fio::run(
            image.path(),
            &fio_config(plan, backing, point.workload, point.queues, at.seed()),
        ),
        System::Ferrotap(format, variant) => measure_ferrotap(
            plan,
            image.path(),
            *format,
            variant,
            point.workload,
            point.queues,
            at.seed(),
        ),
    };
    match result {
        Ok(m) => {
            eprintln!(
                "   [{round}/{}] {:<8} {:<5} {:<16} q{} {:>9.0} IOPS {:>8.1} MiB/s p99 {:>8.1} µs CPU {:>5.1}% RSS {:>5.1} MiB",
                plan.rounds,
                system.label(),
                system.format().name(),
                point.workload.name(),
                point.queues,
                m.iops,
                m.mib_s,
                m.p99_us,
                m.cpu_pct,
                m.rss_mib
            );
            Some(m)
        }
        Err(reason) => {
            eprintln!(
                "   {} {} {} q{}: FAILED: {reason}",
                system.label(),
                system.format().name(),
                point.workload.name(),
                point.queues
            );
            report.skip(RingSkip {
                system: system.label().to_string(),
                workload: Some(point.workload.name()),
                format: system.format().name(),
                backing: backing.label(),
                queues: Some(point.queues),
                reason,
            });
            None
        }
    }
}

/// The idle rows: serve on a raw image with no frontend, and with one connected that sends
/// nothing, at serve's default settings (no polling) and, in the full run, with a polling
/// window (which must not turn into spinning while nothing happens).
fn run_idle(plan: &RingPlan, backing: &Backing, args: &RingArgs, report: &mut RingReport) {
    let image = match preallocated_image(backing, Format::Raw, plan.size) {
        Ok(image) => image,
        Err(reason) => {
            report.skip(RingSkip {
                system: "ferrotap".into(),
                workload: Some("idle".into()),
                format: Format::Raw.name(),
                backing: backing.label(),
                queues: None,
                reason,
            });
            return;
        }
    };
    let default = Variant::default_settings(!args.front_copy, args.serve_args.clone());
    let mut cases = vec![(default.clone(), false), (default.clone(), true)];
    if !args.quick {
        let mut polling = default;
        polling.poll_us = Some(1000);
        polling.label = "ferrotap[poll-us=1000]".into();
        cases.push((polling, true));
    }
    for (variant, connected) in cases {
        let workload = if connected { "idle-connected" } else { "idle" };
        match measure_idle(plan, image.path(), &variant, connected) {
            Ok(idle) => {
                let m = idle.measured;
                eprintln!(
                    "   {:<20} {workload:<16} CPU {:.3}% ({:.1} wake-ups/s) RSS {:.1} MiB",
                    variant.label, m.cpu_pct, idle.wakeups_per_s, m.rss_mib
                );
                report.add(
                    &variant.label,
                    workload.into(),
                    None,
                    Format::Raw,
                    backing,
                    1,
                    &[m],
                );
                report.set_wakeups(idle.wakeups_per_s);
            }
            Err(reason) => report.skip(RingSkip {
                system: variant.label.clone(),
                workload: Some(workload.into()),
                format: Format::Raw.name(),
                backing: backing.label(),
                queues: Some(1),
                reason,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_hold_the_queue_depth() {
        let order = |iodepth| RingWorkload::new(Workload::RandRead, iodepth).ring_page_order();
        assert_eq!(order(1), 0);
        assert_eq!(order(32), 0);
        assert_eq!(order(33), 1);
        assert_eq!(order(128), 2);
        assert_eq!(order(129), 3);
    }

    #[test]
    fn options_spell_out_serve_arguments() {
        let grid = Variant::options_grid();
        assert_eq!(grid.len(), 10);
        let aio = Variant::spelled_out("aio", false, false, 50);
        assert_eq!(aio.label, "ferrotap[engine=aio,grants=copy,poll-us=50]");
        assert_eq!(
            aio.serve_args(),
            ["--engine", "aio", "--no-persistent", "--poll-us", "50"]
        );
        let fixed = Variant::spelled_out("uring", false, true, 0);
        assert!(fixed.serve_args().contains(&"--fixed-buffers".to_string()));
        let default = Variant::default_settings(true, vec!["--pool-kib".into(), "1024".into()]);
        assert_eq!(default.serve_args(), ["--pool-kib", "1024"]);
        assert_eq!(
            RingWorkload::new(Workload::SeqRead, 8).name(),
            "read-1m-qd8"
        );
    }

    /// No two runs of a full benchmark, ramps included, share a seed: every round has
    /// at most 9 turns per point (fio, ferrotap, fio for each of raw, VHD and qcow2) in each
    /// of `BRACKET_TRIES` tries.
    #[test]
    fn every_run_and_ramp_has_its_own_seed() {
        let mut seen = std::collections::HashSet::new();
        for round in 1..=20 {
            for index in 0..9 * BRACKET_TRIES {
                let seed = Turn { round, index }.seed();
                assert!(seen.insert(seed), "round {round} turn {index}");
                assert!(seen.insert(seed + 1), "ramp of round {round} turn {index}");
            }
        }
    }

    /// A bracket is tried again while fio drifts across it, and the steadiest try is kept,
    /// whatever ferrotap measured in it; turns go on counting over the tries.
    #[test]
    fn a_bracket_is_measured_again_while_fio_drifts() {
        let bracket = Bracket {
            fio: 0,
            members: vec![1, 2],
        };
        let figures = |iops: f64| Measured {
            iops,
            mib_s: 0.0,
            p50_us: 0.0,
            p99_us: iops / 1000.0,
            cpu_pct: 0.0,
            rss_mib: 0.0,
        };
        // Scripted IOPS per run, in order: fio, member 1, member 2, fio for each try.
        let run = |script: &[f64]| {
            let turn = Cell::new(0usize);
            let mut runs = script.iter();
            let (kept, tries) = measure_bracket(&bracket, BRACKET_TRIES, &turn, |_| {
                turn.set(turn.get() + 1);
                runs.next().map(|&iops| figures(iops))
            });
            (kept, tries, turn.get())
        };
        // Steady at once (10% drift): one try.
        let (kept, tries, turns) = run(&[100.0, 90.0, 95.0, 90.0]);
        assert_eq!((tries, turns), (1, 4));
        assert_eq!(kept.members.len(), 2);
        assert_eq!(kept.last, 3);
        let references = kept.references();
        assert_eq!(references.len(), 2);
        assert_eq!(references[0].0, 1);
        assert!((references[0].1.iops - (100.0 - 10.0 / 3.0)).abs() < 1e-9);
        assert!((references[1].1.iops - (100.0 - 20.0 / 3.0)).abs() < 1e-9);
        // 40% then 10%: the second try is kept, although ferrotap measured more in the first.
        let (kept, tries, turns) = run(&[100.0, 500.0, 500.0, 60.0, 80.0, 70.0, 70.0, 88.0]);
        assert_eq!((tries, turns), (2, 8));
        assert_eq!(kept.opening.map(|m| m.iops), Some(80.0));
        assert_eq!(kept.members[0].2.iops, 70.0);
        // The turns within a kept retry count from its own opening run.
        assert_eq!((kept.members[0].1, kept.members[1].1, kept.last), (1, 2, 3));
        // Never steady: three tries, the steadiest (25%) kept.
        let (kept, tries, _) = run(&[
            100.0, 1.0, 1.0, 50.0, // 50%
            100.0, 2.0, 2.0, 75.0, // 25%
            100.0, 3.0, 3.0, 60.0, // 40%
        ]);
        assert_eq!(tries, 3);
        assert_eq!(kept.members[0].2.iops, 2.0);
        assert!((kept.drift().unwrap_or(0.0) - 0.25).abs() < 1e-9);
        // One try at most (--quick): kept however fio drifted.
        let turn = Cell::new(0usize);
        let mut runs = [100.0, 90.0, 95.0, 50.0, 100.0].iter();
        let (kept, tries) = measure_bracket(&bracket, 1, &turn, |_| {
            turn.set(turn.get() + 1);
            runs.next().map(|&iops| figures(iops))
        });
        assert_eq!((tries, turn.get()), (1, 4));
        assert_eq!(kept.closing.map(|m| m.iops), Some(50.0));
        // fio failing at the end gives no drift to judge: no second try, and no reference.
        let (kept, tries, turns) = run(&[100.0, 90.0, 95.0]);
        assert_eq!((tries, turns), (1, 4));
        assert!(kept.closing.is_none());
        assert!(kept.references().is_empty());
    }

    /// Reads compare each format with fio on its own file, writes every format with fio on
    /// the raw file; variants of one format share its bracket.
    #[test]
    fn reads_are_bracketed_by_fio_on_their_own_file() {
        let variant = |label: &str| Variant {
            label: label.into(),
            ..Variant::default_settings(true, Vec::new())
        };
        let systems = vec![
            System::Fio(Format::Raw),
            System::Fio(Format::Vhd),
            System::Fio(Format::Qcow2),
            System::Ferrotap(Format::Raw, variant("a")),
            System::Ferrotap(Format::Vhd, variant("a")),
            System::Ferrotap(Format::Qcow2, variant("a")),
            System::Ferrotap(Format::Raw, variant("b")),
        ];
        let bracket = |fio, members: &[usize]| Bracket {
            fio,
            members: members.to_vec(),
        };
        for pattern in [Workload::RandRead, Workload::SeqRead] {
            assert_eq!(
                brackets(&systems, RingWorkload::new(pattern, 32)),
                [bracket(0, &[3, 6]), bracket(1, &[4]), bracket(2, &[5])]
            );
        }
        for pattern in [Workload::RandWrite, Workload::SeqWrite] {
            assert_eq!(
                brackets(&systems, RingWorkload::new(pattern, 32)),
                [bracket(0, &[3, 4, 5, 6])]
            );
        }
        // A format without its fio system is left out rather than compared with another file.
        assert_eq!(
            brackets(
                &systems[..1]
                    .iter()
                    .chain(&systems[3..5])
                    .cloned()
                    .collect::<Vec<_>>(),
                RingWorkload::new(Workload::RandRead, 1)
            ),
            [bracket(0, &[1])]
        );
    }
}
