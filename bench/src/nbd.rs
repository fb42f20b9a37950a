//! The NBD benchmark: `fio --ioengine=nbd` (libnbd, one connection, unix socket) against
//! `ferrotap nbd`, qemu-nbd and nbdkit's file plugin serving the same raw, qcow2 and VHD
//! images, plus any endpoint given with `--peer NAME=URI`, round after round so that each
//! round's systems see the same moments of the machine. Each ferrotap row carries its ratio
//! to the best peer of the same image (paired by round) and the targets are checked.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ferrotap::image::Format;
use serde::Serialize;
use serde_json::Value;

use crate::pattern::Workload;
use crate::procfs::{process_cpu_ns, run_monitored, status_kib};
use crate::report::{paired_ratio, round, write_json, BackingInfo};
use crate::ring::default_ferrotap;
use crate::suite::{preallocated_image, Backing, TempFile, MIB};
use crate::{fio, Result};

#[derive(Debug, clap::Args)]
pub struct NbdArgs {
    /// Under two minutes: 256 MiB images, one round of 1.5 s per point.
    #[arg(long)]
    quick: bool,
    /// Directory for the images (default /dev/shm: tmpfs, the setting).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// An extra NBD endpoint measured beside the others, as NAME=URI (repeat), e.g.
    /// `--peer tapdisk=nbd+unix:///?socket=/run/blktap-control/nbd123`. It serves what it
    /// serves: its rows are labelled `peer` and compared with the raw rows.
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<(String, String)>,
    /// Measured time per point and round, in milliseconds (default 4000; 1500 quick).
    #[arg(long)]
    runtime_ms: Option<u64>,
    /// Unmeasured run before each measurement, in milliseconds (default 500; 300 quick).
    #[arg(long)]
    ramp_ms: Option<u64>,
    /// Rounds per point (default 3; 1 quick); rows give the median round.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=99))]
    rounds: Option<u64>,
    /// Virtual size of every image, in MiB (default 1024; 256 quick).
    #[arg(long)]
    size_mib: Option<u64>,
    /// An extra argument for every `ferrotap nbd` (repeat), e.g. `--ferrotap-arg=--threads=2`.
    #[arg(long = "ferrotap-arg", allow_hyphen_values = true)]
    ferrotap_args: Vec<String>,
    /// The ferrotap binary (default: the one built next to ferrotap-bench).
    #[arg(long)]
    ferrotap: Option<PathBuf>,
    /// Where to write the JSON (default bench/results/nbd.json; nbd-quick.json quick).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_peer(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((name, uri)) if !name.is_empty() && !uri.is_empty() => {
            Ok((name.to_string(), uri.to_string()))
        }
        _ => Err(format!("--peer wants NAME=URI, not {text:?}")),
    }
}

const SEED: u64 = 0x5eed_f00d;
/// How long a server may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The targets against the best peer of the same run.
const RANDOM_TARGET: f64 = 1.3;
const SEQUENTIAL_TARGET: f64 = 1.1;
/// Sequential export from a tmpfs-backed raw image: 2 GB/s, in MiB/s.
const TMPFS_SEQUENTIAL_MIB_S: f64 = 2e9 / (1024.0 * 1024.0);

/// A workload at the queue depth the issue names.
#[derive(Debug, Clone, Copy)]
struct Point {
    workload: Workload,
    iodepth: u32,
}

impl Point {
    fn label(&self) -> String {
        format!("{}-qd{}", self.workload.name(), self.iodepth)
    }

    fn target(&self) -> f64 {
        if self.workload.is_random() {
            RANDOM_TARGET
        } else {
            SEQUENTIAL_TARGET
        }
    }
}

const POINTS: [Point; 3] = [
    Point {
        workload: Workload::RandRead,
        iodepth: 32,
    },
    Point {
        workload: Workload::RandWrite,
        iodepth: 32,
    },
    Point {
        workload: Workload::SeqRead,
        iodepth: 8,
    },
];

const FORMATS: [Format; 3] = [Format::Raw, Format::Qcow2, Format::Vhd];

#[derive(Debug, Clone, PartialEq, Eq)]
enum System {
    Ferrotap,
    QemuNbd,
    Nbdkit,
    Peer(String, String),
}

