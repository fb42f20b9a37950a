//! The shared ring of io/ring.h as `blkif::ring` implements it: FrontRing and BackRing
//! driven over one heap buffer, in random interleavings (a model checks that every request
//! is answered once with its id, and that no notification is ever missed by a side that went
//! to sleep), with indices wrapping around 2^32, a hostile frontend's req_prod, and the two
//! sides on two threads sleeping on real wake-ups.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use ferrotap::blkif::ring::{ring_entries, BackRing, FrontRing, RingError, RING_HEADER_SIZE};
use ferrotap::blkif::{
    op, status, Protocol, Request, RequestBody, Response, Segment, MAX_SEGMENTS_PER_REQUEST,
    PAGE_SIZE,
};
use proptest::prelude::*;

/// Page-aligned-enough (8-byte) ring memory on the heap.
struct RingMemory {
    words: Vec<u64>,
}

impl RingMemory {
    fn new(pages: usize) -> RingMemory {
        RingMemory {
            words: vec![0; pages * PAGE_SIZE / 8],
        }
    }

    fn len(&self) -> usize {
        self.words.len() * 8
    }

    fn base(&mut self) -> NonNull<u8> {
        NonNull::new(self.words.as_mut_ptr() as *mut u8).unwrap()
    }

    /// A header word, as a hostile frontend would write it.
    fn header(&self, offset: usize) -> &AtomicU32 {
        assert!(offset < RING_HEADER_SIZE && offset.is_multiple_of(4));
        // SAFETY: inside the buffer, 4-byte aligned (the buffer is 8-byte aligned).
        unsafe { &*((self.words.as_ptr() as *const u8).add(offset) as *const AtomicU32) }
    }
}

fn rings(memory: &mut RingMemory, protocol: Protocol, start: u32) -> (FrontRing, BackRing) {
    let (base, len) = (memory.base(), memory.len());
    // SAFETY: the buffer outlives both rings in every test (dropped after them).
    let front = unsafe { FrontRing::init_at(base, len, protocol, start) };
    // SAFETY: as above.
    let back = unsafe { BackRing::new(base, len, protocol) };
    (front, back)
}

/// A request of each layout, its fields derived from `id` and `kind`.
fn request(id: u64, kind: u8) -> Request {
    let sector = id.rotate_left(17);
    let handle = (id >> 7) as u16;
    match kind % 4 {
        0 => {
            let mut segments = [Segment::default(); MAX_SEGMENTS_PER_REQUEST];
            for (i, s) in segments.iter_mut().enumerate() {
                *s = Segment {
                    gref: (id as u32).wrapping_add(i as u32),
                    first_sect: (i % 8) as u8,
                    last_sect: 7,
                };
            }
            Request {
                operation: if id & 1 == 0 { op::READ } else { op::WRITE },
                id,
                sector,
                handle,
                body: RequestBody::Direct {
                    nr_segments: (id % 12) as u8,
                    segments,
                },
            }
        }
        1 => Request {
            operation: op::INDIRECT,
            id,
            sector,
            handle,
            body: RequestBody::Indirect {
                indirect_op: op::WRITE,
                nr_segments: (id % 257) as u16,
                indirect_grefs: std::array::from_fn(|i| (id >> 3) as u32 ^ i as u32),
            },
        },
        2 => Request {
            operation: op::DISCARD,
            id,
            sector,
            handle,
            body: RequestBody::Discard {
                flag: (id & 1) as u8,
                nr_sectors: id >> 5,
            },
        },
        _ => Request {
            // An operation blkif does not define still travels as a direct request.
            operation: 0xee,
            id,
            sector,
            handle,
            body: RequestBody::Direct {
                nr_segments: 3,
                segments: [Segment::default(); MAX_SEGMENTS_PER_REQUEST],
            },
        },
    }
}

