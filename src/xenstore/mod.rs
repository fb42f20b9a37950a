//! XenStore: the wire protocol of xen/io/xs_wire.h ([`wire`]) and a client ([`client`]) for
//! xenstored's unix socket or /dev/xen/xenbus, with watches, transactions retried on EAGAIN
//! and several requests in flight from several threads. The simulated host's server is
//! `crate::xensim::xenstored`.
//!
//! Why not a crate: xenstore-rs 0.8 is GPL-3.0-only (ferrotap is Apache-2.0) and its
//! blocking API has neither watches nor transactions.

pub mod client;
pub mod wire;

pub use client::{Client, TxId, WatchEvent};
