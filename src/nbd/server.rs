//! The NBD server: a reactor that accepts and polls connections, a bounded set of
//! threads that drive the connections that have work, and a small blocking pool for
//! requests that may wait for a commit. [`serve_connection`] runs the same protocol
//! code over any byte stream, one request at a time (the fuzz target uses it).
//!
//! # Why this shape
//!
//! Measured before it (2 cores, fio's nbd engine, 4 KiB random reads at queue depth
//! 32): about 40% of the server's CPU went to scheduler switches and futex wake-ups,
//! because every request went from the connection's reading thread over a channel
//! to a worker and back through a mutex on the socket, with one `send` per reply. A
//! B-tree lookup is about 1% of a read. So requests now run where they are read
//! (`conn.rs`): no hand-off per request, and the replies of everything a
//! client pipelined are written with one `send`. Only requests that may block for
//! long — FLUSH and FUA, which commit — go to the blocking pool
//! ([`ServerConfig::workers`] threads shared by all connections), so a commit does
//! not hold up reads queued behind it on the same connection.
//!
//! Threads are bounded however many clients connect: the reactor (the thread that
//! calls [`Server::serve`]), at most [`Limits::max_threads`] connection threads and
//! the blocking pool. A connection holds a thread only while it has work (and for a
//! short hold after, so a busy client is not bounced through the reactor between
//! batches); idle connections, and clients that stall in the handshake or halfway
//! through a request, are parked in the reactor's `poll` set. This is an event loop
//! for idle connections with plain blocking-style code for the work, without an
//! async runtime: the engine below is synchronous (`pread`/`pwrite` on files), so a
//! runtime would run it on a blocking pool anyway and bring back the hand-off.
//!
//! # Listeners
//!
//! A server listens on any number of TCP addresses and Unix socket paths
//! ([`Server::listen_tcp`], [`Server::listen_unix`]); every connection, whatever it
//! came in on, shares the same limits, threads and shutdown. A Unix socket file is
//! made with its final mode (0600, or 0660 with a group, [`SocketAccess`]) before it
//! appears under its name: bound under a temporary name in the same directory,
//! chmod/chown'ed, then renamed into place. A stale socket file (no server answers on
//! it) is replaced; a live one, or a path that is not a socket, is an error. The file
//! is removed when the server is dropped, if it is still ours.
//!
//! With [`Server::with_tls`] the handshake offers or requires `NBD_OPT_STARTTLS`
//! (see [`super::tls`]); after it the connection's bytes go through rustls.
//!
//! # Limits
//!
//! - [`Limits::max_connections`]: past it a client gets the greeting and then
//!   `NBD_REP_ERR_POLICY` with a message for every option (proto.md: "the option
//!   sent by the client is forbidden by server policy"; ABORT is acknowledged,
//!   EXPORT_NAME, which has no error reply, is closed). At most as many again are
//!   being refused at once; past that a connection is closed at accept.
//! - [`Limits::handshake_timeout`]: a client that has not chosen an export by then
//!   is closed.
//! - [`Limits::max_requests_per_connection`] and
//!   [`Limits::max_bytes_per_connection`]: backpressure (see `conn.rs`).
//! - Shutdown: when `stop` is set the server stops accepting, closes idle and
//!   handshaking connections, lets the others finish the requests they have sent
//!   (and receive a request they are halfway through) for [`Limits::shutdown_grace`],
//!   then closes whatever is left and returns once in-flight requests are done.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::conn::{Conn, Outcome};
use super::export::Catalog;
use super::handshake::{greeting, option_frame, CatalogRef, Frame, MAX_OPTION};
use super::tls::TlsSetup;
use super::transmission::{execute, frame};
use super::transport::Sock;
use super::wire::{self, Command};

/// A connection thread with no connection to drive for this long exits.
const THREAD_IDLE_EXIT: Duration = Duration::from_secs(2);

