//! One client connection of the server (TCP or Unix socket, plain or TLS): its
//! buffers, its phase (greeting, options, transmission, closing) and [`Conn::drive`],
//! which a worker thread runs while the connection has something to do.
//!
//! The socket is non-blocking. Bytes are read into the connection's input buffer and
//! each complete message (client flags, an option, a request with its payload) is
//! handled as soon as it is whole: options by [`Negotiation`], requests by
//! [`execute`] on the driving thread, except the ones that may block for long
//! ([`runs_long`]: FLUSH, FUA), which go to the server's blocking pool. Replies are
//! appended to a batch that is written with one `send` when no further complete
//! request is already buffered (or the batch passes [`FLUSH_AT`]); what the socket
//! does not take waits in the connection's outbox.
//!
//! Backpressure: while the outbox plus the payloads queued on the blocking pool
//! reach [`Limits::max_bytes_per_connection`], or the requests queued there reach
//! [`Limits::max_requests_per_connection`], nothing more is read from the socket. So
//! a client that does not read its replies fills its own socket buffers and then
//! stops being read; the server holds at most one request (at most 32 MiB) plus the
//! cap for it.
//!
//! A connection with nothing to do for [`HOLD`] is parked: handed back to the
//! reactor, which polls it with every other parked connection, so an idle client
//! costs a file descriptor and a few hundred bytes, not a thread.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::export::Catalog;
use super::handshake::{option_frame, CatalogRef, Frame, Negotiation, Session, Step};
use super::reply::ReplyBuf;
use super::server::{Hub, Limits};
use super::tls::TlsSetup;
use super::transmission::{execute, frame, runs_long};
use super::transport::{Sock, Transport};
use super::wire::{self, Command, OptionCode};

/// Replies batched past this size are written before the next request is handled.
pub(super) const FLUSH_AT: usize = 256 << 10;
/// How long a driving thread waits for more bytes before parking the connection.
pub(super) const HOLD: Duration = Duration::from_millis(50);
/// The input buffer's usual size (one `recv` takes up to this much).
const READ_CHUNK: usize = 64 << 10;
/// Emptied buffers are kept up to this much capacity per busy connection (and
/// released when it goes idle), so that a stream of large reads reuses warm memory
/// instead of mapping, faulting in and zeroing a new buffer for each reply (perf:
/// a quarter of the server's CPU in 1 MiB reads at QD32 went to page faults).
const KEEP_BUFFER: usize = 16 << 20;

/// Replies not yet taken by the socket: whole batches, written with `writev`
/// (never copied into one buffer).
#[derive(Default)]
struct Outbox {
    chunks: VecDeque<ReplyBuf>,
    /// Bytes of the first chunk already written.
    pos: usize,
    /// Bytes waiting, over all chunks.
    bytes: usize,
    /// Emptied buffers kept for the next batches (at most [`KEEP_BUFFER`] bytes of
    /// capacity in all), so that a stream of large replies reuses warm memory
    /// instead of mapping and faulting in a new buffer for each.
    spares: Vec<ReplyBuf>,
    /// A write failed (the client went away): the connection is to be closed.
    failed: bool,
    /// Leading chunks to write as they are, before TLS takes over (the STARTTLS
    /// acknowledgement).
    raw: usize,
}

impl Outbox {
    /// `n` bytes of the first chunks were written (or handed to TLS).
    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let left = self.chunks[0].len() - self.pos;
            if n < left {
                self.pos += n;
                break;
            }
            n -= left;
            self.pos = 0;
            self.raw = self.raw.saturating_sub(1);
            if let Some(mut c) = self.chunks.pop_front() {
                let kept: usize = self.spares.iter().map(ReplyBuf::capacity).sum();
                if kept + c.capacity() <= KEEP_BUFFER {
                    c.clear();
                    self.spares.push(c);
                }
            }
        }
    }

    /// Up to 16 of the first `limit` chunks, as slices for `writev`.
    fn slices(&self, limit: usize) -> ([IoSlice<'_>; 16], usize) {
        let mut slices = [IoSlice::new(&[]); 16];
        let mut n = 0;
        for (i, c) in self.chunks.iter().take(limit.min(16)).enumerate() {
            slices[i] = IoSlice::new(if i == 0 { &c.as_slice()[self.pos..] } else { c.as_slice() });
            n += 1;
        }
        (slices, n)
    }
}

