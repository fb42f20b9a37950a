//! The results: one row per measured point, each ferrotap row's ratio to fio's raw figure
//! (and to ferrotap's own raw figure) for the same workload, state and backing, the table
//! for the terminal and the JSON file.

use std::fmt::Write as _;
use std::path::Path;

use ferrotap::image::Format;
use serde::Serialize;

use crate::pattern::{State, Workload};
use crate::suite::{Backing, Plan};
use crate::{Measured, Result};

/// Reads of allocated data must reach this fraction of raw's figure (the target).
const READ_TARGET: f64 = 0.9;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub system: &'static str,
    pub workload: Workload,
    pub format: Format,
    pub state: State,
    pub backing: String,
    pub jobs: u64,
    /// The median round, rounded for the report.
    #[serde(flatten)]
    pub measured: Measured,
    /// IOPS of every round, in the order measured; the row is the median one.
    pub iops_rounds: Vec<f64>,
}

pub fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

impl Row {
    pub fn new(
        system: &'static str,
        workload: Workload,
        format: Format,
        state: State,
        backing: &Backing,
        jobs: u64,
        rounds: &[Measured],
    ) -> Row {
        let mut by_iops: Vec<&Measured> = rounds.iter().collect();
        by_iops.sort_by(|a, b| a.iops.total_cmp(&b.iops));
        // The lower median for an even count: a real round, never an average.
        let m = by_iops[(by_iops.len() - 1) / 2];
        Row {
            system,
            workload,
            format,
            state,
            backing: backing.label(),
            jobs,
            measured: Measured {
                iops: round(m.iops, 1),
                mib_s: round(m.mib_s, 2),
                p50_us: round(m.p50_us, 2),
                p99_us: round(m.p99_us, 2),
                cpu_pct: round(m.cpu_pct, 1),
                rss_mib: round(m.rss_mib, 1),
            },
            iops_rounds: rounds.iter().map(|r| round(r.iops, 1)).collect(),
        }
    }

    fn same_point(&self, other: &Row) -> bool {
        self.workload == other.workload
            && self.state == other.state
            && self.backing == other.backing
    }
}

/// The median over rounds of `a[round] / b[round]`: each round's systems ran back to back,
/// so a round pairs figures taken at the same moment of the machine (the lower median for
/// an even count).
pub fn paired_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    let mut ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, &b)| b > 0.0)
        .map(|(a, b)| a / b)
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = *ratios.get(ratios.len().checked_sub(1)? / 2)?;
    Some(round(median, 3))
}

/// A ferrotap row against the raw references of the same workload, state and backing:
/// IOPS ratios (which are also the MiB/s ratios), paired by round.
#[derive(Debug, Serialize)]
pub struct Ratio {
    pub system: &'static str,
    pub workload: Workload,
    pub format: Format,
    pub state: State,
    pub backing: String,
    pub vs_fio_raw: Option<f64>,
    pub vs_ferrotap_raw: Option<f64>,
}

impl Ratio {
    /// Reads of allocated data: the rows the target is about.
    fn is_allocated_read(&self) -> bool {
        self.state == State::Preallocated && !self.workload.is_write()
    }

    fn meets_target(&self) -> bool {
        [self.vs_fio_raw, self.vs_ferrotap_raw]
            .iter()
            .all(|r| r.is_some_and(|r| r >= READ_TARGET))
    }
}

/// A point that could not be measured, and why.
#[derive(Debug, Serialize)]
pub struct Skip {
    pub system: &'static str,
    /// `None` when the image could not be made, which holds for every workload.
    pub workload: Option<Workload>,
    pub format: &'static str,
    pub state: &'static str,
    pub backing: String,
    pub reason: String,
}

/// What the JSON says of one backing directory (both suites).
#[derive(Debug, Serialize)]
pub struct BackingInfo {
    pub dir: String,
    pub fs_type: String,
    pub io: &'static str,
}

impl BackingInfo {
    pub fn of(backing: &Backing) -> BackingInfo {
        BackingInfo {
            dir: backing.label(),
            fs_type: backing.fs_type.clone(),
            io: if backing.direct {
                "O_DIRECT"
            } else {
                "buffered (no O_DIRECT on this filesystem)"
            },
        }
    }
}

#[derive(Debug, Serialize)]
struct Config {
    fio: String,
    jobs: u64,
    image_size_mib: u64,
    runtime_ms: u64,
    ramp_ms: u64,
    rounds: u64,
    seed: u64,
    qcow2: &'static str,
    vhd: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Report {
    config: Config,
    backings: Vec<BackingInfo>,
    runs: Vec<Row>,
    ratios: Vec<Ratio>,
    skipped: Vec<Skip>,
}

impl Report {
    pub fn new(fio: String, plan: &Plan, seed: u64) -> Report {
        Report {
            config: Config {
                fio,
                jobs: plan.jobs,
                image_size_mib: plan.size >> 20,
                runtime_ms: plan.runtime_ms,
                ramp_ms: plan.ramp_ms,
                rounds: plan.rounds,
                seed,
                qcow2: "compat 1.1 (v3), 64 KiB clusters",
                vhd: "dynamic, 2 MiB blocks",
            },
            backings: Vec::new(),
            runs: Vec::new(),
            ratios: Vec::new(),
            skipped: Vec::new(),
        }
    }

    pub fn add_backing(&mut self, backing: &Backing) {
        self.backings.push(BackingInfo::of(backing));
    }

