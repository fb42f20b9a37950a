//! The backend state machine, one per `vbd3/<domid>/<devid>`, driven by xenstore watches
//! (the backend directory, each frontend's `state`) and by each serve's watch stream.
//!
//! As Linux blkback: InitWait once the serve is there and its features are published;
//! Connected when the frontend is Initialised or Connected and its keys are good; Closing and
//! Closed following the frontend; back to InitWait when the frontend reinitialises after a
//! close (guest reboot, kexec). Skipped states are tolerated: the machine acts on the state
//! the frontend is in, not on the path it took. Bad keys or a failing serve put that device
//! alone in Closing with `BE/error`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

use blkback_shim::transport::{read_transport, Offer};
use ferrotap::xensim::control::BackendInfo;
use ferrotap::xenstore::Client;

use crate::serve_link::{is_socket, ServeEvent, ServeLink, SpawnSpec};
use crate::Args;
use crate::{error, info, warn};

/// Where the toolstack creates `vbd3` backends.
pub const VBD3_ROOT: &str = "/local/domain/0/backend/vbd3";
const ROOT_TOKEN: &str = "vbd3";
/// Prefix of the token of a frontend's state watch (`fe:<domid>/<devid>`).
const FRONTEND_TOKEN: &str = "fe:";

/// XenbusState values (xen/io/xenbus.h).
mod state {
    pub const INIT_WAIT: u32 = 2;
    pub const INITIALISED: u32 = 3;
    pub const CONNECTED: u32 = 4;
    pub const CLOSING: u32 = 5;
    pub const CLOSED: u32 = 6;
}

/// `info` bits (VDISK_* of io/blkif.h).
const VDISK_CDROM: u32 = 1;
const VDISK_READONLY: u32 = 4;

/// The most characters of a message written to `BE/error`.
const ERROR_MAX: usize = 1024;

/// Attempts at a transaction that keeps meeting EAGAIN.
const TRANSACTION_ATTEMPTS: u32 = 32;

/// A device: (frontend domid, devid).
type Key = (u16, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    InitWait,
    Connected,
    Closing,
    Closed,
    /// Closing with an error node, until the frontend closes or reinitialises.
    Failed,
}

struct Vbd {
    backend: String,
    frontend: String,
    serve: Option<ServeLink>,
    /// Tells this serve's events from those of an earlier one of the same device.
    generation: u64,
    phase: Phase,
    /// The frontend state last acted on; the machine acts on changes only.
    frontend_state: Option<u32>,
    offer: Offer,
    cdrom: bool,
}

pub struct Shim {
    xs: Client,
    args: Args,
    ferrotap: PathBuf,
    vbds: HashMap<Key, Vbd>,
    next_generation: u64,
    events_tx: Sender<((Key, u64), ServeEvent)>,
    events: Receiver<((Key, u64), ServeEvent)>,
}

fn backend_path((domid, devid): Key) -> String {
    format!("{VBD3_ROOT}/{domid}/{devid}")
}

fn name((domid, devid): Key) -> String {
    format!("vbd3/{domid}/{devid}")
}

/// The device a path under the vbd3 directory belongs to; None for the directory itself or
/// a domain's directory.
fn key_of(relative: &str) -> Option<Key> {
    let mut parts = relative.trim_start_matches('/').split('/');
    let domid = parts.next()?.parse().ok()?;
    let devid = parts.next()?.parse().ok()?;
    Some((domid, devid))
}

fn parse_state(value: Option<&str>) -> Option<u32> {
    value.and_then(|v| v.trim().parse().ok())
}

impl Shim {
    pub fn new(xs: Client, args: Args, ferrotap: PathBuf) -> Shim {
        let (events_tx, events) = channel();
        Shim {
            xs,
            args,
            ferrotap,
            vbds: HashMap::new(),
            next_generation: 1,
            events_tx,
            events,
        }
    }

