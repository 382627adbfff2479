//! Serving a pool: the NBD server, the periodic committer, the control socket and
//! signal handling, put together. `thinctl serve` calls [`run`].
//!
//! SIGINT and SIGTERM stop the server: it stops accepting, closes idle and
//! handshaking connections, lets the others finish their in-flight requests within
//! [`Options::shutdown_grace`], closes what is left, commits, and returns; a stalled
//! client cannot hold it up (see [`crate::nbd::server`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::nbd::{Limits, Server, ServerConfig, SocketAccess, TlsSetup};
use crate::server::control::{self, Handler};
use crate::server::exports::{ExportedDevice, PoolCatalog};
use crate::server::protocol::{Request, Response};
use crate::server::service::Service;

/// How to serve.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to listen on, e.g. `127.0.0.1:10809` (when [`Options::tcp`]).
    pub listen: String,
    /// Listen on [`Options::listen`] (off: only on the Unix socket).
    pub tcp: bool,
    /// Also (or only) listen on a Unix socket at this path.
    pub socket: Option<PathBuf>,
    /// Mode and group of that socket.
    pub socket_access: SocketAccess,
    /// TLS offered or required (None: off).
    pub tls: Option<TlsSetup>,
    /// Refuse writes.
    pub read_only: bool,
    /// Commit period for writes no client flushed (dm-thin: 1 s).
    pub commit_interval: Duration,
    /// Threads of the blocking pool (shared by every connection) that runs FLUSH and
    /// FUA requests; other requests run on the connection's own thread.
    pub workers: usize,
    /// Connections served at once; more are refused (`NBD_REP_ERR_POLICY`).
    pub max_connections: usize,
    /// Time a client has from connecting to choosing an export.
    pub handshake_timeout: Duration,
    /// On shutdown, how long connections with requests in flight get.
    pub shutdown_grace: Duration,
    /// Threads driving connections that have work (idle connections hold none).
    pub max_threads: usize,
    /// Requests one connection may have queued for the blocking pool.
    pub max_requests_per_connection: usize,
    /// Unsent reply bytes plus queued payload bytes one connection may have; at
    /// the cap (or the request cap) the server stops reading that connection.
    pub max_bytes_per_connection: usize,
    /// Thresholds, the threshold command and data autoextend.
    pub health: crate::server::health::HealthPolicy,
    /// The control socket's handler of streaming requests (send, receive).
    pub streams: control::Streams,
}

impl Default for Options {
    fn default() -> Self {
        let l = Limits::default();
        Options {
            listen: "127.0.0.1:10809".into(),
            tcp: true,
            socket: None,
            socket_access: SocketAccess::default(),
            tls: None,
            read_only: false,
            commit_interval: Duration::from_secs(1),
            workers: 4,
            max_connections: l.max_connections,
            handshake_timeout: l.handshake_timeout,
            shutdown_grace: l.shutdown_grace,
            max_threads: l.max_threads,
            max_requests_per_connection: l.max_requests_per_connection,
            max_bytes_per_connection: l.max_bytes_per_connection,
            health: Default::default(),
            streams: Default::default(),
        }
    }
}

/// Where the server listens, once bound.
#[derive(Debug, Clone)]
pub struct Bound {
    /// The TCP address (None: TCP is off).
    pub tcp: Option<SocketAddr>,
    /// The Unix socket path.
    pub socket: Option<PathBuf>,
}

impl Bound {
    /// The Unix socket path, if any.
    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }
}

/// The exports to offer: devices and the name of the default export.
pub type DeviceList = Arc<dyn Fn() -> (Vec<ExportedDevice>, Option<String>) + Send + Sync>;

