//! The parts of ferrotap-shim that read what a guest wrote: a library so that the fuzz
//! targets (fuzz/) reach them as the binary does.

#![deny(clippy::unwrap_used)]

pub mod transport;
