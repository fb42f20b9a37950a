//! The datapath end to end on xensim: `ferrotap serve` on raw, VHD, qcow2 and chains, driven
//! by the Rust simulated blkfront (its own process) with verified random workloads, across
//! ring sizes, queue counts, both protocols, copy and persistent grants, direct and indirect
//! requests, and both engines. Afterwards the image is read back (by qemu-img where it can
//! read the format) and every sector the frontend's model knows must match.

mod common;

use std::path::Path;
use std::process::Command;

use common::host::{ferrotap, SimHost};
use common::run_ok;
use serde_json::{json, Value};

const DISK_MIB: u64 = 64;

fn qemu_img_create(path: &Path, format: &str, backing: Option<(&Path, &str)>) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", format]);
    if let Some((parent, parent_format)) = backing {
        cmd.arg("-b").arg(parent).args(["-F", parent_format]);
    }
    cmd.arg(path).arg(format!("{DISK_MIB}M"));
    run_ok(&mut cmd);
}

/// A raw file with a recognisable pattern, so reads through a chain show the base.
fn patterned_raw(path: &Path) {
    let mut data = vec![0u8; (DISK_MIB << 20) as usize];
    for (i, chunk) in data.chunks_mut(512).enumerate() {
        chunk[..8].copy_from_slice(&(i as u64 ^ 0xfeed_0000).to_le_bytes());
    }
    std::fs::write(path, data).unwrap();
}

/// The guest's view of `image` as raw bytes: qemu-img where it reads the format, else
/// ferrotap's image layer (differencing VHD chains).
fn guest_bytes(image: &Path, qemu_can_read: bool) -> Vec<u8> {
    let out = image.with_extension("flat");
    if qemu_can_read {
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(image)
                .arg(&out),
        );
    } else {
        run_ok(
            ferrotap()
                .args(["img", "convert", "-O", "raw"])
                .arg(image)
                .arg(&out),
        );
    }
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// Every sector run the frontend's model knows must read the same from the image.
fn check_model(image: &Path, model: &Path, qemu_can_read: bool) -> u64 {
    let disk = guest_bytes(image, qemu_can_read);
    let model_bytes = std::fs::read(model).unwrap();
    let known: Vec<(u64, u64)> =
        serde_json::from_slice(&std::fs::read(model.with_extension("known")).unwrap()).unwrap();
    assert!(
        !known.is_empty(),
        "the model knows nothing: the test proves nothing"
    );
    let mut checked = 0;
    for (sector, count) in known {
        let start = (sector * 512) as usize;
        let end = ((sector + count) * 512) as usize;
        assert_eq!(
            &disk[start..end],
            &model_bytes[start..end],
            "sectors {sector}+{count} differ between the image and the frontend's model"
        );
        checked += count;
    }
    checked
}

struct Case<'a> {
    serve: &'a [&'a str],
    front: &'a [&'a str],
}

/// Serve `image`, run a verified workload per case, disconnecting between cases, then
/// check the image against the last model.
fn run_cases(image: &Path, qemu_can_read: bool, cases: &[Case]) {
    let host = SimHost::new();
    let model = host.path().join("model.raw");
    for (n, case) in cases.iter().enumerate() {
        let serve = host.serve("vbd", image, case.serve);
        let seed = format!("{}", 7 + n);
        let mut args = vec!["--workload", "verify", "--ops", "1500", "--seed", &seed];
        let model_arg = model.to_str().unwrap().to_string();
        args.extend_from_slice(&["--model-out", &model_arg]);
        args.extend_from_slice(case.front);
        let report = host.blkfront_ok(&serve, &args);
        assert_eq!(report["errors"], json!(0), "{report}");
        assert!(report["ops"].as_u64().unwrap() >= 1500, "{report}");
        assert!(report["verified_bytes"].as_u64().unwrap() > 0, "{report}");
        let stats = serve.ctl(&json!({"op": "stats"}));
        assert_eq!(stats["ok"], json!(true));
        let info = serve.ctl(&json!({"op": "info"}));
        assert!(info.get("error").is_none(), "{info}");
        serve.close();
        let checked = check_model(image, &model, qemu_can_read);
        assert!(checked > 0);
    }
}

