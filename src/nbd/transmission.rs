//! The transmission phase: read requests, validate them, execute them.
//!
//! The reader loop parses each request header into a typed [`Command`] (reading a
//! WRITE's payload only after checking its length), then hands the [`Job`] to a
//! worker thread, or executes it in place when there are no workers. Execution
//! first validates the request against the session ([`check_request`]), then
//! dispatches on the command; every export error becomes a wire errno through
//! [`errno`]. Replies may complete out of order; each is written whole under the
//! connection's writer lock.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use byteorder::{BigEndian as BE, ByteOrder};

use super::export::{errno, ExportError};
use super::handshake::{Session, CTX_BASE_ALLOCATION};
use super::server::{send, MAX_PAYLOAD};
use super::wire::{self, Command, Request};

/// Most extents in one block-status reply.
const MAX_EXTENTS: usize = 1024;

/// A request ready to execute.
struct Job {
    command: Command,
    req: Request,
    payload: Vec<u8>,
}

/// Serve requests on `session` until the client disconnects (or `stop` is set
/// between requests), with `workers` worker threads (0: execute on this thread).
pub(super) fn transmission<R: Read, W: Write + Send + 'static>(
    r: &mut R,
    w: &Arc<Mutex<W>>,
    session: Session,
    workers: usize,
    stop: &AtomicBool,
) -> io::Result<()> {
    let session = Arc::new(session);
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (rx, w, s) = (Arc::clone(&rx), Arc::clone(w), Arc::clone(&session));
        handles.push(std::thread::spawn(move || loop {
            let job = match rx.lock() {
                Ok(g) => g.recv(),
                Err(_) => return,
            };
            let Ok(job) = job else { return };
            if execute(&s, &w, job).is_err() {
                return;
            }
        }));
    }
    let result = read_requests(r, w, &session, workers, &tx, stop);
    drop(tx);
    for h in handles {
        let _ = h.join();
    }
    result
}

/// Read a request header, tolerating read timeouts between requests (so a stop
/// request is noticed) but not inside one.
fn read_header<R: Read>(r: &mut R, stop: &AtomicBool) -> io::Result<Option<[u8; wire::REQUEST_SIZE]>> {
    let mut b = [0u8; wire::REQUEST_SIZE];
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated request")),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if got == 0 && stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(b))
}

fn read_payload<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated write payload")),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The reader loop: parse each request (and a WRITE's payload), stop at DISC.
fn read_requests<R: Read, W: Write + Send + 'static>(
    r: &mut R,
    w: &Arc<Mutex<W>>,
    session: &Arc<Session>,
    workers: usize,
    tx: &mpsc::Sender<Job>,
    stop: &AtomicBool,
) -> io::Result<()> {
    loop {
        let Some(head) = read_header(r, stop)? else { return Ok(()) };
        let Some(req) = wire::parse_request(&head) else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad request magic"));
        };
        let command = req.command;
        let mut payload = Vec::new();
        match command {
            Command::Write => {
                if req.length > MAX_PAYLOAD {
                    // The payload cannot be skipped safely: drop the client.
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "write larger than the maximum payload"));
                }
                payload = vec![0u8; req.length as usize];
                read_payload(r, &mut payload)?;
            }
            Command::Disc => return Ok(()),
            _ => {}
        }
        let job = Job { command, req, payload };
        if workers == 0 {
            execute(session, w, job)?;
        } else if tx.send(job).is_err() {
            return Err(io::Error::other("workers stopped"));
        }
    }
}

/// Why a request failed, before or during execution.
fn check_request(s: &Session, command: Command, req: &Request) -> Result<(), u32> {
    let size = s.export.size();
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
            if !s.base_allocation || req.length == 0 || !in_bounds {
                return Err(wire::EINVAL);
            }
        }
        Command::Flush => {}
        Command::Disc | Command::Unknown(_) => return Err(wire::EINVAL),
    }
    Ok(())
}

fn error_reply<W: Write>(s: &Session, w: &Mutex<W>, command: Command, req: &Request, err: u32) -> io::Result<()> {
    if s.structured && matches!(command, Command::Read | Command::BlockStatus) {
        let mut p = [0u8; 6];
        BE::write_u32(&mut p[0..], err);
        send(w, &[&wire::chunk_header(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_ERROR, req.cookie, 6), &p])
    } else {
        send(w, &[&wire::simple_reply(err, req.cookie)])
    }
}

