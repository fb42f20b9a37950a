//! `ferrotap vbd attach|detach`, the helper for plain `xl` users, against the xensim
//! xenstored; what it wrote is read back with the stock `xenstore-ls` (XENSTORED_PATH).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ferrotap::xenstore::Client;

struct Xenstored {
    dir: tempfile::TempDir,
    child: Child,
}

impl Xenstored {
    fn start() -> Xenstored {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ferrotap"))
            .args(["xensim", "xenstored"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Client::connect(&dir.path().join("xenstored")).is_err() {
            assert!(Instant::now() < deadline, "xenstored did not start");
            thread::sleep(Duration::from_millis(20));
        }
        Xenstored { dir, child }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("xenstored")
    }

    fn ferrotap(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ferrotap"))
            .args(args)
            .arg("--xenstore")
            .arg(self.socket())
            .output()
            .unwrap()
    }

    /// `xenstore-ls -p PATH` from the stock tools: "key = "value" . . . (perms)" lines.
    fn stock_ls(&self, path: &str) -> String {
        let out = Command::new("xenstore-ls")
            .args(["-p", path])
            .env("XENSTORED_PATH", self.socket())
            .output()
            .expect("xenstore-ls (xenstore-utils) must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Xenstored {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value and permissions of `key` in `xenstore-ls -p` output.
fn entry<'a>(listing: &'a str, key: &str) -> Option<&'a str> {
    listing
        .lines()
        .find(|line| line.trim_start().starts_with(&format!("{key} = ")))
        .map(str::trim)
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "stdout {}\nstderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn attach_writes_the_toolstack_nodes_with_their_permissions() {
    let xs = Xenstored::start();
    let out = xs.ferrotap(&[
        "vbd",
        "attach",
        "--domid",
        "7",
        "--vdev",
        "xvdb",
        "--params",
        "/srv/disk.qcow2",
        "--read-only",
    ]);
    assert_ok(&out);
    let be = "/local/domain/0/backend/vbd3/7/51728";
    let fe = "/local/domain/7/device/vbd/51728";
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), be);

    let backend = xs.stock_ls(be);
    for (key, value) in [
        ("frontend", fe),
        ("frontend-id", "7"),
        ("online", "1"),
        ("state", "1"),
        ("dev", "xvdb"),
        ("type", "vbd3"),
        ("mode", "r"),
        ("device-type", "disk"),
        ("params", "/srv/disk.qcow2"),
    ] {
        let line = entry(&backend, key).unwrap_or_else(|| panic!("no {key} in\n{backend}"));
        assert!(line.contains(&format!("\"{value}\"")), "{line}");
        assert!(line.contains("(n0,r7)"), "backend perms: {line}");
    }
    let frontend = xs.stock_ls(fe);
    for (key, value) in [
        ("backend", be),
        ("backend-id", "0"),
        ("state", "1"),
        ("virtual-device", "51728"),
        ("device-type", "disk"),
    ] {
        let line = entry(&frontend, key).unwrap_or_else(|| panic!("no {key} in\n{frontend}"));
        assert!(line.contains(&format!("\"{value}\"")), "{line}");
        assert!(line.contains("(n7,r0)"), "frontend perms: {line}");
    }

    // A second attach of the same device is refused and changes nothing.
    let again = xs.ferrotap(&[
        "vbd", "attach", "--domid", "7", "--vdev", "xvdb", "--params", "/other",
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    assert!(entry(&xs.stock_ls(be), "params")
        .unwrap()
        .contains("/srv/disk.qcow2"));
}

/// A backend that answers Closing with Closed, as blkback-shim does once the frontend is
/// gone: detach waits for it, then removes both directories.
#[test]
fn detach_closes_the_backend_then_removes_the_nodes() {
    let xs = Xenstored::start();
    assert_ok(&xs.ferrotap(&[
        "vbd", "attach", "--domid", "3", "--vdev", "xvda", "--params", "/img",
    ]));
    let be = "/local/domain/0/backend/vbd3/3/51712";
    let socket = xs.socket();
    let backend = thread::spawn(move || {
        let client = Client::connect(&socket).unwrap();
        client.watch(&format!("{be}/state"), "be").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let state = client.read_opt(0, &format!("{be}/state")).unwrap();
            if state.as_deref() == Some("5") {
                let online = client.read(0, &format!("{be}/online")).unwrap();
                client.write(0, &format!("{be}/state"), "6").unwrap();
                return online;
            }
            client.next_event(Some(Duration::from_millis(100))).unwrap();
        }
        panic!("the backend never saw Closing");
    });
    let started = Instant::now();
    assert_ok(&xs.ferrotap(&[
        "vbd",
        "detach",
        "--domid",
        "3",
        "--vdev",
        "xvda",
        "--timeout",
        "10",
    ]));
    assert_eq!(
        backend.join().unwrap(),
        "0",
        "online must be 0 with Closing"
    );
    assert!(started.elapsed() < Duration::from_secs(9));
    let ls = Command::new("xenstore-ls")
        .arg("/local/domain")
        .env("XENSTORED_PATH", xs.socket())
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(!listing.contains("51712"), "nodes left behind:\n{listing}");
}

/// With no backend to answer, detach gives up after its timeout and still cleans up; a
/// frontend directory already gone with its domain is no error.
#[test]
fn detach_without_a_backend_times_out_and_cleans_up() {
    let xs = Xenstored::start();
    assert_ok(&xs.ferrotap(&[
        "vbd", "attach", "--domid", "4", "--vdev", "xvdc", "--params", "/img",
    ]));
    let client = Client::connect(&xs.socket()).unwrap();
    client.rm(0, "/local/domain/4").unwrap();
    let out = xs.ferrotap(&[
        "vbd",
        "detach",
        "--domid",
        "4",
        "--vdev",
        "xvdc",
        "--timeout",
        "0.3",
    ]);
    assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not reach Closed"));
    assert!(client
        .read_opt(0, "/local/domain/0/backend/vbd3/4/51744")
        .unwrap()
        .is_none());
    assert!(client
        .read_opt(0, "/local/domain/4/device/vbd/51744")
        .unwrap()
        .is_none());
}
