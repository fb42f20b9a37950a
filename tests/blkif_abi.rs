//! The blkif layouts and ring of `ferrotap::blkif` against Xen's own headers
//! (/usr/include/xen/io/blkif.h and io/ring.h, from libxen-dev), compiled by gcc:
//!
//! - for x86_64 and, with `gcc -m32`, for the real i386 ABI of `x86_32-abi`, C initialises
//!   every request layout (direct, indirect, discard, an unknown operation) and the response
//!   with distinct field values; the test reads the bytes out of the object file and checks
//!   that Rust decodes exactly those values and encodes exactly those bytes (padding zero),
//!   and that the sizes, header offsets and `__CONST_RING_SIZE` for 1..16 pages match;
//! - a C frontend made of the ring.h macros (FRONT_RING_INIT, PUSH_REQUESTS_AND_CHECK_NOTIFY,
//!   FINAL_CHECK_FOR_RESPONSES) is served by `BackRing` over a shared file, and a C backend
//!   (BACK_RING_ATTACH, FINAL_CHECK_FOR_REQUESTS, PUSH_RESPONSES_AND_CHECK_NOTIFY) serves a
//!   `FrontRing`: each side sleeps until the other notifies, so a wrong hold-off rule
//!   deadlocks (and fails on the timeout); indices start near 2^32 to cross the wrap.
//!
//! gcc, objcopy, nm and the Xen headers are required: the test fails without them.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::ptr::NonNull;

use ferrotap::blkif::ring::{ring_entries, BackRing, FrontRing};
use ferrotap::blkif::{
    op, status, Protocol, Request, RequestBody, Response, Segment, MAX_INDIRECT_PAGES_PER_REQUEST,
    MAX_SEGMENTS_PER_REQUEST, PAGE_SIZE, SEGMENT_SIZE,
};

