//! The xensim platform (`ferrotap::xen::sim`) against hand-made guest files: the test plays
//! the frontend domain exactly as ../shared/xensim.md sections 1-3 describe it (writing
//! `dom<D>.mem` / `dom<D>.gnttab` with plain file I/O and binding `.front` sockets), and checks
//! what the backend sees, through the file itself and /proc/self/maps.

use std::fs::{File, OpenOptions};
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use ferrotap::xen::sim::SimPlatform;
use ferrotap::xen::{
    gntst, CopyDirection, CopySegment, GrantAccess, GrantFailure, GrantMapping, Platform,
};

const PAGE: usize = 4096;
const GTF_PERMIT_ACCESS: u16 = 1;
const GTF_READONLY: u16 = 1 << 2;

/// A short directory: socket paths must fit in sun_path.
fn sim_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("xsim.")
        .tempdir_in("/tmp")
        .unwrap()
}

/// The frontend domain's side of sections 1 and 2.
struct Guest {
    mem: File,
    gnttab: File,
}

impl Guest {
    /// Domain `domid` with `frames` pages of memory and a table of `entries` refs.
    fn new(dir: &Path, domid: u16, frames: usize, entries: usize) -> Guest {
        let open = |name: String| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.join(name))
                .unwrap()
        };
        let guest = Guest {
            mem: open(format!("dom{domid}.mem")),
            gnttab: open(format!("dom{domid}.gnttab")),
        };
        guest.grow(frames, entries);
        guest
    }

    fn grow(&self, frames: usize, entries: usize) {
        self.mem.set_len((frames * PAGE) as u64).unwrap();
        self.gnttab.set_len((entries * 8) as u64).unwrap();
    }

    /// Raw entry: domid and frame first, flags last (the guest's release order).
    fn entry(&self, gref: u32, flags: u16, domid: u16, frame: u32) {
        let at = u64::from(gref) * 8;
        self.gnttab
            .write_all_at(&domid.to_le_bytes(), at + 2)
            .unwrap();
        self.gnttab
            .write_all_at(&frame.to_le_bytes(), at + 4)
            .unwrap();
        self.gnttab.write_all_at(&flags.to_le_bytes(), at).unwrap();
    }

    /// Grant `frame` to domain 0.
    fn grant(&self, gref: u32, frame: u32, readonly: bool) {
        let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
        self.entry(gref, flags, 0, frame);
    }

    fn revoke(&self, gref: u32) {
        self.gnttab
            .write_all_at(&0u16.to_le_bytes(), u64::from(gref) * 8)
            .unwrap();
    }

    fn write_frame(&self, frame: u32, bytes: &[u8]) {
        self.mem
            .write_all_at(bytes, u64::from(frame) * PAGE as u64)
            .unwrap();
    }

    fn read_frame(&self, frame: u32) -> Vec<u8> {
        let mut bytes = vec![0u8; PAGE];
        self.mem
            .read_exact_at(&mut bytes, u64::from(frame) * PAGE as u64)
            .unwrap();
        bytes
    }
}

/// A page whose every byte says which frame it is and where.
fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

fn view(mapping: &dyn GrantMapping) -> &[u8] {
    // SAFETY: the mapping is valid for len() bytes while it lives; the guest file is only
    // written by this test thread while the slice is not in use.
    unsafe { std::slice::from_raw_parts(mapping.as_ptr().as_ptr(), mapping.len()) }
}

fn view_mut(mapping: &mut dyn GrantMapping) -> &mut [u8] {
    assert!(mapping.writable());
    // SAFETY: as `view`, and the mapping is writable (PROT_WRITE).
    unsafe { std::slice::from_raw_parts_mut(mapping.as_ptr().as_ptr(), mapping.len()) }
}

