//! The NBD server: handshake (option haggling) and transmission.
//!
//! Each TCP connection gets a reader thread that parses requests and a few worker
//! threads that execute them; replies are written under a per-connection lock and
//! may complete out of order. [`serve_connection`] runs the same protocol code over
//! any byte stream, one request at a time (the fuzz target uses it).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use byteorder::{BigEndian as BE, ByteOrder};

use super::export::{errno, Catalog, Export, ExportError};
use super::wire::{self, Request};

/// Largest READ/WRITE payload accepted (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload read into memory.
const MAX_OPTION: u32 = 64 << 10;
/// Option payloads above this are not even skipped: the client is dropped.
const MAX_OPTION_SKIP: u32 = 16 << 20;
/// Most extents in one block-status reply.
const MAX_EXTENTS: usize = 1024;
/// Context id of `base:allocation`.
const CTX_BASE_ALLOCATION: u32 = 1;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Refuse writes on every export.
    pub read_only: bool,
    /// Worker threads per connection (0: execute on the reader thread).
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { read_only: false, workers: 4 }
    }
}

/// A bound NBD server.
pub struct Server {
    listener: TcpListener,
    catalog: Arc<dyn Catalog>,
    config: ServerConfig,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.listener.local_addr().ok()).finish()
    }
}

impl Server {
    /// Bind to `addr` (use port 0 for an ephemeral port).
    pub fn bind(addr: &str, catalog: Arc<dyn Catalog>, config: ServerConfig) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        Ok(Server { listener, catalog, config })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept connections until `stop` is set; then stop accepting, let every
    /// connection finish its in-flight requests, and return.
    pub fn serve(&self, stop: Arc<AtomicBool>) -> io::Result<()> {
        self.listener.set_nonblocking(true)?;
        let mut conns: Vec<std::thread::JoinHandle<()>> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let catalog = Arc::clone(&self.catalog);
                    let config = self.config.clone();
                    let stop = Arc::clone(&stop);
                    conns.push(std::thread::spawn(move || {
                        if let Err(e) = handle_tcp(stream, catalog, config, stop) {
                            if e.kind() != io::ErrorKind::UnexpectedEof {
                                eprintln!("thinpool nbd: connection ended: {e}");
                            }
                        }
                    }));
                    conns.retain(|h| !h.is_finished());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => eprintln!("thinpool nbd: accept failed: {e}"),
            }
        }
        for h in conns {
            let _ = h.join();
        }
        Ok(())
    }
}

/// The preferred block size to advertise: NBD requires a power of two, and a pool's
/// block size is any multiple of 64 KiB (192 KiB, say), so take the largest power of
/// two dividing it, kept within 512 B..=32 MiB.
fn preferred_block_size(block: u32) -> u32 {
    let pow2 = if block == 0 { 512 } else { 1u32 << block.trailing_zeros() };
    pow2.clamp(512, MAX_PAYLOAD)
}

/// What option haggling agreed on.
struct Session {
    export: Arc<dyn Export>,
    name: String,
    structured: bool,
    base_allocation: bool,
    read_only: bool,
}

fn handle_tcp(
    stream: TcpStream,
    catalog: Arc<dyn Catalog>,
    config: ServerConfig,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = stream.try_clone()?;
    let writer = Arc::new(Mutex::new(stream));
    let Some(session) = negotiate(&mut reader, &writer, catalog.as_ref(), config.read_only)? else { return Ok(()) };
    // A read timeout lets the reader notice a shutdown between requests.
    reader.set_read_timeout(Some(Duration::from_millis(200)))?;
    let name = session.name.clone();
    let r = transmission(&mut reader, &writer, session, config.workers, &stop);
    catalog.close(&name);
    r
}

/// Serve one client over any byte stream, one request at a time: the protocol
/// without threads (used by the fuzz target and tests).
pub fn serve_connection<R: Read, W: Write + Send + 'static>(
    reader: &mut R,
    writer: Arc<Mutex<W>>,
    catalog: &dyn Catalog,
    config: &ServerConfig,
) -> io::Result<()> {
    let Some(session) = negotiate(reader, &writer, catalog, config.read_only)? else { return Ok(()) };
    let name = session.name.clone();
    let r = transmission(reader, &writer, session, 0, &AtomicBool::new(false));
    catalog.close(&name);
    r
}

