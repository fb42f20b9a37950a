//! An interdomain event channel on /dev/xen/evtchn: one open device per channel, so every
//! port read from it is ours.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use super::abi::{
    EvtchnBindInterdomain, EvtchnNotify, EvtchnUnbind, IOCTL_EVTCHN_BIND_INTERDOMAIN,
    IOCTL_EVTCHN_NOTIFY, IOCTL_EVTCHN_RESET, IOCTL_EVTCHN_UNBIND,
};
use super::{ioctl, open_device, EVTCHN_PATH};
use crate::error::{Error, Result};
use crate::xen::{DomId, EventChannel};

/// Reads per `drain`: a peer notifying without pause cannot keep us in it.
const MAX_DRAIN_READS: usize = 64;

pub(super) struct Evtchn {
    device: File,
    port: u32,
}

impl Evtchn {
    pub(super) fn bind(domid: DomId, remote_port: u32) -> Result<Evtchn> {
        let device = open_device(EVTCHN_PATH, libc::O_CLOEXEC | libc::O_NONBLOCK)?;
        let mut request = EvtchnBindInterdomain {
            remote_domain: u32::from(domid),
            remote_port,
        };
        // SAFETY: BIND_INTERDOMAIN reads one ioctl_evtchn_bind_interdomain, a live local;
        // it returns the local port.
        let port = unsafe { ioctl(&device, IOCTL_EVTCHN_BIND_INTERDOMAIN, &mut request) }.map_err(
            |e| {
                Error::io(
                    &format!("evtchn BIND_INTERDOMAIN to domain {domid} port {remote_port}"),
                    e,
                )
                .with_path(Path::new(EVTCHN_PATH))
            },
        )?;
        Ok(Evtchn {
            device,
            port: port as u32,
        })
    }

    fn error(&self, op: &str, err: io::Error) -> Error {
        Error::io(&format!("evtchn {op} (local port {})", self.port), err)
            .with_path(Path::new(EVTCHN_PATH))
    }

    /// Unmasks `ports` (the kernel masks a port each time it queues it for reading).
    fn unmask(&self, ports: &[u8]) -> Result<()> {
        (&self.device)
            .write_all(ports)
            .map_err(|e| self.error("unmask", e))
    }
}

impl EventChannel for Evtchn {
    fn local_port(&self) -> u32 {
        self.port
    }

    fn fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }

    fn drain(&mut self) -> Result<bool> {
        // The device hands out whole u32 port numbers.
        let mut ports = [0u8; 64 * 4];
        let mut any = false;
        for _ in 0..MAX_DRAIN_READS {
            match (&self.device).read(&mut ports) {
                Ok(0) => return Ok(any),
                Ok(n) => {
                    any = true;
                    self.unmask(&ports[..n - n % 4])?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                    // The pending-port ring overflowed: reset it and count as pending; our
                    // port may have been masked when queued, so unmask it.
                    // SAFETY: RESET takes no argument.
                    unsafe { ioctl::<u8>(&self.device, IOCTL_EVTCHN_RESET, std::ptr::null_mut()) }
                        .map_err(|e| self.error("RESET", e))?;
                    self.unmask(&self.port.to_ne_bytes())?;
                    return Ok(true);
                }
                Err(e) => return Err(self.error("read", e)),
            }
        }
        Ok(any)
    }

    fn notify(&self) -> Result<()> {
        let mut request = EvtchnNotify { port: self.port };
        // SAFETY: NOTIFY reads one ioctl_evtchn_notify, a live local.
        unsafe { ioctl(&self.device, IOCTL_EVTCHN_NOTIFY, &mut request) }
            .map_err(|e| self.error("NOTIFY", e))?;
        Ok(())
    }
}

impl Drop for Evtchn {
    fn drop(&mut self) {
        let mut request = EvtchnUnbind { port: self.port };
        // SAFETY: UNBIND reads one ioctl_evtchn_unbind, a live local. On failure closing
        // the fd unbinds anyway.
        let _ = unsafe { ioctl(&self.device, IOCTL_EVTCHN_UNBIND, &mut request) };
    }
}
