//! The xenstore wire protocol of xen/io/xs_wire.h: a 16-byte header
//! `{ type, req_id, tx_id, len }` (u32 each, little-endian as on x86) followed by `len`
//! payload bytes, at most [`PAYLOAD_MAX`]. Payloads are NUL-separated strings.
//!
//! Everything here takes untrusted bytes (from a peer or a fuzzer) and never panics: the
//! header decoder, the request decoder of the server side and the path validator.

use std::fmt;
use std::io::{self, Read};

/// Size of `struct xsd_sockmsg`.
pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`: a larger payload is a protocol violation.
pub const PAYLOAD_MAX: usize = 4096;
/// `XENSTORE_ABS_PATH_MAX`: the longest absolute path.
pub const ABS_PATH_MAX: usize = 3072;
/// `XENSTORE_REL_PATH_MAX`: the longest relative path.
pub const REL_PATH_MAX: usize = 2048;

/// `enum xsd_sockmsg_type`, with the numbers of xs_wire.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MsgType {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    // 20 was XS_RESTRICT, removed from the protocol.
    ResetWatches = 21,
    DirectoryPart = 22,
}

impl MsgType {
    const ALL: [MsgType; 22] = [
        MsgType::Control,
        MsgType::Directory,
        MsgType::Read,
        MsgType::GetPerms,
        MsgType::Watch,
        MsgType::Unwatch,
        MsgType::TransactionStart,
        MsgType::TransactionEnd,
        MsgType::Introduce,
        MsgType::Release,
        MsgType::GetDomainPath,
        MsgType::Write,
        MsgType::Mkdir,
        MsgType::Rm,
        MsgType::SetPerms,
        MsgType::WatchEvent,
        MsgType::Error,
        MsgType::IsDomainIntroduced,
        MsgType::Resume,
        MsgType::SetTarget,
        MsgType::ResetWatches,
        MsgType::DirectoryPart,
    ];

    pub fn from_u32(value: u32) -> Option<MsgType> {
        MsgType::ALL.into_iter().find(|t| *t as u32 == value)
    }

    /// The name without xs_wire.h's `XS_` prefix, for messages and logs.
    pub fn name(self) -> &'static str {
        match self {
            MsgType::Control => "CONTROL",
            MsgType::Directory => "DIRECTORY",
            MsgType::Read => "READ",
            MsgType::GetPerms => "GET_PERMS",
            MsgType::Watch => "WATCH",
            MsgType::Unwatch => "UNWATCH",
            MsgType::TransactionStart => "TRANSACTION_START",
            MsgType::TransactionEnd => "TRANSACTION_END",
            MsgType::Introduce => "INTRODUCE",
            MsgType::Release => "RELEASE",
            MsgType::GetDomainPath => "GET_DOMAIN_PATH",
            MsgType::Write => "WRITE",
            MsgType::Mkdir => "MKDIR",
            MsgType::Rm => "RM",
            MsgType::SetPerms => "SET_PERMS",
            MsgType::WatchEvent => "WATCH_EVENT",
            MsgType::Error => "ERROR",
            MsgType::IsDomainIntroduced => "IS_DOMAIN_INTRODUCED",
            MsgType::Resume => "RESUME",
            MsgType::SetTarget => "SET_TARGET",
            MsgType::ResetWatches => "RESET_WATCHES",
            MsgType::DirectoryPart => "DIRECTORY_PART",
        }
    }
}

/// The errors xenstored sends as their names (`xsd_errors` of xs_wire.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    EINVAL,
    EACCES,
    EEXIST,
    EISDIR,
    ENOENT,
    ENOMEM,
    ENOSPC,
    EIO,
    ENOTEMPTY,
    ENOSYS,
    EROFS,
    EBUSY,
    EAGAIN,
    EISCONN,
    E2BIG,
    EPERM,
}

impl Errno {
    const ALL: [Errno; 16] = [
        Errno::EINVAL,
        Errno::EACCES,
        Errno::EEXIST,
        Errno::EISDIR,
        Errno::ENOENT,
        Errno::ENOMEM,
        Errno::ENOSPC,
        Errno::EIO,
        Errno::ENOTEMPTY,
        Errno::ENOSYS,
        Errno::EROFS,
        Errno::EBUSY,
        Errno::EAGAIN,
        Errno::EISCONN,
        Errno::E2BIG,
        Errno::EPERM,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Errno::EINVAL => "EINVAL",
            Errno::EACCES => "EACCES",
            Errno::EEXIST => "EEXIST",
            Errno::EISDIR => "EISDIR",
            Errno::ENOENT => "ENOENT",
            Errno::ENOMEM => "ENOMEM",
            Errno::ENOSPC => "ENOSPC",
            Errno::EIO => "EIO",
            Errno::ENOTEMPTY => "ENOTEMPTY",
            Errno::ENOSYS => "ENOSYS",
            Errno::EROFS => "EROFS",
            Errno::EBUSY => "EBUSY",
            Errno::EAGAIN => "EAGAIN",
            Errno::EISCONN => "EISCONN",
            Errno::E2BIG => "E2BIG",
            Errno::EPERM => "EPERM",
        }
    }

    pub fn from_name(name: &[u8]) -> Option<Errno> {
        Errno::ALL.into_iter().find(|e| e.name().as_bytes() == name)
    }

    /// The Linux errno number.
    pub fn code(self) -> i32 {
        match self {
            Errno::EINVAL => libc::EINVAL,
            Errno::EACCES => libc::EACCES,
            Errno::EEXIST => libc::EEXIST,
            Errno::EISDIR => libc::EISDIR,
            Errno::ENOENT => libc::ENOENT,
            Errno::ENOMEM => libc::ENOMEM,
            Errno::ENOSPC => libc::ENOSPC,
            Errno::EIO => libc::EIO,
            Errno::ENOTEMPTY => libc::ENOTEMPTY,
            Errno::ENOSYS => libc::ENOSYS,
            Errno::EROFS => libc::EROFS,
            Errno::EBUSY => libc::EBUSY,
            Errno::EAGAIN => libc::EAGAIN,
            Errno::EISCONN => libc::EISCONN,
            Errno::E2BIG => libc::E2BIG,
            Errno::EPERM => libc::EPERM,
        }
    }

    /// The payload of an `XS_ERROR` reply: the name and a NUL.
    pub fn payload(self) -> Vec<u8> {
        let mut payload = self.name().as_bytes().to_vec();
        payload.push(0);
        payload
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `struct xsd_sockmsg`. `msg_type` stays raw: an unknown type must be answered (ENOSYS),
/// not rejected while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub msg_type: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub len: u32,
}

impl Header {
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Header {
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        Header {
            msg_type: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        for (i, word) in [self.msg_type, self.req_id, self.tx_id, self.len]
            .into_iter()
            .enumerate()
        {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    pub fn kind(&self) -> Option<MsgType> {
        MsgType::from_u32(self.msg_type)
    }
}

/// One message: header and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub payload: Vec<u8>,
}

/// Why a message could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the stream between messages.
    Closed,
    /// The header announces more than [`PAYLOAD_MAX`] bytes: the connection must be closed.
    Oversized(Header),
    /// The stream failed or ended inside a message.
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Closed => f.write_str("connection closed"),
            ReadError::Oversized(header) => write!(
                f,
                "payload of {} bytes announced (type {}, req_id {}), more than {PAYLOAD_MAX}",
                header.len, header.msg_type, header.req_id
            ),
            ReadError::Io(err) => write!(f, "{err}"),
        }
    }
}

/// Read one message. The payload buffer is allocated only after the length is checked.
pub fn read_message(reader: &mut impl Read) -> Result<Message, ReadError> {
    let mut bytes = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match reader.read(&mut bytes[got..]) {
            Ok(0) if got == 0 => return Err(ReadError::Closed),
            Ok(0) => {
                return Err(ReadError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a message header",
                )))
            }
            Ok(n) => got += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(ReadError::Io(err)),
        }
    }
    let header = Header::decode(&bytes);
    let len = usize::try_from(header.len).unwrap_or(usize::MAX);
    if len > PAYLOAD_MAX {
        return Err(ReadError::Oversized(header));
    }
    let mut payload = vec![0u8; len];
    // A zero-length read would block on /dev/xen/xenbus: read_exact of nothing reads nothing.
    reader.read_exact(&mut payload).map_err(ReadError::Io)?;
    Ok(Message { header, payload })
}

/// Header and payload as one buffer (one write keeps concurrent writers from interleaving).
pub fn encode_message(msg_type: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Option<Vec<u8>> {
    if payload.len() > PAYLOAD_MAX {
        return None;
    }
    let header = Header {
        msg_type,
        req_id,
        tx_id,
        len: u32::try_from(payload.len()).ok()?,
    };
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&header.encode());
    bytes.extend_from_slice(payload);
    Some(bytes)
}

/// Concatenate strings, each followed by a NUL (the request payload of most types).
pub fn nul_strings<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut payload = Vec::new();
    for part in parts {
        payload.extend_from_slice(part);
        payload.push(0);
    }
    payload
}

/// Split a payload of NUL-terminated strings. A payload not ending in NUL has its last piece
/// returned too (xenstored's replies to READ are not terminated; callers decide).
pub fn split_nul(payload: &[u8]) -> Vec<&[u8]> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty() && payload.len() <= 1 {
        return Vec::new();
    }
    body.split(|&b| b == 0).collect()
}

/// The two watchable special paths.
pub const SPECIAL_WATCHES: [&str; 2] = ["@introduceDomain", "@releaseDomain"];

/// The domain whose home relative paths resolve against (every connection is dom0 here).
pub const DOM0_HOME: &str = "/local/domain/0";

/// Check a node path as xenstored does: characters `[A-Za-z0-9_@/-]`, no `//`, no trailing
/// `/` (except the root), at most [`ABS_PATH_MAX`] bytes absolute or [`REL_PATH_MAX`]
/// relative, not empty. Returns the canonical absolute path (relative ones resolved
/// against [`DOM0_HOME`]).
pub fn canonical_path(path: &[u8]) -> Result<String, Errno> {
    let absolute = path.first() == Some(&b'/');
    let limit = if absolute { ABS_PATH_MAX } else { REL_PATH_MAX };
    if path.is_empty() || path.len() > limit {
        return Err(Errno::EINVAL);
    }
    let valid_char = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@');
    if !path.iter().all(valid_char) || path.windows(2).any(|w| w == b"//") {
        return Err(Errno::EINVAL);
    }
    if path.len() > 1 && path.ends_with(b"/") {
        return Err(Errno::EINVAL);
    }
    // Only ASCII got through.
    let text = String::from_utf8_lossy(path);
    Ok(if absolute {
        text.into_owned()
    } else {
        format!("{DOM0_HOME}/{text}")
    })
}

