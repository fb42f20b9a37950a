//! What a toolstack writes into xenstore to give a guest a `vbd3` disk, and to take it away:
//! the nodes of xensim.md section 5, which are those xenopsd writes on XCP-ng and those the
//! xenlab's `user` test writes by hand. blkback-shim does the rest of the handshake.
//!
//! `ferrotap vbd attach|detach` runs this for plain `xl` users (xl has no disk type for a
//! userspace blkif backend); the demo and the tests use it to play the toolstack.

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use crate::error::{Error, ErrorKind, Result};
use crate::xenstore::{Client, TxId};

/// XenbusState values the toolstack looks at.
const STATE_INITIALISING: &str = "1";
const STATE_CLOSING: &str = "5";
const STATE_CLOSED: &str = "6";

/// One guest disk served through blkback-shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vbd3 {
    pub domid: u32,
    /// The virtual device number (`virtual-device`; 51712 = xvda).
    pub devid: u32,
    /// What blkback-shim serves: an image path, or the control socket of a running
    /// `ferrotap serve` (README, "blkback-shim").
    pub params: String,
    pub read_only: bool,
    pub cdrom: bool,
}

impl Vbd3 {
    pub fn backend_path(&self) -> String {
        backend_path(self.domid, self.devid)
    }

    pub fn frontend_path(&self) -> String {
        frontend_path(self.domid, self.devid)
    }
}

pub fn backend_path(domid: u32, devid: u32) -> String {
    format!("/local/domain/0/backend/vbd3/{domid}/{devid}")
}

pub fn frontend_path(domid: u32, devid: u32) -> String {
    format!("/local/domain/{domid}/device/vbd/{devid}")
}

/// The virtual device number of a Linux disk name (`xvda`, `xvdb`, ... `xvdaa`), as Xen's
/// vbd-interface.txt numbers them: xvd disks 0-15 in the 202 major, later ones in the
/// extended form `1 << 28 | disk << 8`. A plain number is taken as it is.
pub fn parse_vdev(name: &str) -> Result<u32> {
    if let Ok(number) = name.parse::<u32>() {
        return Ok(number);
    }
    let bad = || {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("{name:?} is not a virtual device (xvda, xvdb, ..., or a number)"),
        )
    };
    let letters = name.strip_prefix("xvd").ok_or_else(bad)?;
    if letters.is_empty() || letters.len() > 3 || !letters.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(bad());
    }
    let disk = bijective_index(letters).ok_or_else(bad)?;
    if disk < 16 {
        Ok((202 << 8) | (disk << 4))
    } else if disk < (1 << 20) {
        Ok((1 << 28) | (disk << 8))
    } else {
        Err(bad())
    }
}

/// `a` = 0, `z` = 25, `aa` = 26, `az` = 51, `ba` = 52, ...
fn bijective_index(letters: &str) -> Option<u32> {
    let mut value: u32 = 0;
    for b in letters.bytes() {
        value = value
            .checked_mul(26)?
            .checked_add(u32::from(b - b'a') + 1)?;
    }
    value.checked_sub(1)
}

/// Write the backend and frontend nodes of `vbd` in one transaction, with the permissions
/// a toolstack gives them (backend: owned by dom0, readable by the guest; frontend: owned by
/// the guest, readable by dom0). Fails if the backend node already exists.
pub fn attach(client: &Client, vbd: &Vbd3) -> Result<()> {
    let be = vbd.backend_path();
    let fe = vbd.frontend_path();
    let device_type = if vbd.cdrom { "cdrom" } else { "disk" };
    let mode = if vbd.read_only { "r" } else { "w" };
    let dev = vdev_name(vbd.devid);
    client.transaction(|tx| {
        if client.read_opt(tx, &be)?.is_some() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{be} exists already: detach it first"),
            ));
        }
        let backend_nodes = [
            ("frontend", fe.as_str()),
            ("frontend-id", &vbd.domid.to_string()),
            ("online", "1"),
            ("removable", if vbd.cdrom { "1" } else { "0" }),
            ("state", STATE_INITIALISING),
            ("dev", &dev),
            ("type", "vbd3"),
            ("mode", mode),
            ("device-type", device_type),
            ("params", &vbd.params),
        ];
        let backend_perms = [String::from("n0"), format!("r{}", vbd.domid)];
        write_nodes(client, tx, &be, &backend_nodes, &backend_perms)?;
        let frontend_nodes = [
            ("backend", be.as_str()),
            ("backend-id", "0"),
            ("state", STATE_INITIALISING),
            ("virtual-device", &vbd.devid.to_string()),
            ("device-type", device_type),
        ];
        let frontend_perms = [format!("n{}", vbd.domid), String::from("r0")];
        write_nodes(client, tx, &fe, &frontend_nodes, &frontend_perms)
    })
}

fn write_nodes(
    client: &Client,
    tx: TxId,
    dir: &str,
    nodes: &[(&str, &str)],
    perms: &[String],
) -> Result<()> {
    client.write(tx, dir, "")?;
    client.set_perms(tx, dir, perms)?;
    for (key, value) in nodes {
        let path = format!("{dir}/{key}");
        client.write(tx, &path, value)?;
        client.set_perms(tx, &path, perms)?;
    }
    Ok(())
}

