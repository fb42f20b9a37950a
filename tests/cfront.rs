//! The C blkfront (tests/cfront/blkfront.c), written from ../shared/xensim.md and Xen's own
//! io/ring.h and io/blkif.h alone, as the independent check of the xensim contract:
//! - against `ferrotap::xen::sim::SimPlatform` directly (grants and event channels, both
//!   ways, every GNTST failure), and
//! - against `ferrotap serve` end to end: verified random workloads (reads, writes, FUA
//!   writes, flushes, discards; direct and indirect; both protocols; one-page and
//!   multi-page rings; 1, 2 and 4 queues; copy and persistent grants; guest memory growing
//!   after connect; io_uring and AIO) on raw, qcow2, VHD and qcow2 overlays on raw and VHD;
//!   hostile requests and features the backend does not offer answered with the right
//!   status; a ring overflow reported; a read-only disk refusing writes; a guest that
//!   vanishes mid-I/O leaving no mapping, thread or fd behind once the device is torn down;
//!   and afterwards the image, read by `qemu-img convert`, holds what the frontends' models
//!   say.

use std::collections::BTreeMap;
use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ferrotap::xen::sim::SimPlatform;
use ferrotap::xen::{gntst, CopyDirection, CopySegment, GrantFailure, GrantMapping, Platform};

const PAGE: usize = 4096;
const SECTOR: usize = 512;

/// A short directory: socket paths must fit in sun_path (107 bytes).
fn sim_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("xs")
        .tempdir_in("/dev/shm")
        .unwrap()
}

/// The C frontend, compiled with the strict flags into cargo's temporary directory for
/// tests, once per version of its source; a missing gcc or missing Xen headers (libxen-dev)
/// fail the test.
fn blkfront() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cfront");
        let source = dir.join("blkfront.c");
        let mut hasher = DefaultHasher::new();
        for file in ["blkfront.c", "blkif_x86_32.h"] {
            std::fs::read(dir.join(file)).unwrap().hash(&mut hasher);
        }
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let binary = tmp.join(format!("blkfront-{:016x}", hasher.finish()));
        if binary.exists() {
            return binary;
        }
        // Built under a name of its own, then renamed: concurrent test runs never see a
        // half-written binary.
        let building = tmp.join(format!("blkfront.{}", std::process::id()));
        let output = Command::new("gcc")
            .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&building)
            .arg(&source)
            .output()
            .unwrap_or_else(|err| panic!("gcc (needed to build the C frontend): {err}"));
        assert!(
            output.status.success(),
            "gcc failed on {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::rename(&building, &binary).unwrap();
        binary
    })
}

fn run_ok(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("{command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `key=value` pairs of a line, as numbers.
fn fields(line: &str) -> BTreeMap<String, u64> {
    line.split_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The C frontend's memory, grants and event channel against the Rust sim platform

/// The C program's probe pattern: byte `i` of the frame granted as `gref`.
fn probe_pattern(gref: u32, i: usize) -> u8 {
    (gref.wrapping_mul(37) as usize + i * 11 + (i >> 8)) as u8
}

fn probe_page(gref: u32) -> Vec<u8> {
    (0..PAGE).map(|i| probe_pattern(gref, i)).collect()
}

fn map_status(access: &mut dyn ferrotap::xen::GrantAccess, refs: &[u32], writable: bool) -> i16 {
    match access.map(refs, writable) {
        Ok(_) => gntst::OKAY,
        Err(err) => {
            GrantFailure::of(&err)
                .unwrap_or_else(|| panic!("map {refs:?}: no GNTST status in {err}"))
                .status
        }
    }
}

/// A copy segment between `offset` in the page behind `gref` and all of `local`, its
/// status not yet any GNTST value.
fn copy_segment(gref: u32, offset: u16, local: &mut [u8]) -> CopySegment {
    CopySegment {
        gref,
        offset,
        len: u16::try_from(local.len()).unwrap(),
        local: std::ptr::NonNull::new(local.as_mut_ptr()).unwrap(),
        status: 1,
    }
}

fn mapped(mapping: &dyn GrantMapping) -> Vec<u8> {
    // SAFETY: the mapping is valid for len() bytes while it lives; the C program does not
    // write these frames while the test looks at them (it waits for the notification).
    unsafe { std::slice::from_raw_parts(mapping.as_ptr().as_ptr(), mapping.len()) }.to_vec()
}

fn poll_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as i32) };
    assert!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
    pollfd.revents & libc::POLLIN != 0
}

