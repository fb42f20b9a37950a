//! The frontend's transport keys (xensim.md section 5, Linux blkback's connect_ring): read,
//! validated against what the backend offered, turned into serve's `connect` request.

use ferrotap::blkif::Protocol;
use serde_json::{json, Value};

/// Event channel ports a frontend may name (xensim allocates 1..=4095).
const MAX_EVENT_CHANNEL: u32 = 4095;

/// What the backend offered at InitWait (the limits the frontend's keys are checked against).
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    pub max_ring_page_order: u32,
    pub max_queues: u32,
    pub persistent: bool,
}

/// One queue's ring pages (in ring order) and event channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    pub ring_refs: Vec<u32>,
    pub event_channel: u32,
}

/// The frontend's transport, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transport {
    pub protocol: Protocol,
    pub ring_page_order: u32,
    pub queues: Vec<QueueKeys>,
    pub persistent: bool,
}

impl Transport {
    /// Serve's `connect` request for frontend domain `domid` (device `devid` of backend
    /// `backend`, for serve's stats and logs).
    pub fn connect_request(&self, domid: u16, devid: u32, backend: &str) -> Value {
        json!({
            "op": "connect",
            "domid": domid,
            "devid": devid,
            "backend": backend,
            "protocol": self.protocol.name(),
            "ring_page_order": self.ring_page_order,
            "queues": self.queues.iter().map(|queue| json!({
                "ring_refs": queue.ring_refs,
                "event_channel": queue.event_channel,
            })).collect::<Vec<_>>(),
            "persistent": self.persistent,
        })
    }
}

/// The longest part of a frontend's value quoted in an error: a guest controls it, and the
/// message must fit a xenstore write.
const QUOTED_MAX: usize = 32;

/// `value` for a message, cut short when long.
pub fn quoted(value: &str) -> String {
    match value.char_indices().nth(QUOTED_MAX) {
        Some((end, _)) => format!("{:?}...", &value[..end]),
        None => format!("{value:?}"),
    }
}

fn number(key: &str, value: &str) -> Result<u32, String> {
    value
        .trim()
        .parse::<u32>()
        .map_err(|_| format!("bad {key} {}: not a number", quoted(value)))
}

/// Read the transport of the frontend through `read` (a key relative to the frontend's
/// directory -> its value, or None when missing) and check it against `offer`.
pub fn read_transport(
    read: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
    offer: &Offer,
) -> Result<Transport, String> {
    let protocol = read("protocol")?;
    let protocol = Protocol::from_xenstore(protocol.as_deref().map(str::trim)).map_err(|_| {
        format!(
            "unknown blkif protocol {} (x86_64-abi or x86_32-abi)",
            quoted(protocol.as_deref().unwrap_or_default())
        )
    })?;
    let queue_count = match read("multi-queue-num-queues")? {
        None => 1,
        Some(value) => number("multi-queue-num-queues", &value)?,
    };
    if queue_count == 0 || queue_count > offer.max_queues {
        return Err(format!(
            "multi-queue-num-queues {queue_count}: the backend offers 1 to {}",
            offer.max_queues
        ));
    }
    let ring_page_order = match read("ring-page-order")? {
        None => None,
        Some(value) => Some(number("ring-page-order", &value)?),
    };
    if let Some(order) = ring_page_order {
        if order > offer.max_ring_page_order {
            return Err(format!(
                "ring-page-order {order} above the maximum {}",
                offer.max_ring_page_order
            ));
        }
    }
    let mut queues = Vec::with_capacity(queue_count as usize);
    for index in 0..queue_count {
        let prefix = if queue_count == 1 {
            String::new()
        } else {
            format!("queue-{index}/")
        };
        let ring_refs = match ring_page_order {
            None => vec![required(read, &format!("{prefix}ring-ref"))?],
            Some(order) => (0..1u32 << order)
                .map(|page| required(read, &format!("{prefix}ring-ref{page}")))
                .collect::<Result<Vec<_>, _>>()?,
        };
        let key = format!("{prefix}event-channel");
        let event_channel = required(read, &key)?;
        if event_channel == 0 || event_channel > MAX_EVENT_CHANNEL {
            return Err(format!(
                "bad {key} {event_channel}: ports are 1 to {MAX_EVENT_CHANNEL}"
            ));
        }
        queues.push(QueueKeys {
            ring_refs,
            event_channel,
        });
    }
    let persistent = match read("feature-persistent")? {
        None => false,
        Some(value) => number("feature-persistent", &value)? != 0,
    };
    Ok(Transport {
        protocol,
        ring_page_order: ring_page_order.unwrap_or(0),
        queues,
        persistent: persistent && offer.persistent,
    })
}

