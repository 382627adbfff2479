//! The control socket of a running server (`DIR/control.sock`, mode 0600): the
//! transport of the typed protocol in [`protocol`](crate::server::protocol), the
//! client's [`call`], and the [`Controller`] that runs requests against the pool the
//! server holds.
//!
//! Each connection gets its own thread (at most [`MAX_CLIENTS`] at once; past that a
//! client is answered [`ErrorKind::Busy`]), so a slow or silent client never holds
//! up the others. A client must send its request line within [`REQUEST_TIMEOUT`];
//! a silent one is answered with an error and dropped, and on shutdown every
//! waiting connection is dropped at once. Requests themselves are serialised by the
//! controller's lock on the pool directory.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{MetaError, PoolError};
use crate::server::protocol::{
    decode_request, encode, ControlError, ErrorKind, Request, RequestLine, Response, ResponseLine, MAX_LINE,
    PROTOCOL_VERSION,
};
use crate::server::service::Service;
use crate::server::usage;
use crate::volume::{PoolChange, PoolDir, PoolDirError};

/// Control connections served at once.
pub const MAX_CLIENTS: usize = 16;

/// How long a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a waiting connection looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// Longest reply a client accepts (listings of many devices are long).
const MAX_REPLY: u64 = 256 << 20;

/// Runs requests for the control socket.
pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// Runs streaming requests (send, receive: see [`protocol`](crate::server::protocol)),
/// which use the connection after the request line: the handler writes its own
/// replies. The flag is the server's stop flag.
pub type StreamHandler = Arc<dyn Fn(Request, &UnixStream, &AtomicBool) -> io::Result<()> + Send + Sync>;

/// An optional [`StreamHandler`] (a server without one answers streaming requests
/// with an error).
#[derive(Clone, Default)]
pub struct Streams(pub Option<StreamHandler>);

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Streams(Some)" } else { "Streams(None)" })
    }
}

/// Why [`call`] got no response.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody listens on the socket (no server, or a socket file left by a crash).
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    /// The exchange failed after connecting.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server's answer is not a response.
    #[error("bad reply from the server: {0}")]
    BadReply(String),
}

/// Send `request` to the server listening on `sock` and wait for its response.
pub fn call(sock: &Path, request: &Request) -> Result<Response, CallError> {
    let s = UnixStream::connect(sock).map_err(CallError::Connect)?;
    (&s).write_all(encode(&RequestLine { version: PROTOCOL_VERSION, request: request.clone() }).as_bytes())?;
    let mut reply = String::new();
    BufReader::new((&s).take(MAX_REPLY)).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(CallError::BadReply("the server closed the connection without answering".into()));
    }
    serde_json::from_str::<ResponseLine>(&reply).map(|r| r.response).map_err(|e| CallError::BadReply(e.to_string()))
}

/// Listen on `sock` (replacing a stale socket file) until `stop` is set.
pub fn serve(sock: PathBuf, handler: Handler, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
    serve_with_streams(sock, handler, Streams::default(), stop)
}

/// [`serve`], with a handler for streaming requests.
pub fn serve_with_streams(
    sock: PathBuf,
    handler: Handler,
    streams: Streams,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    if sock.exists() {
        // A live server would answer; a stale socket file is left by a crash.
        if UnixStream::connect(&sock).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running server", sock.display()),
            ));
        }
        std::fs::remove_file(&sock)?;
    }
    let listener = UnixListener::bind(&sock)?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        let active = Arc::new(AtomicUsize::new(0));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    threads.retain(|t| !t.is_finished());
                    if active.load(Ordering::SeqCst) >= MAX_CLIENTS {
                        let busy = ControlError::new(
                            ErrorKind::Busy,
                            format!("the server is answering {MAX_CLIENTS} control clients already; try again"),
                        );
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_write_timeout(Some(POLL));
                        let _ = reply(&conn, Response::Error { error: busy });
                        continue;
                    }
                    active.fetch_add(1, Ordering::SeqCst);
                    let (handler, stop, active) = (Arc::clone(&handler), Arc::clone(&stop), Arc::clone(&active));
                    let streams = streams.clone();
                    threads.push(std::thread::spawn(move || {
                        if let Err(e) = answer(&conn, &handler, &streams, &stop) {
                            eprintln!("thinpool control: {e}");
                        }
                        active.fetch_sub(1, Ordering::SeqCst);
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    eprintln!("thinpool control: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let _ = std::fs::remove_file(&sock);
        // Waiting connections see the stop flag within POLL; running requests finish.
        for t in threads {
            let _ = t.join();
        }
    }))
}