/// Take the disk away as xl does: `online` 0 and the backend to Closing in one transaction,
/// then wait (up to `timeout`) for the backend to reach Closed or go away, and remove both
/// nodes. Returns whether the backend closed in time (the nodes are removed either way).
pub fn detach(client: &Client, domid: u32, devid: u32, timeout: Duration) -> Result<bool> {
    let be = backend_path(domid, devid);
    let fe = frontend_path(domid, devid);
    let state_path = format!("{be}/state");
    client.transaction(|tx| {
        if client.read_opt(tx, &be)?.is_none() {
            return Ok(());
        }
        client.write(tx, &format!("{be}/online"), "0")?;
        client.write(tx, &state_path, STATE_CLOSING)
    })?;
    let token = format!("detach-{domid}-{devid}");
    client.watch(&state_path, &token)?;
    let deadline = Instant::now() + timeout;
    let closed = loop {
        match client.read_opt(0, &state_path)?.as_deref() {
            None | Some(STATE_CLOSED) => break true,
            Some(_) => {}
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break false;
        };
        // Any event (ours or not) is a cue to look again; the read above decides.
        client.next_event(Some(left.min(Duration::from_millis(200))))?;
    };
    let _ = client.unwatch(&state_path, &token);
    // The frontend's directory goes with its domain (xl destroy, a guest shut down): already
    // gone is fine, for either node.
    let remove = |tx, path: &str| match client.rm(tx, path) {
        Err(err) if err.is_not_found() => Ok(()),
        other => other,
    };
    client.transaction(|tx| {
        remove(tx, &fe)?;
        remove(tx, &be)
    })?;
    Ok(closed)
}

/// The Linux name of a virtual device number (`xvda` for 51712), or the number itself.
pub fn vdev_name(devid: u32) -> String {
    let disk = if devid >> 8 == 202 {
        Some((devid >> 4) & 0xf)
    } else if devid >> 28 == 1 {
        Some((devid >> 8) & 0xfffff)
    } else {
        None
    };
    match disk {
        Some(mut disk) => {
            let mut letters = Vec::new();
            loop {
                letters.push(b'a' + (disk % 26) as u8);
                if disk < 26 {
                    break;
                }
                disk = disk / 26 - 1;
            }
            letters.reverse();
            format!("xvd{}", String::from_utf8_lossy(&letters))
        }
        None => devid.to_string(),
    }
}

#[derive(Debug, Subcommand)]
pub enum VbdCommand {
    /// Give guest DOMID a disk served by blkback-shim: write the vbd3 backend and frontend
    /// nodes as a toolstack would (create the guest paused with `xl create -p`, then unpause).
    Attach(AttachArgs),
    /// Take the disk away as xl does: online=0, backend Closing, wait for Closed, remove the
    /// nodes.
    Detach(DetachArgs),
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    #[arg(long)]
    pub domid: u32,
    /// The guest's device: xvda, xvdb, ... or a virtual-device number.
    #[arg(long, default_value = "xvda")]
    pub vdev: String,
    /// An image path (blkback-shim starts `ferrotap serve` on it) or the control socket of a
    /// `ferrotap serve` already running.
    #[arg(long)]
    pub params: String,
    #[arg(long)]
    pub read_only: bool,
    #[arg(long)]
    pub cdrom: bool,
    /// xenstored's socket (default: $XENSTORED_PATH, /run/xenstored/socket, /dev/xen/xenbus).
    #[arg(long)]
    pub xenstore: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    #[arg(long)]
    pub domid: u32,
    #[arg(long, default_value = "xvda")]
    pub vdev: String,
    /// Seconds to wait for the backend to close.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    #[arg(long)]
    pub xenstore: Option<std::path::PathBuf>,
}

fn open_client(path: Option<&std::path::Path>) -> Result<Client> {
    match path {
        Some(path) => Client::connect(path),
        None => Client::open_default(),
    }
}

/// Run a `ferrotap vbd` command.
pub fn run(command: &VbdCommand) -> Result<()> {
    match command {
        VbdCommand::Attach(args) => {
            let client = open_client(args.xenstore.as_deref())?;
            let vbd = Vbd3 {
                domid: args.domid,
                devid: parse_vdev(&args.vdev)?,
                params: args.params.clone(),
                read_only: args.read_only,
                cdrom: args.cdrom,
            };
            attach(&client, &vbd)?;
            println!("{}", vbd.backend_path());
            Ok(())
        }
        VbdCommand::Detach(args) => {
            let client = open_client(args.xenstore.as_deref())?;
            let devid = parse_vdev(&args.vdev)?;
            let timeout = Duration::try_from_secs_f64(args.timeout)
                .map_err(|_| Error::new(ErrorKind::InvalidArgument, "--timeout must be >= 0"))?;
            if !detach(&client, args.domid, devid, timeout)? {
                eprintln!(
                    "ferrotap vbd detach: the backend did not reach Closed within {}s; nodes removed anyway",
                    args.timeout
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdev_numbers_follow_vbd_interface_txt() {
        assert_eq!(parse_vdev("xvda").unwrap(), 51712);
        assert_eq!(parse_vdev("xvdb").unwrap(), 51728);
        assert_eq!(parse_vdev("xvdp").unwrap(), 51952);
        assert_eq!(parse_vdev("xvdq").unwrap(), (1 << 28) | (16 << 8));
        assert_eq!(parse_vdev("xvdaa").unwrap(), (1 << 28) | (26 << 8));
        assert_eq!(parse_vdev("768").unwrap(), 768);
        assert!(parse_vdev("sda").is_err());
        assert!(parse_vdev("xvd").is_err());
        assert!(parse_vdev("xvdA").is_err());
        for name in [
            "xvda", "xvdb", "xvdp", "xvdq", "xvdz", "xvdaa", "xvdzz", "xvdabc",
        ] {
            assert_eq!(vdev_name(parse_vdev(name).unwrap()), name);
        }
    }
}
