//! The Linux native AIO engine (io_setup/io_submit with an eventfd), for kernels without
//! io_uring (the 4.19 dom0s of XCP-ng 8.3 and XenServer 8) or where it is disabled. Only
//! system calls 4.19 has are used.
//!
//! `push` queues iocbs; `wait` submits them in one `io_submit` (as many as the context has
//! room for), reaps finished ones with a non-blocking `io_getevents`, and when it must block
//! waits in `ppoll(2)` on the completion eventfd (every iocb carries `IOCB_FLAG_RESFD`) and
//! the watched fds. A watched fd found readable becomes a completion and leaves the watch
//! list (one-shot, as with io_uring).
//!
//! Reads, writes and syncs on files in memory (`Engine::set_memory_files`) skip the AIO
//! context: on tmpfs `io_submit` does the copy synchronously anyway, so `push` does it
//! itself with pread/pwrite and saves the iocb, the completion event and the eventfd signal
//! (measured, 4 KiB random reads at QD32 on tmpfs, 1 queue, serve CPU-bound: what the
//! kernel spends besides the read itself fell from 13% of serve's time to 8%, and five
//! alternating pairs gave 8% more IOPS on average). Their completions wait in `ready` for
//! the next `wait`, as others do.
//!
//! Short reads and writes are returned as they are. An `IOCB_CMD_FDSYNC` the kernel or file
//! system refuses with EINVAL (kernels before 4.18, file systems without AIO fsync) is done
//! with a synchronous `fdatasync` and completed by the engine. Like the io_uring engine's,
//! an fsync is not ordered against writes still in flight: push it once they completed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{Completion, Engine, EngineKind, Op};
use crate::error::{Error, Result};

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_CMD_FDSYNC: u16 = 3;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;
const IOCB_FLAG_RESFD: u32 = 1;
/// `AIO_RING_MAGIC` of fs/aio.c, and where head, tail and magic sit in its `struct aio_ring`
/// (in u32 words).
const AIO_RING_MAGIC: u32 = 0xa10a_10a1;
const AIO_RING_HEAD_WORD: usize = 2;
const AIO_RING_TAIL_WORD: usize = 3;
const AIO_RING_MAGIC_WORD: usize = 4;

/// How long `Drop` waits for operations in flight before tearing the context down (which
/// itself waits for them in the kernel).
const DROP_WAIT: Duration = Duration::from_secs(30);

