//! The xensim platform (../shared/xensim.md sections 1-3): grants from `dom<D>.mem` and
//! `dom<D>.gnttab`, event channels on unix datagram sockets.
//!
//! The guest's files only grow while we are connected, so each is viewed through one
//! `MAP_SHARED` mapping of its whole length, remapped larger when a check needs bytes past
//! it (one `fstat` only then). Every map and copy re-checks the grant entry and the file
//! size first, so a revoked grant or a frame past the end of memory is a `GNTST_*` status,
//! never a SIGBUS.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use super::{
    gntst, CopyDirection, CopySegment, DomId, EventChannel, GrantAccess, GrantFailure,
    GrantMapping, GrantRef, Platform,
};
use crate::error::{Error, Result};

const PAGE_SIZE: usize = 4096;
/// `grant_entry_v1_t`: `{ u16 flags; u16 domid; u32 frame; }`.
const GRANT_ENTRY_SIZE: u64 = 8;
const GTF_TYPE_MASK: u16 = 3;
const GTF_PERMIT_ACCESS: u16 = 1;
const GTF_READONLY: u16 = 1 << 2;
/// The backend's domain id in xensim.
const BACKEND_DOMID: DomId = 0;
/// A u32 ref cannot index past this, a u32 frame cannot address past that: views of larger
/// files stop there.
const MAX_GNTTAB_BYTES: u64 = (u32::MAX as u64 + 1) * GRANT_ENTRY_SIZE;
const MAX_MEM_BYTES: u64 = (u32::MAX as u64 + 1) * PAGE_SIZE as u64;
/// Event-channel ports a frontend may allocate (section 3).
const MAX_PORT: u32 = 4095;
/// Datagrams consumed per `drain`: a peer sending without pause cannot keep us in it.
const MAX_DRAIN: usize = 256;

/// A simulated host: the directory `$XENSIM_DIR`.
pub struct SimPlatform {
    pub dir: PathBuf,
}

impl SimPlatform {
    pub fn new(dir: PathBuf) -> SimPlatform {
        SimPlatform { dir }
    }
}

impl Platform for SimPlatform {
    fn grant_access(&self, domid: DomId, max_grants: u32) -> Result<Box<dyn GrantAccess>> {
        Ok(Box::new(SimGrants::open(&self.dir, domid, max_grants)?))
    }

    fn bind_interdomain(&self, domid: DomId, remote_port: u32) -> Result<Box<dyn EventChannel>> {
        Ok(Box::new(SimEventChannel::bind(
            &self.dir,
            domid,
            remote_port,
        )?))
    }
}

/// A `MAP_SHARED` view of a whole file that only grows.
struct FileView {
    file: File,
    path: PathBuf,
    prot: libc::c_int,
    /// Bytes past this are never needed (see `MAX_*_BYTES`).
    limit: u64,
    /// Null while `len` is 0 (an empty file cannot be mapped).
    base: *mut u8,
    len: usize,
}

// SAFETY: the view is plain shared memory owned by this value; nothing in it is tied to the
// thread that made it.
unsafe impl Send for FileView {}

