//! The frontend half of the XenBus handshake (../shared/xensim.md section 5), as Linux
//! xen-blkfront plays it: find the backend through `FE/backend`, wait for InitWait, read its
//! offer, write the rings, event channels, protocol and feature-persistent, go Initialised,
//! wait for Connected, read the disk's size, go Connected. Closing is 5, then 6; a reconnect
//! goes back to 1 and waits for InitWait again.
//!
//! While connected a thread watches the backend's `state`: a backend that rewrites Connected
//! (an online resize) has its new `sectors` read, as blkfront's `blkfront_connect` does.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::blkfront::BackendLink;
use super::control::{BackendInfo, ConnectRequest, Features};
use crate::error::{Error, Result};
use crate::xenstore::Client;

/// XenbusState values (xen/io/xenbus.h).
pub mod state {
    pub const INITIALISING: u32 = 1;
    pub const INIT_WAIT: u32 = 2;
    pub const INITIALISED: u32 = 3;
    pub const CONNECTED: u32 = 4;
    pub const CLOSING: u32 = 5;
    pub const CLOSED: u32 = 6;
}

/// `info` bit of a read-only disk (VDISK_READONLY of io/blkif.h).
const VDISK_READONLY: u64 = 4;
/// Token of the watch on the backend's state.
const STATE_TOKEN: &str = "blkfront-backend-state";

fn xs_error(what: &str, err: impl Display) -> Error {
    Error::invalid(format!("xenstore: {what}: {err}"))
}