/// Permissions of the /proc/self/maps line starting at `addr` ("rw-s", "r--s", ...).
fn perms_at(addr: usize) -> Vec<(String, String)> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut found = Vec::new();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let range = fields.next().unwrap();
        let perms = fields.next().unwrap().to_string();
        let (start, end) = range.split_once('-').unwrap();
        let start = usize::from_str_radix(start, 16).unwrap();
        let end = usize::from_str_radix(end, 16).unwrap();
        if start <= addr && addr < end {
            let path = fields.nth(3).unwrap_or("").to_string();
            found.push((perms, path));
        }
    }
    found
}

fn map_status(access: &mut dyn GrantAccess, refs: &[u32], writable: bool) -> i16 {
    match access.map(refs, writable) {
        Ok(_) => gntst::OKAY,
        Err(err) => {
            let failure = GrantFailure::of(&err).unwrap_or_else(|| panic!("no status: {err}"));
            let message = err.to_string();
            assert!(
                message.contains("dom1.gnttab")
                    && message.contains(&format!("ref {}", failure.gref)),
                "{message}"
            );
            failure.status
        }
    }
}

#[test]
fn maps_a_frame_and_sees_both_ways() {
    let dir = sim_dir();
    let guest = Guest::new(dir.path(), 1, 8, 16);
    guest.write_frame(5, &pattern(5));
    guest.grant(3, 5, false);
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut access = platform.grant_access(1, 64).unwrap();
    let mut mapping = access.map(&[3], true).unwrap();
    assert_eq!(mapping.len(), PAGE);
    assert_eq!(view(&*mapping), &pattern(5)[..]);

    view_mut(&mut *mapping)[100..200].fill(0xab);
    let file = guest.read_frame(5);
    assert!(file[100..200].iter().all(|&b| b == 0xab));
    assert_eq!(file[..100], pattern(5)[..100]);
    assert_eq!(file[200..], pattern(5)[200..]);

    // The guest writes after the map: the backend sees it (MAP_SHARED of the same file).
    guest.write_frame(5, &pattern(9));
    assert_eq!(view(&*mapping), &pattern(9)[..]);

    // Revoking does not tear down a mapping already made (section 2).
    guest.revoke(3);
    assert_eq!(view(&*mapping)[0], pattern(9)[0]);
}

#[test]
fn maps_non_contiguous_frames_contiguously_in_ref_order() {
    let dir = sim_dir();
    let guest = Guest::new(dir.path(), 1, 8, 16);
    let refs = [7u32, 2, 9, 4];
    let frames = [4u32, 1, 6, 0];
    for (&gref, &frame) in refs.iter().zip(&frames) {
        guest.write_frame(frame, &pattern(frame as u8));
        guest.grant(gref, frame, false);
    }
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut access = platform.grant_access(1, 64).unwrap();
    let mut mapping = access.map(&refs, true).unwrap();
    assert_eq!(mapping.len(), 4 * PAGE);
    for (index, &frame) in frames.iter().enumerate() {
        assert_eq!(
            &view(&*mapping)[index * PAGE..(index + 1) * PAGE],
            &pattern(frame as u8)[..],
            "page {index} is frame {frame}"
        );
    }
    // A write spanning pages 1 and 2 of the mapping lands at the end of frame 1 and the
    // start of frame 6.
    view_mut(&mut *mapping)[2 * PAGE - 8..2 * PAGE + 8].fill(0x5a);
    assert!(guest.read_frame(1)[PAGE - 8..].iter().all(|&b| b == 0x5a));
    assert!(guest.read_frame(6)[..8].iter().all(|&b| b == 0x5a));
    assert_eq!(guest.read_frame(6)[8..], pattern(6)[8..]);
    // Untouched frames stay as they were.
    assert_eq!(guest.read_frame(4), pattern(4));

    // The kernel shows one shared page of dom1.mem per ref, in ref order.
    let base = mapping.as_ptr().as_ptr() as usize;
    for index in 0..refs.len() {
        let found = perms_at(base + index * PAGE);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "rw-s");
        assert!(found[0].1.ends_with("dom1.mem"), "{found:?}");
    }
    drop(mapping);
    assert!(
        perms_at(base)
            .iter()
            .all(|(_, path)| !path.ends_with("dom1.mem")),
        "drop unmaps"
    );
}

