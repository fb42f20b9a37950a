//! The blkif backend of one VBD: a [`Device`] serves a chain of images to one frontend's
//! rings, one thread and one engine per queue (see `queue.rs`). The control plane (`serve`)
//! tells it to connect and disconnect.

mod memory;
mod pgrants;
mod queue;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;

use crate::blkif::{self, ring::ring_entries, Protocol};
use crate::engine::EngineKind;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::xen::{DomId, GrantRef, Platform};
use memory::EventFd;
use queue::{QueueSetup, QueueThread};

/// Highest ring-page-order accepted (16 pages), as Linux blkback.
pub const MAX_RING_PAGE_ORDER: u32 = 4;
/// Queues a device offers by default: as many as blkback's default, one per dom0 vCPU.
pub const DEFAULT_MAX_QUEUES: usize = 4;

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
    pub poll_window: Duration,
    /// Bytes of bounce buffers per queue that grant copies land in.
    pub pool_bytes: usize,
    /// Register the buffer pool with io_uring (fixed buffers; pins the pool in memory).
    pub register_buffers: bool,
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

/// Counters of one queue, updated by its thread and read by `stats`.
#[derive(Debug, Default)]
pub struct QueueStats {
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
}

/// A snapshot of [`QueueStats`].
#[derive(Debug, Clone, Serialize)]
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
        }
    }
}

/// State shared by a connection's queue threads and the control plane.
pub(crate) struct Shared {
    pub image: Arc<Image>,
    pub config: DeviceConfig,
    pub stopping: AtomicBool,
    /// Write requests mapped and not yet answered, over every queue.
    pub writes_in_flight: AtomicU64,
    /// Discards waiting for those writes to drain, or running. While non-zero no queue
    /// starts a write: a discard may free a qcow2 cluster that a write mapped before it,
    /// and the cluster may then be reused (even for metadata) before that write lands.
    pub discards_waiting: AtomicU64,
    /// The first fatal error a queue met (a frontend that broke the ring rules).
    pub failure: Mutex<Option<String>>,
}

struct Connection {
    shared: Arc<Shared>,
    queues: Vec<(Arc<EventFd>, JoinHandle<()>)>,
    stats: Vec<Arc<QueueStats>>,
    params: ConnectParams,
}

/// One VBD: an image chain and, while connected, the threads serving its rings.
pub struct Device {
    image: Arc<Image>,
    config: DeviceConfig,
    platform: Arc<dyn Platform>,
    connection: Option<Connection>,
    /// Why the last connection ended, when it ended badly.
    last_failure: Option<String>,
}

impl Device {
    pub fn new(image: Image, config: DeviceConfig, platform: Arc<dyn Platform>) -> Device {
        Device {
            image: Arc::new(image),
            config,
            platform,
            connection: None,
            last_failure: None,
        }
    }

    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// 512-byte sectors of the disk.
    pub fn sectors(&self) -> u64 {
        self.image.virtual_size() / blkif::SECTOR_SIZE
    }

    pub fn is_connected(&self) -> bool {
        self.connection.is_some()
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

    pub fn stats(&self) -> Vec<QueueStatsSnapshot> {
        self.connection
            .as_ref()
            .map(|c| c.stats.iter().map(|s| s.snapshot()).collect())
            .unwrap_or_default()
    }

    /// Map the rings, bind the event channels and start one thread per queue.
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
        // Ring pages, the persistent pages kept (blkif.h's bound, per queue), and the pages
        // of every request that can be in flight at once (beyond the kept ones, a request's
        // pages are mapped for it alone).
        let kept = if persistent {
            ring_size * blkif::MAX_SEGMENTS_PER_REQUEST
        } else {
            0
        };
        let max_grants = (pages + kept + ring_size * max_segments) as u32;

        let shared = Arc::new(Shared {
            image: Arc::clone(&self.image),
            config: self.config.clone(),
            stopping: AtomicBool::new(false),
            writes_in_flight: AtomicU64::new(0),
            discards_waiting: AtomicU64::new(0),
            failure: Mutex::new(None),
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
                stop: Arc::new(EventFd::new()?),
            });
        }
        let mut queues = Vec::new();
        let mut stats = Vec::new();
        for setup in setups {
            let stop = Arc::clone(&setup.stop);
            stats.push(Arc::clone(&setup.stats));
            let name = format!("ferrotap-q{}", setup.index);
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || QueueThread::run(setup))
            {
                Ok(handle) => queues.push((stop, handle)),
                Err(err) => {
                    shared.stopping.store(true, Ordering::SeqCst);
                    for (stop, handle) in queues {
                        stop.signal();
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
        for (stop, _) in &connection.queues {
            stop.signal();
        }
        for (_, handle) in connection.queues {
            let _ = handle.join();
        }
        self.last_failure = connection.shared.failure.lock().clone();
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.disconnect();
    }
}