/// One virtual disk's XenBus link.
pub struct XenbusFront {
    client: Arc<Client>,
    frontend: String,
    backend: String,
    timeout: Duration,
    /// The backend's `sectors` as last read (updated on resize while connected).
    sectors: Arc<AtomicU64>,
    /// Times the backend re-entered Connected with a new size.
    resizes: Arc<AtomicU64>,
    watcher: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl XenbusFront {
    /// The frontend of `/local/domain/<domid>/device/vbd/<devid>`; its backend is the one
    /// `FE/backend` names. `timeout` bounds every wait for the backend.
    pub fn open(
        client: Arc<Client>,
        domid: u16,
        devid: u32,
        timeout: Duration,
    ) -> Result<XenbusFront> {
        let frontend = format!("/local/domain/{domid}/device/vbd/{devid}");
        let backend = client
            .read(0, &format!("{frontend}/backend"))
            .map_err(|err| xs_error(&format!("{frontend}/backend"), err))?;
        client
            .watch(&format!("{backend}/state"), STATE_TOKEN)
            .map_err(|err| xs_error(&format!("watch {backend}/state"), err))?;
        Ok(XenbusFront {
            client,
            frontend,
            backend,
            timeout,
            sectors: Arc::new(AtomicU64::new(0)),
            resizes: Arc::new(AtomicU64::new(0)),
            watcher: None,
        })
    }

    /// The backend's size in sectors as last read, and how often it changed while connected.
    pub fn size_observer(&self) -> (Arc<AtomicU64>, Arc<AtomicU64>) {
        (Arc::clone(&self.sectors), Arc::clone(&self.resizes))
    }

    fn read_backend(&self, key: &str) -> Result<Option<String>> {
        let path = format!("{}/{key}", self.backend);
        self.client
            .read_opt(0, &path)
            .map_err(|err| xs_error(&path, err))
    }

    fn backend_number(&self, key: &str) -> Result<Option<u64>> {
        self.read_backend(key)?
            .map(|value| {
                value.trim().parse::<u64>().map_err(|_| {
                    Error::invalid(format!("{}/{key}: not a number: {value:?}", self.backend))
                })
            })
            .transpose()
    }

    fn backend_flag(&self, key: &str) -> Result<bool> {
        Ok(self.backend_number(key)?.unwrap_or(0) != 0)
    }

    fn write_frontend(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("{}/{key}", self.frontend);
        self.client
            .write(0, &path, value)
            .map_err(|err| xs_error(&path, err))
    }

    /// Write our own state.
    pub fn switch_state(&self, value: u32) -> Result<()> {
        self.write_frontend("state", &value.to_string())
    }

    fn backend_state(&self) -> Result<u32> {
        Ok(self.backend_number("state")?.unwrap_or(0) as u32)
    }

    /// Wait until the backend's state satisfies `wanted`; a state for which `gave_up` holds
    /// (the backend closing while we wait for it to connect) is an error carrying its
    /// `error` node.
    fn wait_backend(
        &self,
        what: &str,
        wanted: impl Fn(u32) -> bool,
        gave_up: impl Fn(u32) -> bool,
    ) -> Result<u32> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let current = self.backend_state()?;
            if wanted(current) {
                return Ok(current);
            }
            if gave_up(current) {
                let error = self.read_backend("error")?.unwrap_or_default();
                return Err(Error::invalid(format!(
                    "{}: backend went to state {current} while the frontend waited for {what}: {}",
                    self.backend,
                    if error.is_empty() {
                        "no error node"
                    } else {
                        &error
                    }
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::invalid(format!(
                    "{}: backend still in state {current} after {:?} waiting for {what}",
                    self.backend, self.timeout
                )));
            }
            // Any event (or a quiet 100 ms) is a reason to read the state again.
            self.client
                .next_event(Some((deadline - now).min(Duration::from_millis(100))))
                .map_err(|err| xs_error("watch", err))?;
        }
    }

    /// Become Initialising (after a previous Closed, this asks the backend to reconnect) and
    /// wait for the backend's InitWait; returns its offer (the size is read once connected).
    pub fn wait_for_offer(&mut self) -> Result<BackendInfo> {
        self.switch_state(state::INITIALISING)?;
        // Closed is a backend yet to see our reconnect; Closing is one that gave up.
        self.wait_backend(
            "InitWait",
            |s| s == state::INIT_WAIT,
            |s| s == state::CLOSING,
        )?;
        let discard = self.backend_flag("feature-discard")?;
        let features = Features {
            flush: self.backend_flag("feature-flush-cache")?,
            barrier: self.backend_flag("feature-barrier")?,
            discard,
            discard_secure: discard && self.backend_flag("discard-secure")?,
            discard_granularity: self.backend_number("discard-granularity")?.unwrap_or(512),
            discard_alignment: self.backend_number("discard-alignment")?.unwrap_or(0),
            persistent: self.backend_flag("feature-persistent")?,
            max_indirect_segments: self
                .backend_number("feature-max-indirect-segments")?
                .unwrap_or(0)
                .min(u64::from(u32::MAX)) as u32,
            max_ring_page_order: self
                .backend_number("max-ring-page-order")?
                .unwrap_or(0)
                .min(31) as u32,
            max_queues: self
                .backend_number("multi-queue-max-queues")?
                .unwrap_or(1)
                .clamp(1, 64) as u32,
        };
        Ok(BackendInfo {
            // Published at Connected; 512 is all xensim uses, checked again then.
            sectors: 0,
            sector_size: 512,
            physical_sector_size: 512,
            read_only: self.read_backend("mode")?.as_deref() == Some("r"),
            connected: false,
            features,
        })
    }

    /// Remove the transport keys an earlier connection (a previous boot of the guest) left,
    /// so that the backend reads only this connection's: one queue after two, or order 0
    /// after 2, must not leave `multi-queue-num-queues` or `ring-page-order` behind.
    fn clear_transport(&self) -> Result<()> {
        let children = self
            .client
            .directory(0, &self.frontend)
            .map_err(|err| xs_error(&self.frontend, err))?;
        for child in children {
            let stale = child.starts_with("ring-ref")
                || child.starts_with("queue-")
                || matches!(
                    child.as_str(),
                    "ring-page-order" | "multi-queue-num-queues" | "event-channel"
                );
            if stale {
                let path = format!("{}/{child}", self.frontend);
                self.client
                    .rm(0, &path)
                    .map_err(|err| xs_error(&format!("rm {path}"), err))?;
            }
        }
        Ok(())
    }

    /// The transport keys of `request`, written as Linux blkfront's talk_to_blkback does.
    fn write_transport(&self, request: &ConnectRequest) -> Result<()> {
        self.clear_transport()?;
        let ring_keys = |prefix: &str, refs: &[u32]| -> Result<()> {
            if request.ring_page_order == 0 {
                self.write_frontend(&format!("{prefix}ring-ref"), &refs[0].to_string())
            } else {
                for (index, gref) in refs.iter().enumerate() {
                    self.write_frontend(&format!("{prefix}ring-ref{index}"), &gref.to_string())?;
                }
                Ok(())
            }
        };
        if request.ring_page_order > 0 {
            self.write_frontend("ring-page-order", &request.ring_page_order.to_string())?;
        }
        if let [queue] = request.queues.as_slice() {
            ring_keys("", &queue.ring_refs)?;
            self.write_frontend("event-channel", &queue.event_channel.to_string())?;
        } else {
            self.write_frontend("multi-queue-num-queues", &request.queues.len().to_string())?;
            for (index, queue) in request.queues.iter().enumerate() {
                let prefix = format!("queue-{index}/");
                ring_keys(&prefix, &queue.ring_refs)?;
                self.write_frontend(
                    &format!("{prefix}event-channel"),
                    &queue.event_channel.to_string(),
                )?;
            }
        }
        self.write_frontend("protocol", request.protocol)?;
        self.write_frontend(
            "feature-persistent",
            if request.persistent { "1" } else { "0" },
        )
    }

    /// Read what the backend publishes at Connected into `info`.
    fn read_disk(&self, info: &mut BackendInfo) -> Result<()> {
        let sectors = self.backend_number("sectors")?.ok_or_else(|| {
            Error::invalid(format!("{}: Connected without sectors", self.backend))
        })?;
        let sector_size = self.backend_number("sector-size")?.unwrap_or(512);
        if sector_size != 512 {
            return Err(Error::unsupported(format!(
                "{}: sector-size {sector_size} (xensim uses 512)",
                self.backend
            )));
        }
        info.sectors = sectors;
        info.physical_sector_size = self
            .backend_number("physical-sector-size")?
            .unwrap_or(512)
            .min(u64::from(u32::MAX)) as u32;
        info.read_only |= self.backend_number("info")?.unwrap_or(0) & VDISK_READONLY != 0;
        info.connected = true;
        self.sectors.store(sectors, Ordering::Release);
        Ok(())
    }

    /// Watch for the backend re-entering Connected with a new size, until stopped.
    fn start_watcher(&mut self) -> Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let client = Arc::clone(&self.client);
        let backend = self.backend.clone();
        let sectors = Arc::clone(&self.sectors);
        let resizes = Arc::clone(&self.resizes);
        let stop_flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("blkfront-xenbus".into())
            .spawn(move || {
                while !stop_flag.load(Ordering::Acquire) {
                    match client.next_event(Some(Duration::from_millis(100))) {
                        Ok(Some(_)) => {}
                        Ok(None) => continue,
                        Err(err) => {
                            eprintln!("ferrotap xensim blkfront: xenstore watch: {err}");
                            return;
                        }
                    }
                    let read = |key: &str| client.read_opt(0, &format!("{backend}/{key}"));
                    if !matches!(read("state"), Ok(Some(s)) if s.trim() == "4") {
                        continue;
                    }
                    if let Ok(Some(value)) = read("sectors") {
                        if let Ok(new) = value.trim().parse::<u64>() {
                            let old = sectors.swap(new, Ordering::AcqRel);
                            if old != new {
                                resizes.fetch_add(1, Ordering::AcqRel);
                                eprintln!(
                                    "ferrotap xensim blkfront: {backend}: resized from {old} to \
                                     {new} sectors"
                                );
                            }
                        }
                    }
                }
            })
            .map_err(|err| Error::io("spawn the xenbus watcher", err))?;
        self.watcher = Some((stop, handle));
        Ok(())
    }