#[test]
fn c_guest_grants_and_event_channel_work_with_the_sim_platform() {
    let dir = sim_dir();
    let blkfront = blkfront();
    let mut child = Command::new(blkfront)
        .args(["--probe", "--domid", "3", "--timeout-ms", "20000", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("probe: "), "probe line: {line:?}");
    let f = fields(&line);
    let gref = |name: &str| f[name] as u32;

    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut access = platform.grant_access(3, 64).unwrap();

    // Valid grants map read-only and writable, and several refs map in ref order even
    // though the C guest put the second frame below the first.
    let one = access.map(&[gref("ok_a")], false).unwrap();
    assert_eq!(mapped(one.as_ref()), probe_page(gref("ok_a")));
    let two = access.map(&[gref("ok_a"), gref("ok_b")], true).unwrap();
    assert!(two.writable());
    let both = mapped(two.as_ref());
    assert_eq!(&both[..PAGE], probe_page(gref("ok_a")));
    assert_eq!(&both[PAGE..], probe_page(gref("ok_b")));
    drop((one, two));
    // Xen's own bookkeeping bits (GTF_reading / GTF_writing) do not matter.
    let flagged = access.map(&[gref("flagged")], true).unwrap();
    assert_eq!(mapped(flagged.as_ref()), probe_page(gref("flagged")));
    drop(flagged);
    let ro = access.map(&[gref("ro")], false).unwrap();
    assert!(!ro.writable());
    assert_eq!(mapped(ro.as_ref()), probe_page(gref("ro")));
    drop(ro);

    // Every failure the contract names, with its status.
    let a = access.as_mut();
    assert_eq!(map_status(a, &[gref("ro")], true), gntst::PERMISSION_DENIED);
    assert_eq!(
        map_status(a, &[gref("wrongdom")], false),
        gntst::PERMISSION_DENIED
    );
    assert_eq!(
        map_status(a, &[gref("revoked")], false),
        gntst::PERMISSION_DENIED
    );
    assert_eq!(
        map_status(a, &[gref("transitive")], false),
        gntst::PERMISSION_DENIED
    );
    assert_eq!(map_status(a, &[gref("badpage")], false), gntst::BAD_PAGE);
    assert_eq!(map_status(a, &[gref("pastend")], false), gntst::BAD_GNTREF);
    let err = access
        .map(&[gref("ok_a"), gref("pastend")], false)
        .err()
        .expect("one bad ref fails the whole map");
    assert_eq!(
        GrantFailure::of(&err),
        Some(GrantFailure {
            gref: gref("pastend"),
            status: gntst::BAD_GNTREF
        })
    );

    // Copies from the guest: per-segment statuses.
    let mut from_b = vec![0u8; 200];
    let mut from_ro = vec![0u8; 64];
    let mut from_bad = vec![0u8; 64];
    let mut segments = [
        copy_segment(gref("ok_b"), 100, &mut from_b),
        copy_segment(gref("ro"), 4032, &mut from_ro),
        copy_segment(gref("revoked"), 0, &mut from_bad),
    ];
    // SAFETY: every local buffer is valid for its len and not used elsewhere meanwhile.
    unsafe { access.copy(CopyDirection::FromGuest, &mut segments) }.unwrap();
    let statuses: Vec<i16> = segments.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [gntst::OKAY, gntst::OKAY, gntst::PERMISSION_DENIED]
    );
    assert_eq!(from_b, probe_page(gref("ok_b"))[100..300]);
    assert_eq!(from_ro, probe_page(gref("ro"))[4032..]);

    // Copies into the guest: the target frame gets bytes 512..1536 (the C side checks
    // them and that nothing else moved); a read-only grant refuses.
    let mut to_target: Vec<u8> = (512..1536).map(|b: usize| (b * 13 + 5) as u8).collect();
    let mut to_ro = vec![0xeeu8; 16];
    let mut segments = [
        copy_segment(gref("target"), 512, &mut to_target),
        copy_segment(gref("ro"), 0, &mut to_ro),
    ];
    // SAFETY: as above.
    unsafe { access.copy(CopyDirection::ToGuest, &mut segments) }.unwrap();
    assert_eq!(segments[0].status, gntst::OKAY);
    assert_eq!(segments[1].status, gntst::PERMISSION_DENIED);

    // The event channel both ways: the C guest verifies the frames when notified, then
    // notifies back.
    let port = f["port"] as u32;
    let mut channel = platform.bind_interdomain(3, port).unwrap();
    channel.notify().unwrap();
    assert!(
        poll_readable(channel.fd(), Duration::from_secs(20)),
        "no notification back from the C guest"
    );
    assert!(channel.drain().unwrap());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "C guest: {status}\n{rest}");
    assert!(rest.contains("probe: target verified"), "{rest}");
    assert!(
        !dir.path().join(format!("evtchn.3.{port}.front")).exists(),
        "the C guest unbinds"
    );
}

