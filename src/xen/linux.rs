//! The Linux platform: /dev/xen/gntdev and /dev/xen/evtchn of a real dom0.

use super::{DomId, EventChannel, GrantAccess, Platform};
use crate::error::Result;

/// The running dom0's Xen devices.
pub struct LinuxPlatform;

impl Platform for LinuxPlatform {
    fn grant_access(&self, domid: DomId, max_grants: u32) -> Result<Box<dyn GrantAccess>> {
        todo!("{domid} {max_grants}")
    }

    fn bind_interdomain(&self, domid: DomId, remote_port: u32) -> Result<Box<dyn EventChannel>> {
        todo!("{domid} {remote_port}")
    }
}
