//! Workloads for the simulated blkfront: `verify` (a random mix checked against a model of
//! the disk) and the benchmark's randread, randwrite, seqread and seqwrite. One thread per
//! queue keeps `iodepth` requests in flight.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use serde::Serialize;

use super::blkfront::{operation_name, Blkfront, Completion, IoOp, Queue, Slot};
use super::guest::PAGE_SIZE;
use crate::blkif::{op, status, MAX_SEGMENTS_PER_REQUEST, SECTORS_PER_PAGE, SECTOR_SIZE};
use crate::error::{Error, Result};

const SECTOR: usize = SECTOR_SIZE as usize;
/// The part of the disk `verify` uses unless told (its model costs 17 bytes per sector).
const VERIFY_DEFAULT_REGION: u64 = 1 << 30;
/// The most it may be told to use.
const VERIFY_MAX_REGION: u64 = 8 << 30;
/// Bytes a read's frames are filled with before it is sent, to catch a backend that writes
/// outside `[first_sect, last_sect]`.
const CANARY: u8 = 0xa5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadKind {
    /// Random reads, writes, flushes, barriers and discards checked against a model.
    Verify,
    Randread,
    Randwrite,
    Seqread,
    Seqwrite,
}

/// When a run stops.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this many requests over all queues.
    Ops(u64),
    /// After this long.
    Time(Duration),
}

#[derive(Debug, Clone, Copy)]
pub struct WorkloadConfig {
    pub kind: WorkloadKind,
    /// Bytes per request of the benchmark workloads (a multiple of 512).
    pub block_size: u32,
    pub stop: Stop,
    pub seed: u64,
    /// Bytes at the start of the disk the workload uses (`None`: the whole disk).
    pub region_bytes: Option<u64>,
    /// Let `verify` send discards (when the backend offers them).
    pub discard: bool,
}

impl WorkloadConfig {
    /// Data frames a request of this workload needs, or `None` for the negotiated maximum.
    pub fn slot_segments(&self) -> Option<u32> {
        match self.kind {
            WorkloadKind::Verify => None,
            _ => Some(self.block_size.div_ceil(PAGE_SIZE as u32)),
        }
    }
}

/// The run's figures (the JSON printed on stdout).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Report {
    /// Requests answered.
    pub ops: u64,
    pub reads: u64,
    /// Requests carrying data to the disk (flushes and barriers with segments included).
    pub writes: u64,
    /// FLUSH_DISKCACHE and WRITE_BARRIER requests, with or without data.
    pub flushes: u64,
    pub discards: u64,
    /// Data bytes moved by reads and writes.
    pub bytes: u64,
    /// Error responses: any one ends the run as a failure, so a report printed has 0.
    pub errors: u64,
    /// Bytes read back and compared with contents the model knew (verify).
    pub verified_bytes: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// A small fast generator (splitmix64): reproducible runs from `--seed`.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in `0..bound` (`bound > 0`).
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// Uniform in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 512 bytes a write of `generation` puts in `sector`: the sector and generation in the
/// first 16 bytes, then words derived from both, so misplaced or stale data is recognised.
pub fn sector_pattern(sector: u64, generation: u64, out: &mut [u8]) {
    out[..8].copy_from_slice(&sector.to_le_bytes());
    out[8..16].copy_from_slice(&generation.to_le_bytes());
    let seed = mix(sector ^ generation.rotate_left(32));
    for (index, word) in out[16..SECTOR].chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&mix(seed.wrapping_add(index as u64)).to_le_bytes());
    }
}

/// A hash of a sector's bytes (what the model remembers of data it did not write).
fn sector_hash(data: &[u8]) -> u64 {
    data.chunks_exact(8)
        .fold(0xcbf2_9ce4_8422_2325, |hash, word| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(word);
            mix(hash ^ u64::from_le_bytes(bytes))
        })
}

/// What the model knows of one sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorState {
    /// Never read nor written: a read learns it.
    Unknown,
    /// Discarded: reads as zeros.
    Zero,
    /// Written with [`sector_pattern`] of this generation.
    Written(u64),
    /// Read once, never written: must read the same again (hash of the bytes).
    Learned(u64),
}

