//! A simulated blkfront on xensim: N queues, multi-page rings on non-contiguous frames, both
//! protocols, persistent grants or grant-per-request, direct and indirect requests, flush,
//! barrier and discard. It behaves as Linux xen-blkfront towards the backend; the workloads
//! ([`super::workload`]) and the hostile tests drive it through the API here.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::control::{BackendInfo, ConnectRequest, ControlClient, QueueTransport};
use super::guest::{Frame, FrameView, FrontEventChannel, GrantTable, GuestMemory, PAGE_SIZE};
use crate::blkif::ring::{ring_entries, FrontRing, RING_HEADER_SIZE};
use crate::blkif::{
    encode_indirect_segments, op, Protocol, Request, RequestBody, Response, Segment,
    DISCARD_SECURE, MAX_INDIRECT_PAGES_PER_REQUEST, MAX_SEGMENTS_PER_REQUEST,
    SEGMENTS_PER_INDIRECT_PAGE,
};
use crate::error::{Error, Result};

/// The most queues the simulated blkfront drives (as the issue asks: 1 to 4).
pub const MAX_QUEUES: u32 = 4;
/// The largest ring-page-order it asks for.
pub const MAX_RING_PAGE_ORDER: u32 = 4;
/// The top byte of every tracked request id (xor the queue index).
const ID_MARK: u64 = 0xb1;
/// Frames and refs beyond what the rings and slots need, for tests that grant more.
const SPARE: u32 = 4096;

/// How the frontend wants to run; clamped to what the backend offers at connect.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// The simulated host (`$XENSIM_DIR`).
    pub dir: PathBuf,
    /// `ferrotap serve`'s control socket.
    pub control: PathBuf,
    pub domid: u16,
    pub queues: u32,
    pub ring_page_order: u32,
    pub protocol: Protocol,
    /// Offer feature-persistent (used only when the backend offers it too).
    pub persistent: bool,
    /// Segments per request when the backend offers indirect descriptors (0: direct only).
    pub indirect_segments: u32,
    /// Request slots per queue (clamped to the ring size).
    pub iodepth: u32,
    /// Data frames per slot: the most segments a request of the workload uses. `None`: the
    /// negotiated maximum.
    pub slot_segments: Option<u32>,
    /// How long to wait for a response before calling the backend stuck.
    pub response_timeout: Duration,
    /// Waiting for responses, spin this long on the ring's `rsp_prod`, yielding the core on
    /// every turn, before sleeping (zero: sleep at once). The load generator's choice, like
    /// fio's polled completions: while it spins `rsp_event` stays behind, so the backend
    /// sends no notification. It spins with any number of requests in flight when the host
    /// has a core for each frontend queue and each backend queue; with fewer cores only for
    /// a lone request, as with more in flight its spinning would take the core the backend
    /// needs (measured: 4 KiB reads at QD32 with 2 queues on 2 cores, half the IOPS). With
    /// several in flight it does not spin while its waits average over twice the window
    /// (see [`WaitEstimate`]).
    pub poll: Duration,
}

impl FrontConfig {
    pub fn new(dir: PathBuf, control: PathBuf) -> FrontConfig {
        FrontConfig {
            dir,
            control,
            domid: 1,
            queues: 1,
            ring_page_order: 0,
            protocol: Protocol::X86_64,
            persistent: false,
            indirect_segments: crate::blkif::MAX_INDIRECT_SEGMENTS as u32,
            iodepth: 16,
            slot_segments: None,
            response_timeout: Duration::from_secs(30),
            poll: Duration::ZERO,
        }
    }
}

/// What was agreed with the backend.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    pub info: BackendInfo,
    pub queues: u32,
    pub ring_page_order: u32,
    pub protocol: Protocol,
    pub persistent: bool,
    /// The most segments one request may carry (11 without indirect descriptors).
    pub max_segments: u32,
    /// Request slots per queue.
    pub slots: u32,
    /// Data frames per slot.
    pub slot_segments: u32,
}

/// A request as the workload sees it; the data segments come from the slot's layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read {
        sector: u64,
    },
    Write {
        sector: u64,
    },
    /// FLUSH_DISKCACHE: with no segments a pure flush, with segments a write made durable.
    Flush {
        sector: u64,
    },
    /// WRITE_BARRIER, likewise.
    Barrier {
        sector: u64,
    },
    Discard {
        sector: u64,
        nr_sectors: u64,
        secure: bool,
    },
}

