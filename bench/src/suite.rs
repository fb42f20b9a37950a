//! The image benchmark: for every backing directory, round after round, every workload and
//! both image states: fio on a raw file, then ferrotap's image layer on raw, VHD and qcow2,
//! one after the other so that the systems compared see the same moment of a noisy machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ferrotap::image::file::{AlignedBuf, DIRECT_ALIGN};
use ferrotap::image::{create, CreateOptions, Format, Image, ImageFile, ImageOptions, OpenMode};

use crate::pattern::{Rng, State, Workload};
use crate::point::PointResult;
use crate::procfs::{filesystem_type, run_monitored};
use crate::report::{Report, Row, Skip};
use crate::{fio, IoEngine, Measured, PointConfig, Result};

#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// Small files and 1 s per point: the whole run in under two minutes.
    #[arg(long)]
    quick: bool,
    /// Directory to put the images in (repeat for several backings); default: /dev/shm
    /// (tmpfs) and /var/tmp (disk).
    #[arg(long = "dir")]
    dirs: Vec<PathBuf>,
    /// Threads per system and point (queue depth = jobs: the image layer is synchronous).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    jobs: u64,
    /// Measured time per point and round, in milliseconds (default 1200; 800 with --quick).
    #[arg(long)]
    runtime_ms: Option<u64>,
    /// Unmeasured run before each measurement, in milliseconds (default 300; 200 with
    /// --quick); not for writes to empty images, which must all be first writes.
    #[arg(long)]
    ramp_ms: Option<u64>,
    /// Rounds per point, the systems taking turns; rows give the median round (default 3;
    /// 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=99))]
    rounds: Option<u64>,
    /// Virtual size of every image, in MiB (default 1024; 64 with --quick).
    #[arg(long)]
    size_mib: Option<u64>,
    /// Where to write the JSON results (default bench/results/image.json, or
    /// image-quick.json with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The formats ferrotap is measured on, in table order.
pub const FORMATS: [Format; 3] = [Format::Raw, Format::Vhd, Format::Qcow2];
/// Seed of every random pattern, so every system sees the same offsets.
const SEED: u64 = 0x5eed_f00d;
pub const MIB: u64 = 1 << 20;

/// A directory the images live in, and how files there are opened.
pub struct Backing {
    pub dir: PathBuf,
    pub fs_type: String,
    /// O_DIRECT works there; when not, every system runs buffered on this backing.
    pub direct: bool,
}

impl Backing {
    pub fn probe(dir: &Path) -> Result<Backing> {
        let fs_type = filesystem_type(dir)?;
        let direct = supports_direct_io(dir)?;
        Ok(Backing {
            dir: dir.to_path_buf(),
            fs_type,
            direct,
        })
    }

    /// Reads are served from the page cache: buffered I/O, or a filesystem whose storage
    /// is the page cache (O_DIRECT there is only a flag).
    fn reads_from_page_cache(&self) -> bool {
        !self.direct || matches!(self.fs_type.as_str(), "tmpfs" | "ramfs")
    }

    pub fn label(&self) -> String {
        self.dir.display().to_string()
    }

    fn file(&self, name: &str) -> TempFile {
        TempFile(
            self.dir
                .join(format!("ferrotap-bench-{}-{name}", std::process::id())),
        )
    }
}

/// Whether an aligned O_DIRECT write and read work in `dir` (tmpfs refused O_DIRECT
/// before Linux 6.6).
fn supports_direct_io(dir: &Path) -> Result<bool> {
    let probe = TempFile(dir.join(format!(
        "ferrotap-bench-{}-direct-probe",
        std::process::id()
    )));
    std::fs::write(&probe.0, [0u8; DIRECT_ALIGN])
        .map_err(|e| format!("writing {}: {e}", probe.0.display()))?;
    let direct = OpenMode {
        read_only: false,
        direct: true,
    };
    let mut buf = AlignedBuf::zeroed(DIRECT_ALIGN);
    Ok(ImageFile::open(&probe.0, direct)
        .and_then(|file| {
            file.write_at(buf.as_slice(), 0)?;
            file.read_at(buf.as_mut_slice(), 0)
        })
        .is_ok())
}