/// The model of the disk's first `sectors()` sectors.
pub struct Model {
    states: Vec<SectorState>,
    busy: Vec<bool>,
}

impl Model {
    pub fn new(sectors: u64) -> Model {
        Model {
            states: vec![SectorState::Unknown; sectors as usize],
            busy: vec![false; sectors as usize],
        }
    }

    pub fn sectors(&self) -> u64 {
        self.states.len() as u64
    }

    pub fn state(&self, sector: u64) -> SectorState {
        self.states[sector as usize]
    }

    pub fn set(&mut self, sector: u64, state: SectorState) {
        self.states[sector as usize] = state;
    }

    /// Check one sector read back, learning it when unknown. `Ok(true)`: it was known and
    /// matched; `Err`: what differs.
    pub fn check(&mut self, sector: u64, data: &[u8]) -> std::result::Result<bool, String> {
        let expected = self.states[sector as usize];
        let matches = match expected {
            SectorState::Unknown => {
                self.states[sector as usize] = SectorState::Learned(sector_hash(data));
                return Ok(false);
            }
            SectorState::Zero => data.iter().all(|&byte| byte == 0),
            SectorState::Written(generation) => {
                let mut pattern = [0u8; SECTOR];
                sector_pattern(sector, generation, &mut pattern);
                pattern[..] == *data
            }
            SectorState::Learned(hash) => sector_hash(data) == hash,
        };
        if matches {
            Ok(true)
        } else {
            Err(format!(
                "sector {sector}: expected {}, found {}",
                describe_state(expected),
                describe_data(data)
            ))
        }
    }

    /// Runs of sectors whose contents the model knows exactly (written or discarded).
    pub fn known_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (sector, state) in self.states.iter().enumerate() {
            if !matches!(state, SectorState::Zero | SectorState::Written(_)) {
                continue;
            }
            let sector = sector as u64;
            match runs.last_mut() {
                Some((start, count)) if *start + *count == sector => *count += 1,
                _ => runs.push((sector, 1)),
            }
        }
        runs
    }

    /// Write the known contents to `path` (a sparse raw file of the region's size) and the
    /// runs they cover to `path` with the extension `known` (JSON `[[sector, count], ...]`).
    pub fn dump(&self, path: &Path) -> Result<()> {
        let file = File::create(path).map_err(|err| Error::io("create", err).with_path(path))?;
        file.set_len(self.sectors() * SECTOR_SIZE)
            .map_err(|err| Error::io("size", err).with_path(path))?;
        let runs = self.known_runs();
        let mut buf = [0u8; SECTOR];
        for &(start, count) in &runs {
            for sector in start..start + count {
                match self.state(sector) {
                    SectorState::Written(generation) => {
                        sector_pattern(sector, generation, &mut buf)
                    }
                    _ => buf.fill(0),
                }
                file.write_all_at(&buf, sector * SECTOR_SIZE)
                    .map_err(|err| Error::io("write", err).with_path(path))?;
            }
        }
        let known_path = &path.with_extension("known");
        let mut known = File::create(known_path)
            .map_err(|err| Error::io("create", err).with_path(known_path))?;
        let json = serde_json::to_string(&runs)
            .map_err(|err| Error::invalid(format!("encode model runs: {err}")))?;
        known
            .write_all(json.as_bytes())
            .map_err(|err| Error::io("write", err).with_path(known_path))
    }
}

fn describe_state(state: SectorState) -> String {
    match state {
        SectorState::Unknown => "anything".into(),
        SectorState::Zero => "zeros (discarded)".into(),
        SectorState::Written(generation) => format!("write generation {generation}"),
        SectorState::Learned(_) => "the bytes read from it before".into(),
    }
}

