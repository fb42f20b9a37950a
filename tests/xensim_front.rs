//! The Rust simulated blkfront (`ferrotap::xensim`, `ferrotap xensim blkfront`).
//!
//! Guest side alone: grant entries and event channels are checked byte by byte in the files
//! and sockets xensim specifies, and through the backend half written independently from the
//! same contract (`ferrotap::xen::sim` and `blkif::ring::BackRing`). End to end: a
//! `ferrotap serve` on a raw file, driven by the blkfront process; the file itself is the
//! oracle for what the model says was written, and raw requests through the library API get
//! the statuses blkif.h specifies.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use common::host::SimHost;
use ferrotap::blkif::ring::{BackRing, FrontRing, RING_HEADER_SIZE};
use ferrotap::blkif::{op, status, Protocol, Request, RequestBody, Segment};
use ferrotap::xen::sim::SimPlatform;
use ferrotap::xen::{gntst, GrantFailure, GrantMapping, Platform};
use ferrotap::xensim::blkfront::{Blkfront, FrontConfig, IoOp};
use ferrotap::xensim::guest::{
    FrontEventChannel, GrantTable, GuestMemory, FIRST_FREE_REF, GTF_PERMIT_ACCESS, GTF_READONLY,
    PAGE_SIZE,
};
use ferrotap::xensim::workload::{sector_pattern, Model, SectorState};
use serde_json::Value;

/// A short directory: socket paths must fit in sun_path.
fn sim_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("xf")
        .tempdir_in("/dev/shm")
        .unwrap()
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn mapped(mapping: &dyn GrantMapping) -> Vec<u8> {
    // SAFETY: the mapping is valid for len() bytes while it lives; we copy them out.
    unsafe { std::slice::from_raw_parts(mapping.as_ptr().as_ptr(), mapping.len()) }.to_vec()
}

fn map_status(platform: &SimPlatform, domid: u16, refs: &[u32], writable: bool) -> i16 {
    let mut access = platform.grant_access(domid, 64).unwrap();
    match access.map(refs, writable) {
        Ok(_) => gntst::OKAY,
        Err(err) => GrantFailure::of(&err).unwrap().status,
    }
}