fn reply(conn: &UnixStream, response: Response) -> io::Result<()> {
    let mut w = conn;
    w.write_all(encode(&ResponseLine { version: PROTOCOL_VERSION, response }).as_bytes())
}

/// Read one request line: `Ok(None)` when the client stopped talking (timeout,
/// shutdown). A line over [`MAX_LINE`] is read to its end (or the timeout) and
/// returned whole so that it is refused with an answer.
fn read_request(conn: &UnixStream, stop: &AtomicBool) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match (&*conn).read(&mut chunk) {
            Ok(0) => return Ok(Some(line)),
            Ok(n) => {
                let part = &chunk[..n];
                if let Some(end) = part.iter().position(|&b| b == b'\n') {
                    if line.len() <= MAX_LINE {
                        line.extend_from_slice(&part[..end]);
                    }
                    return Ok(Some(line));
                }
                // Past the limit, keep only enough to know it is too long.
                if line.len() <= MAX_LINE {
                    line.extend_from_slice(part);
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                if Instant::now() >= deadline {
                    return Ok(if line.len() > MAX_LINE { Some(line) } else { None });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn answer(conn: &UnixStream, handler: &Handler, streams: &Streams, stop: &AtomicBool) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(POLL))?;
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let Some(line) = read_request(conn, stop)? else {
        let silent =
            ControlError::new(ErrorKind::BadRequest, format!("no request line within {}s", REQUEST_TIMEOUT.as_secs()));
        // The client may not be reading either: its loss.
        let _ = reply(conn, Response::Error { error: silent });
        return Ok(());
    };
    if line.is_empty() {
        // Connected and closed (a liveness probe): answer if it still listens.
        let empty = ControlError::new(ErrorKind::BadRequest, "empty control request");
        let _ = reply(conn, Response::Error { error: empty });
        return Ok(());
    }
    let response = match decode_request(&line) {
        Err(error) => Response::Error { error },
        Ok(request) if request.is_streaming() => match &streams.0 {
            Some(s) => {
                let s = Arc::clone(s);
                return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s(request, conn, stop)))
                    .unwrap_or_else(|_| {
                        let error = ControlError::new(ErrorKind::Failed, "internal error: the stream handler panicked");
                        reply(conn, Response::Error { error })
                    });
            }
            None => Response::Error {
                error: ControlError::new(ErrorKind::BadRequest, "this server does not stream (send, receive)"),
            },
        },
        Ok(request) => {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(request))).unwrap_or_else(|_| {
                Response::Error {
                    error: ControlError::new(ErrorKind::Failed, "internal error: the request handler panicked"),
                }
            })
        }
    };
    reply(conn, response)
}

/// The kind an engine error is reported as (over the control socket, and by
/// `thinctl --json` for a pool it opened itself).
pub fn pool_error_kind(e: &PoolError) -> ErrorKind {
    match e {
        PoolError::NoSuchDevice(_) => ErrorKind::NoSuchDevice,
        PoolError::ReadOnly => ErrorKind::ReadOnly,
        PoolError::NoSpace { .. } => ErrorKind::NoSpace,
        PoolError::Meta(MetaError::Corrupt { .. }) => ErrorKind::Corrupt,
        _ => ErrorKind::Failed,
    }
}

/// The kind a pool directory error is reported as (see [`pool_error_kind`]).
pub fn dir_error_kind(e: &PoolDirError) -> ErrorKind {
    match e {
        PoolDirError::NoSuchDevice { .. } => ErrorKind::NoSuchDevice,
        PoolDirError::ReadOnly { .. } => ErrorKind::ReadOnly,
        PoolDirError::Pool(p) => pool_error_kind(p),
        _ => ErrorKind::Failed,
    }
}

impl From<PoolDirError> for ControlError {
    fn from(e: PoolDirError) -> Self {
        ControlError::new(dir_error_kind(&e), e.to_string())
    }
}

impl From<PoolError> for ControlError {
    fn from(e: PoolError) -> Self {
        PoolDirError::Pool(e).into()
    }
}

