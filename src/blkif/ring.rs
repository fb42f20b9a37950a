//! The shared ring of io/ring.h: a 64-byte header (`req_prod`, `req_event`, `rsp_prod`,
//! `rsp_event`, padding) and a power-of-two array of entries, each the size of the larger of
//! a request and a response. [`BackRing`] is the backend's side, [`FrontRing`] the
//! frontend's (for the simulated blkfront and tests).

use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, AtomicU32, Ordering};

use super::{Protocol, Request, Response, MAX_ENTRY_SIZE, PAGE_SIZE};

/// Bytes before the first entry.
pub const RING_HEADER_SIZE: usize = 64;

/// The frontend broke the ring's rules; the backend stops serving this ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `req_prod` runs more than the ring size ahead of the responses produced, or moved
    /// back behind requests already consumed (then `ahead` is its wrapped distance from the
    /// consumer, more than the ring holds).
    #[error("frontend req_prod {req_prod} is {ahead} entries ahead of the responses (ring holds {size})")]
    Overflow {
        req_prod: u32,
        ahead: u32,
        size: u32,
    },
}

/// Byte offsets of the header words.
const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;

/// Bytes of a response as it lands in an entry.
const RESPONSE_BYTES: usize = 16;

/// Entries in a ring of `pages` pages for `protocol` (`__RING_SIZE`: rounded down to a power of two).
pub fn ring_entries(pages: usize, protocol: Protocol) -> u32 {
    let bytes = pages.saturating_mul(PAGE_SIZE);
    let fit = bytes.saturating_sub(RING_HEADER_SIZE) / protocol.entry_size();
    let fit = u32::try_from(fit).unwrap_or(u32::MAX);
    if fit == 0 {
        0
    } else {
        1 << fit.ilog2()
    }
}

/// What both sides share: where the ring is and how it is laid out.
struct Shared {
    base: NonNull<u8>,
    protocol: Protocol,
    size: u32,
}

impl Shared {
    /// # Safety
    /// As [`BackRing::new`].
    unsafe fn new(base: NonNull<u8>, len: usize, protocol: Protocol) -> Shared {
        assert!(
            len >= PAGE_SIZE && base.as_ptr().align_offset(4) == 0,
            "a ring needs at least one 4-byte-aligned page ({len} bytes at {base:?})"
        );
        Shared {
            base,
            protocol,
            size: ring_entries(len / PAGE_SIZE, protocol),
        }
    }

    /// One header word, seen as an atomic: the other side writes it concurrently.
    fn word(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: `offset` is one of the four header words, inside the first page; `new`'s
        // contract makes the page valid for the ring's lifetime and checked 4-byte alignment.
        // Both sides access these words only atomically (or with the C equivalent).
        unsafe { &*(self.base.as_ptr().add(offset) as *const AtomicU32) }
    }

    /// The entry of ring index `index`, wrapped into the ring.
    fn entry(&self, index: u32) -> *mut u8 {
        let slot = (index & (self.size - 1)) as usize;
        // SAFETY: slot < size, and `ring_entries` made 64 + size * entry_size <= len, so
        // the entry lies inside the mapping `new`'s contract covers.
        unsafe {
            self.base
                .as_ptr()
                .add(RING_HEADER_SIZE + slot * self.protocol.entry_size())
        }
    }

    /// Copy the entry at `index` out of shared memory once; all decoding looks at the copy.
    fn read_entry(&self, index: u32) -> [u8; MAX_ENTRY_SIZE] {
        let mut copy = [0u8; MAX_ENTRY_SIZE];
        // SAFETY: the entry is entry_size <= MAX_ENTRY_SIZE bytes inside the ring (see
        // `entry`); the local copy cannot overlap shared memory. The other side may be writing
        // the entry (a hostile one): whatever bytes we get, we only decode the copy.
        unsafe {
            ptr::copy_nonoverlapping(
                self.entry(index),
                copy.as_mut_ptr(),
                self.protocol.entry_size(),
            )
        };
        copy
    }