    /// Watch and serve until xenstore goes away.
    pub fn run(&mut self) -> Result<(), String> {
        self.xs
            .watch(VBD3_ROOT, ROOT_TOKEN)
            .map_err(|err| format!("watch {VBD3_ROOT}: {err}"))?;
        info!(
            "watching {VBD3_ROOT} (serves: {}, run dir {})",
            self.ferrotap.display(),
            self.args.run_dir.display()
        );
        self.rescan();
        loop {
            while let Ok((tag, event)) = self.events.try_recv() {
                self.serve_event(tag, event);
            }
            self.reap();
            let event = self
                .xs
                .next_event(Some(Duration::from_millis(250)))
                .map_err(|err| format!("xenstore: {err}"))?;
            let Some(event) = event else { continue };
            if event.token == ROOT_TOKEN {
                match event.path.strip_prefix(VBD3_ROOT).and_then(key_of) {
                    Some(key) => self.reconcile(key),
                    None => self.rescan(),
                }
            } else if let Some(device) = event.token.strip_prefix(FRONTEND_TOKEN) {
                if let Some(key) = key_of(device) {
                    self.reconcile(key);
                }
            }
        }
    }

    fn read(&self, path: &str) -> Option<String> {
        match self.xs.read_opt(0, path) {
            Ok(value) => value,
            Err(err) => {
                warn!("read {path}: {err}");
                None
            }
        }
    }

    /// Every device in xenstore or known here, reconciled.
    fn rescan(&mut self) {
        let mut keys: BTreeSet<Key> = self.vbds.keys().copied().collect();
        for domid in self.xs.directory(0, VBD3_ROOT).unwrap_or_default() {
            let domain = format!("{VBD3_ROOT}/{domid}");
            for devid in self.xs.directory(0, &domain).unwrap_or_default() {
                if let Some(key) = key_of(&format!("{domid}/{devid}")) {
                    keys.insert(key);
                }
            }
        }
        for key in keys {
            self.reconcile(key);
        }
    }

    /// Bring device `key` in line with xenstore.
    fn reconcile(&mut self, key: Key) {
        let backend = backend_path(key);
        let frontend = self.read(&format!("{backend}/frontend"));
        let online = self.read(&format!("{backend}/online"));
        let online = online.as_deref().map(str::trim) == Some("1");
        match (self.vbds.contains_key(&key), frontend) {
            (false, Some(frontend)) if online => self.create(key, frontend, false),
            (false, _) => {}
            (true, None) => {
                info!("{}: backend removed", name(key));
                self.teardown(key, false);
            }
            (true, Some(_)) if !online => {
                info!("{}: online=0", name(key));
                self.teardown(key, true);
            }
            (true, Some(_)) => self.step(key),
        }
    }

    /// The serve of a new device: the socket `physical-device-path` or `params` names (a
    /// serve the toolstack started), one this shim started before a restart, or a new one.
    fn open_serve(&self, key: Key, backend: &str) -> Result<ServeLink, String> {
        for node in ["physical-device-path", "params"] {
            if let Some(path) = self.read(&format!("{backend}/{node}")) {
                let path = PathBuf::from(path.trim());
                if is_socket(&path) {
                    info!(
                        "{}: attaching to the serve on {}",
                        name(key),
                        path.display()
                    );
                    return ServeLink::attach(&path, false);
                }
            }
        }
        let (domid, devid) = key;
        let control = self.args.run_dir.join(format!("vbd3-{domid}-{devid}.sock"));
        if is_socket(&control) {
            if let Ok(link) = ServeLink::attach(&control, true) {
                info!("{}: adopting the serve on {}", name(key), control.display());
                return Ok(link);
            }
        }
        let params = self
            .read(&format!("{backend}/params"))
            .filter(|p| !p.trim().is_empty())
            .ok_or("no params")?;
        let mode = self.read(&format!("{backend}/mode"));
        let read_only = mode.as_deref().map(str::trim) == Some("r");
        let log = self.args.run_dir.join(format!("vbd3-{domid}-{devid}.log"));
        let link = ServeLink::spawn(&SpawnSpec {
            ferrotap: &self.ferrotap,
            params: params.trim(),
            read_only,
            xensim: self.args.xensim.as_deref(),
            control: &control,
            log: &log,
            run_dir: &self.args.run_dir,
        })?;
        info!(
            "{}: started ferrotap serve --image {} on {}",
            name(key),
            params.trim(),
            control.display()
        );
        Ok(link)
    }