impl FileView {
    fn open(path: PathBuf, writable: bool, limit: u64) -> Result<FileView> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&path)
            .map_err(|e| Error::io("open", e).with_path(&path))?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        Ok(FileView {
            file,
            path,
            prot,
            limit,
            base: ptr::null_mut(),
            len: 0,
        })
    }

    /// Makes the view cover `[0, needed)` when the file is now that large; false when it
    /// is not.
    fn cover(&mut self, needed: u64) -> Result<bool> {
        if needed <= self.len as u64 {
            return Ok(true);
        }
        let size = self
            .file
            .metadata()
            .map_err(|e| Error::io("fstat", e).with_path(&self.path))?
            .len()
            .min(self.limit);
        if size < needed {
            return Ok(false);
        }
        let len = usize::try_from(size)
            .map_err(|_| Error::invalid("file too large to map").with_path(&self.path))?;
        // SAFETY: a new mapping at an address the kernel chooses, of an fd we own; it
        // replaces nothing and nothing points into it yet.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                self.prot,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::io("mmap", io::Error::last_os_error()).with_path(&self.path));
        }
        self.unmap();
        self.base = base.cast();
        self.len = len;
        Ok(true)
    }

    fn unmap(&mut self) {
        if !self.base.is_null() {
            // SAFETY: `base`/`len` is a mapping this view made; pointers into it never
            // outlive a method call of the view's owner.
            unsafe { libc::munmap(self.base.cast(), self.len) };
            self.base = ptr::null_mut();
            self.len = 0;
        }
    }

    /// Grant entry `gref`; the view must cover it.
    fn grant_entry(&self, gref: GrantRef) -> (u16, DomId, u32) {
        debug_assert!((u64::from(gref) + 1) * GRANT_ENTRY_SIZE <= self.len as u64);
        let offset = u64::from(gref) * GRANT_ENTRY_SIZE;
        // SAFETY: the caller covered the entry, so all 8 bytes are inside the mapping (and
        // inside the file, which never shrinks). The mapping is page-aligned and entries are
        // 8 bytes, so each field is aligned for its atomic type. The guest writes the entry
        // concurrently, hence atomic loads; `flags` first with Acquire, pairing with the
        // guest's release fence before it sets them.
        unsafe {
            let entry = self.base.add(offset as usize);
            let flags = AtomicU16::from_ptr(entry.cast()).load(Ordering::Acquire);
            let domid = AtomicU16::from_ptr(entry.add(2).cast()).load(Ordering::Relaxed);
            let frame = AtomicU32::from_ptr(entry.add(4).cast()).load(Ordering::Relaxed);
            (
                u16::from_le(flags),
                u16::from_le(domid),
                u32::from_le(frame),
            )
        }
    }
}

impl Drop for FileView {
    fn drop(&mut self) {
        self.unmap();
    }
}

/// Domain D's grants as seen by the backend (domain 0).
struct SimGrants {
    domid: DomId,
    gnttab: FileView,
    mem: FileView,
    max_grants: usize,
    /// Grants mapped now, shared with the live mappings that give them back on drop.
    mapped: Arc<AtomicUsize>,
}