#[test]
fn grant_entries_land_at_their_offsets_with_their_flags() {
    let dir = sim_dir();
    // A leftover of a guest that is gone is replaced; a live guest's files are not.
    std::fs::write(dir.path().join("dom3.mem"), b"stale").unwrap();
    let memory = GuestMemory::create(dir.path(), 3, 64).unwrap();
    let table = GrantTable::create(dir.path(), 3, 1024).unwrap();
    assert_eq!(std::fs::metadata(memory.path()).unwrap().len(), 0);
    let err = GuestMemory::create(dir.path(), 3, 64).err().unwrap();
    assert!(err.to_string().contains("running guest"), "{err}");
    assert!(GrantTable::create(dir.path(), 3, 64).is_err());
    assert!(dir.path().join("dom3.mem").exists() && dir.path().join("dom3.gnttab").exists());
    let mut frames = memory.alloc_many(3).unwrap();
    assert_eq!(
        frames.iter().map(|f| f.gfn()).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(
        std::fs::metadata(memory.path()).unwrap().len(),
        3 * PAGE_SIZE as u64
    );
    frames[2].fill(0x42);
    frames[1].write(100, b"hello");

    let rw = table.alloc_ref().unwrap();
    let ro = table.alloc_ref().unwrap();
    assert_eq!((rw, ro), (FIRST_FREE_REF, FIRST_FREE_REF + 1));
    table.grant(rw, frames[2].gfn(), false).unwrap();
    table.grant(ro, frames[1].gfn(), true).unwrap();

    // The file, read as a stranger would: grant_entry_v1_t at ref * 8.
    let bytes = std::fs::read(table.path()).unwrap();
    assert_eq!(bytes.len() % 8, 0);
    assert!(bytes.len() >= (ro as usize + 1) * 8);
    let entry = |gref: u32| {
        let at = gref as usize * 8;
        (le16(&bytes, at), le16(&bytes, at + 2), le32(&bytes, at + 4))
    };
    assert_eq!(entry(rw), (GTF_PERMIT_ACCESS, 0, 2));
    assert_eq!(entry(ro), (GTF_PERMIT_ACCESS | GTF_READONLY, 0, 1));
    for reserved in 0..FIRST_FREE_REF {
        assert_eq!(entry(reserved), (0, 0, 0), "reserved ref {reserved}");
    }

    // The backend half (xen::sim) sees the frames through them, and honours read-only.
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut access = platform.grant_access(3, 64).unwrap();
    let mapping = access.map(&[rw, ro], false).unwrap();
    let seen = mapped(&*mapping);
    assert!(seen[..PAGE_SIZE].iter().all(|&b| b == 0x42));
    assert_eq!(&seen[PAGE_SIZE + 100..PAGE_SIZE + 105], b"hello");
    drop(mapping);
    assert_eq!(
        map_status(&platform, 3, &[ro], true),
        gntst::PERMISSION_DENIED
    );
    assert_eq!(map_status(&platform, 3, &[rw], true), gntst::OKAY);

    // Revoking clears the flags only; the backend is refused from then on.
    table.revoke(rw).unwrap();
    let bytes = std::fs::read(table.path()).unwrap();
    let at = rw as usize * 8;
    assert_eq!(
        (le16(&bytes, at), le16(&bytes, at + 2), le32(&bytes, at + 4)),
        (0, 0, 2)
    );
    assert_eq!(
        map_status(&platform, 3, &[rw], false),
        gntst::PERMISSION_DENIED
    );

    // A grant to another domain is no grant to the backend; a frame past the memory is a
    // bad page, a ref past the table a bad ref.
    table.grant_to(rw, 5, frames[2].gfn(), false).unwrap();
    assert_eq!(
        map_status(&platform, 3, &[rw], false),
        gntst::PERMISSION_DENIED
    );
    table.grant(rw, 60, false).unwrap();
    assert_eq!(map_status(&platform, 3, &[rw], false), gntst::BAD_PAGE);
    memory.grow_to(61).unwrap();
    assert_eq!(map_status(&platform, 3, &[rw], false), gntst::OKAY);
    assert_eq!(
        map_status(&platform, 3, &[table.len() + 1], false),
        gntst::BAD_GNTREF
    );

    // A ref far up grows the table file to hold it.
    table.grant(1000, 0, true).unwrap();
    assert!(std::fs::metadata(table.path()).unwrap().len() >= 1001 * 8);
    assert!(table.grant(table.capacity(), 0, true).is_err());

    // The guest's files go with it.
    drop(frames);
    drop(memory);
    drop(table);
    assert!(!dir.path().join("dom3.mem").exists() && !dir.path().join("dom3.gnttab").exists());
}

#[test]
fn event_channel_ports_and_notifications_both_ways() {
    let dir = sim_dir();
    let first = FrontEventChannel::bind(dir.path(), 2).unwrap();
    assert_eq!(first.port(), 1);
    assert!(dir.path().join("evtchn.2.1.front").exists());
    // A port taken by someone else (EADDRINUSE) is skipped.
    let _squatter = UnixDatagram::bind(dir.path().join("evtchn.2.2.front")).unwrap();
    let second = FrontEventChannel::bind(dir.path(), 2).unwrap();
    assert_eq!(second.port(), 3);
    // Another domain has its own ports.
    assert_eq!(FrontEventChannel::bind(dir.path(), 4).unwrap().port(), 1);

    // Nobody bound at the back yet: a notification is lost, not an error.
    first.notify().unwrap();

    // A hand-bound .back socket gets the 4-byte little-endian port.
    let back = UnixDatagram::bind(dir.path().join("evtchn.2.3.back")).unwrap();
    second.notify().unwrap();
    let mut buf = [0u8; 16];
    let n = back.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &3u32.to_le_bytes());
    // Many notifications with none consumed: the sender never blocks nor fails.
    for _ in 0..1000 {
        second.notify().unwrap();
    }

    // The back end kicks us: wait wakes and drains; then nothing is pending.
    assert!(!second.wait(Duration::from_millis(10)).unwrap());
    for _ in 0..3 {
        back.send_to(&3u32.to_le_bytes(), second.path()).unwrap();
    }
    assert!(second.wait(Duration::from_secs(5)).unwrap());
    assert!(!second.drain().unwrap());

    // The backend half (xen::sim) binds interdomain to our port and talks both ways.
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut channel = platform.bind_interdomain(2, first.port()).unwrap();
    assert_eq!(channel.local_port(), 1);
    first.notify().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !channel.drain().unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "backend never notified"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    channel.notify().unwrap();
    assert!(first.wait(Duration::from_secs(5)).unwrap());

    // Unbinding removes our socket file.
    let path = first.path().to_path_buf();
    drop(first);
    assert!(!path.exists());
}

