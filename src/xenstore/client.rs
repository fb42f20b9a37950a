//! A xenstore client over the xenstored unix socket or /dev/xen/xenbus (the same wire
//! protocol on a character device).
//!
//! Any number of threads may issue requests at once through `&Client`: each request gets a
//! fresh `req_id`, is written whole under a lock, and its caller sleeps until the reader
//! thread, which owns the receiving side, hands over the reply with that id. Watch events
//! (`req_id` 0, type WATCH_EVENT) go to one queue read by [`Client::next_event`]. When the
//! connection dies every waiting and future request fails; nothing waits forever.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::xenstore::wire::{self, encode_message, Errno, Message, MsgType, PAYLOAD_MAX};

/// A transaction id; 0 is "no transaction".
pub type TxId = u32;

/// Where libxenstore looks for xenstored's socket, in order, after `$XENSTORED_PATH`.
const DEFAULT_SOCKETS: [&str; 2] = ["/run/xenstored/socket", "/var/run/xenstored/socket"];
const XENBUS_DEVICE: &str = "/dev/xen/xenbus";
/// Watch events queued and not yet taken by `next_event`; beyond this the connection is
/// declared broken rather than buffering without bound (events would otherwise be lost).
const MAX_QUEUED_EVENTS: usize = 65_536;
/// Attempts of [`Client::transaction`] before it gives up with EAGAIN.
const TRANSACTION_ATTEMPTS: u32 = 64;

/// A fired watch: the path that changed (in the form the watch was registered) and the
/// watch's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

enum Transport {
    Socket(UnixStream),
    Device(File),
}

impl Transport {
    fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Transport::Socket(stream) => (&*stream).write_all(bytes),
            Transport::Device(file) => (&*file).write_all(bytes),
        }
    }

    fn reader(&self) -> io::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Transport::Socket(stream) => Box::new(stream.try_clone()?),
            Transport::Device(file) => Box::new(file.try_clone()?),
        })
    }
}

struct State {
    next_req_id: u32,
    /// Requests in flight: None until the reply arrives.
    pending: HashMap<u32, Option<Message>>,
    events: VecDeque<WatchEvent>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled on every reply, event and on death.
    changed: Condvar,
}

impl Shared {
    fn die(&self, reason: String) {
        let mut state = self.state.lock();
        if state.dead.is_none() {
            state.dead = Some(reason);
        }
        self.changed.notify_all();
    }
}

/// A connection to xenstored. `Send + Sync`: share it by reference or `Arc`.
pub struct Client {
    shared: Arc<Shared>,
    transport: Transport,
    write_lock: Mutex<()>,
    reader: Option<JoinHandle<()>>,
    /// What we are connected to, for error messages.
    origin: PathBuf,
}

fn connection_error(origin: &Path, reason: &str) -> Error {
    Error::io(
        "xenstore connection",
        io::Error::new(io::ErrorKind::BrokenPipe, reason.to_string()),
    )
    .with_path(origin)
}

/// The error for xenstored's answer `name` to `op` on `path`: an I/O error carrying the
/// errno, so that `raw_os_error()` and `is_not_found()` work.
fn xenstore_error(op: MsgType, path: &str, name: &[u8]) -> Error {
    let source = match Errno::from_name(name) {
        Some(errno) => io::Error::from_raw_os_error(errno.code()),
        None => io::Error::other(format!(
            "xenstored answered {}",
            String::from_utf8_lossy(name)
        )),
    };
    let what = if path.is_empty() {
        format!("xenstore {}", op.name())
    } else {
        format!("xenstore {} {path}", op.name())
    };
    Error::io(&what, source)
}

fn local_error(op: MsgType, path: &str, errno: Errno) -> Error {
    xenstore_error(op, path, errno.name().as_bytes())
}

impl Client {
    /// Connect to xenstored's unix socket.
    pub fn connect(path: &Path) -> Result<Client> {
        let stream =
            UnixStream::connect(path).map_err(|err| Error::io("connect", err).with_path(path))?;
        Client::start(Transport::Socket(stream), path)
    }

    /// Open the xenbus device, /dev/xen/xenbus.
    pub fn open_xenbus() -> Result<Client> {
        Client::open_device(Path::new(XENBUS_DEVICE))
    }

