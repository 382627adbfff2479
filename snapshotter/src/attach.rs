//! Kernel block devices for mounts: a thin device is attached as `/dev/nbdN` by
//! running Debian's `nbd-client` against the snapshotter's own NBD server (this
//! needs root and the kernel's `nbd` module, and is the only part that does).
//! With [`AttachMode::None`] nothing is attached and mounts name the NBD export.
//!
//! Detaching never leaves a device behind: a device still open (mounted) is waited
//! for a little, `nbd-client -d` is retried when it fails, and a Remove that still
//! finds the device open disconnects it anyway — *lazily*: the kernel keeps the
//! node until its last user closes it, all I/O on it fails from then on, and the
//! snapshotter says so in a warning naming the device and the snapshot. A Commit
//! never does that: it refuses while the device is open.
//!
//! Which device backs which export is kept in the file [`STATE_FILE`] in the pool
//! directory (replaced atomically after every attach and detach), with the boot id
//! of the kernel and, per device, the pid the kernel recorded for its connection
//! (`/sys/block/nbdN/pid`, the `nbd-client` that connected it). A snapshotter killed
//! with `kill -9` leaves those devices connected to a server that no longer exists;
//! the next start ([`Attacher::recover`]) disconnects every one whose pid still
//! matches (so it is the very connection recorded, not one somebody made since),
//! and the next Mounts attaches afresh. A file from an earlier boot is ignored: the
//! kernel forgot those devices. Not in `pool.toml`: attachments are the running
//! kernel's state, not the pool's, and would make every Mounts rewrite and fsync
//! the pool's description.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use containerd_snapshots::api::types::Mount;

use crate::error::SnapError;

/// Name of the attachments file in the pool directory.
pub const STATE_FILE: &str = "attachments.json";

/// How mounts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// Attach every prepared or viewed snapshot as `/dev/nbdN` with `nbd-client`
    /// (root and the `nbd` kernel module); mounts are ext4 mounts of that device.
    Nbd,
    /// Attach nothing: mounts carry `nbd://ADDR/EXPORT` as their source, for a
    /// client that attaches by itself (containerd cannot mount these).
    None,
}

/// The kernel's NBD devices, as the attacher needs them (the real one is
/// [`NbdClient`]; tests use a model).
pub trait Kernel: Send + Sync + std::fmt::Debug {
    /// The NBD device nodes the kernel has, in order (`/dev/nbd0`, ...).
    fn devices(&self) -> Vec<String>;
    /// The pid the kernel recorded for `dev`'s connection; `None` when the device
    /// is not connected.
    fn connected(&self, dev: &str) -> Option<u32>;
    /// Whether `dev` is open exclusively by someone (a mount); an error when that
    /// cannot be told.
    fn busy(&self, dev: &str) -> Result<bool, String>;
    /// Connect `dev` to export `name` at `addr`.
    fn connect(&self, dev: &str, addr: SocketAddr, name: &str, read_only: bool) -> Result<(), String>;
    /// Disconnect `dev`.
    fn disconnect(&self, dev: &str) -> Result<(), String>;
    /// The kernel's boot id (changes at every boot).
    fn boot_id(&self) -> String;
}

/// The real kernel: `/sys/block/nbdN`, `/dev/nbdN` and Debian's `nbd-client`.
#[derive(Debug, Default)]
pub struct NbdClient;

