//! `ferrotap ctl`: tap-ctl's verbs for `ferrotap serve` processes. A serve is named by its
//! control socket, its pid or its VBD (`DOMID/DEVID`), the latter two through the
//! [`registry`] every serve keeps itself in. Replies are printed as JSON; `list` prints a
//! table (or JSON with `--json`).

pub mod registry;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::img::size::parse_size;

#[derive(Debug, Args)]
pub struct CtlArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Which serve a command is for (one of them; `list` needs none).
#[derive(Debug, Args)]
pub struct Target {
    /// The serve's control socket.
    #[arg(long, global = true, value_name = "SOCK")]
    pub control: Option<PathBuf>,
    /// The serve's process id (found in the registry).
    #[arg(long, global = true, value_name = "PID")]
    pub pid: Option<u32>,
    /// The VBD the serve is connected for (found in the registry).
    #[arg(long, global = true, value_name = "DOMID/DEVID", value_parser = parse_vbd)]
    pub vbd: Option<(u16, u32)>,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// The running serves, from the registry ($FERROTAP_RUN_DIR, default /run/ferrotap).
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What the serve serves: image chain, size, features, frontend, state.
    Info,
    /// Counters and latency histograms, per queue and in total.
    Stats,
    /// Finish the requests in flight, take no new ones, close the image files.
    Pause,
    /// Reopen the chain (or a new leaf) and take requests again.
    Unpause {
        /// A new top image, e.g. a snapshot overlay whose backing file is the old one.
        #[arg(long)]
        path: Option<PathBuf>,
        /// Its format (probed when absent).
        #[arg(long)]
        format: Option<String>,
    },
    /// Grow the disk to SIZE bytes (qemu suffixes: 10G), or by +SIZE.
    Resize { size: String },
    /// Print the serve's events (one JSON line each) until it exits.
    Watch,
    /// Disconnect and stop the serve.
    Close,
}

fn parse_vbd(text: &str) -> std::result::Result<(u16, u32), String> {
    let (domid, devid) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected DOMID/DEVID"))?;
    let domid = domid
        .parse()
        .map_err(|e| format!("domain id {domid:?}: {e}"))?;
    let devid = devid
        .parse()
        .map_err(|e| format!("device id {devid:?}: {e}"))?;
    Ok((domid, devid))
}

/// The control socket `target` names.
fn resolve(target: &Target) -> Result<PathBuf> {
    match (&target.control, target.pid, target.vbd) {
        (Some(control), None, None) => Ok(control.clone()),
        (None, Some(pid), None) => registry::list()?
            .into_iter()
            .find(|e| e.pid == pid)
            .map(|e| e.control)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "no ferrotap serve with pid {pid} in {}",
                    registry::run_dir().display()
                ))
            }),
        (None, None, Some((domid, devid))) => {
            let mut found: Vec<_> = registry::list()?
                .into_iter()
                .filter(|e| e.domid == Some(domid) && e.devid == Some(devid))
                .collect();
            match found.len() {
                1 => Ok(found.remove(0).control),
                0 => Err(Error::invalid(format!(
                    "no ferrotap serve for VBD {domid}/{devid} in {}",
                    registry::run_dir().display()
                ))),
                n => Err(Error::invalid(format!(
                    "{n} ferrotap serves claim VBD {domid}/{devid}; name one by --pid"
                ))),
            }
        }
        _ => Err(Error::invalid(
            "name the serve by exactly one of --control SOCK, --pid PID, --vbd DOMID/DEVID",
        )),
    }
}

/// A connection to a serve's control socket.
struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &Path, timeout: Duration) -> Result<Client> {
        let writer =
            UnixStream::connect(path).map_err(|e| Error::io("connect", e).with_path(path))?;
        let reader = writer
            .try_clone()
            .map_err(|e| Error::io("clone socket", e).with_path(path))?;
        writer
            .set_read_timeout(Some(timeout))
            .map_err(|e| Error::io("set timeout", e).with_path(path))?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(reader),
            writer,
        })
    }

    fn send(&mut self, request: &Value) -> Result<()> {
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| Error::io("send request", e).with_path(&self.path))
    }

    /// The next line from the serve; `None` at end of stream.
    fn next(&mut self) -> Result<Option<Value>> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|e| Error::io("read reply", e).with_path(&self.path))?;
        if read == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line).map(Some).map_err(|e| {
            Error::invalid(format!("{}: bad reply {line:?}: {e}", self.path.display()))
        })
    }

    fn request(&mut self, request: &Value) -> Result<Value> {
        self.send(request)?;
        self.next()?.ok_or_else(|| {
            Error::invalid(format!(
                "{}: the serve closed the connection without a reply",
                self.path.display()
            ))
        })
    }
}

