//! The frontend's client of `ferrotap serve`'s control socket (README.md, "ferrotap serve"): one
//! JSON object per line each way. With no xenstore handshake yet, this is how the simulated
//! blkfront learns the backend's features and hands over its rings.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

/// What the backend offers (the `features` of an `info` reply).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
pub struct Features {
    pub flush: bool,
    pub barrier: bool,
    pub discard: bool,
    pub discard_secure: bool,
    pub discard_granularity: u64,
    pub discard_alignment: u64,
    pub persistent: bool,
    pub max_indirect_segments: u32,
    pub max_ring_page_order: u32,
    pub max_queues: u32,
}

/// An `info` reply.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct BackendInfo {
    pub sectors: u64,
    pub sector_size: u32,
    #[serde(default)]
    pub physical_sector_size: u32,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub connected: bool,
    pub features: Features,
}

/// One queue of a `connect` request.
#[derive(Debug, Clone, Serialize)]
pub struct QueueTransport {
    pub ring_refs: Vec<u32>,
    pub event_channel: u32,
}

/// A `connect` request: what a frontend writes to xenstore on a real host.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectRequest {
    pub domid: u16,
    pub protocol: &'static str,
    pub ring_page_order: u32,
    pub queues: Vec<QueueTransport>,
    pub persistent: bool,
}

/// A connection to the control socket.
pub struct ControlClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<ControlClient> {
        let writer =
            UnixStream::connect(path).map_err(|err| Error::io("connect", err).with_path(path))?;
        let reader = writer
            .try_clone()
            .map_err(|err| Error::io("clone socket", err).with_path(path))?;
        Ok(ControlClient {
            path: path.to_path_buf(),
            reader: BufReader::new(reader),
            writer,
        })
    }

    /// Give up on a reply (or a send) after `timeout` (None: wait for ever, the default): a
    /// daemon talking to many serves must not hang on one that stopped answering.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<()> {
        // The reader is a clone of the same socket: the timeouts are the socket's.
        self.writer
            .set_read_timeout(timeout)
            .and_then(|()| self.writer.set_write_timeout(timeout))
            .map_err(|err| Error::io("set socket timeouts", err).with_path(&self.path))
    }

    /// Send one request line, read one reply line; an `"ok":false` reply is an error
    /// carrying the backend's message.
    pub fn request(&mut self, request: &Value) -> Result<Value> {
        let op = request.get("op").and_then(Value::as_str).unwrap_or("?");
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|err| Error::io(&format!("send {op}"), err).with_path(&self.path))?;
        let mut reply = String::new();
        let read = self
            .reader
            .read_line(&mut reply)
            .map_err(|err| Error::io(&format!("read {op} reply"), err).with_path(&self.path))?;
        if read == 0 {
            return Err(Error::invalid(format!(
                "{}: control socket closed before the {op} reply",
                self.path.display()
            )));
        }
        let reply: Value = serde_json::from_str(&reply).map_err(|err| {
            Error::invalid(format!(
                "{}: bad {op} reply {reply:?}: {err}",
                self.path.display()
            ))
        })?;
        if reply.get("ok").and_then(Value::as_bool) != Some(true) {
            let message = reply
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no message");
            return Err(Error::invalid(format!(
                "{}: {op} refused: {message}",
                self.path.display()
            )));
        }
        Ok(reply)
    }

    pub fn info(&mut self) -> Result<BackendInfo> {
        let reply = self.request(&serde_json::json!({"op": "info"}))?;
        serde_json::from_value(reply).map_err(|err| {
            Error::invalid(format!("{}: bad info reply: {err}", self.path.display()))
        })
    }

    pub fn connect_rings(&mut self, request: &ConnectRequest) -> Result<()> {
        let mut value = serde_json::to_value(request)
            .map_err(|err| Error::invalid(format!("encode connect: {err}")))?;
        if let Value::Object(map) = &mut value {
            map.insert("op".into(), Value::from("connect"));
        }
        self.request(&value).map(drop)
    }

    pub fn disconnect(&mut self) -> Result<()> {
        self.request(&serde_json::json!({"op": "disconnect"}))
            .map(drop)
    }
}
