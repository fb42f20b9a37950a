//! The C blkfront (tests/cfront/blkfront.c), written from ../shared/xensim.md and Xen's own
//! io/ring.h and io/blkif.h alone, as the independent check of the xensim contract: its
//! guest memory, grant table and event channel against `ferrotap::xen::sim::SimPlatform`
//! (grants and event channels, both ways, every GNTST failure).

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use ferrotap::xen::sim::SimPlatform;
use ferrotap::xen::{gntst, CopyDirection, CopySegment, GrantFailure, GrantMapping, Platform};

const PAGE: usize = 4096;

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
        CopySegment {
            gref: gref("ok_b"),
            offset: 100,
            len: 200,
            local: std::ptr::NonNull::new(from_b.as_mut_ptr()).unwrap(),
            status: 1,
        },
        CopySegment {
            gref: gref("ro"),
            offset: 4032,
            len: 64,
            local: std::ptr::NonNull::new(from_ro.as_mut_ptr()).unwrap(),
            status: 1,
        },
        CopySegment {
            gref: gref("revoked"),
            offset: 0,
            len: 64,
            local: std::ptr::NonNull::new(from_bad.as_mut_ptr()).unwrap(),
            status: 1,
        },
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
        CopySegment {
            gref: gref("target"),
            offset: 512,
            len: 1024,
            local: std::ptr::NonNull::new(to_target.as_mut_ptr()).unwrap(),
            status: 1,
        },
        CopySegment {
            gref: gref("ro"),
            offset: 0,
            len: 16,
            local: std::ptr::NonNull::new(to_ro.as_mut_ptr()).unwrap(),
            status: 1,
        },
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
