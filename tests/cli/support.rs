//! Running thinctl and the thin tools from tests.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The outcome of one command.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub raw_stdout: Vec<u8>,
    pub what: String,
}

impl Run {
    fn from(what: String, out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            raw_stdout: out.stdout,
            what,
        }
    }

    /// Assert success; the standard output.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "`{}` failed:\n{}{}", self.what, self.stdout, self.stderr);
        &self.stdout
    }

    /// Assert failure with `code` (1 failed, 2 usage); the standard error.
    #[track_caller]
    pub fn fails(&self, code: i32) -> &str {
        assert_eq!(self.code, code, "`{}` should exit {code}:\n{}{}", self.what, self.stdout, self.stderr);
        &self.stderr
    }
}

/// A scratch directory to run thinctl in.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch { dir: tempfile::tempdir().expect("tempdir") }
    }

    /// `DIR/name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run thinctl with `args` in the scratch directory.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_with_input(args, None)
    }

    /// Run thinctl with `input` on its standard input.
    pub fn run_with_input(&self, args: &[&str], input: Option<&[u8]>) -> Run {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_thinctl"));
        cmd.args(args).current_dir(self.dir.path()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().expect("run thinctl");
        if let Some(data) = input {
            let mut stdin = child.stdin.take().expect("stdin");
            let data = data.to_vec();
            // Write from a thread so a child that stops reading cannot block the test.
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        let out = child.wait_with_output().expect("wait");
        Run::from(format!("thinctl {}", args.join(" ")), out)
    }

    /// Run thinctl and assert success; its standard output.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        self.run(args).ok().to_string()
    }

    /// A new pool `name` with `data_size` of data.
    pub fn pool(&self, name: &str, data_size: &str) -> PathBuf {
        self.ok(&["pool", "create", name, "--data-size", data_size]);
        self.path(name)
    }

    /// Write `bytes` to `DIR/name`.
    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("write file");
        p
    }
}

/// Assert that Debian's thin_check accepts a pool's metadata.
#[track_caller]
pub fn assert_thin_check(pool: &Path, after: &str) {
    let (ok, out) = crate::common::thin_check(&pool.join("metadata"));
    assert!(ok, "thin_check rejects the metadata after `{after}`:\n{out}");
}

/// Run Debian's `thin_restore -i xml -o metadata`; fails the test if it is missing.
#[track_caller]
pub fn thin_restore(xml: &Path, metadata: &Path) {
    let out = Command::new("thin_restore")
        .arg("-i")
        .arg(xml)
        .arg("-o")
        .arg(metadata)
        .output()
        .unwrap_or_else(|e| panic!("thin_restore not found ({e}): install thin-provisioning-tools"));
    assert!(
        out.status.success(),
        "thin_restore failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes of `len` that depend on `seed` and the offset (a misplaced block shows).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `ls --json` parsed.
pub fn ls_json(s: &Scratch, pool: &str) -> serde_json::Value {
    serde_json::from_str(&s.ok(&["ls", pool, "--json"])).expect("ls --json is JSON")
}

/// The `ls --json` entry of device `name`.
pub fn device_json(s: &Scratch, pool: &str, name: &str) -> serde_json::Value {
    let v = ls_json(s, pool);
    v["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no device {name} in {v}"))
        .clone()
}

/// The device names `ls --json` lists, in its order.
pub fn device_names(s: &Scratch, pool: &str) -> Vec<String> {
    ls_json(s, pool)["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["name"].as_str().expect("name").to_string())
        .collect()
}

/// `status --json` parsed.
pub fn status_json(s: &Scratch, pool: &str) -> serde_json::Value {
    serde_json::from_str(&s.ok(&["status", pool, "--json"])).expect("status --json is JSON")
}

/// Allocated bytes of a file (512-byte units of `st_blocks`).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// Flip one byte of a file.
pub fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).expect("write");
}

/// The little-endian u64 at `offset` of a file.
pub fn read_u64(path: &Path, offset: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("open");
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).expect("read");
    u64::from_le_bytes(b)
}
