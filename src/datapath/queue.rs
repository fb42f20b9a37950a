//! One queue of a device: a thread that owns a ring, its event channel, an engine, a buffer
//! pool and a worker. It blocks in exactly one place, `Engine::wait`, which also watches the
//! event channel, the worker's results and the wake signal (stop, pause, resume).
//!
//! Pause: asked through `Shared::pause`, the thread takes nothing new off the ring, lets
//! what is in flight finish, then unregisters the chain's files from its engine, drops its
//! image reference and counts itself paused; it sleeps until the flag clears, then takes the
//! image `Shared` holds then (perhaps a new chain) and goes on.
//!
//! A request goes: copied off the ring -> validated -> data pages resolved (grant copy into
//! the pool, or persistent mappings) -> image extents resolved -> engine ops (or worker jobs)
//! -> completions -> (reads in copy mode: grant copy back) -> (FUA/flush: worker flush) ->
//! response -> push with the notify rule.

use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::memory::{self, BufferPool, EventFd, IoMemory, PoolBuffer, Scatter};
use super::pgrants::{kept_pages, MappedPage, PersistentGrants};
use super::worker::{Job, JobResult, Worker};
use super::{op_class, QueueStats, Shared};
use crate::blkif::ring::{ring_entries, BackRing};
use crate::blkif::{
    self, decode_indirect_segments, op, status, Protocol, Request, RequestBody, Response, Segment,
    MAX_SEGMENTS_PER_REQUEST, PAGE_SIZE, SECTOR_SIZE,
};
use crate::engine::{new_engine, Completion, Engine, Op};
use crate::error::{Error, Result};
use crate::image::{Image, ImageFile, Layer, Mapping};
use crate::sys;
use crate::xen::{
    gntst, CopyDirection, CopySegment, EventChannel, GrantAccess, GrantMapping, GrantRef,
};

const TOKEN_EVTCHN: u64 = u64::MAX;
const TOKEN_WAKE: u64 = u64::MAX - 1;
const TOKEN_WORKER: u64 = u64::MAX - 2;

/// On a device, the I/O of requests taken off the ring goes to the engine this many
/// requests at a time, not all together once the ring is empty; and while the queue has at
/// most this many operations in flight, each request's I/O goes at once. A whole ring's
/// worth submitted at once reaches the device as one batch, which it answers as one batch,
/// and the queue falls into lockstep with it. Measured, 4 KiB random reads at QD32 on a disk
/// file, 1 queue: all at once 57k-62k IOPS; 1, 4 or 8 at a time 70k-77k, with serve at 80%
/// of a core for 1 and 61-64% for 4 and 8. Sending the first ones of a burst at once starts
/// the device while the rest are taken: 0.84-0.97x fio -> 0.94-1.04x (raw and VHD, same-run
/// pairs), for 3-8 points more CPU; 1 at a time throughout did as well for 13-15 points more.
/// On tmpfs the I/O completes as it is submitted and the extra system calls only cost
/// (190k -> 100k-135k IOPS for 1 at a time, io_uring), so there everything taken goes in
/// one submission.
const SUBMIT_BATCH: usize = 8;

/// Everything a queue thread starts from.
pub(crate) struct QueueSetup {
    pub index: usize,
    pub shared: Arc<Shared>,
    pub protocol: Protocol,
    pub ring: Box<dyn GrantMapping>,
    pub grants: Box<dyn GrantAccess>,
    pub evtchn: Box<dyn EventChannel>,
    pub persistent: bool,
    pub stats: Arc<QueueStats>,
    /// Signalled when `Shared::stopping` or `Shared::pause` changed.
    pub wake: Arc<EventFd>,
}

/// What happens once a request's data I/O is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Data I/O (or the flush/discard job itself) in flight.
    Io,
    /// A FUA write or barrier: data done, the flush job is in flight.
    Flushing,
}

/// A request between the ring and its response.
struct Slot {
    id: u64,
    response_op: u8,
    /// When it was taken off the ring, and its latency class (`OP_CLASSES`).
    taken: Instant,
    class: Option<usize>,
    status: i16,
    /// Engine ops and worker jobs not yet completed.
    pending: u32,
    phase: Phase,
    flush_after: bool,
    /// A barrier or discard: no other request runs beside it.
    exclusive: bool,
    /// Counted in `Shared::writes_in_flight` until answered.
    counted_write: bool,
    buffer: Option<PoolBuffer>,
    /// Persistent pages this request uses, held until it completes.
    pages: Vec<MappedPage>,
    /// Reads in copy mode: pool -> guest, once the data is in.
    copy_back: Vec<CopySegment>,
    /// The iovec arrays of its vectored engine ops, kept until they complete.
    iovecs: Vec<Vec<libc::iovec>>,
}

pub(crate) struct QueueThread {
    index: usize,
    shared: Arc<Shared>,
    ring: BackRing,
    /// Keeps the ring mapped; dropped after everything else that could touch it.
    _ring_mapping: Box<dyn GrantMapping>,
    evtchn: Box<dyn EventChannel>,
    // Drop order matters: the engine (which waits for its in-flight I/O) and the worker go
    // before the memory their I/O touches (pool, persistent pages held by slots), and the
    // grant handle goes last, after every mapping made through it.
    engine: Box<dyn Engine>,
    worker: Worker,
    pool: BufferPool,
    persistent: Option<PersistentGrants>,
    stats: Arc<QueueStats>,
    wake: Arc<EventFd>,
    max_indirect_segments: usize,
    read_only: bool,
    /// The chain served; `None` while paused.
    image: Option<Arc<Image>>,
    /// Counted in `ImageState::paused_queues`: nothing in flight, no image held.
    paused: bool,

    slots: Vec<Option<Slot>>,
    free_slots: Vec<usize>,
    in_use: usize,
    /// A request taken off the ring (and when) that must wait: for buffers, or for the
    /// queue to drain.
    deferred: Option<(Request, Instant)>,
    /// An exclusive request is running: take nothing new.
    exclusive_running: bool,
    /// The top image file is not on tmpfs: its I/O waits for a device, so requests taken
    /// are submitted as they start or `SUBMIT_BATCH` at a time (see there).
    device_backed: bool,
    stopping: bool,
    responses_waiting: bool,
    /// The deferred request is a write held back by another queue's discard: nothing of
    /// this queue will wake us when that ends, so sleep briefly instead of indefinitely.
    waiting_for_discard: bool,