// ---------------------------------------------------------------------------------------
// End to end against `ferrotap serve`

/// A running `ferrotap serve`; killed on drop.
struct Serve {
    child: Child,
    control: PathBuf,
}

impl Serve {
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> Serve {
        let control = dir.join("ctl");
        let _ = fs::remove_file(&control);
        let child = Command::new(env!("CARGO_BIN_EXE_ferrotap"))
            .arg("serve")
            .arg("--image")
            .arg(image)
            .arg("--xensim")
            .arg(dir)
            .arg("--control")
            .arg(&control)
            .args(extra)
            // The registry entry (ferrotap ctl) stays out of /run.
            .env("FERROTAP_RUN_DIR", dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut serve = Serve { child, control };
        let start = Instant::now();
        while !serve.control.exists() {
            if let Some(status) = serve.child.try_wait().unwrap() {
                let mut stderr = String::new();
                serve
                    .child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .unwrap();
                panic!(
                    "ferrotap serve exited ({status}) before binding its control socket:\n{stderr}"
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "ferrotap serve did not bind {} within 20 s",
                serve.control.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        serve
    }

    /// Stop serving; the process must still be alive (it survived every frontend).
    fn stop(mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "ferrotap serve died while serving"
        );
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The disk's content as the frontends' models know it, merged run after run.
#[derive(Default)]
struct Model {
    sectors: BTreeMap<u64, Vec<u8>>,
}

impl Model {
    /// Merge a `--model-out` file: records of (sector u64 LE, 512 bytes).
    fn merge(&mut self, file: &Path) {
        let bytes = fs::read(file).unwrap();
        assert_eq!(bytes.len() % (8 + SECTOR), 0, "{}", file.display());
        for record in bytes.chunks_exact(8 + SECTOR) {
            let sector = u64::from_le_bytes(record[..8].try_into().unwrap());
            self.sectors.insert(sector, record[8..].to_vec());
        }
    }

    /// Every known sector of the image (read as raw by qemu-img) equals the model.
    fn check_image(&self, dir: &Path, image: &Path, format: &str) {
        assert!(!self.sectors.is_empty(), "the model knows nothing");
        let raw = dir.join("check.raw");
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-f", format, "-O", "raw"])
                .arg(image)
                .arg(&raw),
        );
        let data = fs::read(&raw).unwrap();
        for (sector, want) in &self.sectors {
            let at = *sector as usize * SECTOR;
            let got = &data[at..at + SECTOR];
            if got != want.as_slice() {
                let byte = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
                panic!(
                    "{} sector {sector} differs from the frontend's model at byte {byte}: \
                     {:#04x} != {:#04x}",
                    image.display(),
                    got[byte],
                    want[byte]
                );
            }
        }
        fs::remove_file(&raw).unwrap();
    }
}

/// One C frontend run: what to pass and what to expect.
struct Run<'a> {
    domid: u16,
    args: &'a [&'a str],
    ops: u64,
}

/// Run the C frontend against `serve`; assert exit 0 and the summary's counts; merge its
/// model. Returns the summary.
fn run_front(
    blkfront: &Path,
    dir: &Path,
    serve: &Serve,
    model: &mut Model,
    run: &Run,
) -> BTreeMap<String, u64> {
    run_front_output(blkfront, dir, serve, model, run).0
}

/// As [`run_front`], with the frontend's whole output.
fn run_front_output(
    blkfront: &Path,
    dir: &Path,
    serve: &Serve,
    model: &mut Model,
    run: &Run,
) -> (BTreeMap<String, u64>, String) {
    let model_out = dir.join(format!("model.{}", run.domid));
    let mut command = Command::new(blkfront);
    command
        .arg("--dir")
        .arg(dir)
        .arg("--control")
        .arg(&serve.control)
        .arg("--model-out")
        .arg(&model_out)
        .args(["--domid", &run.domid.to_string()])
        .args(["--ops", &run.ops.to_string()])
        .args(["--seed", &(u64::from(run.domid) * 7919).to_string()])
        .args(run.args);
    let stdout = run_ok(&mut command);
    let summary_line = stdout
        .lines()
        .find(|l| l.starts_with("cfront: ops="))
        .unwrap_or_else(|| panic!("no summary line from {command:?}:\n{stdout}"));
    let summary = fields(summary_line);
    assert_eq!(summary["errors"], 0, "{summary_line}");
    assert_eq!(summary["ops"], run.ops, "{summary_line}");
    let by_kind: u64 = ["reads", "writes", "fua_writes", "flushes", "discards"]
        .iter()
        .map(|k| summary[*k])
        .sum();
    assert_eq!(by_kind, run.ops, "{summary_line}");
    model.merge(&model_out);
    fs::remove_file(&model_out).unwrap();
    (summary, stdout)
}

/// A busy workload: every kind of request shows up, and reads verified real data.
fn assert_mixed(summary: &BTreeMap<String, u64>, indirect: bool) {
    let line = format!("{summary:?}");
    for kind in [
        "reads",
        "writes",
        "fua_writes",
        "flushes",
        "discards",
        "verified_bytes",
    ] {
        assert!(summary[kind] > 0, "no {kind}: {line}");
    }
    assert_eq!(
        summary["indirect"] > 0,
        indirect,
        "indirect requests: {line}"
    );
}

/// A raw image whose first `random_mib` MiB hold pseudo-random bytes (so reads of sectors
/// nobody wrote learn real data, not zeros), the rest a hole.
fn random_raw(path: &Path, size_mib: u64, random_mib: usize, seed: u64) {
    let mut state = seed | 1;
    let mut data = vec![0u8; random_mib << 20];
    for chunk in data.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes());
    }
    fs::write(path, &data).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(size_mib << 20)
        .unwrap();
}