/// The ring, allocated as the blkfront does (frames reversed, mapped contiguously), seen by
/// the backend through the grant refs in ring order.
fn ring_case(protocol: Protocol, pages: usize) {
    let dir = sim_dir();
    let memory = GuestMemory::create(dir.path(), 1, 64).unwrap();
    let table = GrantTable::create(dir.path(), 1, 64).unwrap();
    let _spacer = memory.alloc().unwrap();
    let mut frames = memory.alloc_many(pages).unwrap();
    frames.reverse();
    let view = memory
        .map_contiguous(&frames.iter().collect::<Vec<_>>())
        .unwrap();
    // SAFETY: the view maps the ring pages for the rest of the test (declared before the ring,
    // so it outlives it).
    let mut ring = unsafe { FrontRing::init(view.as_ptr(), view.len(), protocol) };
    let refs: Vec<u32> = frames
        .iter()
        .map(|frame| {
            let gref = table.alloc_ref().unwrap();
            table.grant(gref, frame.gfn(), false).unwrap();
            gref
        })
        .collect();
    let mut requests = Vec::new();
    for n in 0..ring.size() as u64 {
        let mut segments = [Segment::default(); 11];
        segments[0] = Segment {
            gref: 77,
            first_sect: 1,
            last_sect: 6,
        };
        requests.push(Request {
            operation: op::WRITE,
            id: 0xdead_0000_0000_0000 | n,
            sector: n * 8,
            handle: 0,
            body: RequestBody::Direct {
                nr_segments: 1,
                segments,
            },
        });
    }
    for request in &requests {
        assert!(ring.put_request(request));
    }
    ring.push_requests();

    // The header lies at the start of the first ring page's own frame.
    let mut header = [0u8; RING_HEADER_SIZE];
    frames[0].read(0, &mut header);
    assert_eq!(le32(&header, 0), ring.size(), "req_prod");
    // The last entry, in the last page, is in the last ring frame at its offset.
    let entry = protocol.entry_size();
    let last = RING_HEADER_SIZE + (ring.size() as usize - 1) * entry;
    let mut bytes = vec![0u8; entry];
    frames[last / PAGE_SIZE].read(last % PAGE_SIZE, &mut bytes);
    assert_eq!(
        protocol.decode_request(&bytes),
        requests[requests.len() - 1]
    );

    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut access = platform.grant_access(1, 64).unwrap();
    let mapping = access.map(&refs, true).unwrap();
    // SAFETY: the mapping stays alive until the end of the test.
    let mut back = unsafe { BackRing::new(mapping.as_ptr(), mapping.len(), protocol) };
    assert_eq!(back.size(), ring.size());
    for request in &requests {
        assert_eq!(back.next_request().unwrap().as_ref(), Some(request));
    }
    assert_eq!(back.next_request().unwrap(), None);
}

#[test]
fn ring_on_non_contiguous_frames_is_one_ring_in_ref_order() {
    ring_case(Protocol::X86_64, 1);
    ring_case(Protocol::X86_64, 4);
    ring_case(Protocol::X86_32, 2);
    ring_case(Protocol::X86_32, 16);
}

#[test]
fn model_catches_a_wrong_read() {
    let mut model = Model::new(16);
    let mut data = [0u8; 512];
    // Unknown is learned, then must read the same.
    data.fill(7);
    assert_eq!(model.check(3, &data), Ok(false));
    assert_eq!(model.check(3, &data), Ok(true));
    data[511] = 8;
    assert!(model.check(3, &data).is_err());

    // Written data must be that generation's pattern for that very sector.
    model.set(5, SectorState::Written(9));
    sector_pattern(5, 9, &mut data);
    assert_eq!(model.check(5, &data), Ok(true));
    sector_pattern(5, 8, &mut data);
    let stale = model.check(5, &data).unwrap_err();
    assert!(stale.contains("sector 5 write generation 8"), "{stale}");
    sector_pattern(6, 9, &mut data);
    let misplaced = model.check(5, &data).unwrap_err();
    assert!(
        misplaced.contains("sector 6 write generation 9"),
        "{misplaced}"
    );
    sector_pattern(5, 9, &mut data);
    data[300] ^= 1;
    assert!(model.check(5, &data).is_err());

    // Discarded reads as zeros.
    model.set(9, SectorState::Zero);
    assert_eq!(model.check(9, &[0u8; 512]), Ok(true));
    assert!(model.check(9, &[1u8; 512]).is_err());

    assert_eq!(model.known_runs(), vec![(5, 1), (9, 1)]);
}