    /// Take device `key` on: open its serve, then adopt the state xenstore shows (a
    /// restarted shim) or, when `reinitialised` (its frontend starting over) or new, offer
    /// the serve's features and go InitWait.
    fn create(&mut self, key: Key, frontend: String, reinitialised: bool) {
        let backend = backend_path(key);
        let generation = self.next_generation;
        self.next_generation += 1;
        let cdrom = self.read(&format!("{backend}/device-type")).as_deref() == Some("cdrom");
        let mut vbd = Vbd {
            backend: backend.clone(),
            frontend: frontend.trim().to_string(),
            serve: None,
            generation,
            phase: Phase::InitWait,
            frontend_state: None,
            offer: Offer {
                max_ring_page_order: 0,
                max_queues: 1,
                persistent: false,
            },
            cdrom,
        };
        let token = format!("{FRONTEND_TOKEN}{}/{}", key.0, key.1);
        if let Err(err) = self.xs.watch(&format!("{}/state", vbd.frontend), &token) {
            warn!("{}: watch {}/state: {err}", name(key), vbd.frontend);
        }
        let frontend_id = self.read(&format!("{backend}/frontend-id"));
        let opened = match frontend_id.as_deref().map(str::trim) {
            Some(id) if id == key.0.to_string() => self.open_serve(key, &backend),
            other => Err(format!("frontend-id {other:?} is not the domain {}", key.0)),
        };
        let mut serve = match opened {
            Ok(serve) => serve,
            Err(err) => {
                self.vbds.insert(key, vbd);
                self.fail(key, &err);
                return;
            }
        };
        let info = match serve.info() {
            Ok(info) => info,
            Err(err) => {
                self.vbds.insert(key, vbd);
                self.fail(key, &format!("ferrotap serve info: {err}"));
                return;
            }
        };
        vbd.offer = Offer {
            max_ring_page_order: info.features.max_ring_page_order,
            max_queues: info.features.max_queues.max(1),
            persistent: info.features.persistent,
        };
        if let Err(err) = serve.watch((key, generation), self.events_tx.clone()) {
            warn!("{}: no watch on its serve: {err}", name(key));
        }
        vbd.serve = Some(serve);
        let backend_state = parse_state(self.read(&format!("{backend}/state")).as_deref());
        let frontend_state = parse_state(self.read(&format!("{}/state", vbd.frontend)).as_deref());
        match backend_state {
            _ if reinitialised => {}
            // A restarted shim: the device runs, leave it running.
            Some(state::CONNECTED) if info.connected => {
                vbd.phase = Phase::Connected;
                vbd.frontend_state = frontend_state;
                info!("{}: adopted, connected", name(key));
                self.vbds.insert(key, vbd);
                return;
            }
            // Likewise a closed one: it moves when its frontend does.
            Some(state::CLOSING | state::CLOSED) => {
                vbd.phase = if backend_state == Some(state::CLOSED) {
                    Phase::Closed
                } else {
                    Phase::Closing
                };
                vbd.frontend_state = frontend_state;
                self.vbds.insert(key, vbd);
                return;
            }
            _ => {}
        }
        let published = self.publish_features(&vbd, &info);
        self.vbds.insert(key, vbd);
        match published {
            Ok(()) => {
                info!("{}: InitWait ({})", name(key), describe_offer(&info));
                self.step(key);
            }
            Err(err) => self.fail(key, &format!("publish the features: {err}")),
        }
    }

    fn publish_features(&self, vbd: &Vbd, info: &BackendInfo) -> Result<(), String> {
        let features = &info.features;
        let flag = |on: bool| if on { "1" } else { "0" }.to_string();
        let mut writes = vec![
            ("feature-flush-cache", Some(flag(features.flush))),
            ("feature-barrier", Some(flag(features.barrier))),
            ("feature-discard", Some(flag(features.discard))),
            ("feature-persistent", Some(flag(features.persistent))),
            (
                "max-ring-page-order",
                Some(features.max_ring_page_order.to_string()),
            ),
        ];
        if features.discard {
            writes.extend([
                (
                    "discard-granularity",
                    Some(features.discard_granularity.to_string()),
                ),
                (
                    "discard-alignment",
                    Some(features.discard_alignment.to_string()),
                ),
                ("discard-secure", Some(flag(features.discard_secure))),
            ]);
        }
        if features.max_queues > 1 {
            writes.push((
                "multi-queue-max-queues",
                Some(features.max_queues.to_string()),
            ));
        }
        if features.max_indirect_segments > 0 {
            writes.push((
                "feature-max-indirect-segments",
                Some(features.max_indirect_segments.to_string()),
            ));
        }
        writes.push(("state", Some(state::INIT_WAIT.to_string())));
        self.transact(&vbd.backend, &writes)
    }