/// [`random_raw`] as `disk.raw` in `dir`; returns its path.
fn disk_raw(dir: &Path, size_mib: u64, random_mib: usize, seed: u64) -> PathBuf {
    let image = dir.join("disk.raw");
    random_raw(&image, size_mib, random_mib, seed);
    image
}

const OPS: u64 = 1000;

/// Run the C frontend as guest `domid` for `OPS` requests with `args` (as [`run_front`])
/// and assert the run was mixed, with indirect requests exactly when `indirect`.
fn run_mixed(
    dir: &Path,
    serve: &Serve,
    model: &mut Model,
    domid: u16,
    args: &[&str],
    indirect: bool,
) -> BTreeMap<String, u64> {
    let run = Run {
        domid,
        args,
        ops: OPS,
    };
    let summary = run_front(blkfront(), dir, serve, model, &run);
    assert_mixed(&summary, indirect);
    summary
}

/// `qemu-img convert` the raw `seed` to `image` in `format`.
fn convert_raw(seed: &Path, image: &Path, format: &str) {
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", format])
            .arg(seed)
            .arg(image),
    );
}

/// `qemu-img check` finds the qcow2 `image` consistent.
fn qemu_check_qcow2(image: &Path) {
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(image),
    );
}

#[test]
fn raw_both_protocols_ring_orders_queues_direct_and_indirect() {
    let dir = sim_dir();
    let image = disk_raw(dir.path(), 16, 6, 1);
    let serve = Serve::start(dir.path(), &image, &[]);
    let mut model = Model::default();
    let runs: [(u16, &[&str], bool); 6] = [
        (1, &["--protocol", "x86_64-abi", "--iodepth", "16"], false),
        (
            2,
            // The guest's memory and grant table grow after connect (xensim section 1).
            &["--protocol", "x86_32-abi", "--iodepth", "16", "--grow"],
            false,
        ),
        (
            3,
            &[
                "--protocol",
                "x86_64-abi",
                "--ring-page-order",
                "2",
                "--indirect",
                "--iodepth",
                "32",
                "--persistent",
            ],
            true,
        ),
        (
            4,
            &[
                "--protocol",
                "x86_32-abi",
                "--ring-page-order",
                "3",
                "--indirect",
                "--iodepth",
                "24",
            ],
            true,
        ),
        (
            5,
            &[
                "--queues",
                "2",
                "--ring-page-order",
                "1",
                "--indirect",
                "--persistent",
            ],
            true,
        ),
        (
            6,
            &[
                "--protocol",
                "x86_32-abi",
                "--queues",
                "4",
                "--ring-page-order",
                "4",
                "--indirect",
                "--iodepth",
                "64",
            ],
            true,
        ),
    ];
    for (domid, args, indirect) in runs {
        run_mixed(dir.path(), &serve, &mut model, domid, args, indirect);
    }
    serve.stop();
    model.check_image(dir.path(), &image, "raw");
}

