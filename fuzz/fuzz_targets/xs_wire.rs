//! Fuzz the xenstore wire layer and the xensim xenstored behind it: the input is the path
//! validators' argument, then a stream of raw messages (each preceded by a byte choosing one
//! of two connections) answered by the server without sockets. Never a panic; every reply
//! and event is a well-formed message of at most 4096 payload bytes; the tree's node and byte
//! accounting matches a recount and stays within the limits.
#![no_main]

use ferrotap::xensim::xenstored::Offline;
use ferrotap::xenstore::wire::{self, Request};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = wire::canonical_path(data);
    let _ = wire::canonical_watch_path(data);
    let _ = wire::split_nul(data);

    let mut server = Offline::new(2);
    let mut input = data;
    while let Some((&selector, rest)) = input.split_first() {
        input = rest;
        let Ok(message) = wire::read_message(&mut input) else {
            break;
        };
        let _ = Request::decode(message.header.msg_type, &message.payload);
        let conn = usize::from(selector & 1);
        server.request(conn, &message.header, &message.payload);
        if selector & 0x80 != 0 {
            server.disconnect(conn);
        }
        for conn in 0..2 {
            for output in server.take_output(conn) {
                let mut bytes = output.as_slice();
                let reply = wire::read_message(&mut bytes).expect("a well-formed message");
                assert!(bytes.is_empty() && reply.payload.len() <= wire::PAYLOAD_MAX);
            }
        }
    }
    if let Err(err) = server.check_accounting() {
        panic!("{err}");
    }
});
