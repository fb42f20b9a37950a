//! The few system calls std does not wrap. Every `unsafe` of the image layer, and of where
//! serve's threads run, lives here.

use std::io;
use std::os::fd::AsRawFd;

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 127)`: zero a byte range of a block device (may unmap it).
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Size in bytes of the block device open as `fd`.
pub fn block_device_size(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer, which points at a
    // live, writable local for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Zero `[offset, offset+len)` of a block device; devices that can unmap do so.
pub fn block_device_zero_out(fd: &impl AsRawFd, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer, which points at a
    // live local array of exactly that shape.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `fallocate(2)` with the given mode on a regular file.
pub fn fallocate(fd: &impl AsRawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    loop {
        // SAFETY: fallocate takes plain integers and an fd owned by the caller; no memory
        // is shared with the kernel.
        let rc = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `lseek(SEEK_DATA or SEEK_HOLE)`: the next data or hole offset at or after `offset`,
/// or `None` when there is none before the end of the file.
pub fn seek(fd: &impl AsRawFd, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek takes plain integers and an fd owned by the caller.
    let rc = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(rc as u64))
}

/// `TMPFS_MAGIC` of linux/magic.h: the `f_type` statfs reports for tmpfs (and /dev/shm).
const TMPFS_MAGIC: libc::c_long = 0x0102_1994;

/// Whether `fd` lives on tmpfs: memory-backed, where a read or write never waits for a
/// device.
pub fn is_tmpfs(fd: &impl AsRawFd) -> io::Result<bool> {
    // SAFETY: statfs is plain old data; all-zero bytes are a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs through the pointer, which points at a live local.
    let rc = unsafe { libc::fstatfs(fd.as_raw_fd(), &mut stat) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_type as libc::c_long == TMPFS_MAGIC)
}

/// The alignment O_DIRECT I/O on `fd` needs, for offsets, lengths and memory alike, when
/// the kernel reports it (statx STATX_DIOALIGN, Linux 6.1 and later); `None` when not.
pub fn direct_io_alignment(fd: &impl AsRawFd) -> Option<u32> {
    // SAFETY: statx is plain old data; all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // The raw system call, not glibc's wrapper: dom0s with a glibc older than 2.28 lack it.
    // SAFETY: with AT_EMPTY_PATH and an empty (NUL-terminated) path statx describes the fd
    // itself, writing one statx through the pointer, which points at a live local.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_statx,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx as *mut libc::statx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align.max(stx.stx_dio_mem_align))
}

/// The CPUs the calling thread may run on, in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bitmask; all-zero bytes are the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the kernel writes at most the size given into
    // the set, a live local of that size.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, inside the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Let the calling thread run on `cpus` only (threads it starts afterwards inherit this).
pub fn run_current_thread_on(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bitmask; all-zero bytes are the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is past the kernel's CPU set"),
            ));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above), inside the set.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the kernel reads the size given from the set, a
    // live local of that size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
