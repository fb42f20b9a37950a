//! A simulated Xen host for end-to-end tests: a short xensim directory under /dev/shm, a
//! `ferrotap serve` on an image, its control socket, and simulated blkfronts run as their
//! own processes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn ferrotap() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ferrotap"))
}

/// A xensim directory (short enough for sun_path) that lives as long as the value.
pub struct SimHost {
    pub dir: tempfile::TempDir,
}

impl SimHost {
    pub fn new() -> SimHost {
        let dir = tempfile::Builder::new()
            .prefix("xs")
            .tempdir_in("/dev/shm")
            .unwrap();
        SimHost { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Start `ferrotap serve --image IMAGE` with `extra` arguments; waits for its socket.
    pub fn serve(&self, name: &str, image: &Path, extra: &[&str]) -> Serve {
        let control = self.path().join(format!("{name}.ctl"));
        let child = ferrotap()
            .arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--xensim")
            .arg(self.path())
            .arg("--control")
            .arg(&control)
            .args(extra)
            // Keep the registry entry (ferrotap ctl) out of /run: a serve killed by a
            // failing test would leave it there.
            .env("FERROTAP_RUN_DIR", self.path())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut serve = Serve {
            child: Some(child),
            control,
        };
        serve.wait_ready();
        serve
    }

    /// Run the Rust simulated blkfront against `serve` with `extra` arguments; returns its
    /// output (the caller checks the status).
    pub fn blkfront(&self, serve: &Serve, extra: &[&str]) -> Output {
        ferrotap()
            .args(["xensim", "blkfront", "--json", "--dir"])
            .arg(self.path())
            .arg("--control")
            .arg(&serve.control)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// As [`Self::blkfront`], asserting success; returns its JSON report.
    pub fn blkfront_ok(&self, serve: &Serve, extra: &[&str]) -> Value {
        report_of(&self.blkfront(serve, extra))
    }
}

/// A running `ferrotap serve`; closed (and killed if need be) on drop.
pub struct Serve {
    pub child: Option<Child>,
    pub control: PathBuf,
}

impl Serve {
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if UnixStream::connect(&self.control).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("ferrotap serve exited early: {status}");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "ferrotap serve never listened on {}",
            self.control.display()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// One control request; returns the reply.
    pub fn ctl(&self, request: &Value) -> Value {
        let mut stream = UnixStream::connect(&self.control).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut line = request.to_string();
        line.push('\n');
        stream.write_all(line.as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("bad reply {reply:?}: {e}"))
    }

    /// Ask the server to close and wait for it to exit.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(mut stream) = UnixStream::connect(&self.control) {
            let _ = stream.write_all(b"{\"op\":\"close\"}\n");
            let mut reply = String::new();
            let _ = BufReader::new(stream).read_line(&mut reply);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("ferrotap serve did not exit after close");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            return;
        }
        self.shutdown();
    }
}

/// The JSON report of a simulated blkfront that must have succeeded (its last `{` line).
pub fn report_of(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "blkfront failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report in {stdout}"));
    serde_json::from_str(line).unwrap()
}
