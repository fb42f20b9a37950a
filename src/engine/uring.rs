//! The io_uring engine.
//!
//! `push` only fills submission entries; the kernel is entered once per `wait`
//! (`io_uring_enter` with submit + wait + timeout through `IORING_ENTER_EXT_ARG`), or early
//! when the submission queue is full. Each entry's `user_data` is the index of a slot that
//! holds the caller's token and whether the entry is an operation or a watch, so `in_flight`
//! counts operations only. The completion queue is twice the submission queue, and `push`
//! never lets more entries be outstanding than the completion queue holds (it reaps first),
//! so completions are never dropped or parked in the kernel's overflow list.
//!
//! Short reads and writes are returned as they are: the caller decides whether to resubmit
//! the rest (the datapath does, for O_DIRECT on a file whose end it reached).
//!
//! Files are not registered: an fd number can be closed and reused for another file behind
//! the engine's back, and a stale registered file would then receive the I/O meant for the
//! new one. Buffers are registered when the caller gives their regions.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use super::{Completion, Engine, EngineKind, Op};
use crate::error::{Error, Result};

/// How long `Drop` waits for operations still in flight before giving up.
const DROP_WAIT: Duration = Duration::from_secs(30);

/// What a submission entry in flight stands for.
#[derive(Debug, Clone, Copy)]
struct Slot {
    token: u64,
    /// A poll (watch) rather than an operation: not counted in `in_flight`.
    watch: bool,
}

/// A region given to `register_buffers`, as addresses (so the engine stays `Send`).
#[derive(Debug, Clone, Copy)]
struct FixedRegion {
    start: usize,
    end: usize,
    index: u16,
}

pub struct UringEngine {
    ring: IoUring,
    /// Slot table indexed by `user_data`; `free` lists unused indices.
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Entries pushed or submitted whose completion has not been reaped (ops and watches).
    outstanding: usize,
    /// Operations pushed whose completion `wait` has not returned yet.
    in_flight: usize,
    /// Operation (not watch) completions in `ready`.
    ready_ops: usize,
    /// Completions reaped early (by `push` making room) and not yet returned by `wait`.
    ready: Vec<Completion>,
    fixed: Vec<FixedRegion>,
    /// Registered files, by index.
    files: Vec<RawFd>,
    busy_poll: Duration,
}

impl UringEngine {
    /// An io_uring with `depth` submission entries and twice that many completion entries.
    /// Fails (so the caller can pick AIO) when the kernel has no io_uring or one too old to
    /// take a timeout on `io_uring_enter` (before 5.11).
    pub fn new(depth: u32) -> Result<UringEngine> {
        let depth = depth.clamp(1, 4096);
        let cq_entries = depth.saturating_mul(2);
        let ring = IoUring::builder()
            .setup_cqsize(cq_entries)
            .build(depth)
            .map_err(|e| Error::io("io_uring_setup", e))?;
        if !ring.params().is_feature_ext_arg() {
            return Err(Error::unsupported(
                "io_uring without IORING_FEAT_EXT_ARG (kernel older than 5.11)",
            ));
        }
        let capacity = ring.params().cq_entries() as usize;
        Ok(UringEngine {
            ring,
            slots: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            outstanding: 0,
            in_flight: 0,
            ready_ops: 0,
            ready: Vec::with_capacity(capacity),
            fixed: Vec::new(),
            files: Vec::new(),
            busy_poll: Duration::ZERO,
        })
    }

    /// Whether ops inside the registered regions use fixed buffers (false when
    /// registration was refused for lack of locked memory or permission).
    pub fn fixed_buffers(&self) -> bool {
        !self.fixed.is_empty()
    }

    /// Whether ops on registered fds name them by index (false when the kernel refused).
    pub fn registered_files(&self) -> bool {
        !self.files.is_empty()
    }

    /// The registered-file index of `fd`, if it was registered.
    fn file_index(&self, fd: RawFd) -> Option<u32> {
        self.files.iter().position(|&f| f == fd).map(|i| i as u32)
    }

    fn cq_capacity(&self) -> usize {
        self.ring.params().cq_entries() as usize
    }

    fn alloc_slot(&mut self, token: u64, watch: bool) -> u64 {
        let slot = Slot { token, watch };
        match self.free.pop() {
            Some(index) => {
                self.slots[index as usize] = slot;
                u64::from(index)
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u64
            }
        }
    }

    /// The registered buffer index covering `[addr, addr+len)`, if any.
    fn fixed_index(&self, addr: usize, len: u32) -> Option<u16> {
        let end = addr.checked_add(len as usize)?;
        self.fixed
            .iter()
            .find(|r| addr >= r.start && end <= r.end)
            .map(|r| r.index)
    }