fn describe_data(data: &[u8]) -> String {
    if data.iter().all(|&byte| byte == 0) {
        return "zeros".into();
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&data[..8]);
    let sector = u64::from_le_bytes(word);
    word.copy_from_slice(&data[8..16]);
    let generation = u64::from_le_bytes(word);
    let mut pattern = [0u8; SECTOR];
    sector_pattern(sector, generation, &mut pattern);
    if pattern[..] == *data {
        format!("the data of sector {sector} write generation {generation}")
    } else if data.iter().all(|&byte| byte == CANARY) {
        "the frame's canary (the backend did not write it)".into()
    } else {
        format!("other bytes (starting {:02x?})", &data[..16])
    }
}

/// Request latencies in log buckets: 16 per power of two of nanoseconds.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
}

const SUB_BUCKETS: u32 = 16;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; (64 * SUB_BUCKETS) as usize],
        }
    }
}

impl Histogram {
    fn bucket(value: u64) -> usize {
        if value < u64::from(SUB_BUCKETS) {
            return value as usize;
        }
        let exponent = 63 - value.leading_zeros();
        let sub = (value >> (exponent - 4)) & u64::from(SUB_BUCKETS - 1);
        ((exponent - 3) * SUB_BUCKETS) as usize + sub as usize
    }

    /// The middle of a bucket's range.
    fn value(bucket: usize) -> f64 {
        let bucket = bucket as u64;
        if bucket < u64::from(SUB_BUCKETS) {
            return bucket as f64;
        }
        let exponent = bucket / u64::from(SUB_BUCKETS) + 3;
        let sub = bucket % u64::from(SUB_BUCKETS);
        let low = (u64::from(SUB_BUCKETS) + sub) << (exponent - 4);
        low as f64 + (1u64 << (exponent - 4)) as f64 / 2.0
    }

    pub fn record(&mut self, nanos: u64) {
        self.counts[Histogram::bucket(nanos)] += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
    }

    /// The `fraction` quantile in nanoseconds (0 when empty).
    pub fn quantile(&self, fraction: f64) -> f64 {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64 * fraction).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Histogram::value(bucket);
            }
        }
        0.0
    }
}

/// Counters of one queue's run.
#[derive(Default, Clone)]
struct QueueStats {
    ops: u64,
    reads: u64,
    writes: u64,
    flushes: u64,
    discards: u64,
    bytes: u64,
    verified_bytes: u64,
    latency: Histogram,
}

impl QueueStats {
    fn count(&mut self, io: IoOp, nr_sectors: u64, latency_ns: u64) {
        self.ops += 1;
        self.latency.record(latency_ns);
        match io {
            IoOp::Read { .. } => self.reads += 1,
            IoOp::Write { .. } => self.writes += 1,
            IoOp::Flush { .. } | IoOp::Barrier { .. } => {
                self.flushes += 1;
                if nr_sectors > 0 {
                    self.writes += 1;
                }
            }
            IoOp::Discard { .. } => {
                self.discards += 1;
                return;
            }
        }
        self.bytes += nr_sectors * SECTOR_SIZE;
    }

    fn merge(&mut self, other: &QueueStats) {
        self.ops += other.ops;
        self.reads += other.reads;
        self.writes += other.writes;
        self.flushes += other.flushes;
        self.discards += other.discards;
        self.bytes += other.bytes;
        self.verified_bytes += other.verified_bytes;
        self.latency.merge(&other.latency);
    }
}

/// What a workload decides for a free slot.
enum Step {
    Submit(IoOp),
    /// Nothing can be sent now (the ranges it drew are in flight elsewhere).
    Blocked,
}

/// The per-queue half of a workload.
trait Driver: Send {
    /// Fill slot `index` (layout and write data) for the next request.
    fn prepare(&mut self, index: usize, slot: &mut Slot, rng: &mut Rng) -> Result<Step>;
    /// Check an answered request; `verified` counts bytes compared with known contents.
    fn complete(&mut self, slot: &Slot, completion: &Completion, verified: &mut u64) -> Result<()>;
}

/// Shared by the queue threads: how many requests may still start, and whether to stop.
struct Budget {
    stop: Stop,
    started: Instant,
    issued: AtomicU64,
    abort: AtomicBool,
}

