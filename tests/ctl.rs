//! `ferrotap ctl` and the control operations behind it, end to end on xensim: a real
//! `ferrotap serve` process, the Rust simulated blkfront as its own process running verified
//! workloads, and qemu-img (check, compare, convert, info) as the oracle for what reached the
//! image files. Pause mid-workload (the guest sees a delay and no error; nothing in flight
//! and the image closed while paused), unpause onto a snapshot overlay made while paused,
//! resize while connected, stats against the workload's own counts, the xcp-rrdd stats
//! files, watch events (a broken ring among them) and the registry behind `ctl list`,
//! `--pid` and `--vbd`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::host::{ferrotap, Serve, SimHost};
use common::run_ok;
use ferrotap::xensim::blkfront::{Blkfront, FrontConfig};
use serde_json::{json, Value};

const DISK_MIB: u64 = 64;
const DISK_SECTORS: u64 = DISK_MIB << 11;

/// Private registry and stats-file directories, so tests neither need nor touch /run and
/// /dev/shm's real entries.
struct Dirs {
    run: tempfile::TempDir,
    shm: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        Dirs {
            run: tempfile::tempdir().unwrap(),
            shm: tempfile::tempdir().unwrap(),
        }
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("FERROTAP_RUN_DIR", self.run.path())
            .env("FERROTAP_SHM_DIR", self.shm.path());
    }

    /// `ferrotap ctl ARGS`.
    fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = ferrotap();
        cmd.arg("ctl").args(args);
        self.env(&mut cmd);
        cmd.output().unwrap()
    }

    /// `ferrotap ctl ARGS`, which must succeed; its JSON output.
    fn ctl_json(&self, args: &[&str]) -> Value {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "ctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("ctl {args:?}: not JSON ({e}): {:?}", out.stdout))
    }

    /// `ferrotap serve` on `image` in `host` with these directories.
    fn serve(&self, host: &SimHost, image: &Path, extra: &[&str]) -> Serve {
        let control = host.path().join("vbd.ctl");
        let mut cmd = ferrotap();
        cmd.arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--xensim")
            .arg(host.path())
            .arg("--control")
            .arg(&control)
            .args(extra)
            .stdin(Stdio::null());
        self.env(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&control).is_err() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "ferrotap serve exited early"
            );
            assert!(Instant::now() < deadline, "ferrotap serve never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Serve {
            child: Some(child),
            control,
        }
    }
}

