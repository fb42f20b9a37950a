//! The blkif protocol of Xen's io/blkif.h: operations, statuses, the request and response
//! layouts of the `x86_64-abi` (native here) and `x86_32-abi` protocols, and the shared ring
//! of io/ring.h ([`ring`]). Nothing here touches an image or a grant.

pub mod ring;

/// Bytes in a sector as blkif counts them (`sector`, `first_sect`, `nr_sectors`).
pub const SECTOR_SIZE: u64 = 512;
/// A grant page.
pub const PAGE_SIZE: usize = 4096;
/// Sectors in one page.
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE as u64 / SECTOR_SIZE) as u8;
/// BLKIF_MAX_SEGMENTS_PER_REQUEST: segments carried in a direct request.
pub const MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: indirect pages named in an indirect request.
pub const MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// `struct blkif_request_segment`: a segment descriptor, in a request or an indirect page.
pub const SEGMENT_SIZE: usize = 8;
/// Segment descriptors that fit in one indirect page.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / SEGMENT_SIZE;
/// The most indirect segments ferrotap advertises (`feature-max-indirect-segments`), as
/// Linux blkback does: 1 MiB per request.
pub const MAX_INDIRECT_SEGMENTS: usize = 256;

/// Request operations (`BLKIF_OP_*`).
pub mod op {
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    pub const WRITE_BARRIER: u8 = 2;
    pub const FLUSH_DISKCACHE: u8 = 3;
    pub const DISCARD: u8 = 5;
    pub const INDIRECT: u8 = 6;
}

/// Response statuses (`BLKIF_RSP_*`).
pub mod status {
    pub const OKAY: i16 = 0;
    pub const ERROR: i16 = -1;
    pub const EOPNOTSUPP: i16 = -2;
}

/// `BLKIF_DISCARD_SECURE`: the discarded range must be unrecoverable.
pub const DISCARD_SECURE: u8 = 1;

/// The request layout a frontend uses (its xenstore `protocol` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `x86_64-abi`, the native layout of an x86_64 dom0: 112-byte requests.
    X86_64,
    /// `x86_32-abi`: packed, 108-byte requests.
    X86_32,
}

/// One data segment: a granted page and the sectors of it the request uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
}

/// What follows the common header, by layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE (and unknown operations): up to 11
    /// segments inline. `nr_segments` is as the frontend wrote it (not yet validated).
    Direct {
        nr_segments: u8,
        segments: [Segment; MAX_SEGMENTS_PER_REQUEST],
    },
    /// INDIRECT: the segments live in up to 8 granted pages.
    Indirect {
        indirect_op: u8,
        nr_segments: u16,
        indirect_grefs: [u32; MAX_INDIRECT_PAGES_PER_REQUEST],
    },
    /// DISCARD.
    Discard { flag: u8, nr_sectors: u64 },
}

/// A request, copied out of shared memory once, before anything looks at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub operation: u8,
    pub id: u64,
    pub sector: u64,
    pub handle: u16,
    pub body: RequestBody,
}

/// A response (`blkif_response`): 16 bytes in both protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub operation: u8,
    pub status: i16,
}

/// Byte offsets of the fields whose place differs between the two layouts. The first four
/// bytes (operation, then `nr_segments`/`indirect_op`/`flag`, then `handle`/`nr_segments`)
/// are common to both.
struct Layout {
    id: usize,
    sector: usize,
    segments: usize,
    indirect_handle: usize,
    indirect_grefs: usize,
    discard_nr_sectors: usize,
}

/// x86_64: 64-bit fields aligned to 8.
const LAYOUT_X86_64: Layout = Layout {
    id: 8,
    sector: 16,
    segments: 24,
    indirect_handle: 24,
    indirect_grefs: 28,
    discard_nr_sectors: 24,
};