impl Budget {
    fn claim(&self) -> bool {
        if self.abort.load(Ordering::Relaxed) {
            return false;
        }
        match self.stop {
            Stop::Ops(limit) => self.issued.fetch_add(1, Ordering::Relaxed) < limit,
            Stop::Time(limit) => self.started.elapsed() < limit,
        }
    }
}

/// Describe the request of a slot for an error message.
fn describe(queue: usize, slot: &Slot) -> String {
    let io = slot.io();
    let count = match io {
        IoOp::Discard { nr_sectors, .. } => nr_sectors,
        _ => slot.nr_sectors(),
    };
    format!(
        "queue {queue}: {} at sector {} ({count} sectors)",
        operation_name(io.operation()),
        io.sector()
    )
}

/// Keep the queue full until the budget runs out, then drain it.
fn drive(
    queue: &mut Queue,
    driver: &mut dyn Driver,
    budget: &Budget,
    seed: u64,
) -> Result<QueueStats> {
    let mut stats = QueueStats::default();
    let mut rng = Rng::new(seed ^ (queue.index() as u64).wrapping_mul(0x1000_0000_01b3));
    let mut done = false;
    loop {
        let mut blocked = false;
        while !done {
            let Some(slot) = queue.acquire() else { break };
            if !budget.claim() {
                queue.release(slot);
                done = true;
                break;
            }
            match driver.prepare(slot, queue.slot_mut(slot), &mut rng)? {
                // Each request is published as it is put on the ring, as Linux's blkfront
                // does (a push per request in its queue_rq): the backend starts on the
                // first while the rest are built. Publishing a whole refill at once held
                // serve back by the time to build it (tmpfs, 4 KiB reads at QD32, 1 queue:
                // 250k-329k IOPS per request against 263k-292k per refill, higher in 4 of
                // 5 alternating pairs).
                Step::Submit(io) => {
                    queue.submit(slot, io)?;
                }
                Step::Blocked => {
                    // Not sent: give the claim back.
                    budget.issued.fetch_sub(1, Ordering::Relaxed);
                    queue.release(slot);
                    blocked = true;
                    break;
                }
            }
        }
        if queue.in_flight() == 0 {
            if done {
                return Ok(stats);
            }
            if blocked {
                std::thread::sleep(Duration::from_micros(50));
            }
            continue;
        }
        let mut reaped = false;
        while let Some(completion) = queue.next_completion()? {
            reaped = true;
            let slot = queue.slot(completion.slot);
            let result = driver.complete(slot, &completion, &mut stats.verified_bytes);
            if let Err(err) = result {
                budget.abort.store(true, Ordering::Relaxed);
                return Err(err);
            }
            stats.count(slot.io(), slot.nr_sectors(), completion.latency_ns);
            queue.release(completion.slot);
        }
        if !reaped {
            queue.wait_responses()?;
        }
    }
}

fn expect_okay(queue: usize, slot: &Slot, completion: &Completion) -> Result<()> {
    if completion.status == status::OKAY {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{}: status {} (id {:#x})",
        describe(queue, slot),
        completion.status,
        completion.id
    )))
}

/// randread, randwrite, seqread, seqwrite: fixed-size requests of whole pages.
struct BenchDriver {
    queue: usize,
    write: bool,
    sequential: bool,
    block_sectors: u64,
    /// This queue's part of the region, in blocks (sequential) or the whole region (random).
    first_block: u64,
    blocks: u64,
    cursor: u64,
    generation: u64,
}