/// Largest READ/WRITE payload accepted (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Refuse writes on every export.
    pub read_only: bool,
    /// Threads of the blocking pool shared by every connection, which runs FLUSH and
    /// FUA requests (0: run them inline like every other request).
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { read_only: false, workers: 4 }
    }
}

/// What one client, or many, may hold of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; more are refused with `NBD_REP_ERR_POLICY`.
    pub max_connections: usize,
    /// Threads driving connections that have work (idle ones hold none).
    pub max_threads: usize,
    /// Requests of one connection queued on the blocking pool; at the cap the
    /// connection is not read.
    pub max_requests_per_connection: usize,
    /// Reply bytes not yet taken by a connection's socket plus the payloads it has
    /// queued on the blocking pool; at the cap the connection is not read.
    pub max_bytes_per_connection: usize,
    /// Time from accept to GO/EXPORT_NAME.
    pub handshake_timeout: Duration,
    /// On shutdown, how long connections with requests in flight (or half sent)
    /// get before they are closed.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            max_threads: 32,
            max_requests_per_connection: 64,
            max_bytes_per_connection: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// Who may connect to a Unix socket of the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// None: mode 0600 (the server's user only). Some(gid): mode 0660 and this
    /// group.
    pub group: Option<u32>,
}

impl SocketAccess {
    /// The socket file's permission bits.
    pub fn mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

/// A Unix socket the server listens on; its file is removed on drop when it is
/// still the one this server made.
struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file.
    id: (u64, u64),
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What the server accepts connections on.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

impl Listener {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(u) => u.listener.as_fd(),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(u) => u.listener.set_nonblocking(true),
        }
    }

    fn accept(&self) -> io::Result<Sock> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                Ok(Sock::Tcp(s))
            }
            Listener::Unix(u) => {
                let (s, _) = u.listener.accept()?;
                s.set_nonblocking(true)?;
                Ok(Sock::Unix(s))
            }
        }
    }
}

/// Remove `path` when it is a socket file nobody listens on; an error when a
/// server answers on it or it is not a socket.
fn clear_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket; not replacing it", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => {
            Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is in use by a running server", path.display())))
        }
        // Left by a server that did not stop cleanly.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    }
}

/// Give a freshly bound socket file its mode and group.
fn set_access(path: &Path, access: &SocketAccess) -> io::Result<()> {
    if let Some(gid) = access.group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(io::Error::from)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode()))
}

