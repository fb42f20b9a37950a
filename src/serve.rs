//! `ferrotap serve`: one process per VBD. Opens the image chain, listens on a control
//! socket and serves the frontend's rings once told to connect. The control protocol is
//! JSON lines (docs/ARCHITECTURE.md, "Control socket"): info, connect, disconnect, stats,
//! pause, unpause, resize, watch, close. While running it is listed in the registry
//! (`ctl::registry`) and, while connected to a known VBD, keeps its stats files
//! (`datapath::statsfile`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::blkif::{Protocol, MAX_INDIRECT_SEGMENTS, MAX_SEGMENTS_PER_REQUEST, SECTOR_SIZE};
use crate::ctl::registry;
use crate::datapath::statsfile::{self, StatsFiles};
use crate::datapath::{
    ConnectParams, Device, DeviceConfig, Features, QueueRing, QueueStatsSnapshot,
    DEFAULT_MAX_QUEUES, DEFAULT_POLL_US, MAX_RING_PAGE_ORDER,
};
use crate::engine::{new_engine, EngineKind};
use crate::error::{Error, ErrorKind, Result};
use crate::image::chain::BlockStatus;
use crate::image::{Format, Image, ImageOptions};
use crate::listener;
use crate::nbd::{self, Export};
use crate::sys;
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
    /// Spin this many microseconds for new work before sleeping (0: never spin): each
    /// queue thread watches its ring and completions from memory, yielding the core to
    /// anything else runnable, and sleeps once the window passes with nothing to do, or
    /// at once while several operations are in flight to a device (a lone one, a guest at
    /// QD1, is waited for spinning).
    #[arg(long, default_value_t = DEFAULT_POLL_US)]
    pub poll_us: u64,
    /// KiB of grant-copy buffers per queue.
    #[arg(long, default_value_t = 4096)]
    pub pool_kib: usize,
    /// Register the buffers with io_uring (fixed buffers; pins them in memory).
    #[arg(long)]
    pub fixed_buffers: bool,
    /// Export the disk, live and read-only, over NBD on this unix socket: reads go through
    /// the image the guest writes to, so they see every write the guest has completed.
    #[arg(long, value_name = "SOCK")]
    pub nbd: Option<PathBuf>,
    /// The VBD's device id, for the stats files and the registry when `connect` names none.
    #[arg(long)]
    pub devid: Option<u32>,
    /// Run each queue's threads on these CPUs: one entry per queue, comma-separated, each a
    /// CPU (`2`) or a range (`4-7`); queue i takes entry i modulo their number. Default:
    /// wherever the scheduler puts them.
    #[arg(long, value_name = "LIST", value_parser = parse_queue_cpus)]
    pub queue_cpus: Option<QueueCpus>,
}

/// `--queue-cpus`: the CPUs of each queue, by queue index modulo the length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueCpus(pub Vec<Vec<usize>>);