/// The C side; `@VALUES@` is replaced by the generated initializers.
const RING_PEER_C: &str = r#"/* A blkif peer built from Xen's own io/ring.h and io/blkif.h, for tests/blkif_abi.rs.
 *
 * Compiled with -DLAYOUT_ONLY (for x86_64 and, with -m32 -ffreestanding, for i386): only the
 * constant objects below, which the test reads out of the object file's .rodata.
 * Compiled natively without it: a frontend or backend on a shared ring file, notifying its
 * peer by writing 'N' to stdout and sleeping in read(0) (the peer's notifications), with
 * the hold-off and final-check macros deciding when.
 */
#include <stdint.h>
#include <stddef.h>
#define mb() __sync_synchronize()
#define rmb() __sync_synchronize()
#define wmb() __sync_synchronize()
#include <xen/io/blkif.h>

/* @VALUES@ : the generated initializers of direct_request, unknown_request,
 * indirect_request, discard_request and response go here. */

const uint32_t layout[] = {
    sizeof(struct blkif_request),
    sizeof(struct blkif_request_indirect),
    sizeof(struct blkif_request_discard),
    sizeof(struct blkif_response),
    sizeof(union blkif_sring_entry),
    offsetof(struct blkif_sring, req_prod),
    offsetof(struct blkif_sring, req_event),
    offsetof(struct blkif_sring, rsp_prod),
    offsetof(struct blkif_sring, rsp_event),
    offsetof(struct blkif_sring, ring),
    __CONST_RING_SIZE(blkif, 1 * 4096),
    __CONST_RING_SIZE(blkif, 2 * 4096),
    __CONST_RING_SIZE(blkif, 4 * 4096),
    __CONST_RING_SIZE(blkif, 8 * 4096),
    __CONST_RING_SIZE(blkif, 16 * 4096),
    sizeof(struct blkif_request_segment),
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
};

#ifndef LAYOUT_ONLY
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The request the test sends as number `seq` (tests/blkif_abi.rs builds the same one). */
static void fill_request(uint32_t seq, union blkif_sring_entry *entry)
{
    uint64_t id = (uint64_t)seq | ((uint64_t)(uint32_t)(seq * 2654435761u) << 32);
    uint64_t sector = ((uint64_t)seq << 20) | 0x77;
    memset(entry, 0, sizeof(*entry));
    switch (seq % 4) {
    case 0: {
        blkif_request_t *r = &entry->req;
        r->operation = (seq & 1) ? BLKIF_OP_WRITE : BLKIF_OP_READ;
        r->nr_segments = seq % 12;
        r->handle = seq & 0xffff;
        r->id = id;
        r->sector_number = sector;
        for (int i = 0; i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
            r->seg[i].gref = seq + i;
            r->seg[i].first_sect = i % 8;
            r->seg[i].last_sect = 7;
        }
        break;
    }
    case 1: {
        blkif_request_indirect_t *r = (blkif_request_indirect_t *)&entry->req;
        r->operation = BLKIF_OP_INDIRECT;
        r->indirect_op = BLKIF_OP_WRITE;
        r->nr_segments = seq % 257;
        r->id = id;
        r->sector_number = sector;
        r->handle = ~seq & 0xffff;
        for (int i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++)
            r->indirect_grefs[i] = seq ^ ((uint32_t)i << 24);
        break;
    }
    case 2: {
        blkif_request_discard_t *r = (blkif_request_discard_t *)&entry->req;
        r->operation = BLKIF_OP_DISCARD;
        r->flag = seq & BLKIF_DISCARD_SECURE;
        r->handle = seq & 0xffff;
        r->id = id;
        r->sector_number = sector;
        r->nr_sectors = (uint64_t)seq * 3 + ((uint64_t)1 << 40);
        break;
    }
    default: {
        blkif_request_t *r = &entry->req;
        r->operation = 0xee;
        r->nr_segments = 3;
        r->handle = seq & 0xffff;
        r->id = id;
        r->sector_number = sector;
        break;
    }
    }
}

static int16_t status_for(uint32_t seq)
{
    static const int16_t statuses[3] = {BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP};
    return statuses[seq % 3];
}

static void fail(const char *what, uint32_t seq)
{
    fprintf(stderr, "ring_peer: %s (request %u)\n", what, seq);
    exit(1);
}

static void notify(void)
{
    if (write(1, "N", 1) != 1)
        fail("notify write", 0);
}

/* Notifications are bytes on stdin (non-blocking). Like an event channel's pending bit,
 * they are cleared before the ring is looked at, so that one sent for work already seen
 * cannot wake a later sleep and hide a notification that was never sent. */
static void clear_notifications(void)
{
    char buf[256];
    while (read(0, buf, sizeof(buf)) > 0)
        ;
}

/* Sleep until the peer notifies; false when it is gone. */
static int wait_for_notification(void)
{
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    char buf[256];
    if (poll(&pfd, 1, -1) != 1)
        return 0;
    return read(0, buf, sizeof(buf)) > 0;
}

static blkif_sring_t *map_ring(const char *path, size_t len)
{
    int fd = open(path, O_RDWR);
    if (fd < 0)
        fail("open ring file", 0);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        fail("mmap ring file", 0);
    close(fd);
    return p;
}

/* Frontend: initialise the ring with every index at `start`, send `count` requests in
 * batches, check every response. */
static int run_front(const char *path, size_t len, uint32_t count, uint32_t start)
{
    blkif_sring_t *sring = map_ring(path, len);
    blkif_front_ring_t front;
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&front, sring, len);
    sring->req_prod = sring->rsp_prod = start;
    sring->req_event = sring->rsp_event = start + 1;
    front.req_prod_pvt = front.rsp_cons = start;
    unsigned char *answered = calloc(count, 1);
    uint32_t sent = 0, done = 0, notifies = 0, lcg = 12345;
    if (write(1, "R", 1) != 1)
        fail("ready write", 0);
    /* The backend connects (a 'C') before any request is put on the ring. */
    if (!wait_for_notification())
        fail("backend never connected", 0);
    while (done < count) {
        clear_notifications();
        lcg = lcg * 1103515245u + 12345u;
        /* Half the time a single request, and now and then wait for every answer before
         * the next push (queue depth 1): the pushes that must notify a sleeping backend. */
        uint32_t batch = (lcg >> 16) % 2 ? 1 : 1 + (lcg >> 17) % 40;
        int drain = (lcg >> 8) % 4 == 0;
        int put = 0;
        while (batch-- && sent < count && !RING_FULL(&front)) {
            fill_request(sent, &sring->ring[front.req_prod_pvt & (RING_SIZE(&front) - 1)]);
            front.req_prod_pvt++;
            sent++;
            put = 1;
        }
        if (put) {
            int must_notify;
            RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&front, must_notify);
            if (must_notify) {
                notify();
                notifies++;
            }
        }
        int more;
        do {
            RING_IDX rp = sring->rsp_prod;
            rmb();
            if (RING_RESPONSE_PROD_OVERFLOW(&front, rp))
                fail("backend produced more responses than requests", rp);
            for (RING_IDX i = front.rsp_cons; i != rp; i++) {
                blkif_response_t rsp;
                RING_COPY_RESPONSE(&front, i, &rsp);
                uint32_t seq = (uint32_t)rsp.id;
                union blkif_sring_entry expected;
                if (seq >= sent)
                    fail("response for a request never sent", seq);
                fill_request(seq, &expected);
                if (rsp.id != expected.req.id)
                    fail("response id", seq);
                if (rsp.operation != expected.req.operation)
                    fail("response operation", seq);
                if (rsp.status != status_for(seq))
                    fail("response status", seq);
                if (answered[seq]++)
                    fail("answered twice", seq);
                done++;
            }
            front.rsp_cons = rp;
            RING_FINAL_CHECK_FOR_RESPONSES(&front, more);
        } while (more);
        int blocked = sent == count || RING_FULL(&front) || (drain && done < sent);
        if (done < count && blocked && !wait_for_notification())
            fail("backend gone", done);
    }
    fprintf(stderr, "front: %u requests, %u notifications sent\n", count, notifies);
    return 0;
}