#[test]
fn raw_copy_and_persistent_both_protocols_both_engines() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = dir.path().join("disk.raw");
    patterned_raw(&image);
    run_cases(
        &image,
        true,
        &[
            Case {
                serve: &["--engine", "uring"],
                front: &["--indirect-segments", "0"],
            },
            Case {
                serve: &["--engine", "aio"],
                front: &["--persistent", "--protocol", "x86_32-abi"],
            },
            Case {
                serve: &["--engine", "uring"],
                front: &["--ring-page-order", "2", "--queues", "2", "--persistent"],
            },
            // The frontend's hybrid wait (spinning for a lone request's response) against
            // a serve that polls too (the default window) and one that never polls; and
            // with requests in flight (it spins then too when each side's queue has a
            // core) against a polling serve, whose window mutes request notifications.
            Case {
                serve: &["--engine", "uring"],
                front: &["--iodepth", "1", "--poll-us", "200", "--persistent"],
            },
            Case {
                serve: &["--engine", "aio"],
                front: &["--iodepth", "8", "--poll-us", "200"],
            },
            Case {
                serve: &["--engine", "aio", "--poll-us", "0"],
                front: &["--iodepth", "1", "--poll-us", "200"],
            },
            Case {
                serve: &["--engine", "aio", "--buffered"],
                front: &[
                    "--ring-page-order",
                    "4",
                    "--queues",
                    "4",
                    "--protocol",
                    "x86_32-abi",
                ],
            },
        ],
    );
}

/// A qcow2 in `top_dir` over a patterned raw backing in `base_dir`, served case by case:
/// the backing must not change, and qemu-img must find the qcow2 clean.
fn qcow2_over_raw_cases(base_dir: &Path, top_dir: &Path, cases: &[Case]) {
    let base = base_dir.join("base.raw");
    patterned_raw(&base);
    let top = top_dir.join("top.qcow2");
    qemu_img_create(&top, "qcow2", Some((&base, "raw")));
    let before = std::fs::read(&base).unwrap();
    run_cases(&top, true, cases);
    assert_eq!(
        before,
        std::fs::read(&base).unwrap(),
        "the backing file changed"
    );
    run_ok(Command::new("qemu-img").arg("check").arg(&top));
}

#[test]
fn qcow2_over_raw_backing() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    qcow2_over_raw_cases(
        dir.path(),
        dir.path(),
        &[
            Case {
                serve: &["--engine", "uring"],
                front: &["--queues", "2", "--ring-page-order", "1"],
            },
            Case {
                serve: &["--engine", "aio"],
                front: &["--persistent", "--protocol", "x86_32-abi", "--queues", "3"],
            },
        ],
    );
}

/// Images in memory: native AIO (what `auto` picks there) reads, writes and syncs files on
/// tmpfs at once instead of through its context. Verified workloads on a raw image in
/// /dev/shm, then on a qcow2 in /dev/shm over a raw backing on a disk, where the top's
/// I/O is done at once and the backing's goes through the engine; both engines.
#[test]
fn images_in_memory() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let raw = shm.path().join("disk.raw");
    patterned_raw(&raw);
    run_cases(
        &raw,
        true,
        &[
            Case {
                serve: &[],
                front: &["--persistent", "--queues", "2"],
            },
            Case {
                serve: &["--engine", "aio"],
                front: &["--protocol", "x86_32-abi"],
            },
            Case {
                serve: &["--engine", "uring"],
                front: &["--persistent"],
            },
        ],
    );

    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    qcow2_over_raw_cases(
        disk.path(),
        shm.path(),
        &[
            Case {
                serve: &["--engine", "aio"],
                front: &["--persistent", "--queues", "2"],
            },
            Case {
                serve: &["--engine", "uring"],
                front: &[],
            },
        ],
    );
}

