//! Helpers for the snapshotter's tests: the real binary, containerd, ctr, and the
//! checkers. A missing tool fails the test naming its Debian package.
#![allow(dead_code)]

/// The qemu guest of the kernel VM tests: the root crate's helpers, one file for both crates.
#[path = "../../../tests/common/guest.rs"]
pub mod guest;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use thinpool::volume::PoolConfig;

/// Fail loudly when `cmd` is missing.
pub fn need(cmd: &str, package: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file())).unwrap_or(false)
            || Path::new("/usr/sbin").join(cmd).is_file()
            || Path::new("/sbin").join(cmd).is_file();
    assert!(found, "{cmd} is not installed: install the Debian package {package} (tools/test.sh does)");
}

/// A running snapshotter.
pub struct Snapshotter {
    pub child: Child,
    pub socket: PathBuf,
    pub nbd: String,
    pub stderr: PathBuf,
}

impl Snapshotter {
    /// Start `thinpool-snapshotter DIR --socket SOCK --attach none` and wait for its
    /// ready line.
    pub fn start(dir: &Path, socket: &Path, log: &Path) -> Snapshotter {
        Self::start_sized(dir, socket, log, "64G")
    }

    /// [`Snapshotter::start`] with file systems of `size`.
    pub fn start_sized(dir: &Path, socket: &Path, log: &Path, size: &str) -> Snapshotter {
        Self::start_as(dir, socket, log, size, None)
    }

    /// [`Snapshotter::start_sized`], run as user and group `uid` (through
    /// util-linux's `setpriv`) when given.
    pub fn start_as(dir: &Path, socket: &Path, log: &Path, size: &str, uid: Option<u32>) -> Snapshotter {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log");
        let bin = env!("CARGO_BIN_EXE_thinpool-snapshotter");
        let mut cmd = match uid {
            None => Command::new(bin),
            Some(u) => {
                need("setpriv", "util-linux");
                let mut c = Command::new("setpriv");
                c.args([format!("--reuid={u}"), format!("--regid={u}"), "--clear-groups".into(), "--".into()]);
                c.arg(bin);
                c
            }
        };
        let mut child = cmd
            .arg(dir)
            .arg("--socket")
            .arg(socket)
            .args(["--attach", "none", "--size", size, "--data-size", "2G", "--json"])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start thinpool-snapshotter");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!("no ready line ({e}): {line:?}; log: {}", std::fs::read_to_string(log).unwrap_or_default())
        });
        let nbd = ready["nbd"].as_str().expect("nbd").to_string();
        Snapshotter { child, socket: socket.to_path_buf(), nbd, stderr: log.to_path_buf() }
    }

    /// SIGTERM and wait: the exit status must be 0.
    pub fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("sigterm");
        let st = self.child.wait().expect("wait");
        assert!(st.success(), "snapshotter exit status {st}");
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// containerd with its own root, state and socket, and our snapshotter as the
/// proxy plugin `thinpool`.
pub struct Containerd {
    pub child: Child,
    pub socket: PathBuf,
    pub root: PathBuf,
}

