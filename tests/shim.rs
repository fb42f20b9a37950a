//! blkback-shim end to end on xensim: real processes (`ferrotap xensim xenstored`,
//! `ferrotap-shim`, the serves it starts or attaches to, the simulated blkfront in xenstore
//! mode), the toolstack's part played by tests/common/toolstack.rs, and xenstore checked with
//! the stock `xenstore-read` / `xenstore-ls` (XENSTORED_PATH) as well as the library client.
//! Disk contents are checked by qemu-img (check, convert) against the guest's model.
//!
//! The shim is another package's binary: it is built (`cargo build -p blkback-shim`, a no-op
//! when fresh) beside this package's `ferrotap` and found there (see `common::shim_binary`).

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::host::{ferrotap, SimHost};
use common::toolstack::{self, Vbd};
use common::{run_ok, shim_binary};
use ferrotap::blkif::MAX_INDIRECT_SEGMENTS;
use ferrotap::datapath::{DEFAULT_MAX_QUEUES, MAX_RING_PAGE_ORDER};
use ferrotap::xenstore::Client;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const XVDA: u32 = 51712;

/// A process killed when the test ends; its stderr goes to `log`, shown if the test fails.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn spawn(command: &mut Command, log: PathBuf) -> Daemon {
        let file = File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        Daemon {
            child: Some(child),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "{} exited:\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log());
        }
        self.kill();
    }
}

/// A simulated host with its xenstored; the shim started on demand.
struct Host {
    sim: SimHost,
    xs: Arc<Client>,
    run_dir: PathBuf,
    // Dropped last: the shim and guests are stopped by the tests' own values first.
    _xenstored: Daemon,
}

impl Host {
    fn new() -> Host {
        let sim = SimHost::new();
        let xenstored = Daemon::spawn(
            ferrotap().args(["xensim", "xenstored"]).arg(sim.path()),
            sim.path().join("xenstored.log"),
        );
        let socket = sim.path().join("xenstored");
        let xs = wait_until("xenstored listening", || Client::connect(&socket).ok());
        let run_dir = sim.path().join("run");
        Host {
            sim,
            xs: Arc::new(xs),
            run_dir,
            _xenstored: xenstored,
        }
    }

    fn dir(&self) -> &Path {
        self.sim.path()
    }

    fn start_shim(&self, log_name: &str) -> Daemon {
        Daemon::spawn(
            Command::new(shim_binary())
                .arg("--xensim")
                .arg(self.dir())
                .arg("--run-dir")
                .arg(&self.run_dir)
                .arg("--ferrotap")
                .arg(env!("CARGO_BIN_EXE_ferrotap"))
                // The serves' stats files (vbd3-<domid>-<devid>) stay on this host: tests
                // running at once use the same device names.
                .env("FERROTAP_SHM_DIR", self.dir()),
            self.dir().join(log_name),
        )
    }

    /// A stock xenstore tool on this host's xenstored.
    fn tool(&self, name: &str) -> Command {
        let mut command = Command::new(name);
        command.env("XENSTORED_PATH", self.dir().join("xenstored"));
        command
    }

    /// `xenstore-read PATH`, None when it fails (a missing node).
    fn stock_read(&self, path: &str) -> Option<String> {
        let out = self
            .tool("xenstore-read")
            .arg(path)
            .output()
            .expect("xenstore-read (xenstore-utils) must be installed");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// The keys right under `dir` as `xenstore-ls` prints them.
    fn stock_ls(&self, dir: &str) -> HashMap<String, String> {
        let out = run_ok(self.tool("xenstore-ls").arg(dir));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| !line.starts_with(' '))
            .filter_map(|line| {
                let (key, value) = line.split_once(" = ")?;
                Some((key.to_string(), value.trim_matches('"').to_string()))
            })
            .collect()
    }

    /// `xenstore-write KEY VALUE ...` under `dir`.
    fn stock_write(&self, dir: &str, keys: &[(&str, &str)]) {
        let mut command = self.tool("xenstore-write");
        for (key, value) in keys {
            command.arg(format!("{dir}/{key}")).arg(value);
        }
        run_ok(&mut command);
    }