#[test]
fn vhd_dynamic_and_differencing_chain() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let base = dir.path().join("base.vhd");
    run_ok(
        ferrotap()
            .args(["img", "create", "-f", "vpc"])
            .arg(&base)
            .arg(format!("{DISK_MIB}M")),
    );
    run_cases(
        &base,
        true,
        &[Case {
            serve: &["--engine", "uring"],
            front: &["--queues", "2", "--persistent"],
        }],
    );
    let child = dir.path().join("child.vhd");
    run_ok(
        ferrotap()
            .args(["img", "create", "-f", "vpc", "-F", "vpc", "-b"])
            .arg(&base)
            .arg(&child),
    );
    let base_before = std::fs::read(&base).unwrap();
    run_cases(
        &child,
        false,
        &[Case {
            serve: &["--engine", "aio"],
            front: &["--ring-page-order", "3", "--protocol", "x86_32-abi"],
        }],
    );
    assert_eq!(
        base_before,
        std::fs::read(&base).unwrap(),
        "the parent changed"
    );
    run_ok(ferrotap().args(["img", "check"]).arg(&child));
}

/// A frontend that reuses its persistent grants has its indirect requests (up to 256
/// segments) served on its own mapped pages, with vectored I/O, instead of through grant
/// copy: the queue keeps more pages mapped than direct requests alone could reach (a
/// one-page ring's 32 x 11), and the data, scattered over those pages at random offsets,
/// verifies. On a disk file (O_DIRECT) and a qcow2 in memory over a raw backing on a disk
/// (cluster boundaries splitting the scattered pieces, reads from the backing, allocating
/// writes through the worker), both engines. Their indirect pages are kept mapped too: with
/// every grant under the bound, serve makes no grant copy at all (`grant_copies`), eight
/// 1 MiB requests in flight included.
#[test]
fn indirect_requests_on_persistent_pages() {
    const DIRECT_BOUND: u64 = 32 * 11;
    let disk = tempfile::tempdir_in("/var/tmp").unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let raw = disk.path().join("disk.raw");
    patterned_raw(&raw);
    let top = shm.path().join("top.qcow2");
    qemu_img_create(&top, "qcow2", Some((&raw, "raw")));
    let host = SimHost::new();
    let model = host.path().join("model.raw");
    let model_arg = model.to_str().unwrap();
    for (image, engine, seed) in [
        (&raw, "uring", "21"),
        (&raw, "aio", "22"),
        (&top, "uring", "23"),
        (&top, "aio", "24"),
    ] {
        let serve = host.serve("vbd", image, &["--engine", engine]);
        let report = host.blkfront_ok(
            &serve,
            &[
                "--workload",
                "verify",
                "--ops",
                "1500",
                "--seed",
                seed,
                "--persistent",
                "--ring-page-order",
                "0",
                "--model-out",
                model_arg,
            ],
        );
        assert_eq!(report["errors"], json!(0), "{report}");
        let stats = serve.ctl(&json!({"op": "stats"}));
        let kept = stats["totals"]["persistent_grants"].as_u64().unwrap();
        assert!(
            kept > DIRECT_BOUND,
            "{engine} {}: {kept} pages kept mapped: indirect requests were not served on \
             persistent pages ({stats})",
            image.display()
        );
        serve.close();
        assert!(check_model(image, &model, true) > 0);
    }
    // A frontend whose grants all fit under the bound (Linux blkfront's default of 32
    // indirect segments: 32 x 33 pages) has no grant copied, indirect pages included; the
    // same workload without feature-persistent has them all copied.
    for persistent in [true, false] {
        let serve = host.serve("vbd", &raw, &[]);
        let mut args = vec![
            "--workload",
            "verify",
            "--ops",
            "600",
            "--seed",
            "25",
            "--indirect-segments",
            "32",
            "--model-out",
            model_arg,
        ];
        if persistent {
            args.push("--persistent");
        }
        let report = host.blkfront_ok(&serve, &args);
        assert_eq!(report["errors"], json!(0), "{report}");
        let stats = serve.ctl(&json!({"op": "stats"}));
        let copies = stats["totals"]["grant_copies"].as_u64().unwrap();
        let reads_writes = ["reads", "writes"]
            .iter()
            .map(|key| stats["totals"][key].as_u64().unwrap())
            .sum::<u64>();
        if persistent {
            assert_eq!(copies, 0, "grant copies with persistent grants: {stats}");
        } else {
            assert!(copies >= reads_writes, "{copies} grant copies: {stats}");
        }
        serve.close();
        assert!(check_model(&raw, &model, true) > 0);
    }
    // Eight 1 MiB requests in flight (256 segments and one indirect page each) fit under
    // the bound too: none of their pages is grant-copied.
    let serve = host.serve("vbd", &raw, &[]);
    let report = host.blkfront_ok(
        &serve,
        &[
            "--workload",
            "seqread",
            "--block-size",
            "1048576",
            "--iodepth",
            "8",
            "--ops",
            "200",
            "--persistent",
        ],
    );
    assert_eq!(report["errors"], json!(0), "{report}");
    let stats = serve.ctl(&json!({"op": "stats"}));
    assert_eq!(stats["totals"]["reads"], json!(200), "{stats}");
    assert_eq!(
        stats["totals"]["grant_copies"],
        json!(0),
        "grant copies with 1 MiB requests at QD8: {stats}"
    );
    serve.close();
}

