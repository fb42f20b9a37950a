//! The guest side of xensim (../shared/xensim.md): a simulated blkfront, in its own process
//! (`ferrotap xensim blkfront`), for tests and as the ring benchmark's load generator.
//!
//! [`guest`] is the guest's memory, grant table and event channels; [`blkfront`] the device
//! (rings, slots, grants, requests); [`workload`] what it sends; [`control`] and
//! [`xenbus_front`] the two ways it reaches its backend: `ferrotap serve`'s control socket, or
//! the XenBus handshake through xenstore (with blkback-shim on the other side).

pub mod blkfront;
pub mod control;
pub mod guest;
pub mod workload;
pub mod xenbus_front;
pub mod xenstored;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::blkif::Protocol;
use crate::error::{Error, Result};
use blkfront::{Blkfront, FrontConfig};
use workload::{Outcome, Stop, WorkloadConfig, WorkloadKind};
use xenbus_front::XenbusFront;

#[derive(Debug, Subcommand)]
pub enum XensimCommand {
    /// A simulated blkfront: connects to `ferrotap serve` (its control socket, or the XenBus
    /// handshake with --xenstore), runs a workload, reports.
    Blkfront(BlkfrontArgs),
    /// The simulated host's xenstored, in the foreground: listens on DIR/xenstored.
    Xenstored(xenstored::XenstoredArgs),
}

#[derive(Debug, Args)]
pub struct BlkfrontArgs {
    /// The simulated host directory ($XENSIM_DIR).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// `ferrotap serve`'s control socket.
    #[arg(long, value_name = "SOCK", required_unless_present = "xenstore")]
    pub control: Option<PathBuf>,
    /// Connect through the XenBus handshake on the host's xenstored (DIR/xenstored) instead:
    /// the frontend of /local/domain/<domid>/device/vbd/<devid>, finding its backend through
    /// FE/backend (the toolstack wrote both).
    #[arg(long, conflicts_with = "control")]
    pub xenstore: bool,
    /// The virtual device (with --xenstore).
    #[arg(long, default_value_t = 51712, requires = "xenstore")]
    pub devid: u32,
    /// With --xenstore: after the run, close (5, 6), reinitialise (1, as after a guest
    /// reboot) and run again, N more times.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "xenstore")]
    pub reconnect: u32,
    /// With --xenstore: seconds to wait for each backend state change.
    #[arg(long, value_name = "S", default_value_t = 30.0, requires = "xenstore")]
    pub handshake_timeout: f64,
    /// The guest's domain id (>= 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub domid: u16,
    /// Queues (1..=4; fewer if the backend offers fewer).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4))]
    pub queues: u32,
    /// Ring pages = 2^ORDER (0..=4; lowered to the backend's maximum).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=4))]
    pub ring_page_order: u32,
    /// Request layout: x86_64-abi or x86_32-abi.
    #[arg(long, default_value = "x86_64-abi", value_parser = protocol_arg)]
    pub protocol: Protocol,
    /// Offer feature-persistent: data pages granted once for the whole run.
    #[arg(long)]
    pub persistent: bool,
    /// Segments per request with indirect descriptors (at most the backend's; <= 11: none).
    #[arg(long, default_value_t = 256)]
    pub indirect_segments: u32,
    #[arg(long, value_enum, default_value = "verify")]
    pub workload: WorkloadKind,
    /// Bytes per request of the benchmark workloads.
    #[arg(long, default_value_t = 4096)]
    pub block_size: u32,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub iodepth: u32,
    /// Stop after N requests over all queues (default 2000 unless --seconds).
    #[arg(long, value_name = "N", conflicts_with = "seconds")]
    pub ops: Option<u64>,
    /// Stop after S seconds.
    #[arg(long, value_name = "S")]
    pub seconds: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Use only the first N bytes of the disk (verify: default 1 GiB, at most 8 GiB).
    #[arg(long, value_name = "N")]
    pub region_bytes: Option<u64>,
    /// Send no discards (verify).
    #[arg(long)]
    pub no_discard: bool,
    /// Spin this many microseconds on the ring for responses before sleeping (the load
    /// generator's hybrid wait, like fio's polled completions; 0: sleep at once): with any
    /// number in flight when the host has a core for each frontend and each backend queue,
    /// else only for a lone request; with several in flight, not while its waits average over
    /// twice the window.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub poll_us: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// After verify: write what the model knows of the disk to FILE (a sparse raw file of
    /// the region) and the sector runs it covers to FILE with the extension .known (JSON
    /// [[sector, count], ...]).
    #[arg(long, value_name = "FILE")]
    pub model_out: Option<PathBuf>,
}

fn protocol_arg(value: &str) -> std::result::Result<Protocol, String> {
    Protocol::from_xenstore(Some(value)).map_err(|err| err.to_string())
}

