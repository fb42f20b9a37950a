//! The `ferrotap` command: `img` (qemu-img's verbs on ferrotap's image layer), `serve` (one
//! VBD's datapath), `ctl` (tap-ctl's verbs for serves), `xensim` and `demo`.

#![deny(clippy::unwrap_used)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ferrotap::ctl::{self, CtlArgs};
use ferrotap::demo::{self, DemoArgs};
use ferrotap::img::{self, ImgCommand};
use ferrotap::nbd::{self, NbdArgs};
use ferrotap::serve::{self, ServeArgs};
use ferrotap::toolstack::{self, VbdCommand};
use ferrotap::xensim::{self, XensimCommand};

#[derive(Debug, Parser)]
#[command(
    name = "ferrotap",
    version,
    about = "A blkif datapath for Xen dom0: tapdisk's replacement"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Image tools with qemu-img's conventions (create, info, check, map, convert, ...).
    Img {
        #[command(subcommand)]
        command: ImgCommand,
    },
    /// Serve one VBD: open the image chain, listen on a control socket, serve the rings.
    Serve(ServeArgs),
    /// Export an image chain over NBD (unix socket, TCP or an inherited socket fd).
    Nbd(NbdArgs),
    /// Control running serves (tap-ctl's verbs): list, info, stats, pause, unpause, resize,
    /// watch, close.
    Ctl(CtlArgs),
    /// Run a self-contained tour of the image layer in a temporary directory.
    Demo(DemoArgs),
    /// Give a guest a vbd3 disk by hand (the toolstack's xenstore writes), or take it away.
    Vbd {
        #[command(subcommand)]
        command: VbdCommand,
    },
    /// Simulated Xen guests on a xensim host (tests and the ring benchmark).
    Xensim {
        #[command(subcommand)]
        command: XensimCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Img { command } => img::run(command),
        Command::Xensim { command } => xensim::run(command),
        Command::Ctl(args) => ctl::run(args),
        Command::Serve(args) => match serve::run(args) {
            Ok(()) => 0,
            Err(err) => {
                img::report_error(&err);
                1
            }
        },
        Command::Vbd { command } => match toolstack::run(command) {
            Ok(()) => 0,
            Err(err) => {
                img::report_error(&err);
                1
            }
        },
        Command::Nbd(args) => match nbd::run(args) {
            Ok(()) => 0,
            Err(err) => {
                img::report_error(&err);
                1
            }
        },
        Command::Demo(args) => match demo::run(args) {
            Ok(()) => 0,
            Err(err) => {
                img::report_error(&err);
                1
            }
        },
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
