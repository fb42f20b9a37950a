//! The guest's half of xensim sections 1-3 (../shared/xensim.md): its memory `dom<D>.mem`,
//! its grant table `dom<D>.gnttab` and its ends of event channels
//! (`evtchn.<D>.<P>.front`). Every `unsafe` of the simulated frontend lives here.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// Bytes in a frame.
pub const PAGE_SIZE: usize = 4096;
/// Bytes of one `grant_entry_v1_t`.
pub const GRANT_ENTRY_SIZE: usize = 8;
/// `GTF_permit_access`.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// `GTF_readonly`.
pub const GTF_READONLY: u16 = 1 << 2;
/// Refs below this are reserved (`GNTTAB_NR_RESERVED_ENTRIES`); Linux hands out 8 first.
pub const FIRST_FREE_REF: u32 = 8;
/// The backend's domain.
pub const BACKEND_DOMID: u16 = 0;
/// Event channel ports a frontend may bind (1..4095).
pub const MAX_PORT: u32 = 4095;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder cannot leave an allocator half-updated: every update is one push/pop.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A `MAP_SHARED` mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping is an address range, not data; it is unmapped only by its own drop, so
// moving or sharing the handle between threads cannot invalidate it.
unsafe impl Send for Mapping {}
// SAFETY: as above; all access through it goes through atomics or raw copies to frames
// owned by one party at a time (the protocol's ownership rule).
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `file` from offset 0, read-write, shared. `len` may exceed the
    /// file's current size: the file grows into the mapping later.
    fn shared(file: &File, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping at an address of the kernel's choosing; it aliases no Rust
        // object. Bytes past the end of the file are never touched (callers check the size).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        Mapping::from_mmap(ptr, len)
    }

    fn from_mmap(ptr: *mut libc::c_void, len: usize) -> io::Result<Mapping> {
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        match NonNull::new(ptr.cast::<u8>()) {
            Some(ptr) => Ok(Mapping { ptr, len }),
            None => Err(io::Error::other("mmap returned NULL")),
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by this handle and nothing refers to it after drop
        // (frames and views hold an Arc or their own Mapping).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A file mapped with room to grow in place (the mapping never moves).
struct GrowableFile {
    path: PathBuf,
    file: File,
    map: Mapping,
    size: AtomicU64,
    grow: Mutex<()>,
}

impl GrowableFile {
    /// Create `path` afresh with `size` bytes and a mapping of `capacity` bytes, locked
    /// (flock) for as long as this guest lives. A leftover of a guest that is gone (its lock
    /// released) is unlinked first, so whoever still maps it keeps its pages: files never
    /// shrink under a backend. A live guest's file is an error.
    fn create(path: PathBuf, size: u64, capacity: usize) -> Result<GrowableFile> {
        match File::open(&path) {
            Ok(old) => match old.try_lock() {
                Ok(()) => match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(Error::io("unlink", err).with_path(&path)),
                },
                Err(TryLockError::WouldBlock) => {
                    return Err(Error::invalid(
                        "a running guest holds this file (same domain id in the same host)",
                    )
                    .with_path(&path))
                }
                Err(TryLockError::Error(err)) => {
                    return Err(Error::io("lock", err).with_path(&path))
                }
            },
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(Error::io("open", err).with_path(&path)),
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|err| Error::io("create", err).with_path(&path))?;
        file.try_lock().map_err(|err| {
            Error::invalid(format!("another guest raced to create it: {err}")).with_path(&path)
        })?;
        file.set_len(size)
            .map_err(|err| Error::io("set size of", err).with_path(&path))?;
        let map = Mapping::shared(&file, capacity)
            .map_err(|err| Error::io("mmap", err).with_path(&path))?;
        Ok(GrowableFile {
            path,
            file,
            map,
            size: AtomicU64::new(size),
            grow: Mutex::new(()),
        })
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grow the file to at least `size` bytes (never shrinks).
    fn grow_to(&self, size: u64) -> Result<()> {
        if size > self.map.len as u64 {
            return Err(Error::invalid(format!(
                "{} cannot grow to {size} bytes: capacity is {}",
                self.path.display(),
                self.map.len
            )));
        }
        let _guard = lock(&self.grow);
        if size > self.size() {
            self.file
                .set_len(size)
                .map_err(|err| Error::io("grow", err).with_path(&self.path))?;
            self.size.store(size, Ordering::Release);
        }
        Ok(())
    }
}

impl Drop for GrowableFile {
    fn drop(&mut self) {
        // The guest is gone: its files go too (a backend still mapping them keeps the pages).
        let _ = std::fs::remove_file(&self.path);
    }
}

struct MemoryInner {
    backing: GrowableFile,
    allocator: Mutex<FrameAllocator>,
}

struct FrameAllocator {
    next: u32,
    free: Vec<u32>,
}

/// A guest's memory, `dom<D>.mem`, with a frame allocator. Cloning shares it.
#[derive(Clone)]
pub struct GuestMemory {
    inner: Arc<MemoryInner>,
}

impl GuestMemory {
    /// Create `dir/dom<domid>.mem`, empty, able to grow to `capacity_frames` frames.
    pub fn create(dir: &Path, domid: u16, capacity_frames: u32) -> Result<GuestMemory> {
        let capacity = usize::try_from(capacity_frames)
            .ok()
            .and_then(|frames| frames.checked_mul(PAGE_SIZE))
            .ok_or_else(|| Error::invalid("guest memory capacity too large"))?;
        let backing = GrowableFile::create(dir.join(format!("dom{domid}.mem")), 0, capacity)?;
        Ok(GuestMemory {
            inner: Arc::new(MemoryInner {
                backing,
                allocator: Mutex::new(FrameAllocator {
                    next: 0,
                    free: Vec::new(),
                }),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.backing.path
    }

    /// Frames the file holds now.
    pub fn frames(&self) -> u32 {
        (self.inner.backing.size() / PAGE_SIZE as u64) as u32
    }

    /// The most frames the memory can grow to.
    pub fn capacity_frames(&self) -> u32 {
        (self.inner.backing.map.len / PAGE_SIZE) as u32
    }

    /// Grow the file to at least `frames` frames (for tests that grant frames not yet
    /// allocated; allocation grows it by itself).
    pub fn grow_to(&self, frames: u32) -> Result<()> {
        self.inner
            .backing
            .grow_to(u64::from(frames) * PAGE_SIZE as u64)
    }

    /// Allocate a frame (zero-filled when it is new; a reused one keeps its old bytes).
    pub fn alloc(&self) -> Result<Frame> {
        let gfn = {
            let mut allocator = lock(&self.inner.allocator);
            match allocator.free.pop() {
                Some(gfn) => gfn,
                None => {
                    if allocator.next >= self.capacity_frames() {
                        return Err(Error::invalid(format!(
                            "{}: out of guest frames ({} allocated)",
                            self.path().display(),
                            allocator.next
                        )));
                    }
                    let gfn = allocator.next;
                    self.grow_to(gfn + 1)?;
                    allocator.next += 1;
                    gfn
                }
            }
        };
        let offset = gfn as usize * PAGE_SIZE;
        // SAFETY: gfn < capacity_frames, so the offset lies inside the mapping.
        let ptr = unsafe { self.inner.backing.map.ptr.add(offset) };
        Ok(Frame {
            gfn,
            ptr,
            memory: Arc::clone(&self.inner),
        })
    }

    /// Allocate `count` frames.
    pub fn alloc_many(&self, count: usize) -> Result<Vec<Frame>> {
        (0..count).map(|_| self.alloc()).collect()
    }

    /// Map `frames` again, contiguously and in the order given, as a guest kernel maps
    /// non-contiguous pages of a multi-page ring into one virtual range.
    pub fn map_contiguous(&self, frames: &[&Frame]) -> Result<FrameView> {
        let len = frames.len() * PAGE_SIZE;
        let file = &self.inner.backing.file;
        // SAFETY: a fresh anonymous reservation at an address of the kernel's choosing.
        let reserved = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let map = Mapping::from_mmap(reserved, len)
            .map_err(|err| Error::io("reserve ring view", err).with_path(self.path()))?;
        for (index, frame) in frames.iter().enumerate() {
            if !Arc::ptr_eq(&frame.memory, &self.inner) {
                return Err(Error::invalid("frame of another guest's memory"));
            }
            let offset = libc::off_t::try_from(frame.gfn as usize * PAGE_SIZE)
                .map_err(|_| Error::invalid("frame offset too large"))?;
            // SAFETY: MAP_FIXED replaces one page of the reservation made above, which this
            // function owns (`map`); the frame lies inside the file (it was allocated).
            let ptr = unsafe {
                libc::mmap(
                    map.ptr.as_ptr().add(index * PAGE_SIZE).cast(),
                    PAGE_SIZE,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    offset,
                )
            };
            if ptr == libc::MAP_FAILED {
                let err = io::Error::last_os_error();
                return Err(Error::io("map ring page", err).with_path(self.path()));
            }
        }
        Ok(FrameView { map })
    }
}

/// One guest frame, owned by whoever allocated it; freed on drop.
pub struct Frame {
    gfn: u32,
    ptr: NonNull<u8>,
    memory: Arc<MemoryInner>,
}

// SAFETY: a Frame is the only handle to its page in this process (not Clone); the mapping it
// points into lives as long as the Arc it holds.
unsafe impl Send for Frame {}
// SAFETY: shared access only reads (raw copies); writes need `&mut Frame`.
unsafe impl Sync for Frame {}

impl Frame {
    /// The frame number (gfn) a grant names.
    pub fn gfn(&self) -> u32 {
        self.gfn
    }

    /// First byte of the frame, valid for [`PAGE_SIZE`] bytes while the frame lives.
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    fn check(offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= PAGE_SIZE),
            "{len} bytes at offset {offset} do not fit in a frame"
        );
    }

    /// Copy `data` into the frame at `offset`. The backend must not be using the frame
    /// (no request naming it in flight).
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        Frame::check(offset, data.len());
        // SAFETY: in bounds (checked); the frame is exclusively ours in this process
        // (&mut self), and by protocol no backend writes it while no request is in flight.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        }
    }

    /// Copy bytes of the frame at `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        Frame::check(offset, out.len());
        // SAFETY: in bounds (checked); `out` is a distinct Rust buffer. The backend's writes
        // completed before its response, which we read with acquire before looking here.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        }
    }

    /// Fill the whole frame with `byte`.
    pub fn fill(&mut self, byte: u8) {
        // SAFETY: exactly the frame's bytes, exclusively ours (as in `write`).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), byte, PAGE_SIZE) }
    }

    /// Store a little-endian u64 at `offset` (the benchmark's per-sector stamp).
    pub fn write_u64(&mut self, offset: usize, value: u64) {
        self.write(offset, &value.to_le_bytes());
    }
}

impl Drop for Frame {
    fn drop(&mut self) {
        lock(&self.memory.allocator).free.push(self.gfn);
    }
}

/// Frames mapped contiguously by [`GuestMemory::map_contiguous`]; unmapped on drop.
pub struct FrameView {
    map: Mapping,
}

impl FrameView {
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.map.ptr
    }

    pub fn len(&self) -> usize {
        self.map.len
    }

    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// The `u32` at byte `offset` (4-aligned), as an atomic: ring header fields.
    pub fn atomic_u32(&self, offset: usize) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.map.len);
        // SAFETY: in bounds and aligned (checked; the mapping is page-aligned); the memory
        // lives as long as `self`, and every access from this process to it is atomic or
        // goes through the ring code's own atomics.
        unsafe { AtomicU32::from_ptr(self.map.ptr.as_ptr().add(offset).cast()) }
    }
}

