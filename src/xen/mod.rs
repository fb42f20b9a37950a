//! The platform layer: grant access and event channels, the two things a backend needs from
//! Xen. `linux` drives /dev/xen/gntdev and /dev/xen/evtchn; `sim` implements the xensim
//! contract (../shared/xensim.md) on files and unix sockets. Nothing above this layer knows
//! which one is in use.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use crate::error::{Error, Result};

pub mod linux;
pub mod sim;

/// A Xen domain id.
pub type DomId = u16;
/// A grant reference in the granting domain's table.
pub type GrantRef = u32;

/// Grant-table status codes (`GNTST_*` of xen/grant_table.h) a copy or map can report.
pub mod gntst {
    pub const OKAY: i16 = 0;
    pub const GENERAL_ERROR: i16 = -1;
    pub const BAD_DOMAIN: i16 = -2;
    pub const BAD_GNTREF: i16 = -3;
    pub const PERMISSION_DENIED: i16 = -8;
    pub const BAD_PAGE: i16 = -9;

    /// The `GNTST_*` name of a status, for messages.
    pub fn name(status: i16) -> &'static str {
        match status {
            OKAY => "GNTST_okay",
            GENERAL_ERROR => "GNTST_general_error",
            BAD_DOMAIN => "GNTST_bad_domain",
            BAD_GNTREF => "GNTST_bad_gntref",
            PERMISSION_DENIED => "GNTST_permission_denied",
            BAD_PAGE => "GNTST_bad_page",
            _ => "GNTST_unknown",
        }
    }
}

/// Why a grant map failed when the platform knows it per ref (xensim does; Linux gntdev
/// reports only an errno). Carried as the source of the [`Error`] that [`GrantAccess::map`]
/// returns; [`GrantFailure::of`] gets it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantFailure {
    pub gref: GrantRef,
    /// A `gntst` code.
    pub status: i16,
}

impl GrantFailure {
    /// The error for this failure; `context` says what was being done (names the files).
    pub fn into_error(self, context: &str) -> Error {
        Error::io(context, io::Error::other(self))
    }

    /// The grant failure behind `err`, if it is one.
    pub fn of(err: &Error) -> Option<GrantFailure> {
        let source = std::error::Error::source(err)?;
        let io_err = source.downcast_ref::<io::Error>()?;
        io_err.get_ref()?.downcast_ref::<GrantFailure>().copied()
    }
}

impl fmt::Display for GrantFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "grant ref {}: {} ({})",
            self.gref,
            gntst::name(self.status),
            self.status
        )
    }
}

impl std::error::Error for GrantFailure {}

/// Foreign pages mapped into this process, contiguous in ref order. Unmapped on drop.
pub trait GrantMapping: Send {
    /// First byte of the mapping; valid for `len()` bytes until the mapping is dropped.
    fn as_ptr(&self) -> NonNull<u8>;
    /// `4096 * refs`.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn writable(&self) -> bool;
}

/// Which way a grant copy moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    /// From the granted frame into local memory (a guest WRITE).
    FromGuest,
    /// From local memory into the granted frame (a guest READ).
    ToGuest,
}

/// One segment of a grant copy (as `gntdev_grant_copy_segment`): `len` bytes at
/// `offset` inside the frame granted by `gref`, to or from `local`.
#[derive(Debug, Clone, Copy)]
pub struct CopySegment {
    pub gref: GrantRef,
    /// Byte offset inside the granted page; `offset + len <= 4096`.
    pub offset: u16,
    pub len: u16,
    pub local: NonNull<u8>,
    /// Filled in by [`GrantAccess::copy`]: `gntst::OKAY` or the failure.
    pub status: i16,
}

/// Access to one foreign domain's grants. One per connected ring (or shared by the queues
/// of one device); used from one thread at a time.
pub trait GrantAccess: Send {
    /// Map `refs` (at most a ring's or an indirect request's worth) contiguously.
    /// A failure of any ref fails the whole map (the error names the ref and `GNTST_*`).
    fn map(&mut self, refs: &[GrantRef], writable: bool) -> Result<Box<dyn GrantMapping>>;

    /// Copy every segment, filling each one's `status`; returns Err only when the copy
    /// could not be attempted at all (the device is gone).
    ///
    /// # Safety
    /// Every `local` pointer must be valid for `len` bytes (readable for `FromGuest`,
    /// writable for `ToGuest`) and not aliased by anything else for the call's duration.
    unsafe fn copy(&mut self, direction: CopyDirection, segments: &mut [CopySegment])
        -> Result<()>;
}

/// One bound interdomain event channel.
pub trait EventChannel: Send {
    /// Our local port (in xensim, the frontend's port number).
    fn local_port(&self) -> u32;
    /// Readable while notifications are pending; poll it, then call [`Self::drain`].
    fn fd(&self) -> RawFd;
    /// Consume pending notifications and re-arm (unmask); true when there were any.
    fn drain(&mut self) -> Result<bool>;
    /// Kick the other end.
    fn notify(&self) -> Result<()>;
}

/// A host's Xen devices: opens grant access and binds event channels.
pub trait Platform: Send + Sync {
    /// Grant access to `domid`'s grants. `max_grants` bounds how many may be mapped at once
    /// (gntdev SET_MAX_GRANTS).
    fn grant_access(&self, domid: DomId, max_grants: u32) -> Result<Box<dyn GrantAccess>>;
    /// Bind to the frontend's `remote_port` in `domid`.
    fn bind_interdomain(&self, domid: DomId, remote_port: u32) -> Result<Box<dyn EventChannel>>;
}