fn nbd_client(args: &[&str]) -> Result<(), String> {
    let out = Command::new("nbd-client").args(args).output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "nbd-client is not installed (Debian package nbd-client)".to_string(),
        _ => format!("cannot run nbd-client: {e}"),
    })?;
    if !out.status.success() {
        return Err(format!("nbd-client failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn sys_dir(dev: &str) -> PathBuf {
    Path::new("/sys/block").join(dev.trim_start_matches("/dev/"))
}

impl Kernel for NbdClient {
    fn devices(&self) -> Vec<String> {
        (0..)
            .map(|n| format!("nbd{n}"))
            .take_while(|d| Path::new("/sys/block").join(d).exists())
            .map(|d| format!("/dev/{d}"))
            .collect()
    }

    fn connected(&self, dev: &str) -> Option<u32> {
        std::fs::read_to_string(sys_dir(dev).join("pid")).ok().and_then(|s| s.trim().parse().ok())
    }

    fn busy(&self, dev: &str) -> Result<bool, String> {
        use std::os::unix::fs::OpenOptionsExt;
        // An exclusive open of a block device fails with EBUSY while it is mounted
        // (or otherwise claimed exclusively).
        match std::fs::OpenOptions::new().read(true).custom_flags(nix::fcntl::OFlag::O_EXCL.bits()).open(dev) {
            Ok(_) => Ok(false),
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) => Ok(true),
            Err(e) => Err(format!("cannot open {dev} to see whether it is in use: {e}")),
        }
    }

    fn connect(&self, dev: &str, addr: SocketAddr, name: &str, read_only: bool) -> Result<(), String> {
        let (host, port) = (addr.ip().to_string(), addr.port().to_string());
        let mut args = vec![host.as_str(), port.as_str(), dev, "-N", name];
        if read_only {
            args.push("-readonly");
        }
        nbd_client(&args)
    }

    fn disconnect(&self, dev: &str) -> Result<(), String> {
        nbd_client(&["-d", dev])
    }

    fn boot_id(&self) -> String {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
    }
}

/// How long detaching waits and how often it retries.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// Checks of a device still open (mounted) before giving up on it.
    pub busy_checks: u32,
    /// `nbd-client -d` attempts.
    pub detach_tries: u32,
    /// Pause between checks and attempts.
    pub pause: Duration,
}

impl Default for Patience {
    /// 2 s for an open device to be closed, 3 attempts to disconnect it.
    fn default() -> Patience {
        Patience { busy_checks: 20, detach_tries: 3, pause: Duration::from_millis(100) }
    }
}

/// One attached export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// `/dev/nbdN`.
    pub device: String,
    /// The pid the kernel recorded for the connection.
    pub pid: Option<u32>,
    /// Attached read-only.
    pub read_only: bool,
}

/// How a device was detached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detached {
    /// It was not attached.
    NotAttached,
    /// Disconnected while nobody had it open.
    Clean(String),
    /// Disconnected while still open (mounted): the kernel frees the node when its
    /// last user closes it; I/O on it fails until then.
    Lazily(String),
}

/// What [`Attacher::recover`] found of a dead snapshotter's attachments.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Devices disconnected: (device, export).
    pub detached: Vec<(String, String)>,
    /// Recorded devices no longer connected, or connected by someone else since.
    pub gone: Vec<(String, String)>,
    /// Problems (each says which device).
    pub problems: Vec<String>,
}

/// Attached devices, by export name, mirrored in [`STATE_FILE`].
#[derive(Debug)]
pub struct Attacher {
    mode: AttachMode,
    kernel: Arc<dyn Kernel>,
    state: Option<PathBuf>,
    patience: Patience,
    attached: Mutex<BTreeMap<String, Attachment>>,
}

/// Mount options of a writable snapshot. Inode tables of a thin device read as
/// zeros where never written, so the kernel's lazy inode-table zeroing is skipped.
const RW_OPTIONS: &[&str] = &["rw", "noinit_itable"];
/// Mount options of a view.
const RO_OPTIONS: &[&str] = &["ro"];

fn options(read_only: bool) -> Vec<String> {
    (if read_only { RO_OPTIONS } else { RW_OPTIONS }).iter().map(|s| s.to_string()).collect()
}

impl Attacher {
    /// An attacher working in `mode` with the real kernel, keeping no state file
    /// (see [`Attacher::with_state`]).
    pub fn new(mode: AttachMode) -> Attacher {
        Attacher::with_kernel(mode, Arc::new(NbdClient), None, Patience::default())
    }

    /// An attacher with the real kernel whose attachments are kept in
    /// `DIR/attachments.json` (only in [`AttachMode::Nbd`]).
    /// `kernel` is the privilege-separated helper when there is one, the real
    /// kernel otherwise.
    pub fn with_state(mode: AttachMode, dir: &Path, kernel: Option<Arc<dyn Kernel>>) -> Attacher {
        let state = (mode == AttachMode::Nbd).then(|| dir.join(STATE_FILE));
        Attacher::with_kernel(mode, kernel.unwrap_or_else(|| Arc::new(NbdClient)), state, Patience::default())
    }

