//! The toolstack's part of a VBD (../shared/xensim.md section 5), as xenopsd writes it: the
//! backend and frontend directories with their keys and permissions, hot-unplug and removal.

use ferrotap::xenstore::Client;

/// One VBD as the toolstack describes it.
#[derive(Debug, Clone)]
pub struct Vbd {
    pub domid: u16,
    pub devid: u32,
    /// An image path (the shim starts `ferrotap serve` on it) or a serve's control socket.
    pub params: String,
    /// "w" or "r".
    pub mode: &'static str,
    /// "disk" or "cdrom".
    pub device_type: &'static str,
}

impl Vbd {
    pub fn disk(domid: u16, devid: u32, params: &str) -> Vbd {
        Vbd {
            domid,
            devid,
            params: params.to_string(),
            mode: "w",
            device_type: "disk",
        }
    }

    pub fn backend(&self) -> String {
        format!("/local/domain/0/backend/vbd3/{}/{}", self.domid, self.devid)
    }

    pub fn frontend(&self) -> String {
        format!("/local/domain/{}/device/vbd/{}", self.domid, self.devid)
    }
}

/// Write the backend and frontend directories in one transaction: the backend owned by
/// dom0 and readable by the guest, the frontend owned by the guest and readable by dom0.
pub fn add(xs: &Client, vbd: &Vbd) {
    let (be, fe, domid) = (vbd.backend(), vbd.frontend(), vbd.domid.to_string());
    let backend_keys = [
        ("frontend", fe.clone()),
        ("frontend-id", domid.clone()),
        ("params", vbd.params.clone()),
        ("mode", vbd.mode.to_string()),
        ("online", "1".to_string()),
        ("removable", "0".to_string()),
        ("state", "1".to_string()),
        ("type", "vbd3".to_string()),
        ("dev", "xvda".to_string()),
        ("device-type", vbd.device_type.to_string()),
    ];
    let frontend_keys = [
        ("backend", be.clone()),
        ("backend-id", "0".to_string()),
        ("state", "1".to_string()),
        ("virtual-device", vbd.devid.to_string()),
        ("device-type", vbd.device_type.to_string()),
    ];
    let backend_perms = ["n0".to_string(), format!("r{domid}")];
    let frontend_perms = [format!("n{domid}"), "r0".to_string()];
    loop {
        let tx = xs.transaction_start().unwrap();
        xs.mkdir(tx, &be).unwrap();
        xs.set_perms(tx, &be, &backend_perms).unwrap();
        for (key, value) in &backend_keys {
            xs.write(tx, &format!("{be}/{key}"), value).unwrap();
        }
        xs.mkdir(tx, &fe).unwrap();
        xs.set_perms(tx, &fe, &frontend_perms).unwrap();
        for (key, value) in &frontend_keys {
            xs.write(tx, &format!("{fe}/{key}"), value).unwrap();
        }
        if xs.transaction_end(tx, true).unwrap() {
            return;
        }
    }
}

/// Hot-unplug: `online` to 0 (the backend tears the device down and writes Closed).
pub fn set_offline(xs: &Client, vbd: &Vbd) {
    xs.write(0, &format!("{}/online", vbd.backend()), "0")
        .unwrap();
}

/// Remove both directories, as after the guest is gone.
pub fn remove(xs: &Client, vbd: &Vbd) {
    xs.rm(0, &vbd.backend()).unwrap();
    xs.rm(0, &vbd.frontend()).unwrap();
}