/// Requests queued on or running in the blocking pool.
#[derive(Default)]
struct Jobs {
    count: usize,
    bytes: usize,
}

/// The part of a connection the blocking pool's threads share with its driver.
pub(super) struct Shared {
    sock: Transport,
    out: Mutex<Outbox>,
    jobs: Mutex<Jobs>,
    jobs_done: Condvar,
    /// Wakes the reactor, so that it polls a parked connection for writability.
    waker: Arc<dyn Fn() + Send + Sync>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Queue `data` (taking its buffer; it gets an empty one back) and write what
    /// the socket takes now.
    fn send(&self, data: &mut ReplyBuf) {
        let mut ob = lock(&self.out);
        if ob.failed || data.is_empty() {
            data.clear();
            return;
        }
        let spare = ob.spares.pop().unwrap_or_default();
        let chunk = std::mem::replace(data, spare);
        ob.bytes += chunk.len();
        ob.chunks.push_back(chunk);
        self.write_some(&mut ob);
    }

    /// Write the outbox until the socket would block: as it is, or through TLS
    /// once STARTTLS went through (after the chunks queued before it).
    fn write_some(&self, ob: &mut Outbox) {
        let tls = self.sock.is_tls();
        while !ob.failed {
            let raw = if tls { ob.raw } else { ob.chunks.len() };
            if raw > 0 {
                let written = {
                    let (slices, n) = ob.slices(raw);
                    self.sock.write_raw(&slices[..n])
                };
                match written {
                    Ok(0) => ob.failed = true,
                    Ok(n) => ob.advance(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => ob.failed = true,
                }
                continue;
            }
            if !tls {
                break;
            }
            // TLS: send the records rustls holds, then encrypt more of the outbox.
            match self.sock.tls_flush() {
                Ok(true) => {}
                Ok(false) => break,
                Err(_) => {
                    ob.failed = true;
                    break;
                }
            }
            if ob.chunks.is_empty() {
                break;
            }
            let taken = {
                let (slices, n) = ob.slices(ob.chunks.len());
                self.sock.tls_write(&slices[..n])
            };
            match taken {
                Ok(0) => break,
                Ok(n) => ob.advance(n),
                Err(_) => ob.failed = true,
            }
        }
        if ob.failed {
            ob.chunks.clear();
            ob.bytes = 0;
            ob.pos = 0;
            ob.raw = 0;
        }
    }

    /// Write more of the outbox; the bytes still waiting (plus one when TLS
    /// records are waiting).
    fn flush(&self) -> usize {
        let mut ob = lock(&self.out);
        self.write_some(&mut ob);
        ob.bytes + usize::from(!ob.failed && self.sock.tls_pending())
    }

    /// Switch to TLS: the chunks queued so far (ending with the STARTTLS
    /// acknowledgement) still go out as they are, everything after through TLS.
    fn start_tls(&self, tls: &TlsSetup, early: &[u8]) -> io::Result<()> {
        let mut ob = lock(&self.out);
        ob.raw = ob.chunks.len();
        self.sock.start_tls(tls.config(), early)?;
        self.write_some(&mut ob);
        Ok(())
    }

    /// Bytes waiting in the outbox (plus one when TLS records are waiting).
    fn pending(&self) -> usize {
        let ob = lock(&self.out);
        ob.bytes + usize::from(!ob.failed && self.sock.tls_pending())
    }

    fn failed(&self) -> bool {
        lock(&self.out).failed
    }

    /// A reply from the blocking pool: queue it, and have the reactor poll for
    /// writability when the socket did not take it all.
    fn complete(&self, mut reply: ReplyBuf, bytes: usize) {
        self.send(&mut reply);
        {
            let mut j = lock(&self.jobs);
            j.count -= 1;
            j.bytes -= bytes;
        }
        self.jobs_done.notify_all();
        if self.pending() > 0 {
            (self.waker)();
        }
    }
}

/// Where a connection is in the protocol.
enum Phase {
    /// Greeting sent; the client's 4 flag bytes are next.
    Flags,
    /// Option haggling; `skip` is an oversized option being discarded.
    Options { neg: Box<Negotiation<'static>>, skip: Option<(OptionCode, u32)> },
    /// Transmission.
    Serving(Arc<Session<'static>>),
    /// DISC, ABORT, end of input or shutdown: finish what is in flight and close.
    Done,
}

/// What the driving thread does with the connection next.
pub(super) enum Outcome {
    /// Nothing to do now: the reactor polls it.
    Park,
    /// Closed (dropping it closes the socket and releases its export).
    Close,
}

/// What the reactor should poll a parked connection for.
pub(super) struct Interest {
    /// More input is wanted.
    pub(super) read: bool,
    /// Replies are waiting for the socket.
    pub(super) write: bool,
}

/// One client connection.
pub(super) struct Conn {
    shared: Arc<Shared>,
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Replies of inline requests not yet handed to the outbox.
    batch: ReplyBuf,
    phase: Phase,
    /// End of the handshake allowance (until GO/EXPORT_NAME).
    deadline: Option<Instant>,
    catalog: Arc<dyn Catalog>,
    limits: Limits,
    read_only: bool,
    /// Answer every option with this error and message (over the connection limit).
    refuse: Option<(u32, String)>,
    /// Decremented when the connection closes.
    counter: Arc<AtomicUsize>,
    /// TLS offered or required (None: off).
    tls: Option<Arc<TlsSetup>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.sock.close();
        self.counter.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Conn {
    /// A freshly accepted connection: sends the greeting. `counter` was already
    /// incremented for it; `refuse` makes every option fail with that error.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn accept(
        sock: Sock,
        catalog: Arc<dyn Catalog>,
        limits: Limits,
        read_only: bool,
        refuse: Option<(u32, String)>,
        counter: Arc<AtomicUsize>,
        waker: Arc<dyn Fn() + Send + Sync>,
        tls: Option<Arc<TlsSetup>>,
    ) -> Conn {
        let shared = Arc::new(Shared {
            sock: Transport::new(sock),
            out: Mutex::new(Outbox::default()),
            jobs: Mutex::new(Jobs::default()),
            jobs_done: Condvar::new(),
            waker,
        });
        let mut hello = ReplyBuf::new();
        hello.extend_from_slice(&super::handshake::greeting());
        shared.send(&mut hello);
        Conn {
            shared,
            inbuf: Vec::new(),
            start: 0,
            end: 0,
            batch: ReplyBuf::new(),
            phase: Phase::Flags,
            deadline: Some(Instant::now() + limits.handshake_timeout),
            catalog,
            limits,
            read_only,
            refuse,
            counter,
            tls,
        }
    }

    /// The socket, for the reactor's poll.
    pub(super) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shared.sock.fd()
    }

    /// Input that `poll` cannot see is waiting (a complete message in the input
    /// buffer, or plaintext inside the TLS session) and the connection wants input:
    /// it has work without its socket becoming readable.
    pub(super) fn has_input(&self) -> bool {
        if !self.interest().read {
            return false;
        }
        let need = self.need();
        (need > 0 && self.end - self.start >= need) || self.shared.sock.buffered_input()
    }

    /// The handshake allowance ends at this instant.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Still in the handshake (greeting or options).
    pub(super) fn in_handshake(&self) -> bool {
        matches!(self.phase, Phase::Flags | Phase::Options { .. })
    }

    /// Anything in flight: part of a request received, replies unsent, or requests
    /// on the blocking pool. Idle connections are closed at once on shutdown.
    pub(super) fn busy(&self) -> bool {
        self.end > self.start || self.shared.pending() > 0 || lock(&self.shared.jobs).count > 0
    }

    /// What a parked connection waits for.
    pub(super) fn interest(&self) -> Interest {
        let pending = self.shared.pending();
        Interest { read: !self.over_cap(pending) && !matches!(self.phase, Phase::Done), write: pending > 0 }
    }

    /// Replies waiting plus payloads queued reach a cap: stop reading.
    fn over_cap(&self, pending: usize) -> bool {
        if !matches!(self.phase, Phase::Serving(_)) {
            return false;
        }
        let j = lock(&self.shared.jobs);
        pending + j.bytes >= self.limits.max_bytes_per_connection || j.count >= self.limits.max_requests_per_connection
    }

    /// Run the connection until it has nothing to do for [`HOLD`], must wait for the
    /// client to read, or ends.
    pub(super) fn drive(&mut self, hub: &Hub) -> Outcome {
        loop {
            if hub.forced() || self.shared.failed() {
                return Outcome::Close;
            }
            if self.in_handshake() && hub.stopping() {
                // Options already received get NBD_REP_ERR_SHUTDOWN (a clean
                // refusal a client can report) before the connection closes.
                if let Phase::Options { neg, .. } = &mut self.phase {
                    neg.refuse_all(wire::REP_ERR_SHUTDOWN, "the server is shutting down".into());
                    let _ = self.process(hub);
                    self.flush_batch();
                    self.shared.flush();
                }
                return Outcome::Close;
            }
            if self.in_handshake() && self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Outcome::Close;
            }
            if let Err(e) = self.process(hub) {
                if !matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) {
                    eprintln!("thinpool nbd: connection ended: {e}");
                }
                self.flush_batch();
                return Outcome::Close;
            }
            let batch_full = self.batch.len() >= FLUSH_AT;
            self.flush_batch();
            let mut pending = self.shared.flush();
            if matches!(self.phase, Phase::Done) {
                return self.finish(hub);
            }
            let over = self.over_cap(pending);
            if batch_full && !over {
                // More complete requests may be buffered: handle them first.
                continue;
            }
            if over && pending == 0 {
                // Held back by requests on the blocking pool: they end in bounded time.
                self.wait_jobs(|j, l| j.count < l.max_requests_per_connection && j.bytes < l.max_bytes_per_connection);
                continue;
            }
            if !over {
                if hub.stopping() && self.end == self.start {
                    // Shutdown: requests already received are done; take no new ones.
                    self.phase = Phase::Done;
                    continue;
                }
                match self.read_more() {
                    Ok(true) => continue,
                    Ok(false) => {
                        self.phase = Phase::Done;
                        continue;
                    }
                    // Reading may have made TLS handshake records to send.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => pending = self.shared.flush(),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if e.kind() == io::ErrorKind::InvalidData {
                            // A failed TLS handshake or a bad record: say why once.
                            eprintln!("thinpool nbd: connection ended: {e}");
                        }
                        return Outcome::Close;
                    }
                }
            }
            // Nothing to do right now: wait a little on this thread, unless another
            // connection is waiting for one.
            if hub.starved() {
                return Outcome::Park;
            }
            let mut flags = PollFlags::empty();
            if !over {
                flags |= PollFlags::POLLIN;
            }
            if pending > 0 {
                flags |= PollFlags::POLLOUT;
            }
            if !self.wait(flags, HOLD) {
                if pending == 0 {
                    // Idle: an idle connection keeps no spare buffers.
                    lock(&self.shared.out).spares = Vec::new();
                }
                return Outcome::Park;
            }
        }
    }

    /// Wait until the socket is ready for `flags` (or hangs up), for at most
    /// `timeout` and never past the handshake deadline; false on timeout.
    fn wait(&self, flags: PollFlags, timeout: Duration) -> bool {
        let mut timeout = timeout;
        if let Some(d) = self.deadline {
            timeout = timeout.min(d.saturating_duration_since(Instant::now()));
        }
        if flags.contains(PollFlags::POLLIN) && self.shared.sock.buffered_input() {
            return true;
        }
        let mut fds = [PollFd::new(self.shared.sock.fd(), flags)];
        let ms = timeout.as_millis().min(u16::MAX as u128) as u16;
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => n > 0,
            Err(_) => true,
        }
    }

    /// Wait (on this thread, in slices) until `ok` holds for the blocking pool's
    /// queue of this connection.
    fn wait_jobs(&self, ok: impl Fn(&Jobs, &Limits) -> bool) {
        let mut j = lock(&self.shared.jobs);
        while !ok(&j, &self.limits) {
            j = match self.shared.jobs_done.wait_timeout(j, Duration::from_millis(100)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// The end of a connection: wait for its requests on the blocking pool, then
    /// close once every reply is written (parked while the client is slow to read;
    /// on shutdown the reactor's grace period bounds that).
    fn finish(&mut self, hub: &Hub) -> Outcome {
        self.wait_jobs(|j, _| j.count == 0);
        let mut pending = self.shared.flush();
        loop {
            if pending == 0 || self.shared.failed() || hub.forced() {
                return Outcome::Close;
            }
            if !self.wait(PollFlags::POLLOUT, HOLD) {
                return Outcome::Park;
            }
            pending = self.shared.flush();
        }
    }

    /// Hand the batch of replies to the outbox.
    fn flush_batch(&mut self) {
        if !self.batch.is_empty() {
            self.shared.send(&mut self.batch);
            if self.batch.capacity() > KEEP_BUFFER {
                self.batch = ReplyBuf::new();
            }
        }
    }

    /// Read what the socket has; false at end of input.
    fn read_more(&mut self) -> io::Result<bool> {
        let want = self.need().max(READ_CHUNK);
        if self.inbuf.len() - self.start < want {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.inbuf.len() < want {
                self.inbuf.resize(want, 0);
            }
        } else if self.end == self.inbuf.len() {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.shared.sock.read(&mut self.inbuf[self.end..])?;
        self.end += n;
        Ok(n > 0)
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.inbuf.len() > KEEP_BUFFER {
                self.inbuf = Vec::new();
            }
        }
    }

    /// Bytes the next message needs in the input buffer, as far as is known.
    fn need(&self) -> usize {
        let avail = &self.inbuf[self.start..self.end];
        match &self.phase {
            Phase::Flags => 4,
            Phase::Options { skip: Some(_), .. } => 1,
            Phase::Options { skip: None, .. } => {
                if avail.len() >= 16 {
                    16 + u32::from_be_bytes([avail[12], avail[13], avail[14], avail[15]]).min(64 << 10) as usize
                } else {
                    16
                }
            }
            Phase::Serving(_) => {
                if avail.len() >= wire::REQUEST_SIZE {
                    let cmd = u16::from_be_bytes([avail[6], avail[7]]);
                    let len = u32::from_be_bytes([avail[24], avail[25], avail[26], avail[27]]);
                    if cmd == wire::CMD_WRITE {
                        wire::REQUEST_SIZE + len.min(super::server::MAX_PAYLOAD) as usize
                    } else {
                        wire::REQUEST_SIZE
                    }
                } else {
                    wire::REQUEST_SIZE
                }
            }
            Phase::Done => 0,
        }
    }

    /// STARTTLS was acknowledged: the acknowledgement goes out as it is, then
    /// everything is TLS, starting with what the client already sent after it.
    fn start_tls(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.clone() else {
            return Err(io::Error::other("STARTTLS accepted without a TLS configuration"));
        };
        self.flush_batch();
        let early = self.inbuf[self.start..self.end].to_vec();
        self.consume(early.len());
        self.shared.start_tls(&tls, &early)?;
        if let Phase::Options { neg, .. } = &mut self.phase {
            neg.tls_started();
        }
        Ok(())
    }

    /// Handle every complete message in the input buffer, until one is incomplete,
    /// the batch is large enough to send, or a cap is reached. An error ends the
    /// connection.
    fn process(&mut self, hub: &Hub) -> io::Result<()> {
        loop {
            if self.batch.len() >= FLUSH_AT {
                return Ok(());
            }
            let avail = self.end - self.start;
            match &mut self.phase {
                Phase::Flags => {
                    if avail < 4 {
                        return Ok(());
                    }
                    let b = &self.inbuf[self.start..self.start + 4];
                    let flags = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                    self.consume(4);
                    let mut neg =
                        Negotiation::new(CatalogRef::Shared(Arc::clone(&self.catalog)), self.read_only, flags)?;
                    if let Some(tls) = &self.tls {
                        neg.set_tls(tls.mode());
                    }
                    if let Some((error, message)) = self.refuse.take() {
                        neg.refuse_all(error, message);
                    }
                    self.phase = Phase::Options { neg: Box::new(neg), skip: None };
                }
                Phase::Options { neg, skip: Some((option, left)) } => {
                    let n = (*left as usize).min(avail);
                    *left -= n as u32;
                    let done = *left == 0;
                    if done {
                        let mut answer = Vec::new();
                        neg.too_big(*option, &mut answer);
                        self.batch.extend_from_slice(&answer);
                        if let Phase::Options { skip, .. } = &mut self.phase {
                            *skip = None;
                        }
                    }
                    self.consume(n);
                    if !done {
                        return Ok(());
                    }
                }
                Phase::Options { neg, skip: None } => {
                    if avail < 16 {
                        return Ok(());
                    }
                    let mut head = [0u8; 16];
                    head.copy_from_slice(&self.inbuf[self.start..self.start + 16]);
                    match option_frame(&head)? {
                        Frame::Skip(option, len) => {
                            if let Phase::Options { skip, .. } = &mut self.phase {
                                *skip = Some((option, len));
                            }
                            self.consume(16);
                        }
                        Frame::Read(option, len) => {
                            let len = len as usize;
                            if avail < 16 + len {
                                return Ok(());
                            }
                            let data = &self.inbuf[self.start + 16..self.start + 16 + len];
                            let mut answer = Vec::new();
                            let step = neg.handle(option, data, &mut answer);
                            self.batch.extend_from_slice(&answer);
                            let step = step?;
                            self.consume(16 + len);
                            match step {
                                Step::Next => {}
                                Step::Serve(session) => {
                                    self.deadline = None;
                                    self.phase = Phase::Serving(Arc::new(session));
                                }
                                Step::Abort => self.phase = Phase::Done,
                                Step::StartTls => self.start_tls()?,
                            }
                        }
                    }
                }
                Phase::Serving(session) => {
                    if avail < wire::REQUEST_SIZE {
                        return Ok(());
                    }
                    let mut head = [0u8; wire::REQUEST_SIZE];
                    head.copy_from_slice(&self.inbuf[self.start..self.start + wire::REQUEST_SIZE]);
                    let (req, payload_len) = frame(&head)?;
                    if req.command == Command::Disc {
                        self.consume(wire::REQUEST_SIZE);
                        self.phase = Phase::Done;
                        return Ok(());
                    }
                    let size = wire::REQUEST_SIZE + payload_len;
                    if avail < size {
                        return Ok(());
                    }
                    let payload = &self.inbuf[self.start + wire::REQUEST_SIZE..self.start + size];
                    if hub.has_blocking_pool() && runs_long(&req) {
                        {
                            let mut j = lock(&self.shared.jobs);
                            if j.count >= self.limits.max_requests_per_connection
                                || j.bytes >= self.limits.max_bytes_per_connection
                            {
                                // At the cap: this request waits in the input buffer.
                                return Ok(());
                            }
                            j.count += 1;
                            j.bytes += payload_len;
                        }
                        let (session, shared, payload) =
                            (Arc::clone(session), Arc::clone(&self.shared), payload.to_vec());
                        hub.run_blocking(Box::new(move || {
                            let mut reply = ReplyBuf::new();
                            execute(&session, &req, &payload, &mut reply);
                            shared.complete(reply, payload.len());
                        }));
                    } else {
                        execute(session, &req, payload, &mut self.batch);
                    }
                    self.consume(size);
                    if self.over_cap(self.shared.pending() + self.batch.len()) {
                        return Ok(());
                    }
                }
                Phase::Done => return Ok(()),
            }
        }
    }
}
