//! The blkif backend of one VBD: a [`Device`] serves a chain of images to one frontend's
//! rings, one thread and one engine per queue (see `queue.rs`). The control plane (`serve`)
//! tells it to connect and disconnect.

mod memory;
pub use memory::return_large_blocks_when_freed;
mod pgrants;
mod queue;
pub mod statsfile;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::blkif::{self, ring::ring_entries, Protocol};
use crate::engine::EngineKind;
use crate::error::{Error, ErrorKind, Result};
use crate::image::Image;
use crate::xen::{DomId, GrantRef, Platform};
use memory::EventFd;
use queue::{QueueSetup, QueueThread};

/// Highest ring-page-order accepted (16 pages), as Linux blkback.
pub const MAX_RING_PAGE_ORDER: u32 = 4;
/// Queues a device offers by default: as many as blkback's default, one per dom0 vCPU.
pub const DEFAULT_MAX_QUEUES: usize = 4;
/// `serve --poll-us` by default: a queue thread spins (yielding) this long for requests and
/// completions before it sleeps. Chosen with bench/run.sh ring (bench/README.md): it covers a
/// disk's 4 KiB read (~50 µs here) and a frontend's next request at QD1, so a busy queue
/// needs no wake-up; an idle one sleeps after it.
pub const DEFAULT_POLL_US: u64 = 100;

/// What the backend offers the frontend (the `feature-*` keys on a real host).
#[derive(Debug, Clone, Serialize)]
pub struct Features {
    pub flush: bool,
    pub barrier: bool,
    pub discard: bool,
    pub discard_secure: bool,
    pub discard_granularity: u64,
    pub discard_alignment: u64,
    pub persistent: bool,
    pub max_indirect_segments: usize,
    pub max_ring_page_order: u32,
    pub max_queues: usize,
}

/// How a device serves, beyond what it offers.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub features: Features,
    pub engine: EngineKind,
    /// Spin this long for new work before blocking (tapdisk's polling-duration); zero: never.
    /// The spin reads memory only and yields the core on every turn.
    pub poll_window: Duration,
    /// Bytes of bounce buffers per queue that grant copies land in.
    pub pool_bytes: usize,
    /// Register the buffer pool with io_uring (fixed buffers; pins the pool in memory).
    pub register_buffers: bool,
    /// The CPUs each queue's threads run on: queue i takes entry i modulo the length.
    /// Empty: wherever the scheduler puts them.
    pub queue_cpus: Vec<Vec<usize>>,
}

/// One queue's ring as the frontend describes it.
#[derive(Debug, Clone)]
pub struct QueueRing {
    pub ring_refs: Vec<GrantRef>,
    pub event_channel: u32,
}

/// What the frontend negotiated: the transport keys of a real host's xenstore.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    pub domid: DomId,
    pub protocol: Protocol,
    pub ring_page_order: u32,
    pub queues: Vec<QueueRing>,
    /// The frontend's feature-persistent.
    pub persistent: bool,
}

/// The operation classes latencies are kept for: READ (direct or indirect); WRITE (direct or
/// indirect); FLUSH_DISKCACHE and WRITE_BARRIER, with or without data; DISCARD.
pub const OP_CLASSES: [&str; 4] = ["read", "write", "flush", "discard"];

/// Index into [`OP_CLASSES`] of a blkif data operation, if it is one of them.
pub(crate) fn op_class(operation: u8) -> Option<usize> {
    match operation {
        blkif::op::READ => Some(0),
        blkif::op::WRITE => Some(1),
        blkif::op::FLUSH_DISKCACHE | blkif::op::WRITE_BARRIER => Some(2),
        blkif::op::DISCARD => Some(3),
        _ => None,
    }
}

/// Buckets of a latency histogram: bucket 0 counts answers under 1 us, bucket i (1..=30)
/// those in [2^(i-1), 2^i) us, bucket 31 everything from 2^30 us (about 18 minutes) up.
pub const LATENCY_BUCKETS: usize = 32;