impl IoOp {
    pub fn operation(self) -> u8 {
        match self {
            IoOp::Read { .. } => op::READ,
            IoOp::Write { .. } => op::WRITE,
            IoOp::Flush { .. } => op::FLUSH_DISKCACHE,
            IoOp::Barrier { .. } => op::WRITE_BARRIER,
            IoOp::Discard { .. } => op::DISCARD,
        }
    }

    pub fn sector(self) -> u64 {
        match self {
            IoOp::Read { sector }
            | IoOp::Write { sector }
            | IoOp::Flush { sector }
            | IoOp::Barrier { sector }
            | IoOp::Discard { sector, .. } => sector,
        }
    }
}

/// Name of a blkif operation for messages.
pub fn operation_name(operation: u8) -> &'static str {
    match operation {
        op::READ => "read",
        op::WRITE => "write",
        op::WRITE_BARRIER => "write-barrier",
        op::FLUSH_DISKCACHE => "flush",
        op::DISCARD => "discard",
        op::INDIRECT => "indirect",
        _ => "unknown",
    }
}

/// A finished request.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub slot: usize,
    pub id: u64,
    pub status: i16,
    /// From push to response, in nanoseconds.
    pub latency_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Acquired by the workload, being filled.
    Held,
    InFlight,
    /// Answered, not yet released (the workload is checking its data).
    Answered,
}

/// A request slot: its data frames (and grant refs for them), its indirect pages and the
/// segment layout of the request being built.
pub struct Slot {
    frames: Vec<Frame>,
    refs: Vec<u32>,
    indirect_frames: Vec<Frame>,
    indirect_refs: Vec<u32>,
    layout: Vec<(u8, u8)>,
    state: SlotState,
    id: u64,
    expected_operation: u8,
    io: IoOp,
    nr_sectors: u64,
    /// Data frames (and indirect pages) granted for this request in grant-per-request mode.
    granted_data: usize,
    granted_indirect: usize,
    started: Instant,
}

impl Slot {
    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    pub fn frame_mut(&mut self, index: usize) -> &mut Frame {
        &mut self.frames[index]
    }

    /// The data frames' grant refs (granted only while in flight unless persistent).
    pub fn refs(&self) -> &[u32] {
        &self.refs
    }

    /// Segment `i` uses data frame `i`, sectors `first..=last` of it.
    pub fn layout(&self) -> &[(u8, u8)] {
        &self.layout
    }

    pub fn clear_layout(&mut self) {
        self.layout.clear();
    }

    /// Add a segment (the next data frame). Panics past the slot's frames.
    pub fn push_segment(&mut self, first_sect: u8, last_sect: u8) {
        assert!(
            self.layout.len() < self.frames.len(),
            "slot has no more frames"
        );
        self.layout.push((first_sect, last_sect));
    }

    /// Sectors the layout covers.
    pub fn layout_sectors(&self) -> u64 {
        self.layout
            .iter()
            .map(|&(first, last)| u64::from(last.saturating_sub(first)) + 1)
            .sum()
    }

    /// The request in this slot (valid from submit to release).
    pub fn io(&self) -> IoOp {
        self.io
    }

    /// Sectors of the request in this slot.
    pub fn nr_sectors(&self) -> u64 {
        self.nr_sectors
    }
}

/// The ring header in shared memory, for tests that scribble on it.
pub struct RingHeader<'a> {
    view: &'a FrameView,
}

impl RingHeader<'_> {
    pub fn req_prod(&self) -> u32 {
        self.view.atomic_u32(0).load(Ordering::Acquire)
    }
    /// Overwrite `req_prod` (a hostile frontend).
    pub fn set_req_prod(&self, value: u32) {
        self.view.atomic_u32(0).store(value, Ordering::Release)
    }
    pub fn req_event(&self) -> u32 {
        self.view.atomic_u32(4).load(Ordering::Acquire)
    }
    pub fn rsp_prod(&self) -> u32 {
        self.view.atomic_u32(8).load(Ordering::Acquire)
    }
    pub fn rsp_event(&self) -> u32 {
        self.view.atomic_u32(12).load(Ordering::Acquire)
    }
    /// The header's field at `offset` (0, 4, 8, 12) as an atomic.
    pub fn field(&self, offset: usize) -> &AtomicU32 {
        assert!(offset < RING_HEADER_SIZE);
        self.view.atomic_u32(offset)
    }
}

/// The ring of one queue. Declared before the view it points into so it is dropped first.
struct QueueRing(FrontRing);

