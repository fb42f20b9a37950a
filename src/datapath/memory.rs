//! The datapath's own memory and wake-ups: the per-queue buffer pool that grant copies land
//! in (registered with io_uring as fixed buffers), and eventfds. The unsafe of the datapath
//! that is not about engines lives here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use crate::blkif::PAGE_SIZE;
use crate::error::{Error, Result};

/// A page-granular pool of anonymous, page-aligned memory. Pages are touched (and count
/// toward RSS) only once used, unless the engine pins them by registering the pool.
pub struct BufferPool {
    base: NonNull<u8>,
    pages: usize,
    /// One bit per page, set while allocated.
    used: Vec<u64>,
    free_pages: usize,
}

/// A run of pool pages; give it back with [`BufferPool::free`].
#[derive(Debug)]
pub struct PoolBuffer {
    first_page: usize,
    pages: usize,
    ptr: NonNull<u8>,
}

impl PoolBuffer {
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }
}

impl BufferPool {
    /// A pool of `bytes` (rounded up to pages).
    pub fn new(bytes: usize) -> Result<BufferPool> {
        let pages = bytes.div_ceil(PAGE_SIZE).max(1);
        // SAFETY: an anonymous private mapping with no address hint; the kernel picks a fresh
        // range that nothing else in the process uses. The result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Error::io("mmap buffer pool", io::Error::last_os_error()));
        }
        let base = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| Error::invalid("mmap returned a null buffer pool"))?;
        Ok(BufferPool {
            base,
            pages,
            used: vec![0; pages.div_ceil(64)],
            free_pages: pages,
        })
    }

    /// The whole pool, for engine registration.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.base.as_ptr(), self.pages * PAGE_SIZE)
    }

    fn is_used(&self, page: usize) -> bool {
        self.used[page / 64] & (1 << (page % 64)) != 0
    }

    fn set_used(&mut self, first: usize, count: usize, used: bool) {
        for page in first..first + count {
            if used {
                self.used[page / 64] |= 1 << (page % 64);
            } else {
                self.used[page / 64] &= !(1 << (page % 64));
            }
        }
    }

    /// First-fit run of pages holding `bytes`; `None` while the pool is too full.
    pub fn alloc(&mut self, bytes: usize) -> Option<PoolBuffer> {
        let want = bytes.div_ceil(PAGE_SIZE).max(1);
        if want > self.free_pages {
            return None;
        }
        let mut run_start = 0;
        let mut run_len = 0;
        let mut page = 0;
        while page < self.pages {
            // Skip whole used words quickly.
            if page % 64 == 0 && self.used[page / 64] == u64::MAX {
                page += 64;
                run_len = 0;
                continue;
            }
            if self.is_used(page) {
                run_len = 0;
            } else {
                if run_len == 0 {
                    run_start = page;
                }
                run_len += 1;
                if run_len == want {
                    self.set_used(run_start, want, true);
                    self.free_pages -= want;
                    // SAFETY: run_start + want <= self.pages, so the offset stays inside the
                    // mapping made in `new`.
                    let ptr = unsafe { self.base.add(run_start * PAGE_SIZE) };
                    return Some(PoolBuffer {
                        first_page: run_start,
                        pages: want,
                        ptr,
                    });
                }
            }
            page += 1;
        }
        None
    }

    pub fn free(&mut self, buffer: PoolBuffer) {
        self.set_used(buffer.first_page, buffer.pages, false);
        self.free_pages += buffer.pages;
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: base/pages describe exactly the mapping made in `new`; the engine that may
        // have used it is dropped (and has drained its I/O) before the pool, see QueueThread.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.pages * PAGE_SIZE);
        }
    }
}

/// Zero `len` bytes at `ptr`.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes and not read or written concurrently.
pub unsafe fn zero(ptr: NonNull<u8>, len: usize) {
    // SAFETY: forwarded to the caller.
    unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) }
}

