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
/// Segment descriptors (`blkif_request_segment`, 8 bytes) that fit in one indirect page.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / 8;
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

impl Protocol {
    /// From the frontend's `protocol` key; no key means the native `x86_64-abi`.
    pub fn from_xenstore(value: Option<&str>) -> crate::error::Result<Protocol> {
        todo!("{value:?}")
    }

    /// The xenstore spelling (`x86_64-abi`, `x86_32-abi`).
    pub fn name(self) -> &'static str {
        todo!()
    }

    /// Bytes of one ring entry (112 or 108).
    pub fn entry_size(self) -> usize {
        todo!()
    }

    /// Copy a request out of one ring entry (`entry.len() == entry_size()`).
    pub fn decode_request(self, entry: &[u8]) -> Request {
        todo!("{entry:?}")
    }

    /// Lay a request out in one ring entry (the frontend side; zeroes the padding).
    pub fn encode_request(self, request: &Request, entry: &mut [u8]) {
        todo!("{request:?} {entry:?}")
    }

    /// Lay a response out at the start of one ring entry.
    pub fn encode_response(self, response: &Response, entry: &mut [u8]) {
        todo!("{response:?} {entry:?}")
    }

    /// Read a response from one ring entry (the frontend side).
    pub fn decode_response(self, entry: &[u8]) -> Response {
        todo!("{entry:?}")
    }
}

/// Decode the `count` segment descriptors of an indirect page into `out[..count]`.
pub fn decode_indirect_segments(page: &[u8], out: &mut [Segment]) {
    todo!("{page:?} {out:?}")
}

/// Encode segment descriptors into an indirect page (the frontend side).
pub fn encode_indirect_segments(segments: &[Segment], page: &mut [u8]) {
    todo!("{segments:?} {page:?}")
}