// SAFETY: the FrontRing points into the FrameView owned by the same Queue; they move between
// threads together and the ring is used only through `&mut Queue`.
unsafe impl Send for QueueRing {}

/// A moving average (weight 1/8) of how long a queue's waits for responses took, from the
/// call to a response being there. A spin that usually runs out before the backend answers
/// only burns the core: 4 KiB reads at QD32 on a disk file, 1 queue, wait about 300 µs for
/// each burst of responses, and a blkfront spinning its 100 µs window first took host time
/// from the virtual disk (75k-81k IOPS with the spin against 78k-86k without it, when the
/// blkfront used a fifth of the CPU); a window that outlasts the burst (the ring bench's
/// 500 µs) saves the wake-up instead. So with several requests in flight the spin stops
/// while the average is over twice the window (a lone request always spins: it is the
/// latency case). Twice, as a wait measured asleep includes the wake-up (30-50 µs here):
/// with the window itself as the limit a QD1 queue on the disk (40-60 µs waits) tipped
/// into sleeping and stayed there (p50 42 -> 50-72 µs in a full bench run). A sample
/// counts for at most four windows, so that one stall (an O_DIRECT write waiting on a
/// journal commit for milliseconds) does not stop the spin for the waits after it.
#[derive(Debug, Default, Clone, Copy)]
pub struct WaitEstimate {
    average_ns: u64,
}

impl WaitEstimate {
    /// Count a wait of a queue spinning for up to `window`.
    pub fn record(&mut self, waited: Duration, window: Duration) {
        let cap = window.as_nanos().saturating_mul(4);
        let waited = u64::try_from(waited.as_nanos().min(cap)).unwrap_or(u64::MAX);
        self.average_ns = self.average_ns - self.average_ns / 8 + waited / 8;
    }

    /// True when waits average over twice `window`: spinning it would mostly run out.
    pub fn outlast(&self, window: Duration) -> bool {
        u128::from(self.average_ns) > window.as_nanos().saturating_mul(2)
    }
}

/// One queue: a ring, its event channel and its request slots.
pub struct Queue {
    index: usize,
    ring: QueueRing,
    view: FrameView,
    ring_frames: Vec<Frame>,
    ring_refs: Vec<u32>,
    evtchn: FrontEventChannel,
    grants: Arc<GrantTable>,
    protocol: Protocol,
    persistent: bool,
    max_segments: usize,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    in_flight: usize,
    next_seq: u64,
    timeout: Duration,
    poll: Duration,
    /// Spin with several requests in flight too (see [`FrontConfig::poll`]).
    poll_busy: bool,
    waits: WaitEstimate,
    segment_scratch: Vec<Segment>,
    page_scratch: Vec<u8>,
}

impl Queue {
    pub fn index(&self) -> usize {
        self.index
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Entries in the ring.
    pub fn ring_size(&self) -> u32 {
        self.ring.0.size()
    }

    /// The ring pages' refs, in ring order (as `connect` names them).
    pub fn ring_refs(&self) -> &[u32] {
        &self.ring_refs
    }

    /// The ring pages' frames, in ring order (deliberately not contiguous).
    pub fn ring_frames(&self) -> &[Frame] {
        &self.ring_frames
    }

    pub fn event_channel(&self) -> &FrontEventChannel {
        &self.evtchn
    }

    pub fn header(&self) -> RingHeader<'_> {
        RingHeader { view: &self.view }
    }

    /// The shared ring, as one contiguous range (header first).
    pub fn ring_view(&self) -> &FrameView {
        &self.view
    }

    pub fn grants(&self) -> &GrantTable {
        &self.grants
    }

    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn slot(&self, slot: usize) -> &Slot {
        &self.slots[slot]
    }

    pub fn slot_mut(&mut self, slot: usize) -> &mut Slot {
        &mut self.slots[slot]
    }

    /// A free slot, held until [`Self::release`] (its layout cleared).
    pub fn acquire(&mut self) -> Option<usize> {
        let slot = self.free_slots.pop()?;
        self.slots[slot].state = SlotState::Held;
        self.slots[slot].layout.clear();
        Some(slot)
    }

    /// Give an answered (or never submitted) slot back.
    pub fn release(&mut self, slot: usize) {
        let state = &mut self.slots[slot].state;
        assert!(
            matches!(*state, SlotState::Held | SlotState::Answered),
            "release of a slot in state {state:?}"
        );
        *state = SlotState::Free;
        self.free_slots.push(slot);
    }