    fn stop_watcher(&mut self) {
        if let Some((stop, handle)) = self.watcher.take() {
            stop.store(true, Ordering::Release);
            let _ = handle.join();
        }
    }
}

impl BackendLink for XenbusFront {
    fn connect(&mut self, request: &ConnectRequest, info: &mut BackendInfo) -> Result<()> {
        if request.queues.is_empty() {
            return Err(Error::invalid("no queue to connect"));
        }
        self.write_transport(request)?;
        self.switch_state(state::INITIALISED)?;
        self.wait_backend(
            "Connected",
            |s| s == state::CONNECTED,
            |s| s >= state::CLOSING,
        )?;
        self.read_disk(info)?;
        self.switch_state(state::CONNECTED)?;
        self.start_watcher()
    }

    fn disconnect(&mut self) -> Result<()> {
        self.stop_watcher();
        self.switch_state(state::CLOSING)?;
        self.wait_backend("Closing", |s| s >= state::CLOSING, |_| false)?;
        self.switch_state(state::CLOSED)?;
        self.wait_backend("Closed", |s| s == state::CLOSED, |_| false)
            .map(drop)
    }
}

impl Drop for XenbusFront {
    fn drop(&mut self) {
        self.stop_watcher();
        let _ = self
            .client
            .unwatch(&format!("{}/state", self.backend), STATE_TOKEN);
    }
}
