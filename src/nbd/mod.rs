//! `ferrotap nbd`: export an image chain over NBD (fixed newstyle, structured replies,
//! `base:allocation` block status), on a unix socket, TCP, or one inherited socket.
//!
//! An [`Export`] serves any [`Backend`]. The standalone server opens an [`Image`]; the
//! live export of a running `ferrotap serve` (the VBD exported while the guest writes)
//! would plug in here with a backend that goes through the datapath's device, so that its
//! I/O is ordered with the guest's. That backend is not written yet.

pub mod handshake;
pub mod proto;
pub mod server;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::image::chain::BlockStatus;
use crate::image::{Format, Image, ImageOptions};
use crate::listener;

/// A client has this long to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket buffer size asked for each way.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
/// Bytes of the zero buffer NBD_CMD_WRITE_ZEROES with NO_HOLE writes from.
const ZERO_BUFFER: usize = 1024 * 1024;

/// What an export reads and writes: the guest-visible bytes of a disk.
pub trait Backend: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&self, data: &[u8], offset: u64) -> Result<()>;
    /// Make the range read as zeros, deallocating where possible.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    fn flush(&self) -> Result<()>;
    /// Allocation of the first run of `[offset, offset+len)`.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;
}

impl Backend for Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Image::read_at(self, buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        Image::write_at(self, data, offset)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Image::discard(self, offset, len)
    }

    fn flush(&self) -> Result<()> {
        Image::flush(self)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Image::block_status(self, offset, len)
    }
}

/// One named export.
pub struct Export {
    pub name: String,
    pub description: String,
    pub backend: Arc<dyn Backend>,
    pub read_only: bool,
    zeros: Vec<u8>,
}

impl Export {
    pub fn new(
        name: &str,
        description: &str,
        backend: Arc<dyn Backend>,
        read_only: bool,
    ) -> Export {
        Export {
            name: name.to_string(),
            description: description.to_string(),
            backend,
            read_only,
            zeros: vec![0; ZERO_BUFFER],
        }
    }

    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    /// The export answers to its name and to the default name "".
    pub fn answers_to(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }

    pub fn transmission_flags(&self) -> u16 {
        use proto::*;
        // Multi-conn is safe: a flush on any connection flushes the one image all of them
        // write to.
        let mut flags = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA | TX_SEND_DF | TX_CAN_MULTI_CONN;
        if self.read_only {
            flags |= TX_READ_ONLY;
        } else {
            flags |= TX_SEND_TRIM | TX_SEND_WRITE_ZEROES | TX_SEND_FAST_ZERO;
        }
        flags
    }
}

/// A connected stream socket, unix or TCP.
pub enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_read_timeout(timeout),
            Socket::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Socket::Unix(s) => s.as_raw_fd(),
            Socket::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// Ask for socket buffers of [`SOCKET_BUFFER`] bytes each way (the kernel caps them at
    /// net.core.wmem_max / rmem_max): a 1 MiB reply then goes out in one piece instead of
    /// waiting for the client to drain the default 208 KiB.
    fn enlarge_buffers(&self) {
        let size = SOCKET_BUFFER as libc::c_int;
        for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: setsockopt reads one c_int through the pointer, which points at a live
            // local of that type and size; the fd is this socket's, open while `self` lives.
            // A refusal only leaves the default size, so its result is not checked.
            unsafe {
                libc::setsockopt(
                    self.raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }

    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
        }
    }

    /// Take over a socket inherited as file descriptor `fd` (SMAPIv3's import_activate
    /// hands one over): unix when it is one, else TCP.
    pub fn from_inherited_fd(fd: RawFd) -> io::Result<Socket> {
        // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open; it touches no memory.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is open (checked above) and was handed to this process on its command
        // line to own: nothing else in the process uses or closes it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let unix = UnixStream::from(owned);
        if unix.local_addr().is_ok() {
            return Ok(Socket::Unix(unix));
        }
        let tcp = TcpStream::from(OwnedFd::from(unix));
        tcp.local_addr()?;
        Ok(Socket::Tcp(tcp))
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write_vectored(bufs),
            Socket::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How each connection is served.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Threads per connection, taking turns at reading requests.
    pub threads: usize,
    /// Most requests a thread takes at once.
    pub batch: usize,
}

impl Tuning {
    /// Memory-speed storage (tmpfs, the page cache) is served best by one thread per
    /// connection taking whole batches: one read and one writev for many requests and no
    /// thread switch (on tmpfs, 4 KiB random reads at QD32: ~10 us of CPU per request
    /// against ~15 with 2-4 threads, and the most IOPS). O_DIRECT storage needs requests in
    /// flight at once: more threads, small batches.
    pub fn for_image(direct: bool) -> Tuning {
        if direct {
            Tuning {
                threads: 8,
                batch: 4,
            }
        } else {
            Tuning {
                threads: 1,
                batch: server::MAX_BATCH,
            }
        }
    }
}

/// Handshake then transmission on one connection; returns when it closes.
pub fn serve_connection(mut socket: Socket, export: &Arc<Export>, tuning: Tuning) {
    if socket.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).is_err() {
        return;
    }
    let session = match handshake::negotiate(&mut socket, export) {
        Ok(Some(session)) => session,
        Ok(None) | Err(_) => return,
    };
    if socket.set_read_timeout(None).is_err() {
        return;
    }
    socket.enlarge_buffers();
    if let Ok(connection) = server::Connection::new(socket, session, tuning.batch) {
        connection.run(tuning.threads);
    }
}

