//! The shim's side of one VBD's `ferrotap serve`: started by the shim, or one the toolstack
//! started (attached through its control socket), and the `watch` stream through which serve
//! reports resizes, failures and its own death.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use ferrotap::xensim::control::{BackendInfo, ControlClient};
use serde_json::{json, Value};

/// How long a spawned serve may take to listen, and a closing one to exit.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a serve may take to answer a request (a disconnect waits for the requests in
/// flight): past it the serve counts as hung and the request as failed.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Image formats `params` may name as a `format:` prefix (`aio` is blktap's raw).
const FORMATS: &[(&str, &str)] = &[
    ("raw", "raw"),
    ("aio", "raw"),
    ("vhd", "vhd"),
    ("qcow2", "qcow2"),
];

/// Whether `path` is a unix socket.
pub fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_socket())
}

/// `params` split into an optional format and the image path.
pub fn parse_params(params: &str) -> (Option<&'static str>, &str) {
    if let Some((prefix, rest)) = params.split_once(':') {
        if let Some(&(_, format)) = FORMATS.iter().find(|(name, _)| *name == prefix) {
            return (Some(format), rest);
        }
    }
    (None, params)
}

/// How to start a VBD's serve.
pub struct SpawnSpec<'a> {
    pub ferrotap: &'a Path,
    pub params: &'a str,
    pub read_only: bool,
    pub xensim: Option<&'a Path>,
    pub control: &'a Path,
    pub log: &'a Path,
    /// The registry `ferrotap ctl` reads ($FERROTAP_RUN_DIR).
    pub run_dir: &'a Path,
}

/// What a serve's watch stream reports to the shim's main loop.
#[derive(Debug)]
pub enum ServeEvent {
    Resized(u64),
    Failed(String),
    /// The serve is gone (its watch stream ended).
    Gone,
}

/// A VBD's serve.
pub struct ServeLink {
    control: PathBuf,
    client: ControlClient,
    /// The process, when this shim started it.
    child: Option<Child>,
    /// Closed on teardown: a serve the shim started (now or before a restart); the
    /// toolstack's own serves are only disconnected.
    owned: bool,
}

