//! The fixed newstyle handshake: greeting, client flags, then options until the client
//! picks an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME) or leaves.
//!
//! Generic over the stream so that the fuzz target can drive it from memory. Every length
//! the client sends is checked against what was actually received before it is used; an
//! option longer than [`MAX_OPTION_LEN`] or more than [`MAX_OPTIONS`] options end the
//! connection, so a hostile client can hold at most one small buffer.

use std::io::{self, Read, Write};
use std::sync::Arc;

use super::proto::*;
use super::Export;

/// Longest option payload read (export names and metadata queries are at most 4 KiB each
/// by the spec; this leaves room for a few queries).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Options accepted before the client must choose an export.
pub const MAX_OPTIONS: usize = 1024;
/// Context id of `base:allocation` (any non-zero id the server picks).
pub const ALLOCATION_CONTEXT_ID: u32 = 1;
/// Block size constraints announced with NBD_INFO_BLOCK_SIZE: any alignment works, 4 KiB
/// is best, and no request may carry more than this many bytes.
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_REQUEST_LEN: u32 = 32 * 1024 * 1024;

/// What the handshake agreed on.
pub struct Session {
    pub export: Arc<Export>,
    /// Structured replies were negotiated (NBD_OPT_STRUCTURED_REPLY).
    pub structured: bool,
    /// `base:allocation` was selected (NBD_OPT_SET_META_CONTEXT): its context id.
    pub allocation_context: Option<u32>,
}

fn violation(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

/// Run the handshake on `stream`. `Ok(None)` when the client aborted; an error when it
/// broke the protocol or went away (the caller closes the connection either way).
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    export: &Arc<Export>,
) -> io::Result<Option<Session>> {
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;

    let mut word = [0u8; 4];
    stream.read_exact(&mut word)?;
    let client_flags = u32::from_be_bytes(word);
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(violation("client flags with unknown bits"));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;

    let mut state = State {
        export: Arc::clone(export),
        structured: false,
        allocation_selected: false,
    };
    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; 16];
        stream.read_exact(&mut header)?;
        if be_u64(&header, 0) != IHAVEOPT {
            return Err(violation("option without the IHAVEOPT magic"));
        }
        let option = be_u32(&header, 8);
        let len = be_u32(&header, 12);
        if len > MAX_OPTION_LEN {
            // Skipping up to 4 GiB would let a client keep the server busy: refuse and close.
            send_reply(stream, option, REP_ERR_TOO_BIG, b"option too long")?;
            return Err(violation("option longer than the server accepts"));
        }
        data.clear();
        data.resize(len as usize, 0);
        stream.read_exact(&mut data)?;
        match state.option(stream, option, &data, no_zeroes)? {
            Next::Continue => {}
            Next::Abort => return Ok(None),
            Next::Transmission => {
                return Ok(Some(Session {
                    export: state.export,
                    structured: state.structured,
                    allocation_context: state.allocation_selected.then_some(ALLOCATION_CONTEXT_ID),
                }))
            }
        }
    }
    Err(violation("too many options"))
}

enum Next {
    Continue,
    Abort,
    Transmission,
}

struct State {
    export: Arc<Export>,
    structured: bool,
    allocation_selected: bool,
}

