//! The Linux platform: /dev/xen/gntdev and /dev/xen/evtchn of a real dom0.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{DomId, EventChannel, GrantAccess, Platform};
use crate::error::{Error, Result};

mod evtchn;
mod gntdev;

pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

/// The kernel ABI of xen/sys/gntdev.h and xen/sys/evtchn.h (Linux's
/// include/uapi/xen/{gntdev,evtchn}.h), checked against the installed headers by
/// tests/xen_linux_abi.rs.
pub mod abi {
    use std::ffi::{c_uint, c_ulong, c_void};
    use std::mem::size_of;

    /// `_IOC(_IOC_NONE, kind, nr, size)` with the generic encoding (x86, arm): no direction
    /// bits, size in bits 16..30.
    const fn ioc_none(kind: u8, nr: u8, size: usize) -> c_ulong {
        ((size as c_ulong) << 16) | ((kind as c_ulong) << 8) | nr as c_ulong
    }

    /// `struct ioctl_gntdev_grant_ref`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntdevGrantRef {
        pub domid: u32,
        /// `ref` in C.
        pub gref: u32,
    }

    /// `struct ioctl_gntdev_map_grant_ref`: `count` refs follow from `refs` on (the C struct
    /// declares `refs[1]`; the ioctl reads `count` of them).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntdevMapGrantRef {
        pub count: u32,
        pub pad: u32,
        /// Out: the mmap offset of the new map.
        pub index: u64,
        pub refs: [GntdevGrantRef; 1],
    }

    /// `struct ioctl_gntdev_unmap_grant_ref`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntdevUnmapGrantRef {
        pub index: u64,
        pub count: u32,
        pub pad: u32,
    }

    /// `struct ioctl_gntdev_set_max_grants`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntdevSetMaxGrants {
        pub count: u32,
    }

    /// The `foreign` member of a grant copy segment's source/dest union.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct GntdevCopyForeign {
        /// `ref` in C.
        pub gref: u32,
        pub offset: u16,
        pub domid: u16,
    }

    /// The source/dest union of `struct ioctl_gntdev_grant_copy_segment`: `virt` when the
    /// matching `GNTCOPY_*_gref` flag is clear, else `foreign`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub union GntdevCopyPtr {
        pub virt: *mut c_void,
        pub foreign: GntdevCopyForeign,
    }

    /// `struct ioctl_gntdev_grant_copy_segment`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct GntdevGrantCopySegment {
        pub source: GntdevCopyPtr,
        pub dest: GntdevCopyPtr,
        pub len: u16,
        pub flags: u16,
        /// Out: a `GNTST_*` code.
        pub status: i16,
    }

    /// `struct ioctl_gntdev_grant_copy`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub struct GntdevGrantCopy {
        pub count: c_uint,
        pub segments: *mut GntdevGrantCopySegment,
    }

    /// `GNTCOPY_source_gref` / `GNTCOPY_dest_gref` of xen/grant_table.h.
    pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
    pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

    pub const IOCTL_GNTDEV_MAP_GRANT_REF: c_ulong =
        ioc_none(b'G', 0, size_of::<GntdevMapGrantRef>());
    pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: c_ulong =
        ioc_none(b'G', 1, size_of::<GntdevUnmapGrantRef>());
    pub const IOCTL_GNTDEV_SET_MAX_GRANTS: c_ulong =
        ioc_none(b'G', 3, size_of::<GntdevSetMaxGrants>());
    pub const IOCTL_GNTDEV_GRANT_COPY: c_ulong = ioc_none(b'G', 8, size_of::<GntdevGrantCopy>());

    /// `struct ioctl_evtchn_bind_interdomain`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct EvtchnBindInterdomain {
        pub remote_domain: c_uint,
        pub remote_port: c_uint,
    }

    /// `struct ioctl_evtchn_unbind`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct EvtchnUnbind {
        pub port: c_uint,
    }

    /// `struct ioctl_evtchn_notify`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    pub struct EvtchnNotify {
        pub port: c_uint,
    }

    pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: c_ulong =
        ioc_none(b'E', 1, size_of::<EvtchnBindInterdomain>());
    pub const IOCTL_EVTCHN_UNBIND: c_ulong = ioc_none(b'E', 3, size_of::<EvtchnUnbind>());
    pub const IOCTL_EVTCHN_NOTIFY: c_ulong = ioc_none(b'E', 4, size_of::<EvtchnNotify>());
    pub const IOCTL_EVTCHN_RESET: c_ulong = ioc_none(b'E', 5, 0);
}

/// The running dom0's Xen devices.
pub struct LinuxPlatform;

impl Platform for LinuxPlatform {
    fn grant_access(&self, domid: DomId, max_grants: u32) -> Result<Box<dyn GrantAccess>> {
        Ok(Box::new(gntdev::Gntdev::open(domid, max_grants)?))
    }

    fn bind_interdomain(&self, domid: DomId, remote_port: u32) -> Result<Box<dyn EventChannel>> {
        Ok(Box::new(evtchn::Evtchn::bind(domid, remote_port)?))
    }
}

/// Opens a Xen device read-write (close-on-exec, as std always does).
fn open_device(path: &str, flags: libc::c_int) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::NotFound {
                " (not a Xen dom0, or the xen-gntdev/xen-evtchn modules are not loaded)"
            } else {
                ""
            };
            Error::io(&format!("open Xen device{hint}"), e).with_path(Path::new(path))
        })
}

/// `ioctl(fd, request, arg)`: the non-negative result, or the OS error.
///
/// # Safety
/// `arg` must be what `request` expects: a pointer to a live value of the request's type
/// (writable when the kernel writes back), or null/ignored for requests without one.
unsafe fn ioctl<T>(file: &File, request: libc::c_ulong, arg: *mut T) -> io::Result<libc::c_int> {
    loop {
        // SAFETY: forwarded from the caller's contract on `arg`; the fd is open.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, arg) };
        if rc >= 0 {
            return Ok(rc);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