    // Scratch space reused across requests (no allocation per request in steady state).
    segments: Vec<Segment>,
    /// Where a request's bytes live locally, in disk order: the pool buffer (copy mode) or
    /// each segment on its mapped guest page (persistent mode).
    pieces: Vec<IoMemory>,
    copies: Vec<CopySegment>,
    completions: Vec<Completion>,
    /// While `collect_completions` handles a batch: when the batch was collected, the
    /// clock of every `complete` in it. None outside a batch.
    batch_completed_at: Option<Instant>,
    job_results: Vec<JobResult>,
    /// Cleared `Slot::pages` and `Slot::copy_back` vectors of answered requests, reused.
    spare_pages: Vec<Vec<MappedPage>>,
    spare_copies: Vec<Vec<CopySegment>>,
    spare_iovecs: Vec<Vec<libc::iovec>>,
    indirect_page: Vec<u8>,
    grants: Box<dyn GrantAccess>,
}

/// The operation a request's latency is classed by: an INDIRECT request's inner one (its
/// response operation), else its own.
fn request_class_op(request: &Request, response_op: u8) -> u8 {
    if request.operation == op::INDIRECT {
        response_op
    } else {
        request.operation
    }
}

/// Grant-copy `segments` (one GNTTABOP_copy batch, counted in `grant_copies`); true when
/// every segment was copied.
///
/// # Safety
/// As [`GrantAccess::copy`].
unsafe fn grant_copy(
    grants: &mut dyn GrantAccess,
    stats: &QueueStats,
    direction: CopyDirection,
    segments: &mut [CopySegment],
) -> bool {
    stats.grant_copies.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the caller's contract is `copy`'s.
    let copied = unsafe { grants.copy(direction, segments) };
    copied.is_ok() && segments.iter().all(|s| s.status == gntst::OKAY)
}

impl QueueThread {
    /// The thread body: set up, serve until stopped, tear down.
    pub fn run(setup: QueueSetup) {
        let shared = Arc::clone(&setup.shared);
        let index = setup.index;
        match QueueThread::new(setup) {
            Ok(mut queue) => {
                if let Err(err) = queue.serve() {
                    queue.fail(format!("queue {index}: {err}"));
                }
                queue.drain();
                let paused = queue.paused;
                // Engine, worker, image and mappings go before the pause bookkeeping says so.
                drop(queue);
                shared.queue_exited(paused);
            }
            Err(err) => {
                shared.fail(format!("queue {index}: setup failed: {err}"));
                shared.queue_exited(false);
            }
        }
    }

    fn new(setup: QueueSetup) -> Result<QueueThread> {
        let config = &setup.shared.config;
        // First, so that the worker started below inherits the CPUs, and the pool and the
        // engine's rings are first touched there.
        if !config.queue_cpus.is_empty() {
            let cpus = &config.queue_cpus[setup.index % config.queue_cpus.len()];
            sys::run_current_thread_on(cpus)
                .map_err(|err| Error::io(&format!("running on CPUs {cpus:?}"), err))?;
        }
        let pages = setup.ring.len() / PAGE_SIZE;
        let ring_size = ring_entries(pages, setup.protocol) as usize;
        // SAFETY: the mapping is `len()` bytes, writable, and outlives the BackRing: both
        // live in this struct and the mapping field is declared after the ring.
        let ring = unsafe { BackRing::new(setup.ring.as_ptr(), setup.ring.len(), setup.protocol) };
        let max_indirect_segments = config.features.max_indirect_segments;
        let largest_request =
            blkif::MAX_SEGMENTS_PER_REQUEST.max(max_indirect_segments) * PAGE_SIZE;
        let pool = BufferPool::new(config.pool_bytes.max(largest_request))?;
        let depth = (ring_size * 2).clamp(64, 1024) as u32;
        let mut engine = new_engine(config.engine, depth)?;
        if config.register_buffers {
            engine.register_buffers(&[pool.region()])?;
        }
        let worker = Worker::spawn(format!("ferrotap-w{}", setup.index))?;
        let mut queue = QueueThread {
            index: setup.index,
            read_only: true,
            image: None,
            paused: false,
            shared: Arc::clone(&setup.shared),
            ring,
            _ring_mapping: setup.ring,
            grants: setup.grants,
            evtchn: setup.evtchn,
            engine,
            worker,
            pool,
            persistent: setup
                .persistent
                .then(|| PersistentGrants::new(kept_pages(ring_size, max_indirect_segments))),
            stats: setup.stats,
            wake: setup.wake,
            max_indirect_segments,
            slots: Vec::with_capacity(ring_size),
            free_slots: Vec::new(),
            in_use: 0,
            deferred: None,
            exclusive_running: false,
            device_backed: false,
            stopping: false,
            responses_waiting: false,
            waiting_for_discard: false,
            segments: Vec::with_capacity(
                max_indirect_segments.max(blkif::MAX_SEGMENTS_PER_REQUEST),
            ),
            pieces: Vec::with_capacity(max_indirect_segments.max(blkif::MAX_SEGMENTS_PER_REQUEST)),
            copies: Vec::with_capacity(max_indirect_segments.max(blkif::MAX_SEGMENTS_PER_REQUEST)),
            completions: Vec::with_capacity(depth as usize),
            batch_completed_at: None,
            job_results: Vec::new(),
            spare_pages: Vec::new(),
            spare_copies: Vec::new(),
            spare_iovecs: Vec::new(),
            indirect_page: vec![0; blkif::MAX_INDIRECT_PAGES_PER_REQUEST * PAGE_SIZE],
        };
        // A device connected while paused starts paused: no image yet.
        if !queue.acquire_image()? {
            queue.paused = true;
            let mut state = queue.shared.image.lock();
            state.paused_queues += 1;
            queue.shared.image_changed.notify_all();
        }
        Ok(queue)
    }

    fn fail(&mut self, message: String) {
        self.shared.fail(message);
        self.stopping = true;
    }