    /// Write `bytes` (at most one entry) at the start of the entry at `index`.
    fn write_entry(&self, index: u32, bytes: &[u8]) {
        let len = bytes.len().min(self.protocol.entry_size());
        // SAFETY: as in `read_entry`, the destination is inside the ring and `len` bytes
        // fit in the entry; the source is a local buffer.
        unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), self.entry(index), len) };
    }
}

/// The backend's view of a ring in shared memory.
pub struct BackRing {
    shared: Shared,
    /// Next request to consume.
    req_cons: u32,
    /// Next response slot to fill.
    rsp_prod_pvt: u32,
    /// `rsp_prod` as last published: our own copy, so the frontend cannot skew the
    /// notification decision by scribbling on the shared word.
    rsp_prod: u32,
}

// SAFETY: a BackRing is the only backend-side user of its ring memory; the pointer stays
// valid (per `new`'s contract) whichever thread the ring is moved to.
unsafe impl Send for BackRing {}

impl BackRing {
    /// Attach to a ring the frontend initialised. The private indices start at the shared
    /// `rsp_prod`: 0 on a fresh ring; on a live ring (a backend reattaching) the requests
    /// after the last published response are read again.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes (a page multiple) for as long
    /// as the ring is used; the other party may write it concurrently.
    ///
    /// # Panics
    /// If `len` is less than a page or `base` is not 4-byte aligned (a caller bug: rings are
    /// page-aligned mappings).
    pub unsafe fn new(base: NonNull<u8>, len: usize, protocol: Protocol) -> BackRing {
        // SAFETY: the caller's contract is ours.
        let shared = unsafe { Shared::new(base, len, protocol) };
        let rsp_prod = shared.word(RSP_PROD).load(Ordering::Acquire);
        BackRing {
            shared,
            req_cons: rsp_prod,
            rsp_prod_pvt: rsp_prod,
            rsp_prod,
        }
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        self.shared.size
    }

    /// Requests consumed and not yet answered with [`Self::put_response`].
    pub fn unanswered(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Requests the frontend has published beyond the consumer, bounded by the free response
    /// slots (RING_HAS_UNCONSUMED_REQUESTS). A hostile `req_prod` gives a non-zero count, so
    /// the caller goes on to `next_request`, which reports it.
    fn unconsumed(&self, req_prod: u32) -> u32 {
        let published = req_prod.wrapping_sub(self.req_cons);
        let room = self.size().saturating_sub(self.unanswered());
        published.min(room)
    }

    /// The next unconsumed request, copied out of shared memory; `Ok(None)` when the ring is
    /// empty (for now: call [`Self::final_check_for_requests`] before sleeping).
    ///
    /// Errors when `req_prod` runs more than the ring ahead of the responses produced
    /// (RING_REQUEST_PROD_OVERFLOW) or moved back behind requests already consumed: either
    /// way it is no longer a ring index the frontend could legally have written.
    pub fn next_request(&mut self) -> Result<Option<Request>, RingError> {
        // Acquire: the entries the frontend wrote before publishing req_prod are visible.
        let req_prod = self.shared.word(REQ_PROD).load(Ordering::Acquire);
        let size = self.size();
        let ahead = req_prod.wrapping_sub(self.rsp_prod_pvt);
        if ahead > size {
            return Err(RingError::Overflow {
                req_prod,
                ahead,
                size,
            });
        }
        if ahead < self.unanswered() {
            return Err(RingError::Overflow {
                req_prod,
                ahead: req_prod.wrapping_sub(self.req_cons),
                size,
            });
        }
        // RING_REQUEST_CONS_OVERFLOW: every slot holds a request awaiting its response.
        if req_prod == self.req_cons || self.unanswered() >= size {
            return Ok(None);
        }
        let copy = self.shared.read_entry(self.req_cons);
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(self.shared.protocol.decode_request(&copy)))
    }