impl SimGrants {
    fn open(dir: &Path, domid: DomId, max_grants: u32) -> Result<SimGrants> {
        let gnttab = FileView::open(
            dir.join(format!("dom{domid}.gnttab")),
            false,
            MAX_GNTTAB_BYTES,
        )?;
        let mem = FileView::open(dir.join(format!("dom{domid}.mem")), true, MAX_MEM_BYTES)?;
        Ok(SimGrants {
            domid,
            gnttab,
            mem,
            max_grants: max_grants as usize,
            mapped: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The checks of section 2, in order: the byte offset of the granted frame in
    /// `dom<D>.mem`, or the `GNTST_*` failure. Err only when a file could not be examined.
    fn check(&mut self, gref: GrantRef, write: bool) -> Result<Result<u64, i16>> {
        if !self
            .gnttab
            .cover((u64::from(gref) + 1) * GRANT_ENTRY_SIZE)?
        {
            return Ok(Err(gntst::BAD_GNTREF));
        }
        let (flags, domid, frame) = self.gnttab.grant_entry(gref);
        if flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS || domid != BACKEND_DOMID {
            return Ok(Err(gntst::PERMISSION_DENIED));
        }
        if write && flags & GTF_READONLY != 0 {
            return Ok(Err(gntst::PERMISSION_DENIED));
        }
        let start = u64::from(frame) * PAGE_SIZE as u64;
        if !self.mem.cover(start + PAGE_SIZE as u64)? {
            return Ok(Err(gntst::BAD_PAGE));
        }
        Ok(Ok(start))
    }

    fn map_context(&self) -> String {
        format!(
            "map of domain {}'s grants ({}, {})",
            self.domid,
            self.gnttab.path.display(),
            self.mem.path.display()
        )
    }

    /// One segment of a copy: its status.
    ///
    /// # Safety
    /// As [`GrantAccess::copy`], for this segment.
    unsafe fn copy_segment(&mut self, direction: CopyDirection, segment: &CopySegment) -> i16 {
        let len = usize::from(segment.len);
        if usize::from(segment.offset) + len > PAGE_SIZE {
            return gntst::GENERAL_ERROR;
        }
        let frame_start = match self.check(segment.gref, direction == CopyDirection::ToGuest) {
            Ok(Ok(start)) => start,
            Ok(Err(status)) => return status,
            Err(_) => return gntst::GENERAL_ERROR,
        };
        let at = frame_start as usize + usize::from(segment.offset);
        // SAFETY: `check` covered the whole frame with the mem view and the segment stays
        // inside the frame, so `[at, at+len)` is mapped (and inside the file); the caller
        // guarantees `local` is valid for `len` bytes in the needed direction and unaliased.
        // The guest may touch its frame concurrently, as with a real grant copy.
        unsafe {
            let guest = self.mem.base.add(at);
            match direction {
                CopyDirection::FromGuest => {
                    ptr::copy_nonoverlapping(guest, segment.local.as_ptr(), len)
                }
                CopyDirection::ToGuest => {
                    ptr::copy_nonoverlapping(segment.local.as_ptr(), guest, len)
                }
            }
        }
        gntst::OKAY
    }
}

impl GrantAccess for SimGrants {
    fn map(&mut self, refs: &[GrantRef], writable: bool) -> Result<Box<dyn GrantMapping>> {
        let count = refs.len();
        if count == 0 {
            return Err(Error::invalid("no grant refs to map"));
        }
        let len = count
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| Error::invalid("too many grant refs to map"))?;
        let before = self.mapped.fetch_add(count, Ordering::Relaxed);
        if before + count > self.max_grants {
            self.mapped.fetch_sub(count, Ordering::Relaxed);
            return Err(Error::invalid(format!(
                "mapping {count} grants of domain {} would exceed the limit of {} ({before} mapped)",
                self.domid, self.max_grants
            )));
        }
        // Reserve the contiguous range first; each frame then replaces one page of it.
        // SAFETY: an anonymous, inaccessible mapping at an address the kernel chooses.
        let reserved = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        let Some(base) =
            NonNull::new(reserved.cast::<u8>()).filter(|_| reserved != libc::MAP_FAILED)
        else {
            self.mapped.fetch_sub(count, Ordering::Relaxed);
            return Err(Error::io(
                "reserve address space for a grant map",
                io::Error::last_os_error(),
            ));
        };
        // From here on dropping `mapping` unmaps everything and gives the grants back.
        let mapping = SimMapping {
            base,
            len,
            writable,
            mapped: Arc::clone(&self.mapped),
            count,
        };
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        for (index, &gref) in refs.iter().enumerate() {
            let frame_start = match self.check(gref, writable)? {
                Ok(start) => start,
                Err(status) => {
                    return Err(GrantFailure { gref, status }.into_error(&self.map_context()))
                }
            };
            // SAFETY: MAP_FIXED replaces exactly one page of the reservation we own (index <
            // count); the file offset is a frame `check` found inside `dom<D>.mem`.
            let page = unsafe {
                libc::mmap(
                    base.as_ptr().add(index * PAGE_SIZE).cast(),
                    PAGE_SIZE,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    self.mem.file.as_raw_fd(),
                    frame_start as libc::off_t,
                )
            };
            if page == libc::MAP_FAILED {
                return Err(Error::io(
                    &format!("{} of grant ref {gref}", self.map_context()),
                    io::Error::last_os_error(),
                ));
            }
        }
        Ok(Box::new(mapping))
    }

    unsafe fn copy(
        &mut self,
        direction: CopyDirection,
        segments: &mut [CopySegment],
    ) -> Result<()> {
        for segment in segments.iter_mut() {
            // SAFETY: the caller's contract for `copy` covers each segment.
            segment.status = unsafe { self.copy_segment(direction, segment) };
        }
        Ok(())
    }
}

/// Frames of a guest mapped contiguously, in ref order.
struct SimMapping {
    base: NonNull<u8>,
    len: usize,
    writable: bool,
    mapped: Arc<AtomicUsize>,
    count: usize,
}

// SAFETY: the mapping is process-wide memory owned by this value; nothing ties it to a thread.
unsafe impl Send for SimMapping {}

impl GrantMapping for SimMapping {
    fn as_ptr(&self) -> NonNull<u8> {
        self.base
    }

    fn len(&self) -> usize {
        self.len
    }

    fn writable(&self) -> bool {
        self.writable
    }
}

impl Drop for SimMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` is the region `map` reserved and filled; users' pointers into
        // it are valid only while the mapping lives.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        self.mapped.fetch_sub(self.count, Ordering::Relaxed);
    }
}

/// The backend end of an event channel: `evtchn.<D>.<P>.back`.
struct SimEventChannel {
    socket: UnixDatagram,
    port: u32,
    own_path: PathBuf,
    /// (st_dev, st_ino) of our socket file: Drop removes it only if it is still ours.
    own_file: (u64, u64),
    peer_path: PathBuf,
}

impl SimEventChannel {
    fn bind(dir: &Path, domid: DomId, port: u32) -> Result<SimEventChannel> {
        if port == 0 || port > MAX_PORT {
            return Err(Error::invalid(format!(
                "event channel port {port} of domain {domid} is outside 1..={MAX_PORT}"
            )));
        }
        let own_path = dir.join(format!("evtchn.{domid}.{port}.back"));
        let peer_path = dir.join(format!("evtchn.{domid}.{port}.front"));
        match fs::remove_file(&own_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(
                    Error::io("remove leftover event-channel socket", e).with_path(&own_path)
                )
            }
        }
        let socket = UnixDatagram::bind(&own_path)
            .map_err(|e| Error::io("bind event-channel socket", e).with_path(&own_path))?;
        let meta = fs::metadata(&own_path)
            .map_err(|e| Error::io("stat event-channel socket", e).with_path(&own_path))?;
        let channel = SimEventChannel {
            socket,
            port,
            own_file: (meta.dev(), meta.ino()),
            own_path,
            peer_path,
        };
        channel
            .socket
            .set_nonblocking(true)
            .map_err(|e| Error::io("make event-channel socket non-blocking", e))?;
        Ok(channel)
    }
}

impl EventChannel for SimEventChannel {
    fn local_port(&self) -> u32 {
        self.port
    }

    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn drain(&mut self) -> Result<bool> {
        let mut datagram = [0u8; 16];
        let mut any = false;
        for _ in 0..MAX_DRAIN {
            match self.socket.recv(&mut datagram) {
                Ok(_) => any = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io("read event-channel socket", e).with_path(&self.own_path))
                }
            }
        }
        // More keep coming: the socket stays readable, the next poll returns here.
        Ok(any)
    }

    fn notify(&self) -> Result<()> {
        // The socket is non-blocking, so this send is MSG_DONTWAIT.
        match self
            .socket
            .send_to(&self.port.to_le_bytes(), &self.peer_path)
        {
            Ok(_) => Ok(()),
            // Peer gone or not bound yet, or a notification already pending: as on Xen,
            // nothing for the sender to do.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ECONNREFUSED | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::io("notify event channel", e).with_path(&self.peer_path)),
        }
    }
}

impl Drop for SimEventChannel {
    fn drop(&mut self) {
        // Unbind: remove our socket file, unless a newer backend already replaced it.
        if let Ok(meta) = fs::metadata(&self.own_path) {
            if (meta.dev(), meta.ino()) == self.own_file {
                let _ = fs::remove_file(&self.own_path);
            }
        }
    }
}