/// Latencies of one operation class on one queue, from the request taken off the ring to
/// its response put on it. Only the queue's thread writes (so plain relaxed loads and
/// stores would do; the adds stay atomic for clarity), anyone reads.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    count: AtomicU64,
    sum_us: AtomicU64,
    max_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, micros: u64) {
        let bucket = ((u64::BITS - micros.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
        // One writer: no compare-and-swap loop needed.
        if micros > self.max_us.load(Ordering::Relaxed) {
            self.max_us.store(micros, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            count: self.count.load(Ordering::Relaxed),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            max_us: self.max_us.load(Ordering::Relaxed),
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// A snapshot of a [`LatencyHistogram`]; `buckets` has [`LATENCY_BUCKETS`] entries.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LatencySnapshot {
    pub count: u64,
    pub sum_us: u64,
    pub max_us: u64,
    pub buckets: Vec<u64>,
}

impl LatencySnapshot {
    fn add(&mut self, other: &LatencySnapshot) {
        self.count += other.count;
        self.sum_us += other.sum_us;
        self.max_us = self.max_us.max(other.max_us);
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
    }
}

/// Latency snapshots per operation class.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Latencies {
    pub read: LatencySnapshot,
    pub write: LatencySnapshot,
    pub flush: LatencySnapshot,
    pub discard: LatencySnapshot,
}

impl Latencies {
    fn add(&mut self, other: &Latencies) {
        self.read.add(&other.read);
        self.write.add(&other.write);
        self.flush.add(&other.flush);
        self.discard.add(&other.discard);
    }
}

/// Counters of one queue, updated by its thread and read by `stats`.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Requests taken off the ring.
    pub requests: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub errors: AtomicU64,
    pub unsupported: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub in_flight: AtomicU64,
    pub notifications_sent: AtomicU64,
    pub wakeups: AtomicU64,
    pub persistent_grants: AtomicU64,
    /// Grant-copy calls (one GNTTABOP_copy batch, a gntdev ioctl, each): request data of a
    /// frontend without persistent grants, and indirect pages not kept mapped.
    pub grant_copies: AtomicU64,
    /// Pieces of requests mapped and done on the worker because their image metadata (a
    /// VHD bitmap, a qcow2 L2 table) was not in memory.
    pub metadata_misses: AtomicU64,
    /// Pieces done on the worker through a bounce buffer because their memory, offset or
    /// length is not aligned as the image file's O_DIRECT I/O needs.
    pub unaligned_pieces: AtomicU64,
    /// Per class of [`OP_CLASSES`].
    pub latency: [LatencyHistogram; 4],
}

/// A snapshot of [`QueueStats`], or their sum over queues.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueStatsSnapshot {
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub errors: u64,
    pub unsupported: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub in_flight: u64,
    pub notifications_sent: u64,
    pub wakeups: u64,
    pub persistent_grants: u64,
    pub grant_copies: u64,
    pub metadata_misses: u64,
    pub unaligned_pieces: u64,
    pub latency: Latencies,
}

impl QueueStats {
    pub fn snapshot(&self) -> QueueStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueStatsSnapshot {
            requests: get(&self.requests),
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            errors: get(&self.errors),
            unsupported: get(&self.unsupported),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            in_flight: get(&self.in_flight),
            notifications_sent: get(&self.notifications_sent),
            wakeups: get(&self.wakeups),
            persistent_grants: get(&self.persistent_grants),
            grant_copies: get(&self.grant_copies),
            metadata_misses: get(&self.metadata_misses),
            unaligned_pieces: get(&self.unaligned_pieces),
            latency: Latencies {
                read: self.latency[0].snapshot(),
                write: self.latency[1].snapshot(),
                flush: self.latency[2].snapshot(),
                discard: self.latency[3].snapshot(),
            },
        }
    }
}

