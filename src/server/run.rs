//! Serving a pool: the NBD server, the periodic committer, the control socket and
//! signal handling, put together. `thinctl serve` calls [`run`].
//!
//! SIGINT and SIGTERM stop the server: it stops accepting, lets every connection
//! finish its in-flight requests, commits, and returns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::nbd::{Server, ServerConfig};
use crate::server::control::{self, Handler};
use crate::server::exports::{ExportedDevice, PoolCatalog};
use crate::server::protocol::{Request, Response};
use crate::server::service::Service;

/// How to serve.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to listen on, e.g. `127.0.0.1:10809`.
    pub listen: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Commit period for writes no client flushed (dm-thin: 1 s).
    pub commit_interval: Duration,
    /// Worker threads per connection.
    pub workers: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: "127.0.0.1:10809".into(),
            read_only: false,
            commit_interval: Duration::from_secs(1),
            workers: 4,
        }
    }
}

/// The exports to offer: devices and the name of the default export.
pub type DeviceList = Arc<dyn Fn() -> (Vec<ExportedDevice>, Option<String>) + Send + Sync>;

/// Serve until SIGINT/SIGTERM (or until `stop` is set). `devices` is asked for the
/// export list at start and after every control command; `control` is the socket
/// path and the command runner. `ready` is called with the bound address.
pub fn run(
    service: Arc<Service>,
    devices: DeviceList,
    opts: &Options,
    control: Option<(PathBuf, Handler)>,
    stop: Arc<AtomicBool>,
    ready: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    let (list, default) = devices();
    let catalog = PoolCatalog::new(Arc::clone(&service), list, default, opts.read_only);
    let config = ServerConfig { read_only: opts.read_only, workers: opts.workers };
    let server = Server::bind(&opts.listen, catalog.clone(), config)?;
    let committer = service.spawn_committer(opts.commit_interval, Arc::clone(&stop));
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
            Some(control::serve(path, wrapped, Arc::clone(&stop))?)
        }
        None => None,
    };
    ready(server.local_addr()?);
    let r = server.serve(Arc::clone(&stop));
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = control_thread {
        let _ = t.join();
    }
    let _ = committer.join();
    r
}
