//! Fuzz the NBD server's parsing: the input is everything a hostile client sends. The
//! handshake reads it as flags and options (replies go to a sink); if the client reaches
//! transmission, the rest is cut into request headers, each decoded and validated against
//! the session. Never a panic, a hang or an allocation beyond the option limit.
#![no_main]

use std::io::{self, Read, Write};
use std::sync::Arc;

use ferrotap::error::Result;
use ferrotap::image::chain::BlockStatus;
use ferrotap::nbd::handshake::negotiate;
use ferrotap::nbd::proto::{Request, REQUEST_LEN};
use ferrotap::nbd::server::{validate, Limits};
use ferrotap::nbd::{Backend, Export};

/// A 1 MiB export that is never read or written here: only its size and flags matter.
struct Nothing;

impl Backend for Nothing {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Ok(())
    }
    fn write_at(&self, _data: &[u8], _offset: u64) -> Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            offset,
            len,
            depth: None,
            zero: true,
        })
    }
}

/// The client side of a connection: reads come from the fuzz input, writes vanish.
struct Client<'a> {
    input: &'a [u8],
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&read_only, data)) = data.split_first() else {
        return;
    };
    let export = Arc::new(Export::new(
        "disk",
        "fuzz",
        Arc::new(Nothing),
        read_only & 1 != 0,
    ));
    let mut client = Client { input: data };
    let Ok(Some(session)) = negotiate(&mut client, &export) else {
        return;
    };
    let limits = Limits {
        size: export.size(),
        read_only: export.read_only,
        structured: session.structured,
        allocation_context: session.allocation_context.is_some(),
    };
    for chunk in client.input.chunks_exact(REQUEST_LEN) {
        let mut header = [0u8; REQUEST_LEN];
        header.copy_from_slice(chunk);
        if let Some(request) = Request::parse(&header) {
            let _ = validate(&request, &limits);
            assert_eq!(Request::parse(&request.encode()), Some(request));
        }
    }
});