    /// Write (Some) or remove (None) keys under `dir` in one transaction, retried on EAGAIN.
    fn transact(&self, dir: &str, writes: &[(&str, Option<String>)]) -> Result<(), String> {
        for _ in 0..TRANSACTION_ATTEMPTS {
            let tx = self
                .xs
                .transaction_start()
                .map_err(|err| format!("transaction start: {err}"))?;
            let applied = writes.iter().try_for_each(|(key, value)| {
                let path = format!("{dir}/{key}");
                match value {
                    Some(value) => self.xs.write(tx, &path, value),
                    None => self.xs.rm(tx, &path),
                }
                .map_err(|err| format!("{path}: {err}"))
            });
            if let Err(err) = applied {
                let _ = self.xs.transaction_end(tx, false);
                return Err(err);
            }
            if self
                .xs
                .transaction_end(tx, true)
                .map_err(|err| format!("transaction end: {err}"))?
            {
                return Ok(());
            }
        }
        Err(format!(
            "{dir}: transaction conflicted {TRANSACTION_ATTEMPTS} times"
        ))
    }

    fn write_state(&self, key: Key, value: u32) {
        let path = format!("{}/state", backend_path(key));
        if let Err(err) = self.xs.write(0, &path, &value.to_string()) {
            warn!("write {path}: {err}");
        }
    }

    /// Act on the frontend's state, if it changed since last time.
    fn step(&mut self, key: Key) {
        let Some(vbd) = self.vbds.get(&key) else {
            return;
        };
        let frontend_state = parse_state(self.read(&format!("{}/state", vbd.frontend)).as_deref());
        if frontend_state == vbd.frontend_state {
            return;
        }
        let phase = vbd.phase;
        let has_serve = vbd.serve.is_some();
        if let Some(vbd) = self.vbds.get_mut(&key) {
            vbd.frontend_state = frontend_state;
        }
        match frontend_state {
            // A frontend (re)starting on a device whose serve failed or died: start afresh.
            Some(1 | 2) if !has_serve => {
                if let Some(vbd) = self.vbds.remove(&key) {
                    info!(
                        "{}: frontend reinitialising; opening the device again",
                        name(key)
                    );
                    self.unwatch_frontend(key, &vbd.frontend);
                    self.create(key, vbd.frontend, true);
                }
            }
            // Initialising or InitWait: a frontend (re)starting.
            Some(1 | 2) => match phase {
                Phase::InitWait => {}
                Phase::Connected | Phase::Closing | Phase::Closed | Phase::Failed => {
                    if phase == Phase::Connected {
                        self.disconnect(key);
                    }
                    info!("{}: frontend reinitialising; back to InitWait", name(key));
                    self.set_phase(key, Phase::InitWait);
                    self.write_state(key, state::INIT_WAIT);
                }
            },
            Some(state::INITIALISED | state::CONNECTED) => {
                if phase != Phase::Connected {
                    self.connect(key);
                }
            }
            Some(state::CLOSING) => {
                if phase == Phase::Connected {
                    self.disconnect(key);
                }
                if phase != Phase::Failed {
                    self.set_phase(key, Phase::Closing);
                    self.write_state(key, state::CLOSING);
                }
            }
            Some(state::CLOSED) => {
                if phase == Phase::Connected {
                    self.disconnect(key);
                }
                self.set_phase(key, Phase::Closed);
                self.write_state(key, state::CLOSED);
                info!("{}: closed", name(key));
            }
            // No state (or Unknown): a frontend gone; let go of its rings.
            None | Some(0) => {
                if phase == Phase::Connected {
                    self.disconnect(key);
                    self.set_phase(key, Phase::Closed);
                    self.write_state(key, state::CLOSED);
                }
            }
            Some(other) => warn!("{}: frontend in unknown state {other}", name(key)),
        }
    }