impl Driver for BenchDriver {
    fn prepare(&mut self, _: usize, slot: &mut Slot, rng: &mut Rng) -> Result<Step> {
        let block = if self.sequential {
            let block = self.first_block + self.cursor;
            self.cursor = (self.cursor + 1) % self.blocks;
            block
        } else {
            self.first_block + rng.below(self.blocks)
        };
        let sector = block * self.block_sectors;
        let mut left = self.block_sectors;
        while left > 0 {
            let take = left.min(u64::from(SECTORS_PER_PAGE));
            slot.push_segment(0, take as u8 - 1);
            left -= take;
        }
        if !self.write {
            return Ok(Step::Submit(IoOp::Read { sector }));
        }
        // Stamp every sector with (sector, generation) so misplaced data is recognisable.
        self.generation += 1;
        let stamp = (self.queue as u64) << 56 | self.generation;
        for index in 0..self.block_sectors {
            let frame = slot.frame_mut((index / u64::from(SECTORS_PER_PAGE)) as usize);
            let offset = (index % u64::from(SECTORS_PER_PAGE)) as usize * SECTOR;
            frame.write_u64(offset, sector + index);
            frame.write_u64(offset + 8, stamp);
        }
        Ok(Step::Submit(IoOp::Write { sector }))
    }

    fn complete(&mut self, slot: &Slot, completion: &Completion, _: &mut u64) -> Result<()> {
        expect_okay(self.queue, slot, completion)
    }
}

/// The verify workload's state shared by all queues.
struct VerifyShared {
    model: Mutex<Model>,
    /// Sectors the model covers.
    region: u64,
    generation: AtomicU64,
    flush: bool,
    barrier: bool,
    discard: bool,
    discard_secure: bool,
    read_only: bool,
    /// The most segments one request may carry (the slots hold that many frames).
    max_segments: u64,
}

/// What the verify driver remembers of a request in flight.
#[derive(Clone, Copy, Default)]
struct Pending {
    sector: u64,
    count: u64,
    generation: u64,
}

struct VerifyDriver {
    queue: usize,
    shared: Arc<VerifyShared>,
    pending: Vec<Pending>,
    sector_buf: Vec<u8>,
}

impl VerifyDriver {
    fn pick_operation(&self, rng: &mut Rng) -> u8 {
        let shared = &self.shared;
        loop {
            let operation = match rng.below(100) {
                0..40 => op::READ,
                40..75 => op::WRITE,
                75..83 => op::FLUSH_DISKCACHE,
                83..88 => op::WRITE_BARRIER,
                _ => op::DISCARD,
            };
            let allowed = match operation {
                op::READ => true,
                op::WRITE => !shared.read_only,
                op::FLUSH_DISKCACHE => shared.flush,
                op::WRITE_BARRIER => shared.barrier && !shared.read_only,
                _ => shared.discard && !shared.read_only,
            };
            if allowed {
                return operation;
            }
        }
    }

    /// Sectors and, for data requests, a segment layout (random split, random offsets in
    /// the pages, or page-aligned like the page cache).
    fn pick_range(&self, operation: u8, rng: &mut Rng, slot: &mut Slot) -> (u64, u64) {
        let region = self.shared.region;
        let per_page = u64::from(SECTORS_PER_PAGE);
        if operation == op::DISCARD {
            let count = match rng.below(3) {
                0 => rng.range(1, 16),
                1 => rng.range(1, 64) * per_page,
                _ => rng.range(1, 4096),
            }
            .min(region);
            let sector = rng.below(region - count + 1);
            let sector = if rng.below(2) == 0 {
                sector / per_page * per_page
            } else {
                sector
            };
            return (sector, count.min(region - sector));
        }
        let max_segments = if matches!(operation, op::READ | op::WRITE) {
            self.shared.max_segments
        } else {
            self.shared
                .max_segments
                .min(MAX_SEGMENTS_PER_REQUEST as u64)
        };
        if operation != op::READ
            && operation != op::WRITE
            && (self.shared.read_only || rng.below(2) == 0)
        {
            // A pure flush or barrier, no data (the only kind a read-only disk takes).
            return (0, 0);
        }
        let max_sectors = (max_segments * per_page).min(region);
        let aligned = rng.below(2) == 0 && max_sectors >= per_page;
        let mut count = match rng.below(100) {
            0..45 => rng.range(1, per_page),
            45..80 => rng.range(per_page, 8 * per_page),
            _ => rng.range(1, max_sectors),
        }
        .min(max_sectors);
        if aligned {
            count = count.div_ceil(per_page).max(1) * per_page;
            count = count.min(max_sectors / per_page * per_page);
        }
        let mut sector = rng.below(region - count + 1);
        if aligned {
            sector = sector / per_page * per_page;
        }
        // The layout: page-aligned requests fill whole pages; others split at random, each
        // segment at a random place in its page, within the segments available.
        let mut left = count;
        let mut segments_left = max_segments;
        while left > 0 {
            let (first, take) = if aligned {
                (0, per_page.min(left))
            } else {
                let least = left.saturating_sub((segments_left - 1) * per_page).max(1);
                let most = per_page.min(left);
                let take = if rng.below(2) == 0 {
                    most
                } else {
                    rng.range(least, most)
                };
                (rng.below(per_page - take + 1), take)
            };
            slot.push_segment(first as u8, (first + take - 1) as u8);
            left -= take;
            segments_left -= 1;
        }
        (sector, count)
    }