impl QueueStatsSnapshot {
    /// The sum over queues (maxima: the largest).
    pub fn total(queues: &[QueueStatsSnapshot]) -> QueueStatsSnapshot {
        let mut total = QueueStatsSnapshot::default();
        for q in queues {
            total.requests += q.requests;
            total.reads += q.reads;
            total.writes += q.writes;
            total.flushes += q.flushes;
            total.discards += q.discards;
            total.errors += q.errors;
            total.unsupported += q.unsupported;
            total.bytes_read += q.bytes_read;
            total.bytes_written += q.bytes_written;
            total.in_flight += q.in_flight;
            total.notifications_sent += q.notifications_sent;
            total.wakeups += q.wakeups;
            total.persistent_grants += q.persistent_grants;
            total.grant_copies += q.grant_copies;
            total.metadata_misses += q.metadata_misses;
            total.unaligned_pieces += q.unaligned_pieces;
            total.latency.add(&q.latency);
        }
        total
    }
}

/// Called with the message of a connection's first fatal error (a frontend that broke the
/// ring rules), from the queue thread that met it.
pub type FailureHook = Arc<dyn Fn(&str) + Send + Sync>;

/// The image as the queues see it, and how many of them let go of it.
pub(crate) struct ImageState {
    /// `None` while the device is paused (the image closed).
    pub image: Option<Arc<Image>>,
    /// Queues that finished their requests and dropped their image references.
    pub paused_queues: usize,
    /// Queue threads that ended (they hold nothing either).
    pub exited_queues: usize,
}

/// State shared by a connection's queue threads and the control plane.
pub(crate) struct Shared {
    pub config: DeviceConfig,
    pub stopping: AtomicBool,
    /// The disk's size in sectors, as requests are checked against it (resize and unpause
    /// change it while the queues are paused).
    pub sectors: AtomicU64,
    /// Asked to pause: queues take nothing new, finish what is in flight, drop their image
    /// references, count themselves in `ImageState::paused_queues` and wait. Cleared (after
    /// `ImageState::image` is set again) to resume.
    pub pause: AtomicBool,
    pub image: Mutex<ImageState>,
    /// Signalled whenever `image`'s counts change.
    pub image_changed: Condvar,
    /// Write requests mapped and not yet answered, over every queue.
    pub writes_in_flight: AtomicU64,
    /// Discards waiting for those writes to drain, or running. While non-zero no queue
    /// starts a write: a discard may free a qcow2 cluster that a write mapped before it,
    /// and the cluster may then be reused (even for metadata) before that write lands.
    pub discards_waiting: AtomicU64,
    /// The first fatal error a queue met (a frontend that broke the ring rules).
    pub failure: Mutex<Option<String>>,
    pub on_failure: Option<FailureHook>,
}

impl Shared {
    /// Record a fatal error; the first one is kept and reported to the hook.
    pub fn fail(&self, message: String) {
        let mut failure = self.failure.lock();
        if failure.is_some() {
            return;
        }
        *failure = Some(message.clone());
        drop(failure);
        if let Some(hook) = &self.on_failure {
            hook(&message);
        }
    }

    /// A queue thread ended; `paused`: it was counted as paused.
    pub fn queue_exited(&self, paused: bool) {
        let mut state = self.image.lock();
        state.exited_queues += 1;
        if paused {
            state.paused_queues = state.paused_queues.saturating_sub(1);
        }
        self.image_changed.notify_all();
    }
}

struct Connection {
    shared: Arc<Shared>,
    queues: Vec<(Arc<EventFd>, JoinHandle<()>)>,
    stats: Vec<Arc<QueueStats>>,
    params: ConnectParams,
}

/// How long a pause waits for the requests in flight to finish.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(60);

impl Connection {
    fn wake_queues(&self) {
        for (wake, _) in &self.queues {
            wake.signal();
        }
    }