/// Start the simulated blkfront on `serve` (its own process; JSON report on stdout).
fn spawn_blkfront(host: &SimHost, serve: &Serve, args: &[&str]) -> Child {
    ferrotap()
        .args(["xensim", "blkfront", "--json", "--dir"])
        .arg(host.path())
        .arg("--control")
        .arg(&serve.control)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Wait for the blkfront; it must succeed. Its report.
fn finish_blkfront(child: Child) -> Value {
    common::host::report_of(&child.wait_with_output().unwrap())
}

/// Poll `serve`'s stats until `done` holds for the totals (or fail after 60 s).
fn wait_for_stats(serve: &Serve, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = serve.ctl(&json!({"op": "stats"}));
        if done(&stats["totals"]) {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the process's file descriptors point at.
fn open_files(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .collect()
}

/// A `watch` connection; `events` reads what came since.
struct Watch {
    reader: BufReader<UnixStream>,
}

impl Watch {
    fn open(serve: &Serve) -> (Watch, Value) {
        let mut stream = UnixStream::connect(&serve.control).unwrap();
        stream.write_all(b"{\"op\":\"watch\"}\n").unwrap();
        let mut reader = BufReader::new(stream);
        let mut ack = String::new();
        reader.read_line(&mut ack).unwrap();
        (Watch { reader }, serde_json::from_str(&ack).unwrap())
    }

    /// The next event, waiting at most 10 s.
    fn next(&mut self) -> Value {
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad event {line:?}: {e}"))
    }

    /// After the serve exits: nothing more, then end of stream.
    fn assert_ends(mut self) {
        let mut rest = String::new();
        self.reader.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "", "events after the last one expected");
    }
}

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img (is it installed?): {e}"))
}

fn qemu_img_check(image: &Path) {
    let out = qemu_img(&["check", image.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn md5(path: &Path) -> String {
    let out = run_ok(Command::new("md5sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Every sector run the frontend's model knows must read the same from `image` (as
/// `qemu-img convert -O raw` reads it through its chain). Returns the sectors checked.
fn check_model(image: &Path, model: &Path) -> u64 {
    let flat = image.with_extension("flat");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(image)
            .arg(&flat),
    );
    let disk = std::fs::read(&flat).unwrap();
    std::fs::remove_file(&flat).unwrap();
    let model_bytes = std::fs::read(model).unwrap();
    let known: Vec<(u64, u64)> =
        serde_json::from_slice(&std::fs::read(model.with_extension("known")).unwrap()).unwrap();
    let mut checked = 0;
    for (sector, count) in known {
        let (start, end) = ((sector * 512) as usize, ((sector + count) * 512) as usize);
        assert_eq!(
            &disk[start..end],
            &model_bytes[start..end],
            "sectors {sector}+{count} differ between {} and the frontend's model",
            image.display()
        );
        checked += count;
    }
    assert!(
        checked > 0,
        "the model knows nothing: the check proves nothing"
    );
    checked
}

fn u64_at(bytes: &[u8], index: usize) -> u64 {
    u64::from_le_bytes(bytes[index * 8..index * 8 + 8].try_into().unwrap())
}

fn n(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{value} is not a number"))
}

/// The stats files must hold exactly the counters of the `stats` totals.
fn check_stats_files(shm: &Path, pid: u32, totals: &Value) {
    let statistics = std::fs::read(shm.join("vbd3-1-51712/statistics")).unwrap();
    assert_eq!(statistics.len(), 4096, "a page, as tapdisk's");
    let latency = &totals["latency"];
    let expected = [
        ("st_ds_req", n(&totals["discards"])),
        ("st_f_req", n(&totals["flushes"])),
        ("st_oo_req", 0),
        ("st_rd_req", n(&totals["reads"])),
        ("st_rd_cnt", n(&latency["read"]["count"])),
        ("st_rd_sect", n(&totals["bytes_read"]) / 512),
        ("st_rd_sum_usecs", n(&latency["read"]["sum_us"])),
        ("st_rd_max_usecs", n(&latency["read"]["max_us"])),
        ("st_wr_req", n(&totals["writes"])),
        ("st_wr_cnt", n(&latency["write"]["count"])),
        ("st_wr_sect", n(&totals["bytes_written"]) / 512),
        ("st_wr_sum_usecs", n(&latency["write"]["sum_us"])),
        ("st_wr_max_usecs", n(&latency["write"]["max_us"])),
        ("flags", 0),
    ];
    for (index, (name, value)) in expected.iter().enumerate() {
        assert_eq!(u64_at(&statistics, index), *value, "statistics {name}");
    }
    let td3 = std::fs::read(shm.join(format!("td3-{pid}/vbd-1-51712"))).unwrap();
    assert_eq!(td3.len(), 4096);
    assert_eq!(
        u32::from_le_bytes(td3[..4].try_into().unwrap()),
        1,
        "version"
    );
    let expected = [
        ("oo_reqs", 0),
        ("read_reqs_submitted", n(&totals["reads"])),
        ("read_reqs_completed", n(&latency["read"]["count"])),
        ("read_sectors", n(&totals["bytes_read"]) / 512),
        ("read_total_ticks", n(&latency["read"]["sum_us"])),
        ("write_reqs_submitted", n(&totals["writes"])),
        ("write_reqs_completed", n(&latency["write"]["count"])),
        ("write_sectors", n(&totals["bytes_written"]) / 512),
        ("write_total_ticks", n(&latency["write"]["sum_us"])),
        ("io_errors", n(&totals["errors"])),
        ("flags", 0),
    ];
    for (index, (name, value)) in expected.iter().enumerate() {
        assert_eq!(u64_at(&td3, index + 1), *value, "td3 {name}");
    }
    assert!(u64_at(&statistics, 3) > 0 && u64_at(&statistics, 8) > 0);
}

#[test]
fn pause_mid_workload_then_unpause_onto_a_snapshot() {
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let base = work.path().join("base.qcow2");
    let snap = work.path().join("snap.qcow2");
    let model = work.path().join("model.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg(format!("{DISK_MIB}M")),
    );
    let host = SimHost::new();
    let dirs = Dirs::new();
    // io_uring here (its registered files must follow the pause), AIO in the resize test.
    let serve = dirs.serve(&host, &base, &["--devid", "51712", "--engine", "uring"]);
    let pid = serve.pid();
    let control = serve.control.to_str().unwrap().to_string();
    let (mut watch, ack) = Watch::open(&serve);
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert_eq!(ack["paused"], json!(false), "{ack}");

    let front = spawn_blkfront(
        &host,
        &serve,
        &[
            "--workload",
            "verify",
            "--ops",
            "4000",
            "--seed",
            "11",
            "--queues",
            "2",
            "--persistent",
            "--model-out",
            model.to_str().unwrap(),
        ],
    );
    wait_for_stats(&serve, "the workload to get going", |t| {
        t["requests"].as_u64().unwrap_or(0) >= 800
    });
    assert!(
        open_files(pid).contains(&base),
        "before the pause the serve has the image open"
    );
    let shm = dirs.shm.path();
    assert!(shm.join("vbd3-1-51712/statistics").exists());
    assert!(shm.join(format!("td3-{pid}/vbd-1-51712")).exists());

    let paused = dirs.ctl_json(&["--control", &control, "pause"]);
    assert_eq!(paused["paused"], json!(true), "{paused}");
    assert_eq!(watch.next(), json!({"event": "paused"}));

    // Paused: nothing in flight, nothing new taken although the guest keeps its queue
    // full, and no file descriptor on the image.
    let stats = serve.ctl(&json!({"op": "stats"}));
    assert_eq!(stats["paused"], json!(true), "{stats}");
    assert_eq!(stats["totals"]["in_flight"], json!(0), "{stats}");
    for queue in stats["queues"].as_array().unwrap() {
        assert_eq!(queue["in_flight"], json!(0), "{stats}");
    }
    let taken = n(&stats["totals"]["requests"]);
    // The guest's persistent grants stay mapped across the pause (only the image closes).
    assert!(n(&stats["totals"]["persistent_grants"]) > 0, "{stats}");
    assert!(
        !open_files(pid).contains(&base),
        "the image is still open while paused: {:?}",
        open_files(pid)
    );
    let info = dirs.ctl_json(&["--pid", &pid.to_string(), "info"]);
    assert_eq!(info["paused"], json!(true), "{info}");
    assert_eq!(info["connected"], json!(true), "{info}");
    assert_eq!(info["domid"], json!(1), "{info}");
    assert_eq!(info["devid"], json!(51712), "{info}");
    std::thread::sleep(Duration::from_millis(1200));
    let stats = serve.ctl(&json!({"op": "stats"}));
    assert_eq!(
        n(&stats["totals"]["requests"]),
        taken,
        "requests taken while paused"
    );
    // The stats files (rewritten twice a second) hold the frozen counters.
    check_stats_files(shm, pid, &stats["totals"]);

    // The list shows it paused, for its VBD.
    let list = dirs.ctl_json(&["list", "--json"]);
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pid"] == json!(pid))
        .unwrap_or_else(|| panic!("serve {pid} not listed: {list}"));
    assert_eq!(row["state"], json!("paused"), "{row}");
    assert_eq!(
        (row["domid"].clone(), row["devid"].clone()),
        (json!(1), json!(51712))
    );

    // The storage manager's snapshot while the disk is quiet: the closed image is
    // consistent on its own, then becomes the backing file of a new leaf.
    qemu_img_check(&base);
    let base_sum = md5(&base);
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(&base)
            .args(["-F", "qcow2"])
            .arg(&snap),
    );
    let unpaused = dirs.ctl_json(&[
        "--vbd",
        "1/51712",
        "unpause",
        "--path",
        snap.to_str().unwrap(),
    ]);
    assert_eq!(unpaused["sectors"], json!(DISK_SECTORS), "{unpaused}");
    assert_eq!(
        watch.next(),
        json!({"event": "unpaused", "sectors": DISK_SECTORS, "image": snap})
    );
    let info = serve.ctl(&json!({"op": "info"}));
    assert_eq!(info["chain"], json!([snap, base]), "{info}");
    assert_eq!(info["paused"], json!(false), "{info}");

    let report = finish_blkfront(front);
    assert_eq!(report["errors"], json!(0), "{report}");
    assert!(n(&report["ops"]) >= 4000, "{report}");
    assert!(n(&report["verified_bytes"]) > 0, "{report}");
    let stats = serve.ctl(&json!({"op": "stats"}));
    assert!(
        n(&stats["totals"]["requests"]) > taken,
        "requests after unpause"
    );
    assert_eq!(watch.next(), json!({"event": "disconnected"}));
    // The files go with the connection.
    assert!(!shm.join("vbd3-1-51712").exists());
    assert!(!shm.join(format!("td3-{pid}")).exists());
    serve.close();
    watch.assert_ends();
    assert!(
        dirs.ctl_json(&["list", "--json"]) == json!([]),
        "a closed serve is listed"
    );

    // The old leaf is untouched since the pause; writes after it went to the new leaf;
    // both are clean; everything the guest wrote, before and after, reads back through
    // the chain.
    assert_eq!(md5(&base), base_sum, "the old leaf changed after the pause");
    qemu_img_check(&base);
    qemu_img_check(&snap);
    let compare = qemu_img(&["compare", base.to_str().unwrap(), snap.to_str().unwrap()]);
    assert_eq!(
        compare.status.code(),
        Some(1),
        "the new leaf holds no new writes: {}",
        String::from_utf8_lossy(&compare.stdout)
    );
    check_model(&snap, &model);
}

#[test]
fn stats_match_the_workload_and_ctl_finds_the_serve() {
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = work.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    let host = SimHost::new();
    let dirs = Dirs::new();
    let serve = dirs.serve(&host, &image, &[]);
    let pid = serve.pid();

    let out = dirs.ctl(&["list"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    let line = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&pid.to_string()))
        .unwrap_or_else(|| panic!("serve {pid} not in the list:\n{table}"));
    assert!(line.contains("idle") && line.contains(&*serve.control.to_string_lossy()));

    // Pause while not connected closes the image; a frontend that connects then is
    // served nothing until unpause reopens it.
    let pid_arg = pid.to_string();
    dirs.ctl_json(&["--pid", &pid_arg, "pause"]);
    assert!(!open_files(pid).contains(&image));
    let info = dirs.ctl_json(&["--pid", &pid_arg, "info"]);
    assert_eq!(info["paused"], json!(true), "{info}");

    let front = spawn_blkfront(
        &host,
        &serve,
        &[
            "--workload",
            "verify",
            "--ops",
            "1500",
            "--seed",
            "5",
            "--queues",
            "2",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while serve.ctl(&json!({"op": "info"}))["connected"] != json!(true) {
        assert!(Instant::now() < deadline, "the frontend never connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let stats = serve.ctl(&json!({"op": "stats"}));
    assert_eq!(
        stats["totals"]["requests"],
        json!(0),
        "served while paused: {stats}"
    );
    assert!(!open_files(pid).contains(&image));
    let unpaused = dirs.ctl_json(&["--pid", &pid_arg, "unpause"]);
    assert_eq!(unpaused["image"], json!(image), "{unpaused}");
    assert!(open_files(pid).contains(&image));

    let report = finish_blkfront(front);
    assert_eq!(report["errors"], json!(0), "{report}");
    // After the frontend went, stats are the last connection's.
    let stats = dirs.ctl_json(&["--control", serve.control.to_str().unwrap(), "stats"]);
    assert_eq!(stats["connected"], json!(false), "{stats}");
    let totals = &stats["totals"];
    let latency = &totals["latency"];
    assert_eq!(totals["requests"], report["ops"], "{stats}\n{report}");
    assert_eq!(totals["reads"], report["reads"]);
    assert_eq!(totals["flushes"], report["flushes"]);
    assert_eq!(totals["discards"], report["discards"]);
    assert_eq!(totals["errors"], json!(0));
    assert_eq!(totals["in_flight"], json!(0));
    assert_eq!(
        n(&totals["bytes_read"]) + n(&totals["bytes_written"]),
        n(&report["bytes"])
    );
    // Writes with data flagged FLUSH or BARRIER count as flushes here and as writes in
    // the report.
    assert!(n(&totals["writes"]) > 0 && n(&totals["writes"]) <= n(&report["writes"]));
    assert_eq!(latency["read"]["count"], report["reads"]);
    assert_eq!(latency["write"]["count"], totals["writes"]);
    assert_eq!(latency["flush"]["count"], report["flushes"]);
    assert_eq!(latency["discard"]["count"], report["discards"]);
    let mut answered = 0;
    for class in ["read", "write", "flush", "discard"] {
        let histogram = &latency[class];
        let buckets: Vec<u64> = histogram["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(n)
            .collect();
        assert_eq!(buckets.len(), 32, "{histogram}");
        assert_eq!(
            buckets.iter().sum::<u64>(),
            n(&histogram["count"]),
            "{class}: {histogram}"
        );
        assert!(n(&histogram["count"]) > 0, "no {class} in the workload");
        // Every answer took some time; the largest lies in the highest bucket used.
        let max = n(&histogram["max_us"]);
        assert!(n(&histogram["sum_us"]) >= max);
        let top = buckets.iter().rposition(|&b| b > 0).unwrap();
        let top_range = if top == 0 {
            0..1
        } else {
            (1u64 << (top - 1))..(1u64 << top)
        };
        assert!(
            top_range.contains(&max),
            "{class}: max {max} not in bucket {top}"
        );
        answered += n(&histogram["count"]);
    }
    assert_eq!(
        answered,
        n(&report["ops"]),
        "every request answered is in a histogram"
    );
    let queues = stats["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2);
    assert_eq!(
        queues.iter().map(|q| n(&q["requests"])).sum::<u64>(),
        n(&totals["requests"])
    );
    assert!(queues.iter().all(|q| n(&q["requests"]) > 0));
    // No devid: no stats files.
    assert_eq!(std::fs::read_dir(dirs.shm.path()).unwrap().count(), 0);

    let closed = dirs.ctl_json(&["--pid", &pid_arg, "close"]);
    assert_eq!(closed["ok"], json!(true));
    let mut serve = serve;
    let status = serve.child.take().unwrap().wait().unwrap();
    assert!(status.success());
    assert_eq!(dirs.ctl_json(&["list", "--json"]), json!([]));
    assert!(!dirs.ctl(&["--pid", &pid_arg, "info"]).status.success());
}

#[test]
fn resize_while_connected() {
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = work.path().join("disk.qcow2");
    let model = work.path().join("model.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(format!("{DISK_MIB}M")),
    );
    let host = SimHost::new();
    let dirs = Dirs::new();
    let serve = dirs.serve(&host, &image, &["--devid", "768", "--engine", "aio"]);
    let control = serve.control.to_str().unwrap().to_string();
    let (mut watch, _) = Watch::open(&serve);
    let front = spawn_blkfront(
        &host,
        &serve,
        &[
            "--workload",
            "verify",
            "--ops",
            "2500",
            "--seed",
            "23",
            "--model-out",
            model.to_str().unwrap(),
        ],
    );
    wait_for_stats(&serve, "the workload to get going", |t| {
        t["requests"].as_u64().unwrap_or(0) >= 300
    });
    let resized = dirs.ctl_json(&["--control", &control, "resize", "96M"]);
    let sectors = 96u64 << 11;
    assert_eq!(resized["sectors"], json!(sectors), "{resized}");
    assert_eq!(
        watch.next(),
        json!({"event": "resized", "sectors": sectors})
    );
    let info = dirs.ctl_json(&["--vbd", "1/768", "info"]);
    assert_eq!(info["sectors"], json!(sectors), "{info}");
    // Growing by a relative size, and refusing to shrink.
    let grown = dirs.ctl_json(&["--control", &control, "resize", "+32M"]);
    assert_eq!(grown["sectors"], json!(128u64 << 11), "{grown}");
    assert_eq!(
        watch.next(),
        json!({"event": "resized", "sectors": 128u64 << 11})
    );
    let shrink = dirs.ctl(&["--control", &control, "resize", "32M"]);
    assert!(!shrink.status.success(), "a shrink was accepted");

    let report = finish_blkfront(front);
    assert_eq!(report["errors"], json!(0), "{report}");
    assert!(n(&report["verified_bytes"]) > 0, "{report}");
    assert_eq!(watch.next(), json!({"event": "disconnected"}));
    serve.close();

    let info = qemu_img(&["info", "--output=json", image.to_str().unwrap()]);
    assert!(info.status.success());
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], json!(128u64 << 20), "{info}");
    qemu_img_check(&image);
    check_model(&image, &model);
}

#[test]
fn a_frontend_breaking_its_ring_is_a_failed_event() {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    let host = SimHost::new();
    let dirs = Dirs::new();
    let serve = dirs.serve(&host, &image, &[]);
    let (mut watch, _) = Watch::open(&serve);
    let mut config = FrontConfig::new(host.path().to_path_buf(), serve.control.clone());
    config.queues = 1;
    let mut front = Blkfront::connect(&config).unwrap();
    // req_prod jumps past the ring.
    {
        let queue = front.queue_mut(0);
        let header = queue.header();
        let size = queue.ring_size();
        header.set_req_prod(header.rsp_prod().wrapping_add(size + 5));
        queue.notify().unwrap();
    }
    let event = watch.next();
    assert_eq!(event["event"], json!("failed"), "{event}");
    let error = event["error"].as_str().unwrap();
    assert!(error.contains("queue 0"), "{event}");
    assert_eq!(serve.ctl(&json!({"op": "info"}))["error"], json!(error));
    assert_eq!(serve.ctl(&json!({"op": "disconnect"}))["ok"], json!(true));
    assert_eq!(watch.next(), json!({"event": "disconnected"}));
    drop(front);
    serve.close();
    watch.assert_ends();
}

#[test]
fn sigterm_closes_like_close() {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK_MIB << 20)
        .unwrap();
    let host = SimHost::new();
    let dirs = Dirs::new();
    let mut serve = dirs.serve(&host, &image, &["--devid", "832"]);
    let pid = serve.pid();
    let (mut watch, _) = Watch::open(&serve);
    let front = Blkfront::connect(&FrontConfig::new(
        host.path().to_path_buf(),
        serve.control.clone(),
    ))
    .unwrap();
    let shm = dirs.shm.path();
    assert!(shm.join("vbd3-1-832/statistics").exists());
    assert_eq!(
        dirs.ctl_json(&["list", "--json"]).as_array().unwrap().len(),
        1
    );
    run_ok(Command::new("kill").args(["-TERM", &pid.to_string()]));
    let status = serve.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "serve after SIGTERM: {status}");
    assert_eq!(watch.next(), json!({"event": "disconnected"}));
    watch.assert_ends();
    assert!(!shm.join("vbd3-1-832").exists());
    assert!(!shm.join(format!("td3-{pid}")).exists());
    assert!(!serve.control.exists());
    assert_eq!(dirs.ctl_json(&["list", "--json"]), json!([]));
    assert_eq!(
        std::fs::read_dir(dirs.run.path()).unwrap().count(),
        0,
        "the registry entry stayed"
    );
    drop(front);
}