/// x86_32: 64-bit fields aligned to 4 only, so everything after `handle` moves up by 4.
const LAYOUT_X86_32: Layout = Layout {
    id: 4,
    sector: 12,
    segments: 20,
    indirect_handle: 20,
    indirect_grefs: 24,
    discard_nr_sectors: 20,
};

/// The largest entry of either protocol: local copies of an entry use this much stack.
pub(crate) const MAX_ENTRY_SIZE: usize = 112;
/// Bytes of `blkif_response` as ferrotap writes it (id, operation, pad, status, 4 pad).
const RESPONSE_SIZE: usize = 16;

fn get_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut bytes = [0u8; 4];
    bytes.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(bytes)
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(bytes)
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

fn decode_segment(buf: &[u8]) -> Segment {
    Segment {
        gref: get_u32(buf, 0),
        first_sect: buf[4],
        last_sect: buf[5],
    }
}

fn encode_segment(segment: &Segment, buf: &mut [u8]) {
    put(buf, 0, &segment.gref.to_le_bytes());
    buf[4] = segment.first_sect;
    buf[5] = segment.last_sect;
    buf[6] = 0;
    buf[7] = 0;
}

impl Protocol {
    /// From the frontend's `protocol` key; no key means the native `x86_64-abi`.
    pub fn from_xenstore(value: Option<&str>) -> crate::error::Result<Protocol> {
        match value {
            None | Some("x86_64-abi") => Ok(Protocol::X86_64),
            Some("x86_32-abi") => Ok(Protocol::X86_32),
            Some(other) => Err(crate::error::Error::invalid(format!(
                "unknown blkif protocol {other:?} (expected x86_64-abi or x86_32-abi)"
            ))),
        }
    }

