//! `thinctl serve`: serve a pool over NBD, and run the commands other `thinctl`s
//! send to its control socket (see `remote` for the client side).
//!
//! A command line received on the socket is parsed again with the same `cli` and
//! run here by [`handle`] on the pool the server holds (a later issue replaces the
//! re-parse with typed requests).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::Parser;
use thinpool::pool::Pool;
use thinpool::server::control::{Handler, Reply};
use thinpool::server::exports::ExportedDevice;
use thinpool::server::run::{self as serve, DeviceList};
use thinpool::server::service::Service;
use thinpool::volume::{Access, PoolChange, PoolDir};

use crate::cli::{as_change, Cli, Cmd};
use crate::error::{describe, msg, CliError, CliResult};
use crate::open::open_pool;
use crate::remote::CONTROL_SOCKET;
use crate::views::{ls_output, outcome_line, status_output};

/// Run a command line received on the control socket against the served pool.
pub fn handle(service: &Service, pd: &Mutex<PoolDir>, dir: &Path, read_only: bool, argv: Vec<String>) -> Reply {
    let cli = match Cli::try_parse_from(std::iter::once("thinctl".to_string()).chain(argv)) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let text = e.to_string();
            return if code == 0 {
                Reply { code, stdout: text, stderr: String::new() }
            } else {
                Reply { code, stdout: String::new(), stderr: text }
            };
        }
    };
    let mut pd = pd.lock().unwrap_or_else(PoisonError::into_inner);
    let result: CliResult<String> = match cli.cmd {
        Cmd::Ls { json, .. } => service.with_pool(|pool| ls_output(dir, &pd, pool, json)),
        Cmd::Status { json, .. } => service.with_pool(|pool| status_output(dir, &pd, pool, json, true)),
        cmd => match as_change(cmd) {
            Ok(Ok((_, change))) => {
                if read_only {
                    Err(msg(format!("pool {} is served read-only: it cannot be changed", dir.display())))
                } else {
                    apply(service, &mut pd, &change)
                }
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(msg(format!(
                "pool {} is busy: a server holds it; only create, snapshot, delete, discard, resize, ls and status go through its control socket (stop the server for the others)",
                dir.display()
            ))),
        },
    };
    match result {
        Ok(stdout) => Reply { code: 0, stdout, stderr: String::new() },
        Err(CliError::Exit(code)) => Reply { code, stdout: String::new(), stderr: String::new() },
        Err(e) => Reply { code: 1, stdout: String::new(), stderr: format!("error: {}\n", describe(&e)) },
    }
}

fn apply(service: &Service, pd: &mut PoolDir, change: &PoolChange) -> CliResult<String> {
    if let PoolChange::Delete { name } = change {
        let id = pd.device(name)?.id;
        let clients = service.attached(id);
        if clients > 0 {
            return Err(msg(format!(
                "device \"{name}\" is attached by {clients} NBD client(s); disconnect them before deleting it"
            )));
        }
    }
    service.with_pool(|pool: &mut Pool| {
        let outcome = pd.apply(pool, change)?;
        Ok(format!("{}\n", outcome_line(change, outcome, pool.block_bytes())))
    })
}

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
    /// Worker threads per connection.
    pub workers: usize,
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
    let ServeArgs { exports, listen, read_only, commit_interval_ms, workers, create_default } = args;
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
    let (pd, pool) = open_pool(dir, Access::Write)?;
    for name in &exports {
        pd.device(name).map_err(CliError::Dir)?;
    }
    let service = Service::new(pool);
    let pd = Arc::new(Mutex::new(pd));
    let devices: DeviceList = {
        let pd = Arc::clone(&pd);
        Arc::new(move || {
            let g = pd.lock().unwrap_or_else(PoisonError::into_inner);
            export_list(&g, &exports)
        })
    };
    let first = devices().1;
    let handler: Handler = {
        let (service, pd, dir) = (Arc::clone(&service), Arc::clone(&pd), dir.to_path_buf());
        Arc::new(move |argv| handle(&service, &pd, &dir, read_only, argv))
    };
    let opts = serve::Options {
        listen,
        read_only,
        commit_interval: Duration::from_millis(commit_interval_ms.max(1)),
        workers: workers.max(1),
        ..Default::default()
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