/// Serve until SIGINT/SIGTERM (or until `stop` is set). `devices` is asked for the
/// export list at start and after every control command; `control` is the socket
/// path and the command runner. `ready` is called with where the server listens.
pub fn run(
    service: Arc<Service>,
    devices: DeviceList,
    opts: &Options,
    control: Option<(PathBuf, Handler)>,
    stop: Arc<AtomicBool>,
    ready: impl FnOnce(&Bound),
) -> std::io::Result<()> {
    run_with_catalog(service, devices, opts, control, stop, ready, |_| {})
}

/// [`run`], also handing the export catalog to `catalog_ready` before serving, so that a
/// program that changes devices by other means than the control socket (the
/// containerd snapshotter) can refresh the exports with [`PoolCatalog::set_devices`].
pub fn run_with_catalog(
    service: Arc<Service>,
    devices: DeviceList,
    opts: &Options,
    control: Option<(PathBuf, Handler)>,
    stop: Arc<AtomicBool>,
    ready: impl FnOnce(&Bound),
    catalog_ready: impl FnOnce(Arc<PoolCatalog>),
) -> std::io::Result<()> {
    if !opts.tcp && opts.socket.is_none() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "nothing to listen on: give a TCP address or a Unix socket",
        ));
    }
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    let (list, default) = devices();
    let catalog = PoolCatalog::new(Arc::clone(&service), list, default, opts.read_only);
    catalog_ready(Arc::clone(&catalog));
    let config = ServerConfig { read_only: opts.read_only, workers: opts.workers };
    let limits = Limits {
        max_connections: opts.max_connections.max(1),
        max_threads: opts.max_threads.max(1),
        max_requests_per_connection: opts.max_requests_per_connection.max(1),
        max_bytes_per_connection: opts.max_bytes_per_connection.max(1),
        handshake_timeout: opts.handshake_timeout,
        shutdown_grace: opts.shutdown_grace,
    };
    let mut server = Server::new(catalog.clone(), config).with_limits(limits);
    if opts.tcp {
        server = server
            .listen_tcp(&opts.listen)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", opts.listen)))?;
    }
    if let Some(path) = &opts.socket {
        server = server.listen_unix(path, &opts.socket_access)?;
    }
    if let Some(tls) = &opts.tls {
        server = server.with_tls(tls.clone());
    }
    let committer = service.spawn_committer(opts.commit_interval, Arc::clone(&stop));
    // Always watching: `thinctl pool set` may set thresholds while the pool is served.
    let monitor = Some(crate::server::health::spawn_monitor(
        Arc::clone(&service),
        opts.health.clone(),
        Duration::from_millis(500),
        Arc::clone(&stop),
    ));
    let control_thread = match control {
        Some((path, handler)) => {
            let cat = Arc::clone(&catalog);
            let devs = Arc::clone(&devices);
            let wrapped: Handler = Arc::new(move |request: Request| -> Response {
                let r = handler(request);
                let (list, default) = devs();
                cat.set_devices(list, default);
                r
            });
            // A receive adds a device: refresh the exports after streaming requests too.
            let streams = match &opts.streams.0 {
                Some(s) => {
                    let (s, cat, devs) = (Arc::clone(s), Arc::clone(&catalog), Arc::clone(&devices));
                    let wrapped: control::StreamHandler = Arc::new(move |request, conn, stop| {
                        let r = s(request, conn, stop);
                        let (list, default) = devs();
                        cat.set_devices(list, default);
                        r
                    });
                    control::Streams(Some(wrapped))
                }
                None => control::Streams(None),
            };
            Some(control::serve_with_streams(path, wrapped, streams, Arc::clone(&stop))?)
        }
        None => None,
    };
    let bound = Bound {
        tcp: if opts.tcp { Some(server.local_addr()?) } else { None },
        socket: server.unix_path().map(Path::to_path_buf),
    };
    ready(&bound);
    let r = server.serve(Arc::clone(&stop));
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = control_thread {
        let _ = t.join();
    }
    let _ = committer.join();
    if let Some(m) = monitor {
        let _ = m.join();
    }
    r
}
