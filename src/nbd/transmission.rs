//! The transmission phase without I/O: frame a request header, validate the request,
//! execute it and append its reply to a buffer.
//!
//! The connection driver (`conn.rs`, or the byte-stream driver in `server.rs`) reads
//! a header, asks [`frame`] how many payload bytes follow (checking a WRITE's length
//! before anything is read), then calls [`execute`] with the payload. Execution first
//! validates the request against the session ([`check_request`]), then dispatches on
//! the command; every export error becomes a wire errno through [`errno`]. A request
//! always gets a reply: only the framing can end a connection.

use std::io;

use byteorder::{BigEndian as BE, ByteOrder};

use super::export::{errno, ExportError};
use super::handshake::{Session, CTX_BASE_ALLOCATION};
use super::reply::ReplyBuf;
use super::server::MAX_PAYLOAD;
use super::wire::{self, Command, Request};

/// Most extents in one block-status reply.
const MAX_EXTENTS: usize = 1024;

/// Parse a request header: the request and the length of the payload that follows
/// it (a WRITE's data; 0 otherwise). A wrong magic or a WRITE announcing more than
/// [`MAX_PAYLOAD`] cannot be skipped safely and ends the connection.
pub(super) fn frame(head: &[u8; wire::REQUEST_SIZE]) -> io::Result<(Request, usize)> {
    let Some(req) = wire::parse_request(head) else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad request magic"));
    };
    if req.command != Command::Write {
        return Ok((req, 0));
    }
    if req.length > MAX_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "write larger than the maximum payload"));
    }
    Ok((req, req.length as usize))
}

/// The request may block for long (a commit): FLUSH, and FUA on a write-like
/// command. The server runs these on its blocking pool, everything else inline.
pub(super) fn runs_long(req: &Request) -> bool {
    match req.command {
        Command::Flush => true,
        Command::Write | Command::WriteZeroes | Command::Trim => req.flags & wire::CMD_FLAG_FUA != 0,
        _ => false,
    }
}

/// Why a request failed, before or during execution.
pub(super) fn check_request(s: &Session, command: Command, req: &Request) -> Result<(), u32> {
    let size = s.export().size();
    let end = req.offset.checked_add(req.length as u64);
    let in_bounds = end.is_some_and(|e| e <= size);
    match command {
        Command::Read => {
            if req.length > MAX_PAYLOAD {
                return Err(if s.structured { wire::EOVERFLOW } else { wire::EINVAL });
            }
            if !in_bounds {
                return Err(wire::EINVAL);
            }
        }
        Command::Write | Command::WriteZeroes => {
            if s.read_only {
                return Err(wire::EPERM);
            }
            if !in_bounds {
                return Err(wire::ENOSPC);
            }
            if command == Command::WriteZeroes
                && req.flags & wire::CMD_FLAG_FAST_ZERO != 0
                && req.flags & wire::CMD_FLAG_NO_HOLE != 0
            {
                return Err(wire::ENOTSUP);
            }
        }
        Command::Trim => {
            if s.read_only {
                return Err(wire::EPERM);
            }
            if !in_bounds {
                return Err(wire::EINVAL);
            }
        }
        Command::Cache => {
            if !in_bounds {
                return Err(wire::EINVAL);
            }
        }
        Command::BlockStatus => {
            if (!s.base_allocation && s.contexts.is_empty()) || req.length == 0 || !in_bounds {
                return Err(wire::EINVAL);
            }
        }
        Command::Flush => {}
        Command::Disc | Command::Unknown(_) => return Err(wire::EINVAL),
    }
    Ok(())
}

fn error_reply(s: &Session, out: &mut ReplyBuf, command: Command, req: &Request, err: u32) {
    if s.structured && matches!(command, Command::Read | Command::BlockStatus) {
        let mut p = [0u8; 6];
        BE::write_u32(&mut p[0..], err);
        out.extend_from_slice(&wire::chunk_header(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_ERROR, req.cookie, 6));
        out.extend_from_slice(&p);
    } else {
        out.extend_from_slice(&wire::simple_reply(err, req.cookie));
    }
}

/// Validate, then execute one request (`payload`: a WRITE's data) and append its
/// reply to `out`.
pub(super) fn execute(s: &Session, req: &Request, payload: &[u8], out: &mut ReplyBuf) {
    let command = req.command;
    if let Err(e) = check_request(s, command, req) {
        return error_reply(s, out, command, req, e);
    }
    let ex = s.export();
    let r: Result<(), ExportError> = match command {
        Command::Read => return do_read(s, out, req),
        Command::BlockStatus => return do_block_status(s, out, req),
        Command::Write => ex.write(req.offset, payload),
        Command::Flush => ex.flush(),
        Command::Trim => ex.trim(req.offset, req.length as u64),
        Command::WriteZeroes => ex.write_zeroes(
            req.offset,
            req.length as u64,
            req.flags & wire::CMD_FLAG_NO_HOLE == 0,
            req.flags & wire::CMD_FLAG_FAST_ZERO != 0,
        ),
        Command::Cache => Ok(()),
        Command::Disc | Command::Unknown(_) => Err(ExportError::Invalid("unknown command".into())),
    };
    let r = r.and_then(|()| {
        if req.flags & wire::CMD_FLAG_FUA != 0
            && matches!(command, Command::Write | Command::WriteZeroes | Command::Trim)
        {
            ex.flush()
        } else {
            Ok(())
        }
    });
    match r {
        Ok(()) => out.extend_from_slice(&wire::simple_reply(0, req.cookie)),
        Err(e) => error_reply(s, out, command, req, errno(&e)),
    }
}