#[test]
fn qcow2_with_data_both_protocols() {
    let dir = sim_dir();
    let seed = dir.path().join("seed.raw");
    random_raw(&seed, 16, 6, 2);
    let image = dir.path().join("disk.qcow2");
    convert_raw(&seed, &image, "qcow2");
    let serve = Serve::start(dir.path(), &image, &[]);
    let mut model = Model::default();
    let indirect = ["--ring-page-order", "1", "--indirect", "--iodepth", "16"];
    run_mixed(dir.path(), &serve, &mut model, 1, &indirect, true);
    let persistent_32 = ["--protocol", "x86_32-abi", "--persistent"];
    run_mixed(dir.path(), &serve, &mut model, 2, &persistent_32, false);
    serve.stop();
    qemu_check_qcow2(&image);
    model.check_image(dir.path(), &image, "qcow2");
}

#[test]
fn vhd_made_by_ferrotap_both_protocols() {
    let dir = sim_dir();
    let image = dir.path().join("disk.vhd");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_ferrotap"))
            .args(["img", "create", "-f", "vpc"])
            .arg(&image)
            .arg("16M"),
    );
    let serve = Serve::start(dir.path(), &image, &[]);
    let mut model = Model::default();
    let indirect_32 = [
        "--protocol",
        "x86_32-abi",
        "--ring-page-order",
        "2",
        "--indirect",
        "--iodepth",
        "16",
    ];
    run_mixed(dir.path(), &serve, &mut model, 1, &indirect_32, true);
    let persistent = ["--persistent", "--iodepth", "8"];
    run_mixed(dir.path(), &serve, &mut model, 2, &persistent, false);
    serve.stop();
    model.check_image(dir.path(), &image, "vpc");
}