/// Make the allocator return blocks of 128 KiB and more to the kernel when they are freed.
/// glibc raises that threshold after the first such free, and from then on every worker
/// thread's arena keeps the bounce buffers of large requests (a 1 MiB request split over
/// several guest pages going through the worker) resident: serve's RSS under 1 MiB qcow2
/// writes was 30 MiB, against 20 MiB with the threshold fixed at glibc's default start.
pub fn return_large_blocks_when_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it touches no memory of ours. Its
    // result (0 when refused) changes nothing but memory use, so it is not checked.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// A Linux eventfd: a counter that makes the fd readable while non-zero.
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io("eventfd", io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Make the fd readable.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local. A full counter (EAGAIN) is already
        // readable, which is all a signal needs, so the result is not checked.
        unsafe {
            libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// Reset the counter; true when it had been signalled.
    pub fn clear(&self) -> bool {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live local.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
        n == 8
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A pointer and length handed to another thread or the kernel while a request owns the
/// memory behind it (a pool buffer or a mapped guest page).
#[derive(Debug, Clone, Copy)]
pub struct IoMemory {
    pub ptr: NonNull<u8>,
    pub len: usize,
}

// SAFETY: IoMemory is only created for memory that the owning request keeps alive, and only
// one party (the engine or the worker) touches it until that party reports completion.
unsafe impl Send for IoMemory {}

impl IoMemory {
    /// # Safety
    /// The memory must be valid for reads of `len` bytes for the returned lifetime.
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        // SAFETY: forwarded to the caller.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// # Safety
    /// The memory must be valid for writes of `len` bytes and unaliased for the lifetime.
    pub unsafe fn as_mut_slice<'a>(self) -> &'a mut [u8] {
        // SAFETY: forwarded to the caller.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// `offset` bytes further on.
    ///
    /// # Safety
    /// `offset + len` must stay inside the allocation.
    pub unsafe fn slice(self, offset: usize, len: usize) -> IoMemory {
        IoMemory {
            // SAFETY: forwarded to the caller.
            ptr: unsafe { self.ptr.add(offset) },
            len,
        }
    }
}

/// Guest memory that is one run of bytes on disk but several pieces in memory (a request's
/// segments, each on its own mapped guest page), or a window of such a run.
#[derive(Debug, Clone, Copy)]
pub struct Scatter<'a> {
    parts: &'a [IoMemory],
    /// Bytes of `parts` before the window.
    skip: usize,
    /// Bytes in the window.
    len: usize,
}

impl<'a> Scatter<'a> {
    pub fn new(parts: &'a [IoMemory]) -> Scatter<'a> {
        Scatter {
            parts,
            skip: 0,
            len: parts.iter().map(|p| p.len).sum(),
        }
    }

    pub fn len(self) -> usize {
        self.len
    }

    /// The window `[offset, offset + len)` of this one, clamped to it.
    pub fn sub(self, offset: usize, len: usize) -> Scatter<'a> {
        let offset = offset.min(self.len);
        Scatter {
            parts: self.parts,
            skip: self.skip + offset,
            len: len.min(self.len - offset),
        }
    }

    /// The pieces of memory in the window, in disk order.
    pub fn iter(self) -> impl Iterator<Item = IoMemory> + 'a {
        let (mut skip, mut left) = (self.skip, self.len);
        self.parts.iter().filter_map(move |part| {
            if left == 0 {
                return None;
            }
            if skip >= part.len {
                skip -= part.len;
                return None;
            }
            let n = (part.len - skip).min(left);
            // SAFETY: skip + n <= part.len: the piece stays inside the part.
            let piece = unsafe { part.slice(skip, n) };
            skip = 0;
            left -= n;
            Some(piece)
        })
    }

    /// The window as one piece of memory, when it is one.
    pub fn single(self) -> Option<IoMemory> {
        let mut pieces = self.iter();
        let first = pieces.next()?;
        pieces.next().is_none().then_some(first)
    }

    /// Fill the window with zeros.
    ///
    /// # Safety
    /// The pieces must be valid for writes and unaliased.
    pub unsafe fn zero(self) {
        for piece in self.iter() {
            // SAFETY: forwarded to the caller.
            unsafe { zero(piece.ptr, piece.len) };
        }
    }

    /// The window's pieces, owned (for a worker job).
    pub fn to_vec(self) -> Vec<IoMemory> {
        self.iter().collect()
    }
}

/// Read into scattered memory through a contiguous buffer: `read` fills `[0, total)` of it,
/// straight into the memory when it is one piece, else into a bounce buffer copied out.
///
/// # Safety
/// Every piece must be valid for writes and unaliased until this returns.
pub unsafe fn read_scattered(
    pieces: &[IoMemory],
    read: impl FnOnce(&mut [u8]) -> Result<()>,
) -> Result<()> {
    if let [one] = pieces {
        // SAFETY: forwarded to the caller.
        return read(unsafe { one.as_mut_slice() });
    }
    let mut bounce = vec![0u8; pieces.iter().map(|p| p.len).sum()];
    read(&mut bounce)?;
    let mut at = 0;
    for piece in pieces {
        // SAFETY: forwarded to the caller; `bounce` holds the sum of the pieces' lengths.
        unsafe { piece.as_mut_slice() }.copy_from_slice(&bounce[at..at + piece.len]);
        at += piece.len;
    }
    Ok(())
}

/// Write from scattered memory through a contiguous buffer: `write` gets the pieces' bytes
/// in order, as they are when it is one piece, else gathered into a bounce buffer.
///
/// # Safety
/// Every piece must be valid for reads and unchanged until this returns.
pub unsafe fn write_scattered(
    pieces: &[IoMemory],
    write: impl FnOnce(&[u8]) -> Result<()>,
) -> Result<()> {
    if let [one] = pieces {
        // SAFETY: forwarded to the caller.
        return write(unsafe { one.as_slice() });
    }
    let mut bounce = Vec::with_capacity(pieces.iter().map(|p| p.len).sum());
    for piece in pieces {
        // SAFETY: forwarded to the caller.
        bounce.extend_from_slice(unsafe { piece.as_slice() });
    }
    write(&bounce)
}

/// `iovec`s for `pieces`, appended to `out`.
pub fn iovecs(pieces: impl Iterator<Item = IoMemory>, out: &mut Vec<libc::iovec>) {
    out.extend(pieces.map(|p| libc::iovec {
        iov_base: p.ptr.as_ptr().cast(),
        iov_len: p.len,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_allocates_first_fit_and_reuses() {
        let mut pool = BufferPool::new(8 * PAGE_SIZE).unwrap();
        let a = pool.alloc(3 * PAGE_SIZE).unwrap();
        let b = pool.alloc(1).unwrap();
        assert_eq!(b.first_page, 3);
        assert!(pool.alloc(5 * PAGE_SIZE).is_none());
        pool.free(a);
        let c = pool.alloc(2 * PAGE_SIZE).unwrap();
        assert_eq!(c.first_page, 0);
        let d = pool.alloc(4 * PAGE_SIZE).unwrap();
        assert_eq!(d.first_page, 4);
        assert_eq!(d.pages, 4);
        pool.free(b);
        pool.free(c);
        pool.free(d);
        assert!(pool.alloc(8 * PAGE_SIZE).is_some());
    }

    /// Pieces of `backing` (three runs, out of order) as a request's segments would be.
    fn scattered(backing: &mut [u8]) -> Vec<IoMemory> {
        let base = NonNull::new(backing.as_mut_ptr()).unwrap();
        [(20, 10), (0, 5), (40, 3)]
            .iter()
            .map(|&(at, len)| IoMemory {
                // SAFETY: every run lies inside `backing` (64 bytes).
                ptr: unsafe { base.add(at) },
                len,
            })
            .collect()
    }

    #[test]
    fn scatter_windows_clip_pieces() {
        let mut backing: Vec<u8> = (0..64).collect();
        let pieces = scattered(&mut backing);
        let whole = Scatter::new(&pieces);
        assert_eq!(whole.len(), 18);
        assert!(whole.single().is_none());
        let bytes = |s: Scatter| -> Vec<u8> {
            s.iter()
                // SAFETY: the pieces lie inside `backing`, alive and not written meanwhile.
                .flat_map(|p| unsafe { p.as_slice() }.to_vec())
                .collect()
        };
        let all: Vec<u8> = (20..30).chain(0..5).chain(40..43).collect();
        assert_eq!(bytes(whole), all);
        // Windows across piece boundaries, inside one piece, and clamped at the end.
        assert_eq!(bytes(whole.sub(8, 4)), vec![28, 29, 0, 1]);
        let inner = whole.sub(11, 2);
        assert_eq!(inner.single().map(|p| p.len), Some(2));
        assert_eq!(bytes(inner), vec![1, 2]);
        assert_eq!(bytes(whole.sub(16, 100)), vec![41, 42]);
        assert_eq!(whole.sub(30, 5).len(), 0);
        assert_eq!(bytes(whole.sub(9, 6).sub(1, 3)), vec![0, 1, 2]);
        let mut iov = Vec::new();
        iovecs(whole.sub(8, 9).iter(), &mut iov);
        assert_eq!(
            iov.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
            vec![2, 5, 2]
        );
        // SAFETY: as above; nothing else reads `backing` meanwhile.
        unsafe { whole.sub(3, 9).zero() };
        assert_eq!(&backing[20..30], &[20, 21, 22, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&backing[0..5], &[0, 0, 2, 3, 4]);
    }

    #[test]
    fn scattered_reads_and_writes_go_through_one_buffer() {
        let mut backing = vec![0u8; 64];
        let pieces = scattered(&mut backing);
        // SAFETY: the pieces lie inside `backing`, which nothing else touches meanwhile.
        unsafe {
            read_scattered(&pieces, |buf| {
                assert_eq!(buf.len(), 18);
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = 100 + i as u8;
                }
                Ok(())
            })
        }
        .unwrap();
        let mut gathered = Vec::new();
        // SAFETY: as above.
        unsafe {
            write_scattered(&pieces, |data| {
                gathered.extend_from_slice(data);
                Ok(())
            })
        }
        .unwrap();
        assert_eq!(gathered, (100..118).collect::<Vec<u8>>());
        assert_eq!(&backing[0..5], &[110, 111, 112, 113, 114]);
        assert_eq!(&backing[20..30], &(100..110).collect::<Vec<u8>>()[..]);
        // A failed read leaves the memory as it was.
        // SAFETY: as above.
        let failed =
            unsafe { read_scattered(&pieces, |_| Err(crate::error::Error::invalid("refused"))) };
        assert!(failed.is_err());
        assert_eq!(&backing[40..43], &[115, 116, 117]);
    }

    #[test]
    fn eventfd_signals_once() {
        let e = EventFd::new().unwrap();
        assert!(!e.clear());
        e.signal();
        e.signal();
        assert!(e.clear());
        assert!(!e.clear());
    }
}