/// A watch path: a node path or one of [`SPECIAL_WATCHES`].
pub fn canonical_watch_path(path: &[u8]) -> Result<String, Errno> {
    if path.first() == Some(&b'@') {
        return SPECIAL_WATCHES
            .into_iter()
            .find(|special| special.as_bytes() == path)
            .map(str::to_string)
            .ok_or(Errno::EINVAL);
    }
    canonical_path(path)
}

/// A permission as xenstored parses it: `w`, `r`, `b` or `n`, then a domain id.
pub fn valid_perm(perm: &[u8]) -> bool {
    match perm.split_first() {
        Some((first, domid)) => {
            matches!(first, b'w' | b'r' | b'b' | b'n')
                && !domid.is_empty()
                && domid.len() <= 5
                && domid.iter().all(u8::is_ascii_digit)
        }
        None => false,
    }
}

/// A request as the server sees it, decoded from an untrusted payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Read {
        path: &'a [u8],
    },
    Write {
        path: &'a [u8],
        value: &'a [u8],
    },
    Mkdir {
        path: &'a [u8],
    },
    Rm {
        path: &'a [u8],
    },
    Directory {
        path: &'a [u8],
    },
    DirectoryPart {
        path: &'a [u8],
        offset: usize,
    },
    GetPerms {
        path: &'a [u8],
    },
    SetPerms {
        path: &'a [u8],
        perms: Vec<&'a [u8]>,
    },
    Watch {
        path: &'a [u8],
        token: &'a [u8],
    },
    Unwatch {
        path: &'a [u8],
        token: &'a [u8],
    },
    TransactionStart,
    TransactionEnd {
        commit: bool,
    },
    GetDomainPath {
        domid: u32,
    },
    ResetWatches,
}