/// READ: a simple reply with the data, or structured chunks where unmapped extents
/// become hole chunks (unless DF asks for one piece). Data is read straight into the
/// reply buffer; on a read error whatever was appended for this request is
/// replaced by the error reply.
fn do_read(s: &Session, out: &mut ReplyBuf, req: &Request) {
    let len = req.length as usize;
    let mark = out.len();
    if !s.structured {
        out.extend_from_slice(&wire::simple_reply(0, req.cookie));
        if let Err(e) = s.export().read(req.offset, out.append(len)) {
            out.truncate(mark);
            error_reply(s, out, Command::Read, req, errno(&e));
        }
        return;
    }
    if req.length == 0 {
        out.extend_from_slice(&wire::chunk_header(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_NONE, req.cookie, 0));
        return;
    }
    // Read optimistically into one data chunk: the data lands straight in the reply
    // buffer. Holes (unless the client asked for one piece, DF) split the reply
    // into data and hole chunks afterwards, which costs a copy only then.
    out.extend_from_slice(&wire::chunk_header(
        wire::REPLY_FLAG_DONE,
        wire::REPLY_TYPE_OFFSET_DATA,
        req.cookie,
        8 + len as u32,
    ));
    out.extend_from_slice(&req.offset.to_be_bytes());
    let at = out.len();
    // `append` hands out memory of earlier replies: `read` fills all of it;
    // `read_sparse` fills the data runs, and the hole runs are never sent as data
    // (the reply is rebuilt below when there are any).
    let data = out.append(len);
    let runs = if req.flags & wire::CMD_FLAG_DF != 0 {
        s.export().read(req.offset, data).map(|()| vec![(len as u64, false)])
    } else {
        s.export().read_sparse(req.offset, data)
    };
    let runs = match runs {
        Ok(r) => r,
        Err(e) => {
            out.truncate(mark);
            return error_reply(s, out, Command::Read, req, errno(&e));
        }
    };
    // Coalesce runs of the same kind; one data run is the reply already built.
    let mut chunks: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = 0u64;
    for (n, hole) in runs {
        let n = n.min(len as u64 - pos);
        if n == 0 {
            continue;
        }
        match chunks.last_mut() {
            Some(last) if last.2 == hole => last.1 += n,
            _ => chunks.push((pos, n, hole)),
        }
        pos += n;
    }
    if pos < len as u64 {
        // The export's runs covered less than asked, so not every byte is known
        // to be filled: read the whole range again as one data chunk.
        if let Err(e) = s.export().read(req.offset, &mut out.as_mut_slice()[at..]) {
            out.truncate(mark);
            error_reply(s, out, Command::Read, req, errno(&e));
        }
        return;
    }
    if chunks.len() == 1 && !chunks[0].2 {
        return;
    }
    let data = out.as_slice()[at..].to_vec();
    out.truncate(mark);
    let last = chunks.len() - 1;
    for (i, (off, n, hole)) in chunks.into_iter().enumerate() {
        let flags = if i == last { wire::REPLY_FLAG_DONE } else { 0 };
        let abs = (req.offset + off).to_be_bytes();
        if hole {
            let mut p = [0u8; 12];
            p[..8].copy_from_slice(&abs);
            BE::write_u32(&mut p[8..], n as u32);
            out.extend_from_slice(&wire::chunk_header(flags, wire::REPLY_TYPE_OFFSET_HOLE, req.cookie, 12));
            out.extend_from_slice(&p);
        } else {
            out.extend_from_slice(&wire::chunk_header(flags, wire::REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + n as u32));
            out.extend_from_slice(&abs);
            out.extend_from_slice(&data[off as usize..(off + n) as usize]);
        }
    }
}

/// BLOCK_STATUS: one chunk per selected context (`base:allocation` first), each of
/// at most [`MAX_EXTENTS`] extents; the last one carries the DONE flag.
fn do_block_status(s: &Session, out: &mut ReplyBuf, req: &Request) {
    let mut payloads = Vec::new();
    if s.base_allocation {
        match base_allocation_payload(s, req) {
            Ok(p) => payloads.push(p),
            Err(e) => return error_reply(s, out, Command::BlockStatus, req, e),
        }
    }
    let one = req.flags & wire::CMD_FLAG_REQ_ONE != 0;
    for ctx in &s.contexts {
        match super::contexts::payload(s.export(), ctx, req.offset, req.length as u64, one, MAX_EXTENTS) {
            Ok(p) => payloads.push(p),
            Err(e) => return error_reply(s, out, Command::BlockStatus, req, e),
        }
    }
    let n = payloads.len();
    for (i, payload) in payloads.into_iter().enumerate() {
        let flags = if i + 1 == n { wire::REPLY_FLAG_DONE } else { 0 };
        out.extend_from_slice(&wire::chunk_header(
            flags,
            wire::REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            payload.len() as u32,
        ));
        out.extend_from_slice(&payload);
    }
}

/// The `base:allocation` payload of a BLOCK_STATUS, or the errno.
fn base_allocation_payload(s: &Session, req: &Request) -> Result<Vec<u8>, u32> {
    let extents = match s.export().block_status(req.offset, req.length as u64) {
        Ok(x) => x,
        Err(e) => return Err(errno(&e)),
    };
    let one = req.flags & wire::CMD_FLAG_REQ_ONE != 0;
    let pairs = extents.into_iter().map(|e| {
        let flags = (if e.hole { wire::STATE_HOLE } else { 0 }) | (if e.zero { wire::STATE_ZERO } else { 0 });
        (e.length, flags)
    });
    wire::block_status_payload(CTX_BASE_ALLOCATION, pairs, req.length as u64, MAX_EXTENTS, one).ok_or(wire::EIO)
}