#[test]
fn read_only_image_serves_reads_and_refuses_writes() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = dir.path().join("disk.raw");
    patterned_raw(&image);
    let host = SimHost::new();
    let serve = host.serve("ro", &image, &["--read-only"]);
    let info: Value = serve.ctl(&json!({"op": "info"}));
    assert_eq!(info["read_only"], json!(true));
    assert_eq!(info["features"]["discard"], json!(false));
    let report = host.blkfront_ok(
        &serve,
        &["--workload", "randread", "--ops", "500", "--iodepth", "8"],
    );
    assert_eq!(report["errors"], json!(0));
    // A writing workload gets error responses, which the blkfront reports as failure.
    let out = host.blkfront(&serve, &["--workload", "randwrite", "--ops", "50"]);
    assert!(
        !out.status.success(),
        "writes to a read-only disk succeeded"
    );
    serve.close();
}

/// Two queues write single neighbouring sectors of the same 4 KiB blocks at the same time.
/// With O_DIRECT each such write is a read-modify-write of the whole block; without
/// serializing them across queues one undoes the other.
#[test]
fn neighbouring_sector_writes_on_two_queues_both_land() {
    use common::blkif::direct;
    use ferrotap::blkif::{op, status, Segment};
    use ferrotap::xensim::blkfront::{Blkfront, FrontConfig};

    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 8 << 20]).unwrap();
    let host = SimHost::new();
    let serve = host.serve("vbd", &image, &[]);
    let mut config = FrontConfig::new(host.path().to_path_buf(), serve.control.clone());
    config.queues = 2;
    let mut fe = Blkfront::connect(&config).unwrap();
    const BATCH: u64 = 16;
    // One granted page per (queue, request in the batch); sector 0 of it holds the data.
    let mut pages = Vec::new();
    for _ in 0..2 * BATCH {
        let mut frame = fe.memory().alloc().unwrap();
        let gref = fe.grants().alloc_ref().unwrap();
        fe.grants().grant(gref, frame.gfn(), true).unwrap();
        frame.fill(0);
        pages.push((gref, frame));
    }
    let pattern = |block: u64, queue: u64| {
        let mut data = [0u8; 512];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (block as u8) ^ (queue as u8 * 0x55) ^ (i as u8);
        }
        data[..8].copy_from_slice(&(block * 8 + queue).to_le_bytes());
        data
    };
    let blocks = 256u64;
    for batch in 0..blocks / BATCH {
        for queue in 0..2u64 {
            for i in 0..BATCH {
                let block = batch * BATCH + i;
                let (gref, frame) = &mut pages[(queue * BATCH + i) as usize];
                frame.write(0, &pattern(block, queue));
                let first_sector = Segment {
                    gref: *gref,
                    first_sect: 0,
                    last_sect: 0,
                };
                let request = direct(
                    op::WRITE,
                    block * 2 + queue,
                    block * 8 + queue,
                    &[first_sector],
                );
                fe.queue_mut(queue as usize).put_raw(&request).unwrap();
            }
        }
        fe.queue_mut(0).push().unwrap();
        fe.queue_mut(1).push().unwrap();
        for queue in 0..2 {
            for _ in 0..BATCH {
                let response = fe
                    .queue_mut(queue)
                    .wait_raw_response(std::time::Duration::from_secs(10))
                    .unwrap();
                assert_eq!(response.status, status::OKAY);
            }
        }
    }
    drop(fe);
    serve.close();
    let disk = std::fs::read(&image).unwrap();
    for block in 0..blocks {
        for queue in 0..2 {
            let sector = (block * 8 + queue) as usize;
            assert_eq!(
                &disk[sector * 512..(sector + 1) * 512],
                &pattern(block, queue)[..],
                "sector {sector} lost its write"
            );
        }
    }
}

