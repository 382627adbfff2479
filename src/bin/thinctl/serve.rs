//! `thinctl serve`: serve a pool over NBD, with the control socket that other
//! `thinctl`s send typed requests to (see `remote` for the client side). The
//! requests are run by `thinpool::server::control::Controller` on the pool held here.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use thinpool::server::control::{Controller, Handler};
use thinpool::server::exports::ExportedDevice;
use thinpool::server::run::{self as serve, DeviceList};
use thinpool::server::service::{NoSpacePolicy, Service};
use thinpool::volume::{Access, PoolDir};

use crate::cli::{NoSpaceMode, ServeTuning};
use crate::error::{msg, CliError, CliResult};
use crate::open::open_pool;
use crate::remote::CONTROL_SOCKET;

/// Options of `thinctl serve`.
#[derive(Debug, Clone)]
pub struct ServeArgs {
    /// Devices to export (empty: all).
    pub exports: Vec<String>,
    /// Listen address.
    pub listen: String,
    /// Refuse writes and changes.
    pub read_only: bool,
    /// Periodic commit, in milliseconds.
    pub commit_interval_ms: u64,
    /// Limits and policies.
    pub tuning: ServeTuning,
    /// Create the default pool (8 GiB data, device thin0 of 1 GiB) when DIR is missing.
    pub create_default: bool,
}

/// Data size of the pool `thinctl serve` creates when run with no pool.
pub const DEFAULT_SERVE_DATA_BYTES: u64 = 8 << 30;
/// Size of its one device, `thin0`.
pub const DEFAULT_SERVE_DEVICE_BYTES: u64 = 1 << 30;

/// The exported devices, and the default export: the first-created device (by
/// creation time, then id) among them.
fn export_list(pd: &PoolDir, only: &[String]) -> (Vec<ExportedDevice>, Option<String>) {
    let list: Vec<ExportedDevice> = pd
        .devices()
        .filter(|(n, _)| only.is_empty() || only.iter().any(|o| o == n))
        .map(|(n, e)| ExportedDevice { name: n.to_string(), id: e.id, size: e.size_bytes })
        .collect();
    let first = pd
        .devices()
        .filter(|(n, _)| list.iter().any(|d| d.name == *n))
        .min_by_key(|(_, e)| (e.created.unwrap_or(u64::MAX), e.id))
        .map(|(n, _)| n.to_string());
    (list, first)
}

/// `thinctl serve`: serve every device of the pool over NBD (export name = device
/// name) until SIGINT or SIGTERM, with the control socket at `DIR/control.sock`.
pub fn serve(dir: &Path, args: ServeArgs) -> CliResult {
    let ServeArgs { exports, listen, read_only, commit_interval_ms, tuning, create_default } = args;
    if create_default && !dir.exists() {
        let opts = thinpool::volume::CreateOptions { data_bytes: DEFAULT_SERVE_DATA_BYTES, ..Default::default() };
        let (mut pd, mut pool) = PoolDir::create(dir, &opts).map_err(CliError::Dir)?;
        pd.create_device(&mut pool, "thin0", DEFAULT_SERVE_DEVICE_BYTES, None).map_err(CliError::Dir)?;
        use std::io::Write;
        let _ = writeln!(
            std::io::stdout(),
            "created pool {}: 8 GiB sparse data file, device thin0 of 1 GiB",
            dir.display()
        );
    }
    let (pd, mut pool) = open_pool(dir, Access::Write)?;
    for name in &exports {
        pd.device(name).map_err(CliError::Dir)?;
    }
    pool.set_metadata_max_bytes(tuning.metadata_max);
    let service = Service::new(pool);
    service.set_no_space_policy(match tuning.no_space {
        NoSpaceMode::Error => NoSpacePolicy::Error,
        NoSpaceMode::Queue => NoSpacePolicy::Queue(Duration::from_secs(tuning.no_space_timeout)),
    });
    let pd = Arc::new(Mutex::new(pd));
    let devices: DeviceList = {
        let pd = Arc::clone(&pd);
        Arc::new(move || {
            let g = pd.lock().unwrap_or_else(PoisonError::into_inner);
            export_list(&g, &exports)
        })
    };
    let first = devices().1;
    let handler: Handler = Controller::new(Arc::clone(&service), Arc::clone(&pd), read_only).into_handler();
    let opts = serve::Options {
        listen,
        read_only,
        commit_interval: Duration::from_millis(commit_interval_ms.max(1)),
        workers: tuning.workers.max(1),
        max_connections: tuning.max_connections.max(1),
        handshake_timeout: Duration::from_millis(tuning.handshake_timeout_ms.max(1)),
        shutdown_grace: Duration::from_millis(tuning.shutdown_grace_ms),
        max_threads: tuning.max_threads.max(1),
        max_requests_per_connection: tuning.max_requests_per_connection.max(1),
        max_bytes_per_connection: usize::try_from(tuning.max_bytes_per_connection).unwrap_or(usize::MAX).max(1 << 20),
        health: thinpool::server::health::HealthPolicy {
            pool_dir: dir.to_path_buf(),
            data_threshold: tuning.data_threshold,
            metadata_threshold: tuning.metadata_threshold,
            on_threshold: tuning.on_threshold.clone(),
            autoextend_percent: tuning.autoextend_percent,
            autoextend_max: tuning.autoextend_max,
        },
        streams: thinpool::server::replicate::stream_handler(Arc::clone(&service), Arc::clone(&pd), read_only),
    };
    let sock: PathBuf = dir.join(CONTROL_SOCKET);
    let stop = Arc::new(AtomicBool::new(false));
    serve::run(service, devices, &opts, Some((sock.clone(), handler)), stop, |addr| {
        // Whoever started the server may have stopped reading its output: never let a
        // closed stdout take the server down.
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(
            out,
            "serving pool {} on nbd://{addr}/NAME{}; control socket {}",
            dir.display(),
            if read_only { " (read-only)" } else { "" },
            sock.display()
        );
        if let Some(name) = first {
            let _ = writeln!(out, "attach with:  nbd-client {} {} /dev/nbd0 -N {name}", addr.ip(), addr.port());
            let _ = writeln!(out, "          or  nbdinfo nbd://{addr}/{name}");
        }
        let _ = out.flush();
    })
    .map_err(|e| msg(format!("cannot serve pool {}: {e}", dir.display())))
}