    fn set_phase(&mut self, key: Key, phase: Phase) {
        if let Some(vbd) = self.vbds.get_mut(&key) {
            vbd.phase = phase;
        }
    }

    /// Let the serve go of the rings (it completes or fails what is in flight, unmaps,
    /// unbinds).
    fn disconnect(&mut self, key: Key) {
        if let Some(serve) = self.vbds.get_mut(&key).and_then(|vbd| vbd.serve.as_mut()) {
            match serve.disconnect() {
                Ok(()) => info!("{}: disconnected", name(key)),
                Err(err) => warn!("{}: disconnect: {err}", name(key)),
            }
        }
    }

    /// The frontend is Initialised or Connected: read its keys and hand them to serve.
    fn connect(&mut self, key: Key) {
        let Some(vbd) = self.vbds.get(&key) else {
            return;
        };
        let frontend = vbd.frontend.clone();
        let offer = vbd.offer;
        let has_serve = vbd.serve.is_some();
        let cdrom = vbd.cdrom;
        if !has_serve {
            self.fail(key, "the frontend connected but the device has no serve");
            return;
        }
        let transport = read_transport(
            &mut |relative| {
                self.xs
                    .read_opt(0, &format!("{frontend}/{relative}"))
                    .map_err(|err| format!("{frontend}/{relative}: {err}"))
            },
            &offer,
        );
        let transport = match transport {
            Ok(transport) => transport,
            Err(err) => {
                self.fail(key, &format!("frontend {frontend}: {err}"));
                return;
            }
        };
        let request = transport.connect_request(key.0, key.1, &backend_path(key));
        let Some(serve) = self.vbds.get_mut(&key).and_then(|vbd| vbd.serve.as_mut()) else {
            return;
        };
        let connected = serve
            .request(&request)
            .and_then(|_| serve.info())
            .map_err(|err| format!("ferrotap serve refused the rings: {err}"));
        let info = match connected {
            Ok(info) => info,
            Err(err) => {
                self.fail(key, &err);
                return;
            }
        };
        // Where xcp-rrdd finds the process whose stats files to read (tapback does the same).
        let pid = serve.pid();
        let mut bits = 0;
        if cdrom {
            bits |= VDISK_CDROM;
        }
        if info.read_only {
            bits |= VDISK_READONLY;
        }
        let physical = if info.physical_sector_size == 0 {
            info.sector_size
        } else {
            info.physical_sector_size
        };
        let mut writes = vec![
            ("sectors", Some(info.sectors.to_string())),
            ("sector-size", Some(info.sector_size.to_string())),
            ("physical-sector-size", Some(physical.to_string())),
            ("info", Some(bits.to_string())),
            // An error of an earlier attempt no longer holds.
            ("error", None),
        ];
        if let Some(pid) = pid {
            writes.push(("kthread-pid", Some(pid.to_string())));
        }
        writes.push(("state", Some(state::CONNECTED.to_string())));
        let written = self.transact(&backend_path(key), &writes);
        match written {
            Ok(()) => {
                self.set_phase(key, Phase::Connected);
                info!(
                    "{}: connected: {} queue(s), ring-page-order {}, {}, persistent {}; {} \
                     sectors",
                    name(key),
                    transport.queues.len(),
                    transport.ring_page_order,
                    transport.protocol.name(),
                    transport.persistent,
                    info.sectors
                );
            }
            Err(err) => {
                self.disconnect(key);
                self.fail(key, &format!("publish the disk: {err}"));
            }
        }
    }

    /// An error for the toolstack: `BE/error`, state Closing, and the log.
    fn fail(&mut self, key: Key, message: &str) {
        error!("{}: {message}", name(key));
        // Whatever it quotes, the node must fit one xenstore write.
        let message = match message.char_indices().nth(ERROR_MAX) {
            Some((end, _)) => &message[..end],
            None => message,
        };
        // The machine moves again when the frontend does, from the state it is in now.
        let frontend_state = self
            .vbds
            .get(&key)
            .and_then(|vbd| parse_state(self.read(&format!("{}/state", vbd.frontend)).as_deref()));
        if let Some(vbd) = self.vbds.get_mut(&key) {
            vbd.phase = Phase::Failed;
            vbd.frontend_state = frontend_state;
        }
        let written = self.transact(
            &backend_path(key),
            &[
                ("error", Some(message.to_string())),
                ("state", Some(state::CLOSING.to_string())),
            ],
        );
        if let Err(err) = written {
            warn!("{}: cannot publish the error: {err}", name(key));
        }
    }