fn parse_queue_cpus(text: &str) -> std::result::Result<QueueCpus, String> {
    let limit = libc::CPU_SETSIZE as usize;
    let parse_cpu = |cpu: &str| -> std::result::Result<usize, String> {
        let cpu = cpu
            .trim()
            .parse::<usize>()
            .map_err(|_| format!("{cpu:?} is not a CPU number"))?;
        if cpu >= limit {
            return Err(format!("CPU {cpu} is past the kernel's CPU set ({limit})"));
        }
        Ok(cpu)
    };
    let lists = text
        .split(',')
        .map(|entry| match entry.split_once('-') {
            None => Ok(vec![parse_cpu(entry)?]),
            Some((first, last)) => {
                let (first, last) = (parse_cpu(first)?, parse_cpu(last)?);
                if first > last {
                    return Err(format!("{entry:?}: the range runs backwards"));
                }
                Ok((first..=last).collect())
            }
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(QueueCpus(lists))
}

/// `--queue-cpus` checked against the CPUs this process may run on (a cgroup or taskset
/// may allow fewer than the machine has): a CPU outside them fails here, not at connect.
fn queue_cpus(requested: Option<&QueueCpus>) -> Result<Vec<Vec<usize>>> {
    let Some(QueueCpus(lists)) = requested else {
        return Ok(Vec::new());
    };
    let allowed =
        sys::allowed_cpus().map_err(|err| Error::io("reading the CPUs serve may run on", err))?;
    if let Some(cpu) = lists.iter().flatten().find(|cpu| !allowed.contains(cpu)) {
        let allowed: Vec<String> = allowed.iter().map(ToString::to_string).collect();
        return Err(Error::invalid(format!(
            "--queue-cpus: CPU {cpu} is not one serve may run on (it may run on {})",
            allowed.join(",")
        )));
    }
    Ok(lists.clone())
}

/// The engine for `image`. `auto` picks io_uring, except for an image on tmpfs: there
/// io_uring hands every O_DIRECT request to a kernel worker thread (tmpfs cannot start one
/// without blocking), while native AIO does it inline in the submit call, 1.5-2x faster in
/// bench/run.sh ring --options (4 KiB random reads at QD32: 1.28x fio against 0.63x); the
/// AIO engine now skips even the submit call there (`Engine::set_memory_files`). On disks
/// the two are within noise of each other.
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

/// How a chain is (re)opened: the serve options that bear on it.
#[derive(Debug, Clone, Copy)]
struct OpenOptions {
    read_only: bool,
    buffered: bool,
}

fn open_image(path: &Path, format: Option<Format>, open: OpenOptions) -> Result<Image> {
    let options = ImageOptions {
        read_only: open.read_only,
        direct: !open.buffered,
        format,
        no_backing: false,
    };
    match Image::open(path, options) {
        // Some filesystems refuse O_DIRECT: serve through the page cache there.
        Err(err) if options.direct && err.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!(
                "ferrotap serve: {} refuses O_DIRECT; using the page cache",
                path.display()
            );
            Image::open(
                path,
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
    let format = args.format.as_deref().map(Format::parse).transpose()?;
    let open = OpenOptions {
        read_only: args.read_only,
        buffered: args.buffered,
    };
    let image = open_image(&args.image, format, open)?;
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
        queue_cpus: queue_cpus(args.queue_cpus.as_ref())?,
    };
    Ok(Device::new(image, config, platform))
}

/// The watch connections; events go to each as one JSON line.
#[derive(Default)]
struct Watchers {
    streams: Mutex<Vec<(u64, UnixStream)>>,
    next_id: AtomicU64,
}

impl Watchers {
    fn add(&self, stream: UnixStream) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // A watcher that stops reading must not stall the server.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        self.streams.lock().push((id, stream));
        id
    }

    fn remove(&self, id: u64) {
        self.streams.lock().retain(|(other, _)| *other != id);
    }

    /// Send `event` to every watcher; those that cannot take it are dropped.
    fn send(&self, event: &Value) {
        let line = json_line(event);
        self.streams
            .lock()
            .retain_mut(|(_, stream)| stream.write_all(line.as_bytes()).is_ok());
    }
}

/// One VBD as the control plane sees it: the device and what names it.
struct Vbd {
    device: Device,
    /// The top of the chain served (the last one while paused), and the format it was
    /// opened with (`None`: probed).
    image_path: PathBuf,
    format: Option<Format>,
    open: OpenOptions,
    control: PathBuf,
    pid: u32,
    /// From `connect` (or `serve --devid`).
    domid: Option<u16>,
    devid: Option<u32>,
    backend: Option<String>,
    default_devid: Option<u32>,
    stats_files: Option<StatsFiles>,
    /// The registry entry could be written (so it is kept current and removed at exit).
    registered: bool,
}

impl Vbd {
    fn registry_entry(&self) -> registry::Entry {
        registry::Entry {
            pid: self.pid,
            control: self.control.clone(),
            image: self.image_path.clone(),
            domid: self.domid,
            devid: self.devid,
            backend: self.backend.clone(),
        }
    }

    fn update_registry(&mut self) {
        match registry::write(&self.registry_entry()) {
            Ok(_) => self.registered = true,
            Err(err) if !self.registered => {
                eprintln!("ferrotap serve: not listed for ferrotap ctl: {err}");
            }
            Err(err) => eprintln!("ferrotap serve: registry: {err}"),
        }
    }
}

/// What a control request asks of its connection.
enum Reply {
    Line(Value),
    /// Reply, then exit the server.
    Close(Value),
    /// Reply, then send events until the peer goes.
    Watch(Value),
}

/// Run `ferrotap serve` until a `close` request.
pub fn run(args: &ServeArgs) -> Result<()> {
    // A process-wide allocator setting, made once before any queue or worker thread.
    crate::datapath::return_large_blocks_when_freed();
    let mut device = device_from_args(args)?;
    let watchers = Arc::new(Watchers::default());
    let hook_watchers = Arc::clone(&watchers);
    device.set_failure_hook(Arc::new(move |message: &str| {
        hook_watchers.send(&json!({"event": "failed", "error": message}));
    }));
    let (sectors, engine) = (device.sectors(), device.config().engine);
    let format = args.format.as_deref().map(Format::parse).transpose()?;
    let mut vbd = Vbd {
        device,
        image_path: args.image.clone(),
        format,
        open: OpenOptions {
            read_only: args.read_only,
            buffered: args.buffered,
        },
        control: args.control.clone(),
        pid: std::process::id(),
        domid: None,
        devid: args.devid,
        backend: None,
        default_devid: args.devid,
        stats_files: None,
        registered: false,
    };
    let listener = listener::bind_listening(&args.control)
        .map_err(|e| Error::io("bind control socket", e).with_path(&args.control))?;
    vbd.update_registry();
    close_on_signals(args.control.clone())?;
    eprintln!(
        "ferrotap serve: {} ({sectors} sectors, engine {engine:?}) on {}",
        args.image.display(),
        args.control.display()
    );
    let vbd = Arc::new(Mutex::new(vbd));
    if let Some(path) = &args.nbd {
        let description = format!("ferrotap serve (live): {}", args.image.display());
        let live = Arc::new(LiveExport {
            vbd: Arc::clone(&vbd),
        });
        let export = Arc::new(Export::new("", &description, live, true));
        nbd::spawn_unix_listener(path, export, LIVE_EXPORT_CONNECTIONS)?;
        eprintln!(
            "ferrotap serve: live NBD export on nbd+unix:///?socket={}",
            path.display()
        );
    }
    let closing = Arc::new(AtomicBool::new(false));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let vbd = Arc::clone(&vbd);
        let watchers = Arc::clone(&watchers);
        let closing_flag = Arc::clone(&closing);
        let control = args.control.clone();
        let spawned = std::thread::Builder::new()
            .name("ferrotap-ctl".into())
            .spawn(move || {
                if serve_connection(stream, &vbd, &watchers) {
                    closing_flag.store(true, Ordering::SeqCst);
                    // Wake the accept loop so it sees the flag.
                    let _ = UnixStream::connect(&control);
                }
            });
        if spawned.is_err() {
            eprintln!("ferrotap serve: cannot spawn a control thread");
        }
        if closing.load(Ordering::SeqCst) {
            break;
        }
    }
    let mut vbd = vbd.lock();
    let result = disconnect(&mut vbd, &watchers);
    if vbd.registered {
        registry::remove(vbd.pid);
    }
    let _ = std::fs::remove_file(&args.control);
    if let Some(path) = &args.nbd {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Connections the live export serves at once (backup and mirroring clients).
const LIVE_EXPORT_CONNECTIONS: usize = 16;
/// How long a live-export request waits for a paused device to be unpaused.
const LIVE_EXPORT_PAUSE_WAIT: Duration = Duration::from_secs(120);

/// The live NBD export of this serve's disk, read-only: a second writer behind the guest's
/// back would change its disk under its filesystem. Each request takes the device's current
/// image (the one the guest's writes go to, also after an unpause onto a new leaf), and
/// waits while the device is paused (its image closed).
struct LiveExport {
    vbd: Arc<Mutex<Vbd>>,
}

impl LiveExport {
    fn image(&self) -> Result<Arc<Image>> {
        let deadline = std::time::Instant::now() + LIVE_EXPORT_PAUSE_WAIT;
        loop {
            if let Some(image) = self.vbd.lock().device.image().cloned() {
                return Ok(image);
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "the disk stayed paused: no image to read",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn read_only() -> Error {
        Error::new(ErrorKind::InvalidArgument, "the live export is read-only")
    }
}

impl nbd::Backend for LiveExport {
    fn size(&self) -> u64 {
        self.vbd.lock().device.sectors() * SECTOR_SIZE
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.image()?.read_at(buf, offset)
    }

    fn write_at(&self, _data: &[u8], _offset: u64) -> Result<()> {
        Err(LiveExport::read_only())
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(LiveExport::read_only())
    }

    /// Nothing is written through the export; the guest's flushes are its own.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.image()?.block_status(offset, len)
    }
}

/// SIGTERM and SIGINT close the serve as a `close` request does (the queues drain, the stats
/// files, registry entry and socket go), so a service manager's stop leaves nothing behind.
fn close_on_signals(control: PathBuf) -> Result<()> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| Error::io("install signal handlers", e))?;
    std::thread::Builder::new()
        .name("ferrotap-signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                if let Ok(mut stream) = UnixStream::connect(&control) {
                    let _ = stream.write_all(b"{\"op\":\"close\"}\n");
                    let mut reply = String::new();
                    let _ = BufReader::new(stream).read_line(&mut reply);
                }
            }
        })
        .map(drop)
        .map_err(|e| Error::io("spawn signal thread", e))
}

