//! The ring benchmark's results: one row per measured point (the median round), each
//! ferrotap row's IOPS and p99 beside fio's at the same point (paired by round), the
//! issue's targets with pass/fail, the table for the terminal and the JSON file.

use std::fmt::Write as _;
use std::path::Path;

use ferrotap::image::Format;
use serde::Serialize;

use crate::report::{paired_ratio, round, write_json, BackingInfo};
use crate::ring::IDLE_CPU_LIMIT_PCT;
use crate::suite::Backing;
use crate::{Measured, Result};

/// Raw 4 KiB random reads at QD32: at least this fraction of fio's IOPS.
const RAW_QD32_TARGET: f64 = 0.9;
/// VHD and qcow2 (allocated data), same workload.
const FORMAT_QD32_TARGET: f64 = 0.8;
/// p99 at QD1: at most this multiple of fio's.
const QD1_P99_TARGET: f64 = 1.3;
/// Peak RSS of an idle serve, and of one under load at default settings.
const IDLE_RSS_MIB: f64 = 8.0;
const LOAD_RSS_MIB: f64 = 32.0;
const LOAD_RSS_TARGET: &str = "RSS MiB under load";

/// fio's figures at one point as a ferrotap run saw them: between fio's run before it and
/// fio's run after it, in proportion to where its turn fell.
#[derive(Debug, Clone, Copy)]
pub struct FioReference {
    pub iops: f64,
    pub p99_us: f64,
}

