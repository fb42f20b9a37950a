//! Fuzz the backend ring: any ring image (header and entries, as a hostile frontend may
//! leave it) is served by a BackRing, every request decoded and answered; req_prod is then
//! moved to a second fuzzed value and the ring served again. Never a panic, a hang or a
//! read outside the ring.
#![no_main]

use std::ptr::NonNull;

use ferrotap::blkif::ring::BackRing;
use ferrotap::blkif::{
    decode_indirect_segments, Protocol, RequestBody, Response, Segment, MAX_INDIRECT_SEGMENTS,
    PAGE_SIZE,
};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((second_req_prod, image)) = rest.split_first_chunk::<4>() else {
        return;
    };
    let protocol = if flags & 1 == 0 {
        Protocol::X86_64
    } else {
        Protocol::X86_32
    };
    let pages = 1usize << ((flags >> 1) % 3);
    // Exactly the ring's pages, so anything read outside them is an overflow that the
    // sanitizer reports. u64 words keep the header words aligned.
    let mut memory = vec![0u64; pages * PAGE_SIZE / 8];
    let len = pages * PAGE_SIZE;
    let bytes = image.len().min(len);
    // SAFETY: `bytes` fits both the input and the buffer, which do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(image.as_ptr(), memory.as_mut_ptr().cast::<u8>(), bytes)
    };
    let base = NonNull::new(memory.as_mut_ptr().cast::<u8>()).expect("a Vec is non-null");
    // SAFETY: the buffer outlives the ring and nothing else touches it meanwhile.
    let mut back = unsafe { BackRing::new(base, len, protocol) };
    let push_every = 1 + (flags >> 3) as u32 % 8;
    // The indirect pages a request names are not in the image: decode the image's tail as one.
    let indirect_page = &image[image.len().saturating_sub(PAGE_SIZE)..];
    let mut segments = [Segment::default(); MAX_INDIRECT_SEGMENTS];
    for round in 0..2 {
        if round == 1 {
            // SAFETY: req_prod is the first, aligned header word of the live buffer; this
            // plays the frontend moving it while the backend is attached.
            let req_prod = unsafe { &*(base.as_ptr() as *const std::sync::atomic::AtomicU32) };
            req_prod.store(
                u32::from_le_bytes(*second_req_prod),
                std::sync::atomic::Ordering::Release,
            );
        }
        // A bound on the loop: a ring never yields more than its size without responses
        // being pushed, and we answer everything, so 4 rings' worth means a bug.
        for _ in 0..4 * back.size() {
            match back.next_request() {
                Ok(Some(request)) => {
                    if let RequestBody::Indirect { nr_segments, .. } = request.body {
                        let count = (nr_segments as usize).min(MAX_INDIRECT_SEGMENTS);
                        decode_indirect_segments(indirect_page, &mut segments[..count]);
                    }
                    back.put_response(&Response {
                        id: request.id,
                        operation: request.operation,
                        status: -2,
                    });
                    if request.id as u32 % push_every == 0 {
                        back.push_responses();
                    }
                }
                Ok(None) => {
                    if !back.final_check_for_requests() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        assert_eq!(back.unanswered(), 0);
        back.push_responses();
    }
});