    /// The xenstore spelling (`x86_64-abi`, `x86_32-abi`).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::X86_64 => "x86_64-abi",
            Protocol::X86_32 => "x86_32-abi",
        }
    }

    /// Bytes of one ring entry (112 or 108).
    pub fn entry_size(self) -> usize {
        match self {
            Protocol::X86_64 => 112,
            Protocol::X86_32 => 108,
        }
    }

    fn layout(self) -> &'static Layout {
        match self {
            Protocol::X86_64 => &LAYOUT_X86_64,
            Protocol::X86_32 => &LAYOUT_X86_32,
        }
    }

    /// Copy a request out of one ring entry (`entry.len() == entry_size()`).
    ///
    /// Any bytes decode: an unknown operation gives a `Direct` body (the caller answers
    /// EOPNOTSUPP), and a short `entry` reads as if zero-padded. Nothing is validated here.
    pub fn decode_request(self, entry: &[u8]) -> Request {
        let mut buf = [0u8; MAX_ENTRY_SIZE];
        let len = entry.len().min(self.entry_size());
        buf[..len].copy_from_slice(&entry[..len]);
        let layout = self.layout();
        let operation = buf[0];
        let id = get_u64(&buf, layout.id);
        let sector = get_u64(&buf, layout.sector);
        let (handle, body) = match operation {
            op::INDIRECT => {
                let mut indirect_grefs = [0u32; MAX_INDIRECT_PAGES_PER_REQUEST];
                for (i, gref) in indirect_grefs.iter_mut().enumerate() {
                    *gref = get_u32(&buf, layout.indirect_grefs + 4 * i);
                }
                let body = RequestBody::Indirect {
                    indirect_op: buf[1],
                    nr_segments: get_u16(&buf, 2),
                    indirect_grefs,
                };
                (get_u16(&buf, layout.indirect_handle), body)
            }
            op::DISCARD => {
                let body = RequestBody::Discard {
                    flag: buf[1],
                    nr_sectors: get_u64(&buf, layout.discard_nr_sectors),
                };
                (get_u16(&buf, 2), body)
            }
            _ => {
                let mut segments = [Segment::default(); MAX_SEGMENTS_PER_REQUEST];
                for (i, segment) in segments.iter_mut().enumerate() {
                    let at = layout.segments + SEGMENT_SIZE * i;
                    *segment = decode_segment(&buf[at..at + SEGMENT_SIZE]);
                }
                let body = RequestBody::Direct {
                    nr_segments: buf[1],
                    segments,
                };
                (get_u16(&buf, 2), body)
            }
        };
        Request {
            operation,
            id,
            sector,
            handle,
            body,
        }
    }

    /// Lay a request out in one ring entry (the frontend side; zeroes the padding).
    ///
    /// The body decides the layout, whatever `operation` says (tests use this to send an
    /// unknown operation with a direct body). Writes `entry_size()` bytes, fewer if `entry`
    /// is shorter.
    pub fn encode_request(self, request: &Request, entry: &mut [u8]) {
        let mut buf = [0u8; MAX_ENTRY_SIZE];
        let layout = self.layout();
        buf[0] = request.operation;
        put(&mut buf, layout.id, &request.id.to_le_bytes());
        put(&mut buf, layout.sector, &request.sector.to_le_bytes());
        match &request.body {
            RequestBody::Direct {
                nr_segments,
                segments,
            } => {
                buf[1] = *nr_segments;
                put(&mut buf, 2, &request.handle.to_le_bytes());
                for (i, segment) in segments.iter().enumerate() {
                    let at = layout.segments + SEGMENT_SIZE * i;
                    encode_segment(segment, &mut buf[at..at + SEGMENT_SIZE]);
                }
            }
            RequestBody::Indirect {
                indirect_op,
                nr_segments,
                indirect_grefs,
            } => {
                buf[1] = *indirect_op;
                put(&mut buf, 2, &nr_segments.to_le_bytes());
                put(
                    &mut buf,
                    layout.indirect_handle,
                    &request.handle.to_le_bytes(),
                );
                for (i, gref) in indirect_grefs.iter().enumerate() {
                    put(&mut buf, layout.indirect_grefs + 4 * i, &gref.to_le_bytes());
                }
            }
            RequestBody::Discard { flag, nr_sectors } => {
                buf[1] = *flag;
                put(&mut buf, 2, &request.handle.to_le_bytes());
                put(
                    &mut buf,
                    layout.discard_nr_sectors,
                    &nr_sectors.to_le_bytes(),
                );
            }
        }
        let len = entry.len().min(self.entry_size());
        entry[..len].copy_from_slice(&buf[..len]);
    }

    /// Lay a response out at the start of one ring entry: 16 bytes, padding zeroed (fewer if
    /// `entry` is shorter).
    pub fn encode_response(self, response: &Response, entry: &mut [u8]) {
        let mut buf = [0u8; RESPONSE_SIZE];
        put(&mut buf, 0, &response.id.to_le_bytes());
        buf[8] = response.operation;
        put(&mut buf, 10, &response.status.to_le_bytes());
        let len = entry.len().min(RESPONSE_SIZE);
        entry[..len].copy_from_slice(&buf[..len]);
    }

    /// Read a response from one ring entry (the frontend side); a short entry reads as if
    /// zero-padded.
    pub fn decode_response(self, entry: &[u8]) -> Response {
        let mut buf = [0u8; RESPONSE_SIZE];
        let len = entry.len().min(RESPONSE_SIZE);
        buf[..len].copy_from_slice(&entry[..len]);
        Response {
            id: get_u64(&buf, 0),
            operation: buf[8],
            status: get_u16(&buf, 10) as i16,
        }
    }
}

/// Decode the `count` segment descriptors of an indirect page into `out[..count]`
/// (`count = out.len()`); descriptors past the end of `page` read as zero.
pub fn decode_indirect_segments(page: &[u8], out: &mut [Segment]) {
    let mut descriptors = page.chunks_exact(SEGMENT_SIZE);
    for segment in out.iter_mut() {
        *segment = descriptors.next().map(decode_segment).unwrap_or_default();
    }
}

