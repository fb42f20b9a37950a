//! ferrotap: a blkif datapath for Xen dom0, tapdisk's replacement.
//!
//! `image` is the format layer (raw, VHD, qcow2 and chains of them); `img` holds the
//! `ferrotap img` commands built on it.

pub mod demo;
pub mod error;
pub mod image;
pub mod img;
mod sys;