/* Backend: attach at rsp_prod, answer `count` requests, checking each byte for byte. */
static int run_back(const char *path, size_t len, uint32_t count)
{
    blkif_sring_t *sring = map_ring(path, len);
    blkif_back_ring_t back;
    BACK_RING_ATTACH(&back, sring, sring->rsp_prod, len);
    uint32_t served = 0, notifies = 0;
    for (;;) {
        clear_notifications();
        RING_IDX rp = sring->req_prod;
        rmb();
        if (RING_REQUEST_PROD_OVERFLOW(&back, rp))
            fail("frontend req_prod overflow", rp);
        while (back.req_cons != rp && !RING_REQUEST_CONS_OVERFLOW(&back, back.req_cons)) {
            union blkif_sring_entry got, expected;
            RING_COPY_REQUEST(&back, back.req_cons, &got.req);
            back.req_cons++;
            uint32_t seq = (uint32_t)got.req.id;
            fill_request(seq, &expected);
            if (memcmp(&got.req, &expected.req, sizeof(got.req)) != 0)
                fail("request bytes differ from the C layout", seq);
            blkif_response_t *rsp = RING_GET_RESPONSE(&back, back.rsp_prod_pvt);
            rsp->id = got.req.id;
            rsp->operation = got.req.operation;
            rsp->status = status_for(seq);
            back.rsp_prod_pvt++;
            served++;
            /* Push in the middle of a batch now and then, as a real backend completing
             * I/O out of step with its consumer. */
            if (served % 7 == 0) {
                int must_notify;
                RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, must_notify);
                if (must_notify) {
                    notify();
                    notifies++;
                }
            }
        }
        int must_notify;
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&back, must_notify);
        if (must_notify) {
            notify();
            notifies++;
        }
        if (served == count)
            break;
        int more;
        RING_FINAL_CHECK_FOR_REQUESTS(&back, more);
        if (!more && !wait_for_notification())
            fail("frontend gone", served);
    }
    fprintf(stderr, "back: %u requests, %u notifications sent\n", count, notifies);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 5 || fcntl(0, F_SETFL, O_NONBLOCK) != 0)
        return 2;
    size_t len = strtoul(argv[3], NULL, 0) * 4096;
    uint32_t count = strtoul(argv[4], NULL, 0);
    if (strcmp(argv[1], "front") == 0 && argc == 6)
        return run_front(argv[2], len, count, strtoul(argv[5], NULL, 0));
    if (strcmp(argv[1], "back") == 0)
        return run_back(argv[2], len, count);
    return 2;
}
#endif
"#;

