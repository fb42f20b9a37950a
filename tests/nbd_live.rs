//! The live NBD export of a running `ferrotap serve --nbd SOCK`: the standard clients
//! (nbdcopy, qemu-img, qemu-io, nbdinfo) read the disk a simulated guest is writing, see
//! what it wrote, cannot write, and are held (not failed) while the disk is paused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::host::{Serve, SimHost};
use common::run_ok;
use serde_json::json;
use tempfile::TempDir;

fn uri(socket: &Path) -> String {
    format!("nbd+unix:///?socket={}", socket.display())
}

fn qcow2(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let path = dir.join(name);
    run_ok(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        path.to_str().unwrap(),
        &format!("{mib}M"),
    ]));
    path
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "no NBD socket at {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A simulated host whose serve exports a new qcow2 (in /var/tmp: O_DIRECT) over NBD:
/// (host, the image's directory, image, NBD socket, serve), in the order they are made.
fn live_export(name: &str, mib: u64) -> (SimHost, TempDir, PathBuf, PathBuf, Serve) {
    let host = SimHost::new();
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = qcow2(disk.path(), name, mib);
    let socket = host.path().join("live.nbd");
    let serve = host.serve("vbd", &image, &["--nbd", socket.to_str().unwrap()]);
    wait_for_socket(&socket);
    (host, disk, image, socket, serve)
}

/// `qemu-img compare` of the export against an image file (opened with -U: serve has it
/// open read-write and takes no qemu lock, qemu-img must not wait for one).
fn compare(socket: &Path, image: &Path) -> Output {
    Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw"])
        .arg(uri(socket))
        .arg(image)
        .output()
        .expect("qemu-img must be installed")
}

#[test]
fn live_export_reads_what_the_guest_writes_and_refuses_writes() {
    let (host, disk, image, socket, serve) = live_export("vm.qcow2", 64);

    // The guest writes while nbdcopy reads the whole disk, more than once.
    let guest = common::host::ferrotap()
        .args(["xensim", "blkfront", "--json", "--dir"])
        .arg(host.path())
        .arg("--control")
        .arg(&serve.control)
        .args(["--workload", "verify", "--ops", "6000", "--queues", "2"])
        .args(["--region-bytes", &(48u64 << 20).to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut copies = 0;
    let copy = disk.path().join("copy.raw");
    let started = Instant::now();
    while copies < 2 || (copies < 10 && started.elapsed() < Duration::from_secs(2)) {
        run_ok(
            Command::new("nbdcopy")
                .arg(uri(&socket))
                .arg(&copy)
                .arg("--flush"),
        );
        copies += 1;
    }
    let out = guest.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "guest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), 64 << 20);

    // The guest is gone, serve still runs: the export is the disk as qemu reads the file.
    let same = compare(&socket, &image);
    assert!(
        same.status.success(),
        "export differs from the image: {}",
        common::output_text(&same)
    );
    // ...and that disk holds the guest's writes: it is not the empty disk.
    let empty = qcow2(disk.path(), "empty.qcow2", 64);
    assert_eq!(compare(&socket, &empty).status.code(), Some(1));
    // Block status shows data where the guest wrote.
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(uri(&socket)));
    let map = String::from_utf8_lossy(&map.stdout);
    assert!(map.lines().any(|l| l.contains("data")), "{map}");

    // A write through the live export is refused, and the disk is unchanged.
    let write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 4k"])
        .arg(uri(&socket))
        .output()
        .unwrap();
    let said = common::output_text(&write);
    assert!(
        !write.status.success()
            || said.contains("read-only")
            || said.contains("Operation not permitted"),
        "{said}"
    );
    assert!(compare(&socket, &image).status.success());
    serve.close();
    assert!(!socket.exists(), "serve left its NBD socket behind");
}

#[test]
fn live_export_waits_through_a_pause_and_follows_the_new_leaf() {
    let (host, disk, image, socket, serve) = live_export("old.qcow2", 32);
    host.blkfront_ok(&serve, &["--workload", "verify", "--ops", "1500"]);

    let paused = serve.ctl(&json!({"op": "pause"}));
    assert_eq!(paused["ok"], true, "{paused}");
    // A snapshot while paused: the new leaf on the old one.
    let leaf = disk.path().join("new.qcow2");
    run_ok(Command::new("qemu-img").args([
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        image.to_str().unwrap(),
        "-F",
        "qcow2",
        leaf.to_str().unwrap(),
    ]));
    // A client reading now is held until the disk comes back, then answered.
    let reader = {
        let socket = socket.clone();
        let leaf = leaf.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            (compare(&socket, &leaf), started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    assert!(!reader.is_finished(), "a read went through a paused disk");
    let unpaused = serve.ctl(&json!({"op": "unpause", "path": leaf}));
    assert_eq!(unpaused["ok"], true, "{unpaused}");
    let (same, waited) = reader.join().unwrap();
    assert!(
        same.status.success(),
        "export after unpause differs from the new leaf: {}",
        common::output_text(&same)
    );
    assert!(waited >= Duration::from_millis(700), "{waited:?}");
    // The guest writes on after the snapshot; the export follows the new leaf.
    host.blkfront_ok(
        &serve,
        &["--workload", "verify", "--ops", "1000", "--seed", "7"],
    );
    assert!(compare(&socket, &leaf).status.success());
    serve.close();
}