/// The payload's NUL-terminated strings, exactly `count` of them, else EINVAL.
fn strings(payload: &[u8], count: usize) -> Result<Vec<&[u8]>, Errno> {
    let body = payload.strip_suffix(&[0]).ok_or(Errno::EINVAL)?;
    let parts: Vec<&[u8]> = body.split(|&b| b == 0).collect();
    if parts.len() == count {
        Ok(parts)
    } else {
        Err(Errno::EINVAL)
    }
}

fn one_string(payload: &[u8]) -> Result<&[u8], Errno> {
    strings(payload, 1)?.first().copied().ok_or(Errno::EINVAL)
}

fn two_strings(payload: &[u8]) -> Result<(&[u8], &[u8]), Errno> {
    match strings(payload, 2)?.as_slice() {
        [first, second] => Ok((first, second)),
        _ => Err(Errno::EINVAL),
    }
}

fn decimal(text: &[u8]) -> Result<u32, Errno> {
    if text.is_empty() || text.len() > 10 || !text.iter().all(u8::is_ascii_digit) {
        return Err(Errno::EINVAL);
    }
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or(Errno::EINVAL)
}

impl<'a> Request<'a> {
    /// Decode the payload of a request of raw type `msg_type`. Types this server does not
    /// implement (and unknown numbers) are ENOSYS; malformed payloads EINVAL.
    pub fn decode(msg_type: u32, payload: &'a [u8]) -> Result<Request<'a>, Errno> {
        let kind = MsgType::from_u32(msg_type).ok_or(Errno::ENOSYS)?;
        Ok(match kind {
            MsgType::Read => Request::Read {
                path: one_string(payload)?,
            },
            MsgType::Write => {
                let nul = payload.iter().position(|&b| b == 0).ok_or(Errno::EINVAL)?;
                Request::Write {
                    path: &payload[..nul],
                    value: &payload[nul + 1..],
                }
            }
            MsgType::Mkdir => Request::Mkdir {
                path: one_string(payload)?,
            },
            MsgType::Rm => Request::Rm {
                path: one_string(payload)?,
            },
            MsgType::Directory => Request::Directory {
                path: one_string(payload)?,
            },
            MsgType::DirectoryPart => {
                let (path, offset) = two_strings(payload)?;
                Request::DirectoryPart {
                    path,
                    offset: usize::try_from(decimal(offset)?).map_err(|_| Errno::EINVAL)?,
                }
            }
            MsgType::GetPerms => Request::GetPerms {
                path: one_string(payload)?,
            },
            MsgType::SetPerms => {
                let body = payload.strip_suffix(&[0]).ok_or(Errno::EINVAL)?;
                let mut parts = body.split(|&b| b == 0);
                let path = parts.next().ok_or(Errno::EINVAL)?;
                let perms: Vec<&[u8]> = parts.collect();
                if perms.is_empty() || !perms.iter().all(|p| valid_perm(p)) {
                    return Err(Errno::EINVAL);
                }
                Request::SetPerms { path, perms }
            }
            MsgType::Watch => {
                let (path, token) = two_strings(payload)?;
                Request::Watch { path, token }
            }
            MsgType::Unwatch => {
                let (path, token) = two_strings(payload)?;
                Request::Unwatch { path, token }
            }
            MsgType::TransactionStart => Request::TransactionStart,
            MsgType::TransactionEnd => match one_string(payload)? {
                b"T" => Request::TransactionEnd { commit: true },
                b"F" => Request::TransactionEnd { commit: false },
                _ => return Err(Errno::EINVAL),
            },
            MsgType::GetDomainPath => Request::GetDomainPath {
                domid: decimal(one_string(payload)?)?,
            },
            MsgType::ResetWatches => Request::ResetWatches,
            // Replies, never requests.
            MsgType::WatchEvent | MsgType::Error => return Err(Errno::EINVAL),
            MsgType::Control
            | MsgType::Introduce
            | MsgType::Release
            | MsgType::IsDomainIntroduced
            | MsgType::Resume
            | MsgType::SetTarget => return Err(Errno::ENOSYS),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_is_little_endian() {
        let header = Header {
            msg_type: 11,
            req_id: 0x0102_0304,
            tx_id: 7,
            len: 4096,
        };
        let bytes = header.encode();
        assert_eq!(&bytes[..8], &[11, 0, 0, 0, 4, 3, 2, 1]);
        assert_eq!(Header::decode(&bytes), header);
    }

    #[test]
    fn oversized_payload_is_refused_before_allocating() {
        let header = Header {
            msg_type: 2,
            req_id: 1,
            tx_id: 0,
            len: u32::MAX,
        };
        let bytes = header.encode();
        assert!(matches!(
            read_message(&mut &bytes[..]),
            Err(ReadError::Oversized(_))
        ));
    }

    #[test]
    fn paths_validate_like_xenstored() {
        assert_eq!(canonical_path(b"/").as_deref(), Ok("/"));
        assert_eq!(canonical_path(b"a/b").as_deref(), Ok("/local/domain/0/a/b"));
        for bad in [&b""[..], b"/a/", b"/a//b", b"/a b", b"/a.b", b"a\0"] {
            assert_eq!(canonical_path(bad), Err(Errno::EINVAL), "{bad:?}");
        }
        assert!(canonical_path(&vec![b'a'; REL_PATH_MAX + 1]).is_err());
        assert!(canonical_watch_path(b"@releaseDomain").is_ok());
        assert!(canonical_watch_path(b"@other").is_err());
    }

    #[test]
    fn requests_decode_and_reject() {
        assert_eq!(
            Request::decode(11, b"/a\0v\0x"),
            Ok(Request::Write {
                path: b"/a",
                value: b"v\0x"
            })
        );
        assert_eq!(Request::decode(2, b"/a"), Err(Errno::EINVAL));
        assert_eq!(Request::decode(99, b""), Err(Errno::ENOSYS));
        assert_eq!(
            Request::decode(14, b"/a\0n0\0r1\0"),
            Ok(Request::SetPerms {
                path: b"/a",
                perms: vec![b"n0", b"r1"]
            })
        );
        assert_eq!(Request::decode(14, b"/a\0x0\0"), Err(Errno::EINVAL));
        assert_eq!(
            Request::decode(7, b"T\0"),
            Ok(Request::TransactionEnd { commit: true })
        );
        assert_eq!(split_nul(b""), Vec::<&[u8]>::new());
        assert_eq!(split_nul(b"a\0b\0"), vec![&b"a"[..], b"b"]);
    }
}
