//! A hostile frontend against `ferrotap serve` on xensim: malformed requests get error
//! responses carrying their id, ring abuse gets that queue disconnected while the rest of
//! the device and other devices go on, and a frontend that vanishes mid-I/O leaves no
//! mapping, thread or fd behind once the device is disconnected.
//!
//! The test process plays the guest through ferrotap's simulated blkfront library
//! (`ferrotap::xensim`); `ferrotap serve` runs as its own process, as on a real host.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::blkif::{ask, direct, granted_frame, whole_page, WAIT};
use common::host::{Serve, SimHost};
use ferrotap::blkif::{
    op, status, Request, RequestBody, Response, Segment, MAX_INDIRECT_PAGES_PER_REQUEST,
};
use ferrotap::xensim::blkfront::{Blkfront, FrontConfig};
use serde_json::{json, Value};

const DISK_BYTES: u64 = 16 << 20;

fn raw_image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.raw");
    let mut data = vec![0u8; DISK_BYTES as usize];
    for (i, chunk) in data.chunks_mut(512).enumerate() {
        chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    std::fs::write(&path, data).unwrap();
    path
}

fn front(host: &SimHost, serve: &Serve, domid: u16, queues: u32) -> Blkfront {
    let mut config = FrontConfig::new(host.path().to_path_buf(), serve.control.clone());
    config.domid = domid;
    config.queues = queues;
    config.iodepth = 4;
    config.response_timeout = WAIT;
    Blkfront::connect(&config).unwrap()
}

fn assert_answer(fe: &mut Blkfront, request: Request, expect_op: u8, expect_status: i16) {
    let response = ask(fe, 0, &request);
    assert_eq!(
        response,
        Response {
            id: request.id,
            operation: expect_op,
            status: expect_status
        },
        "answer to {request:?}"
    );
}

/// A good one-page read of `sector` on `queue`: OKAY and the sector's pattern.
fn good_read(fe: &mut Blkfront, queue: usize, sector: u64) {
    let (gref, gfn) = granted_frame(fe, false);
    let request = direct(op::READ, 0x1234_5678_9abc_def0, sector, &[whole_page(gref)]);
    let response = ask(fe, queue, &request);
    assert_eq!(response.status, status::OKAY, "good read after abuse");
    assert_eq!(response.id, request.id);
    let mut word = [0u8; 8];
    let mem = std::fs::read(fe.memory().path()).unwrap();
    word.copy_from_slice(&mem[gfn as usize * 4096..gfn as usize * 4096 + 8]);
    assert_eq!(
        u64::from_le_bytes(word),
        sector,
        "read returned the wrong sector"
    );
}