/// The longest control request taken: the largest real one, a connect of 16 queues with 16
/// ring pages each, is under 4 KiB. A client sending more without a newline is answered and
/// dropped, rather than held in memory while it goes on.
const MAX_CONTROL_REQUEST: usize = 64 * 1024;

/// Answer requests on one control connection; true when one of them was `close`.
fn serve_connection(stream: UnixStream, vbd: &Mutex<Vbd>, watchers: &Watchers) -> bool {
    let Ok(mut writer) = stream.try_clone() else {
        return false;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match reader
            .by_ref()
            .take(MAX_CONTROL_REQUEST as u64)
            .read_line(&mut line)
        {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        if line.len() >= MAX_CONTROL_REQUEST && !line.ends_with('\n') {
            let refusal = failure(&format!(
                "bad request: longer than {MAX_CONTROL_REQUEST} bytes"
            ));
            let _ = writer.write_all(json_line(&refusal).as_bytes());
            return false;
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(request) => handle(&request, vbd, watchers),
            Err(err) => Reply::Line(failure(&format!("bad request: {err}"))),
        };
        let (value, close, watch) = match reply {
            Reply::Line(value) => (value, false, false),
            Reply::Close(value) => (value, true, false),
            Reply::Watch(value) => (value, false, true),
        };
        if writer.write_all(json_line(&value).as_bytes()).is_err() {
            return close;
        }
        if close {
            return true;
        }
        if watch {
            let Ok(events) = writer.try_clone() else {
                return false;
            };
            let id = watchers.add(events);
            // The connection now only carries events; wait for the peer to go, dropping
            // whatever it sends.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            watchers.remove(id);
            return false;
        }
    }
}

/// One message of the control protocol: a JSON object on a line of its own.
fn json_line(value: &Value) -> String {
    let mut line = value.to_string();
    line.push('\n');
    line
}

fn failure(message: &str) -> Value {
    json!({"ok": false, "error": message})
}

fn result_reply(result: Result<Value>) -> Reply {
    Reply::Line(match result {
        Ok(value) => value,
        Err(err) => failure(&err.to_string()),
    })
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
    devid: Option<u32>,
    backend: Option<String>,
}

#[derive(Debug, Deserialize)]
struct QueueRequest {
    ring_refs: Vec<u32>,
    event_channel: u32,
}

fn parse_connect(request: &Value) -> Result<ConnectRequest> {
    serde_json::from_value(request.clone())
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("bad connect: {e}")))
}

