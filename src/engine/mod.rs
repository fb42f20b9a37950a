//! I/O engines: io_uring first, Linux native AIO where io_uring is missing or disabled.
//! A queue thread owns one engine and blocks only inside it: event-channel and control fds
//! are watched through the same engine.

use std::os::fd::RawFd;
use std::time::Duration;

use crate::error::Result;

pub mod aio;
pub mod uring;

/// Which engine a queue uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// io_uring: batched submission, fixed buffers, polls fds through the same ring.
    Uring,
    /// Linux native AIO (io_submit) with an eventfd, waiting in poll(2).
    Aio,
}

/// One I/O on a file descriptor. Buffers are raw pointers: the caller keeps them alive and
/// untouched until the completion with the same token arrives (see [`Engine::push`]).
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Read {
        fd: RawFd,
        offset: u64,
        buf: *mut u8,
        len: u32,
    },
    Write {
        fd: RawFd,
        offset: u64,
        buf: *const u8,
        len: u32,
    },
    /// preadv: the `iovcnt` buffers of the array at `iov` are filled in order from `offset`.
    /// The array, like the buffers, stays valid until the completion.
    Readv {
        fd: RawFd,
        offset: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    },
    /// pwritev: the buffers of the array at `iov`, in order, written from `offset`.
    Writev {
        fd: RawFd,
        offset: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    },
    /// fdatasync: completed writes' data and the metadata needed to read them are durable.
    Fsync { fd: RawFd },
}

/// A finished operation or a watched fd that became readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub token: u64,
    /// Bytes moved (or poll revents for a watch), or a negative errno.
    pub result: i32,
}

/// A per-thread I/O engine.
pub trait Engine {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;

    /// Make later ops whose buffers lie inside these regions use registered (fixed)
    /// buffers where the engine has them. Call once, before any `push`.
    fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> Result<()>;

    /// Make later ops on these fds use registered files where the engine has them (saves
    /// the kernel a file lookup per op). The fds must stay open, and keep naming the same
    /// files, until the set is replaced by another call (an empty set unregisters) or the
    /// engine is dropped. Call only with no op in flight.
    fn register_files(&mut self, _fds: &[RawFd]) -> Result<()> {
        Ok(())
    }

    /// These fds are files in memory (tmpfs): their I/O never waits for a device. An engine
    /// whose kernel path does such I/O synchronously anyway may do it at once in `push`,
    /// its completion still returned by the next `wait` (native AIO does). The same rules
    /// as for `register_files`: the set holds until replaced (an empty set clears it), and
    /// is changed only with no op in flight.
    fn set_memory_files(&mut self, _fds: &[RawFd]) -> Result<()> {
        Ok(())
    }

    /// Queue `op`; it is submitted by the next `wait` (or earlier when the queue fills).
    ///
    /// # Safety
    /// The op's buffers (and a vectored op's iovec array) must stay valid (and, for reads,
    /// unaliased) until the completion carrying `token` has been returned by `wait`.
    unsafe fn push(&mut self, token: u64, op: Op) -> Result<()>;

    /// One-shot watch: a completion with `token` arrives once `fd` is readable.
    /// Re-arm after each such completion.
    fn watch_readable(&mut self, fd: RawFd, token: u64) -> Result<()>;

    /// Submit everything queued, then wait until at least `min_complete` completions are
    /// ready or `timeout` passes (`None`: no limit; `Some(ZERO)`: do not block), and
    /// append every ready completion to `out`.
    fn wait(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
    ) -> Result<()>;

    /// Submit everything queued now, without waiting and without collecting anything.
    fn submit(&mut self) -> Result<()>;

    /// Whether `wait` has completions to return, looked up without a system call: for
    /// busy polling, which must not enter the kernel on every turn. io_uring reads its
    /// completion queue (ops and watches); native AIO reads the completion ring the kernel
    /// maps into the process (ops only: its watches are seen by `wait` alone).
    fn completions_ready(&mut self) -> bool;

    /// Operations pushed whose completion `wait` has not returned yet (watches excluded).
    fn in_flight(&self) -> usize;

    /// Before blocking, `wait` spins this long watching for completions without system
    /// calls (tapdisk's polling-duration): lower latency for one busy core. Engines that
    /// cannot poll without system calls ignore it.
    fn set_busy_poll(&mut self, _window: Duration) {}
}

/// Make an engine of `kind` with room for `depth` operations in flight.
pub fn new_engine(kind: EngineKind, depth: u32) -> Result<Box<dyn Engine>> {
    match kind {
        EngineKind::Uring => Ok(Box::new(uring::UringEngine::new(depth)?)),
        EngineKind::Aio => Ok(Box::new(aio::AioEngine::new(depth)?)),
    }
}
