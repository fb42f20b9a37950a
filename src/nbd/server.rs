//! The transmission phase of one connection.
//!
//! Requests are pipelined and batched: a few threads per connection take turns as the
//! reader. The one holding `input` takes the next request from a buffered socket (blocking
//! for it) and, without blocking again, every further request already buffered, up to a
//! batch; it releases `input`, runs the batch and sends all its replies with one writev
//! under `output`. Replies thus leave in completion order, matched by handle as the
//! protocol allows; no request is handed from thread to thread, and at high queue depth one
//! read(2) and one writev(2) serve many requests. Each thread keeps one page-aligned arena
//! for its batch's data (O_DIRECT needs no bounce), so steady state allocates nothing;
//! memory per connection is bounded by threads x ([`MAX_REQUEST_LEN`] while such a request
//! runs, [`RETAINED_ARENA`] otherwise) plus the input buffer.

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::handshake::{Session, MAX_REQUEST_LEN};
use super::proto::*;
use super::Socket;
use crate::error::{Error, ErrorKind};
use crate::image::file::{AlignedBuf, DIRECT_ALIGN};

/// Bytes read from the socket at a time: many 28-byte headers per read(2) at high depth.
const INPUT_BUFFER: usize = 256 * 1024;
/// Most requests in one batch (one writev carries two slices per reply).
pub const MAX_BATCH: usize = 32;
/// Most descriptors in one block status reply.
const MAX_DESCRIPTORS: usize = 1024;

/// What a validated request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
}

/// What the session allows, for [`validate`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub allocation_context: bool,
}

/// Check a request against the export and the session: the action, or the error to
/// reply with (spec: EINVAL for unknown commands and flags, reads or status past the end;
/// ENOSPC for writes past the end; EPERM for writes to a read-only export).
pub fn validate(request: &Request, limits: &Limits) -> Result<Action, u32> {
    let (action, allowed_flags) = match request.command {
        CMD_READ => (Action::Read, CMD_FLAG_DF),
        CMD_WRITE => (Action::Write, CMD_FLAG_FUA),
        CMD_DISC => (Action::Disconnect, 0),
        CMD_FLUSH => (Action::Flush, 0),
        CMD_TRIM => (Action::Trim, CMD_FLAG_FUA),
        CMD_WRITE_ZEROES => (
            Action::WriteZeroes,
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        ),
        CMD_BLOCK_STATUS => (Action::BlockStatus, CMD_FLAG_REQ_ONE),
        _ => return Err(EINVAL),
    };
    if request.flags & !allowed_flags != 0 {
        return Err(EINVAL);
    }
    if request.flags & CMD_FLAG_DF != 0 && !limits.structured {
        return Err(EINVAL);
    }
    let writes = matches!(action, Action::Write | Action::Trim | Action::WriteZeroes);
    if writes && limits.read_only {
        return Err(EPERM);
    }
    match action {
        Action::Disconnect | Action::Flush => return Ok(action),
        Action::Read if request.len > MAX_REQUEST_LEN => return Err(EOVERFLOW),
        Action::BlockStatus if !limits.allocation_context || request.len == 0 => {
            return Err(EINVAL)
        }
        _ => {}
    }
    let in_range = request
        .offset
        .checked_add(u64::from(request.len))
        .is_some_and(|end| end <= limits.size);
    if !in_range {
        return Err(if matches!(action, Action::Write | Action::WriteZeroes) {
            ENOSPC
        } else {
            EINVAL
        });
    }
    Ok(action)
}

/// The NBD error for an image-layer error.
fn errno_of(err: &Error) -> u32 {
    match err.kind() {
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::InvalidArgument => EINVAL,
        ErrorKind::Unsupported => ENOTSUP,
        ErrorKind::Io => match err.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ENOSPC,
            _ => EIO,
        },
        ErrorKind::Corrupt => EIO,
    }
}

