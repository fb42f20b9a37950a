//! ferrotap-shim: takes tapback's place for `vbd3` backends. The XenBus handshake lands with
//! the control-plane work; today it only states what it is.

#![deny(clippy::unwrap_used)]

fn main() {
    eprintln!("ferrotap-shim: the vbd3 backend handshake is not implemented yet");
    std::process::exit(2);
}