fn run(command: &mut Command) -> Vec<u8> {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?} (is gcc/binutils installed?): {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// The C source with the layout objects' initializers in place.
fn c_source(dir: &Path) -> PathBuf {
    assert!(
        Path::new("/usr/include/xen/io/blkif.h").exists(),
        "the Xen public headers (libxen-dev) are required"
    );
    let path = dir.join("ring_peer.c");
    let values = format!(
        "{}\n{}\n{}\n{}\n{}\n",
        c_direct("direct_request", &direct_request()),
        c_direct("unknown_request", &unknown_request()),
        c_indirect("indirect_request", &indirect_request()),
        c_discard("discard_request", &discard_request()),
        c_response("response", &response()),
    );
    std::fs::write(
        &path,
        RING_PEER_C.replace("/* @VALUES@", &format!("{values}/*")),
    )
    .unwrap();
    path
}

// Requests with a distinct value in every field, so that any misplaced field shows.

fn direct_request() -> Request {
    Request {
        operation: op::WRITE,
        id: 0x1122_3344_5566_7788,
        sector: 0x99aa_bbcc_ddee_ff10,
        handle: 0xa1b2,
        body: RequestBody::Direct {
            nr_segments: 11,
            segments: std::array::from_fn(|i| Segment {
                gref: 0xc0de_0000 + 0x0101 * i as u32,
                first_sect: i as u8,
                last_sect: 0x80 | i as u8,
            }),
        },
    }
}

fn unknown_request() -> Request {
    Request {
        operation: 0xee,
        id: 0xfedc_ba98_7654_3210,
        sector: 0x0123_4567_89ab_cdef,
        handle: 0x0bad,
        body: RequestBody::Direct {
            nr_segments: 0x5a,
            segments: std::array::from_fn(|i| Segment {
                gref: 0x5000_0000 | (i as u32) << 8,
                first_sect: 0x40 + i as u8,
                last_sect: 0x60 + i as u8,
            }),
        },
    }
}

fn indirect_request() -> Request {
    Request {
        operation: op::INDIRECT,
        id: 0x2233_4455_6677_8899,
        sector: 0x8877_6655_4433_2211,
        handle: 0xbeef,
        body: RequestBody::Indirect {
            indirect_op: op::WRITE,
            nr_segments: 0x0102,
            indirect_grefs: std::array::from_fn(|i| 0xa000_1234 | (i as u32) << 16),
        },
    }
}

fn discard_request() -> Request {
    Request {
        operation: op::DISCARD,
        id: 0x0f1e_2d3c_4b5a_6978,
        sector: 0x1020_3040_5060_7080,
        handle: 0x4321,
        body: RequestBody::Discard {
            flag: 1,
            nr_sectors: 0x0fed_cba9_8765_4321,
        },
    }
}

fn response() -> Response {
    Response {
        id: 0xdead_beef_0bad_f00d,
        operation: op::FLUSH_DISKCACHE,
        status: status::EOPNOTSUPP,
    }
}

fn c_direct(name: &str, r: &Request) -> String {
    let RequestBody::Direct {
        nr_segments,
        segments,
    } = &r.body
    else {
        unreachable!()
    };
    let segments: Vec<String> = segments
        .iter()
        .map(|s| {
            format!(
                "{{ .gref = {:#x}, .first_sect = {:#x}, .last_sect = {:#x} }}",
                s.gref, s.first_sect, s.last_sect
            )
        })
        .collect();
    format!(
        "const struct blkif_request {name} = {{ .operation = {:#x}, .nr_segments = {nr_segments:#x}, \
         .handle = {:#x}, .id = {:#x}ULL, .sector_number = {:#x}ULL, .seg = {{ {} }} }};",
        r.operation,
        r.handle,
        r.id,
        r.sector,
        segments.join(", ")
    )
}

fn c_indirect(name: &str, r: &Request) -> String {
    let RequestBody::Indirect {
        indirect_op,
        nr_segments,
        indirect_grefs,
    } = &r.body
    else {
        unreachable!()
    };
    let grefs: Vec<String> = indirect_grefs.iter().map(|g| format!("{g:#x}")).collect();
    format!(
        "const struct blkif_request_indirect {name} = {{ .operation = {:#x}, .indirect_op = {indirect_op:#x}, \
         .nr_segments = {nr_segments:#x}, .id = {:#x}ULL, .sector_number = {:#x}ULL, .handle = {:#x}, \
         .indirect_grefs = {{ {} }} }};",
        r.operation,
        r.id,
        r.sector,
        r.handle,
        grefs.join(", ")
    )
}

fn c_discard(name: &str, r: &Request) -> String {
    let RequestBody::Discard { flag, nr_sectors } = &r.body else {
        unreachable!()
    };
    format!(
        "const struct blkif_request_discard {name} = {{ .operation = {:#x}, .flag = {flag:#x}, \
         .handle = {:#x}, .id = {:#x}ULL, .sector_number = {:#x}ULL, .nr_sectors = {nr_sectors:#x}ULL }};",
        r.operation, r.handle, r.id, r.sector
    )
}

fn c_response(name: &str, r: &Response) -> String {
    format!(
        "const struct blkif_response {name} = {{ .id = {:#x}ULL, .operation = {:#x}, .status = {} }};",
        r.id, r.operation, r.status
    )
}

/// The constant objects of the C source compiled for one ABI: name -> bytes.
struct CObjects {
    objects: Vec<(String, Vec<u8>)>,
}

impl CObjects {
    fn compile(dir: &Path, protocol: Protocol) -> CObjects {
        let source = c_source(dir);
        let object = dir.join(format!("layout-{}.o", protocol.name()));
        let mut gcc = Command::new("gcc");
        gcc.args(["-std=gnu11", "-Wall", "-Werror", "-DLAYOUT_ONLY", "-c"]);
        match protocol {
            Protocol::X86_64 => gcc.arg("-m64"),
            // The real i386 ABI; freestanding needs only gcc's own stdint.h and stddef.h.
            Protocol::X86_32 => gcc.args(["-m32", "-ffreestanding"]),
        };
        run(gcc.arg(&source).arg("-o").arg(&object));
        let rodata = dir.join(format!("layout-{}.rodata", protocol.name()));
        run(Command::new("objcopy")
            .args(["-O", "binary", "--only-section=.rodata"])
            .arg(&object)
            .arg(&rodata));
        let rodata = std::fs::read(&rodata).unwrap();
        // "offset size R name" for each object in .rodata.
        let symbols = String::from_utf8(run(Command::new("nm")
            .args(["-S", "--defined-only"])
            .arg(&object)))
        .unwrap();
        let mut objects = Vec::new();
        for line in symbols.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [offset, size, "R" | "r", name] = fields[..] {
                let offset = usize::from_str_radix(offset, 16).unwrap();
                let size = usize::from_str_radix(size, 16).unwrap();
                objects.push((name.to_string(), rodata[offset..offset + size].to_vec()));
            }
        }
        CObjects { objects }
    }

    fn bytes(&self, name: &str) -> &[u8] {
        &self
            .objects
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} not in the object file"))
            .1
    }

    fn layout(&self) -> Vec<u32> {
        self.bytes("layout")
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
            .collect()
    }
}

