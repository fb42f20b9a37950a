//! The toolstack's part of a VBD (../shared/xensim.md section 5), as xenopsd writes it: the
//! backend and frontend directories with their keys and permissions, hot-unplug and removal.

use ferrotap::toolstack::{attach, backend_path, frontend_path, Vbd3};
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
        backend_path(u32::from(self.domid), self.devid)
    }

    pub fn frontend(&self) -> String {
        frontend_path(u32::from(self.domid), self.devid)
    }
}

/// Write the backend and frontend directories as `ferrotap vbd attach` does (one
/// transaction, the toolstack's permissions).
pub fn add(xs: &Client, vbd: &Vbd) {
    let spec = Vbd3 {
        domid: u32::from(vbd.domid),
        devid: vbd.devid,
        params: vbd.params.clone(),
        read_only: vbd.mode == "r",
        cdrom: vbd.device_type == "cdrom",
    };
    attach(xs, &spec).unwrap();
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
