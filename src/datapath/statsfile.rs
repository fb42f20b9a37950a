//! The stats files xcp-rrdd reads for a VBD's metrics, in the layouts tapdisk (blktap3) uses,
//! so an unmodified toolstack graphs ferrotap's disks. Both are a page long, native-endian
//! (little-endian on x86), rewritten in place twice a second while the VBD is connected, and
//! removed when it disconnects:
//!
//! - `<dir>/vbd3-<domid>-<devid>/statistics`: blkback-style counters, 14 u64:
//!   discards, flushes, out-of-memory (0), reads received, reads completed, sectors read,
//!   read microseconds summed, read microseconds max, then the same five for writes, flags (0).
//!   xcp-rrdd also watches `<dir>` for `vbd3-*` entries appearing and vanishing (inotify).
//! - `<dir>/td3-<pid>/vbd-<domid>-<devid>`: version 1 metrics: u32 version = 1, u32 pad,
//!   out-of-memory (0), reads submitted, reads completed, sectors read, read microseconds
//!   summed, writes submitted, writes completed, sectors written, write microseconds summed,
//!   I/O errors, flags (0), each a u64. xcp-rrdd finds it through the backend's
//!   `kthread-pid` key (the serving process).
//!
//! `<dir>` is /dev/shm unless FERROTAP_SHM_DIR says otherwise (tests).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::{QueueStats, QueueStatsSnapshot};
use crate::blkif::{PAGE_SIZE, SECTOR_SIZE};
use crate::error::{Error, Result};

/// How often the files are rewritten.
const PERIOD: Duration = Duration::from_millis(500);
/// Bytes of the blkback-style record.
pub const BLKBACK_STATS_LEN: usize = 14 * 8;
/// Bytes of the version 1 metrics record.
pub const TD3_STATS_LEN: usize = 12 * 8;

/// The directory the files live in: FERROTAP_SHM_DIR, else /dev/shm.
pub fn shm_dir() -> PathBuf {
    std::env::var_os("FERROTAP_SHM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

fn put(out: &mut [u8], index: usize, value: u64) {
    out[index * 8..index * 8 + 8].copy_from_slice(&value.to_le_bytes());
}

/// The blkback-style record of `total`.
pub fn blkback_stats(total: &QueueStatsSnapshot) -> [u8; BLKBACK_STATS_LEN] {
    let mut out = [0u8; BLKBACK_STATS_LEN];
    let (read, write) = (&total.latency.read, &total.latency.write);
    let fields = [
        total.discards,
        total.flushes,
        0,
        total.reads,
        read.count,
        total.bytes_read / SECTOR_SIZE,
        read.sum_us,
        read.max_us,
        total.writes,
        write.count,
        total.bytes_written / SECTOR_SIZE,
        write.sum_us,
        write.max_us,
        0,
    ];
    for (index, value) in fields.into_iter().enumerate() {
        put(&mut out, index, value);
    }
    out
}

/// The version 1 metrics record of `total`.
pub fn td3_stats(total: &QueueStatsSnapshot) -> [u8; TD3_STATS_LEN] {
    let mut out = [0u8; TD3_STATS_LEN];
    let (read, write) = (&total.latency.read, &total.latency.write);
    put(&mut out, 0, 1);
    let fields = [
        0,
        total.reads,
        read.count,
        total.bytes_read / SECTOR_SIZE,
        read.sum_us,
        total.writes,
        write.count,
        total.bytes_written / SECTOR_SIZE,
        write.sum_us,
        total.errors,
        0,
    ];
    for (index, value) in fields.into_iter().enumerate() {
        put(&mut out, index + 1, value);
    }
    out
}

/// Where one VBD's files are.
#[derive(Debug, Clone)]
pub struct StatsPaths {
    pub vbd3_dir: PathBuf,
    pub statistics: PathBuf,
    pub td3_dir: PathBuf,
    pub td3_file: PathBuf,
}

impl StatsPaths {
    pub fn new(dir: &Path, domid: u16, devid: u32, pid: u32) -> StatsPaths {
        let vbd3_dir = dir.join(format!("vbd3-{domid}-{devid}"));
        let td3_dir = dir.join(format!("td3-{pid}"));
        StatsPaths {
            statistics: vbd3_dir.join("statistics"),
            td3_file: td3_dir.join(format!("vbd-{domid}-{devid}")),
            vbd3_dir,
            td3_dir,
        }
    }
}

struct Files {
    statistics: File,
    td3: File,
}

impl Files {
    fn write(&self, stats: &[Arc<QueueStats>]) -> std::io::Result<()> {
        let snapshots: Vec<_> = stats.iter().map(|s| s.snapshot()).collect();
        let total = QueueStatsSnapshot::total(&snapshots);
        self.statistics.write_all_at(&blkback_stats(&total), 0)?;
        self.td3.write_all_at(&td3_stats(&total), 0)
    }
}

/// A connected VBD's stats files and the thread that keeps them current; dropping it
/// stops the thread and removes them.
pub struct StatsFiles {
    paths: StatsPaths,
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

fn create_page_file(path: &Path) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io("create stats file", e).with_path(path))?;
    file.set_len(PAGE_SIZE as u64)
        .map_err(|e| Error::io("size stats file", e).with_path(path))?;
    Ok(file)
}

fn create_dir(path: &Path) -> Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(Error::io("create stats directory", e).with_path(path))
        }
        _ => Ok(()),
    }
}

impl StatsFiles {
    /// Create the files under `dir` and start updating them from `stats`.
    pub fn start(
        dir: &Path,
        domid: u16,
        devid: u32,
        pid: u32,
        stats: Vec<Arc<QueueStats>>,
    ) -> Result<StatsFiles> {
        let paths = StatsPaths::new(dir, domid, devid, pid);
        // The td3 file first: xcp-rrdd looks for it once the vbd3 entry appears.
        create_dir(&paths.td3_dir)?;
        let td3 = create_page_file(&paths.td3_file)?;
        let statistics = create_dir(&paths.vbd3_dir)
            .and_then(|()| create_page_file(&paths.statistics))
            .inspect_err(|_| remove_files(&paths))?;
        let files = Files { statistics, td3 };
        files
            .write(&stats)
            .map_err(|e| Error::io("write stats file", e).with_path(&paths.statistics))?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("ferrotap-stats".into())
            .spawn(move || {
                let (stopped, wake) = &*thread_stop;
                let mut stopped = stopped.lock();
                while !*stopped {
                    wake.wait_for(&mut stopped, PERIOD);
                    // A full /dev/shm or a removed file only costs the metrics.
                    let _ = files.write(&stats);
                }
            })
            .map_err(|e| Error::io("spawn stats thread", e))?;
        Ok(StatsFiles {
            paths,
            stop,
            thread: Some(thread),
        })
    }

    pub fn paths(&self) -> &StatsPaths {
        &self.paths
    }
}

fn remove_files(paths: &StatsPaths) {
    let _ = fs::remove_file(&paths.statistics);
    let _ = fs::remove_dir(&paths.vbd3_dir);
    let _ = fs::remove_file(&paths.td3_file);
    // Only ours: one serve process has one VBD; a non-empty directory stays.
    let _ = fs::remove_dir(&paths.td3_dir);
}

impl Drop for StatsFiles {
    fn drop(&mut self) {
        let (stopped, wake) = &*self.stop;
        *stopped.lock() = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        remove_files(&self.paths);
    }
}