    fn read(&self, path: &str) -> Option<String> {
        self.xs.read_opt(0, path).unwrap()
    }

    fn wait_value(&self, path: &str, wanted: &str) {
        wait_until(&format!("{path} = {wanted}"), || {
            (self.read(path).as_deref() == Some(wanted)).then_some(())
        });
    }

    /// Start the simulated blkfront of `vbd` in xenstore mode.
    fn blkfront(&self, vbd: &Vbd, extra: &[&str]) -> Child {
        ferrotap()
            .args(["xensim", "blkfront", "--json", "--xenstore", "--dir"])
            .arg(self.dir())
            .args(["--domid", &vbd.domid.to_string()])
            .args(["--devid", &vbd.devid.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn serve_socket(&self, vbd: &Vbd) -> PathBuf {
        self.run_dir
            .join(format!("vbd3-{}-{}.sock", vbd.domid, vbd.devid))
    }
}

impl Drop for Host {
    /// The serves the shim started outlive it (as tapdisks outlive tapback): stop them, and
    /// any guest left, by their pids (their command lines name this host's directory).
    fn drop(&mut self) {
        for pid in processes_naming(self.dir()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Poll `probe` until it gives a value (panics after WAIT).
fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait for a blkfront and return its JSON report, asserting it succeeded without errors.
fn report(child: Child) -> Value {
    let report = common::host::report_of(&child.wait_with_output().unwrap());
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
    report
}

/// Processes whose command line names `needle` (a serve's control socket).
fn processes_naming(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some(pid)
        })
        .collect()
}

/// The serve on `socket` has exited and left no socket behind.
fn wait_serve_gone(socket: &Path) {
    wait_until(
        &format!("the serve on {} to exit", socket.display()),
        || (!socket.exists() && processes_naming(socket).is_empty()).then_some(()),
    );
}

/// xvda of guest `domid` on a new 16 MiB raw image `name` in `dir`.
fn raw_vbd(dir: &Path, domid: u16, name: &str) -> Vbd {
    Vbd::disk(domid, XVDA, raw_image(dir, name, 16).to_str().unwrap())
}

fn raw_image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(mib << 20).unwrap();
    path
}

/// Every sector the guest's model knows equals the image's contents as qemu-img reads them.
fn assert_image_matches_model(image: &Path, format: &str, model: &Path) {
    let converted = model.with_extension("qemu.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", format, "-O", "raw"])
            .arg(image)
            .arg(&converted),
    );
    let known: Vec<(u64, u64)> =
        serde_json::from_slice(&std::fs::read(model.with_extension("known")).unwrap()).unwrap();
    assert!(!known.is_empty(), "the guest's model knows no sector");
    let (model, disk) = (File::open(model).unwrap(), File::open(&converted).unwrap());
    for (sector, count) in known {
        let mut expected = vec![0u8; count as usize * 512];
        let mut actual = vec![0u8; count as usize * 512];
        model.read_exact_at(&mut expected, sector * 512).unwrap();
        disk.read_exact_at(&mut actual, sector * 512).unwrap();
        assert!(
            expected == actual,
            "sectors {sector}..{} differ between the guest's model and qemu-img's reading",
            sector + count
        );
    }
}

#[test]
fn handshake_and_verified_io_through_the_shim_on_qcow2() {
    let host = Host::new();
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = disk.path().join("guest.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("64M"),
    );
    let vbd = Vbd::disk(1, XVDA, image.to_str().unwrap());
    toolstack::add(&host.xs, &vbd);
    let mut shim = host.start_shim("shim.log");
    let be = vbd.backend();
    host.wait_value(&format!("{be}/state"), "2");

    // The offer, as the stock tool lists it: serve's features.
    let offer = host.stock_ls(&be);
    for (key, value) in [
        ("feature-flush-cache", "1".to_string()),
        ("feature-barrier", "1".to_string()),
        ("feature-discard", "1".to_string()),
        // qcow2's 64 KiB clusters.
        ("discard-granularity", "65536".to_string()),
        ("discard-alignment", "0".to_string()),
        ("discard-secure", "0".to_string()),
        ("feature-persistent", "1".to_string()),
        ("max-ring-page-order", MAX_RING_PAGE_ORDER.to_string()),
        ("multi-queue-max-queues", DEFAULT_MAX_QUEUES.to_string()),
        (
            "feature-max-indirect-segments",
            MAX_INDIRECT_SEGMENTS.to_string(),
        ),
        ("state", "2".to_string()),
    ] {
        assert_eq!(offer.get(key), Some(&value), "{key} in {offer:?}");
    }

    let model = disk.path().join("model.raw");
    let front = host.blkfront(
        &vbd,
        &[
            "--queues",
            "2",
            "--ring-page-order",
            "2",
            "--persistent",
            "--ops",
            "800",
            "--indirect-segments",
            "64",
            "--model-out",
            model.to_str().unwrap(),
        ],
    );
    let report = report(front);
    assert!(report["verified_bytes"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["sectors"], 64 << 11, "{report}");
    assert!(report["writes"].as_u64().unwrap() > 0, "{report}");

    // What each side wrote, read back with the stock tool.
    let fe = vbd.frontend();
    assert_eq!(
        host.stock_read(&format!("{be}/sectors")).as_deref(),
        Some("131072")
    );
    assert_eq!(
        host.stock_read(&format!("{be}/sector-size")).as_deref(),
        Some("512")
    );
    assert_eq!(
        host.stock_read(&format!("{be}/physical-sector-size"))
            .as_deref(),
        Some("4096")
    );
    assert_eq!(host.stock_read(&format!("{be}/info")).as_deref(), Some("0"));
    let frontend = host.stock_ls(&fe);
    assert_eq!(
        frontend.get("ring-page-order").map(String::as_str),
        Some("2")
    );
    assert_eq!(
        frontend.get("multi-queue-num-queues").map(String::as_str),
        Some("2")
    );
    assert_eq!(
        frontend.get("protocol").map(String::as_str),
        Some("x86_64-abi")
    );
    assert_eq!(
        frontend.get("feature-persistent").map(String::as_str),
        Some("1")
    );
    for queue in 0..2 {
        for page in 0..4 {
            let key = format!("{fe}/queue-{queue}/ring-ref{page}");
            assert!(host.stock_read(&key).is_some(), "{key} missing");
        }
    }
    // Both sides closed after the run.
    host.wait_value(&format!("{be}/state"), "6");
    assert_eq!(
        host.stock_read(&format!("{fe}/state")).as_deref(),
        Some("6")
    );
    assert!(host.stock_read(&format!("{be}/error")).is_none());
    shim.assert_running();
    assert!(
        shim.log()
            .contains("connected: 2 queue(s), ring-page-order 2, x86_64-abi, persistent true"),
        "{}",
        shim.log()
    );

    // The toolstack removes the device: the serve closes the image, leaving no socket.
    let socket = host.serve_socket(&vbd);
    assert!(socket.exists());
    // kthread-pid names the serve (xcp-rrdd finds its stats files through it).
    let pids = processes_naming(&socket);
    assert_eq!(
        host.stock_read(&format!("{be}/kthread-pid")),
        Some(pids[0].to_string()),
        "{pids:?}"
    );
    toolstack::remove(&host.xs, &vbd);
    wait_serve_gone(&socket);
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&image),
    );
    assert_image_matches_model(&image, "qcow2", &model);
}