/// Encode segment descriptors into an indirect page (the frontend side); descriptors that do
/// not fit in `page` are dropped.
pub fn encode_indirect_segments(segments: &[Segment], page: &mut [u8]) {
    for (segment, descriptor) in segments.iter().zip(page.chunks_exact_mut(SEGMENT_SIZE)) {
        encode_segment(segment, descriptor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn protocol_names_from_xenstore() {
        assert_eq!(Protocol::from_xenstore(None).unwrap(), Protocol::X86_64);
        for protocol in [Protocol::X86_64, Protocol::X86_32] {
            assert_eq!(
                Protocol::from_xenstore(Some(protocol.name())).unwrap(),
                protocol
            );
        }
        let err = Protocol::from_xenstore(Some("arm-abi")).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("arm-abi"), "{err}");
    }

    fn protocol() -> impl Strategy<Value = Protocol> {
        prop_oneof![Just(Protocol::X86_64), Just(Protocol::X86_32)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes decode (short entries too); re-encoding changes only bytes the decoder
        /// ignores (padding), so nothing a frontend wrote is lost or misplaced.
        #[test]
        fn any_entry_decodes_and_reencodes_to_the_same_request(
            protocol in protocol(),
            op in prop_oneof![0u8..8, any::<u8>()],
            mut bytes in prop::collection::vec(any::<u8>(), 0..130),
        ) {
            if let Some(first) = bytes.first_mut() {
                *first = op;
            }
            let request = protocol.decode_request(&bytes);
            let mut entry = vec![0u8; protocol.entry_size()];
            let known = bytes.len().min(entry.len());
            entry[..known].copy_from_slice(&bytes[..known]);
            let mut encoded = vec![0u8; protocol.entry_size()];
            protocol.encode_request(&request, &mut encoded);
            prop_assert_eq!(protocol.decode_request(&encoded), request);
            for i in 0..entry.len() {
                if encoded[i] != entry[i] {
                    let mut flipped = entry.clone();
                    flipped[i] ^= 0xff;
                    prop_assert_eq!(protocol.decode_request(&flipped), request, "byte {}", i);
                }
            }
        }

        #[test]
        fn responses_round_trip(
            protocol in protocol(),
            id in any::<u64>(),
            operation in any::<u8>(),
            status in any::<i16>(),
        ) {
            let response = Response { id, operation, status };
            let mut entry = vec![0xaau8; protocol.entry_size()];
            protocol.encode_response(&response, &mut entry);
            prop_assert_eq!(protocol.decode_response(&entry), response);
            prop_assert_eq!(entry[9], 0);
            prop_assert_eq!(&entry[12..16], &[0u8; 4]);
            prop_assert!(entry[16..].iter().all(|&b| b == 0xaa), "wrote past the response");
        }

        #[test]
        fn indirect_segments_round_trip(
            segments in prop::collection::vec(
                (any::<u32>(), any::<u8>(), any::<u8>())
                    .prop_map(|(gref, first_sect, last_sect)| Segment { gref, first_sect, last_sect }),
                0..=SEGMENTS_PER_INDIRECT_PAGE,
            ),
        ) {
            let mut page = vec![0xffu8; PAGE_SIZE];
            encode_indirect_segments(&segments, &mut page);
            let mut decoded = vec![Segment::default(); segments.len()];
            decode_indirect_segments(&page, &mut decoded);
            prop_assert_eq!(&decoded, &segments);
            for descriptor in page.chunks_exact(8).take(segments.len()) {
                prop_assert_eq!(&descriptor[6..], &[0u8, 0]);
            }
            // A short page reads as zeros past its end, never out of bounds.
            let mut more = vec![Segment { gref: 1, first_sect: 1, last_sect: 1 }; 4];
            decode_indirect_segments(&page[..12], &mut more);
            prop_assert_eq!(more[1], Segment::default());
        }
    }
}
