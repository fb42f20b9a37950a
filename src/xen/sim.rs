//! The xensim platform (../shared/xensim.md sections 1-3): grants from `dom<D>.mem` and
//! `dom<D>.gnttab`, event channels on unix datagram sockets.

use std::path::PathBuf;

use super::{DomId, EventChannel, GrantAccess, Platform};
use crate::error::Result;

/// A simulated host: the directory `$XENSIM_DIR`.
pub struct SimPlatform {
    pub dir: PathBuf,
}

impl Platform for SimPlatform {
    fn grant_access(&self, domid: DomId, max_grants: u32) -> Result<Box<dyn GrantAccess>> {
        todo!("{domid} {max_grants}")
    }

    fn bind_interdomain(&self, domid: DomId, remote_port: u32) -> Result<Box<dyn EventChannel>> {
        todo!("{domid} {remote_port}")
    }
}