fn response_for(request: &Request) -> Response {
    Response {
        id: request.id,
        operation: request.operation,
        status: [status::OKAY, status::ERROR, status::EOPNOTSUPP][(request.id % 3) as usize],
    }
}

#[test]
fn ring_entries_is_the_power_of_two_that_fits() {
    for protocol in [Protocol::X86_64, Protocol::X86_32] {
        assert_eq!(ring_entries(1, protocol), 32);
        for pages in [1usize, 2, 4, 8, 16] {
            let n = ring_entries(pages, protocol) as usize;
            assert!(n.is_power_of_two());
            assert!(RING_HEADER_SIZE + n * protocol.entry_size() <= pages * PAGE_SIZE);
            assert!(RING_HEADER_SIZE + 2 * n * protocol.entry_size() > pages * PAGE_SIZE);
        }
    }
    assert_eq!(ring_entries(0, Protocol::X86_64), 0);
}

/// One step of the model: which side does what.
#[derive(Debug, Clone)]
enum Step {
    /// The frontend puts up to n requests (kinds from the seed) and pushes them.
    Submit(u8, u64),
    /// The backend consumes up to n requests (if awake).
    Consume(u8),
    /// The backend answers up to n consumed requests, picking them by the seed (out of order).
    Answer(u8, u64),
    /// The backend pushes its responses.
    PushResponses,
    /// The backend runs out of work: final check, and sleeps if it says so.
    BackendIdle,
    /// The frontend consumes up to n responses (if awake).
    Reap(u8),
    /// The frontend runs out of responses: final check, and sleeps if it says so.
    FrontendIdle,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u8..40, any::<u64>()).prop_map(|(n, s)| Step::Submit(n, s)),
        (1u8..40).prop_map(Step::Consume),
        (1u8..40, any::<u64>()).prop_map(|(n, s)| Step::Answer(n, s)),
        Just(Step::PushResponses),
        Just(Step::BackendIdle),
        (1u8..40).prop_map(Step::Reap),
        Just(Step::FrontendIdle),
    ]
}

/// Both sides and what the model knows about them.
struct Model {
    front: FrontRing,
    back: BackRing,
    next_id: u64,
    /// Put by the frontend, not yet answered to it: id -> request.
    in_flight: HashMap<u64, Request>,
    /// Consumed by the backend, not yet answered.
    consumed: Vec<Request>,
    /// Pushed by the frontend and not consumed by the backend.
    published_requests: u32,
    /// Pushed by the backend and not reaped by the frontend.
    published_responses: u32,
    /// Put by the backend, not pushed.
    unpushed_responses: u32,
    backend_asleep: bool,
    frontend_asleep: bool,
    answered: u64,
}

impl Model {
    fn submit(&mut self, n: u8, seed: u64) {
        let mut put = 0;
        for i in 0..n {
            if self.front.free_requests() == 0 {
                assert!(
                    !self.front.put_request(&request(0, 0)),
                    "put into a full ring"
                );
                break;
            }
            // Distinct ids that use all 64 bits.
            let id = self.next_id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
            self.next_id += 1;
            let req = request(id, (seed >> (i % 32)) as u8);
            assert!(self.front.put_request(&req));
            assert!(self.in_flight.insert(id, req).is_none());
            put += 1;
        }
        let notify = self.front.push_requests();
        self.published_requests += put;
        if notify {
            self.backend_asleep = false;
        }
    }

    fn consume(&mut self, n: u8) {
        if self.backend_asleep {
            return;
        }
        for _ in 0..n {
            match self.back.next_request().expect("an honest frontend") {
                Some(req) => {
                    assert_eq!(self.in_flight.get(&req.id), Some(&req), "request altered");
                    self.published_requests -= 1;
                    self.consumed.push(req);
                }
                None => {
                    // Empty, or every slot waits for a response.
                    assert!(
                        self.published_requests == 0 || self.back.unanswered() == self.back.size()
                    );
                    break;
                }
            }
        }
        assert_eq!(self.back.unanswered() as usize, self.consumed.len());
    }