fn connect_params(connect: ConnectRequest) -> Result<ConnectParams> {
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

/// One request.
fn handle(request: &Value, vbd: &Mutex<Vbd>, watchers: &Watchers) -> Reply {
    let op = request.get("op").and_then(Value::as_str).unwrap_or("");
    let mut vbd = vbd.lock();
    match op {
        "info" => Reply::Line(info(&vbd)),
        "connect" => result_reply(connect(&mut vbd, request)),
        "disconnect" => result_reply(disconnect(&mut vbd, watchers).map(|()| json!({"ok": true}))),
        "stats" => Reply::Line(stats(&vbd.device)),
        "pause" => result_reply(pause(&mut vbd, watchers)),
        "unpause" => result_reply(unpause(&mut vbd, request, watchers)),
        "resize" => result_reply(resize(&mut vbd, request, watchers)),
        "watch" => Reply::Watch(json!({
            "ok": true,
            "connected": vbd.device.is_connected(),
            "paused": vbd.device.is_paused(),
            "sectors": vbd.device.sectors(),
        })),
        "close" => match disconnect(&mut vbd, watchers) {
            Ok(()) => Reply::Close(json!({"ok": true})),
            Err(err) => Reply::Close(failure(&err.to_string())),
        },
        other => Reply::Line(failure(&format!("unknown op {other:?}"))),
    }
}

fn connect(vbd: &mut Vbd, request: &Value) -> Result<Value> {
    let connect = parse_connect(request)?;
    let devid = connect.devid.or(vbd.default_devid);
    let backend = connect.backend.clone();
    let domid = connect.domid;
    vbd.device.connect(connect_params(connect)?)?;
    vbd.domid = Some(domid);
    vbd.devid = devid;
    vbd.backend = backend;
    if let Some(devid) = devid {
        match StatsFiles::start(
            &statsfile::shm_dir(),
            domid,
            devid,
            vbd.pid,
            vbd.device.queue_stats(),
        ) {
            Ok(files) => vbd.stats_files = Some(files),
            // Metrics are not worth refusing a guest its disk.
            Err(err) => eprintln!("ferrotap serve: no stats files: {err}"),
        }
    }
    vbd.update_registry();
    Ok(json!({"ok": true}))
}

fn disconnect(vbd: &mut Vbd, watchers: &Watchers) -> Result<()> {
    let was_connected = vbd.device.is_connected();
    let result = vbd.device.disconnect();
    vbd.stats_files = None;
    if was_connected {
        vbd.domid = None;
        vbd.devid = vbd.default_devid;
        vbd.backend = None;
        vbd.update_registry();
        watchers.send(&json!({"event": "disconnected"}));
    }
    result
}

fn stats(device: &Device) -> Value {
    let queues = device.stats();
    let totals = QueueStatsSnapshot::total(&queues);
    json!({
        "ok": true,
        "connected": device.is_connected(),
        "paused": device.is_paused(),
        "queues": queues,
        "totals": totals,
    })
}

fn pause(vbd: &mut Vbd, watchers: &Watchers) -> Result<Value> {
    if !vbd.device.is_paused() {
        vbd.device.pause()?;
        watchers.send(&json!({"event": "paused"}));
    }
    Ok(json!({"ok": true, "paused": true}))
}

fn unpause(vbd: &mut Vbd, request: &Value, watchers: &Watchers) -> Result<Value> {
    if !vbd.device.is_paused() {
        return Err(Error::invalid("not paused"));
    }
    let path = request
        .get("path")
        .and_then(Value::as_str)
        .map(PathBuf::from);
    let format = match request.get("format").and_then(Value::as_str) {
        Some(name) => Some(Format::parse(name)?),
        // A new image is probed; the same one is opened as before.
        None if path.is_some() => None,
        None => vbd.format,
    };
    let path = path.unwrap_or_else(|| vbd.image_path.clone());
    let before = vbd.device.sectors();
    let image = open_image(&path, format, vbd.open)?;
    let sectors = vbd.device.unpause(image)?;
    let changed_image = path != vbd.image_path;
    vbd.image_path = path;
    vbd.format = format;
    if changed_image {
        vbd.update_registry();
    }
    let image = vbd.image_path.clone();
    watchers.send(&json!({"event": "unpaused", "sectors": sectors, "image": image}));
    if sectors != before {
        watchers.send(&json!({"event": "resized", "sectors": sectors}));
    }
    Ok(json!({"ok": true, "sectors": sectors, "image": image}))
}

fn resize(vbd: &mut Vbd, request: &Value, watchers: &Watchers) -> Result<Value> {
    let size = match (
        request.get("sectors").and_then(Value::as_u64),
        request.get("size").and_then(Value::as_u64),
    ) {
        (Some(sectors), None) => sectors
            .checked_mul(512)
            .ok_or_else(|| Error::invalid(format!("{sectors} sectors is too large")))?,
        (None, Some(size)) => size,
        _ => {
            return Err(Error::invalid(
                "resize takes \"sectors\" (512-byte) or \"size\" (bytes), one of them",
            ))
        }
    };
    let before = vbd.device.sectors();
    let sectors = vbd.device.resize(size)?;
    if sectors != before {
        watchers.send(&json!({"event": "resized", "sectors": sectors}));
    }
    Ok(json!({"ok": true, "sectors": sectors}))
}

fn info(vbd: &Vbd) -> Value {
    let device = &vbd.device;
    let mut reply = json!({
        "ok": true,
        "pid": vbd.pid,
        "control": vbd.control,
        "image": vbd.image_path,
        "sectors": device.sectors(),
        "sector_size": 512,
        "physical_sector_size": 4096,
        "connected": device.is_connected(),
        "paused": device.is_paused(),
        "engine": format!("{:?}", device.config().engine).to_lowercase(),
        "features": device.config().features,
        "max_segments_per_request": MAX_SEGMENTS_PER_REQUEST,
    });
    match device.image() {
        Some(image) => {
            reply["format"] = json!(image.top().format().name());
            reply["read_only"] = json!(image.read_only());
            reply["chain"] = image
                .layers()
                .iter()
                .map(|layer| json!(layer.file().path()))
                .collect();
        }
        None => {
            reply["format"] = json!(vbd.format.map(Format::name));
            reply["read_only"] = json!(vbd.open.read_only);
        }
    }
    if let Some(domid) = vbd.domid {
        reply["domid"] = json!(domid);
    }
    if let Some(devid) = vbd.devid {
        reply["devid"] = json!(devid);
    }
    if let Some(backend) = &vbd.backend {
        reply["backend"] = json!(backend);
    }
    if let Some(files) = &vbd.stats_files {
        reply["stats_files"] = json!([files.paths().statistics, files.paths().td3_file]);
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_cpus_parse_cpus_and_ranges_and_refuse_the_rest() {
        assert_eq!(
            parse_queue_cpus("3,0-2,7"),
            Ok(QueueCpus(vec![vec![3], vec![0, 1, 2], vec![7]]))
        );
        for (bad, why) in [
            ("", "\"\" is not a CPU number"),
            ("1,,2", "\"\" is not a CPU number"),
            ("a", "\"a\" is not a CPU number"),
            ("-1", "\"\" is not a CPU number"),
            ("4-2", "\"4-2\": the range runs backwards"),
            ("1024", "CPU 1024 is past the kernel's CPU set (1024)"),
            (
                "0-99999999999",
                "CPU 99999999999 is past the kernel's CPU set (1024)",
            ),
        ] {
            assert_eq!(parse_queue_cpus(bad), Err(why.to_string()), "{bad:?}");
        }
    }
}