/// A qcow2 overlay made by qemu-img on `base` (format `base_format`): the frontend's reads
/// fall through to the base, its writes land in the overlay, and the base is untouched.
fn overlay_chain(dir: &Path, base: &Path, base_format: &str) {
    let base_before = fs::read(base).unwrap();
    let image = dir.join("top.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-F", base_format, "-b"])
            .arg(base)
            .arg(&image),
    );
    let serve = Serve::start(dir, &image, &[]);
    let mut model = Model::default();
    let indirect = ["--indirect", "--iodepth", "16", "--ring-page-order", "1"];
    let summary = run_mixed(dir, &serve, &mut model, 1, &indirect, true);
    assert!(summary["learned_bytes"] > 0, "{summary:?}");
    serve.stop();
    assert!(
        fs::read(base).unwrap() == base_before,
        "the base was written"
    );
    qemu_check_qcow2(&image);
    model.check_image(dir, &image, "qcow2");
}

#[test]
fn qcow2_overlay_on_raw_chain() {
    let dir = sim_dir();
    let base = dir.path().join("base.raw");
    random_raw(&base, 16, 6, 3);
    overlay_chain(dir.path(), &base, "raw");
}

#[test]
fn qcow2_overlay_on_vhd_chain() {
    let dir = sim_dir();
    let seed = dir.path().join("seed.raw");
    random_raw(&seed, 16, 6, 10);
    let base = dir.path().join("base.vhd");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "vpc"])
            .args(["-o", "subformat=dynamic,force_size=on"])
            .arg(&seed)
            .arg(&base),
    );
    overlay_chain(dir.path(), &base, "vpc");
}

#[test]
fn aio_engine_on_qcow2_copy_and_persistent() {
    let dir = sim_dir();
    let seed = dir.path().join("seed.raw");
    random_raw(&seed, 16, 6, 4);
    let image = dir.path().join("disk.qcow2");
    convert_raw(&seed, &image, "qcow2");
    let serve = Serve::start(dir.path(), &image, &["--engine", "aio"]);
    let mut model = Model::default();
    for (domid, args) in [
        (
            1,
            &["--indirect", "--iodepth", "16", "--protocol", "x86_32-abi"][..],
        ),
        (
            2,
            &[
                "--indirect",
                "--persistent",
                "--queues",
                "2",
                "--ring-page-order",
                "2",
            ][..],
        ),
    ] {
        run_mixed(dir.path(), &serve, &mut model, domid, args, true);
    }
    serve.stop();
    qemu_check_qcow2(&image);
    model.check_image(dir.path(), &image, "qcow2");
}

/// Hostile cases blkfront.c sends with `--expect-error` to a writable backend that offers
/// indirect requests and discard: 13 direct, 5 indirect, and discard past the end.
const ERROR_CASES: u64 = 19;

/// The hostile cases of blkfront.c's `--expect-error`, then a verified workload.
fn expect_error_run(
    dir: &Path,
    serve: &Serve,
    model: &mut Model,
    domid: u16,
    args: &[&str],
) -> BTreeMap<String, u64> {
    let mut all = vec!["--expect-error"];
    all.extend_from_slice(args);
    run_front(
        blkfront(),
        dir,
        serve,
        model,
        &Run {
            domid,
            args: &all,
            ops: 200,
        },
    )
}

#[test]
fn hostile_requests_get_error_statuses_and_the_device_keeps_serving() {
    let dir = sim_dir();
    let image = disk_raw(dir.path(), 8, 2, 5);
    let serve = Serve::start(dir.path(), &image, &[]);
    let mut model = Model::default();
    for (domid, args) in [
        (1, &["--protocol", "x86_64-abi"][..]),
        (
            2,
            &["--protocol", "x86_32-abi", "--persistent", "--indirect"][..],
        ),
        (3, &["--ring-page-order", "2", "--indirect"][..]),
    ] {
        let summary = expect_error_run(dir.path(), &serve, &mut model, domid, args);
        assert_eq!(summary["error_cases"], ERROR_CASES, "{summary:?}");
        assert!(summary["verified_bytes"] > 0, "{summary:?}");
    }
    serve.stop();
    model.check_image(dir.path(), &image, "raw");
}