    fn answer(&mut self, n: u8, mut seed: u64) {
        for _ in 0..n {
            if self.consumed.is_empty() {
                break;
            }
            let req = self
                .consumed
                .swap_remove((seed % self.consumed.len() as u64) as usize);
            seed = seed.rotate_right(7) ^ 0x5bd1_e995;
            self.back.put_response(&response_for(&req));
            self.unpushed_responses += 1;
        }
    }

    fn push_responses(&mut self) {
        let notify = self.back.push_responses();
        self.published_responses += self.unpushed_responses;
        self.unpushed_responses = 0;
        if notify {
            self.frontend_asleep = false;
        }
    }

    fn backend_idle(&mut self) {
        if self.backend_asleep {
            return;
        }
        let more = self.back.final_check_for_requests();
        assert_eq!(
            more,
            self.published_requests > 0 && self.back.unanswered() < self.back.size()
        );
        if !more {
            self.backend_asleep = true;
        }
    }

    fn reap(&mut self, n: u8) {
        if self.frontend_asleep {
            return;
        }
        for _ in 0..n {
            let Some(rsp) = self.front.next_response() else {
                assert_eq!(self.published_responses, 0);
                break;
            };
            let req = self
                .in_flight
                .remove(&rsp.id)
                .expect("a response for a request in flight");
            assert_eq!(rsp, response_for(&req));
            self.published_responses -= 1;
            self.answered += 1;
        }
    }

    fn frontend_idle(&mut self) {
        if self.frontend_asleep {
            return;
        }
        let more = self.front.final_check_for_responses();
        assert_eq!(more, self.published_responses > 0);
        if !more {
            self.frontend_asleep = true;
        }
    }

    /// A side asleep must have been woken for anything published after it checked.
    fn check_no_missed_wakeup(&self) {
        if self.backend_asleep {
            assert_eq!(
                self.published_requests, 0,
                "backend sleeps on published requests"
            );
        }
        if self.frontend_asleep {
            assert_eq!(
                self.published_responses, 0,
                "frontend sleeps on published responses"
            );
        }
        assert_eq!(
            self.front.free_requests() as usize,
            self.front.size() as usize - self.in_flight.len()
        );
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Submit(n, seed) => self.submit(n, seed),
            Step::Consume(n) => self.consume(n),
            Step::Answer(n, seed) => self.answer(n, seed),
            Step::PushResponses => self.push_responses(),
            Step::BackendIdle => self.backend_idle(),
            Step::Reap(n) => self.reap(n),
            Step::FrontendIdle => self.frontend_idle(),
        }
        self.check_no_missed_wakeup();
    }

    /// Both sides run their loops until everything is answered; a side that sleeps stays
    /// asleep until notified, so a missed notification deadlocks and fails here.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if self.in_flight.is_empty() {
                return;
            }
            self.consume(255);
            self.answer(255, 1);
            self.push_responses();
            self.backend_idle();
            self.reap(255);
            self.frontend_idle();
            self.check_no_missed_wakeup();
        }
        panic!(
            "no progress: {} in flight, backend asleep {}, frontend asleep {}",
            self.in_flight.len(),
            self.backend_asleep,
            self.frontend_asleep
        );
    }
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::X86_64), Just(Protocol::X86_32)]
}

fn start_index() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        (0u32..200).prop_map(|k| u32::MAX - k),
        any::<u32>()
    ]
}