#[test]
fn two_devices_run_while_bad_frontends_fail_alone() {
    let host = Host::new();
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let good = Vbd::disk(
        1,
        XVDA,
        raw_image(disk.path(), "a.raw", 32).to_str().unwrap(),
    );
    // The second one a read-only CD-ROM: info says both (VDISK_CDROM | VDISK_READONLY) and
    // the guest only reads.
    let read_only = Vbd {
        mode: "r",
        device_type: "cdrom",
        ..Vbd::disk(
            2,
            XVDA,
            raw_image(disk.path(), "b.raw", 32).to_str().unwrap(),
        )
    };
    toolstack::add(&host.xs, &good);
    toolstack::add(&host.xs, &read_only);
    let mut shim = host.start_shim("shim.log");
    host.wait_value(&format!("{}/state", good.backend()), "2");
    host.wait_value(&format!("{}/state", read_only.backend()), "2");
    let writer = host.blkfront(&good, &["--seconds", "4", "--queues", "2"]);
    let reader = host.blkfront(&read_only, &["--seconds", "4"]);
    host.wait_value(&format!("{}/state", good.backend()), "4");
    host.wait_value(&format!("{}/state", read_only.backend()), "4");
    assert_eq!(
        host.stock_read(&format!("{}/info", read_only.backend()))
            .as_deref(),
        Some("5")
    );

    // Bad frontends, played with the stock xenstore-write; each fails alone.
    let order = (MAX_RING_PAGE_ORDER + 1).to_string();
    let long = "x".repeat(3000);
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("event-channel", "5")], "no ring-ref"),
        (
            vec![
                ("ring-page-order", &order),
                ("ring-ref0", "8"),
                ("event-channel", "5"),
            ],
            "above the maximum",
        ),
        (
            vec![
                ("protocol", "sparc64-abi"),
                ("ring-ref", "8"),
                ("event-channel", "5"),
            ],
            "unknown blkif protocol",
        ),
        (
            vec![("ring-ref", "8"), ("event-channel", "seven")],
            "bad event-channel",
        ),
        // A value as long as xenstore takes: the error still fits a node.
        (
            vec![("ring-ref", "8"), ("event-channel", &long)],
            "bad event-channel \"xxxx",
        ),
        // Well-formed, but the guest granted nothing: serve refuses to map the ring.
        (
            vec![("ring-ref", "8"), ("event-channel", "5")],
            "refused the rings",
        ),
    ];
    for (index, (keys, expected)) in cases.iter().enumerate() {
        let image = raw_image(disk.path(), &format!("bad{index}.raw"), 1);
        let bad = Vbd::disk(3 + index as u16, XVDA, image.to_str().unwrap());
        toolstack::add(&host.xs, &bad);
        host.wait_value(&format!("{}/state", bad.backend()), "2");
        host.stock_write(&bad.frontend(), keys);
        host.stock_write(&bad.frontend(), &[("state", "3")]);
        host.wait_value(&format!("{}/state", bad.backend()), "5");
        let error = host
            .stock_read(&format!("{}/error", bad.backend()))
            .unwrap_or_default();
        assert!(
            error.contains(expected),
            "case {index}: error {error:?}, expected {expected:?}"
        );
        // The good devices are still connected.
        assert_eq!(
            host.read(&format!("{}/state", good.backend())).as_deref(),
            Some("4")
        );
        assert_eq!(
            host.read(&format!("{}/state", read_only.backend()))
                .as_deref(),
            Some("4")
        );
    }
    let written = report(writer);
    assert!(written["writes"].as_u64().unwrap() > 0, "{written}");
    assert!(written["verified_bytes"].as_u64().unwrap() > 0, "{written}");
    let read = report(reader);
    assert_eq!(read["writes"], 0, "{read}");
    assert!(read["reads"].as_u64().unwrap() > 0, "{read}");
    shim.assert_running();
}