    fn open_device(path: &Path) -> Result<Client> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|err| Error::io("open", err).with_path(path))?;
        Client::start(Transport::Device(file), path)
    }

    /// As libxenstore: `$XENSTORED_PATH` (a socket, or else a device), else the first of
    /// /run/xenstored/socket and /var/run/xenstored/socket that exists, else /dev/xen/xenbus.
    pub fn open_default() -> Result<Client> {
        if let Some(path) = std::env::var_os("XENSTORED_PATH").filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            let is_socket = std::fs::metadata(&path)
                .map(|meta| meta.file_type().is_socket())
                .unwrap_or(true);
            return if is_socket {
                Client::connect(&path)
            } else {
                Client::open_device(&path)
            };
        }
        for socket in DEFAULT_SOCKETS {
            let socket = Path::new(socket);
            if socket.exists() {
                return Client::connect(socket);
            }
        }
        Client::open_xenbus()
    }

    fn start(transport: Transport, origin: &Path) -> Result<Client> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_req_id: 1,
                pending: HashMap::new(),
                events: VecDeque::new(),
                dead: None,
            }),
            changed: Condvar::new(),
        });
        let reader = transport
            .reader()
            .map_err(|err| Error::io("clone xenstore connection", err).with_path(origin))?;
        let reader_shared = Arc::clone(&shared);
        let handle = thread::Builder::new()
            .name("xenstore-reader".to_string())
            .spawn(move || read_loop(&reader_shared, reader))
            .map_err(|err| Error::io("spawn xenstore reader", err))?;
        Ok(Client {
            shared,
            transport,
            write_lock: Mutex::new(()),
            reader: Some(handle),
            origin: origin.to_path_buf(),
        })
    }

    /// Send one request and wait for its reply's payload; an ERROR reply becomes an Err.
    fn request(&self, op: MsgType, tx: TxId, path: &str, payload: &[u8]) -> Result<Vec<u8>> {
        if payload.len() > PAYLOAD_MAX {
            return Err(local_error(op, path, Errno::E2BIG));
        }
        let req_id = {
            let mut state = self.shared.state.lock();
            if let Some(reason) = &state.dead {
                return Err(connection_error(&self.origin, reason));
            }
            // Ids in flight are skipped; 0 stays unused (watch events carry it).
            let mut id = state.next_req_id;
            while id == 0 || state.pending.contains_key(&id) {
                id = id.wrapping_add(1);
            }
            state.next_req_id = id.wrapping_add(1);
            state.pending.insert(id, None);
            id
        };
        let Some(message) = encode_message(op as u32, req_id, tx, payload) else {
            self.shared.state.lock().pending.remove(&req_id);
            return Err(local_error(op, path, Errno::E2BIG));
        };
        let written = {
            let _writing = self.write_lock.lock();
            self.transport.write_all(&message)
        };
        if let Err(err) = written {
            self.shared.state.lock().pending.remove(&req_id);
            // The xenbus device refuses a message type it does not pass on with EINVAL and
            // forgets the message: only that request failed. Otherwise part of a message may
            // be on the wire and the stream is unusable from here on.
            let refused = matches!(self.transport, Transport::Device(_))
                && err.raw_os_error() == Some(libc::EINVAL);
            if !refused {
                self.shared.die(format!("write failed: {err}"));
                self.shutdown();
            }
            return Err(
                Error::io(&format!("xenstore {} write", op.name()), err).with_path(&self.origin)
            );
        }
        let reply = {
            let mut state = self.shared.state.lock();
            loop {
                if let Some(Some(_)) = state.pending.get(&req_id) {
                    break state.pending.remove(&req_id).flatten();
                }
                if let Some(reason) = &state.dead {
                    let err = connection_error(&self.origin, reason);
                    state.pending.remove(&req_id);
                    return Err(err);
                }
                self.shared.changed.wait(&mut state);
            }
        };
        let Some(reply) = reply else {
            return Err(connection_error(&self.origin, "reply lost"));
        };
        match reply.header.kind() {
            Some(MsgType::Error) => {
                let name = reply.payload.strip_suffix(&[0]).unwrap_or(&reply.payload);
                Err(xenstore_error(op, path, name))
            }
            Some(kind) if kind == op => Ok(reply.payload),
            _ => Err(connection_error(
                &self.origin,
                &format!(
                    "reply of type {} to a {} request",
                    reply.header.msg_type,
                    op.name()
                ),
            )),
        }
    }

    fn path_request(&self, op: MsgType, tx: TxId, path: &str) -> Result<Vec<u8>> {
        self.request(op, tx, path, &wire::nul_strings([path.as_bytes()]))
    }

    fn expect_ok(op: MsgType, path: &str, reply: &[u8]) -> Result<()> {
        if reply == b"OK\0" || reply == b"OK" {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "xenstore {} {path}: unexpected reply {:?}",
                op.name(),
                String::from_utf8_lossy(reply)
            )))
        }
    }

    /// The value of `path`; a missing node is an error with `is_not_found()`.
    pub fn read(&self, tx: TxId, path: &str) -> Result<String> {
        let value = self.path_request(MsgType::Read, tx, path)?;
        String::from_utf8(value)
            .map_err(|_| Error::invalid(format!("xenstore READ {path}: the value is not UTF-8")))
    }

    /// The value of `path`, None when it does not exist.
    pub fn read_opt(&self, tx: TxId, path: &str) -> Result<Option<String>> {
        match self.read(tx, path) {
            Ok(value) => Ok(Some(value)),
            Err(err) if err.is_not_found() => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Write `value` at `path`, creating missing parents.
    pub fn write(&self, tx: TxId, path: &str, value: &str) -> Result<()> {
        let mut payload = wire::nul_strings([path.as_bytes()]);
        payload.extend_from_slice(value.as_bytes());
        let reply = self.request(MsgType::Write, tx, path, &payload)?;
        Client::expect_ok(MsgType::Write, path, &reply)
    }

    /// Create `path` (and its parents) empty, unless it exists.
    pub fn mkdir(&self, tx: TxId, path: &str) -> Result<()> {
        let reply = self.path_request(MsgType::Mkdir, tx, path)?;
        Client::expect_ok(MsgType::Mkdir, path, &reply)
    }

    /// Remove `path` and everything below it.
    pub fn rm(&self, tx: TxId, path: &str) -> Result<()> {
        let reply = self.path_request(MsgType::Rm, tx, path)?;
        Client::expect_ok(MsgType::Rm, path, &reply)
    }

    /// The names of `path`'s children. Listings too long for one reply are fetched in
    /// parts with DIRECTORY_PART, restarting if the directory changes meanwhile.
    pub fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>> {
        match self.path_request(MsgType::Directory, tx, path) {
            Ok(listing) => Ok(names(&listing)),
            Err(err) if err.raw_os_error() == Some(libc::E2BIG) => self.directory_parts(tx, path),
            Err(err) => Err(err),
        }
    }

    fn directory_parts(&self, tx: TxId, path: &str) -> Result<Vec<String>> {
        // Each part carries the directory's generation; a change restarts the listing.
        const RESTARTS: u32 = 16;
        for _ in 0..RESTARTS {
            let mut listing: Vec<u8> = Vec::new();
            let mut generation: Option<Vec<u8>> = None;
            let complete = loop {
                let offset = listing.len().to_string();
                let payload = wire::nul_strings([path.as_bytes(), offset.as_bytes()]);
                let part = self.request(MsgType::DirectoryPart, tx, path, &payload)?;
                let nul = part.iter().position(|&b| b == 0).ok_or_else(|| {
                    Error::invalid(format!("xenstore DIRECTORY_PART {path}: no generation"))
                })?;
                let (gen, names) = (&part[..nul], &part[nul + 1..]);
                match &generation {
                    Some(first) if first.as_slice() != gen => break false,
                    Some(_) => {}
                    None => generation = Some(gen.to_vec()),
                }
                // The listing ends with an empty name: a NUL right after a name's NUL (or a
                // part holding only that NUL).
                if names.is_empty() {
                    return Err(Error::invalid(format!(
                        "xenstore DIRECTORY_PART {path}: empty part"
                    )));
                }
                listing.extend_from_slice(names);
                if names == [0] || names.ends_with(&[0, 0]) {
                    break true;
                }
            };
            if complete {
                return Ok(names(&listing));
            }
        }
        Err(local_error(MsgType::DirectoryPart, path, Errno::EAGAIN))
    }

    /// The permission list of `path`, as stored (`n0`, `r1`, ...).
    pub fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<String>> {
        Ok(names(&self.path_request(MsgType::GetPerms, tx, path)?))
    }

    pub fn set_perms(&self, tx: TxId, path: &str, perms: &[String]) -> Result<()> {
        let payload = wire::nul_strings(
            std::iter::once(path.as_bytes()).chain(perms.iter().map(String::as_bytes)),
        );
        let reply = self.request(MsgType::SetPerms, tx, path, &payload)?;
        Client::expect_ok(MsgType::SetPerms, path, &reply)
    }

    /// Watch `path` (and everything below it) with `token`. xenstored fires it once at once.
    pub fn watch(&self, path: &str, token: &str) -> Result<()> {
        let payload = wire::nul_strings([path.as_bytes(), token.as_bytes()]);
        let reply = self.request(MsgType::Watch, 0, path, &payload)?;
        Client::expect_ok(MsgType::Watch, path, &reply)
    }

    pub fn unwatch(&self, path: &str, token: &str) -> Result<()> {
        let payload = wire::nul_strings([path.as_bytes(), token.as_bytes()]);
        let reply = self.request(MsgType::Unwatch, 0, path, &payload)?;
        Client::expect_ok(MsgType::Unwatch, path, &reply)
    }

    /// Next watch event; None when the timeout passes. Events are queued from the moment
    /// the watch is set; the connection dying is an Err (after the events queued before).
    pub fn next_event(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>> {
        let deadline = timeout.map(|timeout| Instant::now() + timeout);
        let mut state = self.shared.state.lock();
        loop {
            if let Some(event) = state.events.pop_front() {
                return Ok(Some(event));
            }
            if let Some(reason) = &state.dead {
                return Err(connection_error(&self.origin, reason));
            }
            match deadline {
                None => self.shared.changed.wait(&mut state),
                Some(deadline) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    self.shared.changed.wait_until(&mut state, deadline);
                }
            }
        }
    }

    pub fn transaction_start(&self) -> Result<TxId> {
        let reply = self.request(MsgType::TransactionStart, 0, "", b"\0")?;
        let text = reply.strip_suffix(&[0]).unwrap_or(&reply);
        std::str::from_utf8(text)
            .ok()
            .and_then(|text| text.parse::<TxId>().ok())
            .filter(|&id| id != 0)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "xenstore TRANSACTION_START: bad id {:?}",
                    String::from_utf8_lossy(text)
                ))
            })
    }

    /// commit=true: Ok(true) committed, Ok(false) on EAGAIN (conflict), Err otherwise.
    pub fn transaction_end(&self, tx: TxId, commit: bool) -> Result<bool> {
        let payload: &[u8] = if commit { b"T\0" } else { b"F\0" };
        match self.request(MsgType::TransactionEnd, tx, "", payload) {
            Ok(reply) => Client::expect_ok(MsgType::TransactionEnd, "", &reply).map(|()| true),
            Err(err) if commit && err.raw_os_error() == Some(libc::EAGAIN) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Run `body` in a transaction, retrying the whole body on EAGAIN (bounded, with backoff).
    pub fn transaction<T>(&self, mut body: impl FnMut(TxId) -> Result<T>) -> Result<T> {
        let mut backoff = Duration::from_millis(1);
        for attempt in 0..TRANSACTION_ATTEMPTS {
            let tx = self.transaction_start()?;
            match body(tx) {
                Ok(value) => {
                    if self.transaction_end(tx, true)? {
                        return Ok(value);
                    }
                }
                // Some xenstoreds report a conflict on the operation itself.
                Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => {
                    let _ = self.transaction_end(tx, false);
                }
                Err(err) => {
                    let _ = self.transaction_end(tx, false);
                    return Err(err);
                }
            }
            // Spread competing retriers apart: the sleep varies with the attempt and clock.
            let clock = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|since| since.subsec_nanos())
                .unwrap_or(0);
            let jitter =
                Duration::from_micros(u64::from(clock ^ attempt.wrapping_mul(7919)) % 1000);
            thread::sleep(backoff + jitter);
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
        Err(local_error(MsgType::TransactionEnd, "", Errno::EAGAIN))
    }

    fn shutdown(&self) {
        if let Transport::Socket(stream) = &self.transport {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shared.die("client closed".to_string());
        match &self.transport {
            Transport::Socket(_) => {
                self.shutdown();
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
            }
            // A character device cannot be shut down: a harmless request wakes the reader,
            // which sees the client closed and ends (it is not waited for).
            Transport::Device(_) => {
                if let Some(message) = encode_message(MsgType::GetDomainPath as u32, 0, 0, b"0\0") {
                    let _writing = self.write_lock.lock();
                    let _ = self.transport.write_all(&message);
                }
            }
        }
    }
}

/// NUL-separated names as strings.
fn names(payload: &[u8]) -> Vec<String> {
    wire::split_nul(payload)
        .into_iter()
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect()
}

fn read_loop(shared: &Shared, reader: Box<dyn Read + Send>) {
    let mut reader = BufReader::new(reader);
    loop {
        let message = match wire::read_message(&mut reader) {
            Ok(message) => message,
            Err(err) => {
                shared.die(format!("xenstored connection lost: {err}"));
                return;
            }
        };
        let mut state = shared.state.lock();
        if state.dead.is_some() {
            return;
        }
        if message.header.kind() == Some(MsgType::WatchEvent) {
            let parts = wire::split_nul(&message.payload);
            let (Some(path), Some(token)) = (parts.first(), parts.get(1)) else {
                continue;
            };
            if state.events.len() >= MAX_QUEUED_EVENTS {
                drop(state);
                shared.die(format!(
                    "more than {MAX_QUEUED_EVENTS} watch events queued and not taken"
                ));
                return;
            }
            state.events.push_back(WatchEvent {
                path: String::from_utf8_lossy(path).into_owned(),
                token: String::from_utf8_lossy(token).into_owned(),
            });
        } else if let Some(slot) = state.pending.get_mut(&message.header.req_id) {
            *slot = Some(message);
        }
        // A reply nobody waits for (its requester gave up) is dropped.
        shared.changed.notify_all();
    }
}