/// `--engine auto` (the default) takes native AIO for an image on tmpfs, where it does the
/// request inline instead of handing it to an io_uring worker thread, and io_uring for an
/// image on a disk; both can be forced.
#[test]
fn auto_engine_follows_the_backing() {
    let host = SimHost::new();
    let on_tmpfs = host.path().join("tmpfs.raw");
    std::fs::write(&on_tmpfs, vec![0u8; 1 << 20]).unwrap();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let on_disk = dir.path().join("disk.raw");
    std::fs::write(&on_disk, vec![0u8; 1 << 20]).unwrap();
    for (image, extra, engine) in [
        (&on_tmpfs, &[][..], "aio"),
        (&on_disk, &[][..], "uring"),
        (&on_tmpfs, &["--engine", "uring"][..], "uring"),
        (&on_disk, &["--engine", "aio"][..], "aio"),
    ] {
        let serve = host.serve("e", image, extra);
        let info = serve.ctl(&json!({"op": "info"}));
        assert_eq!(
            info["engine"],
            json!(engine),
            "{} {extra:?}",
            image.display()
        );
        serve.close();
    }
}

/// Images made by qemu and served by a fresh `ferrotap serve`: none of their VHD bitmaps or
/// qcow2 L2 tables is in memory yet. A queue thread never reads metadata itself; it hands
/// a piece whose mapping misses to its worker. A full ring of reads and then of writes, at
/// both depths of a chain, must still read back qemu's bytes and land where qemu finds
/// them; the misses are counted, and once the metadata is in, the same blocks miss no more.
#[test]
fn metadata_misses_go_to_the_worker_and_keep_the_data_right() {
    use ferrotap::blkif::op;
    use ferrotap::image::{ImageFile, OpenMode};

    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let raw = dir.path().join("base.raw");
    patterned_raw(&raw);
    let vhd = dir.path().join("disk.vhd");
    let qcow2 = dir.path().join("disk.qcow2");
    for (image, format, opts) in [
        (&vhd, "vpc", "subformat=dynamic"),
        (&qcow2, "qcow2", "cluster_size=65536"),
    ] {
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-O", format, "-o", opts])
                .arg(&raw)
                .arg(image),
        );
    }
    // A qcow2 child over the VHD, holding one stretch of its own data: reads elsewhere
    // miss in the child's L2 table and then in the parent's bitmaps.
    let child = dir.path().join("child.qcow2");
    qemu_img_create(&child, "qcow2", Some((&vhd, "vpc")));
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 8M 1M"])
            .arg(&child),
    );

    let host = SimHost::new();
    for (image, format) in [(&vhd, "vpc"), (&qcow2, "qcow2"), (&child, "qcow2")] {
        let expected = guest_bytes(image, true);
        let serve = host.serve("vbd", image, &[]);
        let mut ring = FullRing::connect(&host, &serve);
        for round in 0..2 {
            ring.round_trip(op::READ, round);
            for i in 0..RING_DEPTH {
                let at = FullRing::page_of(round, i) * PAGE;
                assert!(
                    ring.page(i) == expected[at..at + PAGE],
                    "{}: read at {at} differs from qemu's bytes",
                    image.display()
                );
            }
        }
        let cold = serve_stat(&serve, "metadata_misses");
        assert!(
            cold > 0,
            "{}: a fresh serve missed nothing",
            image.display()
        );
        // qemu puts a VHD block's data one sector after its bitmap, so 4 KiB reads of it
        // are 512-byte aligned in the file: read in place where the file system allows
        // that for O_DIRECT (it says so through statx), else through a bounce buffer.
        let direct = OpenMode {
            read_only: true,
            direct: true,
        };
        let vhd_align = ImageFile::open(&vhd, direct).unwrap().direct_align();
        let unaligned = serve_stat(&serve, "unaligned_pieces");
        if image == &qcow2 || vhd_align == 512 {
            assert_eq!(unaligned, 0, "{}: bounced", image.display());
        } else {
            assert!(unaligned > 0, "{}: {vhd_align}", image.display());
        }
        ring.round_trip(op::READ, 1);
        assert_eq!(
            serve_stat(&serve, "metadata_misses"),
            cold,
            "{}: blocks already read missed again",
            image.display()
        );
        drop(ring);
        serve.close();

        // Writes on a fresh serve: the mapping misses, the worker writes.
        let serve = host.serve("vbd", image, &[]);
        let mut ring = FullRing::connect(&host, &serve);
        let mut want = expected;
        for i in 0..RING_DEPTH {
            let fill = 0xc0 ^ i as u8;
            ring.fill_page(i, fill);
            let at = FullRing::page_of(2, i) * PAGE;
            want[at..at + PAGE].fill(fill);
        }
        ring.round_trip(op::WRITE, 2);
        assert!(
            serve_stat(&serve, "metadata_misses") > 0,
            "{}: writes on a fresh serve missed nothing",
            image.display()
        );
        drop(ring);
        serve.close();
        assert!(
            guest_bytes(image, true) == want,
            "{}: the writes did not land",
            image.display()
        );
        if format == "qcow2" {
            run_ok(Command::new("qemu-img").args(["check"]).arg(image));
        } else {
            run_ok(ferrotap().args(["img", "check"]).arg(image));
        }
    }
}

