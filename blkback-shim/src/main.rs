//! ferrotap-shim: takes tapback's place for `vbd3` backends. It watches
//! /local/domain/0/backend/vbd3/, runs the backend half of the XenBus handshake per device
//! (../shared/xensim.md section 5, Linux blkback's state machine) and hands the frontend's
//! rings to the device's `ferrotap serve`, which it starts from `params` or attaches to.
//! README.md, "blkback-shim", lists the keys it reads and writes.

#![deny(clippy::unwrap_used)]

mod log;
mod serve_link;
mod vbd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferrotap::xenstore::Client;

#[derive(Debug, Parser)]
#[command(
    name = "ferrotap-shim",
    version,
    about = "The vbd3 XenBus backend: hands each VBD's rings to its ferrotap serve"
)]
pub struct Args {
    /// The xenstored socket (default: $XENSTORED_PATH, /run/xenstored/socket, then
    /// /dev/xen/xenbus; DIR/xenstored with --xensim).
    #[arg(long, value_name = "PATH")]
    pub xenstore: Option<PathBuf>,
    /// A simulated host (../shared/xensim.md): its xenstored, and serves started with
    /// --xensim DIR.
    #[arg(long, value_name = "DIR")]
    pub xensim: Option<PathBuf>,
    /// The ferrotap binary to start serves with (default: the one beside this program, else
    /// `ferrotap` on PATH).
    #[arg(long, value_name = "BIN")]
    pub ferrotap: Option<PathBuf>,
    /// Where the serves it starts listen (vbd3-<domid>-<devid>.sock), log
    /// (vbd3-<domid>-<devid>.log) and register themselves for `ferrotap ctl`; a restarted
    /// shim finds them there.
    #[arg(
        long,
        value_name = "DIR",
        env = "FERROTAP_RUN_DIR",
        default_value = "/run/ferrotap"
    )]
    pub run_dir: PathBuf,
}

fn ferrotap_binary(args: &Args) -> PathBuf {
    if let Some(path) = &args.ferrotap {
        return path.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("ferrotap")))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("ferrotap"))
}

fn connect(args: &Args) -> Result<Client, String> {
    let socket = args
        .xenstore
        .clone()
        .or_else(|| args.xensim.as_ref().map(|dir| dir.join("xenstored")));
    match &socket {
        Some(path) => {
            Client::connect(path).map_err(|err| format!("xenstore at {}: {err}", path.display()))
        }
        None => Client::open_default().map_err(|err| format!("xenstore: {err}")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(err) = std::fs::create_dir_all(&args.run_dir) {
        error!("cannot create {}: {err}", args.run_dir.display());
        return ExitCode::FAILURE;
    }
    let client = match connect(&args) {
        Ok(client) => client,
        Err(err) => {
            error!("{err}");
            return ExitCode::FAILURE;
        }
    };
    let ferrotap = ferrotap_binary(&args);
    let mut shim = vbd::Shim::new(client, args, ferrotap);
    match shim.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err}");
            ExitCode::FAILURE
        }
    }
}
