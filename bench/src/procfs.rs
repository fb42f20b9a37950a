//! What the benchmark learns from /proc (no `unsafe`, no getrusage): per-thread and
//! per-process CPU time, the (peak) RSS of a child, and the filesystem under a directory.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use crate::Result;

/// Nanoseconds the calling thread has spent on a CPU (user + system), from the first
/// field of /proc/thread-self/schedstat.
pub fn thread_cpu_ns() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .map_err(|e| format!("reading /proc/thread-self/schedstat: {e}"))?;
    text.split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| format!("unexpected /proc/thread-self/schedstat: {text:?}"))
}

/// The peak resident set (VmHWM) of process `pid`, in KiB; `None` once it has exited.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

/// A `kB` line of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...).
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// /proc's unit of CPU time (USER_HZ): 100 per second on every Linux ABI that matters.
const USER_HZ: u64 = 100;

/// CPU time (user + system) that process `pid` and all its threads, live or exited, have
/// used, in nanoseconds at USER_HZ resolution (10 ms), from /proc/PID/stat.
pub fn process_cpu_ns(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces or parentheses:
    // the fields after it start after the last ')'. utime and stime are fields 14 and 15.
    let after_name = text
        .rfind(')')
        .map(|end| &text[end + 1..])
        .ok_or_else(|| format!("unexpected {path}: {text:?}"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|field| field.parse::<u64>().ok())
            .ok_or_else(|| format!("unexpected {path}: {text:?}"))
    };
    // fields[0] is field 3 (state): field N is fields[N - 3].
    Ok((ticks(14 - 3)? + ticks(15 - 3)?) * (1_000_000_000 / USER_HZ))
}

/// CPU time and times scheduled in, summed over the live threads of process `pid`, from
/// /proc/PID/task/*/schedstat (nanoseconds on a CPU; timeslices run): precise where
/// /proc/PID/stat counts 10 ms ticks, but blind to threads that exit in between.
pub fn threads_schedstat(pid: u32) -> Result<(u64, u64)> {
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|e| format!("reading {dir}: {e}"))?;
    let (mut cpu_ns, mut slices) = (0, 0);
    for task in tasks.flatten() {
        // A thread that exits while this runs has no schedstat any more: it counts as none.
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let fields: Vec<u64> = text
            .split_whitespace()
            .map_while(|field| field.parse().ok())
            .collect();
        let [on_cpu, _waiting, timeslices] = fields[..] else {
            return Err(format!("unexpected {}: {text:?}", task.path().display()));
        };
        cpu_ns += on_cpu;
        slices += timeslices;
    }
    Ok((cpu_ns, slices))
}

/// What a monitored child printed, and the highest peak RSS seen while it ran.
pub struct ChildRun {
    pub stdout: String,
    pub peak_rss_kib: u64,
}

/// How often a child's VmHWM is sampled. The peak is a high-water mark, so sampling only
/// misses growth in the child's last few milliseconds (it has finished measuring by then).
const RSS_POLL: Duration = Duration::from_millis(20);

/// Run `command` to completion, polling its VmHWM, and fail with its stderr when it fails.
pub fn run_monitored(mut command: Command) -> Result<ChildRun> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {shown}: {e}"))?;
    let pid = child.id();
    let readers = [
        child.stdout.take().map(drain_in_thread),
        child.stderr.take().map(drain_in_thread),
    ];
    let mut peak = 0;
    let status = loop {
        if let Some(kib) = peak_rss_kib(pid) {
            peak = peak.max(kib);
        }
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => thread::sleep(RSS_POLL),
            Err(e) => return Err(format!("waiting for {shown}: {e}")),
        }
    };
    let [stdout, stderr] = readers.map(|reader| {
        reader
            .and_then(|handle| handle.join().ok())
            .unwrap_or_default()
    });
    if !status.success() {
        return Err(format!("{shown} failed ({status}): {}", stderr.trim()));
    }
    Ok(ChildRun {
        stdout,
        peak_rss_kib: peak,
    })
}

fn drain_in_thread(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        // A read error leaves what was read so far; the exit status tells what went wrong.
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// The filesystem type of the mount that holds `dir` (longest matching mount point).
pub fn filesystem_type(dir: &Path) -> Result<String> {
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| format!("reading /proc/self/mounts: {e}"))?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _device = fields.next()?;
            // The kernel escapes spaces in mount points as \040.
            let mount_point = fields.next()?.replace("\\040", " ");
            let fs_type = fields.next()?;
            dir.starts_with(&mount_point)
                .then(|| (mount_point.len(), fs_type.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs_type)| fs_type)
        .ok_or_else(|| format!("no mount holds {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_grows_with_work() {
        let before = thread_cpu_ns().unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(thread_cpu_ns().unwrap() > before, "{x}");
    }

    #[test]
    fn process_cpu_time_and_rss_of_this_process() {
        let pid = std::process::id();
        let before = process_cpu_ns(pid).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        // Long enough for a few 10 ms ticks, whatever the machine.
        while start.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        assert!(process_cpu_ns(pid).unwrap() > before, "{x}");
        let (cpu_ns, slices) = threads_schedstat(pid).unwrap();
        assert!(cpu_ns > 0 && slices > 0);
        let rss = status_kib(pid, "VmRSS").unwrap();
        assert!(rss > 0 && rss <= peak_rss_kib(pid).unwrap());
        assert_eq!(status_kib(pid, "NoSuchKey"), None);
    }

    #[test]
    fn monitored_child_reports_output_and_rss() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; sleep 0.1"]);
        let run = run_monitored(cmd).unwrap();
        assert_eq!(run.stdout, "hello\n");
        assert!(run.peak_rss_kib > 0);
        let mut failing = Command::new("sh");
        failing.args(["-c", "echo oops >&2; exit 3"]);
        let err = run_monitored(failing).err().unwrap();
        assert!(err.contains("oops"), "{err}");
    }

    #[test]
    fn proc_is_procfs() {
        assert_eq!(filesystem_type(Path::new("/proc/self")).unwrap(), "proc");
    }
}