#[test]
fn guest_disconnects_and_reconnects() {
    let host = Host::new();
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let vbd = raw_vbd(disk.path(), 1, "a.raw");
    toolstack::add(&host.xs, &vbd);
    let mut shim = host.start_shim("shim.log");
    // Three connections: 1 -> 3 -> 4 -> 5 -> 6, then 1 again (a reboot), twice.
    let front = host.blkfront(
        &vbd,
        &["--reconnect", "2", "--ops", "300", "--ring-page-order", "1"],
    );
    let report = report(front);
    assert!(report["verified_bytes"].as_u64().unwrap() > 0, "{report}");
    host.wait_value(&format!("{}/state", vbd.backend()), "6");
    let log = shim.log();
    assert_eq!(log.matches(": connected: ").count(), 3, "{log}");
    assert_eq!(log.matches("back to InitWait").count(), 2, "{log}");
    shim.assert_running();
    // A guest that only writes Closing and Closed (no connection at all) is followed too.
    host.stock_write(&vbd.frontend(), &[("state", "1")]);
    host.wait_value(&format!("{}/state", vbd.backend()), "2");
    host.stock_write(&vbd.frontend(), &[("state", "6")]);
    host.wait_value(&format!("{}/state", vbd.backend()), "6");
    // A guest rebooted into a kernel with other settings: 2 queues on 4-page rings, then one
    // queue on a one-page ring. The second boot's frontend must not leave the first one's
    // multi-queue-num-queues or ring-page-order behind for the backend to read.
    for args in [
        ["--queues", "2", "--ring-page-order", "2"],
        ["--queues", "1", "--ring-page-order", "0"],
    ] {
        let mut all = vec!["--ops", "200"];
        all.extend(args);
        let rebooted = self::report(host.blkfront(&vbd, &all));
        assert!(
            rebooted["verified_bytes"].as_u64().unwrap() > 0,
            "{rebooted}"
        );
        host.wait_value(&format!("{}/state", vbd.backend()), "6");
    }
    let keys = host.stock_ls(&vbd.frontend());
    assert!(
        !keys
            .keys()
            .any(|k| k.contains("queue") || k.contains("ring-page-order")),
        "stale transport keys: {keys:?}"
    );
    assert!(keys.contains_key("ring-ref"), "{keys:?}");
    assert_eq!(shim.log().matches(": connected: ").count(), 5);
}