/// A raw image with a non-zero background so reads of unwritten sectors are not all zeros.
fn raw_image(dir: &Path, mib: usize) -> std::path::PathBuf {
    let path = dir.join("disk.raw");
    let mut data = vec![0u8; mib << 20];
    for (index, sector) in data.chunks_mut(512).enumerate() {
        sector[..8].copy_from_slice(&(!(index as u64)).to_le_bytes());
        sector[8..16].copy_from_slice(b"original");
    }
    std::fs::write(&path, data).unwrap();
    path
}

#[test]
fn verify_workload_leaves_what_the_model_says_in_the_file() {
    let disk_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = raw_image(disk_dir.path(), 16);
    let host = SimHost::new();
    let model = host.path().join("model.raw");
    let model_arg = model.to_str().unwrap();
    for (seed, front) in [
        ("1", &["--queues", "2", "--ring-page-order", "1"][..]),
        (
            "2",
            &["--persistent", "--protocol", "x86_32-abi", "--iodepth", "4"][..],
        ),
        (
            "3",
            &[
                "--indirect-segments",
                "0",
                "--queues",
                "3",
                "--ring-page-order",
                "3",
            ][..],
        ),
    ] {
        let serve = host.serve("vbd", &image, &[]);
        let mut args = vec!["--ops", "800", "--seed", seed, "--model-out", model_arg];
        args.extend_from_slice(front);
        let report = host.blkfront_ok(&serve, &args);
        for key in ["reads", "writes", "flushes", "discards", "verified_bytes"] {
            assert!(report[key].as_u64().unwrap() > 0, "{key} in {report}");
        }
        assert_eq!(report["ops"].as_u64(), Some(800), "{report}");
        serve.close();

        let disk = std::fs::read(&image).unwrap();
        let expected = std::fs::read(&model).unwrap();
        let known: Vec<(u64, u64)> =
            serde_json::from_slice(&std::fs::read(model.with_extension("known")).unwrap()).unwrap();
        let mut sectors = 0;
        for (sector, count) in known {
            let range = (sector * 512) as usize..((sector + count) * 512) as usize;
            assert!(
                disk[range.clone()] == expected[range],
                "seed {seed}: sectors {sector}+{count} differ from the model"
            );
            sectors += count;
        }
        assert!(
            sectors > 1000,
            "seed {seed}: the model knows only {sectors} sectors"
        );
    }
}

#[test]
fn benchmark_writes_land_at_their_sectors() {
    let disk_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = raw_image(disk_dir.path(), 8);
    let host = SimHost::new();
    let serve = host.serve("vbd", &image, &[]);
    let report = host.blkfront_ok(
        &serve,
        &[
            "--workload",
            "randwrite",
            "--ops",
            "2000",
            "--iodepth",
            "32",
            "--queues",
            "2",
        ],
    );
    assert_eq!(report["writes"].as_u64(), Some(2000), "{report}");
    assert_eq!(report["bytes"].as_u64(), Some(2000 * 4096), "{report}");
    let report = host.blkfront_ok(
        &serve,
        &[
            "--workload",
            "seqwrite",
            "--block-size",
            "262144",
            "--ops",
            "12",
            "--iodepth",
            "4",
            "--region-bytes",
            "4194304",
        ],
    );
    assert_eq!(report["bytes"].as_u64(), Some(12 * 262144), "{report}");
    let report = host.blkfront_ok(
        &serve,
        &[
            "--workload",
            "seqread",
            "--block-size",
            "1048576",
            "--seconds",
            "0.5",
        ],
    );
    assert!(report["reads"].as_u64().unwrap() > 0, "{report}");
    assert!(report["p99_us"].as_f64().unwrap() >= report["p50_us"].as_f64().unwrap());
    serve.close();

    // Every sector is either untouched or stamped with its own number.
    let disk = std::fs::read(&image).unwrap();
    let mut stamped = 0;
    for (index, sector) in disk.chunks(512).enumerate() {
        let first = u64::from_le_bytes(sector[..8].try_into().unwrap());
        if &sector[8..16] == b"original" {
            assert_eq!(first, !(index as u64), "sector {index} damaged");
        } else {
            assert_eq!(
                first, index as u64,
                "sector {index} holds another sector's write"
            );
            stamped += 1;
        }
    }
    // 12 sequential 256 KiB writes cover the first 3 MiB.
    assert!(stamped >= 6144, "{stamped} sectors written");
}