/// C's bytes of a request decode to `expected`, and Rust's encoding of `expected` is C's
/// bytes followed by zeros to the end of the entry.
fn check_request(c: &CObjects, protocol: Protocol, name: &str, expected: &Request) {
    let c_bytes = c.bytes(name);
    let size = protocol.entry_size();
    assert!(
        c_bytes.len() <= size,
        "{name}: C struct larger than the entry"
    );
    let mut entry = vec![0u8; size];
    entry[..c_bytes.len()].copy_from_slice(c_bytes);
    assert_eq!(
        protocol.decode_request(&entry),
        *expected,
        "{} {name}: decode of C's bytes",
        protocol.name()
    );
    let mut encoded = vec![0xffu8; size];
    protocol.encode_request(expected, &mut encoded);
    assert_eq!(
        &encoded[..c_bytes.len()],
        c_bytes,
        "{} {name}: Rust's encoding against C's bytes",
        protocol.name()
    );
    assert!(
        encoded[c_bytes.len()..].iter().all(|&b| b == 0),
        "{} {name}: bytes past the C struct not zeroed",
        protocol.name()
    );
}

#[test]
fn layouts_and_ring_sizes_match_the_xen_headers_for_both_abis() {
    let dir = tempfile::tempdir().unwrap();
    for protocol in [Protocol::X86_64, Protocol::X86_32] {
        let c = CObjects::compile(dir.path(), protocol);
        let layout = c.layout();
        let name = protocol.name();
        assert_eq!(
            layout[0] as usize,
            protocol.entry_size(),
            "{name} request size"
        );
        assert_eq!(
            layout[4] as usize,
            protocol.entry_size(),
            "{name} ring entry size"
        );
        assert_eq!(
            layout[5..10],
            [0, 4, 8, 12, 64],
            "{name} req_prod, req_event, rsp_prod, rsp_event, ring offsets"
        );
        let ours: Vec<u32> = [1, 2, 4, 8, 16]
            .iter()
            .map(|&pages| ring_entries(pages, protocol))
            .collect();
        assert_eq!(
            layout[10..15],
            ours[..],
            "{name} __CONST_RING_SIZE for 1..16 pages"
        );
        assert_eq!(
            layout[15..18],
            [
                SEGMENT_SIZE as u32,
                MAX_SEGMENTS_PER_REQUEST as u32,
                MAX_INDIRECT_PAGES_PER_REQUEST as u32
            ],
            "{name} segment descriptor size, direct segments, indirect pages per request"
        );

        check_request(&c, protocol, "direct_request", &direct_request());
        check_request(&c, protocol, "unknown_request", &unknown_request());
        check_request(&c, protocol, "indirect_request", &indirect_request());
        check_request(&c, protocol, "discard_request", &discard_request());

        // The response: 16 bytes on x86_64, 12 in the i386 ABI (ferrotap writes 16, the
        // last 4 zero, always inside the entry).
        let c_bytes = c.bytes("response");
        assert_eq!(c_bytes.len(), layout[3] as usize);
        let mut entry = vec![0u8; protocol.entry_size()];
        entry[..c_bytes.len()].copy_from_slice(c_bytes);
        assert_eq!(
            protocol.decode_response(&entry),
            response(),
            "{name} response"
        );
        let mut encoded = vec![0xffu8; 16];
        protocol.encode_response(&response(), &mut encoded);
        assert_eq!(&encoded[..c_bytes.len()], c_bytes, "{name} response bytes");
        assert!(encoded[c_bytes.len()..].iter().all(|&b| b == 0));
    }
}