/// The socket's read side with its buffer; held by the thread reading the next request.
struct Input {
    socket: Socket,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    /// Make `n` bytes available in `buf[start..]`. `Ok(false)` on end of stream before
    /// the first of them (a clean hang-up between requests).
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        if self.end - self.start >= n {
            return Ok(true);
        }
        if self.buf.len() - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end - self.start < n {
            let got = self.socket.read(&mut self.buf[self.end..])?;
            if got == 0 {
                if self.end == self.start {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.end += got;
        }
        Ok(true)
    }

    fn header(&mut self) -> io::Result<Option<[u8; REQUEST_LEN]>> {
        if !self.fill(REQUEST_LEN)? {
            return Ok(None);
        }
        let mut header = [0u8; REQUEST_LEN];
        header.copy_from_slice(&self.buf[self.start..self.start + REQUEST_LEN]);
        self.start += REQUEST_LEN;
        Ok(Some(header))
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The next request header if it is wholly buffered, left in the buffer.
    fn peek_header(&self) -> Option<[u8; REQUEST_LEN]> {
        if self.buffered() < REQUEST_LEN {
            return None;
        }
        let mut header = [0u8; REQUEST_LEN];
        header.copy_from_slice(&self.buf[self.start..self.start + REQUEST_LEN]);
        Some(header)
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
    }

    /// Fill `out` with the next bytes of the stream: what is buffered, then straight from
    /// the socket (large write payloads are not copied twice).
    fn payload(&mut self, out: &mut [u8]) -> io::Result<()> {
        let buffered = (self.end - self.start).min(out.len());
        out[..buffered].copy_from_slice(&self.buf[self.start..self.start + buffered]);
        self.start += buffered;
        self.socket.read_exact(&mut out[buffered..])
    }
}

/// One connection in the transmission phase.
pub struct Connection {
    session: Session,
    limits: Limits,
    input: Mutex<Input>,
    output: Mutex<Socket>,
    /// A handle for shutdown(2), usable without either lock.
    control: Socket,
    closing: AtomicBool,
    /// Most requests one thread takes at a time.
    batch: usize,
}

/// What a request produced, to be sent as its reply.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Done,
    /// This many bytes were read into the request's arena space.
    Data(usize),
    /// This many bytes of block status (context id and descriptors) are there.
    Status(usize),
    Failed(u32, &'static str),
}

/// One request of a batch.
struct Slot {
    request: Request,
    action: Result<Action, u32>,
    /// Its space in the arena: `arena[start..start + len]`.
    start: usize,
    len: usize,
    outcome: Outcome,
    /// The encoded reply header (and the error's fixed fields).
    header: [u8; CHUNK_HEADER_LEN + 8],
    header_len: usize,
}

/// A thread's requests in flight and their data.
struct Batch {
    slots: Vec<Slot>,
    arena: AlignedBuf,
}

/// Bytes of arena a block status reply may fill: context id and descriptors.
const STATUS_BYTES: usize = 4 + 8 * MAX_DESCRIPTORS;
/// A batch stops taking requests once their data reaches this many bytes.
const BATCH_BYTES: usize = 1024 * 1024;
/// Arena kept between batches (a larger one, for a single big request, is freed after).
const RETAINED_ARENA: usize = 2 * BATCH_BYTES;

/// Arena bytes a request needs, rounded up so that the next one starts page-aligned.
fn arena_need(request: &Request) -> usize {
    let bytes = match request.command {
        CMD_READ if request.len <= MAX_REQUEST_LEN => request.len as usize,
        CMD_WRITE => request.len as usize,
        CMD_BLOCK_STATUS => STATUS_BYTES,
        _ => 0,
    };
    bytes.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
}

impl Connection {
    pub fn new(socket: Socket, session: Session, batch: usize) -> io::Result<Connection> {
        let limits = Limits {
            size: session.export.size(),
            read_only: session.export.read_only,
            structured: session.structured,
            allocation_context: session.allocation_context.is_some(),
        };
        Ok(Connection {
            limits,
            input: Mutex::new(Input {
                socket: socket.try_clone()?,
                buf: vec![0; INPUT_BUFFER],
                start: 0,
                end: 0,
            }),
            output: Mutex::new(socket.try_clone()?),
            control: socket,
            session,
            closing: AtomicBool::new(false),
            batch: batch.max(1),
        })
    }

    /// Serve requests with `threads` threads until the client disconnects or fails.
    pub fn run(&self, threads: usize) {
        std::thread::scope(|scope| {
            for _ in 1..threads.max(1) {
                scope.spawn(|| self.worker());
            }
            self.worker();
        });
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        // Wakes whichever thread is blocked reading; errors mean it is closed already.
        let _ = self.control.shutdown();
    }

    fn worker(&self) {
        let mut batch = Batch {
            slots: Vec::with_capacity(self.batch),
            arena: AlignedBuf::zeroed(RETAINED_ARENA),
        };
        while self.next_batch(&mut batch) {
            let Batch { slots, arena } = &mut batch;
            let arena = arena.as_mut_slice();
            for slot in slots.iter_mut() {
                let space = &mut arena[slot.start..slot.start + slot.len];
                slot.outcome = match slot.action {
                    Ok(action) => self.execute(&slot.request, action, space),
                    Err(errno) => Outcome::Failed(errno, "request refused"),
                };
                self.encode_header(slot);
            }
            if self.reply(slots, arena).is_err() {
                self.close();
                return;
            }
            if batch.arena.as_slice().len() > RETAINED_ARENA {
                batch.arena = AlignedBuf::zeroed(RETAINED_ARENA);
            }
        }
    }

    /// Take the next requests (and write payloads into the arena) under the input lock:
    /// the first waiting for it, more only while already buffered. `false` when the
    /// connection is over.
    fn next_batch(&self, batch: &mut Batch) -> bool {
        batch.slots.clear();
        let mut input = self.input.lock();
        if self.closing.load(Ordering::Acquire) {
            return false;
        }
        let mut used = 0;
        loop {
            let request = if batch.slots.is_empty() {
                let header = match input.header() {
                    Ok(Some(header)) => header,
                    Ok(None) | Err(_) => break,
                };
                let Some(request) = Request::parse(&header) else {
                    break;
                };
                if request.command == CMD_WRITE && request.len > MAX_REQUEST_LEN {
                    // Past the announced maximum block size: a breach of a MUST, and
                    // skipping up to 4 GiB of payload is not worth it. Hard disconnect.
                    break;
                }
                let need = arena_need(&request);
                if need > batch.arena.as_slice().len() {
                    batch.arena = AlignedBuf::zeroed(need);
                }
                request
            } else {
                if batch.slots.len() == self.batch || used >= BATCH_BYTES {
                    return true;
                }
                // A bad header is left for the next reader, which closes the connection.
                let Some(request) = input.peek_header().and_then(|h| Request::parse(&h)) else {
                    return true;
                };
                let payload = if request.command == CMD_WRITE {
                    request.len as usize
                } else {
                    0
                };
                if input.buffered() < REQUEST_LEN + payload
                    || used + arena_need(&request) > batch.arena.as_slice().len()
                {
                    return true;
                }
                input.consume(REQUEST_LEN);
                request
            };
            let need = arena_need(&request);
            if request.command == CMD_WRITE {
                let len = request.len as usize;
                if input
                    .payload(&mut batch.arena.as_mut_slice()[used..used + len])
                    .is_err()
                {
                    break;
                }
            }
            let action = validate(&request, &self.limits);
            if action == Ok(Action::Disconnect) {
                // Requests already taken finish; nobody reads after this.
                self.closing.store(true, Ordering::Release);
                return !batch.slots.is_empty();
            }
            batch.slots.push(Slot {
                request,
                action,
                start: used,
                len: need,
                outcome: Outcome::Done,
                header: [0; CHUNK_HEADER_LEN + 8],
                header_len: 0,
            });
            used += need;
        }
        // End of stream, a broken stream or a protocol breach: whatever was taken is
        // dropped with the connection.
        drop(input);
        self.close();
        false
    }

    fn execute(&self, request: &Request, action: Action, space: &mut [u8]) -> Outcome {
        let backend = &*self.session.export.backend;
        let offset = request.offset;
        let len = request.len as usize;
        let fua = request.flags & CMD_FLAG_FUA != 0;
        if len == 0 && !matches!(action, Action::Flush | Action::BlockStatus) {
            // Nothing to do (the spec leaves zero-length requests to the server).
            return if action == Action::Read {
                Outcome::Data(0)
            } else {
                Outcome::Done
            };
        }
        let result = match action {
            Action::Read => {
                return match backend.read_at(&mut space[..len], offset) {
                    Ok(()) => Outcome::Data(len),
                    Err(err) => failed(&err),
                };
            }
            Action::Write => backend.write_at(&space[..len], offset),
            Action::Flush => backend.flush(),
            Action::Trim => backend.discard(offset, len as u64),
            Action::WriteZeroes => {
                if request.flags & CMD_FLAG_NO_HOLE == 0 {
                    // Deallocating is how every format zeroes fastest.
                    backend.discard(offset, len as u64)
                } else if request.flags & CMD_FLAG_FAST_ZERO != 0 {
                    return Outcome::Failed(ENOTSUP, "zeroing without holes is not fast");
                } else {
                    self.write_zeroes(offset, len as u64)
                }
            }
            Action::BlockStatus => {
                return match self.block_status(request, space) {
                    Ok(n) => Outcome::Status(n),
                    Err(err) => failed(&err),
                }
            }
            Action::Disconnect => return Outcome::Done,
        };
        match result.and_then(|()| {
            if fua && matches!(action, Action::Write | Action::Trim | Action::WriteZeroes) {
                backend.flush()
            } else {
                Ok(())
            }
        }) {
            Ok(()) => Outcome::Done,
            Err(err) => failed(&err),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> crate::error::Result<()> {
        let zeros = &self.session.export.zeros;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.session
                .export
                .backend
                .write_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Write `base:allocation` for the request's range into `out`: context id, then
    /// (length, flags) descriptors, adjacent runs of equal flags merged. Returns the bytes.
    fn block_status(&self, request: &Request, out: &mut [u8]) -> crate::error::Result<usize> {
        let backend = &*self.session.export.backend;
        let one = request.flags & CMD_FLAG_REQ_ONE != 0;
        let context = self.session.allocation_context.unwrap_or(0);
        out[0..4].copy_from_slice(&context.to_be_bytes());
        let mut count = 0usize;
        let mut last: Option<(u32, u32)> = None;
        let end = request.offset + u64::from(request.len);
        let mut offset = request.offset;
        while offset < end {
            let status = backend.block_status(offset, end - offset)?;
            let flags = if status.zero {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            // The length fits: it is at most the request's, a u32.
            let len = status.len as u32;
            let (total, at) = match last {
                Some((total, last_flags)) if last_flags == flags => (total + len, count - 1),
                _ if (one && count > 0) || count == MAX_DESCRIPTORS => break,
                _ => {
                    count += 1;
                    (len, count - 1)
                }
            };
            out[4 + at * 8..8 + at * 8].copy_from_slice(&total.to_be_bytes());
            out[8 + at * 8..12 + at * 8].copy_from_slice(&flags.to_be_bytes());
            last = Some((total, flags));
            offset += status.len;
        }
        Ok(4 + count * 8)
    }

    /// The reply header of `slot`'s outcome, into `slot.header`.
    fn encode_header(&self, slot: &mut Slot) {
        let handle = slot.request.handle;
        let header = &mut slot.header;
        slot.header_len = match (slot.outcome, self.limits.structured) {
            (Outcome::Done | Outcome::Data(_), false) => {
                header[..SIMPLE_REPLY_LEN].copy_from_slice(&simple_reply(handle, 0));
                SIMPLE_REPLY_LEN
            }
            (Outcome::Failed(errno, _), false) => {
                header[..SIMPLE_REPLY_LEN].copy_from_slice(&simple_reply(handle, errno));
                SIMPLE_REPLY_LEN
            }
            (Outcome::Done, true) => {
                // A simple reply is allowed for anything but reads when structured.
                header[..SIMPLE_REPLY_LEN].copy_from_slice(&simple_reply(handle, 0));
                SIMPLE_REPLY_LEN
            }
            (Outcome::Data(0), true) => {
                // A content chunk must describe at least one byte.
                header[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
                    handle,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    0,
                ));
                CHUNK_HEADER_LEN
            }
            (Outcome::Data(len), true) => {
                header[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
                    handle,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    len as u32 + 8,
                ));
                header[CHUNK_HEADER_LEN..].copy_from_slice(&slot.request.offset.to_be_bytes());
                CHUNK_HEADER_LEN + 8
            }
            (Outcome::Status(len), _) => {
                header[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
                    handle,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    len as u32,
                ));
                CHUNK_HEADER_LEN
            }
            (Outcome::Failed(errno, message), true) => {
                header[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
                    handle,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_ERROR,
                    6 + message.len() as u32,
                ));
                header[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 4]
                    .copy_from_slice(&errno.to_be_bytes());
                header[CHUNK_HEADER_LEN + 4..CHUNK_HEADER_LEN + 6]
                    .copy_from_slice(&(message.len() as u16).to_be_bytes());
                CHUNK_HEADER_LEN + 6
            }
        };
    }

    /// Send every reply of the batch with one writev (more if the socket takes less).
    fn reply(&self, slots: &[Slot], arena: &[u8]) -> io::Result<()> {
        let mut iovecs = [IoSlice::new(&[]); 2 * MAX_BATCH];
        let mut count = 0;
        for slot in slots {
            iovecs[count] = IoSlice::new(&slot.header[..slot.header_len]);
            let body: &[u8] = match slot.outcome {
                Outcome::Data(len) | Outcome::Status(len) => &arena[slot.start..slot.start + len],
                Outcome::Failed(_, message) if self.limits.structured => message.as_bytes(),
                _ => &[],
            };
            iovecs[count + 1] = IoSlice::new(body);
            count += 2;
        }
        let mut output = self.output.lock();
        write_all_vectored(&mut *output, &mut iovecs[..count])
    }
}

fn failed(err: &Error) -> Outcome {
    let errno = errno_of(err);
    if errno == EIO {
        eprintln!("ferrotap nbd: {err}");
    }
    Outcome::Failed(errno, "I/O failed")
}

/// writev until every byte of `slices` is written.
fn write_all_vectored(out: &mut impl Write, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match out.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