fn required(
    read: &mut dyn FnMut(&str) -> Result<Option<String>, String>,
    key: &str,
) -> Result<u32, String> {
    match read(key)? {
        Some(value) => number(key, &value),
        None => Err(format!("no {key}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const OFFER: Offer = Offer {
        max_ring_page_order: 2,
        max_queues: 4,
        persistent: true,
    };

    fn parse(keys: &[(&str, &str)]) -> Result<Transport, String> {
        let map: HashMap<String, String> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        read_transport(&mut |key| Ok(map.get(key).cloned()), &OFFER)
    }

    #[test]
    fn single_page_ring_with_defaults() {
        let transport = parse(&[("ring-ref", "8"), ("event-channel", "3")]).unwrap();
        assert_eq!(
            transport,
            Transport {
                protocol: Protocol::X86_64,
                ring_page_order: 0,
                queues: vec![QueueKeys {
                    ring_refs: vec![8],
                    event_channel: 3
                }],
                persistent: false,
            }
        );
        let request = transport.connect_request(5, 51712, "/be");
        assert_eq!(request["queues"][0]["ring_refs"], json!([8]));
        assert_eq!(request["protocol"], "x86_64-abi");
    }

    #[test]
    fn multi_page_multi_queue_32_bit_persistent() {
        let transport = parse(&[
            ("protocol", "x86_32-abi"),
            ("ring-page-order", "1"),
            ("multi-queue-num-queues", "2"),
            ("queue-0/ring-ref0", "10"),
            ("queue-0/ring-ref1", "9"),
            ("queue-0/event-channel", "1"),
            ("queue-1/ring-ref0", "20"),
            ("queue-1/ring-ref1", "30"),
            ("queue-1/event-channel", "2"),
            ("feature-persistent", "1"),
        ])
        .unwrap();
        assert_eq!(transport.protocol, Protocol::X86_32);
        assert_eq!(transport.ring_page_order, 1);
        assert_eq!(transport.queues[0].ring_refs, vec![10, 9]);
        assert_eq!(transport.queues[1].ring_refs, vec![20, 30]);
        assert_eq!(transport.queues[1].event_channel, 2);
        assert!(transport.persistent);
    }

    #[test]
    fn long_values_are_quoted_short() {
        let long = "9".repeat(5000);
        let err = parse(&[("ring-ref", &long), ("event-channel", "3")]).unwrap_err();
        assert!(err.len() < 100, "{err}");
        assert!(err.starts_with("bad ring-ref \"999"), "{err}");
        let err = parse(&[("protocol", &"é".repeat(3000))]).unwrap_err();
        assert!(err.len() < 150, "{err}");
        assert_eq!(quoted("x86"), "\"x86\"");
    }

    #[test]
    fn bad_keys_are_named() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("event-channel", "3")], "no ring-ref"),
            (
                &[("ring-page-order", "3"), ("event-channel", "3")],
                "ring-page-order 3 above the maximum 2",
            ),
            (
                &[
                    ("protocol", "sparc-abi"),
                    ("ring-ref", "8"),
                    ("event-channel", "3"),
                ],
                "unknown blkif protocol",
            ),
            (
                &[("ring-ref", "8"), ("event-channel", "x1")],
                "bad event-channel",
            ),
            (
                &[("ring-ref", "8"), ("event-channel", "0")],
                "bad event-channel 0",
            ),
            (
                &[("ring-ref", "-1"), ("event-channel", "2")],
                "bad ring-ref",
            ),
            (
                &[
                    ("ring-page-order", "1"),
                    ("ring-ref0", "4"),
                    ("event-channel", "2"),
                ],
                "no ring-ref1",
            ),
            (
                &[("multi-queue-num-queues", "5")],
                "multi-queue-num-queues 5",
            ),
            (
                &[("multi-queue-num-queues", "2"), ("queue-0/ring-ref", "4")],
                "no queue-0/event-channel",
            ),
        ];
        for (keys, expected) in cases {
            let err = parse(keys).unwrap_err();
            assert!(err.contains(expected), "{keys:?}: {err}");
        }
    }
}