#[derive(Debug, clap::Args)]
pub struct NbdArgs {
    /// The image (top of its chain).
    pub image: PathBuf,
    /// Format of the top image; probed when absent.
    #[arg(short = 'f', long)]
    pub format: Option<String>,
    /// Listen on this unix socket (the default, with `--tcp` absent, is ./ferrotap-nbd.sock).
    #[arg(long, conflicts_with_all = ["tcp", "fd"])]
    pub socket: Option<PathBuf>,
    /// Listen on TCP at ADDR:PORT (loopback only unless --allow-remote).
    #[arg(long, conflicts_with = "fd")]
    pub tcp: Option<SocketAddr>,
    /// Accept a non-loopback --tcp address.
    #[arg(long)]
    pub allow_remote: bool,
    /// Serve one already-connected socket inherited as this file descriptor, then exit.
    #[arg(long)]
    pub fd: Option<RawFd>,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
    /// The export's name (the default name "" is accepted too).
    #[arg(long, default_value = "")]
    pub export_name: String,
    /// Threads per connection, taking turns at reading requests (default: 1 for an image
    /// served through memory, 8 with O_DIRECT).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub threads: Option<u64>,
    /// Most requests a thread takes and answers at once (default: 32 through memory, 4 with
    /// O_DIRECT).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=32))]
    pub batch: Option<u64>,
    /// Most connections served at once; more are closed at once.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// Use the host page cache instead of O_DIRECT (always the case on tmpfs).
    #[arg(long)]
    pub buffered: bool,
}

/// Open the chain: O_DIRECT unless asked otherwise, the image is on tmpfs (where the page
/// cache is the storage and O_DIRECT only adds copies), or the filesystem refuses it.
fn open_image(args: &NbdArgs) -> Result<Image> {
    let format = args.format.as_deref().map(Format::parse).transpose()?;
    let buffered = ImageOptions {
        read_only: args.read_only,
        direct: false,
        format,
        no_backing: false,
    };
    if args.buffered {
        return Image::open(&args.image, buffered);
    }
    let image = match Image::open(
        &args.image,
        ImageOptions {
            direct: true,
            ..buffered
        },
    ) {
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            return Image::open(&args.image, buffered)
        }
        other => other?,
    };
    if image.top().file().is_memory_backed()? {
        drop(image);
        return Image::open(&args.image, buffered);
    }
    Ok(image)
}

pub fn run(args: &NbdArgs) -> Result<()> {
    let image = open_image(args)?;
    let default = Tuning::for_image(image.top().file().is_direct());
    let read_only = args.read_only || image.read_only();
    let description = format!("ferrotap: {}", args.image.display());
    let export = Arc::new(Export::new(
        &args.export_name,
        &description,
        Arc::new(image),
        read_only,
    ));
    let tuning = Tuning {
        threads: args.threads.map_or(default.threads, |n| n as usize),
        batch: args.batch.map_or(default.batch, |n| n as usize),
    };
    if let Some(fd) = args.fd {
        let socket = Socket::from_inherited_fd(fd)
            .map_err(|e| Error::io(&format!("adopt socket fd {fd}"), e))?;
        serve_connection(socket, &export, tuning);
        return Ok(());
    }
    let listener = match args.tcp {
        Some(addr) => {
            if !addr.ip().is_loopback() && !args.allow_remote {
                return Err(Error::invalid(format!(
                    "{addr} is not a loopback address: add --allow-remote to export beyond this host"
                )));
            }
            let listener = TcpListener::bind(addr).map_err(|e| Error::io("bind", e))?;
            let local = listener.local_addr().map_err(|e| Error::io("bind", e))?;
            announce(&format!("nbd://{local}/{}", args.export_name));
            Listener::Tcp(listener)
        }
        None => {
            let path = args
                .socket
                .clone()
                .unwrap_or_else(|| PathBuf::from("ferrotap-nbd.sock"));
            let listener = listener::bind_listening(&path)
                .map_err(|e| Error::io("bind", e).with_path(&path))?;
            announce(&format!(
                "nbd+unix:///{}?socket={}",
                args.export_name,
                path.display()
            ));
            Listener::Unix(listener)
        }
    };
    accept_loop(&listener, &export, tuning, args.max_connections);
    Ok(())
}

/// Export `export` on a unix socket at `path` from a thread of its own, for as long as the
/// process runs: the live export of a running `ferrotap serve`.
pub fn spawn_unix_listener(path: &Path, export: Arc<Export>, max_connections: usize) -> Result<()> {
    let listener =
        listener::bind_listening(path).map_err(|e| Error::io("bind", e).with_path(path))?;
    // A live export reads through the guest's image, which serve opens with O_DIRECT.
    let tuning = Tuning::for_image(true);
    std::thread::Builder::new()
        .name("ferrotap-nbd".into())
        .spawn(move || accept_loop(&Listener::Unix(listener), &export, tuning, max_connections))
        .map_err(|e| Error::io("spawn the NBD listener", e))?;
    Ok(())
}

/// Tell the caller where to connect (one line on stdout, flushed: tests wait for it).
fn announce(uri: &str) {
    let mut stdout = io::stdout();
    let _ = writeln!(stdout, "{uri}");
    let _ = stdout.flush();
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Socket> {
        Ok(match self {
            Listener::Unix(l) => Socket::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let (stream, _) = l.accept()?;
                stream.set_nodelay(true)?;
                Socket::Tcp(stream)
            }
        })
    }
}

/// Serve each connection on its own threads, at most `max_connections` at once.
fn accept_loop(listener: &Listener, export: &Arc<Export>, tuning: Tuning, max_connections: usize) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let socket = match listener.accept() {
            Ok(socket) => socket,
            Err(err) => {
                eprintln!("ferrotap nbd: accept: {err}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= max_connections {
            active.fetch_sub(1, Ordering::AcqRel);
            continue;
        }
        let export = Arc::clone(export);
        let active_here = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || {
                serve_connection(socket, &export, tuning);
                active_here.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
