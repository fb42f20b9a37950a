//! VHD: fixed, dynamic and differencing images (placeholder until the VHD work lands).

use std::path::Path;
use std::sync::Arc;

use super::{CreateOptions, ImageFile, Layer};
use crate::error::{Error, Result};

/// A VHD carries the `conectix` cookie in its footer (at the end; dynamic images also keep
/// a copy at offset 0).
pub fn probe(head: &[u8], tail: &[u8]) -> bool {
    head.starts_with(b"conectix") || tail.starts_with(b"conectix")
}

pub fn open(file: ImageFile) -> Result<Arc<dyn Layer>> {
    Err(Error::unsupported("VHD is not implemented yet").with_path(file.path()))
}

pub fn create(_path: &Path, _options: CreateOptions) -> Result<()> {
    Err(Error::unsupported("VHD is not implemented yet"))
}
