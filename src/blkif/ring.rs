//! The shared ring of io/ring.h: a 64-byte header (`req_prod`, `req_event`, `rsp_prod`,
//! `rsp_event`, padding) and a power-of-two array of entries, each the size of the larger of
//! a request and a response. [`BackRing`] is the backend's side, [`FrontRing`] the
//! frontend's (for the simulated blkfront and tests).

use std::ptr::NonNull;

use super::{Protocol, Request, Response};

/// Bytes before the first entry.
pub const RING_HEADER_SIZE: usize = 64;

/// The frontend broke the ring's rules; the backend stops serving this ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `req_prod` runs more than the ring size ahead of the responses produced.
    #[error("frontend req_prod {req_prod} is {ahead} entries ahead of the responses (ring holds {size})")]
    Overflow {
        req_prod: u32,
        ahead: u32,
        size: u32,
    },
}

/// Entries in a ring of `pages` pages for `protocol` (`__RING_SIZE`: rounded down to a power of two).
pub fn ring_entries(pages: usize, protocol: Protocol) -> u32 {
    todo!("{pages} {protocol:?}")
}

/// The backend's view of a ring in shared memory.
pub struct BackRing {
    _base: NonNull<u8>,
}

impl BackRing {
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes (a page multiple) for as long
    /// as the ring is used; the other party may write it concurrently.
    pub unsafe fn new(base: NonNull<u8>, len: usize, protocol: Protocol) -> BackRing {
        todo!("{base:?} {len} {protocol:?}")
    }

    /// Entries in the ring.
    pub fn size(&self) -> u32 {
        todo!()
    }

    /// The next unconsumed request, copied out of shared memory; `Ok(None)` when the ring is
    /// empty (for now: call [`Self::final_check_for_requests`] before sleeping).
    pub fn next_request(&mut self) -> Result<Option<Request>, RingError> {
        todo!()
    }

    /// RING_FINAL_CHECK_FOR_REQUESTS: sets `req_event` so the frontend notifies on its next
    /// request, then rechecks. True when requests arrived meanwhile (do not sleep).
    pub fn final_check_for_requests(&mut self) -> bool {
        todo!()
    }

    /// Place a response in the next private response slot (not yet visible).
    pub fn put_response(&mut self, response: &Response) {
        todo!("{response:?}")
    }

    /// RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish the responses put so far; true when the
    /// frontend asked to be notified (its `rsp_event` was crossed).
    pub fn push_responses(&mut self) -> bool {
        todo!()
    }
}

/// The frontend's view of a ring (the simulated blkfront).
pub struct FrontRing {
    _base: NonNull<u8>,
}

impl FrontRing {
    /// Initialise a fresh shared ring (SHARED_RING_INIT + FRONT_RING_INIT).
    ///
    /// # Safety
    /// As [`BackRing::new`].
    pub unsafe fn init(base: NonNull<u8>, len: usize, protocol: Protocol) -> FrontRing {
        todo!("{base:?} {len} {protocol:?}")
    }

    pub fn size(&self) -> u32 {
        todo!()
    }

    /// Free request slots (RING_FREE_REQUESTS).
    pub fn free_requests(&self) -> u32 {
        todo!()
    }

    /// Place a request in the next private slot (not yet visible). Panics if the ring is
    /// full: callers check `free_requests` first.
    pub fn put_request(&mut self, request: &Request) {
        todo!("{request:?}")
    }

    /// RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: true when the backend must be notified.
    pub fn push_requests(&mut self) -> bool {
        todo!()
    }

    /// The next unconsumed response, if any.
    pub fn next_response(&mut self) -> Option<Response> {
        todo!()
    }

    /// RING_FINAL_CHECK_FOR_RESPONSES: sets `rsp_event`, rechecks; true when responses arrived.
    pub fn final_check_for_responses(&mut self) -> bool {
        todo!()
    }
}
