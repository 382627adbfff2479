//! `thinctl serve`: serve a pool over NBD, with the control socket that other
//! `thinctl`s send typed requests to (see `remote` for the client side). The
//! requests are run by `thinpool::server::control::Controller` on the pool held here.
//! It listens on TCP, a Unix socket (`--socket`) or both, with TLS off, offered or
//! required (`--tls`).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use thinpool::nbd::{SocketAccess, TlsMode, TlsSetup};
use thinpool::server::control::{Controller, Handler};
use thinpool::server::exports::ExportedDevice;
use thinpool::server::health::{self, LiveSettings};
use thinpool::server::run::{self as serve, DeviceList};
use thinpool::server::service::Service;
use thinpool::volume::{Access, HealthOptions, PoolDir, MAX_NO_SPACE_TIMEOUT_S};

use crate::cli::ServeTuning;
use crate::error::{msg, CliError, CliResult};
use crate::open::open_pool;
use crate::remote::CONTROL_SOCKET;

/// Options of `thinctl serve`.
#[derive(Debug, Clone)]
pub struct ServeArgs {
    /// Devices to export (empty: all).
    pub exports: Vec<String>,
    /// TCP listen address (None: the default, unless a Unix socket is given).
    pub listen: Option<String>,
    /// Refuse writes and changes.
    pub read_only: bool,
    /// Periodic commit, in milliseconds.
    pub commit_interval_ms: u64,
    /// Limits and policies.
    pub tuning: ServeTuning,
    /// Create the default pool (8 GiB data, device thin0 of 1 GiB) when DIR is missing.
    pub create_default: bool,
    /// Unix socket and TLS.
    pub access: ServeAccess,
}

/// The default TCP address of `thinctl serve`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// Whether clients use TLS (`--tls`, as nbdkit's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsArg {
    /// No TLS (STARTTLS is refused).
    Off,
    /// Offered: clients that send STARTTLS get TLS, others plain text.
    On,
    /// Required: before STARTTLS every option is refused (NBD_REP_ERR_TLS_REQD).
    Require,
}

/// `thinctl serve`'s Unix socket and TLS options.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeAccess {
    /// Listen on a Unix socket at PATH (mode 0600): only there, unless --listen is
    /// also given. A stale socket file is replaced; the file is removed on exit.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Make the Unix socket mode 0660, owned by this group (name or number).
    #[arg(long, value_name = "GROUP", requires = "socket")]
    pub socket_group: Option<String>,
    /// TLS: off, on (offered) or require (no option but STARTTLS before TLS).
    #[arg(long, value_enum, default_value_t = TlsArg::Off)]
    pub tls: TlsArg,
    /// Directory with server-cert.pem, server-key.pem and ca-cert.pem (nbdkit's
    /// and qemu's layout); needed with --tls on|require.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Require client certificates signed by DIR/ca-cert.pem.
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// Also attach device NAME as a local block device over ublk (/dev/ublkbN;
    /// repeatable). Needs a kernel with CONFIG_BLK_DEV_UBLK (module ublk_drv).
    /// `thinctl attach`/`detach` add and remove more while serving.
    #[arg(long = "ublk", value_name = "NAME")]
    pub ublk: Vec<String>,
}

/// A group name or number to a group id.
fn group_id(group: &str) -> CliResult<u32> {
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => group.parse::<u32>().map_err(|_| msg(format!("--socket-group: no group named {group:?}"))),
        Err(e) => Err(msg(format!("--socket-group {group:?}: cannot look the group up: {e}"))),
    }
}

