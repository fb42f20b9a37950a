//! The file or block device under one image layer: positional I/O with context-rich
//! errors, O_DIRECT with bounce buffers for unaligned requests, holes and durability.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sys;

/// The coarsest memory and offset alignment O_DIRECT I/O is done with, and the one used
/// where a file does not report its own: 4 KiB satisfies every device we meet.
pub const DIRECT_ALIGN: usize = 4096;

/// The finest: one sector.
const MIN_DIRECT_ALIGN: usize = 512;

/// How to open an image file.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenMode {
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT); unaligned requests go through a bounce buffer.
    pub direct: bool,
}

impl OpenMode {
    /// Read-only, through the page cache.
    pub fn read_only() -> OpenMode {
        OpenMode {
            read_only: true,
            direct: false,
        }
    }

    /// Read-write, through the page cache.
    pub fn read_write() -> OpenMode {
        OpenMode::default()
    }
}

#[derive(Debug)]
pub struct ImageFile {
    file: File,
    path: PathBuf,
    mode: OpenMode,
    block_device: bool,
    /// What O_DIRECT I/O on this file must be aligned to: what the kernel reports (512 on
    /// most disks, so that a VHD's sector-aligned data blocks are read directly), else
    /// `DIRECT_ALIGN`.
    direct_align: usize,
    /// Held across each O_DIRECT read-modify-write: two writes to different sectors of one
    /// aligned unit (from two threads) would otherwise each write back the unit as it was
    /// before the other, and one would undo the other.
    bounce_lock: parking_lot::Mutex<()>,
}