/// Runs typed requests against the pool a server holds: its [`PoolDir`] (names and
/// sizes) and its [`Service`] (the engine shared with the NBD exports).
///
/// - Changes run as [`PoolDir::apply`] inside [`Service::with_pool`], with the
///   pool directory locked, exactly as `thinctl` applies them to a pool it opened.
/// - A delete is one step: [`Service::delete`] refuses an attached device and
///   deletes under one lock, so no client can attach between the check and the
///   delete ([`PoolDir::delete_with`] then forgets the name).
/// - `ls` walks the mappings in slices ([`usage::listing_served`]) without holding
///   the pool directory or the pool for the walk.
pub struct Controller {
    service: Arc<Service>,
    pd: Arc<Mutex<PoolDir>>,
    read_only: bool,
    /// The health settings the server runs with (status reports them; a `SetHealth`
    /// change updates them); without them status reports `pool.toml`'s.
    health: Option<Arc<crate::server::health::LiveSettings>>,
    /// Local block devices (ublk), when the server attaches them.
    local: Option<Arc<dyn crate::server::local::LocalDevices>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("read_only", &self.read_only).finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller for `service` and `pd`; `read_only` refuses every change.
    pub fn new(service: Arc<Service>, pd: Arc<Mutex<PoolDir>>, read_only: bool) -> Controller {
        Controller { service, pd, read_only, health: None, local: None }
    }

    /// Report and change these live health settings (thresholds, autoextend,
    /// no-space policy) rather than only `pool.toml`'s.
    pub fn with_health(mut self, settings: Arc<crate::server::health::LiveSettings>) -> Controller {
        self.health = Some(settings);
        self
    }

    /// Answer `attach`, `detach` and `local_devices` with these local devices.
    pub fn with_local_devices(mut self, local: Arc<dyn crate::server::local::LocalDevices>) -> Controller {
        self.local = Some(local);
        self
    }

    /// This controller as a socket [`Handler`].
    pub fn into_handler(self) -> Handler {
        Arc::new(move |request| self.handle(request))
    }

    fn dir(&self) -> MutexGuard<'_, PoolDir> {
        // PoolDir saves pool.toml atomically: a panic leaves the old or the new file.
        self.pd.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Run one request.
    pub fn handle(&self, request: Request) -> Response {
        let r = match request {
            Request::Ls => usage::listing_served(&self.service, &self.pd)
                .map(|listing| Response::Listing { listing })
                .map_err(ControlError::from),
            Request::Status => {
                let pd = self.dir();
                let health = self.health.as_ref().map_or(pd.config().options.health, |h| h.get());
                let status = self.service.with_pool(|pool| usage::status_with(&pd, pool, &health, self.read_only));
                Ok(Response::Status { status })
            }
            Request::Change { change } => self.change(&change),
            Request::Send { .. } | Request::Receive { .. } => Err(ControlError::new(
                ErrorKind::BadRequest,
                "send and receive stream on the connection: they go to the stream handler",
            )),
            Request::Diff { from, to, include_same } => {
                crate::server::diff::diff_served(&self.service, &self.pd, &from, &to, include_same)
                    .map(|diff| Response::Diff { diff })
                    .map_err(ControlError::from)
            }
            Request::Rollback { device, snapshot } => {
                crate::server::rollback::rollback_served(&self.service, &self.pd, self.read_only, &device, &snapshot)
                    .map(|outcome| Response::RolledBack { outcome, block_bytes: self.service.block_bytes() })
            }
            Request::Attach { name, read_only } => self
                .local()
                // A pool served read-only attaches read-only.
                .and_then(|l| l.attach(&name, read_only || self.read_only))
                .map(|device| Response::Attached { device }),
            Request::Detach { name } => {
                self.local().and_then(|l| l.detach(&name)).map(|device| Response::Detached { device })
            }
            Request::LocalDevices => {
                Ok(Response::LocalDevices { devices: self.local.as_ref().map(|l| l.list()).unwrap_or_default() })
            }
        };
        r.unwrap_or_else(|error| Response::Error { error })
    }

    fn local(&self) -> Result<&dyn crate::server::local::LocalDevices, ControlError> {
        self.local.as_deref().ok_or_else(|| {
            ControlError::new(ErrorKind::Failed, "this server does not attach local block devices (ublk)")
        })
    }

