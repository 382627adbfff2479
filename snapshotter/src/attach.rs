//! Kernel block devices for mounts: a thin device is attached as `/dev/nbdN` by
//! running Debian's `nbd-client` against the snapshotter's own NBD server (this
//! needs root and the kernel's `nbd` module, and is the only part that does).
//! With [`AttachMode::None`] nothing is attached and mounts name the NBD export.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use containerd_snapshots::api::types::Mount;

use crate::error::SnapError;

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

/// Attached devices, by export name.
#[derive(Debug)]
pub struct Attacher {
    mode: AttachMode,
    attached: Mutex<HashMap<String, String>>,
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
    /// An attacher working in `mode`.
    pub fn new(mode: AttachMode) -> Attacher {
        Attacher { mode, attached: Mutex::new(HashMap::new()) }
    }

    /// The mode.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.attached.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The mounts of export `name` served at `addr`, attaching it first when needed.
    pub fn mounts(&self, name: &str, addr: SocketAddr, read_only: bool) -> Result<Vec<Mount>, SnapError> {
        let source = match self.mode {
            AttachMode::None => format!("nbd://{addr}/{name}"),
            AttachMode::Nbd => self.attach(name, addr, read_only)?,
        };
        Ok(vec![Mount { r#type: "ext4".into(), source, target: String::new(), options: options(read_only) }])
    }

    fn attach(&self, name: &str, addr: SocketAddr, read_only: bool) -> Result<String, SnapError> {
        let mut map = self.map();
        if let Some(dev) = map.get(name) {
            return Ok(dev.clone());
        }
        let in_use: Vec<String> = map.values().cloned().collect();
        let dev = free_nbd(&in_use)?;
        let mut cmd = Command::new("nbd-client");
        cmd.arg(addr.ip().to_string()).arg(addr.port().to_string()).arg(&dev).args(["-N", name]);
        if read_only {
            cmd.arg("-readonly");
        }
        run(&mut cmd, &format!("attach \"{name}\" as {dev}"))?;
        map.insert(name.to_string(), dev.clone());
        Ok(dev)
    }

    /// Detach export `name` when it is attached (a no-op otherwise).
    pub fn detach(&self, name: &str) -> Result<(), SnapError> {
        let mut map = self.map();
        let Some(dev) = map.get(name).cloned() else { return Ok(()) };
        run(Command::new("nbd-client").args(["-d", &dev]), &format!("detach {dev} (\"{name}\")"))?;
        map.remove(name);
        Ok(())
    }

    /// Every attached export and its device.
    pub fn attached(&self) -> Vec<(String, String)> {
        self.map().iter().map(|(n, d)| (n.clone(), d.clone())).collect()
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), SnapError> {
    let out = cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            SnapError::Attach(format!("cannot {what}: nbd-client is not installed (Debian package nbd-client)"))
        }
        _ => SnapError::Attach(format!("cannot {what}: cannot run nbd-client: {e}")),
    })?;
    if !out.status.success() {
        return Err(SnapError::Attach(format!(
            "cannot {what}: nbd-client failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The first `/dev/nbdN` the kernel has and nobody uses (no `pid` in sysfs).
fn free_nbd(in_use: &[String]) -> Result<String, SnapError> {
    let sys = Path::new("/sys/block");
    if !sys.join("nbd0").exists() {
        return Err(SnapError::Attach(
            "the kernel has no NBD devices (/sys/block/nbd0): load the module with `modprobe nbd` (root), or run with --attach none".into(),
        ));
    }
    for n in 0.. {
        let blk = sys.join(format!("nbd{n}"));
        if !blk.exists() {
            break;
        }
        let dev = format!("/dev/nbd{n}");
        if !blk.join("pid").exists() && !in_use.contains(&dev) {
            return Ok(dev);
        }
    }
    Err(SnapError::Attach("every /dev/nbdN is in use (modprobe nbd nbds_max=N for more)".into()))
}