fn send<W: Write>(w: &Mutex<W>, parts: &[&[u8]]) -> io::Result<()> {
    let mut g = w.lock().map_err(|_| io::Error::other("writer lock poisoned"))?;
    for p in parts {
        g.write_all(p)?;
    }
    g.flush()
}

fn opt_reply<W: Write>(w: &Mutex<W>, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    send(w, &[&wire::option_reply(option, kind, data.len() as u32), data])
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn skip<R: Read>(r: &mut R, mut n: u64) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn transmission_flags(export: &dyn Export, read_only: bool, structured: bool) -> u16 {
    let mut f = wire::TF_HAS_FLAGS | wire::TF_SEND_FLUSH | wire::TF_SEND_CACHE | wire::TF_CAN_MULTI_CONN;
    if read_only || export.read_only() {
        f |= wire::TF_READ_ONLY;
    } else {
        f |= wire::TF_SEND_FUA | wire::TF_SEND_TRIM | wire::TF_SEND_WRITE_ZEROES | wire::TF_SEND_FAST_ZERO;
    }
    if structured {
        f |= wire::TF_SEND_DF;
    }
    f
}

/// A bounds-checked reader over an option's payload.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(BE::read_u32)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(BE::read_u16)
    }
    fn string(&mut self, n: u32) -> Option<String> {
        if n > 4096 {
            return None;
        }
        self.take(n as usize).map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

/// Option haggling. Returns the session to serve, or `None` when the client
/// aborted or went away before choosing an export.
fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &Mutex<W>,
    catalog: &dyn Catalog,
    read_only: bool,
) -> io::Result<Option<Session>> {
    let mut hello = [0u8; 18];
    BE::write_u64(&mut hello[0..], wire::NBDMAGIC);
    BE::write_u64(&mut hello[8..], wire::IHAVEOPT);
    BE::write_u16(&mut hello[16..], wire::FLAG_FIXED_NEWSTYLE | wire::FLAG_NO_ZEROES);
    send(w, &[&hello])?;
    let client_flags = read_u32(r)?;
    if client_flags & !(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES) != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "unknown client flags"));
    }
    let no_zeroes = client_flags & wire::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut base_allocation = false;
    loop {
        let mut head = [0u8; 16];
        r.read_exact(&mut head)?;
        if BE::read_u64(&head[0..]) != wire::IHAVEOPT {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad option magic"));
        }
        let option = BE::read_u32(&head[8..]);
        let len = BE::read_u32(&head[12..]);
        if len > MAX_OPTION {
            if len > MAX_OPTION_SKIP || option == wire::OPT_EXPORT_NAME {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "option too large"));
            }
            skip(r, len as u64)?;
            opt_reply(w, option, wire::REP_ERR_TOO_BIG, b"")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match option {
            wire::OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = catalog.open(&name) else {
                    return Err(io::Error::new(io::ErrorKind::NotFound, format!("no export named {name:?}")));
                };
                let flags = transmission_flags(export.as_ref(), read_only, false);
                let mut reply = vec![0u8; 10];
                BE::write_u64(&mut reply[0..], export.size());
                BE::write_u16(&mut reply[8..], flags);
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                send(w, &[&reply])?;
                let ro = read_only || export.read_only();
                return Ok(Some(Session { export, name, structured: false, base_allocation: false, read_only: ro }));
            }
            wire::OPT_ABORT => {
                let _ = opt_reply(w, option, wire::REP_ACK, b"");
                return Ok(None);
            }
            wire::OPT_LIST => {
                if len != 0 {
                    opt_reply(w, option, wire::REP_ERR_INVALID, b"")?;
                    continue;
                }
                for (name, _) in catalog.list() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    opt_reply(w, option, wire::REP_SERVER, &d)?;
                }
                opt_reply(w, option, wire::REP_ACK, b"")?;
            }
            wire::OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    opt_reply(w, option, wire::REP_ERR_INVALID, b"")?;
                } else {
                    structured = true;
                    opt_reply(w, option, wire::REP_ACK, b"")?;
                }
            }
            wire::OPT_INFO | wire::OPT_GO => {
                let mut c = Cursor(&data);
                let parsed = (|| {
                    let n = c.u32()?;
                    let name = c.string(n)?;
                    let k = c.u16()?;
                    let mut infos = Vec::new();
                    for _ in 0..k {
                        infos.push(c.u16()?);
                    }
                    c.0.is_empty().then_some((name, infos))
                })();
                let Some((name, infos)) = parsed else {
                    opt_reply(w, option, wire::REP_ERR_INVALID, b"")?;
                    continue;
                };
                let Some(export) = catalog.open(&name) else {
                    opt_reply(w, option, wire::REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
                    continue;
                };
                let flags = transmission_flags(export.as_ref(), read_only, structured);
                let mut info = vec![0u8; 12];
                BE::write_u16(&mut info[0..], wire::INFO_EXPORT);
                BE::write_u64(&mut info[2..], export.size());
                BE::write_u16(&mut info[10..], flags);
                opt_reply(w, option, wire::REP_INFO, &info)?;
                let mut bs = vec![0u8; 14];
                BE::write_u16(&mut bs[0..], wire::INFO_BLOCK_SIZE);
                BE::write_u32(&mut bs[2..], 1);
                BE::write_u32(&mut bs[6..], preferred_block_size(export.preferred_block_size()));
                BE::write_u32(&mut bs[10..], MAX_PAYLOAD);
                opt_reply(w, option, wire::REP_INFO, &bs)?;
                for i in infos {
                    let mut d = Vec::new();
                    match i {
                        wire::INFO_NAME => {
                            d.extend_from_slice(&wire::INFO_NAME.to_be_bytes());
                            d.extend_from_slice(name.as_bytes());
                        }
                        wire::INFO_DESCRIPTION => {
                            let desc = catalog
                                .list()
                                .into_iter()
                                .find(|(n, _)| *n == name)
                                .map(|(_, d)| d)
                                .unwrap_or_default();
                            d.extend_from_slice(&wire::INFO_DESCRIPTION.to_be_bytes());
                            d.extend_from_slice(desc.as_bytes());
                        }
                        _ => continue,
                    }
                    opt_reply(w, option, wire::REP_INFO, &d)?;
                }
                opt_reply(w, option, wire::REP_ACK, b"")?;
                if option == wire::OPT_GO {
                    let ro = read_only || export.read_only();
                    return Ok(Some(Session { export, name, structured, base_allocation, read_only: ro }));
                }
                catalog.close(&name);
            }
            wire::OPT_LIST_META_CONTEXT | wire::OPT_SET_META_CONTEXT => {
                if option == wire::OPT_SET_META_CONTEXT && !structured {
                    opt_reply(w, option, wire::REP_ERR_INVALID, b"negotiate structured replies first")?;
                    continue;
                }
                let mut c = Cursor(&data);
                let parsed = (|| {
                    let n = c.u32()?;
                    let _export = c.string(n)?;
                    let k = c.u32()?;
                    let mut queries = Vec::new();
                    for _ in 0..k.min(1024) {
                        let l = c.u32()?;
                        queries.push(c.string(l)?);
                    }
                    (c.0.is_empty() && k <= 1024).then_some(queries)
                })();
                let Some(queries) = parsed else {
                    opt_reply(w, option, wire::REP_ERR_INVALID, b"")?;
                    continue;
                };
                let matches = if queries.is_empty() {
                    option == wire::OPT_LIST_META_CONTEXT
                } else {
                    queries
                        .iter()
                        .any(|q| q == "base:allocation" || (option == wire::OPT_LIST_META_CONTEXT && q == "base:"))
                };
                if option == wire::OPT_SET_META_CONTEXT {
                    base_allocation = matches;
                }
                if matches {
                    let mut d = CTX_BASE_ALLOCATION.to_be_bytes().to_vec();
                    d.extend_from_slice(b"base:allocation");
                    opt_reply(w, option, wire::REP_META_CONTEXT, &d)?;
                }
                opt_reply(w, option, wire::REP_ACK, b"")?;
            }
            wire::OPT_STARTTLS => opt_reply(w, option, wire::REP_ERR_POLICY, b"TLS is not offered")?,
            _ => opt_reply(w, option, wire::REP_ERR_UNSUP, b"")?,
        }
    }
}

