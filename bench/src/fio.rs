//! fio on a raw file with the same pattern as ferrotap's jobs: one thread per job, each job
//! in its own slice (or all in the whole file), seeded uniform random offsets; psync (queue
//! depth 1 per job) beside the image layer, io_uring at a queue depth beside the ring.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::pattern::Workload;
use crate::procfs::run_monitored;
use crate::{Measured, PointConfig, Result};

/// fio's version line, or an error saying fio is missing.
pub fn version() -> Result<String> {
    let out = Command::new("fio")
        .arg("--version")
        .output()
        .map_err(|e| format!("fio is needed (apt-get install fio): {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn command(file: &Path, config: &PointConfig) -> Command {
    let workload = config.workload;
    let mut cmd = Command::new("fio");
    cmd.arg("--name=ferrotap-bench")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--ioengine={}", config.engine.fio_name()))
        .arg(format!("--iodepth={}", config.iodepth))
        .arg(format!("--direct={}", u8::from(config.direct)))
        // Page-aligned buffers like ferrotap-bench's: fio aligns them only for O_DIRECT,
        // and a misaligned buffer makes buffered 1 MiB copies several times slower.
        .arg("--iomem_align=4096")
        .arg(format!("--rw={}", workload.fio_rw()))
        .arg(format!("--bs={}", workload.block_size()))
        .arg(format!("--numjobs={}", config.jobs))
        .arg("--thread")
        .arg("--group_reporting")
        .arg(format!("--size={}", config.slice))
        .arg(format!("--offset_increment={}", config.stride))
        .arg("--norandommap")
        // randrepeat=1 seeds every generator with fio's fixed seeds whatever randseed says
        // (fio 3.33): every run read the same offsets, and on a virtual disk whose host
        // caches what it reads, each fio run found more of them cached than the last while
        // ferrotap's runs read fresh ones. With randrepeat=0, randseed is taken.
        .arg("--randrepeat=0")
        .arg(format!("--randseed={}", config.seed))
        .arg(format!("--runtime={}ms", config.runtime_ms))
        // The file is prepared by the harness; fio must neither create nor lay it out.
        .arg("--allow_file_create=0")
        .arg("--lat_percentiles=1")
        .arg("--percentile_list=50:99")
        .arg("--output-format=json");
    if !config.one_pass {
        cmd.arg("--time_based");
        cmd.arg(format!("--ramp_time={}ms", config.ramp_ms));
    }
    cmd
}

pub fn run(file: &Path, config: &PointConfig) -> Result<Measured> {
    let run = run_monitored(command(file, config))?;
    let report: Value =
        serde_json::from_str(&run.stdout).map_err(|e| format!("fio's JSON output: {e}"))?;
    let mut measured = parse(&report, config.workload, config.jobs)?;
    measured.rss_mib = run.peak_rss_kib as f64 / 1024.0;
    Ok(measured)
}

/// The figures of fio's (group-reported) job; `rss_mib` is left for the caller.
pub fn parse(report: &Value, workload: Workload, jobs: u64) -> Result<Measured> {
    let job = report
        .get("jobs")
        .and_then(|jobs| jobs.get(0))
        .ok_or("fio's JSON has no job")?;
    if let Some(error) = job.get("error").and_then(Value::as_i64).filter(|&e| e != 0) {
        return Err(format!("fio's job failed with error {error}"));
    }
    let number = |value: &Value, path: &[&str]| -> Result<f64> {
        path.iter()
            .try_fold(value, |v, key| v.get(key))
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("fio's JSON lacks {}", path.join(".")))
    };
    let direction = if workload.is_write() { "write" } else { "read" };
    let stats = job.get(direction).ok_or("fio's JSON lacks the direction")?;
    let percentile = |key: &str| number(stats, &["lat_ns", "percentile", key]);
    // usr_cpu and sys_cpu are per job (an average over the group); report the total
    // across jobs, as ferrotap's row does, where 100% is one core.
    let cpu_per_job = number(job, &["usr_cpu"])? + number(job, &["sys_cpu"])?;
    Ok(Measured {
        iops: number(stats, &["iops"])?,
        mib_s: number(stats, &["bw_bytes"])? / (1024.0 * 1024.0),
        p50_us: percentile("50.000000")? / 1000.0,
        p99_us: percentile("99.000000")? / 1000.0,
        cpu_pct: cpu_per_job * jobs as f64,
        rss_mib: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IoEngine;

    /// The offsets one fio run of `command` reads on `file`, from its I/O log.
    fn offsets_read(file: &Path, seed: u64, log: &Path) -> Vec<u64> {
        let config = PointConfig {
            workload: Workload::RandRead,
            engine: IoEngine::Psync,
            iodepth: 1,
            jobs: 1,
            slice: 16 << 20,
            stride: 0,
            runtime_ms: 5000,
            ramp_ms: 0,
            one_pass: true,
            direct: false,
            seed,
        };
        let out = command(file, &config)
            .arg("--number_ios=64")
            .arg(format!("--write_iolog={}", log.display()))
            .output()
            .expect("fio runs");
        assert!(
            out.status.success(),
            "fio: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(log).expect("fio's I/O log");
        text.lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields.as_slice() {
                    [.., "read", offset, _] => offset.parse().ok(),
                    _ => None,
                }
            })
            .collect()
    }

    /// Each seed reads offsets of its own, and the same seed the same ones: a run must not
    /// re-read what the run before it read (fio ignores randseed under randrepeat=1).
    #[test]
    fn fio_reads_the_offsets_of_its_seed() {
        let dir = std::env::temp_dir().join(format!("ferrotap-fio-seed.{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("image.raw");
        std::fs::write(&file, vec![0u8; 16 << 20]).unwrap();
        let first = offsets_read(&file, 1000, &dir.join("a.log"));
        let again = offsets_read(&file, 1000, &dir.join("b.log"));
        let other = offsets_read(&file, 1002, &dir.join("c.log"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(first, again);
        let shared = other.iter().filter(|o| first.contains(o)).count();
        // 64 random 4 KiB blocks out of 4096 each: a few may meet by chance.
        assert!(
            shared < 8,
            "seeds 1000 and 1002 share {shared} of 64 offsets"
        );
    }

    #[test]
    fn parses_a_fio_report() {
        let report = serde_json::json!({"jobs": [{
            "error": 0,
            "usr_cpu": 10.0, "sys_cpu": 30.0,
            "read": {"iops": 1000.0, "bw_bytes": 4096000.0,
                     "lat_ns": {"percentile": {"50.000000": 1500, "99.000000": 9000}}},
            "write": {"iops": 0.0}
        }]});
        let m = parse(&report, Workload::RandRead, 2).unwrap();
        assert_eq!(m.iops, 1000.0);
        assert!((m.mib_s - 4096000.0 / 1048576.0).abs() < 1e-9);
        assert_eq!((m.p50_us, m.p99_us), (1.5, 9.0));
        assert_eq!(m.cpu_pct, 80.0);
        assert!(parse(&report, Workload::RandWrite, 2).is_err());
    }
}
