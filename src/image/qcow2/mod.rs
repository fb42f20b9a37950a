//! qcow2: versions 2 and 3 (placeholder until the qcow2 work lands).

use std::path::Path;
use std::sync::Arc;

use super::{CreateOptions, ImageFile, Layer};
use crate::error::{Error, Result};

/// qcow2 files start with `QFI\xfb`.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"QFI\xfb")
}

pub fn open(file: ImageFile) -> Result<Arc<dyn Layer>> {
    Err(Error::unsupported("qcow2 is not implemented yet").with_path(file.path()))
}

pub fn create(_path: &Path, _options: CreateOptions) -> Result<()> {
    Err(Error::unsupported("qcow2 is not implemented yet"))
}