    /// Put the request of `slot` on the ring (not yet visible: see [`Self::push`]).
    pub fn queue_request(&mut self, slot: usize, io: IoOp) -> Result<u64> {
        let index = self.index;
        let seq = self.next_seq;
        self.next_seq += 1;
        // The top byte is never zero, so a backend that truncates the id to 32 bits (or
        // mixes up queues) is caught; the low 16 bits name the slot.
        let id = (ID_MARK ^ index as u64) << 56 | (seq & 0xff_ffff_ffff) << 16 | slot as u64;
        let request = self.build_request(slot, io, id)?;
        let state = &mut self.slots[slot];
        state.state = SlotState::InFlight;
        state.started = Instant::now();
        if !self.ring.0.put_request(&request) {
            // Slots never outnumber ring entries, so only untracked requests can fill it.
            return Err(Error::invalid(format!("queue {index}: ring full")));
        }
        self.in_flight += 1;
        Ok(id)
    }

    /// Lay the request out: segments (granting them unless persistent), indirect pages.
    fn build_request(&mut self, slot_index: usize, io: IoOp, id: u64) -> Result<Request> {
        let persistent = self.persistent;
        let max_segments = self.max_segments;
        let queue = self.index;
        let slot = &mut self.slots[slot_index];
        assert_eq!(slot.state, SlotState::Held, "submit of a slot not acquired");
        slot.id = id;
        slot.io = io;
        slot.granted_data = 0;
        slot.granted_indirect = 0;
        let operation = io.operation();
        let sector = io.sector();
        if let IoOp::Discard {
            nr_sectors, secure, ..
        } = io
        {
            slot.expected_operation = operation;
            slot.nr_sectors = nr_sectors;
            return Ok(Request {
                operation,
                id,
                sector,
                handle: 0,
                body: RequestBody::Discard {
                    flag: if secure { DISCARD_SECURE } else { 0 },
                    nr_sectors,
                },
            });
        }
        let nr_segments = slot.layout.len();
        slot.nr_sectors = slot.layout_sectors();
        if nr_segments > max_segments
            || (nr_segments > MAX_SEGMENTS_PER_REQUEST
                && !matches!(operation, op::READ | op::WRITE))
        {
            return Err(Error::invalid(format!(
                "queue {queue}: {} of {nr_segments} segments at sector {sector} does not fit \
                 one request (at most {max_segments}, 11 for flush and barrier)",
                operation_name(operation)
            )));
        }
        let readonly = operation != op::READ;
        self.segment_scratch.clear();
        for (index, &(first_sect, last_sect)) in slot.layout.iter().enumerate() {
            let gref = slot.refs[index];
            if !persistent {
                self.grants
                    .grant(gref, slot.frames[index].gfn(), readonly)?;
                slot.granted_data += 1;
            }
            self.segment_scratch.push(Segment {
                gref,
                first_sect,
                last_sect,
            });
        }
        slot.expected_operation = operation;
        if nr_segments <= MAX_SEGMENTS_PER_REQUEST {
            let mut segments = [Segment::default(); MAX_SEGMENTS_PER_REQUEST];
            segments[..nr_segments].copy_from_slice(&self.segment_scratch);
            return Ok(Request {
                operation,
                id,
                sector,
                handle: 0,
                body: RequestBody::Direct {
                    nr_segments: nr_segments as u8,
                    segments,
                },
            });
        }
        let mut indirect_grefs = [0u32; MAX_INDIRECT_PAGES_PER_REQUEST];
        for (page, chunk) in self
            .segment_scratch
            .chunks(SEGMENTS_PER_INDIRECT_PAGE)
            .enumerate()
        {
            self.page_scratch.fill(0);
            encode_indirect_segments(chunk, &mut self.page_scratch);
            slot.indirect_frames[page].write(0, &self.page_scratch);
            let gref = slot.indirect_refs[page];
            if !persistent {
                self.grants
                    .grant(gref, slot.indirect_frames[page].gfn(), true)?;
                slot.granted_indirect += 1;
            }
            indirect_grefs[page] = gref;
        }
        Ok(Request {
            operation: op::INDIRECT,
            id,
            sector,
            handle: 0,
            body: RequestBody::Indirect {
                indirect_op: operation,
                nr_segments: nr_segments as u16,
                indirect_grefs,
            },
        })
    }

    /// Publish the requests put so far; notify the backend when it asked to be.
    pub fn push(&mut self) -> Result<()> {
        if self.ring.0.push_requests() {
            self.evtchn.notify()?;
        }
        Ok(())
    }