/// Run one command; returns the process exit code.
pub fn run(command: &XensimCommand) -> i32 {
    match command {
        XensimCommand::Blkfront(args) => match run_blkfront(args) {
            Ok(()) => 0,
            Err(err) => {
                eprintln!("ferrotap xensim blkfront: {err}");
                1
            }
        },
        XensimCommand::Xenstored(args) => match xenstored::run(args) {
            Ok(()) => 0,
            Err(err) => {
                eprintln!("ferrotap xensim xenstored: {err}");
                1
            }
        },
    }
}

fn run_blkfront(args: &BlkfrontArgs) -> Result<()> {
    let stop = match (args.ops, args.seconds) {
        (Some(ops), _) => Stop::Ops(ops),
        (None, Some(seconds)) => Stop::Time(
            Duration::try_from_secs_f64(seconds)
                .map_err(|err| Error::invalid(format!("--seconds {seconds}: {err}")))?,
        ),
        (None, None) => Stop::Ops(2000),
    };
    let workload = WorkloadConfig {
        kind: args.workload,
        block_size: args.block_size,
        stop,
        seed: args.seed,
        region_bytes: args.region_bytes,
        discard: !args.no_discard,
    };
    if args.model_out.is_some() && args.workload != WorkloadKind::Verify {
        return Err(Error::invalid("--model-out needs --workload verify"));
    }
    let config = FrontConfig {
        domid: args.domid,
        queues: args.queues,
        ring_page_order: args.ring_page_order,
        protocol: args.protocol,
        persistent: args.persistent,
        indirect_segments: args.indirect_segments,
        iodepth: args.iodepth,
        slot_segments: workload.slot_segments(),
        poll: Duration::from_micros(args.poll_us),
        ..FrontConfig::new(args.dir.clone(), args.control.clone().unwrap_or_default())
    };
    let (outcome, size) = if args.xenstore {
        let (outcome, sectors, resizes) = run_over_xenstore(args, &config, &workload)?;
        (outcome, Some((sectors, resizes)))
    } else {
        let mut front = Blkfront::connect(&config)?;
        let outcome = workload::run(&mut front, &workload)?;
        front.disconnect()?;
        (outcome, None)
    };
    if let (Some(path), Some(model)) = (&args.model_out, &outcome.model) {
        model.dump(path)?;
    }
    let report = outcome.report;
    if args.json {
        let mut json = serde_json::to_value(report)
            .map_err(|err| Error::invalid(format!("encode report: {err}")))?;
        if let Some((sectors, resizes)) = size {
            // What the guest last saw of the disk's size (it changes on an online resize).
            json["sectors"] = sectors.into();
            json["resizes"] = resizes.into();
        }
        println!("{json}");
    } else {
        println!(
            "{} ops ({} reads, {} writes, {} flushes, {} discards) in {:.2} s: {:.0} IOPS, \
             {:.1} MiB/s, p50 {:.1} us, p99 {:.1} us; {} bytes verified",
            report.ops,
            report.reads,
            report.writes,
            report.flushes,
            report.discards,
            report.seconds,
            report.iops,
            report.mib_s,
            report.p50_us,
            report.p99_us,
            report.verified_bytes
        );
    }
    Ok(())
}

/// The XenBus way: handshake, run, close; then, `--reconnect` times, reinitialise and run
/// again. Returns the last run, and the disk's size in sectors and the resizes seen.
fn run_over_xenstore(
    args: &BlkfrontArgs,
    config: &FrontConfig,
    workload: &WorkloadConfig,
) -> Result<(Outcome, u64, u64)> {
    let socket = args.dir.join("xenstored");
    let client = Arc::new(
        crate::xenstore::Client::connect(&socket)
            .map_err(|err| Error::invalid(format!("xenstore at {}: {err}", socket.display())))?,
    );
    let timeout = Duration::try_from_secs_f64(args.handshake_timeout).map_err(|err| {
        Error::invalid(format!(
            "--handshake-timeout {}: {err}",
            args.handshake_timeout
        ))
    })?;
    let mut resizes = 0;
    let mut run = 0;
    loop {
        let mut link = XenbusFront::open(Arc::clone(&client), args.domid, args.devid, timeout)?;
        let offer = link.wait_for_offer()?;
        let (sectors, resized) = link.size_observer();
        let mut front = Blkfront::connect_through(config, offer, Box::new(link))?;
        let outcome = workload::run(&mut front, workload)?;
        front.disconnect()?;
        resizes += resized.load(Ordering::Acquire);
        if run == args.reconnect {
            return Ok((outcome, sectors.load(Ordering::Acquire), resizes));
        }
        run += 1;
        eprintln!(
            "ferrotap xensim blkfront: closed; reconnecting ({run} of {})",
            args.reconnect
        );
    }
}