#[test]
fn malformed_requests_get_errors_with_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let host = SimHost::new();
    let serve = host.serve("vbd", &image, &[]);
    let mut fe = front(&host, &serve, 1, 1);
    let sectors = DISK_BYTES / 512;
    let (gref, _) = granted_frame(&fe, false);
    let page = |first_sect, last_sect| Segment {
        gref,
        first_sect,
        last_sect,
    };
    let full = page(0, 7);

    // Unknown operations: EOPNOTSUPP with the operation echoed, and all 64 bits of the id.
    for unknown in [4u8, 7, 99, 255] {
        assert_answer(
            &mut fe,
            direct(
                unknown,
                0xdead_beef_0000_0000 | u64::from(unknown),
                0,
                &[full],
            ),
            unknown,
            status::EOPNOTSUPP,
        );
    }
    // Ranges past the end of the disk, including a sector number that would overflow.
    assert_answer(
        &mut fe,
        direct(op::READ, 1, sectors - 7, &[full]),
        op::READ,
        status::ERROR,
    );
    assert_answer(
        &mut fe,
        direct(op::WRITE, 2, sectors, &[page(0, 0)]),
        op::WRITE,
        status::ERROR,
    );
    assert_answer(
        &mut fe,
        direct(op::READ, 3, u64::MAX - 3, &[full]),
        op::READ,
        status::ERROR,
    );
    // Bad segments: first > last, last past the page, no segments, too many segments.
    assert_answer(
        &mut fe,
        direct(op::READ, 4, 0, &[page(5, 4)]),
        op::READ,
        status::ERROR,
    );
    assert_answer(
        &mut fe,
        direct(op::READ, 5, 0, &[page(0, 8)]),
        op::READ,
        status::ERROR,
    );
    assert_answer(
        &mut fe,
        direct(op::READ, 6, 0, &[]),
        op::READ,
        status::ERROR,
    );
    let mut twelve = direct(op::READ, 7, 0, &[full; 11]);
    if let RequestBody::Direct { nr_segments, .. } = &mut twelve.body {
        *nr_segments = 12;
    }
    assert_answer(&mut fe, twelve, op::READ, status::ERROR);
    // Indirect: a bad inner operation, zero segments, more than advertised.
    let (indirect_page, _) = granted_frame(&fe, false);
    for (id, indirect_op, nr_segments) in [
        (8u64, op::DISCARD, 1u16),
        (9, op::READ, 0),
        (10, op::WRITE, 5000),
    ] {
        let mut grefs = [0u32; MAX_INDIRECT_PAGES_PER_REQUEST];
        grefs[0] = indirect_page;
        let request = Request {
            operation: op::INDIRECT,
            id,
            sector: 0,
            handle: 0,
            body: RequestBody::Indirect {
                indirect_op,
                nr_segments,
                indirect_grefs: grefs,
            },
        };
        let response = ask(&mut fe, 0, &request);
        assert_eq!(
            (response.id, response.status),
            (id, status::ERROR),
            "{request:?}"
        );
        assert_ne!(response.operation, op::INDIRECT, "blkfront stops on op 6");
    }
    // Grants: past the table, revoked, read-only for a read (the backend writes it), and a
    // frame past the guest's memory.
    let bad_ref = Segment {
        gref: 1 << 30,
        ..full
    };
    assert_answer(
        &mut fe,
        direct(op::READ, 11, 0, &[bad_ref]),
        op::READ,
        status::ERROR,
    );
    let (revoked, _) = granted_frame(&fe, false);
    fe.grants().revoke(revoked).unwrap();
    let revoked_seg = Segment {
        gref: revoked,
        ..full
    };
    assert_answer(
        &mut fe,
        direct(op::WRITE, 12, 0, &[revoked_seg]),
        op::WRITE,
        status::ERROR,
    );
    let (readonly, _) = granted_frame(&fe, true);
    let ro_seg = Segment {
        gref: readonly,
        ..full
    };
    assert_answer(
        &mut fe,
        direct(op::READ, 13, 0, &[ro_seg]),
        op::READ,
        status::ERROR,
    );
    let far = fe.grants().alloc_ref().unwrap();
    fe.grants().grant(far, 1 << 24, false).unwrap();
    let far_seg = Segment { gref: far, ..full };
    assert_answer(
        &mut fe,
        direct(op::READ, 14, 0, &[far_seg]),
        op::READ,
        status::ERROR,
    );
    // A read-only grant is fine for a write (the backend only reads it).
    assert_answer(
        &mut fe,
        direct(op::WRITE, 15, 64, &[ro_seg]),
        op::WRITE,
        status::OKAY,
    );
    // Discard: secure is not offered; past the end is an error.
    let discard = |id, sector, nr_sectors, flag| Request {
        operation: op::DISCARD,
        id,
        sector,
        handle: 0,
        body: RequestBody::Discard { flag, nr_sectors },
    };
    assert_answer(
        &mut fe,
        discard(16, 0, 8, 1),
        op::DISCARD,
        status::EOPNOTSUPP,
    );
    assert_answer(
        &mut fe,
        discard(17, sectors - 4, 8, 0),
        op::DISCARD,
        status::ERROR,
    );
    assert_answer(&mut fe, discard(18, 8, 8, 0), op::DISCARD, status::OKAY);

    // After all that the device still serves, and the data is right.
    good_read(&mut fe, 0, 1000);
    let stats = serve.ctl(&json!({"op": "stats"}));
    let queue = &stats["queues"][0];
    assert_eq!(queue["errors"].as_u64().unwrap(), 15, "{stats}");
    assert_eq!(queue["unsupported"].as_u64().unwrap(), 5, "{stats}");
}