impl State {
    fn option<S: Write>(
        &mut self,
        stream: &mut S,
        option: u32,
        data: &[u8],
        no_zeroes: bool,
    ) -> io::Result<Next> {
        match option {
            OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(data).ok();
                if !name.is_some_and(|name| self.export.answers_to(name)) {
                    // No way to report an error to EXPORT_NAME: the spec says close.
                    return Err(violation("NBD_OPT_EXPORT_NAME for an unknown export"));
                }
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&self.export.size().to_be_bytes());
                reply.extend_from_slice(&self.export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&reply)?;
                // Structured replies and metadata contexts need NBD_OPT_GO's final ACK;
                // with EXPORT_NAME the client gets simple replies only.
                self.structured = false;
                self.allocation_selected = false;
                Ok(Next::Transmission)
            }
            OPT_ABORT => {
                // The client hangs up next; a failed ACK changes nothing.
                let _ = send_reply(stream, option, REP_ACK, &[]);
                Ok(Next::Abort)
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_reply(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    )?;
                    return Ok(Next::Continue);
                }
                let name = self.export.name.as_bytes();
                let mut server = Vec::with_capacity(4 + name.len());
                server.extend_from_slice(&(name.len() as u32).to_be_bytes());
                server.extend_from_slice(name);
                server.extend_from_slice(self.export.description.as_bytes());
                send_reply(stream, option, REP_SERVER, &server)?;
                send_reply(stream, option, REP_ACK, &[])?;
                Ok(Next::Continue)
            }
            OPT_INFO | OPT_GO => self.info_or_go(stream, option, data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_reply(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )?;
                } else {
                    self.structured = true;
                    send_reply(stream, option, REP_ACK, &[])?;
                }
                Ok(Next::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(stream, option, data)?;
                Ok(Next::Continue)
            }
            OPT_STARTTLS => {
                send_reply(stream, option, REP_ERR_POLICY, b"TLS is not offered")?;
                Ok(Next::Continue)
            }
            _ => {
                send_reply(stream, option, REP_ERR_UNSUP, b"unknown option")?;
                Ok(Next::Continue)
            }
        }
    }

    /// NBD_OPT_INFO and NBD_OPT_GO: name length, name, number of info requests, requests.
    fn info_or_go<S: Write>(
        &mut self,
        stream: &mut S,
        option: u32,
        data: &[u8],
    ) -> io::Result<Next> {
        let mut cursor = Cursor(data);
        let parsed = (|| {
            let name = cursor.string()?;
            let count = cursor.u16()?;
            let mut requests = Vec::with_capacity(usize::from(count).min(cursor.0.len() / 2));
            for _ in 0..count {
                requests.push(cursor.u16()?);
            }
            cursor.0.is_empty().then_some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            send_reply(stream, option, REP_ERR_INVALID, b"malformed request")?;
            return Ok(Next::Continue);
        };
        if !self.export.answers_to(name) {
            send_reply(stream, option, REP_ERR_UNKNOWN, b"no such export")?;
            return Ok(Next::Continue);
        }
        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&self.export.size().to_be_bytes());
        info.extend_from_slice(&self.export.transmission_flags().to_be_bytes());
        send_reply(stream, option, REP_INFO, &info)?;
        info.clear();
        info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        info.extend_from_slice(&1u32.to_be_bytes());
        info.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
        info.extend_from_slice(&MAX_REQUEST_LEN.to_be_bytes());
        send_reply(stream, option, REP_INFO, &info)?;
        for request in requests {
            let text = match request {
                INFO_NAME => &self.export.name,
                INFO_DESCRIPTION => &self.export.description,
                _ => continue,
            };
            info.clear();
            info.extend_from_slice(&request.to_be_bytes());
            info.extend_from_slice(text.as_bytes());
            send_reply(stream, option, REP_INFO, &info)?;
        }
        send_reply(stream, option, REP_ACK, &[])?;
        Ok(if option == OPT_GO {
            Next::Transmission
        } else {
            Next::Continue
        })
    }

    /// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name, number of
    /// queries, queries. Only `base:allocation` exists.
    fn meta_context<S: Write>(
        &mut self,
        stream: &mut S,
        option: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return send_reply(
                stream,
                option,
                REP_ERR_INVALID,
                b"structured replies must be negotiated first",
            );
        }
        let mut cursor = Cursor(data);
        let parsed = (|| {
            let name = cursor.string()?;
            let count = cursor.u32()?;
            let mut queries = Vec::new();
            for _ in 0..count {
                queries.push(cursor.string()?);
            }
            cursor.0.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return send_reply(stream, option, REP_ERR_INVALID, b"malformed request");
        };
        if !self.export.answers_to(name) {
            return send_reply(stream, option, REP_ERR_UNKNOWN, b"no such export");
        }
        let matches = |query: &str| {
            if set {
                query == BASE_ALLOCATION
            } else {
                // Listing: a namespace alone ("base:") stands for every context in it.
                query == BASE_ALLOCATION || query == "base:"
            }
        };
        let selected = if queries.is_empty() {
            !set
        } else {
            queries.iter().any(|query| matches(query))
        };
        if set {
            self.allocation_selected = selected;
        }
        if selected {
            let mut context = Vec::with_capacity(4 + BASE_ALLOCATION.len());
            context.extend_from_slice(&ALLOCATION_CONTEXT_ID.to_be_bytes());
            context.extend_from_slice(BASE_ALLOCATION.as_bytes());
            send_reply(stream, option, REP_META_CONTEXT, &context)?;
        }
        send_reply(stream, option, REP_ACK, &[])
    }
}

/// Reads big-endian fields from an option payload; `None` past its end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| be_u16(b, 0))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| be_u32(b, 0))
    }

    /// A 32-bit length and that many bytes of UTF-8.
    fn string(&mut self) -> Option<&'a str> {
        let len = self.u32()?;
        let bytes = self.take(usize::try_from(len).ok()?)?;
        std::str::from_utf8(bytes).ok()
    }
}

fn send_reply<S: Write>(stream: &mut S, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut reply = Vec::with_capacity(20 + data.len());
    reply.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    reply.extend_from_slice(&option.to_be_bytes());
    reply.extend_from_slice(&kind.to_be_bytes());
    reply.extend_from_slice(&(data.len() as u32).to_be_bytes());
    reply.extend_from_slice(data);
    stream.write_all(&reply)
}