    /// Take the image `Shared` holds and register its files with the engine; false when
    /// there is none, or (resuming) when a new pause was asked meanwhile. Resuming leaves
    /// the paused count in the same critical section that takes the image, so a pause that
    /// finds this queue counted as paused also finds it holding nothing.
    fn acquire_image(&mut self) -> Result<bool> {
        let image = {
            let mut state = self.shared.image.lock();
            if self.paused && self.shared.pause.load(Ordering::SeqCst) {
                return Ok(false);
            }
            let Some(image) = state.image.clone() else {
                return Ok(false);
            };
            if self.paused {
                self.paused = false;
                state.paused_queues = state.paused_queues.saturating_sub(1);
                self.shared.image_changed.notify_all();
            }
            image
        };
        // The files stay open while this thread holds the image; they are unregistered
        // before it lets go (pause) and the engine goes before the image (drop order).
        let fds: Vec<_> = image
            .layers()
            .iter()
            .map(|layer| layer.file().raw_fd())
            .collect();
        self.engine.register_files(&fds)?;
        // Unknown (statfs failed) counts as a device: its I/O goes through the engine,
        // and batches of 8 are right for either.
        let in_memory: Vec<_> = image
            .layers()
            .iter()
            .map(|layer| layer.file())
            .filter(|file| matches!(file.is_memory_backed(), Ok(true)))
            .map(|file| file.raw_fd())
            .collect();
        self.engine.set_memory_files(&in_memory)?;
        self.read_only = image.read_only();
        self.device_backed = !in_memory.contains(&image.top().file().raw_fd());
        self.image = Some(image);
        Ok(true)
    }

    /// Nothing in flight: unregister the chain's files, drop the image, count as paused.
    fn release_image(&mut self) -> Result<()> {
        self.engine.register_files(&[])?;
        self.engine.set_memory_files(&[])?;
        self.image = None;
        self.paused = true;
        let mut state = self.shared.image.lock();
        state.paused_queues += 1;
        self.shared.image_changed.notify_all();
        Ok(())
    }

    /// Nothing of this queue in flight: no slot, engine op or worker job.
    fn idle(&self) -> bool {
        self.in_use == 0 && self.engine.in_flight() == 0 && self.worker.pending() == 0
    }

    /// Follow `Shared::pause`: once idle, let go of the image; once cleared, take it back.
    fn follow_pause(&mut self) -> Result<()> {
        let pause = self.shared.pause.load(Ordering::Acquire);
        if pause && !self.paused && self.idle() {
            self.release_image()?;
        } else if !pause && self.paused {
            self.acquire_image()?;
        }
        Ok(())
    }

    /// Paused, or asked to pause: take nothing new.
    fn holding(&self) -> bool {
        self.paused || self.shared.pause.load(Ordering::Acquire)
    }