/// A request ready to execute.
struct Job {
    req: Request,
    payload: Vec<u8>,
}

/// Why a request failed, before or during execution.
fn check_request(s: &Session, req: &Request) -> Result<(), u32> {
    let size = s.export.size();
    let end = req.offset.checked_add(req.length as u64);
    let in_bounds = end.is_some_and(|e| e <= size);
    match req.kind {
        wire::CMD_READ => {
            if req.length > MAX_PAYLOAD {
                return Err(if s.structured { wire::EOVERFLOW } else { wire::EINVAL });
            }
            if !in_bounds {
                return Err(wire::EINVAL);
            }
        }
        wire::CMD_WRITE | wire::CMD_WRITE_ZEROES => {
            if s.read_only {
                return Err(wire::EPERM);
            }
            if !in_bounds {
                return Err(wire::ENOSPC);
            }
            if req.kind == wire::CMD_WRITE_ZEROES
                && req.flags & wire::CMD_FLAG_FAST_ZERO != 0
                && req.flags & wire::CMD_FLAG_NO_HOLE != 0
            {
                return Err(wire::ENOTSUP);
            }
        }
        wire::CMD_TRIM => {
            if s.read_only {
                return Err(wire::EPERM);
            }
            if !in_bounds {
                return Err(wire::EINVAL);
            }
        }
        wire::CMD_CACHE => {
            if !in_bounds {
                return Err(wire::EINVAL);
            }
        }
        wire::CMD_BLOCK_STATUS => {
            if !s.base_allocation || req.length == 0 || !in_bounds {
                return Err(wire::EINVAL);
            }
        }
        wire::CMD_FLUSH => {}
        _ => return Err(wire::EINVAL),
    }
    Ok(())
}