    /// Put the request of `slot` on the ring and publish it.
    pub fn submit(&mut self, slot: usize, io: IoOp) -> Result<u64> {
        let id = self.queue_request(slot, io)?;
        self.push()?;
        Ok(id)
    }

    /// The next response, matched to its slot: its id must be one in flight, its operation
    /// the one asked (an INDIRECT request is answered with its indirect_op). Grants made for
    /// the request are revoked. The slot stays held until [`Self::release`].
    pub fn next_completion(&mut self) -> Result<Option<Completion>> {
        let Some(response) = self.ring.0.next_response() else {
            return Ok(None);
        };
        let now = Instant::now();
        let slot_index = (response.id & 0xffff) as usize;
        let queue = self.index;
        let Some(slot) = self
            .slots
            .get_mut(slot_index)
            .filter(|slot| slot.state == SlotState::InFlight && slot.id == response.id)
        else {
            return Err(Error::invalid(format!(
                "queue {queue}: response with id {:#x} (op {}, status {}) matches no request in flight",
                response.id, response.operation, response.status
            )));
        };
        if response.operation != slot.expected_operation {
            return Err(Error::invalid(format!(
                "queue {queue}: {} at sector {} ({} sectors) answered with op {}",
                operation_name(slot.expected_operation),
                slot.io.sector(),
                slot.nr_sectors,
                response.operation
            )));
        }
        for &gref in &slot.refs[..slot.granted_data] {
            self.grants.revoke(gref)?;
        }
        for &gref in &slot.indirect_refs[..slot.granted_indirect] {
            self.grants.revoke(gref)?;
        }
        slot.granted_data = 0;
        slot.granted_indirect = 0;
        slot.state = SlotState::Answered;
        self.in_flight -= 1;
        Ok(Some(Completion {
            slot: slot_index,
            id: response.id,
            status: response.status,
            latency_ns: now.duration_since(slot.started).as_nanos() as u64,
        }))
    }

    /// Sleep until responses are there to consume (RING_FINAL_CHECK_FOR_RESPONSES before
    /// sleeping, so the backend notifies when it crosses `rsp_event`). Fails after the
    /// response timeout, naming the oldest request in flight.
    pub fn wait_responses(&mut self) -> Result<()> {
        let start = Instant::now();
        if self.spin_for_response() {
            self.waits.record(start.elapsed(), self.poll);
            return Ok(());
        }
        let deadline = start + self.timeout;
        loop {
            if self.ring.0.final_check_for_responses() {
                self.waits.record(start.elapsed(), self.poll);
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.stuck());
            }
            self.evtchn.wait(deadline - now)?;
        }
    }

    /// Spin up to the poll window for a response (with several in flight only when
    /// `poll_busy` and while waits average at most twice the window), reading `rsp_prod`
    /// only (no `rsp_event` update: a backend answering meanwhile is not asked to notify).
    /// True when one is there.
    fn spin_for_response(&self) -> bool {
        if self.poll.is_zero()
            || (self.in_flight > 1 && (!self.poll_busy || self.waits.outlast(self.poll)))
        {
            return false;
        }
        let deadline = Instant::now() + self.poll;
        loop {
            if self.ring.0.has_unconsumed_responses() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
    }

    fn stuck(&self) -> Error {
        let oldest = self
            .slots
            .iter()
            .filter(|slot| slot.state == SlotState::InFlight)
            .min_by_key(|slot| slot.started);
        let what = match oldest {
            Some(slot) => format!(
                "{} at sector {} ({} sectors)",
                operation_name(slot.expected_operation),
                slot.io.sector(),
                slot.nr_sectors
            ),
            None => "no request".to_string(),
        };
        Error::invalid(format!(
            "queue {}: no response within {:?}; oldest in flight: {what}",
            self.index, self.timeout
        ))
    }

    /// Put any request on the ring, untracked (hostile tests); publish with [`Self::push`].
    pub fn put_raw(&mut self, request: &Request) -> Result<()> {
        if !self.ring.0.put_request(request) {
            return Err(Error::invalid(format!("queue {}: ring full", self.index)));
        }
        Ok(())
    }

    /// Put and publish an untracked request.
    pub fn submit_raw(&mut self, request: &Request) -> Result<()> {
        self.put_raw(request)?;
        self.push()
    }

    /// The next response, untracked.
    pub fn next_raw_response(&mut self) -> Option<Response> {
        self.ring.0.next_response()
    }

    /// Wait up to `timeout` for the next untracked response.
    pub fn wait_raw_response(&mut self, timeout: Duration) -> Result<Response> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(response) = self.ring.0.next_response() {
                return Ok(response);
            }
            if self.ring.0.final_check_for_responses() {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::invalid(format!(
                    "queue {}: no response within {timeout:?}",
                    self.index
                )));
            }
            self.evtchn.wait(deadline - now)?;
        }
    }

    /// Kick the backend regardless of `req_event` (a notification flood, in tests).
    pub fn notify(&self) -> Result<()> {
        self.evtchn.notify()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Leave no grant behind: the guest's memory outlives nothing, but its table may be
        // read by a backend until the files go.
        for &gref in &self.ring_refs {
            let _ = self.grants.revoke(gref);
        }
        for slot in &self.slots {
            for &gref in slot.refs.iter().chain(&slot.indirect_refs) {
                let _ = self.grants.revoke(gref);
            }
        }
    }
}