/// Check the TLS options and read the certificates.
fn tls_setup(a: &ServeAccess) -> CliResult<Option<TlsSetup>> {
    let mode = match a.tls {
        TlsArg::Off => TlsMode::Off,
        TlsArg::On => TlsMode::On,
        TlsArg::Require => TlsMode::Require,
    };
    match (&a.tls_certificates, mode) {
        (None, TlsMode::Off) if a.tls_verify_peer => Err(msg("--tls-verify-peer needs --tls on|require")),
        (None, TlsMode::Off) => Ok(None),
        (Some(_), TlsMode::Off) => {
            Err(msg("--tls-certificates is given but --tls is off: add --tls require (or --tls on)"))
        }
        (None, _) => {
            Err(msg("--tls on|require needs --tls-certificates DIR (server-cert.pem, server-key.pem, ca-cert.pem)"))
        }
        (Some(dir), mode) => {
            TlsSetup::load(dir, mode, a.tls_verify_peer).map(Some).map_err(|e| msg(format!("cannot set up TLS: {e}")))
        }
    }
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
    let ServeArgs { exports, listen, read_only, commit_interval_ms, tuning, create_default, access } = args;
    let tls = tls_setup(&access)?;
    let socket_access = SocketAccess { group: access.socket_group.as_deref().map(group_id).transpose()? };
    let tcp = listen.is_some() || access.socket.is_none();
    let listen = listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let tls_mode = tls.as_ref().map(TlsSetup::mode);
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
    if !access.ublk.is_empty() {
        if let Some(why) = crate::ublk::unavailable() {
            return Err(msg(format!("cannot attach {} over ublk: {why}", access.ublk.join(", "))));
        }
    }
    let (pd, mut pool) = open_pool(dir, Access::Write)?;
    for name in exports.iter().chain(&access.ublk) {
        pd.device(name).map_err(CliError::Dir)?;
    }
    pool.set_metadata_max_bytes(tuning.metadata_max);
    // pool.toml's thresholds, autoextend and no-space policy, overridden by the flags.
    if let Some(t) = tuning.no_space_timeout.filter(|&t| t > MAX_NO_SPACE_TIMEOUT_S) {
        return Err(msg(format!("--no-space-timeout {t}: at most {MAX_NO_SPACE_TIMEOUT_S} seconds (one day)")));
    }
    let flags = HealthOptions {
        data_threshold: tuning.data_threshold,
        metadata_threshold: tuning.metadata_threshold,
        autoextend_percent: tuning.autoextend_percent,
        autoextend_max_bytes: tuning.autoextend_max,
        no_space: tuning.no_space.map(crate::health::no_space_mode),
        no_space_timeout_s: tuning.no_space_timeout,
    };
    let mut effective = pd.config().options.health.overridden_by(flags);
    if read_only {
        // A pool served read-only is not grown either.
        effective.autoextend_percent = None;
    }
    let settings = LiveSettings::new(effective);
    let service = Service::new(pool);
    service.set_no_space_policy(health::no_space_policy(&settings.get()));
    let pd = Arc::new(Mutex::new(pd));
    let devices: DeviceList = {
        let pd = Arc::clone(&pd);
        Arc::new(move || {
            let g = pd.lock().unwrap_or_else(PoisonError::into_inner);
            export_list(&g, &exports)
        })
    };
    let first = devices().1;
    let catalog = Arc::new(std::sync::OnceLock::new());
    let ublk = crate::ublk::Ublk::new(dir, Arc::clone(&catalog));
    let handler: Handler = Controller::new(Arc::clone(&service), Arc::clone(&pd), read_only)
        .with_health(Arc::clone(&settings))
        .with_local_devices(ublk.clone())
        .into_handler();
    let opts = serve::Options {
        listen,
        tcp,
        socket: access.socket.clone(),
        socket_access,
        tls,
        read_only,
        commit_interval: Duration::from_millis(commit_interval_ms.max(1)),
        workers: tuning.workers.max(1),
        max_connections: tuning.max_connections.max(1),
        handshake_timeout: Duration::from_millis(tuning.handshake_timeout_ms.max(1)),
        shutdown_grace: Duration::from_millis(tuning.shutdown_grace_ms),
        max_threads: tuning.max_threads.max(1),
        max_requests_per_connection: tuning.max_requests_per_connection.max(1),
        max_bytes_per_connection: usize::try_from(tuning.max_bytes_per_connection).unwrap_or(usize::MAX).max(1 << 20),
        health: health::HealthPolicy {
            pool_dir: dir.to_path_buf(),
            on_threshold: tuning.on_threshold.clone(),
            settings,
        },
        streams: thinpool::server::replicate::stream_handler(Arc::clone(&service), Arc::clone(&pd), read_only),
    };
    raise_fd_limit(opts.max_connections as u64);
    let sock: PathBuf = dir.join(CONTROL_SOCKET);
    let stop = Arc::new(AtomicBool::new(false));
    let ublk_names = access.ublk.clone();
    let ublk_failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let (ublk_at_start, failed_at_start, stop_at_start) = (ublk.clone(), Arc::clone(&ublk_failed), Arc::clone(&stop));
    let service_after = Arc::clone(&service);
    let r = serve::run_with_catalog(
        service,
        devices,
        &opts,
        Some((sock.clone(), handler)),
        Arc::clone(&stop),
        |bound| {
            // Whoever started the server may have stopped reading its output: never let a
            // closed stdout take the server down.
            use std::io::Write;
            let mut out = std::io::stdout();
            let tls_required = tls_mode == Some(TlsMode::Require);
            let mut places = Vec::new();
            if let Some(addr) = bound.tcp {
                places.push(format!("nbd://{addr}/NAME"));
            }
            if let Some(path) = bound.socket() {
                places.push(format!("nbd+unix:///NAME?socket={}", path.display()));
            }
            let _ = writeln!(
                out,
                "serving pool {} on {}{}{}; control socket {}",
                dir.display(),
                places.join(" and "),
                if read_only { " (read-only)" } else { "" },
                match tls_mode {
                    Some(TlsMode::Require) => " (TLS required)",
                    Some(TlsMode::On) => " (TLS offered)",
                    _ => "",
                },
                sock.display()
            );
            if let Some(name) = first {
                let mut lead = "attach with:";
                if let Some(addr) = bound.tcp {
                    if tls_required {
                        let _ = writeln!(
                            out,
                            "{lead}  nbdinfo 'nbds://{addr}/{name}?tls-certificates=DIR'  (DIR holds ca-cert.pem)"
                        );
                    } else {
                        let _ = writeln!(out, "{lead}  nbd-client {} {} /dev/nbd0 -N {name}", addr.ip(), addr.port());
                        let _ = writeln!(out, "          or  nbdinfo nbd://{addr}/{name}");
                    }
                    lead = "          or";
                }
                if let Some(path) = bound.socket() {
                    if tls_required {
                        let _ = writeln!(
                            out,
                            "{lead}  nbdinfo 'nbds+unix:///{name}?socket={}&tls-certificates=DIR'",
                            path.display()
                        );
                    } else {
                        let _ = writeln!(out, "{lead}  nbd-client -u {} /dev/nbd0 -N {name}", path.display());
                        let _ = writeln!(out, "          or  nbdinfo 'nbd+unix:///{name}?socket={}'", path.display());
                    }
                }
            }
            // Devices a server of this pool left when it died are taken over first.
            for r in ublk_at_start.recover() {
                match r {
                    Ok(d) => {
                        let _ = writeln!(out, "recovered \"{}\" as {} (ublk)", d.name, d.path);
                    }
                    Err(e) => eprintln!("thinctl serve: {e}"),
                }
            }
            // --ublk NAME: attached once the exports exist; a failure stops the server.
            for name in &ublk_names {
                use thinpool::server::local::LocalDevices;
                if ublk_at_start.list().iter().any(|d| &d.name == name) {
                    continue;
                }
                match ublk_at_start.attach(name, read_only) {
                    Ok(d) => {
                        let ro = if d.read_only { " (read-only)" } else { "" };
                        let _ = writeln!(out, "attached \"{}\" as {}{ro} (ublk)", d.name, d.path);
                    }
                    Err(e) => {
                        *failed_at_start.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.message);
                        stop_at_start.store(true, std::sync::atomic::Ordering::SeqCst);
                        break;
                    }
                }
            }
            let _ = out.flush();
        },
        |cat| {
            let _ = catalog.set(cat);
        },
    );
    // The ublk devices go before the process does; what they wrote after the
    // committer's final commit is committed here.
    ublk.detach_all();
    if let Err(e) = service_after.flush() {
        eprintln!("thinctl serve: final commit failed: {e}");
    }
    r.map_err(|e| msg(format!("cannot serve pool {}: {e}", dir.display())))?;
    let failed = ublk_failed.lock().unwrap_or_else(PoisonError::into_inner).take();
    match failed {
        Some(e) => Err(msg(e)),
        None => Ok(()),
    }
}

/// Every connection holds a descriptor: raise the soft `RLIMIT_NOFILE` (often
/// 1024) toward the hard limit so that `max_connections` clients fit, with room
/// for the pool's files, listeners and the control socket. Past the hard limit
/// the server still runs; accepts pause while no descriptor is free.
fn raise_fd_limit(max_connections: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let need = max_connections.saturating_add(128);
    if soft >= need {
        return;
    }
    let new = need.min(hard);
    if new > soft {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, new, hard) {
            eprintln!("thinpool: cannot raise the open-file limit to {new}: {e}");
        }
    }
    if need > hard {
        eprintln!(
            "thinpool: the open-file limit ({hard}) is below --max-connections {max_connections} plus 128; accepts pause when descriptors run out"
        );
    }
}