fn transmission<R: Read, W: Write + Send + 'static>(
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
        let mut payload = Vec::new();
        if req.kind == wire::CMD_WRITE {
            if req.length > MAX_PAYLOAD {
                // The payload cannot be skipped safely: drop the client.
                return Err(io::Error::new(io::ErrorKind::InvalidData, "write larger than the maximum payload"));
            }
            payload = vec![0u8; req.length as usize];
            read_payload(r, &mut payload)?;
        }
        if req.kind == wire::CMD_DISC {
            return Ok(());
        }
        let job = Job { req, payload };
        if workers == 0 {
            execute(session, w, job)?;
        } else if tx.send(job).is_err() {
            return Err(io::Error::other("workers stopped"));
        }
    }
}

fn error_reply<W: Write>(s: &Session, w: &Mutex<W>, req: &Request, err: u32) -> io::Result<()> {
    if s.structured && matches!(req.kind, wire::CMD_READ | wire::CMD_BLOCK_STATUS) {
        let mut p = [0u8; 6];
        BE::write_u32(&mut p[0..], err);
        send(w, &[&wire::chunk_header(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_ERROR, req.cookie, 6), &p])
    } else {
        send(w, &[&wire::simple_reply(err, req.cookie)])
    }
}

fn execute<W: Write>(s: &Session, w: &Mutex<W>, job: Job) -> io::Result<()> {
    let req = job.req;
    if let Err(e) = check_request(s, &req) {
        return error_reply(s, w, &req, e);
    }
    let ex = s.export.as_ref();
    let r: Result<(), ExportError> = match req.kind {
        wire::CMD_READ => return do_read(s, w, &req),
        wire::CMD_BLOCK_STATUS => return do_block_status(s, w, &req),
        wire::CMD_WRITE => ex.write(req.offset, &job.payload),
        wire::CMD_FLUSH => ex.flush(),
        wire::CMD_TRIM => ex.trim(req.offset, req.length as u64),
        wire::CMD_WRITE_ZEROES => ex.write_zeroes(
            req.offset,
            req.length as u64,
            req.flags & wire::CMD_FLAG_NO_HOLE == 0,
            req.flags & wire::CMD_FLAG_FAST_ZERO != 0,
        ),
        wire::CMD_CACHE => Ok(()),
        _ => Err(ExportError::Invalid("unknown command".into())),
    };
    let r = r.and_then(|()| {
        if req.flags & wire::CMD_FLAG_FUA != 0
            && matches!(req.kind, wire::CMD_WRITE | wire::CMD_WRITE_ZEROES | wire::CMD_TRIM)
        {
            ex.flush()
        } else {
            Ok(())
        }
    });
    match r {
        Ok(()) => send(w, &[&wire::simple_reply(0, req.cookie)]),
        Err(e) => error_reply(s, w, &req, errno(&e)),
    }
}