impl System {
    fn name(&self) -> String {
        match self {
            System::Ferrotap => "ferrotap".into(),
            System::QemuNbd => "qemu-nbd".into(),
            System::Nbdkit => "nbdkit-file".into(),
            System::Peer(name, _) => name.clone(),
        }
    }
}

/// A server listening for the measurement (stopped on drop), or an external peer.
struct Endpoint {
    child: Option<Child>,
    uri: String,
    /// How it was started, for the JSON (cache mode, filters).
    setup: String,
}

impl Endpoint {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Wait until `socket` accepts a connection while `child` lives.
fn wait_listening(child: &mut Child, socket: &Path, what: &str) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited at start ({status})"));
        }
        if UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(format!("{what} did not listen on {}", socket.display()));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(mut command: Command, what: &str) -> Result<Child> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {what}: {e}"))
}

fn uri_of(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

/// The directory where nbdkit keeps its filters.
fn nbdkit_has_filter(name: &str) -> bool {
    let Ok(out) = Command::new("nbdkit").arg("--dump-config").output() else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("filterdir="))
        .is_some_and(|dir| {
            Path::new(dir)
                .join(format!("nbdkit-{name}-filter.so"))
                .exists()
        })
}

/// A directory for the servers' sockets, removed with what is in it when dropped.
struct SocketDir(PathBuf);