#[test]
fn read_only_maps_are_not_writable() {
    let dir = sim_dir();
    let guest = Guest::new(dir.path(), 1, 4, 8);
    guest.write_frame(2, &pattern(2));
    guest.grant(1, 2, true);
    guest.grant(2, 3, false);
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut access = platform.grant_access(1, 64).unwrap();

    // A writable map of a read-only grant is refused...
    assert_eq!(
        map_status(&mut *access, &[1], true),
        gntst::PERMISSION_DENIED
    );
    // ...also when it is not the first ref.
    assert_eq!(
        map_status(&mut *access, &[2, 1], true),
        gntst::PERMISSION_DENIED
    );
    // A read-only map of it is PROT_READ only, and so is a read-only map of a writable grant.
    for refs in [[1u32], [2]] {
        let mapping = access.map(&refs, false).unwrap();
        assert!(!mapping.writable());
        let found = perms_at(mapping.as_ptr().as_ptr() as usize);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, "r--s", "{refs:?}");
    }
    let mapping = access.map(&[1], false).unwrap();
    assert_eq!(view(&*mapping), &pattern(2)[..]);
}

#[test]
fn every_map_failure_has_its_gntst_status() {
    let dir = sim_dir();
    // 3 pages and a half: frame 3 ends past the end of the file.
    let guest = Guest::new(dir.path(), 1, 3, 8);
    guest.mem.set_len((3 * PAGE + PAGE / 2) as u64).unwrap();
    guest.grant(0, 0, false);
    // ref 1: never granted (flags 0)
    guest.grant(2, 1, false);
    guest.revoke(2);
    guest.entry(3, GTF_PERMIT_ACCESS, 5, 1); // granted to domain 5, not 0
    guest.entry(4, 2, 0, 1); // GTF_accept_transfer: not permit_access
    guest.entry(5, 3, 0, 1); // GTF_transitive: not permit_access
    guest.grant(6, 3, false); // the half frame
    guest.grant(7, 1000, true); // far past the end
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut access = platform.grant_access(1, 64).unwrap();

    assert_eq!(map_status(&mut *access, &[0], true), gntst::OKAY);
    assert_eq!(map_status(&mut *access, &[8], false), gntst::BAD_GNTREF);
    assert_eq!(
        map_status(&mut *access, &[u32::MAX], false),
        gntst::BAD_GNTREF
    );
    for gref in 1..=5 {
        assert_eq!(
            map_status(&mut *access, &[gref], false),
            gntst::PERMISSION_DENIED,
            "ref {gref}"
        );
    }
    assert_eq!(map_status(&mut *access, &[6], false), gntst::BAD_PAGE);
    assert_eq!(map_status(&mut *access, &[7], false), gntst::BAD_PAGE);
    // Order of the checks: a read-only grant asked for writing past the end is denied
    // before the page is looked at.
    assert_eq!(
        map_status(&mut *access, &[7], true),
        gntst::PERMISSION_DENIED
    );
    // A bad ref after good ones fails the whole map, naming the bad one.
    let err = access.map(&[0, 0, 6], true).err().unwrap();
    assert_eq!(
        GrantFailure::of(&err),
        Some(GrantFailure {
            gref: 6,
            status: gntst::BAD_PAGE
        })
    );
}