/// How the frontend hands its rings to the backend and takes them back: `ferrotap serve`'s
/// control socket ([`ControlClient`]), or the XenBus handshake
/// ([`super::xenbus_front::XenbusFront`]).
pub trait BackendLink: Send {
    /// Hand the rings over; once the backend is connected, update `info` with what it
    /// publishes only then (sectors, sector size, read-only).
    fn connect(&mut self, request: &ConnectRequest, info: &mut BackendInfo) -> Result<()>;
    /// Tell the backend to let go (it completes or fails what is in flight, unmaps, unbinds).
    fn disconnect(&mut self) -> Result<()>;
    /// The control connection, when that is the link.
    fn control(&mut self) -> Option<&mut ControlClient> {
        None
    }
}

impl BackendLink for ControlClient {
    fn connect(&mut self, request: &ConnectRequest, _info: &mut BackendInfo) -> Result<()> {
        self.connect_rings(request)
    }

    fn disconnect(&mut self) -> Result<()> {
        ControlClient::disconnect(self)
    }

    fn control(&mut self) -> Option<&mut ControlClient> {
        Some(self)
    }
}

/// A connected simulated blkfront.
pub struct Blkfront {
    queues: Vec<Queue>,
    link: Box<dyn BackendLink>,
    negotiated: Negotiated,
    memory: GuestMemory,
    grants: Arc<GrantTable>,
    connected: bool,
}

impl Blkfront {
    /// Ask the backend for its features, set up rings, slots, grants and event channels in
    /// a fresh guest memory, then connect.
    pub fn connect(config: &FrontConfig) -> Result<Blkfront> {
        let mut control = ControlClient::connect(&config.control)?;
        let info = control.info()?;
        Blkfront::connect_through(config, info, Box::new(control))
    }

    /// As [`Self::connect`], with the backend's offer `info` already known and the rings
    /// handed over through `link`.
    pub fn connect_through(
        config: &FrontConfig,
        info: BackendInfo,
        mut link: Box<dyn BackendLink>,
    ) -> Result<Blkfront> {
        let mut negotiated = negotiate(config, info)?;
        let (memory, grants) = create_guest(config, &negotiated)?;
        let grants = Arc::new(grants);
        // Each frontend queue and each backend queue a core of its own: spinning steals none.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let poll_busy = 2 * negotiated.queues as usize <= cores;
        let queues = (0..negotiated.queues as usize)
            .map(|index| build_queue(config, &negotiated, index, &memory, &grants, poll_busy))
            .collect::<Result<Vec<_>>>()?;
        let request = ConnectRequest {
            domid: config.domid,
            protocol: negotiated.protocol.name(),
            ring_page_order: negotiated.ring_page_order,
            queues: queues
                .iter()
                .map(|queue| QueueTransport {
                    ring_refs: queue.ring_refs.clone(),
                    event_channel: queue.evtchn.port(),
                })
                .collect(),
            persistent: negotiated.persistent,
        };
        link.connect(&request, &mut negotiated.info)?;
        Ok(Blkfront {
            queues,
            link,
            negotiated,
            memory,
            grants,
            connected: true,
        })
    }

    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    pub fn info(&self) -> &BackendInfo {
        &self.negotiated.info
    }