/// A file of the benchmark's, removed when dropped.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `-o` options that give the images the issue asks for.
fn create_options(format: Format, size: u64) -> CreateOptions {
    let options: &[(&str, &str)] = match format {
        Format::Raw => &[],
        Format::Vhd => &[("subformat", "dynamic")],
        Format::Qcow2 => &[("compat", "1.1"), ("cluster_size", "65536")],
    };
    CreateOptions {
        size,
        backing: None,
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    }
}

/// Create a fresh (empty) image with ferrotap.
fn create_image(file: &TempFile, format: Format, size: u64) -> Result<()> {
    create(&file.0, format, create_options(format, size)).map_err(|e| e.to_string())
}

/// Write every byte of the image through ferrotap, so that every block or cluster is
/// allocated before reads are measured.
fn fill_image(file: &TempFile, format: Format, size: u64, direct: bool) -> Result<()> {
    let image = Image::open(
        &file.0,
        ImageOptions {
            direct,
            format: Some(format),
            ..ImageOptions::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let mut chunk = AlignedBuf::zeroed(MIB as usize);
    let mut rng = Rng::new(SEED);
    let mut offset = 0;
    while offset < size {
        rng.fill(chunk.as_mut_slice());
        let n = MIB.min(size - offset) as usize;
        image
            .write_at(&chunk.as_slice()[..n], offset)
            .map_err(|e| e.to_string())?;
        offset += n as u64;
    }
    image.flush().map_err(|e| e.to_string())
}

/// Read every byte of the file twice, as plain file reads. A page-cache page is moved to
/// the active list on its second access, and that costs a lock in the kernel: without this,
/// whichever system first reads a file on tmpfs pays for it (fio for the raw file, which
/// ferrotap-raw then reads for free; ferrotap alone for VHD and qcow2), up to ~20% of a
/// 4 KiB read.
fn warm_up(file: &TempFile, direct: bool) -> Result<()> {
    let mode = OpenMode {
        read_only: true,
        direct,
    };
    let file = ImageFile::open(&file.0, mode).map_err(|e| e.to_string())?;
    let len = file.size().map_err(|e| e.to_string())?;
    let mut chunk = AlignedBuf::zeroed(MIB as usize);
    for _pass in 0..2 {
        let mut offset = 0;
        while offset < len {
            let n = MIB.min(len - offset) as usize;
            file.read_at(&mut chunk.as_mut_slice()[..n], offset)
                .map_err(|e| e.to_string())?;
            offset += n as u64;
        }
    }
    Ok(())
}

/// What is measured on one backing: fio, then ferrotap on each format.
#[derive(Clone, Copy)]
enum System {
    Fio,
    Ferrotap(Format),
}

impl System {
    fn all() -> impl Iterator<Item = System> {
        std::iter::once(System::Fio).chain(FORMATS.map(System::Ferrotap))
    }

    fn name(self) -> &'static str {
        match self {
            System::Fio => "fio",
            System::Ferrotap(_) => "ferrotap",
        }
    }

    fn format(self) -> Format {
        match self {
            System::Fio => Format::Raw,
            System::Ferrotap(format) => format,
        }
    }
}

fn measure_ferrotap(file: &Path, format: Format, config: &PointConfig) -> Result<Measured> {
    let exe = std::env::current_exe().map_err(|e| format!("locating ferrotap-bench: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("point")
        .arg("--file")
        .arg(file)
        .args(["--format", format.name()])
        .args(["--workload", config.workload.name()])
        .args(["--jobs", &config.jobs.to_string()])
        .args(["--slice", &config.slice.to_string()])
        .args(["--runtime-ms", &config.runtime_ms.to_string()])
        .args(["--ramp-ms", &config.ramp_ms.to_string()])
        .args(["--seed", &config.seed.to_string()]);
    if config.one_pass {
        cmd.arg("--one-pass");
    }
    if config.direct {
        cmd.arg("--direct");
    }
    let run = run_monitored(cmd)?;
    let result: PointResult = serde_json::from_str(run.stdout.trim())
        .map_err(|e| format!("the point's output {:?}: {e}", run.stdout))?;
    let seconds = result.elapsed_ns.max(1) as f64 / 1e9;
    Ok(Measured {
        iops: result.ops as f64 / seconds,
        mib_s: result.bytes as f64 / seconds / MIB as f64,
        p50_us: result.p50_ns as f64 / 1000.0,
        p99_us: result.p99_ns as f64 / 1000.0,
        cpu_pct: result.cpu_ns as f64 / result.elapsed_ns.max(1) as f64 * 100.0,
        rss_mib: run.peak_rss_kib as f64 / 1024.0,
    })
}

pub fn run(args: &ImageArgs) -> Result<()> {
    let started = Instant::now();
    let fio_version = fio::version()?;
    let dirs = if args.dirs.is_empty() {
        vec![PathBuf::from("/dev/shm"), PathBuf::from("/var/tmp")]
    } else {
        args.dirs.clone()
    };
    let size = args.size_mib.unwrap_or(if args.quick { 64 } else { 1024 }) * MIB;
    // Every job owns a whole number of MiB, so 1 MiB sequential I/O stays in its slice.
    let slice = size / args.jobs / MIB * MIB;
    if slice == 0 {
        return Err(format!(
            "{} MiB images cannot give {} jobs 1 MiB each",
            size / MIB,
            args.jobs
        ));
    }
    let plan = Plan {
        size,
        slice,
        jobs: args.jobs,
        runtime_ms: args
            .runtime_ms
            .unwrap_or(if args.quick { 800 } else { 1200 }),
        ramp_ms: args.ramp_ms.unwrap_or(if args.quick { 200 } else { 300 }),
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 3 }),
    };
    let out = args.out.clone().unwrap_or_else(|| {
        let name = if args.quick {
            "image-quick.json"
        } else {
            "image.json"
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("results")
            .join(name)
    });
    let mut report = Report::new(fio_version, &plan, SEED);
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
        run_backing(&backing, &plan, &mut report);
        report.add_backing(&backing);
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

/// Sizes and times of a run.
pub struct Plan {
    pub size: u64,
    pub slice: u64,
    pub jobs: u64,
    pub runtime_ms: u64,
    pub ramp_ms: u64,
    /// Each point is measured this many times, the systems taking turns; rows report the
    /// round with the median IOPS.
    pub rounds: u64,
}

/// Why a point was not measured: the image could not be made (for every workload), or
/// the measurement of one workload failed.
struct NotMeasured {
    workload: Option<Workload>,
    reason: String,
}

fn run_backing(backing: &Backing, plan: &Plan, report: &mut Report) {
    let points: Vec<(Workload, State)> = Workload::ALL
        .into_iter()
        .flat_map(|w| State::ALL.map(|s| (w, s)))
        .collect();
    let systems: Vec<System> = System::all().collect();
    // measured[point][system]: one entry per round that succeeded.
    let mut measured = vec![vec![Vec::<Measured>::new(); systems.len()]; points.len()];
    let mut failed = vec![vec![false; systems.len()]; points.len()];
    for round in 1..=plan.rounds {
        // Fresh preallocated images every round: on tmpfs the cost of the same syscalls
        // differs by up to ~15% from one file to another (where its pages landed), so the
        // median over rounds is also a median over files.
        let preallocated = preallocate(backing, plan, report);
        for (p, &(workload, state)) in points.iter().enumerate() {
            let config = PointConfig {
                workload,
                engine: IoEngine::Psync,
                iodepth: 1,
                jobs: plan.jobs,
                slice: plan.slice,
                stride: plan.slice,
                runtime_ms: plan.runtime_ms,
                ramp_ms: plan.ramp_ms,
                one_pass: state.one_pass(workload),
                direct: backing.direct,
                seed: SEED,
            };
            for (i, &system) in systems.iter().enumerate() {
                let format = system.format();
                let file = match state {
                    State::Preallocated => match preallocated.get(format.name()) {
                        Some(file) => Some(file),
                        None => continue, // could not be made; the skip says why
                    },
                    State::Empty => None,
                };
                if failed[p][i] {
                    continue;
                }
                match measure_once(backing, system, file, plan.size, &config) {
                    Ok(m) => {
                        eprintln!(
                            "   [{round}/{}] {:<8} {:<5} {:<12} {:<12} {:>10.0} IOPS {:>8.1} MiB/s",
                            plan.rounds,
                            system.name(),
                            format.name(),
                            workload.name(),
                            state.name(),
                            m.iops,
                            m.mib_s
                        );
                        measured[p][i].push(m);
                    }
                    Err(not) => {
                        eprintln!(
                            "   {} {format} {workload} {state}: FAILED: {}",
                            system.name(),
                            not.reason
                        );
                        failed[p][i] = true;
                        report.skip(Skip {
                            system: system.name(),
                            workload: not.workload,
                            format: format.name(),
                            state: state.name(),
                            backing: backing.label(),
                            reason: not.reason,
                        });
                    }
                }
            }
        }
    }
    for (p, &(workload, state)) in points.iter().enumerate() {
        for (i, &system) in systems.iter().enumerate() {
            // A system that failed in any round gets no row (its skip entry says why).
            if !failed[p][i] && !measured[p][i].is_empty() {
                report.add(Row::new(
                    system.name(),
                    workload,
                    system.format(),
                    state,
                    backing,
                    plan.jobs,
                    &measured[p][i],
                ));
            }
        }
    }
}

/// Create and fill one image per format (writes to them later overwrite in place); fio and
/// ferrotap's raw rows share the raw file.
fn preallocate(
    backing: &Backing,
    plan: &Plan,
    report: &mut Report,
) -> BTreeMap<&'static str, TempFile> {
    let mut preallocated = BTreeMap::new();
    for format in FORMATS {
        match preallocated_image(backing, format, plan.size) {
            Ok(file) => {
                preallocated.insert(format.name(), file);
            }
            Err(reason) => report.skip(Skip {
                system: "ferrotap",
                workload: None,
                format: format.name(),
                state: State::Preallocated.name(),
                backing: backing.label(),
                reason,
            }),
        }
    }
    preallocated
}

/// A fresh image of `format` on `backing`, written in full (every block or cluster
/// allocated) and, where reads come from the page cache, warmed up.
pub fn preallocated_image(backing: &Backing, format: Format, size: u64) -> Result<TempFile> {
    let file = backing.file(&format!("preallocated.{}", format.name()));
    let setup = Instant::now();
    create_image(&file, format, size)?;
    fill_image(&file, format, size, backing.direct)?;
    if backing.reads_from_page_cache() {
        warm_up(&file, backing.direct)?;
    }
    eprintln!(
        "   preallocated {} ({} MiB) in {:.1} s",
        format,
        size / MIB,
        setup.elapsed().as_secs_f64()
    );
    Ok(file)
}

/// One measurement of `system`: on the preallocated `file`, or on a fresh image.
fn measure_once(
    backing: &Backing,
    system: System,
    preallocated: Option<&TempFile>,
    size: u64,
    config: &PointConfig,
) -> std::result::Result<Measured, NotMeasured> {
    let format = system.format();
    let fresh;
    let file = match preallocated {
        Some(file) => file,
        None => {
            fresh = backing.file(&format!("empty.{}", format.name()));
            create_image(&fresh, format, size).map_err(|reason| NotMeasured {
                workload: None,
                reason,
            })?;
            &fresh
        }
    };
    match system {
        System::Fio => fio::run(&file.0, config),
        System::Ferrotap(format) => measure_ferrotap(&file.0, format, config),
    }
    .map_err(|reason| NotMeasured {
        workload: Some(config.workload),
        reason,
    })
}