/// Request number `seq` of the interop runs: the C side's fill_request().
fn request_for(seq: u32) -> Request {
    let id = seq as u64 | (seq.wrapping_mul(2_654_435_761) as u64) << 32;
    let sector = (seq as u64) << 20 | 0x77;
    let handle = seq as u16;
    match seq % 4 {
        0 => Request {
            operation: if seq & 1 == 1 { op::WRITE } else { op::READ },
            id,
            sector,
            handle,
            body: RequestBody::Direct {
                nr_segments: (seq % 12) as u8,
                segments: std::array::from_fn(|i| Segment {
                    gref: seq.wrapping_add(i as u32),
                    first_sect: (i % 8) as u8,
                    last_sect: 7,
                }),
            },
        },
        1 => Request {
            operation: op::INDIRECT,
            id,
            sector,
            handle: !seq as u16,
            body: RequestBody::Indirect {
                indirect_op: op::WRITE,
                nr_segments: (seq % 257) as u16,
                indirect_grefs: std::array::from_fn(|i| seq ^ (i as u32) << 24),
            },
        },
        2 => Request {
            operation: op::DISCARD,
            id,
            sector,
            handle,
            body: RequestBody::Discard {
                flag: (seq & 1) as u8,
                nr_sectors: seq as u64 * 3 + (1 << 40),
            },
        },
        _ => Request {
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
    let seq = request.id as u32;
    Response {
        id: request.id,
        operation: request.operation,
        status: [status::OKAY, status::ERROR, status::EOPNOTSUPP][(seq % 3) as usize],
    }
}

/// The native C peer, built once per test.
fn build_peer(dir: &Path) -> PathBuf {
    let source = c_source(dir);
    let exe = dir.join("ring_peer");
    run(Command::new("gcc")
        .args(["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"])
        .arg(&source)
        .arg("-o")
        .arg(&exe));
    exe
}

/// A ring file shared with the C peer, mapped here.
struct SharedRing {
    _file: File,
    base: NonNull<u8>,
    len: usize,
}

impl SharedRing {
    fn create(path: &Path, pages: usize) -> SharedRing {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        let len = pages * PAGE_SIZE;
        file.set_len(len as u64).unwrap();
        // SAFETY: a fresh shared mapping of the file's len bytes; nothing else in this
        // process aliases it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        SharedRing {
            _file: file,
            base: NonNull::new(p as *mut u8).unwrap(),
            len,
        }
    }
}

impl Drop for SharedRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`; the rings using it are gone by now (they
        // are declared after it in every test).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The C peer, with a pipe each way standing for the event channel: a byte is a
/// notification.
struct Peer {
    child: Child,
}

impl Peer {
    fn spawn(exe: &Path, args: &[String]) -> Peer {
        // `timeout` turns a deadlock (a missed notification) into a failure.
        let child = Command::new("timeout")
            .arg("30")
            .arg(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let fd = child.stdout.as_ref().unwrap().as_raw_fd();
        // SAFETY: fcntl on a pipe fd this process owns.
        let set = unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        assert_eq!(set, 0);
        Peer { child }
    }

    /// Clear pending notifications before looking at the ring (as the C side does).
    fn clear(&mut self) {
        let mut buf = [0u8; 256];
        while matches!(self.child.stdout.as_mut().unwrap().read(&mut buf), Ok(n) if n > 0) {}
    }

    fn notify(&mut self) {
        // The peer may have finished and gone: its exit status tells.
        let _ = self.child.stdin.as_mut().unwrap().write_all(b"N");
    }

    /// Sleep until the peer writes; returns the bytes written.
    fn wait(&mut self) -> Vec<u8> {
        let stdout = self.child.stdout.as_mut().unwrap();
        let mut pfd = libc::pollfd {
            fd: stdout.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, -1) };
        assert_eq!(ready, 1);
        let mut buf = [0u8; 256];
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            panic!("C peer gone: {}", self.finish_output());
        }
        buf[..n].to_vec()
    }

    /// Close its stdin, wait for it: its exit status and stderr.
    fn reap(&mut self) -> (std::process::ExitStatus, String) {
        drop(self.child.stdin.take());
        let mut err = String::new();
        self.child
            .stderr
            .as_mut()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (self.child.wait().unwrap(), err)
    }

    fn finish_output(&mut self) -> String {
        let (status, err) = self.reap();
        format!("{status}: {err}")
    }

    /// Wait for a successful exit; its log.
    fn finish(mut self) -> String {
        let (status, err) = self.reap();
        assert!(status.success(), "C peer failed ({status}): {err}");
        err
    }
}

const INTEROP_REQUESTS: u32 = 20_000;

/// (pages, first ring index): one page from 0, and multi-page rings crossing 2^32.
const INTEROP_RINGS: [(usize, u32); 3] = [(1, 0), (2, u32::MAX - 100), (4, u32::MAX - 7)];

#[test]
fn back_ring_serves_a_c_frontend_made_of_ring_h_macros() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_peer(dir.path());
    for (run_no, (pages, start)) in INTEROP_RINGS.into_iter().enumerate() {
        let path = dir.path().join(format!("front-ring-{run_no}"));
        let shared = SharedRing::create(&path, pages);
        let mut peer = Peer::spawn(
            &exe,
            &[
                "front".into(),
                path.display().to_string(),
                pages.to_string(),
                INTEROP_REQUESTS.to_string(),
                start.to_string(),
            ],
        );
        assert_eq!(peer.wait(), b"R", "the frontend announces its ring");
        // SAFETY: the mapping outlives the ring (declared before it).
        let mut back = unsafe { BackRing::new(shared.base, shared.len, Protocol::X86_64) };
        assert_eq!(back.size(), ring_entries(pages, Protocol::X86_64));
        peer.notify(); // connected
        let (mut served, mut wakeups) = (0u32, 0u32);
        let mut batch = Vec::new();
        loop {
            peer.clear();
            while let Some(request) = back.next_request().unwrap() {
                assert_eq!(request, request_for(request.id as u32), "decoded C request");
                batch.push(request);
                if batch.len() == 13 {
                    break;
                }
            }
            let consumed = !batch.is_empty();
            // Answer out of order, as I/O completes.
            while let Some(request) = batch.pop() {
                back.put_response(&response_for(&request));
                served += 1;
            }
            if back.push_responses() {
                peer.notify();
            }
            if served == INTEROP_REQUESTS {
                break;
            }
            if !consumed && !back.final_check_for_requests() {
                peer.wait();
                wakeups += 1;
            }
        }
        assert_eq!(back.unanswered(), 0);
        let log = peer.finish();
        assert!(wakeups > 0, "the backend slept and was woken at least once");
        eprintln!("pages {pages} start {start:#x}: {log} backend woken {wakeups} times");
    }
}

#[test]
fn front_ring_is_served_by_a_c_backend_made_of_ring_h_macros() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_peer(dir.path());
    for (run_no, (pages, start)) in INTEROP_RINGS.into_iter().enumerate() {
        let path = dir.path().join(format!("back-ring-{run_no}"));
        let shared = SharedRing::create(&path, pages);
        // SAFETY: the mapping outlives the ring (declared before it).
        let mut front =
            unsafe { FrontRing::init_at(shared.base, shared.len, Protocol::X86_64, start) };
        let mut peer = Peer::spawn(
            &exe,
            &[
                "back".into(),
                path.display().to_string(),
                pages.to_string(),
                INTEROP_REQUESTS.to_string(),
            ],
        );
        let mut answered = vec![false; INTEROP_REQUESTS as usize];
        let (mut sent, mut done, mut wakeups, mut lcg) = (0u32, 0u32, 0u32, 99u32);
        while done < INTEROP_REQUESTS {
            peer.clear();
            lcg = lcg.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            // As the C frontend: single requests half the time, and queue depth 1 phases.
            let mut batch = if (lcg >> 16) % 2 == 1 {
                1
            } else {
                1 + (lcg >> 17) % 40
            };
            let drain = (lcg >> 8) % 4 == 0;
            let mut put = false;
            while batch > 0 && sent < INTEROP_REQUESTS && front.free_requests() > 0 {
                assert!(front.put_request(&request_for(sent)));
                sent += 1;
                batch -= 1;
                put = true;
            }
            if put && front.push_requests() {
                peer.notify();
            }
            loop {
                while let Some(response) = front.next_response() {
                    let seq = response.id as u32;
                    assert!(seq < sent, "response for request {seq} never sent");
                    assert_eq!(response, response_for(&request_for(seq)));
                    assert!(!answered[seq as usize], "request {seq} answered twice");
                    answered[seq as usize] = true;
                    done += 1;
                }
                if !front.final_check_for_responses() {
                    break;
                }
            }
            let blocked =
                sent == INTEROP_REQUESTS || front.free_requests() == 0 || (drain && done < sent);
            if done < INTEROP_REQUESTS && blocked {
                peer.wait();
                wakeups += 1;
            }
        }
        assert_eq!(front.free_requests(), front.size());
        let log = peer.finish();
        assert!(
            wakeups > 0,
            "the frontend slept and was woken at least once"
        );
        eprintln!("pages {pages} start {start:#x}: {log} frontend woken {wakeups} times");
    }
}