proptest! {
    // Under Miri a few cases only: each costs what thousands do natively.
    #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 2 } else { 200 }))]

    #[test]
    fn random_interleavings_answer_every_request_once_and_miss_no_notification(
        protocol in protocol(),
        pages in prop_oneof![Just(1usize), Just(2), Just(4)],
        start in start_index(),
        steps in prop::collection::vec(step(), 1..200),
    ) {
        let mut memory = RingMemory::new(pages);
        let (front, back) = rings(&mut memory, protocol, start);
        prop_assert_eq!(front.size(), ring_entries(pages, protocol));
        prop_assert_eq!(back.size(), front.size());
        let mut model = Model {
            front,
            back,
            next_id: 1,
            in_flight: HashMap::new(),
            consumed: Vec::new(),
            published_requests: 0,
            published_responses: 0,
            unpushed_responses: 0,
            backend_asleep: false,
            frontend_asleep: false,
            answered: 0,
        };
        for step in &steps {
            model.apply(step);
        }
        let submitted = model.next_id - 1;
        model.drain();
        prop_assert_eq!(model.answered, submitted);
        prop_assert_eq!(model.front.free_requests(), model.front.size());
        drop(model);
        drop(memory);
    }
}

#[test]
fn a_full_ring_is_refused_by_put_request() {
    let mut memory = RingMemory::new(1);
    let (mut front, _back) = rings(&mut memory, Protocol::X86_64, 0);
    for id in 0..32 {
        assert!(front.put_request(&request(id, 0)));
    }
    assert_eq!(front.free_requests(), 0);
    assert!(!front.put_request(&request(99, 0)));
    assert!(
        front.push_requests(),
        "the first push crosses the initial req_event"
    );
}

#[test]
fn req_prod_past_the_ring_is_an_overflow_error() {
    for start in [0u32, u32::MAX - 3, 0x8000_0000] {
        let mut memory = RingMemory::new(1);
        let (_front, mut back) = rings(&mut memory, Protocol::X86_64, start);
        // Exactly a ring's worth is legal: every slot is consumed, then the ring waits.
        memory
            .header(0)
            .store(start.wrapping_add(32), Ordering::Release);
        for _ in 0..32 {
            assert!(back.next_request().unwrap().is_some());
        }
        assert_eq!(back.unanswered(), 32);
        assert_eq!(back.next_request(), Ok(None));
        // One more than the free slots: a frontend overwriting requests not yet answered.
        memory
            .header(0)
            .store(start.wrapping_add(33), Ordering::Release);
        assert_eq!(
            back.next_request(),
            Err(RingError::Overflow {
                req_prod: start.wrapping_add(33),
                ahead: 33,
                size: 32
            })
        );
        // Every slot awaits its response, so there is nothing to consume (as
        // RING_HAS_UNCONSUMED_REQUESTS): the backend answers before it looks again.
        assert!(!back.final_check_for_requests());
        // After answering some, the same req_prod becomes legal again.
        back.put_response(&Response {
            id: 0,
            operation: 0,
            status: 0,
        });
        assert!(back.next_request().unwrap().is_some());
        // req_prod far ahead, and req_prod moved back behind consumed requests.
        for bogus in [
            start.wrapping_add(1000),
            start.wrapping_sub(1),
            start.wrapping_add(5),
        ] {
            memory.header(0).store(bogus, Ordering::Release);
            assert!(
                matches!(back.next_request(), Err(RingError::Overflow { req_prod, .. }) if req_prod == bogus),
                "req_prod {bogus:#x} from start {start:#x}"
            );
        }
    }
}

#[test]
fn a_backend_reattaching_rereads_the_unanswered_requests() {
    let mut memory = RingMemory::new(1);
    let (mut front, mut back) = rings(&mut memory, Protocol::X86_32, u32::MAX - 1);
    for id in 10..14 {
        assert!(front.put_request(&request(id, 2)));
    }
    front.push_requests();
    let first = back.next_request().unwrap().unwrap();
    back.put_response(&response_for(&first));
    back.push_responses();
    assert!(back.next_request().unwrap().is_some());
    let (base, len) = (memory.base(), memory.len());
    // SAFETY: the buffer outlives the ring.
    let mut back = unsafe { BackRing::new(base, len, Protocol::X86_32) };
    let ids: Vec<u64> = std::iter::from_fn(|| back.next_request().unwrap())
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, [11, 12, 13]);
    assert_eq!(front.next_response(), Some(response_for(&request(10, 2))));
}