    /// Move every completion in the completion queue to `self.ready`.
    fn reap(&mut self) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let index = cqe.user_data() as usize;
            let Some(slot) = self.slots.get(index).copied() else {
                continue;
            };
            // The index fits in u32: slots never outgrow the completion queue's size.
            self.free.push(index as u32);
            self.outstanding -= 1;
            if !slot.watch {
                self.ready_ops += 1;
            }
            self.ready.push(Completion {
                token: slot.token,
                result: cqe.result(),
            });
        }
    }

    /// Submit queued entries, retrying past an entry the kernel rejected (it posts that
    /// entry's error as a completion and leaves the rest queued).
    fn submit_all(&mut self) -> Result<()> {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if retryable(&e) => {}
                Err(e) => return Err(Error::io("io_uring_enter", e)),
            }
            // Should the kernel stop early, what it rejected is now in the completion queue.
            self.reap();
        }
        Ok(())
    }

    /// Make room for one more entry: in the completion queue (so no completion can
    /// overflow) and in the submission queue.
    fn make_room(&mut self) -> Result<()> {
        while self.outstanding >= self.cq_capacity() {
            self.submit_all()?;
            self.reap();
            if self.outstanding < self.cq_capacity() {
                break;
            }
            if self.in_flight == self.ready_ops {
                return Err(Error::invalid(
                    "more watches than the completion queue holds",
                ));
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if retryable(&e) => {}
                Err(e) => return Err(Error::io("io_uring_enter", e)),
            }
            self.reap();
        }
        if self.ring.submission().is_full() {
            self.submit_all()?;
        }
        Ok(())
    }

    fn queue(&mut self, entry: squeue::Entry, token: u64, watch: bool) -> Result<()> {
        self.make_room()?;
        let user_data = self.alloc_slot(token, watch);
        let entry = entry.user_data(user_data);
        // SAFETY: the entry's buffer (if any) is valid until its completion by the contract of
        // `Engine::push`; polls and fsyncs carry no memory.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // make_room emptied the submission queue, so this does not happen; undo anyway.
            self.free.push(user_data as u32);
            return Err(Error::io(
                "io_uring submission queue",
                io::Error::from_raw_os_error(libc::EBUSY),
            ));
        }
        self.outstanding += 1;
        if !watch {
            self.in_flight += 1;
        }
        Ok(())
    }

    /// Spin on the completion queue (no system calls) until `min` completions are ready
    /// or `window` passes.
    fn spin(&mut self, min: usize, window: Duration) {
        let start = Instant::now();
        while self.ready.len() < min && start.elapsed() < window {
            std::hint::spin_loop();
            self.reap();
        }
    }

    /// One `io_uring_enter`: submit and wait for `want` completions at most `timeout`.
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> Result<()> {
        let result = match timeout {
            None => self.ring.submit_and_wait(want),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if retryable(&e) || e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) => Err(Error::io("io_uring_enter", e)),
        }
    }
}

/// Errors of `io_uring_enter` after which the caller simply tries again.
fn retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

