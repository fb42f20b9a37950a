//! blkif request helpers for tests that play the guest through ferrotap's simulated
//! blkfront (`ferrotap::xensim`) and put hand-made requests on its rings.

use std::time::Duration;

use ferrotap::blkif::{Request, RequestBody, Response, Segment, MAX_SEGMENTS_PER_REQUEST};
use ferrotap::xensim::blkfront::Blkfront;

/// How long a test waits for any one response.
pub const WAIT: Duration = Duration::from_secs(10);

/// A direct request; `nr_segments` is `segments.len()` even past the ring's limit (a
/// hostile count), while only the first `MAX_SEGMENTS_PER_REQUEST` fit in the slot.
pub fn direct(operation: u8, id: u64, sector: u64, segments: &[Segment]) -> Request {
    let mut inline = [Segment::default(); MAX_SEGMENTS_PER_REQUEST];
    let n = segments.len().min(MAX_SEGMENTS_PER_REQUEST);
    inline[..n].copy_from_slice(&segments[..n]);
    Request {
        operation,
        id,
        sector,
        handle: 0,
        body: RequestBody::Direct {
            nr_segments: segments.len() as u8,
            segments: inline,
        },
    }
}

/// The segment covering all eight sectors of the page behind `gref`.
pub fn whole_page(gref: u32) -> Segment {
    Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    }
}

/// Grant a fresh frame (read-only or not); returns (gref, gfn).
pub fn granted_frame(fe: &Blkfront, readonly: bool) -> (u32, u32) {
    let frame = fe.memory().alloc().unwrap();
    let gfn = frame.gfn();
    std::mem::forget(frame); // the guest keeps the page for the test's lifetime
    let gref = fe.grants().alloc_ref().unwrap();
    fe.grants().grant(gref, gfn, readonly).unwrap();
    (gref, gfn)
}

/// Submit `request` on `queue` and wait for its response.
pub fn ask(fe: &mut Blkfront, queue: usize, request: &Request) -> Response {
    let q = fe.queue_mut(queue);
    q.submit_raw(request).unwrap();
    q.wait_raw_response(WAIT).unwrap()
}