    /// Ask the frontend not to notify for requests it pushes from now on: `req_event` is
    /// moved half the index space ahead, where RING_PUSH_REQUESTS_AND_CHECK_NOTIFY's
    /// comparison never finds it crossed. For a backend about to poll the ring: a
    /// notification left armed by its last sleep would cost the frontend a system call and
    /// the backend a wake-up for a request it takes anyway. [`Self::final_check_for_requests`]
    /// arms notifications again before any sleep.
    pub fn mute_request_notifications(&mut self) {
        self.shared
            .word(REQ_EVENT)
            .store(self.req_cons.wrapping_add(1 << 31), Ordering::Relaxed);
    }

    /// RING_FINAL_CHECK_FOR_REQUESTS: sets `req_event` so the frontend notifies on its next
    /// request, then rechecks. True when requests arrived meanwhile (do not sleep).
    pub fn final_check_for_requests(&mut self) -> bool {
        let req_prod = self.shared.word(REQ_PROD).load(Ordering::Acquire);
        if self.unconsumed(req_prod) > 0 {
            return true;
        }
        self.shared
            .word(REQ_EVENT)
            .store(self.req_cons.wrapping_add(1), Ordering::Relaxed);
        // Full barrier: the frontend must see req_event before we look at req_prod again,
        // or a request pushed in between finds the old req_event and sends no notification.
        fence(Ordering::SeqCst);
        let req_prod = self.shared.word(REQ_PROD).load(Ordering::Acquire);
        self.unconsumed(req_prod) > 0
    }

    /// Place a response in the next private response slot (not yet visible).
    ///
    /// Each response answers one consumed request: with none [`Self::unanswered`] the slot
    /// would be one the frontend has not released, so that is a caller bug (debug assertion).
    pub fn put_response(&mut self, response: &Response) {
        debug_assert!(self.unanswered() > 0, "response without a consumed request");
        let mut bytes = [0u8; RESPONSE_BYTES];
        self.shared.protocol.encode_response(response, &mut bytes);
        self.shared.write_entry(self.rsp_prod_pvt, &bytes);
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
    }

    /// RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish the responses put so far; true when the
    /// frontend asked to be notified (its `rsp_event` was crossed).
    pub fn push_responses(&mut self) -> bool {
        let old = self.rsp_prod;
        let new = self.rsp_prod_pvt;
        // Release: the frontend sees the responses before the index that publishes them.
        self.shared.word(RSP_PROD).store(new, Ordering::Release);
        self.rsp_prod = new;
        // Full barrier: rsp_prod is visible before we read rsp_event, pairing with the
        // frontend's barrier between writing rsp_event and rechecking rsp_prod.
        fence(Ordering::SeqCst);
        let rsp_event = self.shared.word(RSP_EVENT).load(Ordering::Relaxed);
        new.wrapping_sub(rsp_event) < new.wrapping_sub(old)
    }
}

/// The frontend's view of a ring (the simulated blkfront).
pub struct FrontRing {
    shared: Shared,
    /// Next request slot to fill.
    req_prod_pvt: u32,
    /// Next response to consume.
    rsp_cons: u32,
    /// `req_prod` as last published.
    req_prod: u32,
}

// SAFETY: as for BackRing: the only frontend-side user of its ring memory.
unsafe impl Send for FrontRing {}

impl FrontRing {
    /// Initialise a fresh shared ring (SHARED_RING_INIT + FRONT_RING_INIT).
    ///
    /// # Safety
    /// As [`BackRing::new`].
    pub unsafe fn init(base: NonNull<u8>, len: usize, protocol: Protocol) -> FrontRing {
        // SAFETY: the caller's contract is ours.
        unsafe { Self::init_at(base, len, protocol, 0) }
    }