#[test]
fn backend_offering_neither_indirect_nor_discard_nor_persistent() {
    let dir = sim_dir();
    let blkfront = blkfront();
    let image = disk_raw(dir.path(), 8, 2, 9);
    let serve = Serve::start(
        dir.path(),
        &image,
        &["--no-indirect", "--no-discard", "--no-persistent"],
    );
    let mut model = Model::default();
    // 13 direct cases, an indirect request (above the maximum of 0: ERROR) and a discard
    // (not advertised: EOPNOTSUPP); a frontend offering persistent grants to a backend
    // that does not use them.
    let summary = expect_error_run(dir.path(), &serve, &mut model, 1, &["--persistent"]);
    assert_eq!(summary["error_cases"], 15, "{summary:?}");
    assert_eq!(summary["discards"] + summary["indirect"], 0, "{summary:?}");
    let summary = run_front(
        blkfront,
        dir.path(),
        &serve,
        &mut model,
        &Run {
            domid: 2,
            args: &["--protocol", "x86_32-abi", "--ring-page-order", "1"],
            ops: OPS,
        },
    );
    assert_eq!(summary["discards"] + summary["indirect"], 0, "{summary:?}");
    for kind in ["reads", "writes", "fua_writes", "flushes", "verified_bytes"] {
        assert!(summary[kind] > 0, "no {kind}: {summary:?}");
    }
    serve.stop();
    model.check_image(dir.path(), &image, "raw");
}

#[test]
fn read_only_disk_refuses_writes_and_serves_reads() {
    let dir = sim_dir();
    let image = disk_raw(dir.path(), 8, 2, 6);
    let before = fs::read(&image).unwrap();
    let serve = Serve::start(dir.path(), &image, &["--read-only"]);
    let mut model = Model::default();
    let summary = expect_error_run(dir.path(), &serve, &mut model, 1, &["--indirect"]);
    // The usual cases, with a write refused (ERROR) and a discard, which a read-only disk
    // does not advertise (EOPNOTSUPP), in place of discard past the end.
    assert_eq!(summary["error_cases"], ERROR_CASES + 1, "{summary:?}");
    assert_eq!(
        summary["writes"] + summary["fua_writes"] + summary["discards"],
        0
    );
    assert!(
        summary["reads"] > 0 && summary["verified_bytes"] > 0,
        "{summary:?}"
    );
    serve.stop();
    assert!(
        fs::read(&image).unwrap() == before,
        "a read-only disk was written"
    );
    model.check_image(dir.path(), &image, "raw");
}

/// Send one control request on a connection of our own; the reply line.
fn control(serve: &Serve, request: &str) -> String {
    let mut stream = UnixStream::connect(&serve.control).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).unwrap();
    reply
}

/// What a process holds: open fds, threads, and the /proc/PID/maps lines naming a file.
#[derive(Debug)]
struct Holdings {
    fds: usize,
    threads: usize,
    maps: Vec<String>,
}

impl Holdings {
    fn of(pid: u32, needle: &str) -> Holdings {
        let count = |dir: String| fs::read_dir(dir).unwrap().count();
        Holdings {
            fds: count(format!("/proc/{pid}/fd")),
            threads: count(format!("/proc/{pid}/task")),
            maps: fs::read_to_string(format!("/proc/{pid}/maps"))
                .unwrap()
                .lines()
                .filter(|l| l.contains(needle))
                .map(str::to_string)
                .collect(),
        }
    }