    /// Hot-unplug (`online` 0, `Closed` written) or removal of the backend: let go of the
    /// rings and close the serve the shim started.
    fn teardown(&mut self, key: Key, write_closed: bool) {
        let Some(mut vbd) = self.vbds.remove(&key) else {
            return;
        };
        self.unwatch_frontend(key, &vbd.frontend);
        if let Some(mut serve) = vbd.serve.take() {
            let _ = serve.disconnect();
            let control = serve.control().to_path_buf();
            let owned = serve.owned();
            serve.close();
            info!(
                "{}: torn down ({} {})",
                name(key),
                if owned {
                    "closed the serve on"
                } else {
                    "left the toolstack's serve on"
                },
                control.display()
            );
        }
        if write_closed {
            self.write_state(key, state::CLOSED);
        }
    }

    fn unwatch_frontend(&self, key: Key, frontend: &str) {
        let token = format!("{FRONTEND_TOKEN}{}/{}", key.0, key.1);
        let _ = self.xs.unwatch(&format!("{frontend}/state"), &token);
    }

    /// A serve's report, from its watch stream.
    fn serve_event(&mut self, (key, generation): (Key, u64), event: ServeEvent) {
        let Some(vbd) = self.vbds.get(&key) else {
            return;
        };
        if vbd.generation != generation || vbd.serve.is_none() {
            return;
        }
        match event {
            ServeEvent::Resized(sectors) => {
                if vbd.phase != Phase::Connected {
                    return;
                }
                // Both in one transaction: the frontend, woken by `state`, reads the new size.
                let written = self.transact(
                    &vbd.backend,
                    &[
                        ("sectors", Some(sectors.to_string())),
                        ("state", Some(state::CONNECTED.to_string())),
                    ],
                );
                match written {
                    Ok(()) => info!("{}: resized to {sectors} sectors", name(key)),
                    Err(err) => warn!("{}: publish the resize: {err}", name(key)),
                }
            }
            ServeEvent::Failed(message) => {
                self.fail(key, &format!("ferrotap serve failed: {message}"));
            }
            ServeEvent::Gone => self.serve_gone(key, "its control socket closed".into()),
        }
    }

    fn serve_gone(&mut self, key: Key, why: String) {
        let Some(vbd) = self.vbds.get_mut(&key) else {
            return;
        };
        let Some(serve) = vbd.serve.take() else {
            return;
        };
        let control: &Path = serve.control();
        let message = format!("ferrotap serve on {} exited ({why})", control.display());
        if serve.owned() {
            // A dead serve leaves its socket file: the next one of this device would adopt it.
            let _ = std::fs::remove_file(control);
        }
        self.fail(key, &message);
    }

    /// Serves this shim started that exited.
    fn reap(&mut self) {
        let gone: Vec<(Key, String)> = self
            .vbds
            .iter_mut()
            .filter_map(|(key, vbd)| {
                let status = vbd.serve.as_mut()?.exited()?;
                Some((*key, status))
            })
            .collect();
        for (key, status) in gone {
            self.serve_gone(key, status);
        }
    }
}

fn describe_offer(info: &BackendInfo) -> String {
    let features = &info.features;
    format!(
        "max-ring-page-order {}, {} queue(s), indirect {}, persistent {}, discard {}",
        features.max_ring_page_order,
        features.max_queues,
        features.max_indirect_segments,
        features.persistent,
        features.discard
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_vbd3_name_their_device() {
        assert_eq!(key_of("/3/51712"), Some((3, 51712)));
        assert_eq!(key_of("/3/51712/state"), Some((3, 51712)));
        assert_eq!(key_of("/3"), None);
        assert_eq!(key_of(""), None);
        assert_eq!(key_of("/x/1"), None);
    }

    #[test]
    fn states_parse_or_are_absent() {
        assert_eq!(parse_state(Some("4")), Some(4));
        assert_eq!(parse_state(Some(" 6\n")), Some(6));
        assert_eq!(parse_state(Some("")), None);
        assert_eq!(parse_state(None), None);
    }
}
