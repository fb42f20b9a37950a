//! Fuzz the vhd metadata parser: any bytes opened as vhd must give an error or a working
//! layer, never a panic, a hang or an unbounded allocation.
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::exercise(ferrotap::image::Format::Vhd, data);
});