    /// Poll for up to 5 s until `done` holds (threads and fds go away asynchronously);
    /// the last reading either way.
    fn settle(pid: u32, needle: &str, done: impl Fn(&Holdings) -> bool) -> Holdings {
        let start = Instant::now();
        loop {
            let now = Holdings::of(pid, needle);
            if done(&now) || start.elapsed() > Duration::from_secs(5) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn vanished_frontend_leaves_no_mapping_thread_or_fd_behind() {
    let dir = sim_dir();
    let blkfront = blkfront();
    let image = disk_raw(dir.path(), 8, 2, 7);
    let serve = Serve::start(dir.path(), &image, &[]);
    let pid = serve.child.id();
    let mut model = Model::default();
    // One complete run first, so what serving costs once (engines, pools) is in the
    // baseline.
    run_front(
        blkfront,
        dir.path(),
        &serve,
        &mut model,
        &Run {
            domid: 1,
            args: &["--indirect"],
            ops: 200,
        },
    );
    // Idle: whatever the first run's control connection and threads held is gone.
    std::thread::sleep(Duration::from_millis(200));
    let base = Holdings::of(pid, "dom7.");

    let stdout = run_ok(
        Command::new(blkfront)
            .arg("--dir")
            .arg(dir.path())
            .arg("--control")
            .arg(&serve.control)
            .args(["--domid", "7", "--vanish", "--indirect", "--iodepth", "16"]),
    );
    assert!(stdout.contains("vanishing with 16 requests"), "{stdout}");
    let during = Holdings::of(pid, "dom7.");
    assert!(
        !during.maps.is_empty(),
        "serve maps nothing of the vanished guest: {during:?}"
    );
    // On a real host the toolstack tears the device down; here the test does.
    let reply = control(&serve, r#"{"op":"disconnect"}"#);
    assert!(reply.contains(r#""ok":true"#), "{reply}");
    let after = Holdings::settle(pid, "dom7.", |now| {
        now.fds == base.fds && now.threads == base.threads && now.maps.is_empty()
    });
    assert!(after.maps.is_empty(), "mappings left behind: {after:?}");
    assert_eq!(after.fds, base.fds, "fds left behind: {after:?}");
    assert_eq!(
        after.threads, base.threads,
        "threads left behind: {after:?}"
    );
    let leftover: Vec<_> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| fs::read_link(e.unwrap().path()).ok())
        .filter(|p| {
            p.to_string_lossy().contains("dom7.") || p.to_string_lossy().contains("evtchn.7.")
        })
        .collect();
    assert!(leftover.is_empty(), "{leftover:?}");

    // The device serves the next guest.
    let summary = run_front(
        blkfront,
        dir.path(),
        &serve,
        &mut model,
        &Run {
            domid: 8,
            args: &["--indirect"],
            ops: 500,
        },
    );
    assert_mixed(&summary, true);
    serve.stop();
    model.check_image(dir.path(), &image, "raw");
}

#[test]
fn ring_overflow_is_reported_and_the_next_guest_is_served() {
    let dir = sim_dir();
    let blkfront = blkfront();
    let image = disk_raw(dir.path(), 8, 2, 8);
    let serve = Serve::start(dir.path(), &image, &[]);
    let mut model = Model::default();
    for (domid, protocol) in [(1, "x86_64-abi"), (2, "x86_32-abi")] {
        // A short verified workload, then req_prod a ring and one ahead of the responses;
        // the C frontend waits for info to carry an error, checks that no bogus slot was
        // answered, and disconnects.
        let (summary, stdout) = run_front_output(
            blkfront,
            dir.path(),
            &serve,
            &mut model,
            &Run {
                domid,
                args: &["--protocol", protocol, "--overflow"],
                ops: 200,
            },
        );
        assert_mixed(&summary, false);
        assert!(stdout.contains("cfront: overflow (req_prod"), "{stdout}");
        let summary = run_front(
            blkfront,
            dir.path(),
            &serve,
            &mut model,
            &Run {
                domid: domid + 10,
                args: &["--protocol", protocol],
                ops: 300,
            },
        );
        assert_mixed(&summary, false);
    }
    serve.stop();
    model.check_image(dir.path(), &image, "raw");
}