    fn serve(&mut self) -> Result<()> {
        self.engine.watch_readable(self.evtchn.fd(), TOKEN_EVTCHN)?;
        self.engine.watch_readable(self.wake.fd(), TOKEN_WAKE)?;
        self.engine
            .watch_readable(self.worker.wake_fd(), TOKEN_WORKER)?;
        let poll_window = self.shared.config.poll_window;
        loop {
            if self.shared.stopping.load(Ordering::Acquire) {
                self.stopping = true;
            }
            if !self.stopping {
                self.follow_pause()?;
            }
            let taking = !self.stopping && !self.holding();
            if taking {
                if let Err(err) = self.take_requests() {
                    self.fail(format!("queue {}: {err}", self.index));
                }
            }
            self.push_responses();
            if self.stopping {
                return Ok(());
            }
            // Sleep only after the final check (it also sets req_event so the frontend
            // notifies us), and only when we could take a request if one came. While
            // pausing, requests stay on the ring; resuming takes them without a notify.
            // The polling window comes first: while it lasts req_event is muted, so a
            // frontend that keeps the ring busy sends no notification (a system call on
            // each side, and a wake-up, saved per request).
            let can_take = taking && self.deferred.is_none() && !self.exclusive_running;
            if !poll_window.is_zero() && self.busy_poll(poll_window, can_take)? {
                continue;
            }
            if can_take && self.ring.final_check_for_requests() {
                continue;
            }
            let timeout = if std::mem::take(&mut self.waiting_for_discard) {
                Some(Duration::from_micros(200))
            } else {
                None
            };
            self.collect_completions(1, timeout)?;
            self.stats.wakeups.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wait as [`Engine::wait`] does and handle what it returns; true when it returned any.
    fn collect_completions(
        &mut self,
        min_complete: usize,
        timeout: Option<Duration>,
    ) -> Result<bool> {
        self.completions.clear();
        let mut completions = std::mem::take(&mut self.completions);
        self.engine.wait(min_complete, timeout, &mut completions)?;
        let got = !completions.is_empty();
        if got {
            self.batch_completed_at = Some(Instant::now());
        }
        let mut result = Ok(());
        for completion in completions.drain(..) {
            result = self.on_completion(completion);
            if result.is_err() {
                break;
            }
        }
        self.batch_completed_at = None;
        self.completions = completions;
        result.map(|()| got)
    }

    /// Spin for up to `window` for work, reading memory only: the ring (req_event is muted
    /// first: the one armed before the last sleep would still have the frontend notify
    /// the next request, which the window takes anyway), the engine's completion queue
    /// (`completions_ready`) and the stop and pause flags. A system call only when something
    /// is there to collect, and, while worker jobs are out, a look at the engine's watches
    /// (its wake fd) every `WORKER_LOOK_SPINS` turns, which native AIO sees only in `wait`.
    /// True when work came (the caller goes round again), false when the window passed
    /// without any or I/O in flight ended it (`sleeps_through_io`).
    fn busy_poll(&mut self, window: Duration, can_take: bool) -> Result<bool> {
        const WORKER_LOOK_SPINS: u32 = 64;
        // I/O in flight that the window sleeps through (`sleeps_through_io`): leaving before
        // submitting it lets the wait that follows submit and sleep in one system call.
        if self.device_backed && self.sleeps_through_io() {
            return Ok(false);
        }
        if can_take {
            self.ring.mute_request_notifications();
        }
        self.engine.submit()?;
        let pause = self.shared.pause.load(Ordering::Acquire);
        let deadline = Instant::now() + window;
        let mut spins = 0u32;
        loop {
            if can_take {
                let consumed = self.ring.unanswered();
                if let Err(err) = self.take_requests() {
                    self.fail(format!("queue {}: {err}", self.index));
                    return Ok(true);
                }
                // Taken (perhaps answered at once: a request refused by validation leaves
                // `unanswered` as it was but a response waiting to be pushed).
                if self.ring.unanswered() != consumed || self.responses_waiting {
                    return Ok(true);
                }
            }
            spins = spins.wrapping_add(1);
            let look_at_worker =
                self.worker.pending() > 0 && spins.is_multiple_of(WORKER_LOOK_SPINS);
            if (look_at_worker || self.engine.completions_ready())
                && self.collect_completions(0, Some(Duration::ZERO))?
            {
                return Ok(true);
            }
            if self.shared.stopping.load(Ordering::Acquire)
                || self.shared.pause.load(Ordering::Acquire) != pause
            {
                return Ok(true);
            }
            if self.sleeps_through_io() {
                return Ok(false);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::yield_now();
        }
    }

    /// Whether the I/O in flight ends the polling window, the thread sleeping until a
    /// completion wakes it.
    /// - In memory (tmpfs), I/O completes as it is pushed (native AIO,
    ///   `Engine::set_memory_files`), so any still in flight went to a kernel worker
    ///   (io_uring): sleep.
    /// - On a device, several operations in flight are slept through: spinning only takes
    ///   CPU that the device's own work needs (measured: 4 KiB random reads at QD32 on a
    ///   disk file lost 10-15% to it).
    /// - On a device, a lone operation (a guest at QD1) is waited for spinning: waking from
    ///   a sleep costs 30-45 µs on a virtual machine, near the read's own 40 µs. Measured,
    ///   4 KiB random reads at QD1 on a disk file, 1 queue, alternating runs: p99 1.5-2.2x
    ///   fio's sleeping, 0.6-0.9x spinning, for 97% of a core instead of 45% while the
    ///   guest keeps the queue busy (the window still bounds each spin).
    fn sleeps_through_io(&self) -> bool {
        let in_flight = self.engine.in_flight();
        if self.device_backed {
            in_flight > 1
        } else {
            in_flight > 0
        }
    }

    /// After serving: finish everything in flight, answer it, and stop.
    fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while (self.in_use > 0 || self.engine.in_flight() > 0 || self.worker.pending() > 0)
            && Instant::now() < deadline
        {
            self.completions.clear();
            let mut completions = std::mem::take(&mut self.completions);
            if self
                .engine
                .wait(1, Some(Duration::from_millis(100)), &mut completions)
                .is_err()
            {
                break;
            }
            // Worker results may be waiting without a watch armed any more.
            completions.push(Completion {
                token: TOKEN_WORKER,
                result: 0,
            });
            for completion in completions.drain(..) {
                if self.on_completion(completion).is_err() {
                    break;
                }
            }
            self.completions = completions;
            self.push_responses();
        }
        self.push_responses();
    }

    fn on_completion(&mut self, completion: Completion) -> Result<()> {
        match completion.token {
            TOKEN_EVTCHN => {
                self.evtchn.drain()?;
                if !self.stopping {
                    self.engine.watch_readable(self.evtchn.fd(), TOKEN_EVTCHN)?;
                }
            }
            TOKEN_WAKE => {
                self.wake.clear();
                if self.shared.stopping.load(Ordering::Acquire) {
                    self.stopping = true;
                } else {
                    self.engine.watch_readable(self.wake.fd(), TOKEN_WAKE)?;
                }
            }
            TOKEN_WORKER => {
                let mut results = std::mem::take(&mut self.job_results);
                self.worker.collect(&mut results);
                for result in results.drain(..) {
                    let ok = match &result.result {
                        Ok(()) => true,
                        Err(err) => {
                            eprintln!("ferrotap: queue {}: {err}", self.index);
                            false
                        }
                    };
                    self.op_done(result.token as usize, ok);
                }
                self.job_results = results;
                if !self.stopping {
                    self.engine
                        .watch_readable(self.worker.wake_fd(), TOKEN_WORKER)?;
                }
            }
            token => {
                let ok = completion.result >= 0;
                if !ok {
                    eprintln!(
                        "ferrotap: queue {}: I/O failed: {}",
                        self.index,
                        std::io::Error::from_raw_os_error(-completion.result)
                    );
                }
                self.op_done(token as usize, ok);
            }
        }
        Ok(())
    }

    /// Take requests off the ring while there is room for them; on a device, their I/O is
    /// submitted as they start while few operations are in flight, `SUBMIT_BATCH` requests
    /// at a time past that.
    fn take_requests(&mut self) -> Result<()> {
        let mut started = 0usize;
        // One clock read per SUBMIT_BATCH requests taken, not one per request. Fresh
        // for each group: on tmpfs every start reads its data at once, so a whole pass can
        // take tens of microseconds.
        let mut group_taken: Option<Instant> = None;
        loop {
            if self.exclusive_running {
                return Ok(());
            }
            let (request, taken) = match self.deferred.take() {
                Some(deferred) => deferred,
                None => match self
                    .ring
                    .next_request()
                    .map_err(|err| Error::invalid(err.to_string()))?
                {
                    Some(request) => {
                        self.stats.requests.fetch_add(1, Ordering::Relaxed);
                        (request, *group_taken.get_or_insert_with(Instant::now))
                    }
                    None => return Ok(()),
                },
            };
            if let Some(waiting) = self.start(request, taken) {
                self.deferred = Some((waiting, taken));
                return Ok(());
            }
            started += 1;
            let batch_full = started.is_multiple_of(SUBMIT_BATCH);
            if batch_full {
                group_taken = None;
            }
            // With little in flight, send each at once: the device works while the rest is taken.
            if self.device_backed && (batch_full || self.engine.in_flight() <= SUBMIT_BATCH) {
                self.engine.submit()?;
            }
        }
    }

    fn alloc_slot(&mut self, request: &Request, response_op: u8, taken: Instant) -> usize {
        let slot = Slot {
            id: request.id,
            response_op,
            taken,
            class: op_class(request_class_op(request, response_op)),
            status: status::OKAY,
            pending: 0,
            phase: Phase::Io,
            flush_after: false,
            exclusive: false,
            counted_write: false,
            buffer: None,
            pages: self.spare_pages.pop().unwrap_or_default(),
            copy_back: self.spare_copies.pop().unwrap_or_default(),
            iovecs: Vec::new(),
        };
        self.in_use += 1;
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        match self.free_slots.pop() {
            Some(index) => {
                self.slots[index] = Some(slot);
                index
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    /// Answer at once, without a slot.
    fn respond_now(&mut self, request: &Request, response_op: u8, status: i16, taken: Instant) {
        if let Some(class) = op_class(request_class_op(request, response_op)) {
            self.stats.latency[class].record(taken.elapsed().as_micros() as u64);
        }
        if status == status::ERROR {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        } else if status == status::EOPNOTSUPP {
            self.stats.unsupported.fetch_add(1, Ordering::Relaxed);
        }
        self.ring.put_response(&Response {
            id: request.id,
            operation: response_op,
            status,
        });
        self.responses_waiting = true;
    }

    /// Start a request. Returns it back when it must wait (buffers, or exclusivity).
    fn start(&mut self, request: Request, taken: Instant) -> Option<Request> {
        let features = &self.shared.config.features;
        let (data_op, response_op) = match (request.operation, request.body) {
            (
                op::READ | op::WRITE | op::FLUSH_DISKCACHE | op::WRITE_BARRIER,
                RequestBody::Direct { .. },
            ) => (request.operation, request.operation),
            (op::INDIRECT, RequestBody::Indirect { indirect_op, .. }) => {
                // The response carries the inner operation: Linux blkfront stops on op 6.
                if !matches!(indirect_op, op::READ | op::WRITE) {
                    self.respond_now(&request, indirect_op, status::ERROR, taken);
                    return None;
                }
                (indirect_op, indirect_op)
            }
            (op::DISCARD, RequestBody::Discard { .. }) => (op::DISCARD, op::DISCARD),
            (other, _) => {
                self.respond_now(&request, other, status::EOPNOTSUPP, taken);
                return None;
            }
        };
        let supported = match data_op {
            op::WRITE_BARRIER => features.barrier,
            op::FLUSH_DISKCACHE => features.flush,
            op::DISCARD => features.discard,
            _ => true,
        };
        if !supported {
            self.respond_now(&request, response_op, status::EOPNOTSUPP, taken);
            return None;
        }
        let exclusive = matches!(data_op, op::WRITE_BARRIER | op::DISCARD);
        if exclusive && self.in_use > 0 {
            // Let everything before it finish first.
            return Some(request);
        }
        match data_op {
            op::DISCARD => {
                self.start_discard(&request, taken);
                None
            }
            _ => self.start_data(&request, data_op, response_op, exclusive, taken),
        }
    }

    fn start_discard(&mut self, request: &Request, taken: Instant) {
        let RequestBody::Discard { flag, nr_sectors } = request.body else {
            self.respond_now(request, op::DISCARD, status::ERROR, taken);
            return;
        };
        if flag & blkif::DISCARD_SECURE != 0 && !self.shared.config.features.discard_secure {
            self.respond_now(request, op::DISCARD, status::EOPNOTSUPP, taken);
            return;
        }
        if self.read_only || !self.in_disk(request.sector, nr_sectors) {
            self.respond_now(request, op::DISCARD, status::ERROR, taken);
            return;
        }
        let Some(image) = self.image.clone() else {
            self.respond_now(request, op::DISCARD, status::ERROR, taken);
            return;
        };
        self.stats.discards.fetch_add(1, Ordering::Relaxed);
        let slot = self.alloc_slot(request, op::DISCARD, taken);
        self.set_exclusive(slot);
        let shared = Arc::clone(&self.shared);
        let (offset, len) = (request.sector * SECTOR_SIZE, nr_sectors * SECTOR_SIZE);
        self.submit_job(
            slot,
            Box::new(move || {
                // New writes on every queue wait while this is non-zero; the ones already
                // mapped drain (this queue has none: a discard runs alone on its queue).
                shared.discards_waiting.fetch_add(1, Ordering::SeqCst);
                while shared.writes_in_flight.load(Ordering::SeqCst) > 0 {
                    std::thread::sleep(Duration::from_micros(50));
                }
                let result = image.discard(offset, len);
                shared.discards_waiting.fetch_sub(1, Ordering::SeqCst);
                result
            }),
        );
        self.finish_if_done(slot);
    }

    /// Count a write request in before it maps anything; false (not counted) while a
    /// discard waits: the request must wait too. The increment comes before the check, and
    /// the discard's increment before its check, so one of the two always sees the other.
    fn enter_write(&mut self) -> bool {
        self.shared.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        if self.shared.discards_waiting.load(Ordering::SeqCst) > 0 {
            self.shared.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
            self.waiting_for_discard = true;
            return false;
        }
        true
    }

    fn leave_write(&mut self) {
        self.shared.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    fn set_exclusive(&mut self, slot: usize) {
        if let Some(s) = self.slots[slot].as_mut() {
            s.exclusive = true;
        }
        self.exclusive_running = true;
    }

    fn in_disk(&self, sector: u64, count: u64) -> bool {
        sector
            .checked_add(count)
            .is_some_and(|end| end <= self.shared.sectors.load(Ordering::Relaxed))
    }

    /// Gather the request's segments into `self.segments`; false when they are invalid or
    /// their indirect pages cannot be read.
    fn gather_segments(&mut self, request: &Request, data_op: u8) -> bool {
        self.segments.clear();
        match request.body {
            RequestBody::Direct {
                nr_segments,
                segments,
            } => {
                let n = nr_segments as usize;
                let flush_only =
                    n == 0 && matches!(data_op, op::FLUSH_DISKCACHE | op::WRITE_BARRIER);
                if (n == 0 && !flush_only) || n > blkif::MAX_SEGMENTS_PER_REQUEST {
                    return false;
                }
                self.segments.extend_from_slice(&segments[..n]);
            }
            RequestBody::Indirect {
                indirect_op,
                nr_segments,
                indirect_grefs,
            } => {
                let n = nr_segments as usize;
                if !matches!(indirect_op, op::READ | op::WRITE)
                    || n == 0
                    || n > self.max_indirect_segments
                {
                    return false;
                }
                let pages = n.div_ceil(blkif::SEGMENTS_PER_INDIRECT_PAGE);
                if pages > blkif::MAX_INDIRECT_PAGES_PER_REQUEST {
                    return false;
                }
                if !self.read_indirect_pages(&indirect_grefs[..pages], n) {
                    return false;
                }
                self.segments.resize(n, Segment::default());
                let per_page = self.segments.chunks_mut(blkif::SEGMENTS_PER_INDIRECT_PAGE);
                for (page, segments) in self.indirect_page.chunks(PAGE_SIZE).zip(per_page) {
                    decode_indirect_segments(page, segments);
                }
            }
            RequestBody::Discard { .. } => return false,
        }
        self.segments
            .iter()
            .all(|s| s.first_sect <= s.last_sect && s.last_sect < blkif::SECTORS_PER_PAGE)
    }

    /// Copy the descriptors of a request's `n` segments out of its indirect pages `grefs`
    /// into `indirect_page`, where alone they are looked at. A frontend that keeps its
    /// grants has its indirect pages mapped and kept like its data pages (as blkback does),
    /// when they are mapped already or fit under the bound; otherwise they are
    /// grant-copied.
    fn read_indirect_pages(&mut self, grefs: &[GrantRef], n: usize) -> bool {
        let bytes_in = |page: usize| {
            (n - page * blkif::SEGMENTS_PER_INDIRECT_PAGE).min(blkif::SEGMENTS_PER_INDIRECT_PAGE)
                * blkif::SEGMENT_SIZE
        };
        if let Some(persistent) = self.persistent.as_mut() {
            if persistent.has_room_for(grefs.iter().copied()) {
                for (page, gref) in grefs.iter().enumerate() {
                    let Ok(mapped) = persistent.get(self.grants.as_mut(), *gref, false) else {
                        return false;
                    };
                    let len = bytes_in(page);
                    if mapped.len() < len {
                        return false;
                    }
                    let local = &mut self.indirect_page[page * PAGE_SIZE..][..len];
                    // SAFETY: the mapping holds at least `len` bytes (checked) and `local` is
                    // ours. The guest may write its page meanwhile, as during a grant copy:
                    // only the copy is looked at.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            mapped.as_ptr().as_ptr(),
                            local.as_mut_ptr(),
                            len,
                        );
                    }
                }
                return true;
            }
        }
        self.copies.clear();
        for (page, gref) in grefs.iter().enumerate() {
            let local = NonNull::from(&mut self.indirect_page[page * PAGE_SIZE]);
            self.copies.push(CopySegment {
                gref: *gref,
                offset: 0,
                len: bytes_in(page) as u16,
                local,
                status: gntst::OKAY,
            });
        }
        // SAFETY: every local pointer is inside `indirect_page` (8 pages), each segment at
        // most one page, and nothing else touches it during the call.
        unsafe {
            grant_copy(
                self.grants.as_mut(),
                &self.stats,
                CopyDirection::FromGuest,
                &mut self.copies,
            )
        }
    }

    fn start_data(
        &mut self,
        request: &Request,
        data_op: u8,
        response_op: u8,
        exclusive: bool,
        taken: Instant,
    ) -> Option<Request> {
        if !self.gather_segments(request, data_op) {
            self.respond_now(request, response_op, status::ERROR, taken);
            return None;
        }
        let total_sectors: u64 = self
            .segments
            .iter()
            .map(|s| u64::from(s.last_sect - s.first_sect) + 1)
            .sum();
        let is_read = data_op == op::READ;
        // An empty flush carries no range: Linux blkfront sends blk-mq's flush request,
        // whose sector is (sector_t)-1, and blkback ignores it as well.
        let has_range = total_sectors > 0;
        if (has_range && !self.in_disk(request.sector, total_sectors))
            || (!is_read && has_range && self.read_only)
        {
            self.respond_now(request, response_op, status::ERROR, taken);
            return None;
        }
        let bytes = (total_sectors * SECTOR_SIZE) as usize;
        let counted_write = !is_read && bytes > 0;
        if counted_write && !self.enter_write() {
            return Some(*request);
        }
        // Buffers first: without them the request waits, untouched. Persistent mappings
        // serve direct requests, and an indirect one (up to 256 pages) whose pages are
        // mapped already or fit beside those: a frontend that reuses its grants, as
        // blkif.h asks, has its I/O done straight on its pages. Otherwise an indirect
        // request would churn the LRU with a map and an unmap per page, so its pages are
        // copied like a non-persistent frontend's.
        let copy = match &self.persistent {
            None => true,
            Some(persistent) => {
                self.segments.len() > MAX_SEGMENTS_PER_REQUEST
                    && !persistent.has_room_for(self.segments.iter().map(|s| s.gref))
            }
        };
        let buffer = if copy && bytes > 0 {
            match self.pool.alloc(bytes) {
                Some(buffer) => Some(buffer),
                None => {
                    if counted_write {
                        self.leave_write();
                    }
                    return Some(*request);
                }
            }
        } else {
            None
        };
        match data_op {
            op::READ => {
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_read
                    .fetch_add(bytes as u64, Ordering::Relaxed);
            }
            op::WRITE => {
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_written
                    .fetch_add(bytes as u64, Ordering::Relaxed);
            }
            _ => {
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_written
                    .fetch_add(bytes as u64, Ordering::Relaxed);
            }
        }
        let slot = self.alloc_slot(request, response_op, taken);
        if let Some(s) = self.slots[slot].as_mut() {
            s.counted_write = counted_write;
        }
        if exclusive {
            self.set_exclusive(slot);
        }
        if matches!(data_op, op::FLUSH_DISKCACHE | op::WRITE_BARRIER) {
            if let Some(s) = self.slots[slot].as_mut() {
                s.flush_after = true;
            }
        }
        if bytes > 0 {
            if !self.resolve_memory(slot, buffer, is_read) {
                self.set_status(slot, status::ERROR);
            }
            if self.slot_ok(slot) {
                self.pieces_to_io(slot, request.sector * SECTOR_SIZE, is_read);
            }
        }
        self.finish_if_done(slot);
        None
    }

    fn slot_ok(&self, slot: usize) -> bool {
        self.slots[slot]
            .as_ref()
            .is_some_and(|s| s.status == status::OKAY)
    }

    fn set_status(&mut self, slot: usize, st: i16) {
        if let Some(s) = self.slots[slot].as_mut() {
            if s.status == status::OKAY {
                s.status = st;
            }
        }
    }

    /// Turn `self.segments` into `self.pieces`: where each segment's bytes live locally.
    /// Copy mode: one piece over the pool buffer (a write's data is copied in now).
    /// Persistent mode: one piece per segment, on the mapped guest page.
    fn resolve_memory(&mut self, slot: usize, buffer: Option<PoolBuffer>, is_read: bool) -> bool {
        self.pieces.clear();
        if let Some(buffer) = buffer {
            let whole = IoMemory {
                ptr: buffer.ptr(),
                len: self
                    .segments
                    .iter()
                    .map(|s| (usize::from(s.last_sect - s.first_sect) + 1) * SECTOR_SIZE as usize)
                    .sum(),
            };
            self.copies.clear();
            let mut at = 0usize;
            for seg in &self.segments {
                let len = (usize::from(seg.last_sect - seg.first_sect) + 1) * SECTOR_SIZE as usize;
                self.copies.push(CopySegment {
                    gref: seg.gref,
                    offset: u16::from(seg.first_sect) * SECTOR_SIZE as u16,
                    len: len as u16,
                    // SAFETY: `at + len` <= the summed length, which the buffer holds.
                    local: unsafe { buffer.ptr().add(at) },
                    status: gntst::OKAY,
                });
                at += len;
            }
            self.pieces.push(whole);
            let s = self.slots[slot].as_mut();
            let Some(s) = s else { return false };
            s.buffer = Some(buffer);
            if is_read {
                s.copy_back.extend_from_slice(&self.copies);
                return true;
            }
            // SAFETY: every local pointer lies inside this request's pool buffer, which the
            // slot owns and nothing else touches until the request completes.
            return unsafe {
                grant_copy(
                    self.grants.as_mut(),
                    &self.stats,
                    CopyDirection::FromGuest,
                    &mut self.copies,
                )
            };
        }
        let Some(persistent) = self.persistent.as_mut() else {
            return false;
        };
        self.stats
            .persistent_grants
            .store(persistent.len() as u64, Ordering::Relaxed);
        for seg in &self.segments {
            let page = match persistent.get(self.grants.as_mut(), seg.gref, is_read) {
                Ok(page) => page,
                Err(_) => return false,
            };
            let offset = usize::from(seg.first_sect) * SECTOR_SIZE as usize;
            let len = (usize::from(seg.last_sect - seg.first_sect) + 1) * SECTOR_SIZE as usize;
            // SAFETY: first_sect <= last_sect < 8, so offset + len <= 4096 = the mapping.
            let ptr = unsafe { page.as_ptr().add(offset) };
            self.pieces.push(IoMemory { ptr, len });
            if let Some(s) = self.slots[slot].as_mut() {
                s.pages.push(page);
            }
        }
        true
    }

    /// Issue the I/O of the request's pieces, which cover the disk from `disk_start` on.
    fn pieces_to_io(&mut self, slot: usize, disk_start: u64, is_read: bool) {
        let pieces = std::mem::take(&mut self.pieces);
        let memory = Scatter::new(&pieces);
        let result = if is_read {
            self.read_range(slot, 0, disk_start, memory)
        } else {
            self.write_range(slot, disk_start, memory)
        };
        if let Err(err) = result {
            eprintln!("ferrotap: queue {}: {err}", self.index);
            self.set_status(slot, status::ERROR);
        }
        self.pieces = pieces;
    }

    /// Read guest bytes `[pos, pos + memory.len())` as layer `depth` and those below see
    /// them.
    fn read_range(&mut self, slot: usize, depth: usize, pos: u64, memory: Scatter) -> Result<()> {
        let image = self.served_image()?;
        let layers = image.layers();
        let Some(layer) = layers.get(depth) else {
            // SAFETY: the slot owns `memory` and no I/O into it is in flight for this range.
            unsafe { memory.zero() };
            return Ok(());
        };
        let size = layer.virtual_size();
        let mut done = 0usize;
        while done < memory.len() {
            let at = pos + done as u64;
            let rest = memory.sub(done, memory.len() - done);
            if at >= size {
                // Past a smaller parent's end: zeros.
                // SAFETY: as above.
                unsafe { rest.zero() };
                return Ok(());
            }
            let want = (rest.len() as u64).min(size - at);
            let Some(extent) = layer.map_cached(at, want)? else {
                // The mapping needs metadata read from the file: the worker maps and reads
                // the rest of this range, so the queue's other requests go on meanwhile.
                self.stats.metadata_misses.fetch_add(1, Ordering::Relaxed);
                let image = Arc::clone(&image);
                let pieces = rest.to_vec();
                self.submit_job(
                    slot,
                    Box::new(move || {
                        // SAFETY: the slot keeps the pieces alive and untouched until this
                        // job's result is collected.
                        unsafe {
                            memory::read_scattered(&pieces, |buf| {
                                image.read_below_layer(depth, buf, at)
                            })
                        }
                    }),
                );
                return Ok(());
            };
            let n = extent.len.min(want) as usize;
            let part = rest.sub(0, n);
            match extent.mapping {
                Mapping::Data { file_offset, .. } => {
                    self.read_data(slot, layer, file_offset, part)?;
                }
                // SAFETY: the slot owns the memory; nothing else writes this range.
                Mapping::Zero => unsafe { part.zero() },
                Mapping::Parent => self.read_range(slot, depth + 1, at, part)?,
                Mapping::Encoded => {
                    let layer = Arc::clone(layer);
                    let pieces = part.to_vec();
                    self.submit_job(
                        slot,
                        Box::new(move || {
                            // SAFETY: the slot keeps the pieces alive and untouched until
                            // this job's result is collected.
                            unsafe {
                                memory::read_scattered(&pieces, |buf| layer.read_encoded(at, buf))
                            }
                        }),
                    );
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Whether every piece of `memory`, read or written from `file_offset` on, is aligned
    /// as `file` needs for direct I/O.
    fn aligned(file: &ImageFile, memory: Scatter, file_offset: u64) -> bool {
        let mut at = file_offset;
        memory.iter().all(|piece| {
            let ok = !file.needs_bounce(piece.ptr.as_ptr(), piece.len, at);
            at += piece.len as u64;
            ok
        })
    }

    fn read_data(
        &mut self,
        slot: usize,
        layer: &Arc<dyn Layer>,
        file_offset: u64,
        part: Scatter,
    ) -> Result<()> {
        let file = layer.file();
        if Self::aligned(file, part, file_offset) {
            self.push_transfer(slot, true, file.raw_fd(), file_offset, part);
        } else {
            self.stats.unaligned_pieces.fetch_add(1, Ordering::Relaxed);
            let layer = Arc::clone(layer);
            let pieces = part.to_vec();
            self.submit_job(
                slot,
                Box::new(move || {
                    // SAFETY: the slot keeps the pieces alive and untouched until collected.
                    unsafe {
                        memory::read_scattered(&pieces, |buf| {
                            layer.file().read_at(buf, file_offset)
                        })
                    }
                }),
            );
        }
        Ok(())
    }

    /// One engine op reading `memory` from `fd` at `offset` (or writing it there): a plain
    /// read or write for one piece (from the pool's fixed buffer where registered), a
    /// vectored one for several.
    fn push_transfer(
        &mut self,
        slot: usize,
        is_read: bool,
        fd: RawFd,
        offset: u64,
        memory: Scatter,
    ) {
        let op = match memory.single() {
            Some(one) if is_read => Op::Read {
                fd,
                offset,
                buf: one.ptr.as_ptr(),
                len: one.len as u32,
            },
            Some(one) => Op::Write {
                fd,
                offset,
                buf: one.ptr.as_ptr(),
                len: one.len as u32,
            },
            None => {
                let (iov, iovcnt) = self.iovec_array(slot, memory);
                if is_read {
                    Op::Readv {
                        fd,
                        offset,
                        iov,
                        iovcnt,
                    }
                } else {
                    Op::Writev {
                        fd,
                        offset,
                        iov,
                        iovcnt,
                    }
                }
            }
        };
        self.push_op(slot, op);
    }

    /// An iovec array for `memory`, kept by the slot until its op completes.
    fn iovec_array(&mut self, slot: usize, memory: Scatter) -> (*const libc::iovec, u32) {
        let mut iov = self.spare_iovecs.pop().unwrap_or_default();
        memory::iovecs(memory.iter(), &mut iov);
        // The array's heap block does not move when the vector is moved into the slot.
        let array = (iov.as_ptr(), iov.len() as u32);
        match self.slots[slot].as_mut() {
            Some(s) => s.iovecs.push(iov),
            None => self.spare_iovecs.push(iov),
        }
        array
    }

    fn write_range(&mut self, slot: usize, pos: u64, memory: Scatter) -> Result<()> {
        let image = self.served_image()?;
        let top = image.top();
        let mut done = 0usize;
        while done < memory.len() {
            let at = pos + done as u64;
            let want = (memory.len() - done) as u64;
            let extent = top.map_cached(at, want)?;
            if extent.is_none() {
                self.stats.metadata_misses.fetch_add(1, Ordering::Relaxed);
            }
            // A miss writes the rest of the range through the worker, which maps it there.
            let n = extent.map_or(want, |e| e.len.min(want)) as usize;
            let part = memory.sub(done, n);
            let in_place = match extent.map(|e| e.mapping) {
                Some(Mapping::Data {
                    file_offset,
                    shared: false,
                }) => {
                    let aligned = Self::aligned(top.file(), part, file_offset);
                    if !aligned {
                        self.stats.unaligned_pieces.fetch_add(1, Ordering::Relaxed);
                    }
                    aligned.then_some(file_offset)
                }
                _ => None,
            };
            match in_place {
                Some(file_offset) => {
                    self.push_transfer(slot, false, top.file().raw_fd(), file_offset, part);
                }
                None => {
                    // Allocation, copy-on-write, an unaligned piece or metadata to read:
                    // the chain's own write path, on the worker.
                    let image = Arc::clone(&image);
                    let pieces = part.to_vec();
                    self.submit_job(
                        slot,
                        Box::new(move || {
                            // SAFETY: the slot keeps the pieces alive and unchanged until
                            // this job's result is collected.
                            unsafe {
                                memory::write_scattered(&pieces, |data| image.write_at(data, at))
                            }
                        }),
                    );
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The image requests are served from (a request only starts while one is held).
    fn served_image(&self) -> Result<Arc<Image>> {
        self.image
            .clone()
            .ok_or_else(|| Error::invalid("paused: no image"))
    }

    fn push_op(&mut self, slot: usize, op: Op) {
        // SAFETY: the op's buffer is a pool buffer or a mapped guest page that the slot owns
        // (`buffer` / `pages`) until `pending` drops to zero, which happens only when this
        // op's completion has been returned by the engine.
        let pushed = unsafe { self.engine.push(slot as u64, op) };
        self.count_pending(slot, pushed);
    }

    fn submit_job(&mut self, slot: usize, job: Job) {
        let submitted = self.worker.submit(slot as u64, job);
        self.count_pending(slot, submitted);
    }

    /// One more op or job of `slot` in flight, or, when it could not be started, the
    /// request fails.
    fn count_pending(&mut self, slot: usize, started: Result<()>) {
        match started {
            Ok(()) => {
                if let Some(s) = self.slots[slot].as_mut() {
                    s.pending += 1;
                }
            }
            Err(err) => {
                eprintln!("ferrotap: queue {}: {err}", self.index);
                self.set_status(slot, status::ERROR);
            }
        }
    }

    /// One engine op or worker job of `slot` finished.
    fn op_done(&mut self, slot: usize, ok: bool) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        s.pending = s.pending.saturating_sub(1);
        if !ok && s.status == status::OKAY {
            s.status = status::ERROR;
        }
        self.finish_if_done(slot);
    }

    /// Move a request on once nothing of it is in flight.
    fn finish_if_done(&mut self, slot: usize) {
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        if s.pending > 0 {
            return;
        }
        if s.phase == Phase::Io && s.status == status::OKAY && !s.copy_back.is_empty() {
            let mut copies = std::mem::take(&mut s.copy_back);
            // SAFETY: the local pointers lie inside this slot's pool buffer, whose reads
            // have all completed (pending == 0); nothing else touches it.
            let failed = !unsafe {
                grant_copy(
                    self.grants.as_mut(),
                    &self.stats,
                    CopyDirection::ToGuest,
                    &mut copies,
                )
            };
            copies.clear();
            if let Some(Some(s)) = self.slots.get_mut(slot) {
                s.copy_back = copies;
            }
            if failed {
                self.set_status(slot, status::ERROR);
            }
        }
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        if s.phase == Phase::Io && s.flush_after && s.status == status::OKAY {
            s.phase = Phase::Flushing;
            match self.image.clone() {
                Some(image) => self.submit_job(slot, Box::new(move || image.flush())),
                None => self.set_status(slot, status::ERROR),
            }
            let pending = self.slots[slot].as_ref().map_or(0, |s| s.pending);
            if pending > 0 {
                return;
            }
        }
        self.complete(slot);
    }

    fn complete(&mut self, slot: usize) {
        let Some(s) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free_slots.push(slot);
        self.in_use -= 1;
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(class) = s.class {
            // One clock read per batch of completions; outside one (a request answered
            // as it starts, e.g. a read of a hole) the clock is read here.
            let now = self.batch_completed_at.unwrap_or_else(Instant::now);
            let latency = now.saturating_duration_since(s.taken);
            self.stats.latency[class].record(latency.as_micros() as u64);
        }
        if s.exclusive {
            self.exclusive_running = false;
        }
        if s.counted_write {
            self.leave_write();
        }
        if let Some(buffer) = s.buffer {
            self.pool.free(buffer);
        }
        // Keep the per-request vectors' capacity for the next request (no allocation per
        // request in steady state); clearing `pages` lets go of the persistent mappings.
        let (mut pages, mut copy_back) = (s.pages, s.copy_back);
        pages.clear();
        copy_back.clear();
        self.spare_pages.push(pages);
        self.spare_copies.push(copy_back);
        for mut iov in s.iovecs {
            iov.clear();
            self.spare_iovecs.push(iov);
        }
        if s.status != status::OKAY {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.ring.put_response(&Response {
            id: s.id,
            operation: s.response_op,
            status: s.status,
        });
        self.responses_waiting = true;
    }

    fn push_responses(&mut self) {
        if !self.responses_waiting {
            return;
        }
        self.responses_waiting = false;
        if self.ring.push_responses() {
            self.stats
                .notifications_sent
                .fetch_add(1, Ordering::Relaxed);
            if let Err(err) = self.evtchn.notify() {
                eprintln!("ferrotap: queue {}: notify: {err}", self.index);
            }
        }
    }
}