#[test]
fn read_only_disk_refuses_writes_and_discards() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let host = SimHost::new();
    let serve = host.serve("ro", &image, &["--read-only"]);
    let mut fe = front(&host, &serve, 1, 1);
    let (gref, _) = granted_frame(&fe, false);
    let seg = whole_page(gref);
    assert_answer(
        &mut fe,
        direct(op::WRITE, 1, 0, &[seg]),
        op::WRITE,
        status::ERROR,
    );
    assert_answer(
        &mut fe,
        direct(op::FLUSH_DISKCACHE, 2, 0, &[seg]),
        op::FLUSH_DISKCACHE,
        status::ERROR,
    );
    let discard = Request {
        operation: op::DISCARD,
        id: 3,
        sector: 0,
        handle: 0,
        body: RequestBody::Discard {
            flag: 0,
            nr_sectors: 8,
        },
    };
    // Discard is not offered on a read-only disk at all.
    assert_answer(&mut fe, discard, op::DISCARD, status::EOPNOTSUPP);
    assert_answer(
        &mut fe,
        direct(op::FLUSH_DISKCACHE, 4, 0, &[]),
        op::FLUSH_DISKCACHE,
        status::OKAY,
    );
    good_read(&mut fe, 0, 77);
    let original = std::fs::read(&image).unwrap();
    assert_eq!(
        &original[..8],
        &0u64.to_le_bytes(),
        "the read-only image changed"
    );
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ring_overflow_stops_that_queue_only_and_other_disks_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let other_image = dir.path().join("other.raw");
    std::fs::copy(&image, &other_image).unwrap();
    let host = SimHost::new();
    let serve = host.serve("vbd", &image, &[]);
    let other = host.serve("other", &other_image, &[]);
    let mut fe = front(&host, &serve, 1, 2);
    let mut other_fe = front(&host, &other, 2, 1);
    good_read(&mut fe, 0, 5);

    // A notification flood: the backend drains them and keeps serving.
    for _ in 0..20_000 {
        fe.queue_mut(0).notify().unwrap();
    }
    good_read(&mut fe, 0, 6);

    // req_prod jumps past the ring on queue 0.
    {
        let q = fe.queue_mut(0);
        let header = q.header();
        let size = q.ring_size();
        header.set_req_prod(header.rsp_prod().wrapping_add(size + 5));
        q.notify().unwrap();
    }
    wait_for("the overflow to be reported", || {
        serve.ctl(&json!({"op": "info"}))["error"]
            .as_str()
            .is_some_and(|e| e.contains("queue 0"))
    });
    // Queue 1 of the same device, and the other device, still serve.
    good_read(&mut fe, 1, 7);
    good_read(&mut other_fe, 0, 8);
    assert!(other.ctl(&json!({"op": "info"})).get("error").is_none());
    // Disconnect cleans up the broken device; a new frontend connects and works.
    let reply = serve.ctl(&json!({"op": "disconnect"}));
    assert_eq!(reply["ok"], json!(true));
    drop(fe);
    let mut again = front(&host, &serve, 3, 1);
    good_read(&mut again, 0, 9);
}

/// (mappings of guest memory, threads, open fds) of a process.
fn footprint_now(pid: u32) -> (usize, usize, usize) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let guest = maps.lines().filter(|l| l.contains(".mem")).count();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (guest, threads, fds)
}