impl ImageFile {
    pub fn open(path: &Path, mode: OpenMode) -> Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(!mode.read_only);
        if mode.direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options
            .open(path)
            .map_err(|e| Error::io("open", e).with_path(path))?;
        Self::from_file(file, path, mode)
    }

    /// Create (or truncate) a file for a new image, opened read-write.
    pub fn create(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| Error::io("create", e).with_path(path))?;
        Self::from_file(file, path, OpenMode::default())
    }

    fn from_file(file: File, path: &Path, mode: OpenMode) -> Result<Self> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat", e).with_path(path))?;
        let direct_align = sys::direct_io_alignment(&file)
            .map(|align| align as usize)
            .filter(|align| {
                align.is_power_of_two() && (MIN_DIRECT_ALIGN..=DIRECT_ALIGN).contains(align)
            })
            .unwrap_or(DIRECT_ALIGN);
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            mode,
            block_device: meta.file_type().is_block_device(),
            direct_align,
            bounce_lock: parking_lot::Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_only(&self) -> bool {
        self.mode.read_only
    }

    pub fn is_direct(&self) -> bool {
        self.mode.direct
    }

    /// The alignment of offset, length and memory that O_DIRECT I/O on this file needs.
    pub fn direct_align(&self) -> usize {
        self.direct_align
    }

    /// Whether I/O of `len` bytes at `ptr` to or from `offset` must go through a bounce
    /// buffer: the file is opened O_DIRECT and memory, length or offset is not aligned as
    /// it needs.
    pub fn needs_bounce(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        let align = self.direct_align;
        self.mode.direct
            && !((ptr as usize).is_multiple_of(align)
                && len.is_multiple_of(align)
                && offset.is_multiple_of(align as u64))
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether the file lives on tmpfs (memory-backed: no I/O ever waits for a device).
    pub fn is_memory_backed(&self) -> Result<bool> {
        sys::is_tmpfs(&self.file).map_err(|e| Error::io("statfs", e).with_path(&self.path))
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Device and inode: identifies the file for chain loop detection.
    pub fn identity(&self) -> Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io("stat", e).with_path(&self.path))?;
        Ok((meta.dev(), meta.ino()))
    }

    /// Length in bytes: the file size, or the device size from BLKGETSIZE64.
    pub fn size(&self) -> Result<u64> {
        if self.block_device {
            sys::block_device_size(&self.file)
                .map_err(|e| Error::io("BLKGETSIZE64", e).with_path(&self.path))
        } else {
            self.file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| Error::io("stat", e).with_path(&self.path))
        }
    }

    /// Bytes the file occupies on the host (sparse-aware); a device reports its size.
    pub fn allocated_bytes(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        if self.block_device {
            return self.size();
        }
        self.file
            .metadata()
            .map(|m| m.blocks() * 512)
            .map_err(|e| Error::io("stat", e).with_path(&self.path))
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.check_writable()?;
        if self.block_device {
            return Err(Error::invalid("cannot resize a block device").with_path(&self.path));
        }
        self.file
            .set_len(len)
            .map_err(|e| Error::io("truncate", e).with_path(&self.path))
    }

    /// Fill `buf` from `offset`; reading past the end of the file is an error naming where.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.needs_bounce(buf.as_ptr(), buf.len(), offset) {
            return self.read_bounced(buf, offset);
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} bytes requested past the end of the file", buf.len()),
                )
            } else {
                e
            };
            Error::io("read", e).with_path(&self.path).at(offset)
        })
    }

    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        if self.needs_bounce(data.as_ptr(), data.len(), offset) {
            return self.write_bounced(data, offset);
        }
        self.file
            .write_all_at(data, offset)
            .map_err(|e| Error::io("write", e).with_path(&self.path).at(offset))
    }

    /// Make `[offset, offset+len)` read as zeros, releasing the space where the host can.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let result = if self.block_device {
            sys::block_device_zero_out(&self.file, offset, len)
        } else {
            sys::fallocate(
                &self.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match result {
            Ok(()) => Ok(()),
            // Filesystems without hole support still get the zeros the caller relies on.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zeros(offset, len),
            Err(e) => Err(Error::io("punch hole", e).with_path(&self.path).at(offset)),
        }
    }

    /// Where data and holes lie: the extent starting at `offset` (at most `len` bytes) and
    /// whether it holds data. Filesystems without SEEK_HOLE report all data.
    pub fn data_or_hole(&self, offset: u64, len: u64) -> Result<(u64, bool)> {
        if self.block_device {
            return Ok((len, true));
        }
        let seek_err = |e| Error::io("lseek", e).with_path(&self.path).at(offset);
        let next_data = sys::seek(&self.file, offset, libc::SEEK_DATA).map_err(seek_err)?;
        match next_data {
            Some(data) if data <= offset => {
                let hole = sys::seek(&self.file, offset, libc::SEEK_HOLE)
                    .map_err(seek_err)?
                    .unwrap_or(offset + len);
                Ok(((hole - offset).clamp(1, len), true))
            }
            Some(data) => Ok(((data - offset).min(len), false)),
            None => Ok((len, false)),
        }
    }

    /// Reserve host space for `[offset, offset+len)` (fallocate), growing the file if needed.
    pub fn reserve(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if len == 0 || self.block_device {
            return Ok(());
        }
        sys::fallocate(&self.file, 0, offset, len)
            .map_err(|e| Error::io("fallocate", e).with_path(&self.path).at(offset))
    }

    /// Write explicit zeros (no deallocation).
    pub fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = AlignedBuf::zeroed(CHUNK.min(len) as usize);
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done) as usize;
            self.write_at(&zeros.as_slice()[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Make every completed write durable (data and the file's own metadata).
    pub fn sync(&self) -> Result<()> {
        if self.mode.read_only {
            return Ok(());
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io("fsync", e).with_path(&self.path))
    }

    fn check_writable(&self) -> Result<()> {
        if self.mode.read_only {
            Err(Error::read_only(&self.path))
        } else {
            Ok(())
        }
    }

    fn aligned_span(&self, offset: u64, len: usize) -> (u64, usize) {
        let align = self.direct_align as u64;
        let start = offset / align * align;
        let end = (offset + len as u64).div_ceil(align) * align;
        (start, (end - start) as usize)
    }

    fn read_bounced(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let (start, span) = self.aligned_span(offset, buf.len());
        let mut bounce = AlignedBuf::zeroed(span);
        let got = self.read_direct_upto(bounce.as_mut_slice(), start)?;
        let skip = (offset - start) as usize;
        if got < skip + buf.len() {
            return Err(Error::io(
                "read",
                io::Error::new(io::ErrorKind::UnexpectedEof, "past the end of the file"),
            )
            .with_path(&self.path)
            .at(offset));
        }
        buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
        Ok(())
    }

    /// O_DIRECT read that tolerates the file ending inside the aligned span.
    fn read_direct_upto(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", e).with_path(&self.path).at(offset)),
            }
        }
        Ok(done)
    }

    // Read-modify-write of the aligned span, one at a time per file.
    fn write_bounced(&self, data: &[u8], offset: u64) -> Result<()> {
        let _one_at_a_time = self.bounce_lock.lock();
        let (start, span) = self.aligned_span(offset, data.len());
        let mut bounce = AlignedBuf::zeroed(span);
        self.read_direct_upto(bounce.as_mut_slice(), start)?;
        let skip = (offset - start) as usize;
        bounce.as_mut_slice()[skip..skip + data.len()].copy_from_slice(data);
        let file_len = self.size()?;
        let end = offset + data.len() as u64;
        self.file
            .write_all_at(bounce.as_slice(), start)
            .map_err(|e| Error::io("write", e).with_path(&self.path).at(offset))?;
        // The aligned span may have grown a regular file past what the caller wrote.
        if !self.block_device && start + span as u64 > file_len.max(end) {
            self.set_len(file_len.max(end))?;
        }
        Ok(())
    }
}

/// A heap buffer whose start is aligned for O_DIRECT, built without `unsafe`.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}
