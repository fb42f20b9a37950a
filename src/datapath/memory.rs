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
