//! Grant access through /dev/xen/gntdev: MAP_GRANT_REF + mmap, UNMAP_GRANT_REF,
//! SET_MAX_GRANTS and GRANT_COPY.

use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::abi::{
    GntdevCopyForeign, GntdevCopyPtr, GntdevGrantCopy, GntdevGrantCopySegment, GntdevGrantRef,
    GntdevMapGrantRef, GntdevSetMaxGrants, GntdevUnmapGrantRef, GNTCOPY_DEST_GREF,
    GNTCOPY_SOURCE_GREF, IOCTL_GNTDEV_GRANT_COPY, IOCTL_GNTDEV_MAP_GRANT_REF,
    IOCTL_GNTDEV_SET_MAX_GRANTS, IOCTL_GNTDEV_UNMAP_GRANT_REF,
};
use super::{ioctl, open_device, GNTDEV_PATH};
use crate::error::{Error, Result};
use crate::xen::{gntst, CopyDirection, CopySegment, DomId, GrantAccess, GrantMapping, GrantRef};

const PAGE_SIZE: usize = 4096;

/// One open /dev/xen/gntdev, for one foreign domain's grants.
pub(super) struct Gntdev {
    /// Shared with the mappings: each unmaps its grants through it on drop.
    device: Arc<File>,
    domid: DomId,
    max_grants: usize,
    mapped: Arc<AtomicUsize>,
    /// Reused by every copy: the ioctl's segment array and which caller segment each is.
    batch: Vec<GntdevGrantCopySegment>,
    batch_source: Vec<usize>,
}

// SAFETY: the raw pointers in `batch` are only meaningful during one `copy` call (which has
// `&mut self`); between calls they are stale values never dereferenced. The rest is Send.
unsafe impl Send for Gntdev {}

impl Gntdev {
    pub(super) fn open(domid: DomId, max_grants: u32) -> Result<Gntdev> {
        let device = open_device(GNTDEV_PATH, libc::O_CLOEXEC)?;
        let mut limit = GntdevSetMaxGrants { count: max_grants };
        // SAFETY: SET_MAX_GRANTS reads one ioctl_gntdev_set_max_grants, a live local.
        match unsafe { ioctl(&device, IOCTL_GNTDEV_SET_MAX_GRANTS, &mut limit) } {
            Ok(_) => {}
            // Kernels since the pv-ops merge have no per-open limit and no such ioctl; the
            // limit is then enforced here only.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {}
            Err(e) => {
                return Err(Error::io("gntdev SET_MAX_GRANTS", e).with_path(Path::new(GNTDEV_PATH)))
            }
        }
        Ok(Gntdev {
            device: Arc::new(device),
            domid,
            max_grants: max_grants as usize,
            mapped: Arc::new(AtomicUsize::new(0)),
            batch: Vec::new(),
            batch_source: Vec::new(),
        })
    }