#[test]
fn failed_and_dropped_maps_give_their_grants_back() {
    let dir = sim_dir();
    let guest = Guest::new(dir.path(), 1, 4, 8);
    for gref in 0..4 {
        guest.grant(gref, gref, false);
    }
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut access = platform.grant_access(1, 5).unwrap();
    let first = access.map(&[0, 1, 2], true).unwrap();
    assert!(access.map(&[0, 1, 2], true).is_err(), "6 > max_grants 5");
    // A map failing on its last ref leaves nothing mapped...
    assert_eq!(
        map_status(&mut *access, &[3, 7], true),
        gntst::PERMISSION_DENIED
    );
    let second = access.map(&[3, 0], true).unwrap();
    assert!(access.map(&[0], true).is_err());
    drop(first);
    // ...and dropping a mapping gives its grants back.
    let third = access.map(&[0, 1, 2], false).unwrap();
    assert_eq!(third.len(), 3 * PAGE);
    drop(second);
    drop(third);
    assert!(access.map(&[], true).is_err(), "an empty map is refused");
}

fn segment(gref: u32, offset: u16, len: u16, local: &mut [u8]) -> CopySegment {
    assert!(local.len() >= usize::from(len));
    CopySegment {
        gref,
        offset,
        len,
        local: NonNull::new(local.as_mut_ptr()).unwrap(),
        status: 1, // neither OKAY nor any GNTST: proves copy wrote every status
    }
}

/// One grant copy of `plan`'s rows (gref, offset, len, expected status), row i to or from
/// `buffers[i]`; returns the status the copy reported for each row.
fn copy_plan(
    access: &mut dyn GrantAccess,
    direction: CopyDirection,
    plan: &[(u32, u16, u16, i16)],
    buffers: &mut [Vec<u8>],
) -> Vec<i16> {
    let mut segments: Vec<CopySegment> = plan
        .iter()
        .zip(buffers.iter_mut())
        .map(|(&(gref, offset, len, _), buffer)| segment(gref, offset, len, buffer))
        .collect();
    // SAFETY: each segment points into its own buffer, borrowed mutably for the call and at
    // least `len` bytes long (`segment` checks).
    unsafe { access.copy(direction, &mut segments) }.unwrap();
    segments.iter().map(|s| s.status).collect()
}

#[test]
fn copy_reports_a_status_per_segment_both_ways() {
    let dir = sim_dir();
    let guest = Guest::new(dir.path(), 1, 4, 16);
    for frame in 0..4 {
        guest.write_frame(frame, &pattern(frame as u8 + 1));
    }
    guest.grant(0, 0, false);
    guest.grant(1, 1, true); // read-only
    guest.grant(2, 2, false);
    guest.revoke(2);
    guest.entry(3, GTF_PERMIT_ACCESS, 7, 3); // wrong domid
    guest.grant(4, 9, false); // frame past the end
    guest.grant(5, 3, false);
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut access = platform.grant_access(1, 0).unwrap();

    // FromGuest (a guest WRITE): the read-only grant may be read.
    let mut buffers = vec![vec![0xeeu8; PAGE]; 9];
    let plan: [(u32, u16, u16, i16); 9] = [
        (0, 512, 1024, gntst::OKAY),
        (1, 0, 4096, gntst::OKAY),
        (2, 0, 512, gntst::PERMISSION_DENIED),
        (3, 0, 512, gntst::PERMISSION_DENIED),
        (4, 0, 512, gntst::BAD_PAGE),
        (16, 0, 512, gntst::BAD_GNTREF),
        (5, 3584, 1024, gntst::GENERAL_ERROR), // crosses the page on the grant side
        (5, 4095, 1, gntst::OKAY),
        (5, 100, 0, gntst::OKAY),
    ];
    let statuses = copy_plan(&mut *access, CopyDirection::FromGuest, &plan, &mut buffers);
    let expected: Vec<i16> = plan.iter().map(|p| p.3).collect();
    assert_eq!(statuses, expected);
    assert_eq!(buffers[0][..1024], pattern(1)[512..1536]);
    assert!(buffers[0][1024..].iter().all(|&b| b == 0xee));
    assert_eq!(buffers[1], pattern(2));
    for (index, buffer) in buffers.iter().enumerate().take(7).skip(2) {
        assert!(buffer.iter().all(|&b| b == 0xee), "segment {index}");
    }
    assert_eq!(buffers[7][0], pattern(4)[4095]);
    assert!(buffers[7][1..].iter().all(|&b| b == 0xee));

    // ToGuest (a guest READ): writing the read-only grant is denied; failed segments leave
    // the guest's frames untouched.
    let mut buffers: Vec<Vec<u8>> = (0..5).map(|i| vec![0x10 + i as u8; PAGE]).collect();
    let plan: [(u32, u16, u16, i16); 5] = [
        (0, 0, 4096, gntst::OKAY),
        (1, 0, 512, gntst::PERMISSION_DENIED),
        (5, 1024, 512, gntst::OKAY),
        (2, 0, 512, gntst::PERMISSION_DENIED),
        (5, 4000, 200, gntst::GENERAL_ERROR),
    ];
    let statuses = copy_plan(&mut *access, CopyDirection::ToGuest, &plan, &mut buffers);
    assert_eq!(statuses, plan.iter().map(|p| p.3).collect::<Vec<_>>());
    assert!(guest.read_frame(0).iter().all(|&b| b == 0x10));
    assert_eq!(guest.read_frame(1), pattern(2));
    assert_eq!(guest.read_frame(2), pattern(3));
    let frame3 = guest.read_frame(3);
    assert!(frame3[1024..1536].iter().all(|&b| b == 0x12));
    assert_eq!(frame3[..1024], pattern(4)[..1024]);
    assert_eq!(frame3[1536..], pattern(4)[1536..]);
}