    /// Copy the sectors of a slot's data out of its frames, in order, into `sector_buf`.
    fn gather(&mut self, slot: &Slot) {
        self.sector_buf.clear();
        for (index, &(first, last)) in slot.layout().iter().enumerate() {
            let start = self.sector_buf.len();
            let len = (usize::from(last) - usize::from(first) + 1) * SECTOR;
            self.sector_buf.resize(start + len, 0);
            slot.frames()[index].read(usize::from(first) * SECTOR, &mut self.sector_buf[start..]);
        }
    }

    /// Bytes of a read's frames outside its segments must still hold the canary.
    fn check_canary(&self, slot: &Slot) -> std::result::Result<(), String> {
        let mut page = vec![0u8; PAGE_SIZE];
        for (index, &(first, last)) in slot.layout().iter().enumerate() {
            slot.frames()[index].read(0, &mut page);
            let inside = usize::from(first) * SECTOR..(usize::from(last) + 1) * SECTOR;
            if let Some(offset) =
                (0..PAGE_SIZE).find(|offset| !inside.contains(offset) && page[*offset] != CANARY)
            {
                return Err(format!(
                    "segment {index} (sectors {first}..={last}): byte {offset} of its frame, \
                     outside the segment, was written"
                ));
            }
        }
        Ok(())
    }
}

impl Driver for VerifyDriver {
    fn prepare(&mut self, index: usize, slot: &mut Slot, rng: &mut Rng) -> Result<Step> {
        let operation = self.pick_operation(rng);
        let mut chosen = None;
        for _ in 0..16 {
            slot.clear_layout();
            let (sector, count) = self.pick_range(operation, rng, slot);
            let mut model = self
                .shared
                .model
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let range = sector as usize..(sector + count) as usize;
            if model.busy[range.clone()].iter().any(|&busy| busy) {
                continue;
            }
            model.busy[range].fill(true);
            chosen = Some((sector, count));
            break;
        }
        let Some((sector, count)) = chosen else {
            slot.clear_layout();
            return Ok(Step::Blocked);
        };
        let generation = if count > 0 && operation != op::READ && operation != op::DISCARD {
            self.shared.generation.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            0
        };
        let io = match operation {
            op::READ => IoOp::Read { sector },
            op::WRITE => IoOp::Write { sector },
            op::FLUSH_DISKCACHE => IoOp::Flush { sector },
            op::WRITE_BARRIER => IoOp::Barrier { sector },
            _ => IoOp::Discard {
                sector,
                nr_sectors: count,
                secure: self.shared.discard_secure && rng.below(4) == 0,
            },
        };
        if operation == op::READ {
            for index in 0..slot.layout().len() {
                slot.frame_mut(index).fill(CANARY);
            }
        } else if generation != 0 {
            let mut pattern = [0u8; SECTOR];
            let mut next = sector;
            for index in 0..slot.layout().len() {
                let (first, last) = slot.layout()[index];
                for page_sector in first..=last {
                    sector_pattern(next, generation, &mut pattern);
                    slot.frame_mut(index)
                        .write(usize::from(page_sector) * SECTOR, &pattern);
                    next += 1;
                }
            }
        }
        self.pending[index] = Pending {
            sector,
            count,
            generation,
        };
        Ok(Step::Submit(io))
    }