    /// [`Self::init`] with every index starting at `start` instead of 0, as a ring that has
    /// already carried `start` requests looks (tests use values near 2^32 to exercise
    /// wrapping; a backend attaching reads its indices from `rsp_prod`).
    ///
    /// # Safety
    /// As [`BackRing::new`].
    pub unsafe fn init_at(
        base: NonNull<u8>,
        len: usize,
        protocol: Protocol,
        start: u32,
    ) -> FrontRing {
        // SAFETY: the caller's contract is ours.
        let shared = unsafe { Shared::new(base, len, protocol) };
        // SAFETY: the header is the first 64 bytes of the (at least one page) ring.
        unsafe { ptr::write_bytes(base.as_ptr(), 0, RING_HEADER_SIZE) };
        shared.word(REQ_PROD).store(start, Ordering::Relaxed);
        shared.word(RSP_PROD).store(start, Ordering::Relaxed);
        shared
            .word(REQ_EVENT)
            .store(start.wrapping_add(1), Ordering::Relaxed);
        shared
            .word(RSP_EVENT)
            .store(start.wrapping_add(1), Ordering::Release);
        FrontRing {
            shared,
            req_prod_pvt: start,
            rsp_cons: start,
            req_prod: start,
        }
    }

    pub fn size(&self) -> u32 {
        self.shared.size
    }

    /// Requests put and not yet answered by a consumed response.
    fn outstanding(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Free request slots (RING_FREE_REQUESTS).
    pub fn free_requests(&self) -> u32 {
        self.size() - self.outstanding()
    }

    /// Place a request in the next private slot (not yet visible). False, and nothing put,
    /// when the ring is full (no [`Self::free_requests`]).
    #[must_use]
    pub fn put_request(&mut self, request: &Request) -> bool {
        if self.free_requests() == 0 {
            return false;
        }
        let mut bytes = [0u8; MAX_ENTRY_SIZE];
        let entry = &mut bytes[..self.shared.protocol.entry_size()];
        self.shared.protocol.encode_request(request, entry);
        self.shared.write_entry(self.req_prod_pvt, entry);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        true
    }

    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: true when the backend must be notified.
    pub fn push_requests(&mut self) -> bool {
        let old = self.req_prod;
        let new = self.req_prod_pvt;
        // Release: the backend sees the requests before the index that publishes them.
        self.shared.word(REQ_PROD).store(new, Ordering::Release);
        self.req_prod = new;
        // Full barrier: req_prod is visible before we read req_event (see push_responses).
        fence(Ordering::SeqCst);
        let req_event = self.shared.word(REQ_EVENT).load(Ordering::Relaxed);
        new.wrapping_sub(req_event) < new.wrapping_sub(old)
    }

    /// Responses published and not consumed, never more than the requests outstanding (a
    /// backend publishing more is ignored beyond that, so the free count stays sane).
    fn unconsumed(&self) -> u32 {
        let rsp_prod = self.shared.word(RSP_PROD).load(Ordering::Acquire);
        rsp_prod.wrapping_sub(self.rsp_cons).min(self.outstanding())
    }

    /// Whether responses wait to be consumed (RING_HAS_UNCONSUMED_RESPONSES), reading
    /// `rsp_prod` only.
    pub fn has_unconsumed_responses(&self) -> bool {
        self.unconsumed() > 0
    }

    /// The next unconsumed response, if any.
    pub fn next_response(&mut self) -> Option<Response> {
        // Acquire inside `unconsumed`: the response bytes are visible after rsp_prod.
        if self.unconsumed() == 0 {
            return None;
        }
        let copy = self.shared.read_entry(self.rsp_cons);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Some(self.shared.protocol.decode_response(&copy))
    }

    /// RING_FINAL_CHECK_FOR_RESPONSES: sets `rsp_event`, rechecks; true when responses arrived.
    pub fn final_check_for_responses(&mut self) -> bool {
        if self.unconsumed() > 0 {
            return true;
        }
        self.shared
            .word(RSP_EVENT)
            .store(self.rsp_cons.wrapping_add(1), Ordering::Relaxed);
        // Full barrier: the backend must see rsp_event before we look at rsp_prod again.
        fence(Ordering::SeqCst);
        self.unconsumed() > 0
    }
}