/// One grant entry as the table holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantEntry {
    pub flags: u16,
    pub domid: u16,
    pub frame: u32,
}

/// A guest's grant table, `dom<D>.gnttab`, with a ref allocator.
pub struct GrantTable {
    backing: GrowableFile,
    refs: Mutex<RefAllocator>,
}

struct RefAllocator {
    next: u32,
    free: Vec<u32>,
}

impl GrantTable {
    /// Create `dir/dom<domid>.gnttab` with room for refs `0..capacity` (the file grows a
    /// page of entries at a time as refs are used).
    pub fn create(dir: &Path, domid: u16, capacity: u32) -> Result<GrantTable> {
        let bytes = (capacity as usize)
            .checked_mul(GRANT_ENTRY_SIZE)
            .map(|bytes| bytes.next_multiple_of(PAGE_SIZE))
            .ok_or_else(|| Error::invalid("grant table capacity too large"))?;
        let backing = GrowableFile::create(
            dir.join(format!("dom{domid}.gnttab")),
            PAGE_SIZE as u64,
            bytes.max(PAGE_SIZE),
        )?;
        Ok(GrantTable {
            backing,
            refs: Mutex::new(RefAllocator {
                next: FIRST_FREE_REF,
                free: Vec::new(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.backing.path
    }

    /// Entries the file holds now (`st_size / 8`).
    pub fn len(&self) -> u32 {
        (self.backing.size() / GRANT_ENTRY_SIZE as u64) as u32
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most refs the table can grow to.
    pub fn capacity(&self) -> u32 {
        (self.backing.map.len / GRANT_ENTRY_SIZE) as u32
    }

    /// A free ref (not granted yet).
    pub fn alloc_ref(&self) -> Result<u32> {
        let mut refs = lock(&self.refs);
        if let Some(gref) = refs.free.pop() {
            return Ok(gref);
        }
        if refs.next >= self.capacity() {
            return Err(Error::invalid(format!(
                "{}: out of grant refs",
                self.path().display()
            )));
        }
        refs.next += 1;
        Ok(refs.next - 1)
    }

    /// Return a ref to the allocator (revoke it first).
    pub fn free_ref(&self, gref: u32) {
        lock(&self.refs).free.push(gref);
    }

    /// The three fields of entry `gref` (growing the file to hold it).
    fn fields(&self, gref: u32) -> Result<(&AtomicU16, &AtomicU16, &AtomicU32)> {
        if gref >= self.capacity() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("grant ref {gref} beyond the table's capacity"),
            ));
        }
        let offset = gref as usize * GRANT_ENTRY_SIZE;
        if offset as u64 + GRANT_ENTRY_SIZE as u64 > self.backing.size() {
            self.backing
                .grow_to((offset + GRANT_ENTRY_SIZE).next_multiple_of(PAGE_SIZE) as u64)?;
        }
        // SAFETY: the entry lies inside the mapping and the file (grown above), 8-aligned
        // (page-aligned mapping); the mapping lives as long as `self`; this process only
        // touches the table through these atomics.
        unsafe {
            let entry = self.backing.map.ptr.as_ptr().add(offset);
            Ok((
                AtomicU16::from_ptr(entry.cast()),
                AtomicU16::from_ptr(entry.add(2).cast()),
                AtomicU32::from_ptr(entry.add(4).cast()),
            ))
        }
    }

    /// Grant `frame` to the backend (domain 0) under `gref`: domid and frame first, then,
    /// after a release fence, the flags that make the entry valid.
    pub fn grant(&self, gref: u32, frame: u32, readonly: bool) -> Result<()> {
        self.grant_to(gref, BACKEND_DOMID, frame, readonly)
    }

    /// Grant to any domain (hostile tests grant to the wrong one).
    pub fn grant_to(&self, gref: u32, domid: u16, frame: u32, readonly: bool) -> Result<()> {
        let (flags, entry_domid, entry_frame) = self.fields(gref)?;
        entry_domid.store(domid, Ordering::Relaxed);
        entry_frame.store(frame, Ordering::Relaxed);
        let readonly = if readonly { GTF_READONLY } else { 0 };
        flags.store(GTF_PERMIT_ACCESS | readonly, Ordering::Release);
        Ok(())
    }

    /// Revoke `gref` (flags = 0). Mappings the backend already made stay (as on Xen).
    pub fn revoke(&self, gref: u32) -> Result<()> {
        let (flags, _, _) = self.fields(gref)?;
        flags.store(0, Ordering::Release);
        Ok(())
    }

    /// Read entry `gref` back (for tests).
    pub fn entry(&self, gref: u32) -> Result<GrantEntry> {
        let (flags, domid, frame) = self.fields(gref)?;
        let flags = flags.load(Ordering::Acquire);
        Ok(GrantEntry {
            flags,
            domid: domid.load(Ordering::Relaxed),
            frame: frame.load(Ordering::Relaxed),
        })
    }
}

/// The frontend's end of an event channel: a datagram socket at `evtchn.<D>.<P>.front`.
pub struct FrontEventChannel {
    port: u32,
    socket: UnixDatagram,
    front: PathBuf,
    back: PathBuf,
}

impl FrontEventChannel {
    /// Allocate a free port of domain `domid` in `dir` (the lowest one not bound).
    pub fn bind(dir: &Path, domid: u16) -> Result<FrontEventChannel> {
        for port in 1..=MAX_PORT {
            let front = dir.join(format!("evtchn.{domid}.{port}.front"));
            match UnixDatagram::bind(&front) {
                Ok(socket) => {
                    socket
                        .set_nonblocking(true)
                        .map_err(|err| Error::io("set nonblocking", err).with_path(&front))?;
                    return Ok(FrontEventChannel {
                        port,
                        socket,
                        front,
                        back: dir.join(format!("evtchn.{domid}.{port}.back")),
                    });
                }
                Err(err) if err.kind() == io::ErrorKind::AddrInUse => continue,
                Err(err) => return Err(Error::io("bind event channel", err).with_path(&front)),
            }
        }
        Err(Error::invalid(format!(
            "{}: every event channel port of domain {domid} is bound",
            dir.display()
        )))
    }

    pub fn port(&self) -> u32 {
        self.port
    }

    /// Path of our socket.
    pub fn path(&self) -> &Path {
        &self.front
    }

    /// Kick the backend: one datagram, the port number. A backend not bound (yet or any
    /// more) or with a notification already pending is not an error.
    pub fn notify(&self) -> Result<()> {
        match self.socket.send_to(&self.port.to_le_bytes(), &self.back) {
            Ok(_) => Ok(()),
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::NotFound
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::WouldBlock
                ) =>
            {
                Ok(())
            }
            Err(err) => Err(Error::io("notify", err).with_path(&self.back)),
        }
    }

    /// Consume pending notifications; true when there were any.
    pub fn drain(&self) -> Result<bool> {
        let mut any = false;
        let mut buf = [0u8; 16];
        loop {
            match self.socket.recv(&mut buf) {
                Ok(_) => any = true,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(Error::io("receive event", err).with_path(&self.front)),
            }
        }
    }

    /// Sleep until a notification arrives or `timeout` passes, then drain; true when one
    /// arrived.
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        let mut pollfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd, a live local; the fd is owned by `self.socket`.
        let rc = unsafe { libc::poll(&mut pollfd, 1, millis) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(Error::io("poll event channel", err).with_path(&self.front));
            }
        }
        self.drain()
    }
}

impl Drop for FrontEventChannel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.front);
    }
}