const RING_DEPTH: usize = 32;
const PAGE: usize = 4096;

fn serve_stat(serve: &common::host::Serve, name: &str) -> u64 {
    let stats = serve.ctl(&json!({"op": "stats"}));
    stats["totals"][name].as_u64().unwrap()
}

/// A one-page ring's worth of one-page requests, each with its own granted page, put on
/// the ring together so the backend takes them as one batch.
struct FullRing {
    // Frames before the front: the guest's memory goes with the front.
    pages: Vec<(u32, ferrotap::xensim::guest::Frame)>,
    fe: ferrotap::xensim::blkfront::Blkfront,
}

impl FullRing {
    fn connect(host: &SimHost, serve: &common::host::Serve) -> FullRing {
        use ferrotap::xensim::blkfront::{Blkfront, FrontConfig};
        let config = FrontConfig::new(host.path().to_path_buf(), serve.control.clone());
        let fe = Blkfront::connect(&config).unwrap();
        let pages = (0..RING_DEPTH)
            .map(|_| {
                let frame = fe.memory().alloc().unwrap();
                let gref = fe.grants().alloc_ref().unwrap();
                fe.grants().grant(gref, frame.gfn(), false).unwrap();
                (gref, frame)
            })
            .collect();
        FullRing { pages, fe }
    }

    /// Request `i` of round `round` covers this page of the disk: one per 2 MiB (a VHD
    /// block each, spread over the qcow2 clusters), moved on by 16 pages a round.
    fn page_of(round: usize, i: usize) -> usize {
        i * ((DISK_MIB as usize) << 20) / RING_DEPTH / PAGE + round * 16
    }

    fn page(&self, i: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; PAGE];
        self.pages[i].1.read(0, &mut bytes);
        bytes
    }

    fn fill_page(&mut self, i: usize, byte: u8) {
        self.pages[i].1.fill(byte);
    }

    fn round_trip(&mut self, operation: u8, round: usize) {
        use common::blkif::{direct, whole_page, WAIT};
        let queue = self.fe.queue_mut(0);
        for (i, (gref, _)) in self.pages.iter().enumerate() {
            let sector = (Self::page_of(round, i) * PAGE / 512) as u64;
            let request = direct(operation, i as u64, sector, &[whole_page(*gref)]);
            queue.put_raw(&request).unwrap();
        }
        queue.push().unwrap();
        for _ in 0..RING_DEPTH {
            let response = queue.wait_raw_response(WAIT).unwrap();
            assert_eq!(response.status, ferrotap::blkif::status::OKAY);
        }
    }
}

