//! One error type for the whole image layer: a kind plus the context a storage engineer
//! needs to find the problem (file, on-disk field, byte offset).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, coarsely: callers branch on this (exit codes, blkif status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system refused an I/O.
    Io,
    /// On-disk metadata is inconsistent or out of range.
    Corrupt,
    /// A valid image uses a feature ferrotap does not serve.
    Unsupported,
    /// The caller asked for something impossible (bad size, bad option, bad range).
    InvalidArgument,
    /// A write was attempted on a read-only image or layer.
    ReadOnly,
}

/// An image-layer error with its context.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    path: Option<PathBuf>,
    field: Option<String>,
    offset: Option<u64>,
    message: String,
    source: Option<io::Error>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            path: None,
            field: None,
            offset: None,
            message: message.into(),
            source: None,
        }
    }

    /// Corrupt metadata: names the file, the field and the byte offset of that field.
    pub fn corrupt(path: &Path, field: &str, offset: u64, message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
            .with_path(path)
            .with_field(field)
            .at(offset)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    pub fn read_only(path: &Path) -> Self {
        Error::new(ErrorKind::ReadOnly, "image is read-only").with_path(path)
    }

    /// An OS error during `op` (e.g. "read", "write", "open").
    pub fn io(op: &str, err: io::Error) -> Self {
        let mut e = Error::new(ErrorKind::Io, format!("{op} failed"));
        e.source = Some(err);
        e
    }

    pub fn with_path(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    pub fn with_field(mut self, field: &str) -> Self {
        self.field = Some(field.to_string());
        self
    }

    pub fn at(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn field(&self) -> Option<&str> {
        self.field.as_deref()
    }

    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// Whether this is a "no such file or node" error: an OS ENOENT, or xenstored's ENOENT
    /// (the xenstore client reports xenstored's errors as I/O errors with their errno).
    pub fn is_not_found(&self) -> bool {
        self.raw_os_error() == Some(libc::ENOENT)
    }

    /// The OS error number, when this is an I/O error (used for blkif/NBD status mapping).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(io::Error::raw_os_error)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}")?;
            if let Some(offset) = self.offset {
                write!(f, " at offset {offset:#x} ({offset})")?;
            }
            write!(f, ": ")?;
        } else if let Some(offset) = self.offset {
            write!(f, "at offset {offset:#x} ({offset}): ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