    /// MAP_GRANT_REF for `refs`: the mmap offset the kernel chose.
    fn map_grant_refs(&self, refs: &[GrantRef]) -> io::Result<u64> {
        let count = u32::try_from(refs.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many refs"))?;
        // The C struct ends in refs[1] and the kernel reads `count` entries from there:
        // build it in an array of whole structs (8-aligned) long enough for all of them.
        let header =
            std::mem::size_of::<GntdevMapGrantRef>() - std::mem::size_of::<GntdevGrantRef>();
        let bytes = header + refs.len() * std::mem::size_of::<GntdevGrantRef>();
        let structs = bytes.div_ceil(std::mem::size_of::<GntdevMapGrantRef>());
        let mut request = vec![GntdevMapGrantRef::default(); structs];
        let first: *mut GntdevMapGrantRef = request.as_mut_ptr();
        // SAFETY: `request` holds at least `bytes` bytes from `first`, so the header and
        // `refs.len()` entries from `first.refs` are inside the allocation, suitably aligned
        // (GntdevGrantRef needs 4, the Vec gives 8).
        unsafe {
            (*first).count = count;
            let entries = ptr::addr_of_mut!((*first).refs).cast::<GntdevGrantRef>();
            for (i, &gref) in refs.iter().enumerate() {
                entries.add(i).write(GntdevGrantRef {
                    domid: u32::from(self.domid),
                    gref,
                });
            }
        }
        // SAFETY: MAP_GRANT_REF reads the header and `count` entries from `first` (all inside
        // `request`, see above) and writes `index` back; `request` lives across the call.
        unsafe { ioctl(&self.device, IOCTL_GNTDEV_MAP_GRANT_REF, first) }?;
        Ok(request[0].index)
    }
}

impl GrantAccess for Gntdev {
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
        let context = || {
            format!(
                "map of domain {}'s grant refs {:?}{}",
                self.domid,
                &refs[..count.min(8)],
                if count > 8 { " ..." } else { "" }
            )
        };
        let index = match self.map_grant_refs(refs) {
            Ok(index) => index,
            Err(e) => {
                self.mapped.fetch_sub(count, Ordering::Relaxed);
                return Err(
                    Error::io(&format!("gntdev MAP_GRANT_REF ({})", context()), e)
                        .with_path(Path::new(GNTDEV_PATH)),
                );
            }
        };
        // Without PROT_WRITE gntdev maps the grants read-only (GNTMAP_readonly), which is
        // what a read-only grant requires.
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let offset = libc::off_t::try_from(index).unwrap_or(libc::off_t::MAX);
        // SAFETY: a new shared mapping at a kernel-chosen address of the gntdev fd at the
        // offset MAP_GRANT_REF returned for exactly `count` pages; the kernel maps the grants
        // there (hypercall) or fails the mmap.
        let address = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                offset,
            )
        };
        let base = match NonNull::new(address.cast::<u8>()) {
            Some(base) if address != libc::MAP_FAILED => base,
            _ => {
                let err = io::Error::last_os_error();
                unmap_grant_refs(&self.device, index, count);
                self.mapped.fetch_sub(count, Ordering::Relaxed);
                return Err(Error::io(
                    &format!(
                        "mmap of gntdev ({}; a bad, revoked or read-only grant)",
                        context()
                    ),
                    err,
                )
                .with_path(Path::new(GNTDEV_PATH)));
            }
        };
        Ok(Box::new(LinuxMapping {
            base,
            len,
            writable,
            index,
            count,
            device: Arc::clone(&self.device),
            mapped: Arc::clone(&self.mapped),
        }))
    }

    unsafe fn copy(
        &mut self,
        direction: CopyDirection,
        segments: &mut [CopySegment],
    ) -> Result<()> {
        self.batch.clear();
        self.batch_source.clear();
        for (i, segment) in segments.iter_mut().enumerate() {
            // gntdev fails the whole ioctl (EINVAL) on a segment crossing the granted page:
            // fail that segment alone instead.
            if usize::from(segment.offset) + usize::from(segment.len) > PAGE_SIZE {
                segment.status = gntst::GENERAL_ERROR;
                continue;
            }
            let foreign = GntdevCopyPtr {
                foreign: GntdevCopyForeign {
                    gref: segment.gref,
                    offset: segment.offset,
                    domid: self.domid,
                },
            };
            let local = GntdevCopyPtr {
                virt: segment.local.as_ptr().cast::<c_void>(),
            };
            let (source, dest, flags) = match direction {
                CopyDirection::FromGuest => (foreign, local, GNTCOPY_SOURCE_GREF),
                CopyDirection::ToGuest => (local, foreign, GNTCOPY_DEST_GREF),
            };
            self.batch.push(GntdevGrantCopySegment {
                source,
                dest,
                len: segment.len,
                flags,
                status: gntst::GENERAL_ERROR,
            });
            self.batch_source.push(i);
        }
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut request = GntdevGrantCopy {
            count: u32::try_from(self.batch.len())
                .map_err(|_| Error::invalid("too many grant copy segments"))?,
            segments: self.batch.as_mut_ptr(),
        };
        // SAFETY: GRANT_COPY reads `count` segments from `segments` (our live Vec) and writes
        // each one's status there; the local addresses in them are valid for their lengths
        // per the caller's contract for `copy`.
        let result = unsafe { ioctl(&self.device, IOCTL_GNTDEV_GRANT_COPY, &mut request) };
        if let Err(e) = result {
            for &i in &self.batch_source {
                segments[i].status = gntst::GENERAL_ERROR;
            }
            return Err(Error::io("gntdev GRANT_COPY", e).with_path(Path::new(GNTDEV_PATH)));
        }
        for (copied, &i) in self.batch.iter().zip(&self.batch_source) {
            segments[i].status = copied.status;
        }
        Ok(())
    }
}

/// UNMAP_GRANT_REF: the kernel releases the grants once nothing maps them any more.
fn unmap_grant_refs(device: &File, index: u64, count: usize) {
    let mut request = GntdevUnmapGrantRef {
        index,
        count: u32::try_from(count).unwrap_or(u32::MAX),
        pad: 0,
    };
    // SAFETY: UNMAP_GRANT_REF reads one ioctl_gntdev_unmap_grant_ref, a live local. A
    // failure leaves the grants to be released when the fd closes; nothing to do here.
    let _ = unsafe { ioctl(device, IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut request) };
}

/// Grants mapped by gntdev, contiguous in ref order.
struct LinuxMapping {
    base: NonNull<u8>,
    len: usize,
    writable: bool,
    index: u64,
    count: usize,
    device: Arc<File>,
    mapped: Arc<AtomicUsize>,
}

// SAFETY: the mapping is process-wide memory owned by this value, the fd is shared through
// an Arc; nothing is tied to a thread.
unsafe impl Send for LinuxMapping {}

impl GrantMapping for LinuxMapping {
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

impl Drop for LinuxMapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` is the mmap `map` made; users' pointers into it are valid
        // only while the mapping lives.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
        unmap_grant_refs(&self.device, self.index, self.count);
        self.mapped.fetch_sub(self.count, Ordering::Relaxed);
    }
}