#[test]
fn library_api_sends_raw_requests_and_reads_statuses() {
    let disk_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = raw_image(disk_dir.path(), 4);
    let host = SimHost::new();
    let serve = host.serve("vbd", &image, &[]);
    let mut config = FrontConfig::new(host.path().to_path_buf(), serve.control.clone());
    config.domid = 7;
    config.queues = 2;
    config.iodepth = 4;
    let mut front = Blkfront::connect(&config).unwrap();
    let sectors = front.info().sectors;
    assert_eq!(sectors, 4 << 11);
    let stats: Value = front
        .control_mut()
        .request(&serde_json::json!({"op": "stats"}))
        .unwrap();
    assert_eq!(stats["connected"], Value::Bool(true));

    let queue = front.queue_mut(1);
    // An unknown operation: EOPNOTSUPP with the op and all 64 bits of the id echoed.
    let unknown = Request {
        operation: 42,
        id: 0xfeed_face_dead_beef,
        sector: 0,
        handle: 0,
        body: RequestBody::Direct {
            nr_segments: 0,
            segments: [Segment::default(); 11],
        },
    };
    queue.submit_raw(&unknown).unwrap();
    let response = queue.wait_raw_response(Duration::from_secs(10)).unwrap();
    assert_eq!(
        (response.id, response.operation, response.status),
        (0xfeed_face_dead_beef, 42, status::EOPNOTSUPP)
    );
    assert_eq!(queue.header().req_prod(), 1);
    assert_eq!(queue.header().rsp_prod(), 1);

    // A tracked read past the end of the disk: ERROR for that request.
    let slot = queue.acquire().unwrap();
    queue.slot_mut(slot).push_segment(0, 7);
    queue
        .submit(
            slot,
            IoOp::Read {
                sector: sectors - 4,
            },
        )
        .unwrap();
    queue.wait_responses().unwrap();
    let completion = queue.next_completion().unwrap().unwrap();
    assert_eq!(completion.slot, slot);
    assert_eq!(completion.status, status::ERROR);
    queue.release(slot);

    // A tracked indirect write then read: answered with the indirect_op, data round trips.
    let slot = queue.acquire().unwrap();
    let mut pattern = [0u8; 512];
    for segment in 0..20usize {
        queue.slot_mut(slot).push_segment(0, 7);
        for sector in 0..8 {
            sector_pattern((100 + segment * 8 + sector) as u64, 1, &mut pattern);
            queue
                .slot_mut(slot)
                .frame_mut(segment)
                .write(sector * 512, &pattern);
        }
    }
    queue.submit(slot, IoOp::Write { sector: 100 }).unwrap();
    queue.wait_responses().unwrap();
    let completion = queue.next_completion().unwrap().unwrap();
    assert_eq!(completion.status, status::OKAY);
    queue.release(slot);
    front.disconnect().unwrap();
    drop(front);
    serve.close();

    let disk = std::fs::read(&image).unwrap();
    for sector in 100..260u64 {
        sector_pattern(sector, 1, &mut pattern);
        assert_eq!(
            &disk[sector as usize * 512..][..512],
            &pattern[..],
            "sector {sector}"
        );
    }
}

/// How the fake backend below misbehaves.
#[derive(Clone, Copy)]
enum Fault {
    /// Answers OKAY without moving any data.
    Lazy,
    /// Answers INDIRECT requests with op 6 (Linux blkfront stops on it).
    IndirectOp,
    /// Echoes only the low 32 bits of the id.
    ShortId,
    /// Answers everything with BLKIF_RSP_ERROR.
    Error,
}