    fn complete(&mut self, slot: &Slot, completion: &Completion, verified: &mut u64) -> Result<()> {
        let pending = self.pending[completion.slot];
        let shared = Arc::clone(&self.shared);
        let release = |model: &mut Model| {
            model.busy[pending.sector as usize..(pending.sector + pending.count) as usize]
                .fill(false)
        };
        if completion.status != status::OKAY {
            release(&mut shared.model.lock().unwrap_or_else(PoisonError::into_inner));
            return expect_okay(self.queue, slot, completion);
        }
        let io = slot.io();
        let mut failure = None;
        if let IoOp::Read { .. } = io {
            if let Err(message) = self.check_canary(slot) {
                failure = Some(message);
            }
            self.gather(slot);
        }
        let mut model = shared.model.lock().unwrap_or_else(PoisonError::into_inner);
        match io {
            IoOp::Read { sector } => {
                for index in 0..pending.count {
                    let start = index as usize * SECTOR;
                    let data = &self.sector_buf[start..start + SECTOR];
                    match model.check(sector + index, data) {
                        Ok(true) => *verified += SECTOR_SIZE,
                        Ok(false) => {}
                        Err(message) => {
                            failure.get_or_insert(message);
                        }
                    }
                }
            }
            IoOp::Discard { sector, .. } => {
                for index in 0..pending.count {
                    model.set(sector + index, SectorState::Zero);
                }
            }
            IoOp::Write { sector } | IoOp::Flush { sector } | IoOp::Barrier { sector } => {
                for index in 0..pending.count {
                    model.set(sector + index, SectorState::Written(pending.generation));
                }
            }
        }
        release(&mut model);
        match failure {
            None => Ok(()),
            Some(message) => Err(Error::invalid(format!(
                "{}: {message}",
                describe(self.queue, slot)
            ))),
        }
    }
}

/// The outcome of a run: figures, and the model for `verify`.
pub struct Outcome {
    pub report: Report,
    pub model: Option<Model>,
}