    /// An attacher over any [`Kernel`].
    pub fn with_kernel(
        mode: AttachMode,
        kernel: Arc<dyn Kernel>,
        state: Option<PathBuf>,
        patience: Patience,
    ) -> Attacher {
        Attacher { mode, kernel, state, patience, attached: Mutex::new(BTreeMap::new()) }
    }

    /// The mode.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Attachment>> {
        self.attached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The mounts of export `name` served at `addr`, attaching it first when needed
    /// (again when its device was disconnected behind our back).
    pub fn mounts(&self, name: &str, addr: SocketAddr, read_only: bool) -> Result<Vec<Mount>, SnapError> {
        let source = match self.mode {
            AttachMode::None => format!("nbd://{addr}/{name}"),
            AttachMode::Nbd => self.attach(name, addr, read_only)?,
        };
        Ok(vec![Mount { r#type: "ext4".into(), source, target: String::new(), options: options(read_only) }])
    }

    fn attach(&self, name: &str, addr: SocketAddr, read_only: bool) -> Result<String, SnapError> {
        let mut map = self.map();
        if let Some(a) = map.get(name) {
            if a.pid.is_some() && self.kernel.connected(&a.device) == a.pid {
                return Ok(a.device.clone());
            }
            // Disconnected by somebody else (or recorded without its pid): attach anew.
            map.remove(name);
        }
        let devices = self.kernel.devices();
        if devices.is_empty() {
            return Err(SnapError::Attach(
                "the kernel has no NBD devices (/sys/block/nbd0): load the module with `modprobe nbd` (root), or run with --attach none".into(),
            ));
        }
        let mut last = String::new();
        for dev in devices {
            if map.values().any(|a| a.device == dev) || self.kernel.connected(&dev).is_some() {
                continue;
            }
            match self.kernel.busy(&dev) {
                Ok(false) => {}
                Ok(true) => continue,
                Err(e) => {
                    last = e;
                    continue;
                }
            }
            // Another process may take the same free device at the same time: try the next.
            match self.kernel.connect(&dev, addr, name, read_only) {
                Ok(()) => {
                    let pid = self.kernel.connected(&dev);
                    map.insert(name.to_string(), Attachment { device: dev.clone(), pid, read_only });
                    if let Err(e) = self.save(&map) {
                        let _ = self.kernel.disconnect(&dev);
                        map.remove(name);
                        return Err(e);
                    }
                    return Ok(dev);
                }
                Err(e) => last = format!("{dev}: {e}"),
            }
        }
        Err(SnapError::Attach(if last.is_empty() {
            "every /dev/nbdN is in use (modprobe nbd nbds_max=N for more)".into()
        } else {
            format!("cannot attach \"{name}\": no free /dev/nbdN took it (last: {last})")
        }))
    }

    /// Detach export `name` when it is attached. A device still open is waited for
    /// (see [`Patience`]); then, when `lazily`, disconnected anyway
    /// ([`Detached::Lazily`]), otherwise refused with an error naming it.
    pub fn detach(&self, name: &str, lazily: bool) -> Result<Detached, SnapError> {
        let mut map = self.map();
        let Some(a) = map.get(name).cloned() else { return Ok(Detached::NotAttached) };
        let dev = a.device.clone();
        if a.pid.is_some() && self.kernel.connected(&dev) != a.pid {
            // Somebody disconnected it already (and maybe reused it): not ours now.
            map.remove(name);
            self.save(&map)?;
            return Ok(Detached::Clean(dev));
        }
        let mut state = self.kernel.busy(&dev);
        for _ in 0..self.patience.busy_checks {
            if state != Ok(true) {
                break;
            }
            std::thread::sleep(self.patience.pause);
            state = self.kernel.busy(&dev);
        }
        let busy = match state {
            Ok(b) => b,
            Err(e) if !lazily => {
                return Err(SnapError::Attach(format!(
                    "cannot tell whether {dev} (snapshot device \"{name}\") is still open: {e}"
                )))
            }
            // Disconnected as if open: the disconnect below says what is wrong.
            Err(_) => true,
        };
        if busy && !lazily {
            return Err(SnapError::FailedPrecondition(format!(
                "{dev} (snapshot device \"{name}\") is still open, mounted somewhere: unmount it first"
            )));
        }
        let mut err = String::new();
        for i in 0..self.patience.detach_tries.max(1) {
            if i > 0 {
                std::thread::sleep(self.patience.pause);
            }
            match self.kernel.disconnect(&dev) {
                Ok(()) => {
                    err.clear();
                    break;
                }
                // Gone meanwhile: that is what we wanted.
                Err(_) if self.kernel.connected(&dev).is_none() => {
                    err.clear();
                    break;
                }
                Err(e) => err = e,
            }
        }
        if !err.is_empty() {
            return Err(SnapError::Attach(format!(
                "cannot detach {dev} (snapshot device \"{name}\") after {} attempts: {err}",
                self.patience.detach_tries.max(1)
            )));
        }
        map.remove(name);
        self.save(&map)?;
        Ok(if busy { Detached::Lazily(dev) } else { Detached::Clean(dev) })
    }

    /// Every attached export and its attachment.
    pub fn attached(&self) -> Vec<(String, Attachment)> {
        self.map().iter().map(|(n, a)| (n.clone(), a.clone())).collect()
    }

    /// Forget attachments whose device is no longer connected as recorded
    /// (disconnected by somebody else): the next Mounts attaches again. Returns
    /// (export, device) of each.
    pub fn forget_lost(&self) -> Result<Vec<(String, String)>, SnapError> {
        let mut map = self.map();
        let lost: Vec<(String, String)> = map
            .iter()
            .filter(|(_, a)| self.kernel.connected(&a.device) != a.pid || a.pid.is_none())
            .map(|(n, a)| (n.clone(), a.device.clone()))
            .collect();
        if !lost.is_empty() {
            for (n, _) in &lost {
                map.remove(n);
            }
            self.save(&map)?;
        }
        Ok(lost)
    }

    /// At start-up: disconnect what a dead snapshotter of this pool left attached
    /// (recorded in the state file, this boot, with the same connection pid).
    pub fn recover(&self) -> Recovered {
        let mut out = Recovered::default();
        let Some(path) = &self.state else { return out };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
            Err(e) => {
                out.problems.push(format!("cannot read {}: {e}", path.display()));
                return out;
            }
        };
        match parse_state(&text) {
            Err(e) => out.problems.push(format!("{} is not an attachments file ({e}); ignored", path.display())),
            Ok((boot, recorded)) if boot == self.kernel.boot_id() => {
                for (name, a) in recorded {
                    match (a.pid, self.kernel.connected(&a.device)) {
                        (Some(p), Some(now)) if p == now => {
                            let busy = self.kernel.busy(&a.device).unwrap_or(true);
                            match self.kernel.disconnect(&a.device) {
                                Ok(()) => out.detached.push((a.device.clone(), name.clone())),
                                Err(e) => out.problems.push(format!(
                                    "cannot disconnect {} (snapshot device \"{name}\", left by a dead snapshotter): {e}",
                                    a.device
                                )),
                            }
                            if busy {
                                out.problems.push(format!(
                                    "{} (snapshot device \"{name}\") was still mounted: disconnected lazily, the kernel frees it when it is unmounted",
                                    a.device
                                ));
                            }
                        }
                        _ => out.gone.push((a.device.clone(), name.clone())),
                    }
                }
            }
            // An earlier boot: the kernel has forgotten those devices.
            Ok(_) => {}
        }
        if let Err(e) = self.save(&self.map()) {
            out.problems.push(e.to_string());
        }
        out
    }

    /// Write the state file atomically (a temporary file, fsync, rename, fsync of
    /// the directory).
    fn save(&self, map: &BTreeMap<String, Attachment>) -> Result<(), SnapError> {
        let Some(path) = &self.state else { return Ok(()) };
        let text = render_state(&self.kernel.boot_id(), map);
        let err = |what: &str, e: std::io::Error| SnapError::Attach(format!("cannot {what} {}: {e}", path.display()));
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".attachments-")
            .tempfile_in(dir)
            .map_err(|e| err("write a temporary file for", e))?;
        tmp.write_all(text.as_bytes()).map_err(|e| err("write", e))?;
        tmp.as_file().sync_all().map_err(|e| err("sync", e))?;
        tmp.persist(path).map_err(|e| err("replace", e.error))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err("sync the directory of", e))?;
        Ok(())
    }
}