/// Bind a Unix socket at `path` that is never reachable there with looser
/// permissions than `access` gives.
fn bind_unix(path: &Path, access: &SocketAccess) -> io::Result<UnixSocket> {
    clear_stale_socket(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a file path", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = match UnixListener::bind(&tmp) {
        Ok(l) => {
            let placed = set_access(&tmp, access).and_then(|()| std::fs::rename(&tmp, path));
            if let Err(e) = placed {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            l
        }
        // The temporary name is too long for a socket address (108 bytes) while
        // the path itself may fit: bind in place. The file is briefly there with
        // the umask's mode, which at the usual 022 lets no other user connect.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            let l = UnixListener::bind(path)?;
            if let Err(e) = set_access(path, access) {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
            l
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    let meta = std::fs::symlink_metadata(path)?;
    Ok(UnixSocket { listener, path: path.to_path_buf(), id: (meta.dev(), meta.ino()) })
}

/// A bound NBD server.
pub struct Server {
    listeners: Vec<Listener>,
    catalog: Arc<dyn Catalog>,
    config: ServerConfig,
    limits: Limits,
    tls: Option<Arc<TlsSetup>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.local_addr().ok())
            .field("socket", &self.unix_path())
            .field("tls", &self.tls.as_ref().map(|t| t.mode()))
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Job = Box<dyn FnOnce() + Send>;

/// Connections waiting for a thread, and the threads.
#[derive(Default)]
struct Ready {
    queue: VecDeque<Conn>,
    idle: usize,
    threads: usize,
    exit: bool,
    handles: Vec<JoinHandle<()>>,
}

/// What the reactor, the connection threads and the blocking pool share.
pub(super) struct Hub {
    limits: Limits,
    ready: Mutex<Ready>,
    ready_cv: Condvar,
    /// Connections parked by their threads, for the reactor to poll.
    parked: Mutex<Vec<Conn>>,
    waker: UnixStream,
    stopping: AtomicBool,
    forced: AtomicBool,
    blocking: Mutex<Option<mpsc::Sender<Job>>>,
    has_blocking: bool,
}

impl Hub {
    /// Shutdown has begun: take no new requests.
    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The grace period is over: close now.
    pub(super) fn forced(&self) -> bool {
        self.forced.load(Ordering::Relaxed)
    }

    /// A connection waits for a thread and none can be started.
    pub(super) fn starved(&self) -> bool {
        let r = lock(&self.ready);
        !r.queue.is_empty() && r.idle == 0 && r.threads >= self.limits.max_threads
    }

    /// Long requests go to the blocking pool.
    pub(super) fn has_blocking_pool(&self) -> bool {
        self.has_blocking
    }

    /// Run `job` on the blocking pool (inline when it has stopped).
    pub(super) fn run_blocking(&self, job: Job) {
        let job = match lock(&self.blocking).as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        job();
    }

    fn wake(&self) {
        let _ = (&self.waker).write(&[1]);
    }

    /// Give `conn` to a connection thread, starting one when none is idle.
    fn dispatch(self: &Arc<Self>, conn: Conn) {
        let mut r = lock(&self.ready);
        r.queue.push_back(conn);
        if r.idle == 0 && r.threads < self.limits.max_threads && !r.exit {
            r.threads += 1;
            r.handles.retain(|h| !h.is_finished());
            let hub = Arc::clone(self);
            match std::thread::Builder::new().name("nbd-conn".into()).spawn(move || hub.conn_thread()) {
                Ok(h) => r.handles.push(h),
                Err(e) => {
                    r.threads -= 1;
                    eprintln!("thinpool nbd: cannot start a thread: {e}");
                }
            }
        }
        drop(r);
        self.ready_cv.notify_one();
    }

    fn conn_thread(self: Arc<Self>) {
        loop {
            let mut conn = {
                let mut r = lock(&self.ready);
                let idle_since = Instant::now();
                loop {
                    if let Some(c) = r.queue.pop_front() {
                        break c;
                    }
                    if r.exit || idle_since.elapsed() >= THREAD_IDLE_EXIT {
                        r.threads -= 1;
                        return;
                    }
                    r.idle += 1;
                    r = match self.ready_cv.wait_timeout(r, Duration::from_millis(500)) {
                        Ok((g, _)) => g,
                        Err(e) => e.into_inner().0,
                    };
                    r.idle -= 1;
                }
            };
            match conn.drive(&self) {
                Outcome::Park => {
                    lock(&self.parked).push(conn);
                    self.wake();
                }
                Outcome::Close => drop(conn),
            }
        }
    }
}

impl Server {
    /// Bind to `addr` (use port 0 for an ephemeral port), with the default [`Limits`].
    pub fn bind(addr: &str, catalog: Arc<dyn Catalog>, config: ServerConfig) -> io::Result<Server> {
        Server::new(catalog, config).listen_tcp(addr)
    }

    /// A server listening nowhere yet (add [`Server::listen_tcp`] or
    /// [`Server::listen_unix`]), with the default [`Limits`] and no TLS.
    pub fn new(catalog: Arc<dyn Catalog>, config: ServerConfig) -> Server {
        Server { listeners: Vec::new(), catalog, config, limits: Limits::default(), tls: None }
    }

    /// Also listen on the TCP address `addr`.
    pub fn listen_tcp(mut self, addr: &str) -> io::Result<Server> {
        self.listeners.push(Listener::Tcp(TcpListener::bind(addr)?));
        Ok(self)
    }

    /// Also listen on a Unix socket at `path` (a stale socket file there is
    /// replaced; see the module docs).
    pub fn listen_unix(mut self, path: &Path, access: &SocketAccess) -> io::Result<Server> {
        self.listeners.push(Listener::Unix(bind_unix(path, access)?));
        Ok(self)
    }

    /// Offer or require TLS ([`TlsSetup`]; its mode `Off` means no TLS).
    pub fn with_tls(mut self, tls: TlsSetup) -> Server {
        self.tls = (tls.mode() != super::tls::TlsMode::Off).then(|| Arc::new(tls));
        self
    }

    /// Replace the limits.
    pub fn with_limits(mut self, limits: Limits) -> Server {
        self.limits = limits;
        self
    }

    /// The TCP address actually bound (the first one).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listeners
            .iter()
            .find_map(|l| match l {
                Listener::Tcp(t) => Some(t.local_addr()),
                Listener::Unix(_) => None,
            })
            .unwrap_or_else(|| Err(io::Error::new(io::ErrorKind::NotFound, "the server listens on no TCP address")))
    }

    /// The Unix socket path (the first one).
    pub fn unix_path(&self) -> Option<&Path> {
        self.listeners.iter().find_map(|l| match l {
            Listener::Unix(u) => Some(u.path.as_path()),
            Listener::Tcp(_) => None,
        })
    }

    /// Accept and serve connections until `stop` is set; then stop accepting, let
    /// connections finish their in-flight requests within the grace period, close
    /// them, and return once no request is running.
    pub fn serve(&self, stop: Arc<AtomicBool>) -> io::Result<()> {
        if self.listeners.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the server listens nowhere"));
        }
        for l in &self.listeners {
            l.set_nonblocking()?;
        }
        let (waker, wake_rx) = UnixStream::pair()?;
        waker.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = Vec::new();
        for _ in 0..self.config.workers {
            let rx = Arc::clone(&rx);
            pool.push(std::thread::Builder::new().name("nbd-blocking".into()).spawn(move || loop {
                let job = lock(&rx).recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => return,
                }
            })?);
        }
        let hub = Arc::new(Hub {
            limits: self.limits.clone(),
            ready: Mutex::new(Ready::default()),
            ready_cv: Condvar::new(),
            parked: Mutex::new(Vec::new()),
            waker,
            stopping: AtomicBool::new(false),
            forced: AtomicBool::new(false),
            blocking: Mutex::new(Some(tx)),
            has_blocking: self.config.workers > 0,
        });
        let r = self.reactor(&hub, &wake_rx, &stop);
        // Close what is left, let the connection threads see it, then the pool.
        hub.forced.store(true, Ordering::SeqCst);
        let handles = {
            let mut r = lock(&hub.ready);
            r.exit = true;
            r.queue.clear();
            std::mem::take(&mut r.handles)
        };
        hub.ready_cv.notify_all();
        for h in handles {
            let _ = h.join();
        }
        lock(&hub.parked).clear();
        lock(&hub.blocking).take();
        for h in pool {
            let _ = h.join();
        }
        r
    }

    fn reactor(&self, hub: &Arc<Hub>, wake_rx: &UnixStream, stop: &AtomicBool) -> io::Result<()> {
        let live = Arc::new(AtomicUsize::new(0));
        let refusing = Arc::new(AtomicUsize::new(0));
        let waker: Arc<dyn Fn() + Send + Sync> = {
            let w = hub.waker.try_clone()?;
            Arc::new(move || {
                let _ = (&w).write(&[1]);
            })
        };
        let mut parked: Vec<Conn> = Vec::new();
        let mut grace_end: Option<Instant> = None;
        // After a failed accept (out of file descriptors, say) the listener stays
        // readable: leave it out of the poll set for a moment instead of spinning.
        let mut accept_paused_until: Option<Instant> = None;
        loop {
            parked.append(&mut lock(&hub.parked));
            let now = Instant::now();
            if stop.load(Ordering::Relaxed) && grace_end.is_none() {
                grace_end = Some(now + self.limits.shutdown_grace);
                hub.stopping.store(true, Ordering::SeqCst);
            }
            if let Some(end) = grace_end {
                // Idle and handshaking connections close at once.
                parked.retain(|c| !c.in_handshake() && c.busy());
                if now >= end || (live.load(Ordering::SeqCst) == 0 && refusing.load(Ordering::SeqCst) == 0) {
                    return Ok(());
                }
            }
            parked.retain(|c| c.deadline().is_none_or(|d| now < d));
            let mut timeout = Duration::from_millis(100);
            for d in parked.iter().filter_map(|c| c.deadline()).chain(grace_end) {
                timeout = timeout.min(d.saturating_duration_since(now) + Duration::from_millis(1));
            }
            // Connections with input poll cannot see (buffered in TLS, say) go now.
            for k in (0..parked.len()).rev() {
                if parked[k].has_input() {
                    let c = parked.swap_remove(k);
                    hub.dispatch(c);
                }
            }
            let ready: Vec<bool> = {
                let mut fds = Vec::with_capacity(parked.len() + 1 + self.listeners.len());
                fds.push(PollFd::new(wake_rx.as_fd(), PollFlags::POLLIN));
                let accepting = grace_end.is_none() && accept_paused_until.is_none_or(|t| now >= t);
                if accepting {
                    for l in &self.listeners {
                        fds.push(PollFd::new(l.fd(), PollFlags::POLLIN));
                    }
                }
                for c in &parked {
                    let i = c.interest();
                    let mut f = PollFlags::empty();
                    if i.read || !i.write {
                        f |= PollFlags::POLLIN;
                    }
                    if i.write {
                        f |= PollFlags::POLLOUT;
                    }
                    fds.push(PollFd::new(c.fd(), f));
                }
                let ms = timeout.as_millis().min(u16::MAX as u128) as u16;
                if poll(&mut fds, PollTimeout::from(ms)).is_err() {
                    continue; // EINTR (a signal): look at `stop` again
                }
                fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect()
            };
            let mut i = 0;
            if ready[i] {
                let mut b = [0u8; 64];
                while matches!((&*wake_rx).read(&mut b), Ok(n) if n > 0) {}
            }
            i += 1;
            if grace_end.is_none() && accept_paused_until.is_none_or(|t| now >= t) {
                accept_paused_until = None;
                for l in &self.listeners {
                    if ready[i] && !self.accept_all(l, &live, &refusing, &waker, &mut parked) {
                        accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    }
                    i += 1;
                }
            }
            let first = i;
            let n = parked.len().min(ready.len() - first);
            for k in (0..n).rev() {
                if ready[first + k] {
                    let c = parked.swap_remove(k);
                    hub.dispatch(c);
                }
            }
        }
    }

    /// Accept every pending connection; false when accepting failed.
    fn accept_all(
        &self,
        listener: &Listener,
        live: &Arc<AtomicUsize>,
        refusing: &Arc<AtomicUsize>,
        waker: &Arc<dyn Fn() + Send + Sync>,
        parked: &mut Vec<Conn>,
    ) -> bool {
        loop {
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors, say: leave the rest in the backlog.
                    eprintln!("thinpool nbd: accept failed: {e}");
                    return false;
                }
            };
            let limit = self.limits.max_connections;
            let (counter, refuse) = if live.load(Ordering::SeqCst) < limit {
                (live, None)
            } else if refusing.load(Ordering::SeqCst) < limit.max(16) {
                let msg = format!("the server is at its limit of {limit} connections; try again later");
                (refusing, Some((wire::REP_ERR_POLICY, msg)))
            } else {
                continue; // dropped: closed at once
            };
            counter.fetch_add(1, Ordering::SeqCst);
            let conn = Conn::accept(
                stream,
                Arc::clone(&self.catalog),
                self.limits.clone(),
                self.config.read_only,
                refuse,
                Arc::clone(counter),
                Arc::clone(waker),
                self.tls.clone(),
            );
            parked.push(conn);
        }
    }
}