    /// Ask every queue to finish what it has in flight and let go of the image; wait until
    /// all have (or ended).
    fn quiesce(&self) -> Result<()> {
        self.shared.pause.store(true, Ordering::SeqCst);
        self.wake_queues();
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        let mut state = self.shared.image.lock();
        while state.paused_queues + state.exited_queues < self.queues.len() {
            if self
                .shared
                .image_changed
                .wait_until(&mut state, deadline)
                .timed_out()
            {
                // Give up: let the queues that did pause take requests again.
                drop(state);
                self.shared.pause.store(false, Ordering::SeqCst);
                self.wake_queues();
                return Err(Error::new(
                    ErrorKind::Io,
                    format!(
                        "requests still in flight after {} s; the queues did not quiesce",
                        QUIESCE_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Give the queues `image` (and `sectors`) and let them take requests again.
    fn resume(&self, image: &Arc<Image>, sectors: u64) {
        {
            let mut state = self.shared.image.lock();
            state.image = Some(Arc::clone(image));
            self.shared.sectors.store(sectors, Ordering::SeqCst);
            self.shared.pause.store(false, Ordering::SeqCst);
        }
        self.wake_queues();
    }
}

/// One VBD: an image chain and, while connected, the threads serving its rings.
pub struct Device {
    /// `None` while paused: the chain's files are closed.
    image: Option<Arc<Image>>,
    /// 512-byte sectors of the disk (kept while paused).
    sectors: u64,
    config: DeviceConfig,
    platform: Arc<dyn Platform>,
    connection: Option<Connection>,
    /// Why the last connection ended, when it ended badly.
    last_failure: Option<String>,
    /// The counters of the last connection, once it ended.
    last_stats: Vec<QueueStatsSnapshot>,
    on_failure: Option<FailureHook>,
}

impl Device {
    pub fn new(image: Image, config: DeviceConfig, platform: Arc<dyn Platform>) -> Device {
        Device {
            sectors: image.virtual_size() / blkif::SECTOR_SIZE,
            image: Some(Arc::new(image)),
            config,
            platform,
            connection: None,
            last_failure: None,
            last_stats: Vec::new(),
            on_failure: None,
        }
    }

    /// Call `hook` with the first fatal error of each later connection.
    pub fn set_failure_hook(&mut self, hook: FailureHook) {
        self.on_failure = Some(hook);
    }

    /// The open chain; `None` while paused.
    pub fn image(&self) -> Option<&Arc<Image>> {
        self.image.as_ref()
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// 512-byte sectors of the disk.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
    }

    pub fn is_paused(&self) -> bool {
        self.image.is_none()
    }

    /// The fatal error of the current or last connection, if any.
    pub fn failure(&self) -> Option<String> {
        match &self.connection {
            Some(connection) => connection.shared.failure.lock().clone(),
            None => self.last_failure.clone(),
        }
    }

    /// The connected frontend's domain, protocol and queue count.
    pub fn connected_params(&self) -> Option<&ConnectParams> {
        self.connection.as_ref().map(|c| &c.params)
    }

    /// Per-queue counters of the current connection, or of the last one once it ended.
    pub fn stats(&self) -> Vec<QueueStatsSnapshot> {
        match &self.connection {
            Some(c) => c.stats.iter().map(|s| s.snapshot()).collect(),
            None => self.last_stats.clone(),
        }
    }

    /// The live counters of the current connection (empty when not connected).
    pub fn queue_stats(&self) -> Vec<Arc<QueueStats>> {
        self.connection
            .as_ref()
            .map(|c| c.stats.clone())
            .unwrap_or_default()
    }

    /// Finish every request in flight, take no new ones (they wait on the ring: the guest
    /// sees a delay), then flush and close the chain. Returns once nothing holds its files.
    pub fn pause(&mut self) -> Result<()> {
        let Some(image) = self.image.clone() else {
            return Ok(());
        };
        if let Some(connection) = &self.connection {
            connection.quiesce()?;
        }
        // Nothing in flight now; on any failure below, serve on as before.
        let restore = |device: &mut Device, image: Arc<Image>, err: Error| {
            if let Some(connection) = &device.connection {
                connection.resume(&image, device.sectors);
            }
            device.image = Some(image);
            Err(err)
        };
        if let Err(err) = image.flush() {
            return restore(self, image, err);
        }
        if let Some(connection) = &self.connection {
            connection.shared.image.lock().image = None;
        }
        self.image = None;
        // The queues dropped their references before counting themselves paused, and
        // their workers' jobs (which hold the image too) were all collected by then.
        match Arc::try_unwrap(image) {
            Ok(image) => {
                drop(image);
                Ok(())
            }
            Err(image) => restore(
                self,
                image,
                Error::invalid("the image is still referenced after the queues paused"),
            ),
        }
    }

    /// Serve `image` (reopened, possibly a new leaf over the old one) and take requests
    /// again. It may be larger than before (a resize); smaller is refused, as the guest may
    /// hold data past its end. Returns the disk's sectors.
    pub fn unpause(&mut self, image: Image) -> Result<u64> {
        if self.image.is_some() {
            return Err(Error::invalid("not paused"));
        }
        let sectors = image.virtual_size() / blkif::SECTOR_SIZE;
        if sectors < self.sectors {
            return Err(Error::invalid(format!(
                "{} has {sectors} sectors, fewer than the disk's {}",
                image.top().file().path().display(),
                self.sectors
            )));
        }
        let image = Arc::new(image);
        if let Some(connection) = &self.connection {
            connection.resume(&image, sectors);
        }
        self.image = Some(image);
        self.sectors = sectors;
        Ok(sectors)
    }

    /// Grow the disk to `new_size` bytes (a multiple of 512; shrinking is refused). While
    /// connected the queues are paused around the change. Returns the disk's sectors.
    pub fn resize(&mut self, new_size: u64) -> Result<u64> {
        let Some(image) = self.image.clone() else {
            return Err(Error::invalid("paused: unpause first"));
        };
        if !new_size.is_multiple_of(blkif::SECTOR_SIZE) {
            return Err(Error::invalid(format!(
                "{new_size} is not a multiple of {} bytes",
                blkif::SECTOR_SIZE
            )));
        }
        let current = image.virtual_size();
        if new_size < current {
            return Err(Error::invalid(format!(
                "cannot shrink the disk from {current} to {new_size} bytes"
            )));
        }
        if let Some(connection) = &self.connection {
            connection.quiesce()?;
        }
        let result = if new_size == current {
            Ok(())
        } else {
            image.top().resize(new_size).and_then(|()| image.flush())
        };
        self.sectors = image.virtual_size() / blkif::SECTOR_SIZE;
        if let Some(connection) = &self.connection {
            connection.resume(&image, self.sectors);
        }
        result.map(|()| self.sectors)
    }

    /// Map the rings, bind the event channels and start one thread per queue. While paused
    /// the queues start paused too.
    pub fn connect(&mut self, params: ConnectParams) -> Result<()> {
        if self.connection.is_some() {
            return Err(Error::invalid("already connected; disconnect first"));
        }
        let features = &self.config.features;
        if params.ring_page_order > features.max_ring_page_order {
            return Err(Error::invalid(format!(
                "ring-page-order {} is above the maximum {}",
                params.ring_page_order, features.max_ring_page_order
            )));
        }
        if params.queues.is_empty() || params.queues.len() > features.max_queues {
            return Err(Error::invalid(format!(
                "{} queues requested; 1 to {} are offered",
                params.queues.len(),
                features.max_queues
            )));
        }
        let pages = 1usize << params.ring_page_order;
        for (index, queue) in params.queues.iter().enumerate() {
            if queue.ring_refs.len() != pages {
                return Err(Error::invalid(format!(
                    "queue {index}: {} ring refs for ring-page-order {} (needs {pages})",
                    queue.ring_refs.len(),
                    params.ring_page_order
                )));
            }
        }
        let persistent = params.persistent && features.persistent;
        let ring_size = ring_entries(pages, params.protocol) as usize;
        let max_segments = blkif::MAX_SEGMENTS_PER_REQUEST.max(features.max_indirect_segments);
        // Ring pages, the persistent pages kept (per queue), and the pages of every request
        // that can be in flight at once (beyond the kept ones, a request's pages are mapped
        // for it alone).
        let kept = if persistent {
            pgrants::kept_pages(ring_size, max_segments)
        } else {
            0
        };
        let max_grants = (pages + kept + ring_size * max_segments) as u32;

        let shared = Arc::new(Shared {
            config: self.config.clone(),
            stopping: AtomicBool::new(false),
            sectors: AtomicU64::new(self.sectors),
            pause: AtomicBool::new(self.image.is_none()),
            image: Mutex::new(ImageState {
                image: self.image.clone(),
                paused_queues: 0,
                exited_queues: 0,
            }),
            image_changed: Condvar::new(),
            writes_in_flight: AtomicU64::new(0),
            discards_waiting: AtomicU64::new(0),
            failure: Mutex::new(None),
            on_failure: self.on_failure.clone(),
        });
        // Map and bind every queue before starting any thread, so a bad ref or port fails
        // the connect as a whole and leaves nothing behind.
        let mut setups = Vec::with_capacity(params.queues.len());
        for (index, queue) in params.queues.iter().enumerate() {
            let mut grants = self.platform.grant_access(params.domid, max_grants)?;
            let ring = grants
                .map(&queue.ring_refs, true)
                .map_err(|e| Error::invalid(format!("queue {index}: mapping the ring: {e}")))?;
            let evtchn = self
                .platform
                .bind_interdomain(params.domid, queue.event_channel)
                .map_err(|e| {
                    Error::invalid(format!(
                        "queue {index}: binding event channel {}: {e}",
                        queue.event_channel
                    ))
                })?;
            setups.push(QueueSetup {
                index,
                shared: Arc::clone(&shared),
                protocol: params.protocol,
                ring,
                grants,
                evtchn,
                persistent,
                stats: Arc::new(QueueStats::default()),
                wake: Arc::new(EventFd::new()?),
            });
        }
        let mut queues = Vec::new();
        let mut stats = Vec::new();
        for setup in setups {
            let wake = Arc::clone(&setup.wake);
            stats.push(Arc::clone(&setup.stats));
            let name = format!("ferrotap-q{}", setup.index);
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || QueueThread::run(setup))
            {
                Ok(handle) => queues.push((wake, handle)),
                Err(err) => {
                    shared.stopping.store(true, Ordering::SeqCst);
                    for (wake, handle) in queues {
                        wake.signal();
                        let _ = handle.join();
                    }
                    return Err(Error::io("spawn queue thread", err));
                }
            }
        }
        self.last_failure = None;
        self.connection = Some(Connection {
            shared,
            queues,
            stats,
            params,
        });
        Ok(())
    }

    /// Stop taking requests, finish what is in flight, unmap and unbind.
    pub fn disconnect(&mut self) -> Result<()> {
        let Some(connection) = self.connection.take() else {
            return Ok(());
        };
        connection.shared.stopping.store(true, Ordering::SeqCst);
        connection.wake_queues();
        for (_, handle) in connection.queues {
            let _ = handle.join();
        }
        self.last_failure = connection.shared.failure.lock().clone();
        self.last_stats = connection.stats.iter().map(|s| s.snapshot()).collect();
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_log2_microseconds() {
        let histogram = LatencyHistogram::default();
        for (micros, bucket) in [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 2),
            (1023, 10),
            (1024, 11),
            (1 << 29, 30),
            ((1 << 30) - 1, 30),
            (1 << 30, 31),
            (u64::MAX / 4, 31),
        ] {
            let before = histogram.snapshot().buckets[bucket];
            histogram.record(micros);
            assert_eq!(
                histogram.snapshot().buckets[bucket],
                before + 1,
                "{micros} us"
            );
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 10);
        assert_eq!(snapshot.buckets.iter().sum::<u64>(), 10);
        assert_eq!(snapshot.max_us, u64::MAX / 4);
    }

    #[test]
    fn totals_sum_queues_and_keep_the_largest_maximum() {
        let (a, b) = (QueueStats::default(), QueueStats::default());
        a.requests.store(3, Ordering::Relaxed);
        b.requests.store(4, Ordering::Relaxed);
        a.latency[0].record(10);
        b.latency[0].record(700);
        b.latency[3].record(5);
        let total = QueueStatsSnapshot::total(&[a.snapshot(), b.snapshot()]);
        assert_eq!(total.requests, 7);
        assert_eq!(total.latency.read.count, 2);
        assert_eq!(total.latency.read.sum_us, 710);
        assert_eq!(total.latency.read.max_us, 700);
        assert_eq!(
            total.latency.read.buckets[4] + total.latency.read.buckets[10],
            2
        );
        assert_eq!(total.latency.discard.count, 1);
        assert_eq!(total.latency.write.count, 0);
    }
}