fn check_len(len: u32) -> Result<()> {
    if len > i32::MAX as u32 {
        return Err(Error::invalid(format!(
            "I/O of {len} bytes does not fit a completion result"
        )));
    }
    Ok(())
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> Result<()> {
        if !self.fixed.is_empty() {
            return Err(Error::invalid("buffers are already registered"));
        }
        if regions.len() > usize::from(u16::MAX) {
            return Err(Error::invalid("too many buffer regions"));
        }
        let iovecs: Vec<libc::iovec> = regions
            .iter()
            .map(|&(base, len)| libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            })
            .collect();
        // SAFETY: the caller owns these regions for the engine's lifetime (that is what
        // registering them means); the kernel pins the pages and reads/writes them only
        // for ops that name them, which `push` issues under its own safety contract.
        let registered = unsafe { self.ring.submitter().register_buffers(&iovecs) };
        match registered {
            Ok(()) => {
                self.fixed = regions
                    .iter()
                    .zip(0u16..)
                    .map(|(&(base, len), index)| FixedRegion {
                        start: base as usize,
                        end: (base as usize).saturating_add(len),
                        index,
                    })
                    .collect();
                Ok(())
            }
            // Not enough locked memory (RLIMIT_MEMLOCK) or not allowed: plain ops work too.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::EPERM)) => Ok(()),
            Err(e) => Err(Error::io("io_uring register buffers", e)),
        }
    }

    fn register_files(&mut self, fds: &[RawFd]) -> Result<()> {
        if !self.files.is_empty() {
            // A registered file stays open in the kernel even once its fd is closed: drop
            // the old set before a pause closes the chain or a new chain replaces it.
            self.ring
                .submitter()
                .unregister_files()
                .map_err(|e| Error::io("io_uring unregister files", e))?;
            self.files.clear();
        }
        if fds.is_empty() {
            return Ok(());
        }
        match self.ring.submitter().register_files(fds) {
            Ok(()) => {
                self.files = fds.to_vec();
                Ok(())
            }
            // Registration is an optimisation: without it ops name the fd itself.
            Err(_) => Ok(()),
        }
    }

    unsafe fn push(&mut self, token: u64, op: Op) -> Result<()> {
        // One read or write entry: by registered file index or fd, from a registered buffer
        // or not (the four opcode/target combinations differ only in their types).
        macro_rules! transfer {
            ($plain:ident, $fixed:ident, $fd:expr, $offset:expr, $buf:expr, $len:expr) => {{
                check_len($len)?;
                let file = self.file_index($fd);
                match (file, self.fixed_index($buf as usize, $len)) {
                    (Some(file), Some(index)) => {
                        opcode::$fixed::new(types::Fixed(file), $buf, $len, index)
                            .offset($offset)
                            .build()
                    }
                    (Some(file), None) => opcode::$plain::new(types::Fixed(file), $buf, $len)
                        .offset($offset)
                        .build(),
                    (None, Some(index)) => opcode::$fixed::new(types::Fd($fd), $buf, $len, index)
                        .offset($offset)
                        .build(),
                    (None, None) => opcode::$plain::new(types::Fd($fd), $buf, $len)
                        .offset($offset)
                        .build(),
                }
            }};
        }
        let entry = match op {
            Op::Read {
                fd,
                offset,
                buf,
                len,
            } => transfer!(Read, ReadFixed, fd, offset, buf, len),
            Op::Write {
                fd,
                offset,
                buf,
                len,
            } => transfer!(Write, WriteFixed, fd, offset, buf, len),
            Op::Readv {
                fd,
                offset,
                iov,
                iovcnt,
            } => match self.file_index(fd) {
                Some(file) => opcode::Readv::new(types::Fixed(file), iov, iovcnt),
                None => opcode::Readv::new(types::Fd(fd), iov, iovcnt),
            }
            .offset(offset)
            .build(),
            Op::Writev {
                fd,
                offset,
                iov,
                iovcnt,
            } => match self.file_index(fd) {
                Some(file) => opcode::Writev::new(types::Fixed(file), iov, iovcnt),
                None => opcode::Writev::new(types::Fd(fd), iov, iovcnt),
            }
            .offset(offset)
            .build(),
            Op::Fsync { fd } => match self.file_index(fd) {
                Some(file) => opcode::Fsync::new(types::Fixed(file)),
                None => opcode::Fsync::new(types::Fd(fd)),
            }
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        };
        self.queue(entry, token, false)
    }

    fn watch_readable(&mut self, fd: RawFd, token: u64) -> Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
        self.queue(entry, token, true)
    }

    fn wait(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
    ) -> Result<()> {
        self.reap();
        let start = Instant::now();
        let blocking = self.ready.len() < min_complete && timeout != Some(Duration::ZERO);
        let window = timeout.map_or(self.busy_poll, |t| t.min(self.busy_poll));
        if !blocking || !window.is_zero() {
            self.submit_all()?;
            self.reap();
        }
        if blocking && !window.is_zero() {
            self.spin(min_complete, window);
        }
        while blocking && self.ready.len() < min_complete {
            let remaining = match timeout {
                None => None,
                Some(t) => match t.checked_sub(start.elapsed()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => break,
                },
            };
            // Submits whatever is queued and waits, in one system call. Should the kernel
            // reject an entry, it returns early and the next round submits the rest.
            self.enter(min_complete - self.ready.len(), remaining)?;
            self.reap();
        }
        self.in_flight -= self.ready_ops;
        self.ready_ops = 0;
        out.append(&mut self.ready);
        Ok(())
    }

    fn submit(&mut self) -> Result<()> {
        self.submit_all()
    }

    fn completions_ready(&mut self) -> bool {
        // The completion queue's tail is read with acquire ordering: memory only.
        self.reap();
        !self.ready.is_empty()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn set_busy_poll(&mut self, window: Duration) {
        self.busy_poll = window;
    }
}

impl Drop for UringEngine {
    /// Wait (bounded) for operations in flight, so the kernel is not left writing into
    /// buffers the caller frees after dropping the engine. Watches are simply dropped with
    /// the ring: a poll touches no caller memory.
    fn drop(&mut self) {
        let start = Instant::now();
        if self.submit_all().is_err() {
            return;
        }
        self.reap();
        while self.in_flight > self.ready_ops {
            let Some(left) = DROP_WAIT.checked_sub(start.elapsed()) else {
                return;
            };
            if self.enter(1, Some(left)).is_err() {
                return;
            }
            self.reap();
        }
    }
}