#[test]
fn hot_unplug_and_removal_close_the_serve_attach_mode_leaves_it() {
    let host = Host::new();
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    // Started by the shim, used, then online=0.
    let used = raw_vbd(disk.path(), 1, "a.raw");
    // Started by the shim, never connected, then its backend removed.
    let idle = raw_vbd(disk.path(), 2, "b.raw");
    // A serve the toolstack started: `params` names its control socket.
    let image = raw_image(disk.path(), "c.raw", 16);
    let own_serve = host.sim.serve("own", &image, &[]);
    let attached = Vbd::disk(3, XVDA, own_serve.control.to_str().unwrap());
    // Likewise through `physical-device-path`, `params` naming the image as XCP-ng's does.
    let image = raw_image(disk.path(), "d.raw", 16);
    let pdp_serve = host.sim.serve("pdp", &image, &[]);
    let by_pdp = Vbd::disk(4, XVDA, image.to_str().unwrap());
    for vbd in [&used, &idle, &attached, &by_pdp] {
        toolstack::add(&host.xs, vbd);
    }
    host.stock_write(
        &by_pdp.backend(),
        &[("physical-device-path", pdp_serve.control.to_str().unwrap())],
    );
    let mut shim = host.start_shim("shim.log");
    for vbd in [&used, &idle, &attached, &by_pdp] {
        host.wait_value(&format!("{}/state", vbd.backend()), "2");
    }
    report(host.blkfront(&used, &["--ops", "300"]));
    report(host.blkfront(&attached, &["--ops", "300"]));
    report(host.blkfront(&by_pdp, &["--ops", "300"]));
    let stats = pdp_serve.ctl(&serde_json::json!({"op": "stats"}));
    assert!(
        stats["totals"]["requests"].as_u64().unwrap_or(0) >= 300,
        "{stats}"
    );
    assert!(!host.serve_socket(&by_pdp).exists());

    toolstack::set_offline(&host.xs, &used);
    wait_serve_gone(&host.serve_socket(&used));
    host.wait_value(&format!("{}/state", used.backend()), "6");

    toolstack::remove(&host.xs, &idle);
    wait_serve_gone(&host.serve_socket(&idle));

    toolstack::set_offline(&host.xs, &attached);
    host.wait_value(&format!("{}/state", attached.backend()), "6");
    // Not the shim's to close: still serving, and not connected.
    let info = own_serve.ctl(&serde_json::json!({"op": "info"}));
    assert_eq!(info["ok"], true, "{info}");
    assert_eq!(info["connected"], false, "{info}");
    assert!(!host.serve_socket(&attached).exists());
    toolstack::set_offline(&host.xs, &by_pdp);
    host.wait_value(&format!("{}/state", by_pdp.backend()), "6");
    let info = pdp_serve.ctl(&serde_json::json!({"op": "info"}));
    assert_eq!(info["connected"], false, "{info}");
    shim.assert_running();
    own_serve.close();
    pdp_serve.close();
}