/// The footprint once it holds still: control connections end (and their threads exit)
/// shortly after their reply.
fn footprint(pid: u32) -> (usize, usize, usize) {
    let mut last = footprint_now(pid);
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let now = footprint_now(pid);
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn vanished_frontend_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let host = SimHost::new();
    let serve = host.serve("vbd", &image, &[]);
    let before = footprint(serve.pid());
    assert_eq!(before.0, 0);
    // A blkfront process with persistent grants, 4 queues and a long workload, killed
    // mid-I/O.
    let mut guest = common::host::ferrotap()
        .args(["xensim", "blkfront", "--dir"])
        .arg(host.path())
        .arg("--control")
        .arg(&serve.control)
        .args([
            "--queues",
            "4",
            "--persistent",
            "--workload",
            "randwrite",
            "--seconds",
            "60",
        ])
        .args(["--iodepth", "32", "--ring-page-order", "2"])
        .spawn()
        .unwrap();
    wait_for("the guest to connect and do I/O", || {
        let stats = serve.ctl(&json!({"op": "stats"}));
        stats["queues"]
            .as_array()
            .is_some_and(|q| q.len() == 4 && q.iter().all(|q| q["requests"].as_u64() > Some(10)))
    });
    let during = footprint(serve.pid());
    assert!(during.0 > 0, "no guest memory mapped while connected");
    assert!(during.1 > before.1, "no queue threads while connected");
    guest.kill().unwrap();
    guest.wait().unwrap();
    // The toolstack notices the guest is gone and disconnects the device.
    assert_eq!(serve.ctl(&json!({"op": "disconnect"}))["ok"], json!(true));
    let after = footprint(serve.pid());
    assert_eq!(
        after, before,
        "(guest mappings, threads, fds) after disconnect"
    );
    // No socket of ours is left in the simulated host either.
    let leftovers: Vec<_> = std::fs::read_dir(host.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".back"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "event channels left bound: {leftovers:?}"
    );
}

#[test]
fn bad_connect_requests_are_refused_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let image = raw_image(dir.path());
    let host = SimHost::new();
    let serve = host.serve("vbd", &image, &[]);
    // The frontend's files exist (a real frontend made them), but the keys are wrong. Its
    // control connection stays open (a thread and a socket in serve): part of the baseline.
    let fe = front(&host, &serve, 1, 1);
    assert_eq!(serve.ctl(&json!({"op": "disconnect"}))["ok"], json!(true));
    let before = footprint(serve.pid());
    let ring_ref = fe.grants().alloc_ref().unwrap();
    let cases = [
        json!({"op":"connect","domid":1,"ring_page_order":0,"queues":[{"ring_refs":[1_000_000],"event_channel":7}]}),
        json!({"op":"connect","domid":1,"ring_page_order":5,"queues":[{"ring_refs":[ring_ref],"event_channel":7}]}),
        json!({"op":"connect","domid":1,"ring_page_order":1,"queues":[{"ring_refs":[ring_ref],"event_channel":7}]}),
        json!({"op":"connect","domid":1,"protocol":"sparc-abi","queues":[{"ring_refs":[ring_ref],"event_channel":7}]}),
        json!({"op":"connect","domid":1,"queues":[{"ring_refs":[ring_ref],"event_channel":0}]}),
        json!({"op":"connect","domid":1,"queues":[]}),
        json!({"op":"connect","domid":9,"queues":[{"ring_refs":[ring_ref],"event_channel":7}]}),
        json!({"op":"connect"}),
        json!({"op":"frobnicate"}),
    ];
    for case in cases {
        let reply = serve.ctl(&case);
        assert_eq!(reply["ok"], json!(false), "{case} was accepted: {reply}");
        assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert_eq!(
        footprint(serve.pid()),
        before,
        "a refused connect left something behind"
    );
    // A request that never ends: answered once it passes the limit, and dropped; serve
    // neither waits for its end nor keeps it.
    let mut endless = UnixStream::connect(&serve.control).unwrap();
    endless
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let junk = vec![b'x'; 256 * 1024];
    // serve stops reading at its limit: the rest of the write may find the socket closed.
    let _ = endless.write_all(&junk);
    let mut replies = BufReader::new(&endless);
    let mut reply = String::new();
    replies.read_line(&mut reply).unwrap();
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["ok"], json!(false), "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("longer than"),
        "{reply}"
    );
    // Closed: an end of file, or a reset where serve left unread bytes behind.
    let mut rest = Vec::new();
    match replies.read_to_end(&mut rest) {
        Ok(n) => assert_eq!(n, 0, "more after the refusal: {rest:?}"),
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
    }
    assert_eq!(serve.ctl(&json!({"op": "info"}))["ok"], json!(true));
    drop(fe);
}