/// Read a request header; `None` at a clean end of input.
fn read_header<R: Read>(r: &mut R) -> io::Result<Option<[u8; wire::REQUEST_SIZE]>> {
    let mut b = [0u8; wire::REQUEST_SIZE];
    let mut got = 0;
    while got < b.len() {
        match r.read(&mut b[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated request")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Some(b))
}

/// Serve one client over any byte stream, one request at a time: the protocol
/// without threads (used by the fuzz target and tests). FLUSH and FUA run inline.
pub fn serve_connection<R: Read, W: Write + Send + 'static>(
    reader: &mut R,
    writer: Arc<Mutex<W>>,
    catalog: &dyn Catalog,
    config: &ServerConfig,
) -> io::Result<()> {
    let send = |out: &mut Vec<u8>| -> io::Result<()> {
        let mut w = lock(&writer);
        w.write_all(out)?;
        out.clear();
        w.flush()
    };
    let mut out = greeting().to_vec();
    send(&mut out)?;
    let mut flags = [0u8; 4];
    reader.read_exact(&mut flags)?;
    let mut neg =
        super::handshake::Negotiation::new(CatalogRef::Borrowed(catalog), config.read_only, u32::from_be_bytes(flags))?;
    let session = loop {
        let mut head = [0u8; 16];
        reader.read_exact(&mut head)?;
        match option_frame(&head)? {
            Frame::Skip(option, len) => {
                io::copy(&mut reader.take(len as u64), &mut io::sink())?;
                neg.too_big(option, &mut out);
            }
            Frame::Read(option, len) => {
                debug_assert!(len <= MAX_OPTION);
                let mut data = vec![0u8; len as usize];
                reader.read_exact(&mut data)?;
                match neg.handle(option, &data, &mut out)? {
                    super::handshake::Step::Next => {}
                    super::handshake::Step::Serve(s) => {
                        send(&mut out)?;
                        break s;
                    }
                    super::handshake::Step::Abort => return send(&mut out),
                    super::handshake::Step::StartTls => {
                        return Err(io::Error::other("STARTTLS needs the threaded server"));
                    }
                }
            }
        }
        send(&mut out)?;
    };
    loop {
        let Some(head) = read_header(reader)? else { return Ok(()) };
        let (req, payload_len) = frame(&head)?;
        if req.command == Command::Disc {
            return Ok(());
        }
        let mut payload = vec![0u8; payload_len];
        reader.read_exact(&mut payload)?;
        let mut reply = super::reply::ReplyBuf::new();
        execute(&session, &req, &payload, &mut reply);
        out.extend_from_slice(reply.as_slice());
        send(&mut out)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::mem::MemCatalog;
    use crate::nbd::wire;

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = wire::IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn a_scripted_session_over_a_byte_stream_gets_the_expected_replies() {
        let mut input = 3u32.to_be_bytes().to_vec();
        let mut go = 1u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"a");
        go.extend_from_slice(&0u16.to_be_bytes());
        input.extend(opt(wire::OPT_GO, &go));
        let w = wire::Request {
            flags: wire::CMD_FLAG_FUA,
            command: wire::Command::Write,
            cookie: 1,
            offset: 100,
            length: 4,
        };
        input.extend_from_slice(&wire::encode_request(&w));
        input.extend_from_slice(b"abcd");
        let r = wire::Request { flags: 0, command: wire::Command::Read, cookie: 2, offset: 98, length: 8 };
        input.extend_from_slice(&wire::encode_request(&r));
        let d = wire::Request { flags: 0, command: wire::Command::Disc, cookie: 3, offset: 0, length: 0 };
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
