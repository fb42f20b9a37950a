//! `ferrotap serve`: one process per VBD. Opens the image chain, listens on a control
//! socket and serves the frontend's rings once told to connect. The control protocol is
//! JSON lines (docs/ARCHITECTURE.md, "Control socket").

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::blkif::{Protocol, MAX_INDIRECT_SEGMENTS, MAX_SEGMENTS_PER_REQUEST};
use crate::datapath::{
    ConnectParams, Device, DeviceConfig, Features, QueueRing, DEFAULT_MAX_QUEUES,
    MAX_RING_PAGE_ORDER,
};
use crate::engine::{new_engine, EngineKind};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Format, Image, ImageOptions};
use crate::xen::linux::LinuxPlatform;
use crate::xen::sim::SimPlatform;
use crate::xen::Platform;

/// Which engine the queues use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    /// io_uring when the kernel has it (and allows it), else native AIO; native AIO for an
    /// image on tmpfs, where it is faster (see choose_engine).
    Auto,
    Uring,
    Aio,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The image (top of its chain).
    #[arg(long)]
    pub image: PathBuf,
    /// Format of the top image; probed when absent.
    #[arg(long)]
    pub format: Option<String>,
    /// Unix socket to listen on for control requests.
    #[arg(long)]
    pub control: PathBuf,
    /// Serve on the simulated Xen host in this directory (../shared/xensim.md) instead of
    /// /dev/xen/gntdev and /dev/xen/evtchn.
    #[arg(long)]
    pub xensim: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,
    /// Refuse writes (the `mode=r` of a VBD).
    #[arg(long)]
    pub read_only: bool,
    #[arg(long, default_value_t = DEFAULT_MAX_QUEUES)]
    pub max_queues: usize,
    #[arg(long, default_value_t = MAX_RING_PAGE_ORDER)]
    pub max_ring_page_order: u32,
    /// Do not offer feature-persistent: every data page goes through grant copy.
    #[arg(long)]
    pub no_persistent: bool,
    /// Do not offer indirect descriptors.
    #[arg(long)]
    pub no_indirect: bool,
    /// Do not offer discard.
    #[arg(long)]
    pub no_discard: bool,
    /// Use the host page cache instead of O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
    /// Spin this many microseconds for new work before sleeping (0: never spin).
    #[arg(long, default_value_t = 0)]
    pub poll_us: u64,
    /// KiB of grant-copy buffers per queue.
    #[arg(long, default_value_t = 4096)]
    pub pool_kib: usize,
    /// Register the buffers with io_uring (fixed buffers; pins them in memory).
    #[arg(long)]
    pub fixed_buffers: bool,
}

/// The engine for `image`. `auto` picks io_uring, except for an image on tmpfs: there
/// io_uring hands every O_DIRECT request to a kernel worker thread (tmpfs cannot start one
/// without blocking), while native AIO does it inline in the submit call, 1.5-2x faster in
/// bench/run.sh ring --options (4 KiB random reads at QD32: 1.28x fio against 0.63x). On
/// disks the two are within noise of each other.
fn choose_engine(choice: EngineChoice, image: &Image) -> Result<EngineKind> {
    Ok(match choice {
        EngineChoice::Uring => EngineKind::Uring,
        EngineChoice::Aio => EngineKind::Aio,
        EngineChoice::Auto => {
            if image.top().file().is_memory_backed()? {
                EngineKind::Aio
            } else {
                match new_engine(EngineKind::Uring, 8) {
                    Ok(_) => EngineKind::Uring,
                    Err(err) => {
                        eprintln!("ferrotap serve: io_uring unavailable ({err}); using native AIO");
                        EngineKind::Aio
                    }
                }
            }
        }
    })
}

fn open_image(args: &ServeArgs) -> Result<Image> {
    let format = args.format.as_deref().map(Format::parse).transpose()?;
    let options = ImageOptions {
        read_only: args.read_only,
        direct: !args.buffered,
        format,
        no_backing: false,
    };
    match Image::open(&args.image, options) {
        // Some filesystems refuse O_DIRECT: serve through the page cache there.
        Err(err) if options.direct && err.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!(
                "ferrotap serve: {} refuses O_DIRECT; using the page cache",
                args.image.display()
            );
            Image::open(
                &args.image,
                ImageOptions {
                    direct: false,
                    ..options
                },
            )
        }
        other => other,
    }
}

/// Build the device `args` describe.
pub fn device_from_args(args: &ServeArgs) -> Result<Device> {
    let image = open_image(args)?;
    let read_only = image.read_only();
    let platform: Arc<dyn Platform> = match &args.xensim {
        Some(dir) => Arc::new(SimPlatform::new(dir.clone())),
        None => Arc::new(LinuxPlatform),
    };
    let features = Features {
        flush: true,
        barrier: true,
        discard: !args.no_discard && !read_only,
        discard_secure: false,
        discard_granularity: image.top().cluster_size().max(4096),
        discard_alignment: 0,
        persistent: !args.no_persistent,
        max_indirect_segments: if args.no_indirect {
            0
        } else {
            MAX_INDIRECT_SEGMENTS
        },
        max_ring_page_order: args.max_ring_page_order.min(MAX_RING_PAGE_ORDER),
        max_queues: args.max_queues.clamp(1, 16),
    };
    let config = DeviceConfig {
        features,
        engine: choose_engine(args.engine, &image)?,
        poll_window: Duration::from_micros(args.poll_us),
        pool_bytes: args.pool_kib * 1024,
        register_buffers: args.fixed_buffers,
    };
    Ok(Device::new(image, config, platform))
}

