//! ferrotap: a blkif datapath for Xen dom0, tapdisk's replacement.
//!
//! `image` is the format layer (raw, VHD, qcow2 and chains of them); `img` holds the
//! `ferrotap img` commands built on it.

// Nothing a guest, a file or a peer controls may reach an unwrap in the library; integration
// tests (separate crates) may unwrap freely.
#![deny(clippy::unwrap_used)]

pub mod blkif;
pub mod ctl;
pub mod datapath;
pub mod demo;
pub mod engine;
pub mod error;
pub mod image;
pub mod img;
mod listener;
pub mod nbd;
pub mod serve;
mod sys;
pub mod toolstack;
pub mod xen;
pub mod xensim;
pub mod xenstore;