    pub fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    pub fn queue_mut(&mut self, index: usize) -> &mut Queue {
        &mut self.queues[index]
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    pub fn grants(&self) -> &GrantTable {
        &self.grants
    }

    /// The control connection (tests send `stats` or `info` through it). Panics when the
    /// frontend was connected through xenstore.
    pub fn control_mut(&mut self) -> &mut ControlClient {
        match self.link.control() {
            Some(control) => control,
            None => panic!("this blkfront reaches its backend through xenstore"),
        }
    }

    /// Tell the backend to let go (it completes or fails what is in flight, unmaps, unbinds).
    pub fn disconnect(&mut self) -> Result<()> {
        if self.connected {
            self.connected = false;
            self.link.disconnect()?;
        }
        Ok(())
    }
}

impl Drop for Blkfront {
    fn drop(&mut self) {
        let _ = self.disconnect();
    }
}

fn negotiate(config: &FrontConfig, info: BackendInfo) -> Result<Negotiated> {
    let features = info.features;
    if info.sector_size != 512 {
        return Err(Error::unsupported(format!(
            "backend sector size {} (xensim uses 512)",
            info.sector_size
        )));
    }
    if !(1..=MAX_QUEUES).contains(&config.queues) {
        return Err(Error::invalid(format!(
            "{} queues: the blkfront drives 1 to {MAX_QUEUES}",
            config.queues
        )));
    }
    if config.ring_page_order > MAX_RING_PAGE_ORDER {
        return Err(Error::invalid(format!(
            "ring-page-order {} above {MAX_RING_PAGE_ORDER}",
            config.ring_page_order
        )));
    }
    // As Linux blkfront: take what was asked, within what the backend offers.
    let queues = config.queues.min(features.max_queues.max(1));
    let ring_page_order = config.ring_page_order.min(features.max_ring_page_order);
    let persistent = config.persistent && features.persistent;
    let max_segments = if config.indirect_segments as usize > MAX_SEGMENTS_PER_REQUEST
        && features.max_indirect_segments as usize > MAX_SEGMENTS_PER_REQUEST
    {
        config
            .indirect_segments
            .min(features.max_indirect_segments)
            .min((MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE) as u32)
    } else {
        MAX_SEGMENTS_PER_REQUEST as u32
    };
    let slot_segments = config.slot_segments.unwrap_or(max_segments);
    if slot_segments == 0 || slot_segments > max_segments {
        return Err(Error::invalid(format!(
            "requests of {slot_segments} segments: the backend takes 1 to {max_segments}"
        )));
    }
    let ring_size = ring_entries(1 << ring_page_order, config.protocol);
    let slots = config.iodepth.clamp(1, ring_size);
    Ok(Negotiated {
        info,
        queues,
        ring_page_order,
        protocol: config.protocol,
        persistent,
        max_segments,
        slots,
        slot_segments,
    })
}

/// Create the guest's memory and grant table, sized for the rings and slots plus a spare.
fn create_guest(
    config: &FrontConfig,
    negotiated: &Negotiated,
) -> Result<(GuestMemory, GrantTable)> {
    let indirect_pages = indirect_pages(negotiated.slot_segments);
    let per_queue = (1u32 << negotiated.ring_page_order)
        + negotiated.slots * (negotiated.slot_segments + indirect_pages);
    let frames = negotiated
        .queues
        .checked_mul(per_queue)
        .and_then(|frames| frames.checked_add(SPARE))
        .ok_or_else(|| Error::invalid("guest memory too large"))?;
    let memory = GuestMemory::create(&config.dir, config.domid, frames)?;
    let grants = GrantTable::create(
        &config.dir,
        config.domid,
        frames + super::guest::FIRST_FREE_REF,
    )?;
    Ok((memory, grants))
}

fn indirect_pages(segments: u32) -> u32 {
    if segments as usize > MAX_SEGMENTS_PER_REQUEST {
        (segments as usize).div_ceil(SEGMENTS_PER_INDIRECT_PAGE) as u32
    } else {
        0
    }
}

fn build_queue(
    config: &FrontConfig,
    negotiated: &Negotiated,
    index: usize,
    memory: &GuestMemory,
    grants: &Arc<GrantTable>,
    poll_busy: bool,
) -> Result<Queue> {
    let pages = 1usize << negotiated.ring_page_order;
    // Allocated in ascending frames, used in descending order: the ring's refs name
    // non-contiguous frames, which the backend must present as one ring in ref order.
    let mut ring_frames = memory.alloc_many(pages)?;
    ring_frames.reverse();
    let view = memory.map_contiguous(&ring_frames.iter().collect::<Vec<_>>())?;
    // SAFETY: the view maps the ring's pages read-write for as long as the Queue holds it,
    // and the ring is dropped before the view (field order); only the backend shares it.
    let ring = unsafe { FrontRing::init(view.as_ptr(), view.len(), negotiated.protocol) };
    let mut ring_refs = Vec::with_capacity(pages);
    for frame in &ring_frames {
        let gref = grants.alloc_ref()?;
        grants.grant(gref, frame.gfn(), false)?;
        ring_refs.push(gref);
    }
    let evtchn = FrontEventChannel::bind(&config.dir, config.domid)?;
    let indirect = indirect_pages(negotiated.slot_segments) as usize;
    let mut slots = Vec::with_capacity(negotiated.slots as usize);
    for _ in 0..negotiated.slots {
        let frames = memory.alloc_many(negotiated.slot_segments as usize)?;
        let indirect_frames = memory.alloc_many(indirect)?;
        let refs = frames
            .iter()
            .map(|_| grants.alloc_ref())
            .collect::<Result<Vec<_>>>()?;
        let indirect_refs = indirect_frames
            .iter()
            .map(|_| grants.alloc_ref())
            .collect::<Result<Vec<_>>>()?;
        if negotiated.persistent {
            // Granted once, writable (the backend may keep them mapped for any use), and
            // kept until disconnect.
            for (frame, &gref) in frames
                .iter()
                .chain(&indirect_frames)
                .zip(refs.iter().chain(&indirect_refs))
            {
                grants.grant(gref, frame.gfn(), false)?;
            }
        }
        slots.push(Slot {
            frames,
            refs,
            indirect_frames,
            indirect_refs,
            layout: Vec::with_capacity(negotiated.slot_segments as usize),
            state: SlotState::Free,
            id: 0,
            expected_operation: 0,
            io: IoOp::Read { sector: 0 },
            nr_sectors: 0,
            granted_data: 0,
            granted_indirect: 0,
            started: Instant::now(),
        });
    }
    let free_slots = (0..slots.len()).rev().collect();
    Ok(Queue {
        index,
        ring: QueueRing(ring),
        view,
        ring_frames,
        ring_refs,
        evtchn,
        grants: Arc::clone(grants),
        protocol: negotiated.protocol,
        persistent: negotiated.persistent,
        max_segments: negotiated.max_segments as usize,
        slots,
        free_slots,
        in_flight: 0,
        next_seq: 1,
        timeout: config.response_timeout,
        poll: config.poll,
        poll_busy,
        waits: WaitEstimate::default(),
        segment_scratch: Vec::with_capacity(negotiated.slot_segments as usize),
        page_scratch: vec![0u8; PAGE_SIZE],
    })
}

#[cfg(test)]
mod tests {
    use super::WaitEstimate;
    use std::time::Duration;