fn do_read<W: Write>(s: &Session, w: &Mutex<W>, req: &Request) -> io::Result<()> {
    let mut buf = vec![0u8; req.length as usize];
    if let Err(e) = s.export.read(req.offset, &mut buf) {
        return error_reply(s, w, req, errno(&e));
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

fn do_block_status<W: Write>(s: &Session, w: &Mutex<W>, req: &Request) -> io::Result<()> {
    let extents = match s.export.block_status(req.offset, req.length as u64) {
        Ok(x) => x,
        Err(e) => return error_reply(s, w, req, errno(&e)),
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
        return error_reply(s, w, req, wire::EIO);
    }
    send(
        w,
        &[
            &wire::chunk_header(wire::REPLY_FLAG_DONE, wire::REPLY_TYPE_BLOCK_STATUS, req.cookie, payload.len() as u32),
            &payload,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::mem::MemCatalog;

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = wire::IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn the_preferred_block_size_is_a_power_of_two_dividing_the_pool_block() {
        assert_eq!(preferred_block_size(65536), 65536);
        assert_eq!(preferred_block_size(3 * 65536), 65536);
        assert_eq!(preferred_block_size(1 << 30), MAX_PAYLOAD);
        assert_eq!(preferred_block_size(0), 512);
    }

    #[test]
    fn a_scripted_session_over_a_byte_stream_gets_the_expected_replies() {
        let mut input = 3u32.to_be_bytes().to_vec();
        let mut go = 1u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"a");
        go.extend_from_slice(&0u16.to_be_bytes());
        input.extend(opt(wire::OPT_GO, &go));
        let w = wire::Request { flags: wire::CMD_FLAG_FUA, kind: wire::CMD_WRITE, cookie: 1, offset: 100, length: 4 };
        input.extend_from_slice(&wire::encode_request(&w));
        input.extend_from_slice(b"abcd");
        let r = wire::Request { flags: 0, kind: wire::CMD_READ, cookie: 2, offset: 98, length: 8 };
        input.extend_from_slice(&wire::encode_request(&r));
        let d = wire::Request { flags: 0, kind: wire::CMD_DISC, cookie: 3, offset: 0, length: 0 };
        input.extend_from_slice(&wire::encode_request(&d));
        let out = Arc::new(Mutex::new(Vec::new()));
        let catalog = MemCatalog::new(&[("a", 1 << 20)]);
        serve_connection(
            &mut input.as_slice(),
            Arc::clone(&out),
            &catalog,
            &ServerConfig { read_only: false, workers: 0 },
        )
        .expect("session");
        let out = out.lock().expect("lock").clone();
        // The last reply is the read: header with cookie 2, then the bytes.
        let tail = &out[out.len() - 24..];
        assert_eq!(&tail[..16], &wire::simple_reply(0, 2));
        assert_eq!(&tail[16..], b"\0\0abcd\0\0");
        // Before it, the write's reply with cookie 1.
        assert_eq!(&out[out.len() - 40..out.len() - 24], &wire::simple_reply(0, 1));
    }
}