impl SocketDir {
    fn create() -> Result<SocketDir> {
        let dir = std::env::temp_dir().join(format!("ferrotap-bench-nbd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(SocketDir(dir))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Plan {
    ferrotap: PathBuf,
    ferrotap_args: Vec<String>,
    size: u64,
    runtime_ms: u64,
    ramp_ms: u64,
    rounds: u64,
    sockets: PathBuf,
}

fn start(plan: &Plan, system: &System, format: Format, image: &Path) -> Result<Endpoint> {
    let socket = plan
        .sockets
        .join(format!("{}-{}.sock", system.name(), format.name()));
    let _ = std::fs::remove_file(&socket);
    match system {
        System::Ferrotap => {
            let mut command = Command::new(&plan.ferrotap);
            command
                .arg("nbd")
                .arg("--socket")
                .arg(&socket)
                .args(["-f", format.name()])
                .args(&plan.ferrotap_args)
                .arg(image)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = command
                .spawn()
                .map_err(|e| format!("starting ferrotap nbd: {e}"))?;
            let mut line = String::new();
            if let Some(stdout) = child.stdout.take() {
                // The URI line says it listens.
                let _ = BufReader::new(stdout).read_line(&mut line);
            }
            let endpoint = Endpoint {
                child: Some(child),
                uri: line.trim().to_string(),
                setup: format!("ferrotap nbd {}", plan.ferrotap_args.join(" ")),
            };
            if endpoint.uri.is_empty() {
                return Err("ferrotap nbd printed no URI".into());
            }
            Ok(endpoint)
        }
        System::QemuNbd => {
            let qemu_format = if format == Format::Vhd {
                "vpc"
            } else {
                format.name()
            };
            // The setting first; a filesystem without O_DIRECT refuses cache=none.
            let mut last_error = String::new();
            for (cache, aio) in [("none", "io_uring"), ("writeback", "io_uring")] {
                let mut command = Command::new("qemu-nbd");
                command
                    .args(["-t", "-e", "16", "-f", qemu_format])
                    .arg(format!("--cache={cache}"))
                    .arg(format!("--aio={aio}"))
                    .arg("-k")
                    .arg(&socket)
                    .arg(image);
                let mut child = spawn(command, "qemu-nbd")?;
                match wait_listening(&mut child, &socket, "qemu-nbd") {
                    Ok(()) => {
                        return Ok(Endpoint {
                            child: Some(child),
                            uri: uri_of(&socket),
                            setup: format!("qemu-nbd --cache={cache} --aio={aio}"),
                        })
                    }
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        last_error = e;
                    }
                }
            }
            Err(last_error)
        }
        System::Nbdkit => {
            let mut command = Command::new("nbdkit");
            command.args(["-f", "-U"]).arg(&socket);
            let setup = match format {
                Format::Raw => "nbdkit file",
                Format::Qcow2 if nbdkit_has_filter("qcow2dec") => {
                    command.arg("--filter=qcow2dec");
                    "nbdkit --filter=qcow2dec file (read-only)"
                }
                _ => {
                    return Err(format!(
                        "{} has no {} reader (no qcow2dec filter before nbdkit 1.36, no VHD filter at all)",
                        nbdkit_version(),
                        format
                    ))
                }
            };
            command.arg("file").arg(image);
            let mut child = spawn(command, "nbdkit")?;
            wait_listening(&mut child, &socket, "nbdkit")?;
            Ok(Endpoint {
                child: Some(child),
                uri: uri_of(&socket),
                setup: setup.into(),
            })
        }
        System::Peer(_, uri) => Ok(Endpoint {
            child: None,
            uri: uri.clone(),
            setup: "external".into(),
        }),
    }
}

fn nbdkit_version() -> String {
    Command::new("nbdkit")
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_else(|_| "(missing)".into())
}

/// One measured round of one point.
#[derive(Debug, Clone, Copy)]
struct Sample {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_pct: Option<f64>,
    rss_mib: Option<f64>,
}

fn measure(plan: &Plan, endpoint: &Endpoint, point: Point) -> Result<Sample> {
    let mut command = Command::new("fio");
    command
        .arg("--name=ferrotap-bench-nbd")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", endpoint.uri))
        .arg(format!("--rw={}", point.workload.fio_rw()))
        .arg(format!("--bs={}", point.workload.block_size()))
        .arg(format!("--iodepth={}", point.iodepth))
        .arg(format!("--size={}", plan.size))
        .arg("--norandommap")
        .arg("--randrepeat=1")
        .arg(format!("--randseed={SEED}"))
        .arg("--time_based")
        .arg(format!("--runtime={}ms", plan.runtime_ms))
        .arg(format!("--ramp_time={}ms", plan.ramp_ms))
        .arg("--lat_percentiles=1")
        .arg("--percentile_list=50:99")
        .arg("--output-format=json");
    let pid = endpoint.pid();
    let cpu_before = pid.map(process_cpu_ns).transpose()?;
    let started = Instant::now();
    let run = run_monitored(command)?;
    let wall_ns = started.elapsed().as_nanos() as f64;
    let cpu_after = pid.map(process_cpu_ns).transpose()?;
    // The nbd engine says "fio: connected to NBD server" on stdout before the JSON.
    let json = run
        .stdout
        .find('{')
        .map_or("", |start| &run.stdout[start..]);
    let report: Value =
        serde_json::from_str(json).map_err(|e| format!("fio's JSON output: {e}"))?;
    let measured = fio::parse(&report, point.workload, 1)?;
    Ok(Sample {
        iops: measured.iops,
        mib_s: measured.mib_s,
        p50_us: measured.p50_us,
        p99_us: measured.p99_us,
        // The server's CPU over fio's whole run (ramp included), 100 = one core.
        cpu_pct: match (cpu_before, cpu_after) {
            (Some(before), Some(after)) => Some((after - before) as f64 / wall_ns * 100.0),
            _ => None,
        },
        rss_mib: pid
            .and_then(|pid| status_kib(pid, "VmHWM"))
            .map(|kib| kib as f64 / 1024.0),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct NbdRow {
    pub system: String,
    pub workload: String,
    /// raw, qcow2, vhd, or `peer` for an external endpoint.
    pub format: String,
    pub backing: String,
    /// Connections (fio jobs).
    pub queues: u32,
    pub iodepth: u32,
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The server's CPU (100 = one core); none for an external peer.
    pub cpu_pct: Option<f64>,
    /// The server's peak RSS; none for an external peer.
    pub rss_mib: Option<f64>,
    pub setup: String,
    pub iops_rounds: Vec<f64>,
    /// ferrotap rows: the best peer of the same image and workload, and the ratio to it
    /// (median of per-round ratios).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_best_peer: Option<f64>,
}

#[derive(Debug, Serialize)]
struct TargetCheck {
    target: String,
    row: String,
    value: f64,
    limit: f64,
    pass: bool,
}

#[derive(Debug, Serialize)]
struct NbdSkip {
    system: String,
    format: String,
    reason: String,
}

#[derive(Debug, Serialize)]
struct NbdConfig {
    fio: String,
    mode: &'static str,
    image_size_mib: u64,
    runtime_ms: u64,
    ramp_ms: u64,
    rounds: u64,
    ferrotap_args: Vec<String>,
    peers: Vec<String>,
    seed: u64,
}

#[derive(Debug, Serialize)]
struct NbdReport {
    config: NbdConfig,
    backings: Vec<BackingInfo>,
    runs: Vec<NbdRow>,
    targets: Vec<TargetCheck>,
    skipped: Vec<NbdSkip>,
}

pub fn run(args: &NbdArgs) -> Result<()> {
    let started = Instant::now();
    let fio_version = fio::version()?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    let backing = Backing::probe(&dir)?;
    let sockets = SocketDir::create()?;
    let plan = Plan {
        ferrotap: match &args.ferrotap {
            Some(path) => path.clone(),
            None => default_ferrotap()?,
        },
        ferrotap_args: args.ferrotap_args.clone(),
        size: args.size_mib.unwrap_or(if args.quick { 256 } else { 1024 }) * MIB,
        runtime_ms: args
            .runtime_ms
            .unwrap_or(if args.quick { 1500 } else { 4000 }),
        ramp_ms: args.ramp_ms.unwrap_or(if args.quick { 300 } else { 500 }),
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }),
        sockets: sockets.0.clone(),
    };
    let out = args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(if args.quick {
                "nbd-quick.json"
            } else {
                "nbd.json"
            })
    });
    eprintln!(
        "nbd: {} MiB images in {} ({}), {} round(s) of {} ms (+{} ms ramp) per point",
        plan.size / MIB,
        backing.label(),
        backing.fs_type,
        plan.rounds,
        plan.runtime_ms,
        plan.ramp_ms
    );
    let mut images: Vec<(Format, TempFile)> = Vec::new();
    let mut skipped = Vec::new();
    for format in FORMATS {
        match preallocated_image(&backing, format, plan.size) {
            Ok(file) => images.push((format, file)),
            Err(reason) => skipped.push(NbdSkip {
                system: "all".into(),
                format: format.name().into(),
                reason,
            }),
        }
    }
    let peers: Vec<System> = args
        .peers
        .iter()
        .map(|(name, uri)| System::Peer(name.clone(), uri.clone()))
        .collect();

    // (system, format label, point index) -> samples, in round order.
    let mut samples: Vec<(System, String, usize, Vec<Sample>, String)> = Vec::new();
    let mut record =
        |system: &System, format: &str, index: usize, sample: Sample, setup: &str| match samples
            .iter_mut()
            .find(|(s, f, i, _, _)| s == system && f == format && *i == index)
        {
            Some(entry) => entry.3.push(sample),
            None => samples.push((
                system.clone(),
                format.to_string(),
                index,
                vec![sample],
                setup.to_string(),
            )),
        };
    let locals = [System::Ferrotap, System::QemuNbd, System::Nbdkit];
    for round_index in 0..plan.rounds {
        for (format, image) in &images {
            // Rotate who goes first from round to round.
            let mut order: Vec<&System> = locals.iter().collect();
            order.rotate_left(round_index as usize % locals.len());
            for system in order {
                let endpoint = match start(&plan, system, *format, image.path()) {
                    Ok(endpoint) => endpoint,
                    Err(reason) => {
                        if round_index == 0 {
                            eprintln!("   {} {}: {reason}", system.name(), format);
                            skipped.push(NbdSkip {
                                system: system.name(),
                                format: format.name().into(),
                                reason,
                            });
                        }
                        continue;
                    }
                };
                for (index, point) in POINTS.iter().enumerate() {
                    match measure(&plan, &endpoint, *point) {
                        Ok(sample) => {
                            eprintln!(
                                "   round {} {} {} {}: {:.0} IOPS, {:.0} MiB/s",
                                round_index + 1,
                                system.name(),
                                format,
                                point.label(),
                                sample.iops,
                                sample.mib_s
                            );
                            record(system, format.name(), index, sample, &endpoint.setup);
                        }
                        Err(reason) => {
                            eprintln!(
                                "   {} {} {}: {reason}",
                                system.name(),
                                format,
                                point.label()
                            );
                            if round_index == 0 {
                                skipped.push(NbdSkip {
                                    system: system.name(),
                                    format: format!("{} {}", format, point.label()),
                                    reason,
                                });
                            }
                        }
                    }
                }
            }
        }
        for peer in &peers {
            let endpoint = start(&plan, peer, Format::Raw, Path::new(""))?;
            for (index, point) in POINTS.iter().enumerate() {
                match measure(&plan, &endpoint, *point) {
                    Ok(sample) => record(peer, "peer", index, sample, "external"),
                    Err(reason) => eprintln!("   {} {}: {reason}", peer.name(), point.label()),
                }
            }
        }
    }

    let rows = rows_of(&samples, &backing.label());
    let targets = check_targets(&rows, &backing);
    let report = NbdReport {
        config: NbdConfig {
            fio: fio_version,
            mode: if args.quick { "quick" } else { "full" },
            image_size_mib: plan.size / MIB,
            runtime_ms: plan.runtime_ms,
            ramp_ms: plan.ramp_ms,
            rounds: plan.rounds,
            ferrotap_args: plan.ferrotap_args.clone(),
            peers: args.peers.iter().map(|(n, u)| format!("{n}={u}")).collect(),
            seed: SEED,
        },
        backings: vec![BackingInfo::of(&backing)],
        runs: rows,
        targets,
        skipped,
    };
    print!("{}", table(&report));
    write_json(&report, &out)?;
    eprintln!(
        "nbd: wrote {} in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn rows_of(samples: &[(System, String, usize, Vec<Sample>, String)], backing: &str) -> Vec<NbdRow> {
    let mut rows: Vec<NbdRow> = samples
        .iter()
        .map(|(system, format, index, rounds, setup)| {
            let mut by_iops: Vec<&Sample> = rounds.iter().collect();
            by_iops.sort_by(|a, b| a.iops.total_cmp(&b.iops));
            // The lower median: a real round, never an average.
            let m = by_iops[(by_iops.len() - 1) / 2];
            NbdRow {
                system: system.name(),
                workload: POINTS[*index].label(),
                format: format.clone(),
                backing: backing.to_string(),
                queues: 1,
                iodepth: POINTS[*index].iodepth,
                iops: round(m.iops, 1),
                mib_s: round(m.mib_s, 1),
                p50_us: round(m.p50_us, 1),
                p99_us: round(m.p99_us, 1),
                cpu_pct: m.cpu_pct.map(|v| round(v, 1)),
                rss_mib: m.rss_mib.map(|v| round(v, 1)),
                setup: setup.clone(),
                iops_rounds: rounds.iter().map(|s| round(s.iops, 1)).collect(),
                best_peer: None,
                vs_best_peer: None,
            }
        })
        .collect();
    let peers: Vec<NbdRow> = rows
        .iter()
        .filter(|r| r.system != "ferrotap")
        .cloned()
        .collect();
    for row in rows.iter_mut().filter(|r| r.system == "ferrotap") {
        // External peers serve whatever they serve: they stand beside the raw rows.
        let best = peers
            .iter()
            .filter(|p| {
                p.workload == row.workload
                    && (p.format == row.format || (p.format == "peer" && row.format == "raw"))
            })
            .max_by(|a, b| a.iops.total_cmp(&b.iops));
        if let Some(best) = best {
            row.best_peer = Some(best.system.clone());
            row.vs_best_peer = paired_ratio(&row.iops_rounds, &best.iops_rounds);
        }
    }
    rows
}

fn check_targets(rows: &[NbdRow], backing: &Backing) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    for row in rows.iter().filter(|r| r.system == "ferrotap") {
        let Some(point) = POINTS.iter().find(|p| p.label() == row.workload) else {
            continue;
        };
        if let Some(ratio) = row.vs_best_peer {
            checks.push(TargetCheck {
                target: format!(
                    "{} vs best peer ({})",
                    if point.workload.is_random() {
                        "IOPS"
                    } else {
                        "throughput"
                    },
                    row.best_peer.clone().unwrap_or_default()
                ),
                row: format!("{} {}", row.format, row.workload),
                value: ratio,
                limit: point.target(),
                pass: ratio >= point.target(),
            });
        }
        if backing.fs_type == "tmpfs" && row.format == "raw" && !point.workload.is_random() {
            checks.push(TargetCheck {
                target: "MiB/s of sequential export from tmpfs raw (2 GB/s)".into(),
                row: format!("{} {}", row.format, row.workload),
                value: row.mib_s,
                limit: round(TMPFS_SEQUENTIAL_MIB_S, 1),
                pass: row.mib_s >= TMPFS_SEQUENTIAL_MIB_S,
            });
        }
    }
    checks
}

fn table(report: &NbdReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<12} {:<6} {:<18} {:>9} {:>8} {:>8} {:>8} {:>6} {:>6}  vs best peer",
        "system", "format", "workload", "IOPS", "MiB/s", "p50 us", "p99 us", "cpu%", "RSS"
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    for row in &report.runs {
        let _ = writeln!(
            out,
            "{:<12} {:<6} {:<18} {:>9.0} {:>8.0} {:>8.1} {:>8.1} {:>6} {:>6}  {}",
            row.system,
            row.format,
            row.workload,
            row.iops,
            row.mib_s,
            row.p50_us,
            row.p99_us,
            opt(row.cpu_pct),
            opt(row.rss_mib),
            match (&row.vs_best_peer, &row.best_peer) {
                (Some(ratio), Some(peer)) => format!("{ratio:.2}x {peer}"),
                _ => String::new(),
            }
        );
    }
    let _ = writeln!(out, "\ntargets:");
    for check in &report.targets {
        let _ = writeln!(
            out,
            "  {} {:<28} {}: {:.2} (limit {:.2})",
            if check.pass { "PASS" } else { "FAIL" },
            check.row,
            check.target,
            check.value,
            check.limit
        );
    }
    for skip in &report.skipped {
        let _ = writeln!(
            out,
            "  n/a {} {}: {}",
            skip.system, skip.format, skip.reason
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(iops: f64) -> Sample {
        Sample {
            iops,
            mib_s: iops / 256.0,
            p50_us: 1.0,
            p99_us: 2.0,
            cpu_pct: None,
            rss_mib: None,
        }
    }

    #[test]
    fn peers_parse_as_name_and_uri() {
        assert_eq!(
            parse_peer("tapdisk=nbd+unix:///?socket=/x").unwrap(),
            ("tapdisk".to_string(), "nbd+unix:///?socket=/x".to_string())
        );
        assert!(parse_peer("tapdisk").is_err());
        assert!(parse_peer("=nbd://x").is_err());
    }

    /// The best peer is the fastest at the same point on the same image (an external peer
    /// only beside raw), and the ratio pairs rounds.
    #[test]
    fn ferrotap_rows_compare_with_the_best_peer() {
        let peer = System::Peer("tap".into(), "nbd://x".into());
        let samples = vec![
            (
                System::Ferrotap,
                "raw".to_string(),
                0,
                vec![sample(130.0), sample(60.0)],
                String::new(),
            ),
            (
                System::QemuNbd,
                "raw".to_string(),
                0,
                vec![sample(50.0), sample(40.0)],
                String::new(),
            ),
            (
                System::Nbdkit,
                "raw".to_string(),
                0,
                vec![sample(100.0), sample(50.0)],
                String::new(),
            ),
            (
                peer.clone(),
                "peer".to_string(),
                0,
                vec![sample(90.0), sample(45.0)],
                String::new(),
            ),
            (
                System::Ferrotap,
                "qcow2".to_string(),
                0,
                vec![sample(80.0), sample(80.0)],
                String::new(),
            ),
            (
                System::QemuNbd,
                "qcow2".to_string(),
                0,
                vec![sample(40.0), sample(20.0)],
                String::new(),
            ),
        ];
        let rows = rows_of(&samples, "/dev/shm");
        let raw = rows
            .iter()
            .find(|r| r.system == "ferrotap" && r.format == "raw")
            .unwrap();
        assert_eq!(raw.best_peer.as_deref(), Some("nbdkit-file"));
        // Per round 1.3 and 1.2: the lower median.
        assert_eq!(raw.vs_best_peer, Some(1.2));
        let qcow2 = rows
            .iter()
            .find(|r| r.system == "ferrotap" && r.format == "qcow2")
            .unwrap();
        assert_eq!(qcow2.best_peer.as_deref(), Some("qemu-nbd"));
        assert_eq!(qcow2.vs_best_peer, Some(2.0));
        assert!(rows
            .iter()
            .all(|r| r.system == "ferrotap" || r.best_peer.is_none()));
    }
}