    #[test]
    fn wait_estimate_stops_the_spin_on_long_waits_and_resumes_it_on_short_ones() {
        let window = Duration::from_micros(100);
        let mut waits = WaitEstimate::default();
        assert!(!waits.outlast(window), "a fresh queue spins");
        // One long wait alone does not stop the spin (weight 1/8).
        waits.record(Duration::from_micros(300), window);
        assert!(!waits.outlast(window));
        for _ in 0..16 {
            waits.record(Duration::from_micros(300), window);
        }
        assert!(waits.outlast(window), "bursts of 300 µs waits stop it");
        let mut short = 0;
        while waits.outlast(window) {
            waits.record(Duration::from_micros(10), window);
            short += 1;
            assert!(short < 32, "short waits must bring the spin back");
        }
        assert!(
            short > 1,
            "one short wait alone does not undo a run of long ones"
        );
        // Waits a little over the window, as a sleeping queue measures them with its
        // wake-up, keep it spinning.
        for _ in 0..64 {
            waits.record(Duration::from_micros(150), window);
        }
        assert!(!waits.outlast(window));
        // A stall among 60 µs waits does not stop it: a sample counts for at most 400 µs.
        let mut waits = WaitEstimate::default();
        for _ in 0..64 {
            waits.record(Duration::from_micros(60), window);
        }
        waits.record(Duration::from_millis(20), window);
        assert!(!waits.outlast(window));
        // Nor does a wait too long to count in nanoseconds wrap anything.
        waits.record(Duration::from_secs(u64::MAX), window);
        assert!(!waits.outlast(window));
        for _ in 0..64 {
            waits.record(Duration::from_secs(u64::MAX), window);
        }
        assert!(waits.outlast(window));
        // A window too long to count in nanoseconds saturates too.
        let mut huge = WaitEstimate::default();
        huge.record(Duration::from_secs(u64::MAX), Duration::from_secs(u64::MAX));
        assert!(!huge.outlast(Duration::from_secs(u64::MAX)));
    }
}