/// `struct iocb` of linux/aio_abi.h (64 bytes; `aio_key` and `aio_rw_flags` swap places
/// on big-endian machines).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Iocb {
    aio_data: u64,
    #[cfg(target_endian = "little")]
    aio_key: u32,
    aio_rw_flags: i32,
    #[cfg(target_endian = "big")]
    aio_key: u32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event` of linux/aio_abi.h.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

pub struct AioEngine {
    /// The `aio_context_t` from `io_setup`.
    ctx: libc::c_ulong,
    /// Most iocbs the context takes at once (what `io_setup` was asked for).
    depth: usize,
    eventfd: OwnedFd,
    /// Pushed, not yet accepted by `io_submit`.
    pending: Vec<Iocb>,
    /// Addresses of the iocbs handed to one `io_submit` (kept as integers so the engine
    /// stays `Send`; reused between calls).
    submit_ptrs: Vec<usize>,
    events: Vec<IoEvent>,
    /// Accepted by the kernel and not reaped.
    submitted: usize,
    /// Operations pushed whose completion `wait` has not returned yet.
    in_flight: usize,
    /// Operation (not watch) completions in `ready`.
    ready_ops: usize,
    /// (fd, token) of the one-shot watches.
    watches: Vec<(RawFd, u64)>,
    pollfds: Vec<libc::pollfd>,
    ready: Vec<Completion>,
    /// Files in memory, whose I/O `push` does at once (`Engine::set_memory_files`).
    memory_fds: Vec<RawFd>,
}

impl AioEngine {
    /// An AIO context for `depth` operations at once (more may be pushed: they are
    /// submitted as earlier ones complete) and its completion eventfd.
    pub fn new(depth: u32) -> Result<AioEngine> {
        let depth = depth.clamp(1, 4096);
        // SAFETY: eventfd takes plain integers and returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(Error::io("eventfd", io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a fresh fd that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the new context id into `ctx`, a live local that is
        // zero as the call requires.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                depth as libc::c_uint,
                &mut ctx as *mut libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(Error::io("io_setup", io::Error::last_os_error()));
        }
        let depth = depth as usize;
        Ok(AioEngine {
            ctx,
            depth,
            eventfd,
            pending: Vec::with_capacity(depth),
            submit_ptrs: Vec::with_capacity(depth),
            events: vec![IoEvent::default(); depth],
            submitted: 0,
            in_flight: 0,
            ready_ops: 0,
            watches: Vec::new(),
            pollfds: Vec::new(),
            ready: Vec::with_capacity(depth),
            memory_fds: Vec::new(),
        })
    }

    /// Hand pending iocbs to the kernel, as many as the context has room for. An iocb the
    /// kernel refuses outright completes here with the error.
    fn submit_pending(&mut self) -> Result<()> {
        while !self.pending.is_empty() {
            let room = self.depth - self.submitted;
            if room == 0 {
                return Ok(());
            }
            let count = room.min(self.pending.len());
            self.submit_ptrs.clear();
            self.submit_ptrs.extend(
                self.pending[..count]
                    .iter_mut()
                    .map(|iocb| iocb as *mut Iocb as usize),
            );
            // SAFETY: `submit_ptrs` holds `count` addresses of live iocbs in `pending`;
            // the kernel copies them during the call. Their buffers stay valid until
            // completion by the contract of `Engine::push`.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    count as libc::c_long,
                    self.submit_ptrs.as_mut_ptr(),
                )
            };
            if rc > 0 {
                let accepted = (rc as usize).min(count);
                self.submitted += accepted;
                self.pending.drain(..accepted);
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // The context is full (or io_submit returned 0): wait for completions.
                _ if rc == 0 => return Ok(()),
                Some(libc::EAGAIN) => return Ok(()),
                Some(libc::EINTR) => continue,
                Some(errno) => {
                    // The first iocb was refused; the ones after it were not looked at.
                    let iocb = self.pending.remove(0);
                    self.complete_refused(&iocb, errno);
                }
                None => return Err(Error::io("io_submit", err)),
            }
        }
        Ok(())
    }

    fn complete_refused(&mut self, iocb: &Iocb, errno: i32) {
        let result = if iocb.aio_lio_opcode == IOCB_CMD_FDSYNC && errno == libc::EINVAL {
            fdatasync(iocb.aio_fildes as RawFd)
        } else {
            -errno
        };
        self.ready_ops += 1;
        self.ready.push(Completion {
            token: iocb.aio_data,
            result,
        });
    }

    /// Move every finished event to `ready`, without blocking.
    fn reap(&mut self) -> Result<()> {
        while self.submitted > 0 {
            let mut zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `events` has room for `events.len()` io_events, which is what the
            // call may write; `zero` is a live timespec making the call non-blocking.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    0 as libc::c_long,
                    self.events.len() as libc::c_long,
                    self.events.as_mut_ptr(),
                    &mut zero as *mut libc::timespec,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(Error::io("io_getevents", err));
            }
            let count = (rc as usize).min(self.events.len());
            for event in &self.events[..count] {
                self.ready.push(Completion {
                    token: event.data,
                    result: event_result(event.res),
                });
            }
            self.submitted -= count.min(self.submitted);
            self.ready_ops += count;
            if count < self.events.len() {
                break;
            }
        }
        Ok(())
    }

    /// One `ppoll` on the eventfd and the watched fds; readable watches become
    /// completions and are removed.
    fn poll_once(&mut self, timeout: Option<Duration>) -> Result<()> {
        self.pollfds.clear();
        self.pollfds.push(libc::pollfd {
            fd: self.eventfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        self.pollfds
            .extend(self.watches.iter().map(|&(fd, _)| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            }));
        let ts = timeout.map(|t| libc::timespec {
            tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: t.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: `pollfds` is a live array of `len` pollfds the call may update; `ts_ptr`
        // is null or points at a live timespec; a null sigmask leaves the mask alone.
        let rc = unsafe {
            libc::ppoll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                ts_ptr,
                std::ptr::null(),
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                return Ok(());
            }
            return Err(Error::io("ppoll", err));
        }
        if rc == 0 {
            return Ok(());
        }
        if self.pollfds[0].revents != 0 {
            self.drain_eventfd();
        }
        // Backwards, so swap_remove only moves entries already looked at.
        for index in (0..self.watches.len()).rev() {
            let revents = self.pollfds[index + 1].revents;
            if revents == 0 {
                continue;
            }
            let (_, token) = self.watches.swap_remove(index);
            let result = if revents & libc::POLLNVAL != 0 {
                -libc::EBADF
            } else {
                i32::from(revents)
            };
            self.ready.push(Completion { token, result });
        }
        Ok(())
    }

    /// Whether the completion ring that `io_setup` mapped at the context's address holds
    /// events (`head != tail` of its `struct aio_ring` header, as libaio's user-space reaping
    /// reads it); `None` when the header's magic is not the one of fs/aio.c.
    fn events_in_ring(&self) -> Option<bool> {
        let header = self.ctx as usize as *mut u32;
        // SAFETY: io_setup mapped the ring at `ctx`, readable by this process, until the
        // io_destroy in Drop; its header is 8 aligned u32 words (id, nr, head, tail, magic,
        // ...). The kernel updates them concurrently, so they are read atomically.
        let word = |index: usize| unsafe { AtomicU32::from_ptr(header.add(index)) };
        if word(AIO_RING_MAGIC_WORD).load(Ordering::Relaxed) != AIO_RING_MAGIC {
            return None;
        }
        let head = word(AIO_RING_HEAD_WORD).load(Ordering::Acquire);
        let tail = word(AIO_RING_TAIL_WORD).load(Ordering::Acquire);
        Some(head != tail)
    }

    fn drain_eventfd(&mut self) {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live 8-byte local. The fd is non-blocking;
        // EAGAIN (already drained) is fine to ignore.
        unsafe {
            libc::read(
                self.eventfd.as_raw_fd(),
                count.as_mut_ptr().cast(),
                count.len(),
            )
        };
    }
}

/// An event's `res` (bytes or negative errno) as a completion result.
fn event_result(res: i64) -> i32 {
    i32::try_from(res).unwrap_or(if res < 0 { -libc::EIO } else { i32::MAX })
}

// `transfer_now` passes a 64-bit file offset as one system call argument: on 32-bit
// targets pread64 takes it split in two (and preadv's high half would be needed).
const _: () = assert!(
    usize::BITS == 64,
    "transfer_now's pread64/pwrite64 take the offset in one argument on 64-bit targets only"
);

/// One read, write or sync done synchronously: bytes moved, or a negative errno.
///
/// # Safety
/// For a read or write, `buf` is valid for `len` bytes (writable for a read); for a
/// vectored one, `buf` is an array of `len` iovecs whose buffers are valid likewise; as
/// `Engine::push` requires of its caller.
unsafe fn transfer_now(opcode: u16, fd: RawFd, buf: u64, len: u32, offset: i64) -> i32 {
    let buf = buf as usize as *mut libc::c_void;
    loop {
        let rc = match opcode {
            // The system calls themselves, not libc's wrappers: those are thread
            // cancellation points, and switching cancellation off and on around each call
            // took 1.5% of serve's time at 600k reads a second. The offset goes in one
            // argument, as on every 64-bit target (asserted above).
            // SAFETY: `buf` holds `len` writable bytes (this function's contract).
            IOCB_CMD_PREAD => unsafe {
                libc::syscall(libc::SYS_pread64, fd, buf, len as usize, offset)
            },
            // SAFETY: `buf` holds `len` readable bytes (this function's contract).
            IOCB_CMD_PWRITE => unsafe {
                libc::syscall(libc::SYS_pwrite64, fd, buf, len as usize, offset)
            },
            // preadv/pwritev take the offset split in two; on a 64-bit target the kernel
            // uses the low argument whole.
            // SAFETY: `buf` is an iovec array of `len` entries whose buffers are writable
            // (this function's contract).
            IOCB_CMD_PREADV => unsafe {
                libc::syscall(libc::SYS_preadv, fd, buf, len as usize, offset, 0)
            },
            // SAFETY: `buf` is an iovec array of `len` readable entries (the contract).
            IOCB_CMD_PWRITEV => unsafe {
                libc::syscall(libc::SYS_pwritev, fd, buf, len as usize, offset, 0)
            },
            _ => return fdatasync(fd),
        };
        if rc >= 0 {
            // At most `len`, which `push` checked fits an i32.
            return i32::try_from(rc).unwrap_or(i32::MAX);
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(errno) => return -errno,
            None => return -libc::EIO,
        }
    }
}

/// Synchronous fdatasync: 0 or a negative errno.
fn fdatasync(fd: RawFd) -> i32 {
    loop {
        // SAFETY: fdatasync takes an fd number and shares no memory.
        let rc = unsafe { libc::fdatasync(fd) };
        if rc == 0 {
            return 0;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(errno) => return -errno,
            None => return -libc::EIO,
        }
    }
}

impl Engine for AioEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Aio
    }

    /// AIO has no registered buffers: every op is a plain one.
    fn register_buffers(&mut self, _regions: &[(*mut u8, usize)]) -> Result<()> {
        Ok(())
    }

    unsafe fn push(&mut self, token: u64, op: Op) -> Result<()> {
        let (fd, opcode, buf, len, offset) = match op {
            Op::Read {
                fd,
                offset,
                buf,
                len,
            } => (fd, IOCB_CMD_PREAD, buf as u64, len, offset),
            Op::Write {
                fd,
                offset,
                buf,
                len,
            } => (fd, IOCB_CMD_PWRITE, buf as u64, len, offset),
            // A vectored op's "buffer" is its iovec array and its "length" the entries.
            Op::Readv {
                fd,
                offset,
                iov,
                iovcnt,
            } => (fd, IOCB_CMD_PREADV, iov as u64, iovcnt, offset),
            Op::Writev {
                fd,
                offset,
                iov,
                iovcnt,
            } => (fd, IOCB_CMD_PWRITEV, iov as u64, iovcnt, offset),
            Op::Fsync { fd } => (fd, IOCB_CMD_FDSYNC, 0, 0, 0),
        };
        if len > i32::MAX as u32 {
            return Err(Error::invalid(format!(
                "I/O of {len} bytes does not fit a completion result"
            )));
        }
        let offset = i64::try_from(offset)
            .map_err(|_| Error::invalid(format!("offset {offset} is too large")))?;
        if self.memory_fds.contains(&fd) {
            // SAFETY: the buffer is valid for `len` bytes by this function's contract.
            let result = unsafe { transfer_now(opcode, fd, buf, len, offset) };
            self.ready.push(Completion { token, result });
            self.ready_ops += 1;
            self.in_flight += 1;
            return Ok(());
        }
        if self.pending.len() >= self.depth {
            self.submit_pending()?;
        }
        self.pending.push(Iocb {
            aio_data: token,
            aio_lio_opcode: opcode,
            // A negative fd becomes a huge one the kernel answers with EBADF.
            aio_fildes: fd as u32,
            aio_buf: buf,
            aio_nbytes: u64::from(len),
            aio_offset: offset,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.eventfd.as_raw_fd() as u32,
            ..Iocb::default()
        });
        self.in_flight += 1;
        Ok(())
    }

    fn set_memory_files(&mut self, fds: &[RawFd]) -> Result<()> {
        self.memory_fds = fds.to_vec();
        Ok(())
    }

    fn watch_readable(&mut self, fd: RawFd, token: u64) -> Result<()> {
        self.watches.push((fd, token));
        Ok(())
    }

    fn wait(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            self.submit_pending()?;
            self.reap()?;
            // Reaping made room in the context: fill it before blocking.
            self.submit_pending()?;
            let remaining = timeout.map(|t| t.saturating_sub(start.elapsed()));
            let block = self.ready.len() < min_complete && remaining != Some(Duration::ZERO);
            if block {
                self.poll_once(remaining)?;
            } else {
                break;
            }
        }
        // Watches found readable meanwhile are reported too, even when not blocking.
        if !self.watches.is_empty() {
            self.poll_once(Some(Duration::ZERO))?;
        }
        self.in_flight -= self.ready_ops.min(self.in_flight);
        self.ready_ops = 0;
        out.append(&mut self.ready);
        Ok(())
    }

    fn submit(&mut self) -> Result<()> {
        self.submit_pending()
    }

    fn completions_ready(&mut self) -> bool {
        if !self.ready.is_empty() {
            return true;
        }
        if self.submitted == 0 {
            return false;
        }
        // A kernel that maps no ring we know: io_getevents would have to tell, so say yes
        // and let `wait` ask it.
        self.events_in_ring().unwrap_or(true)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for AioEngine {
    /// Reap (bounded) what is in flight, then destroy the context; `io_destroy` itself
    /// also waits for the kernel to finish with every iocb.
    fn drop(&mut self) {
        let start = Instant::now();
        while self.submitted > 0 {
            let Some(left) = DROP_WAIT.checked_sub(start.elapsed()) else {
                break;
            };
            let mut ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            // SAFETY: as in `reap`, with a live timespec bounding the wait.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    1 as libc::c_long,
                    self.events.len() as libc::c_long,
                    self.events.as_mut_ptr(),
                    &mut ts as *mut libc::timespec,
                )
            };
            if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
            if rc > 0 {
                self.submitted -= (rc as usize).min(self.submitted);
            }
        }
        // SAFETY: `ctx` came from io_setup and is destroyed once, here.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}