fn render_state(boot_id: &str, map: &BTreeMap<String, Attachment>) -> String {
    let list: Vec<serde_json::Value> = map
        .iter()
        .map(|(n, a)| serde_json::json!({ "export": n, "device": a.device, "pid": a.pid, "read_only": a.read_only }))
        .collect();
    let mut s =
        serde_json::to_string_pretty(&serde_json::json!({ "boot_id": boot_id, "attached": list })).unwrap_or_default();
    s.push('\n');
    s
}

/// Longest attachments file read (a few hundred devices at most).
const MAX_STATE_BYTES: usize = 1 << 20;

/// Parse an attachments file: the boot id and the attachments by export.
pub fn parse_state(text: &str) -> Result<(String, BTreeMap<String, Attachment>), String> {
    if text.len() > MAX_STATE_BYTES {
        return Err(format!("{} bytes long, at most {MAX_STATE_BYTES}", text.len()));
    }
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let boot = v.get("boot_id").and_then(|b| b.as_str()).ok_or("no boot_id")?.to_string();
    let mut map = BTreeMap::new();
    for (i, e) in v.get("attached").and_then(|a| a.as_array()).ok_or("no attached list")?.iter().enumerate() {
        let s = |k: &str| e.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (Some(export), Some(device)) = (s("export"), s("device")) else {
            return Err(format!("entry {i} has no export or device"));
        };
        let nbd =
            device.strip_prefix("/dev/nbd").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !nbd {
            return Err(format!("entry {i}: \"{device}\" is not an NBD device node"));
        }
        let pid = e.get("pid").and_then(|p| p.as_u64()).and_then(|p| u32::try_from(p).ok());
        let read_only = e.get("read_only").and_then(|r| r.as_bool()).unwrap_or(false);
        map.insert(export, Attachment { device, pid, read_only });
    }
    Ok((boot, map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A model kernel: devices with a connection pid, an open flag, and scripted
    /// disconnect failures.
    #[derive(Debug, Default)]
    struct Model {
        inner: Mutex<ModelState>,
    }
    #[derive(Debug, Default)]
    struct ModelState {
        boot: String,
        n: usize,
        conn: HashMap<String, (u32, String)>,
        open_for: HashMap<String, u32>,
        disconnect_failures: u32,
        busy_error: Option<String>,
        next_pid: u32,
        log: Vec<String>,
    }

    #[derive(Debug, Clone)]
    struct Shared(Arc<Model>);

    impl Kernel for Shared {
        fn devices(&self) -> Vec<String> {
            (0..self.0.inner.lock().unwrap().n).map(|i| format!("/dev/nbd{i}")).collect()
        }
        fn connected(&self, dev: &str) -> Option<u32> {
            self.0.inner.lock().unwrap().conn.get(dev).map(|c| c.0)
        }
        fn busy(&self, dev: &str) -> Result<bool, String> {
            let mut s = self.0.inner.lock().unwrap();
            if let Some(e) = &s.busy_error {
                return Err(e.clone());
            }
            match s.open_for.get_mut(dev) {
                Some(0) | None => Ok(false),
                Some(n) => {
                    *n -= 1;
                    Ok(true)
                }
            }
        }
        fn connect(&self, dev: &str, _addr: SocketAddr, name: &str, _ro: bool) -> Result<(), String> {
            let mut s = self.0.inner.lock().unwrap();
            if s.conn.contains_key(dev) {
                return Err("Device busy".into());
            }
            s.next_pid += 1;
            let pid = s.next_pid;
            s.conn.insert(dev.to_string(), (pid, name.to_string()));
            s.log.push(format!("connect {dev} {name}"));
            Ok(())
        }
        fn disconnect(&self, dev: &str) -> Result<(), String> {
            let mut s = self.0.inner.lock().unwrap();
            if s.disconnect_failures > 0 {
                s.disconnect_failures -= 1;
                return Err("transient".into());
            }
            s.conn.remove(dev);
            s.log.push(format!("disconnect {dev}"));
            Ok(())
        }
        fn boot_id(&self) -> String {
            self.0.inner.lock().unwrap().boot.clone()
        }
    }

    fn model(n: usize) -> Shared {
        let m = Shared(Arc::new(Model::default()));
        m.0.inner.lock().unwrap().n = n;
        m.0.inner.lock().unwrap().boot = "boot-1".into();
        m
    }

    fn attacher(k: &Shared, state: &Path) -> Attacher {
        let quick = Patience { busy_checks: 3, detach_tries: 3, pause: Duration::from_millis(1) };
        Attacher::with_kernel(AttachMode::Nbd, Arc::new(k.clone()), Some(state.to_path_buf()), quick)
    }

    const ADDR: &str = "127.0.0.1:10809";

    #[test]
    fn attachments_are_recorded_reused_and_forgotten_on_detach() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join(STATE_FILE);
        let k = model(4);
        // Somebody else holds nbd0.
        k.connect("/dev/nbd0", ADDR.parse().unwrap(), "theirs", false).unwrap();
        let a = attacher(&k, &state);
        let m = a.mounts("ctr-1", ADDR.parse().unwrap(), false).unwrap();
        assert_eq!(m[0].source, "/dev/nbd1");
        assert_eq!(a.mounts("ctr-1", ADDR.parse().unwrap(), false).unwrap()[0].source, "/dev/nbd1", "reused");
        assert_eq!(a.mounts("ctr-2", ADDR.parse().unwrap(), true).unwrap()[0].source, "/dev/nbd2");
        let (boot, rec) = parse_state(&std::fs::read_to_string(&state).unwrap()).unwrap();
        assert_eq!(boot, "boot-1");
        assert_eq!(rec.len(), 2);
        assert_eq!(rec["ctr-1"], Attachment { device: "/dev/nbd1".into(), pid: Some(2), read_only: false });
        assert!(rec["ctr-2"].read_only);
        assert_eq!(a.detach("ctr-1", false).unwrap(), Detached::Clean("/dev/nbd1".into()));
        assert_eq!(a.detach("ctr-1", false).unwrap(), Detached::NotAttached);
        let (_, rec) = parse_state(&std::fs::read_to_string(&state).unwrap()).unwrap();
        assert_eq!(rec.keys().collect::<Vec<_>>(), vec!["ctr-2"]);
        assert!(k.connected("/dev/nbd1").is_none());
        // Disconnected behind our back: Mounts attaches again, on a free device.
        k.disconnect("/dev/nbd2").unwrap();
        k.connect("/dev/nbd2", ADDR.parse().unwrap(), "someone", false).unwrap();
        assert_eq!(a.mounts("ctr-2", ADDR.parse().unwrap(), true).unwrap()[0].source, "/dev/nbd1");
    }

    #[test]
    fn a_busy_device_is_waited_for_then_refused_or_detached_lazily() {
        let tmp = tempfile::tempdir().unwrap();
        let k = model(2);
        let a = attacher(&k, &tmp.path().join(STATE_FILE));
        a.mounts("ctr-1", ADDR.parse().unwrap(), false).unwrap();
        // Open for two checks: closed within the patience, a clean detach.
        k.0.inner.lock().unwrap().open_for.insert("/dev/nbd0".into(), 2);
        assert_eq!(a.detach("ctr-1", false).unwrap(), Detached::Clean("/dev/nbd0".into()));
        // Open for good: a commit-style detach is refused and keeps the device...
        a.mounts("ctr-1", ADDR.parse().unwrap(), false).unwrap();
        k.0.inner.lock().unwrap().open_for.insert("/dev/nbd0".into(), 1000);
        let e = a.detach("ctr-1", false).unwrap_err();
        assert!(e.to_string().contains("/dev/nbd0") && e.to_string().contains("still open"), "{e}");
        assert!(k.connected("/dev/nbd0").is_some());
        assert_eq!(a.attached().len(), 1);
        // ...and a remove-style one disconnects it lazily.
        assert_eq!(a.detach("ctr-1", true).unwrap(), Detached::Lazily("/dev/nbd0".into()));
        assert!(k.connected("/dev/nbd0").is_none());
        assert!(a.attached().is_empty());
    }

    #[test]
    fn a_device_whose_use_cannot_be_told_is_not_taken_and_not_detached_by_a_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let k = model(2);
        let a = attacher(&k, &tmp.path().join(STATE_FILE));
        a.mounts("ctr-1", ADDR.parse().unwrap(), false).unwrap();
        k.0.inner.lock().unwrap().busy_error = Some("permission denied".into());
        let e = a.mounts("ctr-2", ADDR.parse().unwrap(), false).unwrap_err().to_string();
        assert!(e.contains("cannot attach \"ctr-2\"") && e.contains("permission denied"), "{e}");
        let e = a.detach("ctr-1", false).unwrap_err().to_string();
        assert!(e.contains("cannot tell whether /dev/nbd0") && e.contains("permission denied"), "{e}");
        assert!(k.connected("/dev/nbd0").is_some());
        assert_eq!(a.detach("ctr-1", true).unwrap(), Detached::Lazily("/dev/nbd0".into()));
    }

    #[test]
    fn a_failing_disconnect_is_retried_and_then_named() {
        let tmp = tempfile::tempdir().unwrap();
        let k = model(2);
        let a = attacher(&k, &tmp.path().join(STATE_FILE));
        a.mounts("ctr-1", ADDR.parse().unwrap(), false).unwrap();
        k.0.inner.lock().unwrap().disconnect_failures = 2;
        assert_eq!(a.detach("ctr-1", true).unwrap(), Detached::Clean("/dev/nbd0".into()));
        a.mounts("ctr-1", ADDR.parse().unwrap(), false).unwrap();
        k.0.inner.lock().unwrap().disconnect_failures = 3;
        let e = a.detach("ctr-1", true).unwrap_err().to_string();
        assert!(e.contains("/dev/nbd0") && e.contains("3 attempts") && e.contains("transient"), "{e}");
        assert_eq!(a.attached().len(), 1, "still attached, still recorded");
    }

    #[test]
    fn recovery_disconnects_only_what_the_dead_process_left_this_boot() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join(STATE_FILE);
        let k = model(4);
        {
            let dead = attacher(&k, &state);
            for n in ["ctr-1", "ctr-2", "ctr-3"] {
                dead.mounts(n, ADDR.parse().unwrap(), false).unwrap();
            }
            // (killed: nothing detached)
        }
        // Since: nbd1 was disconnected and taken by somebody else.
        k.disconnect("/dev/nbd1").unwrap();
        k.connect("/dev/nbd1", ADDR.parse().unwrap(), "theirs", false).unwrap();
        let a = attacher(&k, &state);
        let r = a.recover();
        assert_eq!(r.detached, vec![("/dev/nbd0".into(), "ctr-1".into()), ("/dev/nbd2".into(), "ctr-3".into())]);
        assert_eq!(r.gone, vec![("/dev/nbd1".into(), "ctr-2".into())]);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert!(k.connected("/dev/nbd0").is_none() && k.connected("/dev/nbd2").is_none());
        assert!(k.connected("/dev/nbd1").is_some(), "somebody else's device is left alone");
        assert!(parse_state(&std::fs::read_to_string(&state).unwrap()).unwrap().1.is_empty());
        // A file from another boot names devices the kernel forgot: nothing is touched.
        a.mounts("ctr-1", ADDR.parse().unwrap(), false).unwrap();
        k.0.inner.lock().unwrap().boot = "boot-2".into();
        let r = attacher(&k, &state).recover();
        assert_eq!(r, Recovered::default());
        assert!(k.connected("/dev/nbd0").is_some());
        // A damaged file is reported, not trusted.
        std::fs::write(&state, "{\"boot_id\":\"boot-2\",\"attached\":[{\"export\":\"x\",\"device\":\"/etc/passwd\"}]}")
            .unwrap();
        let r = attacher(&k, &state).recover();
        assert!(r.problems[0].contains("not an NBD device node"), "{:?}", r.problems);
    }

    #[test]
    fn no_free_device_and_no_module_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let k = model(1);
        let a = attacher(&k, &tmp.path().join(STATE_FILE));
        a.mounts("ctr-1", ADDR.parse().unwrap(), false).unwrap();
        let e = a.mounts("ctr-2", ADDR.parse().unwrap(), false).unwrap_err().to_string();
        assert!(e.contains("every /dev/nbdN is in use"), "{e}");
        let none = model(0);
        let e = attacher(&none, &tmp.path().join("x.json")).mounts("ctr-1", ADDR.parse().unwrap(), false).unwrap_err();
        assert!(e.to_string().contains("modprobe nbd"), "{e}");
    }
}