/// Run `ferrotap serve` until a `close` request.
pub fn run(args: &ServeArgs) -> Result<()> {
    let device = Arc::new(Mutex::new(device_from_args(args)?));
    // A socket file left by a dead server would make bind fail.
    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control)
        .map_err(|e| Error::io("bind control socket", e).with_path(&args.control))?;
    let (sectors, engine) = {
        let device = device.lock();
        (device.sectors(), device.config().engine)
    };
    eprintln!(
        "ferrotap serve: {} ({sectors} sectors, engine {engine:?}) on {}",
        args.image.display(),
        args.control.display()
    );
    let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let device = Arc::clone(&device);
        let closing_flag = Arc::clone(&closing);
        let control = args.control.clone();
        let spawned = std::thread::Builder::new()
            .name("ferrotap-ctl".into())
            .spawn(move || {
                if serve_connection(stream, &device) {
                    closing_flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    // Wake the accept loop so it sees the flag.
                    let _ = UnixStream::connect(&control);
                }
            });
        if spawned.is_err() {
            eprintln!("ferrotap serve: cannot spawn a control thread");
        }
        if closing.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
    }
    device.lock().disconnect()?;
    let _ = std::fs::remove_file(&args.control);
    Ok(())
}

/// Answer requests on one control connection; true when one of them was `close`.
fn serve_connection(stream: UnixStream, device: &Mutex<Device>) -> bool {
    let Ok(mut writer) = stream.try_clone() else {
        return false;
    };
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let Ok(line) = line else { return false };
        if line.trim().is_empty() {
            continue;
        }
        let (reply, close) = match serde_json::from_str::<Value>(&line) {
            Ok(request) => handle(&request, device),
            Err(err) => (failure(&format!("bad request: {err}")), false),
        };
        let mut text = reply.to_string();
        text.push('\n');
        if writer.write_all(text.as_bytes()).is_err() {
            return close;
        }
        if close {
            return true;
        }
    }
    false
}

fn failure(message: &str) -> Value {
    json!({"ok": false, "error": message})
}

#[derive(Debug, Deserialize)]
struct ConnectRequest {
    domid: u16,
    protocol: Option<String>,
    #[serde(default)]
    ring_page_order: u32,
    queues: Vec<QueueRequest>,
    #[serde(default)]
    persistent: bool,
}

#[derive(Debug, Deserialize)]
struct QueueRequest {
    ring_refs: Vec<u32>,
    event_channel: u32,
}

fn connect_params(request: &Value) -> Result<ConnectParams> {
    let connect: ConnectRequest = serde_json::from_value(request.clone())
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("bad connect: {e}")))?;
    Ok(ConnectParams {
        domid: connect.domid,
        protocol: Protocol::from_xenstore(connect.protocol.as_deref())?,
        ring_page_order: connect.ring_page_order,
        queues: connect
            .queues
            .into_iter()
            .map(|q| QueueRing {
                ring_refs: q.ring_refs,
                event_channel: q.event_channel,
            })
            .collect(),
        persistent: connect.persistent,
    })
}

/// One request; the reply and whether the server should close.
fn handle(request: &Value, device: &Mutex<Device>) -> (Value, bool) {
    let op = request.get("op").and_then(Value::as_str).unwrap_or("");
    let mut device = device.lock();
    match op {
        "info" => (info(&device), false),
        "connect" => {
            let result = connect_params(request).and_then(|params| device.connect(params));
            match result {
                Ok(()) => (json!({"ok": true}), false),
                Err(err) => (failure(&err.to_string()), false),
            }
        }
        "disconnect" => match device.disconnect() {
            Ok(()) => (json!({"ok": true}), false),
            Err(err) => (failure(&err.to_string()), false),
        },
        "stats" => (
            json!({
                "ok": true,
                "connected": device.is_connected(),
                "queues": device.stats(),
            }),
            false,
        ),
        "close" => match device.disconnect() {
            Ok(()) => (json!({"ok": true}), true),
            Err(err) => (failure(&err.to_string()), true),
        },
        other => (failure(&format!("unknown op {other:?}")), false),
    }
}

fn info(device: &Device) -> Value {
    let image = device.image();
    let mut reply = json!({
        "ok": true,
        "image": image.top().file().path(),
        "format": image.top().format().name(),
        "sectors": device.sectors(),
        "sector_size": 512,
        "physical_sector_size": 4096,
        "read_only": image.read_only(),
        "connected": device.is_connected(),
        "engine": format!("{:?}", device.config().engine).to_lowercase(),
        "features": device.config().features,
        "max_segments_per_request": MAX_SEGMENTS_PER_REQUEST,
    });
    if let Some(params) = device.connected_params() {
        reply["frontend"] = json!({
            "domid": params.domid,
            "protocol": params.protocol.name(),
            "ring_page_order": params.ring_page_order,
            "queues": params.queues.len(),
            "persistent": params.persistent,
        });
    }
    if let Some(failure) = device.failure() {
        reply["error"] = json!(failure);
    }
    reply
}