#[test]
fn files_growing_after_open_are_seen() {
    let dir = sim_dir();
    let guest = Guest::new(dir.path(), 1, 2, 4);
    guest.grant(0, 1, false);
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut access = platform.grant_access(1, 64).unwrap();
    // Warm both views at their small sizes.
    assert_eq!(map_status(&mut *access, &[0], true), gntst::OKAY);
    assert_eq!(map_status(&mut *access, &[100], true), gntst::BAD_GNTREF);

    guest.grow(2, 200);
    guest.grant(100, 50, false);
    assert_eq!(map_status(&mut *access, &[100], true), gntst::BAD_PAGE);

    guest.grow(64, 200);
    guest.write_frame(50, &pattern(50));
    let mapping = access.map(&[100, 0], true).unwrap();
    assert_eq!(view(&*mapping)[..PAGE], pattern(50)[..]);

    let mut buffer = vec![0u8; 64];
    let mut segments = [segment(100, 64, 64, &mut buffer)];
    // SAFETY: the buffer is live and unaliased for the call.
    unsafe { access.copy(CopyDirection::FromGuest, &mut segments) }.unwrap();
    assert_eq!(segments[0].status, gntst::OKAY);
    assert_eq!(buffer, pattern(50)[64..128]);
}

#[test]
fn grant_access_names_the_missing_file() {
    let dir = sim_dir();
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let err = platform.grant_access(3, 8).err().unwrap();
    assert!(err.to_string().contains("dom3.gnttab"), "{err}");
    File::create(dir.path().join("dom3.gnttab")).unwrap();
    let err = platform.grant_access(3, 8).err().unwrap();
    assert!(err.to_string().contains("dom3.mem"), "{err}");
    File::create(dir.path().join("dom3.mem")).unwrap();
    let mut access = platform.grant_access(3, 8).unwrap();
    // Empty files: every ref is outside the table.
    let err = access.map(&[0], false).err().unwrap();
    assert_eq!(GrantFailure::of(&err).unwrap().status, gntst::BAD_GNTREF);
}

fn readable(fd: RawFd) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let rc = unsafe { libc::poll(&mut poll, 1, 0) };
    assert!(rc >= 0);
    poll.revents & libc::POLLIN != 0
}