    pub fn add(&mut self, row: Row) {
        self.runs.push(row);
    }

    /// Record a point not measured; an image that cannot be made on a backing is listed
    /// once per state, not once per workload.
    pub fn skip(&mut self, skip: Skip) {
        let known = skip.workload.is_none()
            && self.skipped.iter().any(|s| {
                s.workload.is_none()
                    && (s.system, s.format, s.state) == (skip.system, skip.format, skip.state)
                    && s.backing == skip.backing
            });
        if !known {
            self.skipped.push(skip);
        }
    }

    /// Compute the ratios of every ferrotap row.
    pub fn finish(&mut self) {
        let reference = |system: &str, row: &Row| {
            self.runs
                .iter()
                .find(|r| r.system == system && r.format == Format::Raw && r.same_point(row))
                .and_then(|r| paired_ratio(&row.iops_rounds, &r.iops_rounds))
        };
        self.ratios = self
            .runs
            .iter()
            .filter(|row| row.system == "ferrotap")
            .map(|row| Ratio {
                system: row.system,
                workload: row.workload,
                format: row.format,
                state: row.state,
                backing: row.backing.clone(),
                vs_fio_raw: reference("fio", row),
                vs_ferrotap_raw: reference("ferrotap", row).filter(|_| row.format != Format::Raw),
            })
            .collect();
    }

    fn ratio_of(&self, row: &Row) -> Option<&Ratio> {
        self.ratios.iter().find(|r| {
            r.system == row.system
                && r.format == row.format
                && r.workload == row.workload
                && r.state == row.state
                && r.backing == row.backing
        })
    }

    /// The table, the target verdicts and what was skipped, for the terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let fmt_ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
        let _ = writeln!(
            out,
            "\nimage layer vs fio: {} job(s), QD {} (psync), {} MiB images, {} ms per point \
             and round after a {} ms ramp, median of {} round(s), {}",
            self.config.jobs,
            self.config.jobs,
            self.config.image_size_mib,
            self.config.runtime_ms,
            self.config.ramp_ms,
            self.config.rounds,
            self.config.fio
        );
        for b in &self.backings {
            let _ = writeln!(out, "backing {} ({}): {}", b.dir, b.fs_type, b.io);
        }
        let header = format!(
            "{:<8} {:<12} {:<5} {:<12} {:<10} {:>9} {:>8} {:>8} {:>9} {:>6} {:>7} {:>7} {:>7}",
            "system",
            "workload",
            "fmt",
            "state",
            "backing",
            "IOPS",
            "MiB/s",
            "p50 µs",
            "p99 µs",
            "CPU%",
            "RSS MiB",
            "vs fio",
            "vs raw"
        );
        let _ = writeln!(out, "\n{header}");
        let _ = writeln!(out, "{}", "-".repeat(header.chars().count()));
        for row in &self.runs {
            let ratio = self.ratio_of(row);
            let _ = writeln!(
                out,
                "{:<8} {:<12} {:<5} {:<12} {:<10} {:>9.0} {:>8.1} {:>8.1} {:>9.1} {:>6.1} {:>7.1} {:>7} {:>7}",
                row.system,
                row.workload.name(),
                row.format.name(),
                row.state.name(),
                row.backing,
                row.measured.iops,
                row.measured.mib_s,
                row.measured.p50_us,
                row.measured.p99_us,
                row.measured.cpu_pct,
                row.measured.rss_mib,
                fmt_ratio(ratio.and_then(|r| r.vs_fio_raw)),
                fmt_ratio(ratio.and_then(|r| r.vs_ferrotap_raw)),
            );
        }
        let _ = writeln!(
            out,
            "\n\"vs fio\": IOPS over fio's raw figure, \"vs raw\": over ferrotap's raw figure, \
             same workload, state and backing: the median over rounds of each round's ratio."
        );
        let _ = writeln!(
            out,
            "target: reads of allocated data (preallocated reads) >= {READ_TARGET}x both raw figures"
        );
        for ratio in self
            .ratios
            .iter()
            .filter(|r| r.format != Format::Raw && r.is_allocated_read())
        {
            let _ = writeln!(
                out,
                "  {:<5} {:<12} {:<10} {} fio, {} raw: {}",
                ratio.format.name(),
                ratio.workload.name(),
                ratio.backing,
                fmt_ratio(ratio.vs_fio_raw),
                fmt_ratio(ratio.vs_ferrotap_raw),
                if ratio.meets_target() {
                    "met"
                } else {
                    "MISSED"
                }
            );
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "\nnot measured:");
            for skip in &self.skipped {
                let workload = skip.workload.map_or("every workload", Workload::name);
                let _ = writeln!(
                    out,
                    "  {} {} {} {workload} on {}: {}",
                    skip.system, skip.format, skip.state, skip.backing, skip.reason
                );
            }
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        write_json(self, path)
    }
}

/// `value` as pretty JSON in `path`, creating its directory.
pub fn write_json(value: &impl Serialize, path: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(path, json + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pair_rounds() {
        // Round 2 was slow for both: pairing keeps the ratio at 0.5.
        assert_eq!(
            paired_ratio(&[50.0, 10.0, 52.0], &[100.0, 20.0, 104.0]),
            Some(0.5)
        );
        assert_eq!(paired_ratio(&[1.0, 3.0], &[1.0, 1.0]), Some(1.0));
        assert_eq!(paired_ratio(&[1.0], &[0.0]), None);
        assert_eq!(paired_ratio(&[], &[]), None);
    }
}