/// Run `config` on every queue of `front`, one thread per queue.
pub fn run(front: &mut Blkfront, config: &WorkloadConfig) -> Result<Outcome> {
    let info = *front.info();
    let negotiated = *front.negotiated();
    let verify = config.kind == WorkloadKind::Verify;
    let default_region = if verify {
        VERIFY_DEFAULT_REGION / SECTOR_SIZE
    } else {
        info.sectors
    };
    let region_sectors = config
        .region_bytes
        .map_or(default_region, |bytes| bytes / SECTOR_SIZE)
        .min(info.sectors);
    if region_sectors == 0 {
        return Err(Error::invalid("the workload's region is empty"));
    }
    if verify && region_sectors > VERIFY_MAX_REGION / SECTOR_SIZE {
        return Err(Error::invalid(format!(
            "verify keeps a model of every sector: its region is at most {VERIFY_MAX_REGION} bytes"
        )));
    }
    let budget = Budget {
        stop: config.stop,
        started: Instant::now(),
        issued: AtomicU64::new(0),
        abort: AtomicBool::new(false),
    };
    let queues = front.queues_mut();
    let queue_count = queues.len() as u64;
    let mut drivers: Vec<Box<dyn Driver>> = Vec::with_capacity(queues.len());
    let mut shared_model = None;
    match config.kind {
        WorkloadKind::Verify => {
            let features = info.features;
            let shared = Arc::new(VerifyShared {
                model: Mutex::new(Model::new(region_sectors)),
                region: region_sectors,
                generation: AtomicU64::new(0),
                flush: features.flush,
                barrier: features.barrier,
                discard: features.discard && config.discard,
                discard_secure: features.discard_secure,
                read_only: info.read_only,
                max_segments: u64::from(negotiated.slot_segments),
            });
            for queue in queues.iter() {
                drivers.push(Box::new(VerifyDriver {
                    queue: queue.index(),
                    shared: Arc::clone(&shared),
                    pending: vec![Pending::default(); queue.slot_count()],
                    sector_buf: Vec::new(),
                }));
            }
            shared_model = Some(shared);
        }
        kind => {
            if config.block_size == 0 || u64::from(config.block_size) % SECTOR_SIZE != 0 {
                return Err(Error::invalid(format!(
                    "block size {} is not a multiple of 512",
                    config.block_size
                )));
            }
            let write = matches!(kind, WorkloadKind::Randwrite | WorkloadKind::Seqwrite);
            if write && info.read_only {
                return Err(Error::invalid("the disk is read-only"));
            }
            let sequential = matches!(kind, WorkloadKind::Seqread | WorkloadKind::Seqwrite);
            let block_sectors = u64::from(config.block_size) / SECTOR_SIZE;
            let region_blocks = region_sectors / block_sectors;
            let per_queue = if sequential {
                region_blocks / queue_count
            } else {
                region_blocks
            };
            if per_queue == 0 {
                return Err(Error::invalid(format!(
                    "the region ({region_sectors} sectors) holds no block of {} bytes per queue",
                    config.block_size
                )));
            }
            for queue in queues.iter_mut() {
                // Writes carry stamps over a recognisable background.
                for slot in 0..queue.slot_count() {
                    for frame in 0..queue.slot(slot).frames().len() {
                        queue.slot_mut(slot).frame_mut(frame).fill(0x5a);
                    }
                }
                let index = queue.index();
                drivers.push(Box::new(BenchDriver {
                    queue: index,
                    write,
                    sequential,
                    block_sectors,
                    first_block: if sequential {
                        index as u64 * per_queue
                    } else {
                        0
                    },
                    blocks: per_queue,
                    cursor: 0,
                    generation: 0,
                }));
            }
        }
    }
    let started = Instant::now();
    let results: Vec<Result<QueueStats>> = std::thread::scope(|scope| {
        let handles: Vec<_> = queues
            .iter_mut()
            .zip(drivers.iter_mut())
            .map(|(queue, driver)| {
                let budget = &budget;
                scope.spawn(move || {
                    let result = drive(queue, driver.as_mut(), budget, config.seed);
                    if result.is_err() {
                        budget.abort.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err(Error::invalid("a queue thread panicked")))
            })
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut total = QueueStats::default();
    for result in results {
        total.merge(&result?);
    }
    let report = Report {
        ops: total.ops,
        reads: total.reads,
        writes: total.writes,
        flushes: total.flushes,
        discards: total.discards,
        bytes: total.bytes,
        errors: 0,
        verified_bytes: total.verified_bytes,
        seconds,
        iops: total.ops as f64 / seconds.max(1e-9),
        mib_s: total.bytes as f64 / (1 << 20) as f64 / seconds.max(1e-9),
        p50_us: total.latency.quantile(0.50) / 1000.0,
        p99_us: total.latency.quantile(0.99) / 1000.0,
    };
    drop(drivers);
    let model = match shared_model {
        Some(shared) => Some(
            Arc::try_unwrap(shared)
                .map_err(|_| Error::invalid("verify model still shared"))?
                .model
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner),
        ),
        None => None,
    };
    Ok(Outcome { report, model })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_fall_in_their_bucket() {
        let mut histogram = Histogram::default();
        for value in 1..=1000u64 {
            histogram.record(value * 1000);
        }
        let p50 = histogram.quantile(0.5);
        let p99 = histogram.quantile(0.99);
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.07, "{p50}");
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.07, "{p99}");
        for value in [0u64, 1, 15, 16, 17, 1 << 20, u64::MAX / 2] {
            let bucket = Histogram::bucket(value);
            let middle = Histogram::value(bucket);
            assert!(
                (middle - value as f64).abs() <= (value as f64 / 16.0).max(1.0),
                "{value} {middle}"
            );
        }
    }
}
