//! Fuzz ferrotap-shim's reading of the frontend's transport keys (ring refs, event
//! channels, ring order, queue count, protocol, feature-persistent), which a guest writes.
//! The input picks the backend's offer and the shape of a frontend (queues, ring order),
//! then, key by key of what that frontend writes, whether the key is written right, left
//! out, given bytes from the input or any 32-bit number; a read may also fail as a xenstore
//! error would. Never a panic; a transport that is accepted fits the offer: 1 to max_queues
//! queues, 2^order refs each, order within the maximum, ports 1 to 4095, persistent only
//! when offered.
#![no_main]

use std::collections::HashMap;

use blkback_shim::transport::{read_transport, Offer};

/// Takes the input a byte or a value at a time; an exhausted input reads as zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    /// The value of one key: `good` when the choice says so, else something else.
    fn value(&mut self, good: String) -> Option<String> {
        match self.byte() % 5 {
            0 | 1 => Some(good),
            2 => None,
            3 => {
                let end = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
                let text = String::from_utf8_lossy(&self.0[..end]).into_owned();
                self.0 = self.0.get(end + 1..).unwrap_or_default();
                Some(text)
            }
            _ => {
                let bytes = [self.byte(), self.byte(), self.byte(), self.byte()];
                Some(u32::from_le_bytes(bytes).to_string())
            }
        }
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let offer = Offer {
        max_ring_page_order: u32::from(input.byte() % 5),
        max_queues: u32::from(input.byte() % 8) + 1,
        persistent: input.byte() & 1 != 0,
    };
    let queues = u32::from(input.byte() % 10);
    let order = u32::from(input.byte() % 6);
    let mut keys: HashMap<String, String> = HashMap::new();
    let mut write = |keys: &mut HashMap<String, String>, key: String, good: String| {
        if let Some(value) = input.value(good) {
            keys.insert(key, value);
        }
    };
    let protocol = ["x86_64-abi", "x86_32-abi", "x86_64-abi\n"][usize::from(queues as u8 % 3)];
    write(&mut keys, "protocol".into(), protocol.into());
    write(
        &mut keys,
        "multi-queue-num-queues".into(),
        queues.to_string(),
    );
    write(&mut keys, "ring-page-order".into(), order.to_string());
    write(&mut keys, "feature-persistent".into(), "1".into());
    for queue in 0..queues.max(1) {
        let prefix = if queues <= 1 {
            String::new()
        } else {
            format!("queue-{queue}/")
        };
        write(&mut keys, format!("{prefix}ring-ref"), "8".into());
        for page in 0..1u32 << order {
            let gref = (8 + queue * 16 + page).to_string();
            write(&mut keys, format!("{prefix}ring-ref{page}"), gref);
        }
        let port = (queue + 1).to_string();
        write(&mut keys, format!("{prefix}event-channel"), port);
    }
    let failing = input.byte() % 8 == 7;
    let mut read = |key: &str| -> Result<Option<String>, String> {
        match keys.get(key) {
            Some(value) => Ok(Some(value.clone())),
            None if failing => Err(format!("reading {key} failed")),
            None => Ok(None),
        }
    };
    let Ok(transport) = read_transport(&mut read, &offer) else {
        return;
    };
    let queues = transport.queues.len() as u32;
    assert!((1..=offer.max_queues).contains(&queues), "{queues} queues");
    assert!(transport.ring_page_order <= offer.max_ring_page_order);
    for queue in &transport.queues {
        assert_eq!(queue.ring_refs.len(), 1 << transport.ring_page_order);
        assert!((1..=4095).contains(&queue.event_channel));
    }
    assert!(!transport.persistent || offer.persistent);
    let request = transport.connect_request(1, 51712, "backend/vbd3/1/51712");
    assert_eq!(
        request["queues"].as_array().map(Vec::len),
        Some(queues as usize)
    );
});