impl FioReference {
    /// `weight` 0 is the run before, 1 the run after.
    pub fn between(before: &Measured, after: &Measured, weight: f64) -> FioReference {
        let at = |a: f64, b: f64| a + (b - a) * weight;
        FioReference {
            iops: at(before.iops, after.iops),
            p99_us: at(before.p99_us, after.p99_us),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RingRow {
    pub system: String,
    /// Pattern and queue depth per queue ("randread-4k-qd32"), or "idle" / "idle-connected".
    pub workload: String,
    pub format: &'static str,
    pub backing: String,
    pub queues: u32,
    /// Requests in flight per queue (fio: per job); none for idle rows.
    pub iodepth: Option<u32>,
    /// The median round, rounded for the report.
    #[serde(flatten)]
    pub measured: Measured,
    /// IOPS and p99 of every round, in the order measured.
    pub iops_rounds: Vec<f64>,
    pub p99_rounds: Vec<f64>,
    /// ferrotap rows: fio's IOPS and p99 at the same point in each round, interpolated to
    /// this row's turn between fio's runs on the same file before and after it (reads:
    /// this format's image file; writes: the raw file).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fio_iops_rounds: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fio_p99_rounds: Vec<f64>,
    /// Over fio's figure at the same point: the median of the per-round ratios to the two
    /// above.
    pub iops_vs_fio: Option<f64>,
    pub p99_vs_fio: Option<f64>,
    /// Idle rows: times serve's threads were scheduled in, per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wakeups_per_s: Option<f64>,
}

impl RingRow {
    fn is_idle(&self) -> bool {
        self.iodepth.is_none()
    }

    fn describe(&self) -> String {
        format!(
            "{} {} {} {} q{}",
            self.system, self.format, self.workload, self.backing, self.queues
        )
    }
}

/// A target of the issue checked against one row.
#[derive(Debug, Serialize)]
pub struct TargetCheck {
    pub target: &'static str,
    pub row: String,
    pub value: f64,
    pub limit: f64,
    pub pass: bool,
}

/// A point that could not be measured, and why.
#[derive(Debug, Serialize)]
pub struct RingSkip {
    pub system: String,
    /// `None` when an image could not be made, which holds for every workload.
    pub workload: Option<String>,
    pub format: &'static str,
    pub backing: String,
    pub queues: Option<u32>,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct RingConfig {
    pub fio: String,
    pub mode: &'static str,
    pub image_size_mib: u64,
    pub runtime_ms: u64,
    pub ramp_ms: u64,
    pub rounds: u64,
    pub idle_ms: u64,
    /// The blkfront offers feature-persistent in the matrix (Linux's blkfront does).
    pub front_persistent: bool,
    /// The blkfront spins this long (µs) for responses before sleeping.
    pub front_poll_us: u64,
    /// Extra arguments every serve of the matrix got.
    pub serve_args: Vec<String>,
    /// Base of every run's seed (`Turn::seed` in ring.rs).
    pub seed: u64,
    /// A bracket (fio, the ferrotap runs compared with it, fio) is measured again when fio's
    /// IOPS moved more than this across it, up to `bracket_tries` times; the steadiest try
    /// is kept (`measure_bracket` in ring.rs).
    pub steady_drift_pct: f64,
    pub bracket_tries: usize,
    pub qcow2: &'static str,
    pub vhd: &'static str,
}

#[derive(Debug, Serialize)]
pub struct RingReport {
    config: RingConfig,
    backings: Vec<BackingInfo>,
    runs: Vec<RingRow>,
    targets: Vec<TargetCheck>,
    skipped: Vec<RingSkip>,
    /// Extra tries of brackets across which fio drifted (a bracket tried 3 times counts 2).
    remeasured_brackets: usize,
}

impl RingReport {
    pub fn new(config: RingConfig) -> RingReport {
        RingReport {
            config,
            backings: Vec::new(),
            runs: Vec::new(),
            targets: Vec::new(),
            skipped: Vec::new(),
            remeasured_brackets: 0,
        }
    }

    pub fn count_remeasured(&mut self, tries: usize) {
        self.remeasured_brackets += tries;
    }

    pub fn add_backing(&mut self, backing: &Backing) {
        self.backings.push(BackingInfo::of(backing));
    }

    /// Add the row of one point from its rounds (the one with the median IOPS, or the
    /// lower median for an even count: a real round, never an average).
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        system: &str,
        workload: String,
        iodepth: Option<u32>,
        format: Format,
        backing: &Backing,
        queues: u32,
        rounds: &[Measured],
    ) {
        let mut by_iops: Vec<&Measured> = rounds.iter().collect();
        by_iops.sort_by(|a, b| {
            a.iops
                .total_cmp(&b.iops)
                .then(a.cpu_pct.total_cmp(&b.cpu_pct))
        });
        let Some(m) = by_iops.get(by_iops.len().saturating_sub(1) / 2) else {
            return;
        };
        self.runs.push(RingRow {
            system: system.to_string(),
            workload,
            format: format.name(),
            backing: backing.label(),
            queues,
            iodepth,
            measured: Measured {
                iops: round(m.iops, 1),
                mib_s: round(m.mib_s, 2),
                p50_us: round(m.p50_us, 2),
                p99_us: round(m.p99_us, 2),
                cpu_pct: round(m.cpu_pct, 2),
                rss_mib: round(m.rss_mib, 1),
            },
            iops_rounds: rounds.iter().map(|r| round(r.iops, 1)).collect(),
            p99_rounds: rounds.iter().map(|r| round(r.p99_us, 2)).collect(),
            fio_iops_rounds: Vec::new(),
            fio_p99_rounds: Vec::new(),
            iops_vs_fio: None,
            p99_vs_fio: None,
            wakeups_per_s: None,
        });
    }

    /// Give the ferrotap row just added what each of its rounds is compared with.
    pub fn set_fio_reference(&mut self, reference: &[FioReference]) {
        if let Some(row) = self
            .runs
            .last_mut()
            .filter(|row| row.system != "fio" && !row.is_idle())
        {
            row.fio_iops_rounds = reference.iter().map(|r| round(r.iops, 1)).collect();
            row.fio_p99_rounds = reference.iter().map(|r| round(r.p99_us, 2)).collect();
        }
    }

    /// Record the wake-ups of the idle row just added.
    pub fn set_wakeups(&mut self, per_second: f64) {
        if let Some(row) = self.runs.last_mut().filter(|row| row.is_idle()) {
            row.wakeups_per_s = Some(round(per_second, 1));
        }
    }

    pub fn skip(&mut self, skip: RingSkip) {
        let known = skip.workload.is_none()
            && self.skipped.iter().any(|s| {
                s.workload.is_none()
                    && (s.system.as_str(), s.format, s.backing.as_str())
                        == (skip.system.as_str(), skip.format, skip.backing.as_str())
            });
        if !known {
            self.skipped.push(skip);
        }
    }

    /// Compute every ferrotap row's ratios to fio, then check the targets.
    pub fn finish(&mut self) {
        for row in self.runs.iter_mut().filter(|r| r.system != "fio") {
            row.iops_vs_fio = paired_ratio(&row.iops_rounds, &row.fio_iops_rounds);
            row.p99_vs_fio = paired_ratio(&row.p99_rounds, &row.fio_p99_rounds);
        }
        let mut targets = Vec::new();
        for row in self.runs.iter().filter(|r| r.system != "fio") {
            let mut check = |target, value: Option<f64>, limit, at_least: bool| {
                if let Some(value) = value {
                    targets.push(TargetCheck {
                        target,
                        row: row.describe(),
                        value,
                        limit,
                        pass: if at_least {
                            value >= limit
                        } else {
                            value <= limit
                        },
                    });
                }
            };
            if row.is_idle() {
                check(
                    "idle CPU% ~0",
                    Some(row.measured.cpu_pct),
                    IDLE_CPU_LIMIT_PCT,
                    false,
                );
                check(
                    "idle RSS MiB",
                    Some(row.measured.rss_mib),
                    IDLE_RSS_MIB,
                    false,
                );
                continue;
            }
            if row.workload == "randread-4k-qd32" {
                if row.format == Format::Raw.name() {
                    check(
                        "raw randread QD32 IOPS vs fio",
                        row.iops_vs_fio,
                        RAW_QD32_TARGET,
                        true,
                    );
                } else {
                    check(
                        "vhd/qcow2 randread QD32 IOPS vs fio",
                        row.iops_vs_fio,
                        FORMAT_QD32_TARGET,
                        true,
                    );
                }
            }
            if row.iodepth == Some(1) {
                check("p99 at QD1 vs fio", row.p99_vs_fio, QD1_P99_TARGET, false);
            }
            if row.system == "ferrotap" {
                check(
                    LOAD_RSS_TARGET,
                    Some(row.measured.rss_mib),
                    LOAD_RSS_MIB,
                    false,
                );
            }
        }
        self.targets = targets;
    }

    /// The table, the target verdicts and what was skipped, for the terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "\nring ({} mode): ferrotap serve on xensim + the Rust blkfront, beside fio \
             (io_uring, direct) on the same file (reads: each format's image file; writes: the raw \
             file); {} MiB images, {} ms per point and round \
             after a {} ms ramp, median of {} round(s); frontend {}, polls {} µs for \
             responses before sleeping; {}",
            c.mode,
            c.image_size_mib,
            c.runtime_ms,
            c.ramp_ms,
            c.rounds,
            if c.front_persistent {
                "offers feature-persistent"
            } else {
                "grant copy only"
            },
            c.front_poll_us,
            c.fio
        );
        for b in &self.backings {
            let _ = writeln!(out, "backing {} ({}): {}", b.dir, b.fs_type, b.io);
        }
        let width = self
            .runs
            .iter()
            .map(|r| r.system.len())
            .max()
            .unwrap_or(8)
            .max(8);
        let header = format!(
            "{:<width$} {:<16} {:<5} {:<9} {:>2} {:>9} {:>8} {:>8} {:>9} {:>6} {:>7} {:>8} {:>8}",
            "system",
            "workload",
            "fmt",
            "backing",
            "Q",
            "IOPS",
            "MiB/s",
            "p50 µs",
            "p99 µs",
            "CPU%",
            "RSS MiB",
            "IOPS/fio",
            "p99/fio"
        );
        let _ = writeln!(out, "\n{header}");
        let _ = writeln!(out, "{}", "-".repeat(header.chars().count()));
        let ratio = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
        for row in &self.runs {
            let m = &row.measured;
            let _ = writeln!(
                out,
                "{:<width$} {:<16} {:<5} {:<9} {:>2} {:>9.0} {:>8.1} {:>8.1} {:>9.1} {:>6.1} {:>7.1} {:>8} {:>8}",
                row.system,
                row.workload,
                row.format,
                row.backing,
                row.queues,
                m.iops,
                m.mib_s,
                m.p50_us,
                m.p99_us,
                m.cpu_pct,
                m.rss_mib,
                ratio(row.iops_vs_fio),
                ratio(row.p99_vs_fio),
            );
        }
        let _ = writeln!(
            out,
            "\nQD = requests in flight per queue (fio: per job, numjobs = queues). CPU% and RSS: \
             the serve process (100% = one core; peak RSS), fio's own for fio rows (fio runs \
             on that file before and after the ferrotap runs it is compared with, each \
             point and round). Ratios: median over rounds of each round's ratio to fio at \
             the same point, interpolated to the run's turn between those two."
        );
        let _ = writeln!(
            out,
            "Extra bracket tries, made because fio's IOPS moved more than {:.0}% across a \
             bracket (at most {} tries each, the steadiest kept): {}.",
            c.steady_drift_pct, c.bracket_tries, self.remeasured_brackets
        );
        if !self.targets.is_empty() {
            let _ = writeln!(out, "\ntargets:");
            let line = |out: &mut String, t: &TargetCheck, row: &str| {
                let _ = writeln!(
                    out,
                    "  {:<4} {:<36} {:<58} {:>8.2} (limit {})",
                    if t.pass { "pass" } else { "FAIL" },
                    t.target,
                    row,
                    t.value,
                    t.limit
                );
            };
            // One line for the load RSS of every row (the JSON has one per row): its worst.
            let load_rss: Vec<&TargetCheck> = self
                .targets
                .iter()
                .filter(|t| t.target == LOAD_RSS_TARGET)
                .collect();
            for t in self.targets.iter().filter(|t| t.target != LOAD_RSS_TARGET) {
                line(&mut out, t, &t.row);
            }
            if let Some(worst) = load_rss.iter().max_by(|a, b| a.value.total_cmp(&b.value)) {
                let failed = load_rss.iter().filter(|t| !t.pass).count();
                let row = format!(
                    "max of {} rows ({failed} over): {}",
                    load_rss.len(),
                    worst.row
                );
                line(&mut out, worst, &row);
            }
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "\nnot measured:");
            for skip in &self.skipped {
                let _ = writeln!(
                    out,
                    "  {} {} {} on {} (queues {}): {}",
                    skip.system,
                    skip.format,
                    skip.workload.as_deref().unwrap_or("every workload"),
                    skip.backing,
                    skip.queues.map_or("any".to_string(), |q| q.to_string()),
                    skip.reason
                );
            }
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        write_json(self, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(iops: f64, p99_us: f64, cpu_pct: f64, rss_mib: f64) -> Measured {
        Measured {
            iops,
            mib_s: iops / 256.0,
            p50_us: p99_us / 2.0,
            p99_us,
            cpu_pct,
            rss_mib,
        }
    }

    fn report() -> RingReport {
        RingReport::new(RingConfig {
            fio: "fio-test".into(),
            mode: "test",
            image_size_mib: 1,
            runtime_ms: 1,
            ramp_ms: 0,
            rounds: 2,
            idle_ms: 1,
            front_persistent: true,
            front_poll_us: 0,
            serve_args: Vec::new(),
            seed: 1,
            steady_drift_pct: 15.0,
            bracket_tries: 3,
            qcow2: "",
            vhd: "",
        })
    }

    #[test]
    fn fio_reference_is_interpolated_to_the_turn() {
        let before = measured(120.0, 12.0, 50.0, 30.0);
        let after = measured(80.0, 8.0, 50.0, 30.0);
        let at = |weight| FioReference::between(&before, &after, weight);
        assert_eq!((at(0.0).iops, at(0.0).p99_us), (120.0, 12.0));
        assert_eq!((at(0.25).iops, at(0.25).p99_us), (110.0, 11.0));
        assert_eq!((at(1.0).iops, at(1.0).p99_us), (80.0, 8.0));
    }

    #[test]
    fn ratios_pair_rounds_and_targets_pass_or_fail() {
        let shm = Backing {
            dir: "/dev/shm".into(),
            fs_type: "tmpfs".into(),
            direct: true,
        };
        let mut r = report();
        let qd32 = "randread-4k-qd32".to_string();
        let qd1 = "randread-4k-qd1".to_string();
        let fio = [
            measured(100.0, 10.0, 50.0, 30.0),
            measured(50.0, 20.0, 50.0, 30.0),
        ];
        r.add("fio", qd32.clone(), Some(32), Format::Raw, &shm, 1, &fio);
        r.add("fio", qd1.clone(), Some(1), Format::Raw, &shm, 1, &fio);
        // Round 1 ran while the machine slowed down (fio 120 IOPS before, 80 after: 100 at
        // the middle turn); round 2 was slow throughout. raw is 0.9x fio in each round.
        let reference = [
            FioReference::between(
                &measured(120.0, 8.0, 50.0, 30.0),
                &measured(80.0, 12.0, 50.0, 30.0),
                0.5,
            ),
            FioReference::between(&fio[1], &fio[1], 0.75),
        ];
        let raw = [
            measured(90.0, 12.0, 60.0, 5.0),
            measured(45.0, 24.0, 60.0, 5.0),
        ];
        r.add(
            "ferrotap",
            qd32.clone(),
            Some(32),
            Format::Raw,
            &shm,
            1,
            &raw,
        );
        r.set_fio_reference(&reference);
        let qcow2 = [
            measured(70.0, 30.0, 60.0, 40.0),
            measured(35.0, 60.0, 60.0, 40.0),
        ];
        r.add(
            "ferrotap",
            qd32.clone(),
            Some(32),
            Format::Qcow2,
            &shm,
            1,
            &qcow2,
        );
        r.set_fio_reference(&reference);
        // Without a reference (fio failed in a round), no ratio.
        r.add("ferrotap", qd32, Some(32), Format::Vhd, &shm, 1, &raw);
        r.add("ferrotap", qd1, Some(1), Format::Raw, &shm, 1, &raw);
        r.set_fio_reference(&reference);
        r.add(
            "ferrotap",
            "idle".into(),
            None,
            Format::Raw,
            &shm,
            1,
            &[measured(0.0, 0.0, 0.05, 9.0)],
        );
        r.set_wakeups(0.04);
        r.set_fio_reference(&reference);
        r.add(
            "ferrotap[poll-us=50]",
            "idle-connected".into(),
            None,
            Format::Raw,
            &shm,
            1,
            &[measured(0.0, 0.0, 0.3, 4.0)],
        );
        r.finish();
        let row = |format: &str, workload: &str| {
            r.runs
                .iter()
                .find(|row| {
                    row.system == "ferrotap" && row.format == format && row.workload == workload
                })
                .unwrap()
        };
        assert_eq!(row("raw", "randread-4k-qd32").iops_vs_fio, Some(0.9));
        assert_eq!(row("raw", "randread-4k-qd32").p99_vs_fio, Some(1.2));
        assert_eq!(row("qcow2", "randread-4k-qd32").iops_vs_fio, Some(0.7));
        assert_eq!(row("vhd", "randread-4k-qd32").iops_vs_fio, None);
        assert_eq!(
            row("raw", "randread-4k-qd32").fio_iops_rounds,
            [100.0, 50.0]
        );
        assert_eq!(row("raw", "randread-4k-qd32").fio_p99_rounds, [10.0, 20.0]);
        // The lower median of two rounds is the slower one.
        assert_eq!(row("raw", "randread-4k-qd32").measured.iops, 45.0);
        let verdict = |target: &str, row: &str| {
            r.targets
                .iter()
                .find(|t| t.target == target && t.row.contains(row))
                .map(|t| t.pass)
        };
        assert_eq!(
            verdict("raw randread QD32 IOPS vs fio", "raw randread-4k-qd32"),
            Some(true)
        );
        assert_eq!(
            verdict(
                "vhd/qcow2 randread QD32 IOPS vs fio",
                "qcow2 randread-4k-qd32"
            ),
            Some(false)
        );
        assert_eq!(
            verdict("p99 at QD1 vs fio", "raw randread-4k-qd1"),
            Some(true)
        );
        assert_eq!(verdict("RSS MiB under load", "qcow2"), Some(false));
        assert_eq!(verdict("idle CPU% ~0", "raw idle "), Some(true));
        assert_eq!(verdict("idle RSS MiB", "raw idle "), Some(false));
        assert_eq!(verdict("idle CPU% ~0", "idle-connected"), Some(false));
        assert_eq!(verdict("idle RSS MiB", "idle-connected"), Some(true));
        assert_eq!(row("raw", "idle").wakeups_per_s, Some(0.0));
        // fio rows get no ratios and no targets.
        assert!(r.targets.iter().all(|t| !t.row.starts_with("fio")));
        // The reference is kept off fio and idle rows.
        assert!(r
            .runs
            .iter()
            .filter(|row| row.system == "fio" || row.is_idle())
            .all(|row| row.fio_iops_rounds.is_empty()));
        let table = r.render();
        assert!(table.contains("0.90x") && table.contains("FAIL"), "{table}");
    }
}