/// Long enough for a pause to drain a slow disk (the serve gives up after 60 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(90);

/// Run one command; returns the process exit code.
pub fn run(args: &CtlArgs) -> i32 {
    match run_command(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ferrotap ctl: {err}");
            1
        }
    }
}

fn print_json(value: &Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(_) => println!("{value}"),
    }
}

/// Print a reply; exit code 1 when the serve refused.
fn report(reply: &Value) -> i32 {
    if reply.get("ok").and_then(Value::as_bool) == Some(true) {
        print_json(reply);
        0
    } else {
        let message = reply
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("refused without a message");
        eprintln!("ferrotap ctl: {message}");
        1
    }
}

fn run_command(args: &CtlArgs) -> Result<i32> {
    if let CtlCommand::List { json } = &args.command {
        return list(*json);
    }
    let control = resolve(&args.target)?;
    let mut client = Client::connect(&control, REPLY_TIMEOUT)?;
    let request = match &args.command {
        CtlCommand::List { .. } => return Ok(0),
        CtlCommand::Info => json!({"op": "info"}),
        CtlCommand::Stats => json!({"op": "stats"}),
        CtlCommand::Pause => json!({"op": "pause"}),
        CtlCommand::Unpause { path, format } => {
            let mut request = json!({"op": "unpause"});
            if let Some(path) = path {
                // The serve may run elsewhere in the tree: hand it an absolute path.
                let path = std::path::absolute(path)
                    .map_err(|e| Error::io("resolve path", e).with_path(path))?;
                request["path"] = json!(path);
            }
            if let Some(format) = format {
                request["format"] = json!(format);
            }
            request
        }
        CtlCommand::Resize { size } => {
            let bytes = match size.strip_prefix('+') {
                Some(delta) => {
                    let info = client.request(&json!({"op": "info"}))?;
                    let sectors = info
                        .get("sectors")
                        .and_then(Value::as_u64)
                        .ok_or_else(|| Error::invalid("info reply without sectors"))?;
                    (sectors * 512)
                        .checked_add(parse_size(delta)?)
                        .ok_or_else(|| Error::invalid("new size too large"))?
                }
                None => parse_size(size)?,
            };
            json!({"op": "resize", "size": bytes})
        }
        CtlCommand::Watch => {
            client.writer.set_read_timeout(None).ok();
            let reply = client.request(&json!({"op": "watch"}))?;
            if report(&reply) != 0 {
                return Ok(1);
            }
            while let Some(event) = client.next()? {
                println!("{event}");
            }
            return Ok(0);
        }
        CtlCommand::Close => json!({"op": "close"}),
    };
    let reply = client.request(&request)?;
    Ok(report(&reply))
}

/// The registry's serves, each with its state asked of it (`"state": "?"` when it does
/// not answer).
fn list(as_json: bool) -> Result<i32> {
    let mut rows = Vec::new();
    for entry in registry::list()? {
        let info = Client::connect(&entry.control, Duration::from_secs(2))
            .and_then(|mut c| c.request(&json!({"op": "info"})))
            .ok();
        let state = match &info {
            None => "?",
            Some(info) if info["paused"] == json!(true) => "paused",
            Some(info) if info["connected"] == json!(true) => "connected",
            Some(_) => "idle",
        };
        let mut row = serde_json::to_value(&entry)
            .map_err(|e| Error::invalid(format!("encode entry: {e}")))?;
        row["state"] = json!(state);
        if let Some(sectors) = info.as_ref().and_then(|i| i.get("sectors")) {
            row["sectors"] = sectors.clone();
        }
        rows.push(row);
    }
    if as_json {
        print_json(&Value::Array(rows));
        return Ok(0);
    }
    println!(
        "{:>8} {:>6} {:>8} {:<9} {:>12}  {:<40} CONTROL",
        "PID", "DOMID", "DEVID", "STATE", "SECTORS", "IMAGE"
    );
    let text = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for row in &rows {
        println!(
            "{:>8} {:>6} {:>8} {:<9} {:>12}  {:<40} {}",
            text(&row["pid"]),
            text(&row["domid"]),
            text(&row["devid"]),
            text(&row["state"]),
            text(&row["sectors"]),
            text(&row["image"]),
            text(&row["control"]),
        );
    }
    Ok(0)
}
