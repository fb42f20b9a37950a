//! The transmission phase of one connection.
//!
//! Requests are pipelined: a few threads per connection take turns as the reader (the one
//! holding `input` parses the next request, and its payload for a write, from a buffered
//! socket), then run the request themselves and write the reply under `output`. Replies
//! thus leave in completion order, matched by handle as the protocol allows, and no
//! request is handed from thread to thread. Each thread keeps one data buffer for its
//! whole life, so steady state allocates nothing; memory per connection is bounded by
//! threads x [`MAX_REQUEST_LEN`] plus the input buffer.

use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::handshake::{Session, MAX_REQUEST_LEN};
use super::proto::*;
use super::Socket;
use crate::error::{Error, ErrorKind};

/// Bytes read from the socket at a time: many 28-byte headers per read(2) at high depth.
const INPUT_BUFFER: usize = 256 * 1024;
/// A thread's data buffer is kept up to this size between requests; larger ones are freed.
const RETAINED_BUFFER: usize = 4 * 1024 * 1024;
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
}

/// What a request produced, to be sent as its reply.
enum Outcome {
    Done,
    /// `data[..len]` was read.
    Data(usize),
    /// `data[..len]` holds block status descriptors.
    Status(usize),
    Failed(u32, &'static str),
}

impl Connection {
    pub fn new(socket: Socket, session: Session) -> io::Result<Connection> {
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
        let mut data: Vec<u8> = Vec::new();
        while let Some((request, action)) = self.next_request(&mut data) {
            let outcome = match action {
                Ok(action) => self.execute(&request, action, &mut data),
                Err(errno) => Outcome::Failed(errno, "request refused"),
            };
            if self.reply(&request, outcome, &data).is_err() {
                self.close();
                return;
            }
            if data.len() > RETAINED_BUFFER {
                data.truncate(RETAINED_BUFFER);
                data.shrink_to_fit();
            }
        }
    }

    /// Read the next request (and a write's payload into `data`) under the input lock.
    /// `None` when the connection is over.
    fn next_request(&self, data: &mut Vec<u8>) -> Option<(Request, Result<Action, u32>)> {
        let mut input = self.input.lock();
        if self.closing.load(Ordering::Acquire) {
            return None;
        }
        let header = match input.header() {
            Ok(Some(header)) => header,
            Ok(None) | Err(_) => {
                drop(input);
                self.close();
                return None;
            }
        };
        let Some(request) = Request::parse(&header) else {
            drop(input);
            self.close();
            return None;
        };
        if request.command == CMD_WRITE {
            if request.len > MAX_REQUEST_LEN {
                // Past the announced maximum block size: a breach of a MUST, and skipping
                // up to 4 GiB of payload is not worth it. Hard disconnect.
                drop(input);
                self.close();
                return None;
            }
            let len = request.len as usize;
            if data.len() < len {
                data.resize(len, 0);
            }
            if input.payload(&mut data[..len]).is_err() {
                drop(input);
                self.close();
                return None;
            }
        }
        let action = validate(&request, &self.limits);
        if action == Ok(Action::Disconnect) {
            // Requests already taken finish; nobody reads after this.
            self.closing.store(true, Ordering::Release);
            return None;
        }
        Some((request, action))
    }

    fn execute(&self, request: &Request, action: Action, data: &mut Vec<u8>) -> Outcome {
        let backend = &*self.session.export.backend;
        let offset = request.offset;
        let len = request.len as usize;
        let fua = request.flags & CMD_FLAG_FUA != 0;
        let result = match action {
            Action::Read => {
                if data.len() < len {
                    data.resize(len, 0);
                }
                return match backend.read_at(&mut data[..len], offset) {
                    Ok(()) => Outcome::Data(len),
                    Err(err) => self.failed(&err),
                };
            }
            Action::Write => backend.write_at(&data[..len], offset),
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
                return match self.block_status(request, data) {
                    Ok(n) => Outcome::Status(n),
                    Err(err) => self.failed(&err),
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
            Err(err) => self.failed(&err),
        }
    }

    fn failed(&self, err: &Error) -> Outcome {
        let errno = errno_of(err);
        if errno == EIO {
            eprintln!("ferrotap nbd: {err}");
        }
        Outcome::Failed(errno, "I/O failed")
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

    /// Fill `data` with the descriptors of `base:allocation` for the request's range:
    /// context id, then (length, flags) pairs, adjacent runs of equal flags merged.
    fn block_status(&self, request: &Request, data: &mut Vec<u8>) -> crate::error::Result<usize> {
        let backend = &*self.session.export.backend;
        let one = request.flags & CMD_FLAG_REQ_ONE != 0;
        let mut descriptors: Vec<(u32, u32)> = Vec::new();
        let end = request.offset + u64::from(request.len);
        let mut offset = request.offset;
        while offset < end {
            let status = backend.block_status(offset, end - offset)?;
            let flags = if status.zero {
                STATE_HOLE | STATE_ZERO
            } else {
                0
            };
            let len = status.len as u32;
            let count = descriptors.len();
            match descriptors.last_mut() {
                Some(last) if last.1 == flags => last.0 += len,
                _ if (one && count > 0) || count == MAX_DESCRIPTORS => break,
                _ => descriptors.push((len, flags)),
            }
            offset += status.len;
        }
        let bytes = 4 + descriptors.len() * 8;
        if data.len() < bytes {
            data.resize(bytes, 0);
        }
        let context = self.session.allocation_context.unwrap_or(0);
        data[0..4].copy_from_slice(&context.to_be_bytes());
        for (i, (len, flags)) in descriptors.iter().enumerate() {
            data[4 + i * 8..8 + i * 8].copy_from_slice(&len.to_be_bytes());
            data[8 + i * 8..12 + i * 8].copy_from_slice(&flags.to_be_bytes());
        }
        Ok(bytes)
    }

    fn reply(&self, request: &Request, outcome: Outcome, data: &[u8]) -> io::Result<()> {
        let handle = request.handle;
        let mut header = [0u8; CHUNK_HEADER_LEN + 8];
        let (head, body): (&[u8], &[u8]) = match (outcome, self.limits.structured) {
            (Outcome::Done, _) => {
                header[..SIMPLE_REPLY_LEN].copy_from_slice(&simple_reply(handle, 0));
                (&header[..SIMPLE_REPLY_LEN], &[])
            }
            (Outcome::Data(len), false) => {
                header[..SIMPLE_REPLY_LEN].copy_from_slice(&simple_reply(handle, 0));
                (&header[..SIMPLE_REPLY_LEN], &data[..len])
            }
            (Outcome::Data(len), true) => {
                header[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
                    handle,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_OFFSET_DATA,
                    len as u32 + 8,
                ));
                header[CHUNK_HEADER_LEN..].copy_from_slice(&request.offset.to_be_bytes());
                (&header[..], &data[..len])
            }
            (Outcome::Status(len), _) => {
                header[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
                    handle,
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_BLOCK_STATUS,
                    len as u32,
                ));
                (&header[..CHUNK_HEADER_LEN], &data[..len])
            }
            (Outcome::Failed(errno, _), false) => {
                header[..SIMPLE_REPLY_LEN].copy_from_slice(&simple_reply(handle, errno));
                (&header[..SIMPLE_REPLY_LEN], &[])
            }
            (Outcome::Failed(errno, text), true) => {
                let message = text.as_bytes();
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
                (&header[..CHUNK_HEADER_LEN + 6], message)
            }
        };
        let mut output = self.output.lock();
        write_all_vectored(&mut *output, &mut [IoSlice::new(head), IoSlice::new(body)])
    }
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