/// A backend that speaks serve's control protocol and the ring correctly but lies in its
/// answers: one queue, served by a thread through xen::sim and BackRing.
fn fake_backend(dir: &Path, control: &Path, fault: Fault) -> std::thread::JoinHandle<()> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let listener = UnixListener::bind(control).unwrap();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut writer = stream.try_clone().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = None;
        for line in BufReader::new(stream).lines() {
            let request: Value = serde_json::from_str(&line.unwrap()).unwrap();
            let reply = match request["op"].as_str().unwrap() {
                "info" => serde_json::json!({"ok": true, "sectors": 2048, "sector_size": 512,
                    "physical_sector_size": 4096, "read_only": false, "connected": false,
                    "features": {"flush": true, "barrier": true, "discard": true,
                        "discard_secure": false, "discard_granularity": 4096,
                        "discard_alignment": 0, "persistent": true,
                        "max_indirect_segments": 256, "max_ring_page_order": 4,
                        "max_queues": 1}}),
                "connect" => {
                    let domid = request["domid"].as_u64().unwrap() as u16;
                    let protocol = Protocol::from_xenstore(request["protocol"].as_str()).unwrap();
                    let queue = &request["queues"][0];
                    let refs: Vec<u32> =
                        serde_json::from_value(queue["ring_refs"].clone()).unwrap();
                    let port = queue["event_channel"].as_u64().unwrap() as u32;
                    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                    let dir = dir.clone();
                    let stop = Arc::clone(&stop);
                    server = Some(std::thread::spawn(move || {
                        let platform = SimPlatform::new(dir);
                        let mut access = platform.grant_access(domid, 64).unwrap();
                        let mapping = access.map(&refs, true).unwrap();
                        let mut channel = platform.bind_interdomain(domid, port).unwrap();
                        // SAFETY: the mapping lives until this thread ends, after the ring.
                        let mut ring =
                            unsafe { BackRing::new(mapping.as_ptr(), mapping.len(), protocol) };
                        ready_tx.send(()).unwrap();
                        while !stop.load(Ordering::Relaxed) {
                            while let Some(request) = ring.next_request().unwrap() {
                                let mut response = ferrotap::blkif::Response {
                                    id: request.id,
                                    operation: request.operation,
                                    status: status::OKAY,
                                };
                                if let RequestBody::Indirect { indirect_op, .. } = request.body {
                                    if !matches!(fault, Fault::IndirectOp) {
                                        response.operation = indirect_op;
                                    }
                                }
                                match fault {
                                    Fault::ShortId => response.id &= 0xffff_ffff,
                                    Fault::Error => response.status = status::ERROR,
                                    Fault::Lazy | Fault::IndirectOp => {}
                                }
                                ring.put_response(&response);
                            }
                            if ring.push_responses() {
                                channel.notify().unwrap();
                            }
                            if !ring.final_check_for_requests() {
                                let mut pollfd = libc::pollfd {
                                    fd: channel.fd(),
                                    events: libc::POLLIN,
                                    revents: 0,
                                };
                                // SAFETY: one live pollfd; the fd belongs to `channel`.
                                unsafe { libc::poll(&mut pollfd, 1, 10) };
                                channel.drain().unwrap();
                            }
                        }
                    }));
                    ready_rx.recv().unwrap();
                    serde_json::json!({"ok": true})
                }
                "disconnect" => {
                    stop.store(true, Ordering::Relaxed);
                    if let Some(server) = server.take() {
                        server.join().unwrap();
                    }
                    serde_json::json!({"ok": true})
                }
                other => serde_json::json!({"ok": false, "error": format!("unknown op {other}")}),
            };
            writer.write_all(format!("{reply}\n").as_bytes()).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        if let Some(server) = server.take() {
            server.join().unwrap();
        }
    })
}

#[test]
fn a_lying_backend_fails_the_run_naming_the_request() {
    for (fault, expected) in [
        (Fault::Lazy, "found the frame's canary"),
        (Fault::IndirectOp, "answered with op 6"),
        (Fault::ShortId, "matches no request in flight"),
        (Fault::Error, "status -1"),
    ] {
        let dir = sim_dir();
        let control = dir.path().join("fake.ctl");
        let backend = fake_backend(dir.path(), &control, fault);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotap"))
            .args([
                "xensim", "blkfront", "--json", "--ops", "2000", "--seed", "5",
            ])
            .arg("--dir")
            .arg(dir.path())
            .arg("--control")
            .arg(&control)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{expected}: the run succeeded");
        assert!(stderr.contains(expected), "{expected}: {stderr}");
        assert!(stderr.contains("queue 0"), "{stderr}");
        if !matches!(fault, Fault::ShortId) {
            // The message names the request: its operation, sector and size.
            assert!(
                stderr.contains(" at sector ") && stderr.contains(" sectors)"),
                "{stderr}"
            );
        }
        backend.join().unwrap();
    }
}