fn socket_path(dir: &Path, domid: u16, port: u32, side: &str) -> PathBuf {
    dir.join(format!("evtchn.{domid}.{port}.{side}"))
}

#[test]
fn event_channel_notifies_and_drains() {
    let dir = sim_dir();
    let front_path = socket_path(dir.path(), 1, 7, "front");
    let front = UnixDatagram::bind(&front_path).unwrap();
    front.set_nonblocking(true).unwrap();
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let mut channel = platform.bind_interdomain(1, 7).unwrap();
    assert_eq!(channel.local_port(), 7);
    let back_path = socket_path(dir.path(), 1, 7, "back");
    assert!(back_path.exists());

    channel.notify().unwrap();
    let mut datagram = [0u8; 16];
    assert_eq!(front.recv(&mut datagram).unwrap(), 4);
    assert_eq!(u32::from_le_bytes(datagram[..4].try_into().unwrap()), 7);

    assert!(!readable(channel.fd()));
    assert!(!channel.drain().unwrap());
    for _ in 0..3 {
        front.send_to(&7u32.to_le_bytes(), &back_path).unwrap();
    }
    assert!(readable(channel.fd()));
    assert!(channel.drain().unwrap(), "pending notifications");
    assert!(!readable(channel.fd()));
    assert!(!channel.drain().unwrap(), "coalesced into one drain");

    drop(channel);
    assert!(!back_path.exists(), "drop unbinds");
}

#[test]
fn notify_without_a_listening_peer_succeeds() {
    let dir = sim_dir();
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let channel = platform.bind_interdomain(2, 9).unwrap();
    // No front socket file at all: ENOENT.
    channel.notify().unwrap();
    // A stale front socket file nobody is bound to: ECONNREFUSED.
    drop(UnixDatagram::bind(socket_path(dir.path(), 2, 9, "front")).unwrap());
    assert!(socket_path(dir.path(), 2, 9, "front").exists());
    channel.notify().unwrap();
}

#[test]
fn notify_into_a_full_peer_succeeds() {
    let dir = sim_dir();
    let front_path = socket_path(dir.path(), 1, 3, "front");
    let front = UnixDatagram::bind(&front_path).unwrap();
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let channel = platform.bind_interdomain(1, 3).unwrap();
    // Far more than net.unix.max_dgram_qlen: the peer's queue fills and sends hit EAGAIN.
    for _ in 0..2000 {
        channel.notify().unwrap();
    }
    // Proof the queue is full: another sender now gets EAGAIN.
    let probe = UnixDatagram::unbound().unwrap();
    probe.set_nonblocking(true).unwrap();
    let err = probe.send_to(&3u32.to_le_bytes(), &front_path).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN));
    // And what did arrive is the port number.
    let mut datagram = [0u8; 16];
    assert_eq!(front.recv(&mut datagram).unwrap(), 4);
    assert_eq!(&datagram[..4], &3u32.to_le_bytes());
}

#[test]
fn binding_replaces_a_leftover_and_drop_removes_only_its_own_file() {
    let dir = sim_dir();
    let back_path = socket_path(dir.path(), 4, 12, "back");
    std::fs::write(&back_path, b"left over by a crashed backend").unwrap();
    let platform = SimPlatform::new(dir.path().to_path_buf());
    let old = platform.bind_interdomain(4, 12).unwrap();
    // A second backend binding the same channel replaces the socket; the first one's drop
    // must not remove the second one's file.
    let mut new = platform.bind_interdomain(4, 12).unwrap();
    drop(old);
    assert!(back_path.exists());
    let sender = UnixDatagram::unbound().unwrap();
    sender.send_to(&12u32.to_le_bytes(), &back_path).unwrap();
    assert!(new.drain().unwrap());
    drop(new);
    assert!(!back_path.exists());

    for port in [0, 4096] {
        let err = platform.bind_interdomain(4, port).err().unwrap();
        assert!(err.to_string().contains(&format!("port {port}")), "{err}");
    }
}