#[test]
fn a_restarted_shim_adopts_running_devices() {
    let host = Host::new();
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let vbds = [
        Vbd::disk(
            1,
            XVDA,
            raw_image(disk.path(), "a.raw", 32).to_str().unwrap(),
        ),
        Vbd::disk(
            2,
            XVDA,
            raw_image(disk.path(), "b.raw", 32).to_str().unwrap(),
        ),
    ];
    for vbd in &vbds {
        toolstack::add(&host.xs, vbd);
    }
    let mut first = host.start_shim("shim1.log");
    let fronts = [
        host.blkfront(&vbds[0], &["--seconds", "4", "--queues", "2"]),
        // The 32-bit layout through the shim too.
        host.blkfront(&vbds[1], &["--seconds", "4", "--protocol", "x86_32-abi"]),
    ];
    for vbd in &vbds {
        host.wait_value(&format!("{}/state", vbd.backend()), "4");
    }
    assert_eq!(
        host.stock_read(&format!("{}/protocol", vbds[1].frontend()))
            .as_deref(),
        Some("x86_32-abi")
    );
    std::thread::sleep(Duration::from_millis(500));
    first.kill();
    // The devices keep running with no shim at all for a while.
    std::thread::sleep(Duration::from_millis(500));
    let second = host.start_shim("shim2.log");
    wait_until("the new shim to adopt both devices", || {
        (second.log().matches("adopted, connected").count() == 2).then_some(())
    });
    for front in fronts {
        let report = report(front);
        assert!(report["verified_bytes"].as_u64().unwrap() > 0, "{report}");
    }
    // The new shim follows the guests' close, and unplugs.
    for vbd in &vbds {
        host.wait_value(&format!("{}/state", vbd.backend()), "6");
        toolstack::set_offline(&host.xs, vbd);
        wait_serve_gone(&host.serve_socket(vbd));
    }
}

#[test]
fn a_dying_serve_puts_its_device_in_closing_with_an_error() {
    let host = Host::new();
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let vbd = raw_vbd(disk.path(), 1, "a.raw");
    let other = raw_vbd(disk.path(), 2, "b.raw");
    toolstack::add(&host.xs, &vbd);
    toolstack::add(&host.xs, &other);
    // An image that cannot be opened: the spawn fails, with the error where a toolstack looks.
    let missing = Vbd::disk(3, XVDA, disk.path().join("missing.qcow2").to_str().unwrap());
    toolstack::add(&host.xs, &missing);
    let mut shim = host.start_shim("shim.log");
    host.wait_value(&format!("{}/state", vbd.backend()), "2");
    host.wait_value(&format!("{}/state", missing.backend()), "5");
    let error = host
        .stock_read(&format!("{}/error", missing.backend()))
        .unwrap();
    assert!(error.contains("missing.qcow2"), "{error}");

    let socket = host.serve_socket(&vbd);
    let pids = processes_naming(&socket);
    assert_eq!(pids.len(), 1, "{pids:?}");
    run_ok(Command::new("kill").args(["-9", &pids[0].to_string()]));
    host.wait_value(&format!("{}/state", vbd.backend()), "5");
    let error = host
        .stock_read(&format!("{}/error", vbd.backend()))
        .unwrap();
    assert!(error.contains("exited"), "{error}");
    assert!(UnixStream::connect(&socket).is_err());
    // The other device is untouched and works.
    assert_eq!(
        host.read(&format!("{}/state", other.backend())).as_deref(),
        Some("2")
    );
    report(host.blkfront(&other, &["--ops", "200"]));
    // The guest of the dead serve closes and starts over (a reboot): a fresh serve.
    host.stock_write(&vbd.frontend(), &[("state", "6")]);
    host.wait_value(&format!("{}/state", vbd.backend()), "6");
    let front = host.blkfront(&vbd, &["--ops", "200"]);
    report(front);
    assert_eq!(processes_naming(&socket).len(), 1);
    assert!(host
        .stock_read(&format!("{}/error", vbd.backend()))
        .is_none());
    shim.assert_running();
}