    fn change(&self, change: &PoolChange) -> Result<Response, ControlError> {
        let mut pd = self.dir();
        if self.read_only {
            return Err(ControlError::new(
                ErrorKind::ReadOnly,
                format!("pool {} is served read-only: it cannot be changed", pd.dir().display()),
            ));
        }
        let outcome = match change {
            PoolChange::Delete { name } => {
                let id = pd.delete_with(name, |id| {
                    let local = self.local.as_ref().and_then(|l| l.list().into_iter().find(|d| d.name == *name));
                    self.service.delete(id).map_err(|e| match self.service.attached(id) {
                        0 => ControlError::from(e),
                        _ if local.is_some() => {
                            let (path, kind) = local.as_ref().map_or(("", ""), |d| (d.path.as_str(), d.kind.as_str()));
                            ControlError::new(
                                ErrorKind::Attached,
                                format!(
                                    "device \"{name}\" is attached as {path} ({kind}); detach it (thinctl detach) before deleting it"
                                ),
                            )
                        }
                        n => ControlError::new(
                            ErrorKind::Attached,
                            format!(
                                "device \"{name}\" is attached by {n} NBD client(s); disconnect them before deleting it"
                            ),
                        ),
                    })
                })?;
                crate::volume::ChangeOutcome::Deleted { id }
            }
            PoolChange::Discard { name, offset, length } => {
                // In windows, I/O flowing in between (see Service::discard), then
                // one commit.
                let (id, start, len) = pd.discard_range(name, *offset, *length)?;
                let blocks = self.service.discard(id, start, len)?;
                self.service.flush()?;
                crate::volume::ChangeOutcome::Discarded { blocks }
            }
            other => self.service.with_pool(|pool| pd.apply(pool, other))?,
        };
        if let (PoolChange::SetHealth { change }, Some(live)) = (change, &self.health) {
            // Saved in pool.toml above; in force from now on, over the serve flags.
            live.apply(change, &self.service).map_err(|e| ControlError::new(ErrorKind::Failed, e))?;
        }
        Ok(Response::Changed { outcome, block_bytes: self.service.block_bytes() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::protocol::Listing;

    fn start(handler: Handler) -> (tempfile::TempDir, PathBuf, Arc<AtomicBool>, JoinHandle<()>) {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("control.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let t = serve(sock.clone(), handler, Arc::clone(&stop)).expect("serve");
        (dir, sock, stop, t)
    }

    fn listing(n: usize) -> Response {
        Response::Listing { listing: Listing { block_bytes: n as u64, devices: Vec::new() } }
    }

    /// Send raw bytes, half-close, and read the one reply line.
    fn raw(sock: &Path, bytes: &[u8]) -> ResponseLine {
        let s = UnixStream::connect(sock).expect("connect");
        let mut w = &s;
        let _ = w.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn kind(r: &ResponseLine) -> ErrorKind {
        match &r.response {
            Response::Error { error } => error.kind,
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn a_typed_request_sent_over_the_socket_is_answered() {
        let handler: Handler = Arc::new(|r: Request| match r {
            Request::Ls => listing(7),
            _ => Response::Error { error: ControlError::new(ErrorKind::Failed, "no") },
        });
        let (_dir, sock, stop, t) = start(handler);
        let mode = std::fs::metadata(&sock).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(call(&sock, &Request::Ls).expect("call"), listing(7));
        // A second server on the same socket is refused while the first runs.
        assert!(serve(sock.clone(), Arc::new(|_| listing(0)), Arc::new(AtomicBool::new(false))).is_err());
        stop.store(true, Ordering::Relaxed);
        t.join().expect("join");
        assert!(!sock.exists());
    }

    #[test]
    fn malformed_unknown_and_oversized_requests_get_errors_and_the_server_keeps_serving() {
        let (_dir, sock, stop, t) = start(Arc::new(|_| listing(1)));
        assert_eq!(kind(&raw(&sock, b"not json\n")), ErrorKind::BadRequest);
        assert_eq!(kind(&raw(&sock, b"")), ErrorKind::BadRequest);
        assert_eq!(kind(&raw(&sock, b"{\"argv\": [\"ls\"]}\n")), ErrorKind::BadRequest);
        assert_eq!(kind(&raw(&sock, b"{\"version\":1,\"request\":{\"op\":\"rm_rf\"}}\n")), ErrorKind::BadRequest);
        assert_eq!(kind(&raw(&sock, b"{\"version\":7,\"request\":{\"op\":\"ls\"}}\n")), ErrorKind::UnsupportedVersion);
        let mut big = vec![b'x'; 4 * MAX_LINE];
        big.push(b'\n');
        assert_eq!(kind(&raw(&sock, &big)), ErrorKind::BadRequest);
        // Without a newline, up to the end of the stream.
        assert_eq!(kind(&raw(&sock, &vec![b' '; 2 * MAX_LINE])), ErrorKind::BadRequest);
        assert_eq!(raw(&sock, b"{\"version\":1,\"request\":{\"op\":\"ls\"}}").response, listing(1));
        assert_eq!(call(&sock, &Request::Ls).expect("still serving"), listing(1));
        stop.store(true, Ordering::Relaxed);
        t.join().expect("join");
    }

    #[test]
    fn a_panicking_handler_answers_an_error() {
        let (_dir, sock, stop, t) = start(Arc::new(|_| panic!("boom")));
        match call(&sock, &Request::Status).expect("answered") {
            Response::Error { error } => assert_eq!(error.kind, ErrorKind::Failed),
            other => panic!("{other:?}"),
        }
        stop.store(true, Ordering::Relaxed);
        t.join().expect("join");
    }

    #[test]
    fn a_silent_client_blocks_neither_other_clients_nor_shutdown() {
        let (_dir, sock, stop, t) = start(Arc::new(|_| listing(2)));
        let silent: Vec<UnixStream> = (0..3).map(|_| UnixStream::connect(&sock).expect("connect")).collect();
        let begin = Instant::now();
        for _ in 0..5 {
            assert_eq!(call(&sock, &Request::Ls).expect("call"), listing(2));
        }
        assert!(begin.elapsed() < Duration::from_secs(2), "others were held up: {:?}", begin.elapsed());
        // A silent client is answered and dropped after the timeout.
        let mut line = String::new();
        BufReader::new(&silent[0]).read_line(&mut line).expect("read");
        let r: ResponseLine = serde_json::from_str(&line).expect("reply");
        assert_eq!(kind(&r), ErrorKind::BadRequest);
        // Shutdown does not wait for silent clients.
        let more: Vec<UnixStream> = (0..3).map(|_| UnixStream::connect(&sock).expect("connect")).collect();
        std::thread::sleep(Duration::from_millis(100));
        let begin = Instant::now();
        stop.store(true, Ordering::Relaxed);
        t.join().expect("join");
        assert!(begin.elapsed() < Duration::from_secs(2), "shutdown waited for silent clients: {:?}", begin.elapsed());
        drop((silent, more));
    }

    #[test]
    fn too_many_clients_at_once_get_busy() {
        let (_dir, sock, stop, t) = start(Arc::new(|_| listing(3)));
        let silent: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| UnixStream::connect(&sock).expect("connect")).collect();
        std::thread::sleep(Duration::from_millis(200));
        match call(&sock, &Request::Ls).expect("answered") {
            Response::Error { error } => assert_eq!(error.kind, ErrorKind::Busy),
            other => panic!("{other:?}"),
        }
        drop(silent);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(call(&sock, &Request::Ls).expect("call"), listing(3));
        stop.store(true, Ordering::Relaxed);
        t.join().expect("join");
    }

    #[test]
    fn the_controller_refuses_to_delete_an_attached_device_in_the_same_step_as_the_delete() {
        use crate::volume::{ChangeOutcome, CreateOptions};
        let tmp = tempfile::tempdir().expect("tmp");
        let (mut pd, mut pool) =
            PoolDir::create(&tmp.path().join("p"), &CreateOptions { data_bytes: 16 << 20, ..Default::default() })
                .expect("create");
        pd.create_device(&mut pool, "web", 1 << 20, None).expect("web");
        let service = Service::new(pool);
        let pd = Arc::new(Mutex::new(pd));
        let c = Controller::new(Arc::clone(&service), Arc::clone(&pd), false);
        let delete = || c.handle(Request::Change { change: PoolChange::Delete { name: "web".into() } });
        service.attach(0);
        match delete() {
            Response::Error { error } => {
                assert_eq!(error.kind, ErrorKind::Attached);
                assert!(error.message.contains("attached by 1 NBD client"), "{}", error.message);
            }
            other => panic!("{other:?}"),
        }
        assert!(pd.lock().expect("pd").device("web").is_ok(), "the name stays");
        assert!(service.with_pool(|p| p.meta().has_device(0)), "the device stays");
        service.detach(0);
        assert_eq!(
            delete(),
            Response::Changed { outcome: ChangeOutcome::Deleted { id: 0 }, block_bytes: service.block_bytes() }
        );
        assert!(pd.lock().expect("pd").device("web").is_err());
        match delete() {
            Response::Error { error } => assert_eq!(error.kind, ErrorKind::NoSuchDevice),
            other => panic!("{other:?}"),
        }
        let ro = Controller::new(Arc::clone(&service), pd, true);
        match ro.handle(Request::Change { change: PoolChange::Create { name: "x".into(), size_bytes: 4096, id: None } })
        {
            Response::Error { error } => assert_eq!(error.kind, ErrorKind::ReadOnly),
            other => panic!("{other:?}"),
        }
        assert!(matches!(ro.handle(Request::Status), Response::Status { .. }));
        assert!(matches!(ro.handle(Request::Ls), Response::Listing { listing } if listing.devices.is_empty()));
    }
}