/// A CPU list as the kernel prints it (`0-3,6`).
fn parse_cpu_list(text: &str) -> Vec<usize> {
    text.trim()
        .split(',')
        .flat_map(|entry| match entry.split_once('-') {
            Some((first, last)) => {
                (first.parse::<usize>().unwrap()..=last.parse::<usize>().unwrap()).collect()
            }
            None => vec![entry.parse::<usize>().unwrap()],
        })
        .collect()
}

/// `Cpus_allowed_list` of /proc/`pid`/task/`tid`/status (or of the process, `tid` = pid).
fn allowed_cpus(pid: u32, tid: &str) -> Vec<usize> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .unwrap();
    parse_cpu_list(line)
}

/// `--queue-cpus` puts each queue thread, and the worker it starts, on its entry's CPUs
/// (queue i on entry i modulo their number), the queues serve as before, and the rest of
/// the process keeps every CPU. A CPU the process may not run on is refused at start.
#[test]
fn queue_cpus_place_each_queue_and_its_worker() {
    use common::blkif::{ask, direct, granted_frame, whole_page};
    use ferrotap::blkif::{op, status};
    use ferrotap::xensim::blkfront::{Blkfront, FrontConfig};

    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = dir.path().join("disk.raw");
    patterned_raw(&image);
    let mine = allowed_cpus(std::process::id(), &std::process::id().to_string());
    let (first, last) = (mine[0], mine[mine.len() - 1]);
    let host = SimHost::new();
    // Two entries for three queues: queue 2 wraps to the first entry.
    let spec = format!("{last},{first}");
    let serve = host.serve("vbd", &image, &["--queue-cpus", &spec]);
    let mut config = FrontConfig::new(host.path().to_path_buf(), serve.control.clone());
    config.queues = 3;
    let mut fe = Blkfront::connect(&config).unwrap();
    for queue in 0..3 {
        let sector = 8 * queue as u64 + 1;
        let (gref, gfn) = granted_frame(&fe, false);
        let response = ask(
            &mut fe,
            queue,
            &direct(op::READ, queue as u64, sector, &[whole_page(gref)]),
        );
        assert_eq!(response.status, status::OKAY, "read on queue {queue}");
        let memory = std::fs::read(fe.memory().path()).unwrap();
        let at = gfn as usize * 4096;
        let word = u64::from_le_bytes(memory[at..at + 8].try_into().unwrap());
        assert_eq!(
            word,
            sector ^ 0xfeed_0000,
            "queue {queue} read the wrong sector"
        );
    }
    let expected = |queue: usize| {
        if queue.is_multiple_of(2) {
            vec![last]
        } else {
            vec![first]
        }
    };
    let pid = serve.pid();
    let mut placed = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = task.unwrap().file_name().into_string().unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        let comm = comm.trim().to_string();
        let cpus = allowed_cpus(pid, &tid);
        // Queue threads are ferrotap-qN, their workers ferrotap-wN.M.
        let queue = comm
            .strip_prefix("ferrotap-q")
            .or_else(|| comm.strip_prefix("ferrotap-w"))
            .and_then(|rest| rest.split('.').next())
            .and_then(|index| index.parse::<usize>().ok());
        match queue {
            Some(queue) => {
                assert_eq!(cpus, expected(queue), "{comm}");
                placed.push(comm);
            }
            None => assert_eq!(cpus, mine, "{comm} should keep every CPU"),
        }
    }
    placed.sort();
    assert_eq!(
        placed,
        [
            "ferrotap-q0",
            "ferrotap-q1",
            "ferrotap-q2",
            "ferrotap-w0.0",
            "ferrotap-w1.0",
            "ferrotap-w2.0"
        ],
        "the queue threads and their workers"
    );
    drop(fe);
    serve.close();

    // A CPU outside the process's set: serve names it and exits before listening.
    let outside = (0..1024).find(|cpu| !mine.contains(cpu)).unwrap();
    let out = ferrotap()
        .args(["serve", "--xensim"])
        .arg(host.path())
        .arg("--control")
        .arg(host.path().join("refused.ctl"))
        .arg("--image")
        .arg(&image)
        .args(["--queue-cpus", &format!("{first},{outside}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "--queue-cpus: CPU {outside} is not one serve may run on"
        )),
        "{stderr}"
    );
    assert!(!host.path().join("refused.ctl").exists());
}