/// `ferrotap ctl --control SOCK ARGS...`, asserting success; its JSON reply.
fn ctl(socket: &Path, args: &[&str]) -> Value {
    let out = run_ok(
        ferrotap()
            .arg("ctl")
            .arg("--control")
            .arg(socket)
            .args(args),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn online_resize_reaches_xenstore_and_the_guest() {
    let host = Host::new();
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let vbd = raw_vbd(disk.path(), 1, "a.raw");
    toolstack::add(&host.xs, &vbd);
    let mut shim = host.start_shim("shim.log");
    let be = vbd.backend();
    let front = host.blkfront(&vbd, &["--seconds", "3"]);
    host.wait_value(&format!("{be}/state"), "4");
    assert_eq!(
        host.stock_read(&format!("{be}/sectors")).as_deref(),
        Some("32768")
    );
    let reply = ctl(&host.serve_socket(&vbd), &["resize", "32M"]);
    assert_eq!(reply["sectors"], 65536, "{reply}");
    host.wait_value(&format!("{be}/sectors"), "65536");
    assert_eq!(
        host.stock_read(&format!("{be}/state")).as_deref(),
        Some("4")
    );
    // The guest, woken by `state`, read the new size; its I/O went on.
    let report = report(front);
    assert_eq!(report["sectors"], 65536, "{report}");
    assert_eq!(report["resizes"], 1, "{report}");
    assert!(report["verified_bytes"].as_u64().unwrap() > 0, "{report}");
    assert!(
        shim.log().contains("resized to 65536 sectors"),
        "{}",
        shim.log()
    );
    shim.assert_running();
    assert_eq!(
        std::fs::metadata(disk.path().join("a.raw")).unwrap().len(),
        32 << 20
    );
}

#[test]
fn pause_and_unpause_onto_a_snapshot_during_io_through_the_shim() {
    let host = Host::new();
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let base = disk.path().join("base.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("32M"),
    );
    let vbd = Vbd::disk(1, XVDA, base.to_str().unwrap());
    toolstack::add(&host.xs, &vbd);
    let mut shim = host.start_shim("shim.log");
    let model = disk.path().join("model.raw");
    let front = host.blkfront(
        &vbd,
        &[
            "--seconds",
            "4",
            "--queues",
            "2",
            "--model-out",
            model.to_str().unwrap(),
        ],
    );
    host.wait_value(&format!("{}/state", vbd.backend()), "4");
    std::thread::sleep(Duration::from_millis(800));
    let socket = host.serve_socket(&vbd);
    ctl(&socket, &["pause"]);
    // Paused: the chain is closed, so a storage manager may take a snapshot.
    let snapshot = disk.path().join("snap.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&snapshot),
    );
    std::thread::sleep(Duration::from_millis(500));
    ctl(&socket, &["unpause", "--path", snapshot.to_str().unwrap()]);
    // The guest saw a delay, no error, and every write before and after the snapshot
    // reads back through the new chain.
    let report = report(front);
    assert!(report["verified_bytes"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(
        host.read(&format!("{}/state", vbd.backend())).as_deref(),
        Some("6")
    );
    // The shim followed both through serve's watch stream.
    let log = shim.log();
    assert!(
        log.contains("serve reports paused") && log.contains("serve reports unpaused"),
        "{log}"
    );
    shim.assert_running();
    toolstack::set_offline(&host.xs, &vbd);
    wait_serve_gone(&socket);
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&base),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&snapshot),
    );
    assert_image_matches_model(&snapshot, "qcow2", &model);
}