impl ServeLink {
    pub fn spawn(spec: &SpawnSpec) -> Result<ServeLink, String> {
        let (format, image) = parse_params(spec.params);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.log)
            .map_err(|err| format!("open {}: {err}", spec.log.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|err| format!("open {}: {err}", spec.log.display()))?;
        let _ = std::fs::remove_file(spec.control);
        let mut command = Command::new(spec.ferrotap);
        command
            .arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--control")
            .arg(spec.control)
            .env("FERROTAP_RUN_DIR", spec.run_dir);
        if let Some(format) = format {
            command.args(["--format", format]);
        }
        if spec.read_only {
            command.arg("--read-only");
        }
        if let Some(dir) = spec.xensim {
            command.arg("--xensim").arg(dir);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|err| format!("cannot run {}: {err}", spec.ferrotap.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "ferrotap serve --image {image} exited at start ({status}): {}",
                    log_tail(spec.log)
                ));
            }
            if let Ok(mut client) = ControlClient::connect(spec.control) {
                limit_replies(&mut client);
                return Ok(ServeLink {
                    control: spec.control.to_path_buf(),
                    client,
                    child: Some(child),
                    owned: true,
                });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "ferrotap serve never listened on {}",
                    spec.control.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Attach to the serve listening on `control`; `owned` when the shim started it.
    pub fn attach(control: &Path, owned: bool) -> Result<ServeLink, String> {
        let mut client = ControlClient::connect(control).map_err(|err| err.to_string())?;
        limit_replies(&mut client);
        Ok(ServeLink {
            control: control.to_path_buf(),
            client,
            child: None,
            owned,
        })
    }

    pub fn control(&self) -> &Path {
        &self.control
    }

    pub fn owned(&self) -> bool {
        self.owned
    }

    pub fn request(&mut self, request: &Value) -> Result<Value, String> {
        self.client.request(request).map_err(|err| err.to_string())
    }

    pub fn info(&mut self) -> Result<BackendInfo, String> {
        self.client.info().map_err(|err| err.to_string())
    }

    /// The serve's process id, as its `info` reports it.
    pub fn pid(&mut self) -> Option<u64> {
        self.request(&json!({"op": "info"}))
            .ok()?
            .get("pid")
            .and_then(Value::as_u64)
    }

    /// The exit status of a serve this shim started, once it is gone.
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status.to_string())
    }

    /// Let go of the rings (best effort: the serve may be gone).
    pub fn disconnect(&mut self) -> Result<(), String> {
        self.request(&json!({"op": "disconnect"})).map(drop)
    }

    /// Close a serve the shim owns and wait for it to go, leaving no socket behind; a
    /// toolstack's serve is only disconnected.
    pub fn close(mut self) {
        if !self.owned {
            let _ = self.disconnect();
            return;
        }
        let _ = self.request(&json!({"op": "close"}));
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        match self.child.take() {
            Some(mut child) => {
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                if let Ok(None) = child.try_wait() {
                    crate::warn!(
                        "ferrotap serve on {} ignored close; killing it",
                        self.control.display()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
            // Started by an earlier shim: not our child, so wait for its socket to go.
            None => {
                while Instant::now() < deadline && UnixStream::connect(&self.control).is_ok() {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = std::fs::remove_file(&self.control);
    }

    /// Follow the serve's `watch` stream on a thread of its own, sending what it reports
    /// as `(tag, event)`; the stream ending means the serve died.
    pub fn watch<T: Send + Copy + 'static>(
        &self,
        tag: T,
        events: Sender<(T, ServeEvent)>,
    ) -> Result<(), String> {
        let mut stream = UnixStream::connect(&self.control)
            .map_err(|err| format!("{}: {err}", self.control.display()))?;
        stream
            .write_all(b"{\"op\":\"watch\"}\n")
            .map_err(|err| format!("{}: {err}", self.control.display()))?;
        let control = self.control.clone();
        std::thread::Builder::new()
            .name("serve-watch".into())
            .spawn(move || follow(stream, &control, tag, &events))
            .map(drop)
            .map_err(|err| format!("spawn a watch thread: {err}"))
    }
}

fn limit_replies(client: &mut ControlClient) {
    if let Err(err) = client.set_timeout(Some(REPLY_TIMEOUT)) {
        crate::warn!("{err}; replies are awaited without a limit");
    }
}

fn follow<T: Copy>(stream: UnixStream, control: &Path, tag: T, events: &Sender<(T, ServeEvent)>) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let Ok(value) = serde_json::from_str::<Value>(&line) else {
            crate::warn!("{}: bad watch line {line:?}", control.display());
            continue;
        };
        if value.get("ok").and_then(Value::as_bool) == Some(false) {
            // A serve without `watch`: its death is seen when its process exits (if the
            // shim started it) or at the next request.
            crate::warn!(
                "{}: no watch stream: {}",
                control.display(),
                value.get("error").and_then(Value::as_str).unwrap_or("?")
            );
            return;
        }
        let event = match value.get("event").and_then(Value::as_str) {
            Some("resized") => match value.get("sectors").and_then(Value::as_u64) {
                Some(sectors) => ServeEvent::Resized(sectors),
                None => continue,
            },
            Some("failed") => ServeEvent::Failed(
                value
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no message")
                    .to_string(),
            ),
            Some(other) => {
                crate::info!("{}: serve reports {other}", control.display());
                continue;
            }
            None => continue,
        };
        if events.send((tag, event)).is_err() {
            return;
        }
    }
    let _ = events.send((tag, ServeEvent::Gone));
}

/// The end of a serve's log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_name_a_format_or_only_a_path() {
        assert_eq!(parse_params("/srv/a.qcow2"), (None, "/srv/a.qcow2"));
        assert_eq!(parse_params("vhd:/dev/VG/LV"), (Some("vhd"), "/dev/VG/LV"));
        assert_eq!(parse_params("aio:/srv/disk"), (Some("raw"), "/srv/disk"));
        // An unknown prefix is part of the path.
        assert_eq!(parse_params("odd:name"), (None, "odd:name"));
    }
}
