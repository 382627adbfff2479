//! The qemu guest of `tools/guest` for the kernel VM tests: run a script in it, and
//! build the "payload" disk that carries programs (with their shared libraries) and
//! files into it.
//!
//! Shared by the root crate's tests (`mod common;`, then `common::guest::...`) and the
//! snapshotter's (its `tests/common/mod.rs` includes this file by path), so it uses
//! `std` and `tempfile` only and finds the repository root from either crate.
//! A missing tool fails the test naming its Debian package; nothing is skipped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The repository root: the nearest ancestor of the crate being tested that holds
/// `tools/guest/run.sh` (the root crate itself, or the parent of `snapshotter/`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|d| d.join("tools/guest/run.sh").is_file())
        .unwrap_or_else(|| panic!("no tools/guest/run.sh in {} or above it", manifest.display()))
        .to_path_buf()
}

/// Run `script` as root in the guest: `tools/guest/run.sh SCRIPT DISKS...`, the disks
/// appearing as /dev/vda, /dev/vdb, ... in order. `VM_TIMEOUT` is 900 s (TCG is
/// slow) unless `env` sets it; `env` adds the rest (`GUEST_KERNEL`, `VM_MEM`, ...).
///
/// Prints how long the guest ran and, to stderr prefixed `guest| `, the console
/// from the line `== guest script start` on. Panics with the whole output unless the
/// script succeeded; returns the output (stdout, then stderr).
pub fn run_guest(script: &str, disks: &[&Path], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("test.sh");
    std::fs::write(&path, script).expect("script");
    let runner = repo_root().join("tools/guest/run.sh");
    let t = Instant::now();
    let out = Command::new(&runner)
        .arg(&path)
        .args(disks)
        .env("VM_TIMEOUT", "900")
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", runner.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("guest ran for {:.1} s", t.elapsed().as_secs_f64());
    for line in text.lines().skip_while(|l| !l.contains("== guest script start")) {
        eprintln!("guest| {line}");
    }
    assert!(out.status.success(), "guest failed:\n{text}");
    text
}

/// A disk image, `dir/payload.img`, holding a newc cpio archive (padded to a whole
/// number of MiB, for the virtio disk) that the guest unpacks with
/// `cd / && cpio -idm < /dev/vdX`.
///
/// `programs`: (executable on the host, path in the archive), each also bringing the
/// shared libraries `ldd` lists for it, at their own paths. `files`: (file on the
/// host, path in the archive), copied as they are. Paths in the archive are relative
/// to the guest's `/`, e.g. `sbin/thinctl`. The archive is staged in `dir/stage`.
pub fn payload_disk(dir: &Path, programs: &[(&Path, &str)], files: &[(&Path, &str)]) -> PathBuf {
    let stage = dir.join("stage");
    let mut listed = Vec::new();
    let mut add = |from: &Path, rel: &str| {
        assert!(!rel.starts_with('/'), "{rel}: paths in the archive are relative to the guest's /");
        let to = stage.join(rel);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        listed.push(rel.to_string());
    };
    for (exe, rel) in programs {
        add(exe, rel);
        let ldd = Command::new("ldd").arg(exe).output().expect("ldd");
        for lib in String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
            add(Path::new(lib), lib.trim_start_matches('/'));
        }
    }
    for (from, rel) in files {
        add(from, rel);
    }
    // Programs share libraries: each path once.
    listed.sort();
    listed.dedup();
    let image = dir.join("payload.img");
    let mut cpio = Command::new("cpio")
        .current_dir(&stage)
        .args(["-o", "-H", "newc", "--quiet"])
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&image).expect("image"))
        .spawn()
        .unwrap_or_else(|e| panic!("cpio not runnable ({e}): install the Debian package cpio (tools/test.sh does)"));
    cpio.stdin.take().expect("stdin").write_all((listed.join("\n") + "\n").as_bytes()).expect("file list");
    assert!(cpio.wait().expect("cpio").success(), "cpio failed");
    let len = std::fs::metadata(&image).expect("image").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("image")
        .set_len(len.div_ceil(1 << 20) * (1 << 20))
        .expect("pad");
    image
}
