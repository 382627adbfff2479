//! The snapshotter process: open (or create) the pool, serve its devices over NBD
//! and `thinctl`'s control socket on one thread, and containerd's gRPC API on the
//! Unix socket on a tokio runtime, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;

use thinpool::server::control::{Controller, Handler};
use thinpool::server::run::{self as nbd_run, DeviceList};
use thinpool::server::service::Service;
use thinpool::volume::{Access, CreateOptions, PoolDir};

use crate::attach::{AttachMode, Attacher};
use crate::store::Store;

/// Name of the control socket inside the pool directory (the one `thinctl` uses).
pub const CONTROL_SOCKET: &str = "control.sock";

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The pool directory; created (with `data_bytes` of data) when it does not exist.
    pub dir: PathBuf,
    /// containerd's socket: where the gRPC service listens.
    pub socket: PathBuf,
    /// NBD listen address (`127.0.0.1:0`: any free port).
    pub listen: String,
    /// How mounts are made.
    pub attach: AttachMode,
    /// Virtual size of the base file system, so of every snapshot.
    pub size: u64,
    /// Data size of a pool created here.
    pub data_bytes: u64,
    /// Periodic commit of writes no client flushed.
    pub commit_interval: Duration,
    /// Who attaches kernel devices: the privilege-separated helper
    /// ([`crate::privsep::Helper`]) when the snapshotter dropped root, else `None`
    /// (this process runs `nbd-client` itself).
    pub kernel: Option<Arc<dyn crate::attach::Kernel>>,
}

/// Why the snapshotter could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The pool could not be opened or created.
    #[error("{0}")]
    Dir(#[from] thinpool::volume::PoolDirError),
    /// A socket could not be set up, or serving failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Grpc(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// Where the snapshotter listens, once it does.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The gRPC socket.
    pub socket: PathBuf,
    /// The NBD server's address.
    pub nbd: SocketAddr,
    /// The control socket.
    pub control: PathBuf,
}

fn open_or_create(dir: &Path, data_bytes: u64) -> Result<(PoolDir, thinpool::pool::Pool, Vec<String>), ServeError> {
    if !dir.exists() {
        let opts = CreateOptions { data_bytes, ..Default::default() };
        let (pd, pool) = PoolDir::create(dir, &opts)?;
        return Ok((pd, pool, vec![format!("created pool {} ({data_bytes} bytes of data)", dir.display())]));
    }
    let mut pd = PoolDir::open(dir, Access::Write)?;
    let pool = pd.open_pool()?;
    let w = pd.take_warnings();
    Ok((pd, pool, w))
}

/// Bind the gRPC socket, replacing a stale socket file (one nobody answers on).
fn bind(socket: &Path) -> Result<std::os::unix::net::UnixListener, ServeError> {
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(ServeError::Io {
                what: format!("cannot listen on {}", socket.display()),
                source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "another process is listening on it"),
            });
        }
        std::fs::remove_file(socket).map_err(io_err(format!("cannot remove the stale socket {}", socket.display())))?;
    }
    let l = std::os::unix::net::UnixListener::bind(socket)
        .map_err(io_err(format!("cannot listen on {}", socket.display())))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("cannot set the mode of {}", socket.display())))?;
    l.set_nonblocking(true).map_err(io_err("cannot make the socket non-blocking"))?;
    Ok(l)
}

/// Run until SIGINT/SIGTERM (or `stop`); `ready` is called once every socket
/// listens; `warn` gets the pool's warnings.
pub fn run(
    opts: &Options,
    stop: Arc<AtomicBool>,
    warn: impl Fn(&str),
    ready: impl FnOnce(&Ready),
) -> Result<(), ServeError> {
    let (pd, pool, warnings) = open_or_create(&opts.dir, opts.data_bytes)?;
    for w in &warnings {
        warn(w);
    }
    for name in Store::leftovers(&pd) {
        warn(&format!("device \"{name}\" is a base file system whose formatting did not finish; Cleanup removes it"));
    }
    // The pool's lock is ours, so an earlier snapshotter of this pool is dead: the
    // devices it left attached point at a server that is gone.
    let attacher = Attacher::with_state(opts.attach, &opts.dir, opts.kernel.clone());
    let recovered = attacher.recover();
    for (dev, name) in &recovered.detached {
        warn(&format!("disconnected {dev}, which a snapshotter that died left attached to \"{name}\""));
    }
    for p in &recovered.problems {
        warn(p);
    }
    let service = Service::new(pool);
    let pd = Arc::new(Mutex::new(pd));
    let store = Arc::new(Store::new(Arc::clone(&service), Arc::clone(&pd), opts.size, attacher));
    let devices: DeviceList = {
        let pd = Arc::clone(&pd);
        Arc::new(move || Store::export_list(&pd.lock().unwrap_or_else(PoisonError::into_inner)))
    };
    let handler: Handler = Controller::new(Arc::clone(&service), Arc::clone(&pd), false).into_handler();
    let control = opts.dir.join(CONTROL_SOCKET);
    let nbd_opts = nbd_run::Options {
        listen: opts.listen.clone(),
        tcp: true,
        commit_interval: opts.commit_interval,
        ..Default::default()
    };
    let listener = bind(&opts.socket)?;
    let (tx, rx) = mpsc::channel::<SocketAddr>();
    let nbd_thread = {
        let (stop, store, control) = (Arc::clone(&stop), Arc::clone(&store), control.clone());
        std::thread::spawn(move || {
            let r = nbd_run::run_with_catalog(
                service,
                devices,
                &nbd_opts,
                Some((control, handler)),
                Arc::clone(&stop),
                |bound: &nbd_run::Bound| {
                    if let Some(addr) = bound.tcp {
                        let _ = tx.send(addr);
                    }
                },
                |catalog| store.set_catalog(catalog),
            );
            stop.store(true, Ordering::Relaxed);
            r
        })
    };
    let Ok(addr) = rx.recv() else {
        let _ = std::fs::remove_file(&opts.socket);
        return match nbd_thread.join() {
            Ok(Err(e)) => Err(ServeError::Io { what: format!("cannot serve NBD on {}", opts.listen), source: e }),
            _ => Err(ServeError::Grpc("the NBD server stopped before listening".into())),
        };
    };
    store.set_nbd_addr(addr);
    let result = serve_grpc(listener, Arc::clone(&store), Arc::clone(&stop), || {
        ready(&Ready { socket: opts.socket.clone(), nbd: addr, control: control.clone() })
    });
    stop.store(true, Ordering::Relaxed);
    store.detach_all();
    let _ = std::fs::remove_file(&opts.socket);
    let nbd = nbd_thread.join();
    result?;
    match nbd {
        Ok(r) => r.map_err(|e| ServeError::Io { what: "serving NBD failed".into(), source: e }),
        Err(_) => Err(ServeError::Grpc("the NBD server thread panicked".into())),
    }
}

fn serve_grpc(
    listener: std::os::unix::net::UnixListener,
    store: Arc<Store>,
    stop: Arc<AtomicBool>,
    ready: impl FnOnce(),
) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io_err("cannot start the async runtime"))?;
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener).map_err(io_err("cannot use the socket"))?;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let service = containerd_snapshots::server(Arc::new(crate::grpc::Service::new(store)));
        let shutdown = async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        ready();
        containerd_snapshots::tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| ServeError::Grpc(e.to_string()))
    })
}