/// A polling backend mutes request notifications: however many requests the frontend
/// pushes, RING_PUSH_REQUESTS_AND_CHECK_NOTIFY says none is needed, at any index (wrapping
/// included), until the final check before sleeping arms them again.
#[test]
fn muted_request_notifications_stay_off_until_the_final_check() {
    for start in [0u32, u32::MAX - 5, 0x7fff_fff0, 0x8000_0000] {
        let mut memory = RingMemory::new(1);
        let (mut front, mut back) = rings(&mut memory, Protocol::X86_64, start);
        back.mute_request_notifications();
        let mut id = 0;
        // Pushes of 1 to 8 requests, each taken and answered, past the ring's size.
        for count in (1..=8).cycle().take(24) {
            for _ in 0..count {
                assert!(front.put_request(&request(id, 0)));
                id += 1;
            }
            assert!(!front.push_requests(), "muted, start {start:#x}, id {id}");
            while let Some(taken) = back.next_request().unwrap() {
                back.put_response(&response_for(&taken));
            }
            back.push_responses();
            while front.next_response().is_some() {}
            // Muting again from the new position, as each polling window does.
            back.mute_request_notifications();
        }
        assert!(!back.final_check_for_requests());
        assert!(front.put_request(&request(id, 0)));
        assert!(front.push_requests(), "armed again, start {start:#x}");
    }
}

/// The two sides on two threads, each sleeping on a channel standing for its event channel:
/// a missed notification hangs a side, and the test fails on its timeout.
#[test]
fn two_threads_with_real_sleeps_complete_every_request() {
    // Miri checks every access for races and weak-memory outcomes, ~10^4 times slower.
    const REQUESTS: u64 = if cfg!(miri) { 3_000 } else { 200_000 };
    for protocol in [Protocol::X86_64, Protocol::X86_32] {
        let mut memory = RingMemory::new(1);
        let (mut front, mut back) = rings(&mut memory, protocol, u32::MAX - 1000);
        let (wake_back, back_events) = mpsc::channel::<()>();
        let (wake_front, front_events) = mpsc::channel::<()>();
        let backend = std::thread::spawn(move || {
            let mut served = 0u64;
            loop {
                while let Some(req) = back.next_request().unwrap() {
                    back.put_response(&response_for(&req));
                    served += 1;
                    if served.is_multiple_of(7) && back.push_responses() {
                        let _ = wake_front.send(());
                    }
                }
                if back.push_responses() {
                    let _ = wake_front.send(());
                }
                if served == REQUESTS {
                    return served;
                }
                if !back.final_check_for_requests() {
                    back_events
                        .recv_timeout(Duration::from_secs(20))
                        .expect("backend woken");
                }
            }
        });
        let (mut next_id, mut answered) = (0u64, 0u64);
        while answered < REQUESTS {
            let mut put = false;
            while front.free_requests() > 0 && next_id < REQUESTS {
                assert!(front.put_request(&request(next_id, next_id as u8)));
                next_id += 1;
                put = true;
                if next_id.is_multiple_of(5) {
                    break;
                }
            }
            if put && front.push_requests() {
                wake_back.send(()).unwrap();
            }
            while let Some(rsp) = front.next_response() {
                assert_eq!(rsp, response_for(&request(rsp.id, rsp.id as u8)));
                answered += 1;
            }
            let can_submit = front.free_requests() > 0 && next_id < REQUESTS;
            if !can_submit && answered < REQUESTS && !front.final_check_for_responses() {
                front_events
                    .recv_timeout(Duration::from_secs(20))
                    .expect("frontend woken");
            }
        }
        assert_eq!(backend.join().unwrap(), REQUESTS);
    }
}
