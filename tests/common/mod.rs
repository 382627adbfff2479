//! Helpers shared by the integration tests: kernel fixtures and Debian's thin tools;
//! the qemu guest of the kernel VM tests in [`guest`].
#![allow(dead_code)]

pub mod guest;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Directory of the checked-in kernel fixtures.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/kernel")
}

/// Names of every kernel fixture.
pub fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures_dir())
        .expect("tests/data/kernel")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("manifest.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.len() >= 9, "kernel fixtures missing: {names:?}");
    names
}

/// A kernel fixture unpacked into a temporary directory.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub metadata: PathBuf,
    pub data: PathBuf,
    pub manifest: serde_json::Value,
}

/// sha256 of a whole file, hex.
pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

/// Unpack `images.tar.xz` of a fixture (holes are kept) and check the images'
/// sha256 against the manifest.
pub fn unpack_fixture(name: &str) -> Fixture {
    let src = fixtures_dir().join(name);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("manifest.json")).expect("manifest")).expect("json");
    let dir = tempfile::tempdir().expect("tmp");
    let archive = File::open(src.join("images.tar.xz")).expect("archive");
    tar::Archive::new(xz2::read::XzDecoder::new(archive)).unpack(dir.path()).expect("unpack");
    let metadata = dir.path().join("metadata.img");
    let data = dir.path().join("data.img");
    assert_eq!(
        sha256_file(&metadata),
        manifest["metadata_image"]["sha256"].as_str().expect("sha"),
        "{name} metadata.img"
    );
    assert_eq!(sha256_file(&data), manifest["data_image"]["sha256"].as_str().expect("sha"), "{name} data.img");
    Fixture { dir, metadata, data, manifest }
}

/// Run Debian's `thin_check`; (passed, output).
pub fn thin_check(path: &Path) -> (bool, String) {
    let out = Command::new("thin_check")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("thin_check not found ({e}): install thin-provisioning-tools"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Run Debian's `thin_dump`; the XML.
pub fn thin_dump(path: &Path) -> String {
    let out = Command::new("thin_dump")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("thin_dump not found ({e}): install thin-provisioning-tools"));
    assert!(out.status.success(), "thin_dump failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Debian's thin_check and the strict checker, both: Ok, or what they reported.
pub fn checks(path: &Path) -> Result<(), String> {
    let (ok, out) = thin_check(path);
    if !ok {
        return Err(format!("thin_check: {out}"));
    }
    let storage =
        thinpool::io::FileStorage::new(File::open(path).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    let r = thinpool::check::check(&storage).map_err(|e| e.to_string())?;
    if r.is_clean() {
        Ok(())
    } else {
        Err(format!("strict check: {}", r.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; ")))
    }
}

/// Panic unless both checkers accept the metadata file.
pub fn assert_checks_pass(path: &Path) {
    if let Err(e) = checks(path) {
        panic!("{}: {e}", path.display());
    }
}

/// Create (truncating) `dir/metadata` and `dir/data` of the given sizes, open read-write.
pub fn pool_files(dir: &Path, metadata_bytes: u64, data_bytes: u64) -> (File, File) {
    let open = |name: &str, len: u64| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .expect("create pool file");
        f.set_len(len).expect("set_len");
        f
    };
    (open("metadata", metadata_bytes), open("data", data_bytes))
}

/// Open the pool in `dir` (files `metadata` and `data`).
pub fn open_pool(dir: &Path, read_only: bool) -> thinpool::pool::Pool {
    let open = |name: &str| {
        std::fs::OpenOptions::new().read(true).write(!read_only).open(dir.join(name)).expect("open pool file")
    };
    thinpool::pool::Pool::open(open("metadata"), open("data"), thinpool::pool::OpenOptions { read_only })
        .expect("open pool")
}