/// Validate, then execute one request and send its reply.
fn execute<W: Write>(s: &Session, w: &Mutex<W>, job: Job) -> io::Result<()> {
    let Job { command, req, payload } = job;
    if let Err(e) = check_request(s, command, &req) {
        return error_reply(s, w, command, &req, e);
    }
    let ex = s.export.as_ref();
    let r: Result<(), ExportError> = match command {
        Command::Read => return do_read(s, w, &req),
        Command::BlockStatus => return do_block_status(s, w, &req),
        Command::Write => ex.write(req.offset, &payload),
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
        Ok(()) => send(w, &[&wire::simple_reply(0, req.cookie)]),
        Err(e) => error_reply(s, w, command, &req, errno(&e)),
    }
}

/// READ: a simple reply with the data, or structured chunks where unmapped
/// extents become hole chunks (unless DF asks for one piece).
fn do_read<W: Write>(s: &Session, w: &Mutex<W>, req: &Request) -> io::Result<()> {
    let mut buf = vec![0u8; req.length as usize];
    if let Err(e) = s.export.read(req.offset, &mut buf) {
        return error_reply(s, w, Command::Read, req, errno(&e));
    }
    if !s.structured {
        return send(w, &[&wire::simple_reply(0, req.cookie), &buf]);
    }
    if req.length == 0 {
        return send(w, &[&wire::chunk_header(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_NONE, req.cookie, 0)]);
    }
    // Holes become hole chunks unless the client asked for one piece (DF).
    let extents = if req.flags & wire::CMD_FLAG_DF != 0 {
        vec![(req.length as u64, false)]
    } else {
        match s.export.block_status(req.offset, req.length as u64) {
            Ok(x) => x.into_iter().map(|e| (e.length, e.hole && e.zero)).collect(),
            Err(_) => vec![(req.length as u64, false)],
        }
    };
    let mut pos = 0u64;
    let total = req.length as u64;
    let mut chunks: Vec<(u64, u64, bool)> = Vec::new();
    for (len, hole) in extents {
        if pos >= total {
            break;
        }
        let len = len.min(total - pos);
        chunks.push((pos, len, hole));
        pos += len;
    }
    if pos < total {
        chunks.push((pos, total - pos, false));
    }
    let last = chunks.len() - 1;
    for (i, (off, len, hole)) in chunks.into_iter().enumerate() {
        let flags = if i == last { wire::REPLY_FLAG_DONE } else { 0 };
        let abs = (req.offset + off).to_be_bytes();
        if hole {
            let mut p = [0u8; 12];
            p[..8].copy_from_slice(&abs);
            BE::write_u32(&mut p[8..], len as u32);
            send(w, &[&wire::chunk_header(flags, wire::REPLY_TYPE_OFFSET_HOLE, req.cookie, 12), &p])?;
        } else {
            let data = &buf[off as usize..(off + len) as usize];
            send(
                w,
                &[&wire::chunk_header(flags, wire::REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + len as u32), &abs, data],
            )?;
        }
    }
    Ok(())
}

/// BLOCK_STATUS: one `base:allocation` chunk of at most [`MAX_EXTENTS`] extents.
fn do_block_status<W: Write>(s: &Session, w: &Mutex<W>, req: &Request) -> io::Result<()> {
    let extents = match s.export.block_status(req.offset, req.length as u64) {
        Ok(x) => x,
        Err(e) => return error_reply(s, w, Command::BlockStatus, req, errno(&e)),
    };
    let mut payload = CTX_BASE_ALLOCATION.to_be_bytes().to_vec();
    let mut covered = 0u64;
    let total = req.length as u64;
    let one = req.flags & wire::CMD_FLAG_REQ_ONE != 0;
    for e in extents {
        if covered >= total || payload.len() >= 4 + 8 * MAX_EXTENTS {
            break;
        }
        let len = e.length.min(total - covered).min(u32::MAX as u64 & !511);
        if len == 0 {
            break;
        }
        let flags = (if e.hole { wire::STATE_HOLE } else { 0 }) | (if e.zero { wire::STATE_ZERO } else { 0 });
        payload.extend_from_slice(&(len as u32).to_be_bytes());
        payload.extend_from_slice(&flags.to_be_bytes());
        covered += len;
        if one {
            break;
        }
    }
    if payload.len() == 4 {
        return error_reply(s, w, Command::BlockStatus, req, wire::EIO);
    }
    send(
        w,
        &[
            &wire::chunk_header(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_BLOCK_STATUS, req.cookie, payload.len() as u32),
            &payload,
        ],
    )
}