impl Containerd {
    pub fn start(tmp: &Path, snap_socket: &Path) -> Containerd {
        need("containerd", "containerd");
        need("ctr", "containerd");
        let root = tmp.join("containerd");
        std::fs::create_dir_all(&root).expect("root");
        let socket = root.join("containerd.sock");
        let config = root.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{s}\"\n[ttrpc]\n  address = \"{s}.ttrpc\"\n\
                 [proxy_plugins]\n  [proxy_plugins.thinpool]\n    type = \"snapshot\"\n    address = \"{p}\"\n",
                r = root.display(),
                s = socket.display(),
                p = snap_socket.display()
            ),
        )
        .expect("config");
        let log = std::fs::File::create(root.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd { child, socket, root };
        let until = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(Instant::now() < until, "containerd did not start: {}", c.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr --address SOCK ARGS...`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr").arg("--address").arg(&self.socket).args(args).output().expect("run ctr")
    }

    /// `ctr snapshots --snapshotter thinpool ARGS...`, which must succeed; its stdout.
    pub fn snap(&self, args: &[&str]) -> String {
        let o = self.snap_out(args);
        assert!(
            o.status.success(),
            "ctr snapshots {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// [`Containerd::snap`] right after the snapshotter restarted: containerd's
    /// gRPC connection to it comes back by itself, with a backoff, so calls are
    /// retried while they fail with "unavailable" (for at most 30 s).
    pub fn snap_after_restart(&self, args: &[&str]) -> String {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let o = self.snap_out(args);
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            if o.status.success() || !err.contains("unavailable") || Instant::now() > until {
                assert!(o.status.success(), "ctr snapshots {args:?} failed: {err}");
                return String::from_utf8_lossy(&o.stdout).into_owned();
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `ctr snapshots --snapshotter thinpool ARGS...`.
    pub fn snap_out(&self, args: &[&str]) -> Output {
        let mut all = vec!["snapshots", "--snapshotter", "thinpool"];
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// The keys `ctr snapshots ls` lists, with parent and kind.
    pub fn ls(&self) -> Vec<(String, String, String)> {
        let out = self.snap_after_restart(&["ls"]);
        let mut rows: Vec<(String, String, String)> = out
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.len() {
                    2 => Some((f[0].into(), String::new(), f[1].into())),
                    3 => Some((f[0].into(), f[1].into(), f[2].into())),
                    _ => None,
                }
            })
            .collect();
        rows.sort();
        rows
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pool's description.
pub fn pool_config(dir: &Path) -> PoolConfig {
    let path = dir.join("pool.toml");
    PoolConfig::parse(&std::fs::read_to_string(&path).expect("pool.toml"), &path).expect("parse")
}

/// Snapshot records of the pool: (containerd key without its namespace prefix,
/// kind, device name).
pub fn records(dir: &Path) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = pool_config(dir)
        .devices
        .iter()
        .filter_map(|(name, e)| {
            let key = e.labels.get("thinpool.snapshotter/key")?;
            let kind = e.labels.get("thinpool.snapshotter/kind")?;
            // containerd's backend keys are NAMESPACE/ID/KEY.
            let short = key.rsplit('/').next().unwrap_or(key).to_string();
            Some((short, kind.clone(), name.clone()))
        })
        .collect();
    v.sort();
    v
}

/// Both checkers on a pool that nobody serves: Debian's thin_check and the strict
/// checker.
pub fn check_pool(dir: &Path) {
    need("thin_check", "thin-provisioning-tools");
    let meta = dir.join("metadata");
    let out = Command::new("thin_check").arg(&meta).output().expect("thin_check");
    assert!(
        out.status.success(),
        "thin_check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::File::open(&meta).expect("metadata");
    let storage = thinpool::io::FileStorage::new(file).expect("storage");
    let report = thinpool::check::check(&storage).expect("check");
    assert!(report.is_clean(), "strict checker: {:?}", report.problems);
}

/// The served pool's data blocks in use, through the control socket.
pub fn data_used_blocks(dir: &Path) -> u64 {
    use thinpool::server::protocol::{Request, Response};
    match thinpool::server::control::call(&dir.join("control.sock"), &Request::Status).expect("status") {
        Response::Status { status } => status.data_used_blocks,
        other => panic!("not a status: {other:?}"),
    }
}

/// Write `len` bytes of `pattern` at 0 of export `name` with qemu-io.
pub fn write_export(nbd: &str, name: &str, len: &str, pattern: u8) {
    need("qemu-io", "qemu-utils");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P {pattern} 0 {len}"), &format!("nbd://{nbd}/{name}")])
        .output()
        .expect("qemu-io");
    assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
}

/// Wait until `f` is true (bounded).
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
