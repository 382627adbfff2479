//! `import` and `export`: raw images in and out, holes, zero blocks, a full pool.

use std::os::unix::io::AsRawFd;
use std::process::{Command, Stdio};

use crate::support::*;

fn s(p: &std::path::Path) -> &str {
    p.to_str().expect("utf8 path")
}

#[test]
fn import_then_export_gives_the_same_bytes() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "4M"]);
    // Random data, an all-zero stretch, a partial last block.
    let mut data = pattern(10, 3 << 20);
    data[1 << 20..(1 << 20) + 5 * 65536].fill(0);
    data.extend_from_slice(&pattern(11, 12_345));
    let img = sc.file("img", &data);
    let r = sc.run(&["import", "p", "web", s(&img)]);
    assert!(r.ok().contains("imported"), "{}", r.stdout);
    assert!(r.stderr.is_empty(), "no progress bar when stderr is not a terminal: {}", r.stderr);
    sc.ok(&["export", "p", "web", "out"]);
    let out = std::fs::read(sc.path("out")).expect("out");
    assert_eq!(out.len(), 4 << 20, "export writes the whole device");
    assert_eq!(&out[..data.len()], &data[..]);
    assert!(out[data.len()..].iter().all(|&b| b == 0));
    // --sync (fsync the file before exiting) writes the same bytes, to a file or a pipe.
    sc.ok(&["export", "p", "web", "synced", "--sync"]);
    assert_eq!(std::fs::read(sc.path("synced")).expect("synced"), out);
    let piped = sc.run(&["export", "p", "web", "-", "--sync"]);
    piped.ok();
    assert_eq!(piped.raw_stdout, out, "--sync to standard output");
    assert_thin_check(&sc.path("p"), "import");
}

#[test]
fn export_to_a_regular_file_leaves_holes_for_unmapped_blocks() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "64M"]);
    // One mapped block at 32 MiB: the export is 64 MiB long, 64 KiB allocated.
    let mut data = vec![0u8; 32 << 20];
    data.extend_from_slice(&pattern(12, 65536));
    let img = sc.file("img", &data);
    sc.ok(&["import", "p", "web", s(&img)]);
    assert_eq!(device_json(&sc, "p", "web")["mapped_bytes"], 65536);
    // An existing longer file is replaced, not patched.
    sc.file("out", &vec![0xffu8; 80 << 20]);
    sc.ok(&["export", "p", "web", "out"]);
    let out = sc.path("out");
    assert_eq!(std::fs::metadata(&out).expect("stat").len(), 64 << 20);
    let allocated = allocated_bytes(&out);
    assert!(allocated <= 256 << 10, "{allocated} bytes allocated for one 64 KiB block");
    // SEEK_DATA finds the one block.
    let f = std::fs::File::open(&out).expect("open");
    let first_data = nix::unistd::lseek(f.as_raw_fd(), 0, nix::unistd::Whence::SeekData).expect("SEEK_DATA");
    assert_eq!(first_data as u64, 32 << 20);
    let bytes = std::fs::read(&out).expect("read");
    assert_eq!(&bytes[..data.len()], &data[..]);
}

#[test]
fn export_to_standard_output_streams_every_byte() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "1M"]);
    let data = [vec![0u8; 300_000], pattern(13, 200_000)].concat();
    let img = sc.file("img", &data);
    sc.ok(&["import", "p", "web", s(&img)]);
    let r = sc.run(&["export", "p", "web", "-"]);
    r.ok();
    assert_eq!(r.raw_stdout.len(), 1 << 20);
    assert_eq!(&r.raw_stdout[..data.len()], &data[..]);
    assert!(r.raw_stdout[data.len()..].iter().all(|&b| b == 0));
}

#[test]
fn import_leaves_zero_blocks_unmapped_and_unmaps_them_when_they_were_mapped() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "1M"]);
    let img = sc.file("full", &pattern(14, 1 << 20));
    sc.ok(&["import", "p", "web", s(&img)]);
    assert_eq!(device_json(&sc, "p", "web")["mapped_bytes"], 1 << 20);
    // Same length, every other block zero.
    let mut data = pattern(15, 1 << 20);
    for b in (0..16).step_by(2) {
        data[b * 65536..(b + 1) * 65536].fill(0);
    }
    let img = sc.file("half", &data);
    let out = sc.ok(&["import", "p", "web", s(&img)]);
    assert!(out.contains("8 blocks written, 0 unchanged, 8 unmapped"), "{out}");
    assert_eq!(device_json(&sc, "p", "web")["mapped_bytes"], 8 * 65536);
    assert_eq!(status_json(&sc, "p")["data_used_blocks"], 8, "the unmapped blocks are free");
    sc.ok(&["export", "p", "web", "out"]);
    assert_eq!(std::fs::read(sc.path("out")).expect("out"), data);
    // Importing the same image again changes nothing.
    let out = sc.ok(&["import", "p", "web", s(&img)]);
    assert!(out.contains("0 blocks written, 8 unchanged, 0 unmapped"), "{out}");
    assert_thin_check(&sc.path("p"), "import with zero blocks");
}

#[test]
fn import_grows_a_smaller_device_and_zeroes_the_rest_of_a_larger_one() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "100k"]);
    let big = pattern(16, 1_000_000);
    let img = sc.file("big", &big);
    let out = sc.ok(&["import", "p", "web", s(&img)]);
    assert!(out.contains("grown from 100 KiB"), "{out}");
    assert_eq!(device_json(&sc, "p", "web")["size_bytes"], 1_000_000);
    // A shorter image: the device keeps its size and reads as zeros after the image.
    let small = pattern(17, 70_000);
    let img = sc.file("small", &small);
    sc.ok(&["import", "p", "web", s(&img)]);
    assert_eq!(device_json(&sc, "p", "web")["size_bytes"], 1_000_000);
    assert_eq!(device_json(&sc, "p", "web")["mapped_bytes"], 2 * 65536);
    sc.ok(&["export", "p", "web", "out"]);
    let out = std::fs::read(sc.path("out")).expect("out");
    assert_eq!(&out[..small.len()], &small[..]);
    assert!(out[small.len()..].iter().all(|&b| b == 0));
    assert_thin_check(&sc.path("p"), "import of a shorter image");
}

#[test]
fn import_into_a_snapshot_keeps_identical_blocks_shared() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "base", "--size", "1M"]);
    let data = pattern(18, 1 << 20);
    let img = sc.file("img", &data);
    sc.ok(&["import", "p", "base", s(&img)]);
    sc.ok(&["snapshot", "p", "base", "snap"]);
    let mut changed = data.clone();
    changed[5 * 65536 + 10] ^= 1;
    let img2 = sc.file("img2", &changed);
    let out = sc.ok(&["import", "p", "snap", s(&img2)]);
    assert!(out.contains("1 blocks written, 15 unchanged"), "{out}");
    assert_eq!(device_json(&sc, "p", "snap")["exclusive_bytes"], 65536);
    assert_eq!(status_json(&sc, "p")["data_used_blocks"], 17);
    sc.ok(&["export", "p", "base", "o1"]);
    sc.ok(&["export", "p", "snap", "o2"]);
    assert_eq!(std::fs::read(sc.path("o1")).expect("o1"), data, "the origin is untouched");
    assert_eq!(std::fs::read(sc.path("o2")).expect("o2"), changed);
}

#[test]
fn importing_past_the_data_space_fails_and_changes_nothing() {
    let sc = Scratch::new();
    let p = sc.pool("p", "1M");
    sc.ok(&["create", "p", "web", "--size", "4M"]);
    let first = pattern(19, 10 * 65536);
    let img = sc.file("first", &first);
    sc.ok(&["import", "p", "web", s(&img)]);
    let meta = std::fs::read(p.join("metadata")).expect("metadata");
    let toml = std::fs::read(p.join("pool.toml")).expect("toml");
    let big = sc.file("big", &pattern(20, 2 << 20));
    let err = sc.run(&["import", "p", "web", s(&big)]).fails(1).to_string();
    assert!(err.contains("the pool is full") && err.contains("nothing was changed"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(p.join("metadata")).expect("metadata"), meta, "metadata unchanged");
    assert_eq!(std::fs::read(p.join("pool.toml")).expect("toml"), toml, "pool.toml unchanged");
    sc.ok(&["export", "p", "web", "out"]);
    assert_eq!(&std::fs::read(sc.path("out")).expect("out")[..first.len()], &first[..]);
    // A new device that would not fit is not created either.
    let err = sc.run(&["import", "p", "new", s(&big), "--create"]).fails(1).to_string();
    assert!(err.contains("the pool is full"), "{err}");
    assert!(ls_json(&sc, "p")["devices"].as_array().expect("devices").len() == 1);
    assert_thin_check(&p, "a failed import");
    // Filling the pool exactly works, and status says so.
    let fill = sc.file("fill", &pattern(21, 16 * 65536));
    sc.ok(&["import", "p", "web", s(&fill)]);
    assert_eq!(status_json(&sc, "p")["mode"], "out-of-data-space");
    assert_thin_check(&p, "filling the pool");
}

#[test]
fn import_creates_the_device_only_when_asked() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    let data = pattern(22, 300_000);
    let img = sc.file("img", &data);
    let err = sc.run(&["import", "p", "web", s(&img)]).fails(1).to_string();
    assert!(err.contains("no such device \"web\""), "{err}");
    sc.ok(&["import", "p", "web", s(&img), "--create"]);
    let d = device_json(&sc, "p", "web");
    assert_eq!(d["size_bytes"], 300_000);
    assert!(d["creation_time"].is_u64());
    sc.ok(&["export", "p", "web", "out"]);
    assert_eq!(std::fs::read(sc.path("out")).expect("out"), data);
    let err = sc.run(&["import", "p", "web", "missing.img"]).fails(1).to_string();
    assert!(err.contains("cannot open missing.img"), "{err}");
    assert_thin_check(&sc.path("p"), "import --create");
}

#[test]
fn export_refuses_to_overwrite_the_pools_own_files() {
    let sc = Scratch::new();
    let p = sc.pool("p", "1M");
    sc.ok(&["create", "p", "web", "--size", "1M"]);
    let before = std::fs::metadata(p.join("data")).expect("data").len();
    let err = sc.run(&["export", "p", "web", "p/data"]).fails(1).to_string();
    assert!(err.contains("one of the pool's own files"), "{err}");
    assert_eq!(std::fs::metadata(p.join("data")).expect("data").len(), before);
    assert_thin_check(&p, "a refused export");
}

#[test]
fn export_to_a_pipe_that_closes_early_fails_without_a_panic() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "64M"]);
    let child = Command::new(env!("CARGO_BIN_EXE_thinctl"))
        .args(["export", "p", "web", "-"])
        .current_dir(sc.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut child = child;
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write") && !err.contains("panicked"), "{err}");
}

const BLOCK: usize = 65536;

/// A sparse image of `len` bytes: holes except where `extents` put bytes (written
/// with `pwrite`, so an all-zero extent is a data extent holding zeros).
fn sparse_image(sc: &Scratch, name: &str, len: u64, extents: &[(u64, Vec<u8>)]) -> (std::path::PathBuf, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let path = sc.path(name);
    let f = std::fs::File::create(&path).expect("create image");
    f.set_len(len).expect("size image");
    let mut bytes = vec![0u8; len as usize];
    for (off, data) in extents {
        f.write_all_at(data, *off).expect("write image");
        bytes[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    (path, bytes)
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// The data extents of a file as `SEEK_DATA`/`SEEK_HOLE` see them.
fn data_extents(path: &std::path::Path) -> Vec<(u64, u64)> {
    use nix::unistd::{lseek, Whence};
    let f = std::fs::File::open(path).expect("open");
    let len = f.metadata().expect("stat").len() as i64;
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < len {
        let Ok(start) = lseek(f.as_raw_fd(), pos, Whence::SeekData) else { break };
        let end = lseek(f.as_raw_fd(), start, Whence::SeekHole).expect("SEEK_HOLE");
        out.push((start as u64, end as u64));
        pos = end;
    }
    out
}

/// Indexes of the blocks of `bytes` holding a non-zero byte.
fn nonzero_blocks(bytes: &[u8]) -> Vec<usize> {
    bytes.chunks(BLOCK).enumerate().filter(|(_, c)| c.iter().any(|&b| b != 0)).map(|(i, _)| i).collect()
}

/// Every data extent of `path` lies inside blocks of `bytes` that hold data.
#[track_caller]
fn assert_holes_where_zero(path: &std::path::Path, bytes: &[u8]) {
    let nonzero = nonzero_blocks(bytes);
    for (s, e) in data_extents(path) {
        for b in s as usize / BLOCK..(e as usize).div_ceil(BLOCK) {
            assert!(nonzero.contains(&b), "{}: data extent {s}..{e} covers all-zero block {b}", path.display());
        }
    }
}

#[test]
fn a_sparse_image_round_trips_with_its_holes_and_a_partial_last_block() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    // 20 MiB + 12345 bytes: extents at unaligned offsets, one straddling blocks, an
    // extent of written zeros (a data extent that must stay unmapped), the tail.
    let len = (20 << 20) + 12_345;
    let extents = vec![
        (100, pattern(30, 5000)),
        (3 * BLOCK as u64 - 10, pattern(31, 20)),
        (5 << 20, pattern(32, 2 << 20)),
        (9 << 20, vec![0u8; 4 * BLOCK]),
        (len - 7000, pattern(33, 7000)),
    ];
    let (img, bytes) = sparse_image(&sc, "img", len, &extents);
    let nonzero = nonzero_blocks(&bytes);
    let out = sc.ok(&["import", "p", "web", s(&img), "--create"]);
    assert!(out.contains(&format!("{} blocks written, 0 unchanged, 0 unmapped", nonzero.len())), "{out}");
    let d = device_json(&sc, "p", "web");
    assert_eq!(d["size_bytes"], len);
    assert_eq!(d["mapped_bytes"], (nonzero.len() * BLOCK) as u64, "only non-zero blocks are mapped");
    sc.ok(&["export", "p", "web", "out"]);
    let out = std::fs::read(sc.path("out")).expect("out");
    assert_eq!(out.len() as u64, len);
    assert_eq!(sha256(&out), sha256(&bytes));
    assert_holes_where_zero(&sc.path("out"), &bytes);
    // Streamed, the holes come out as zeros.
    let r = sc.run(&["export", "p", "web", "-"]);
    r.ok();
    assert_eq!(sha256(&r.raw_stdout), sha256(&bytes));
    assert_thin_check(&sc.path("p"), "import of a sparse image");
}

#[test]
fn a_dense_image_round_trips_byte_for_byte() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    let data = pattern(34, (6 << 20) + 777);
    let img = sc.file("img", &data);
    let out = sc.ok(&["import", "p", "web", s(&img), "--create"]);
    let blocks = data.len().div_ceil(BLOCK);
    assert!(out.contains(&format!("{blocks} blocks written, 0 unchanged, 0 unmapped")), "{out}");
    sc.ok(&["export", "p", "web", "out"]);
    assert_eq!(sha256(&std::fs::read(sc.path("out")).expect("out")), sha256(&data));
    // Importing it again writes nothing.
    let out = sc.ok(&["import", "p", "web", s(&img)]);
    assert!(out.contains(&format!("0 blocks written, {blocks} unchanged, 0 unmapped")), "{out}");
    assert_thin_check(&sc.path("p"), "import of a dense image");
}

#[test]
fn importing_a_sparse_image_over_a_full_device_unmaps_its_holes() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "1M"]);
    let dense = pattern(35, 1 << 20);
    let img = sc.file("dense", &dense);
    sc.ok(&["import", "p", "web", s(&img)]);
    sc.ok(&["snapshot", "p", "web", "snap"]);
    // Block 3 as before (unchanged), block 10 new (written), block 12 written zeros
    // (a data extent: unmapped), everything else a hole (unmapped).
    let extents = vec![
        (3 * BLOCK as u64, dense[3 * BLOCK..4 * BLOCK].to_vec()),
        (10 * BLOCK as u64, pattern(36, BLOCK)),
        (12 * BLOCK as u64, vec![0u8; BLOCK]),
    ];
    let (sparse, bytes) = sparse_image(&sc, "sparse", 1 << 20, &extents);
    let out = sc.ok(&["import", "p", "web", s(&sparse)]);
    assert!(out.contains("1 blocks written, 1 unchanged, 14 unmapped"), "{out}");
    assert_eq!(device_json(&sc, "p", "web")["mapped_bytes"], 2 * BLOCK as u64);
    sc.ok(&["export", "p", "web", "out"]);
    assert_eq!(sha256(&std::fs::read(sc.path("out")).expect("out")), sha256(&bytes));
    assert_holes_where_zero(&sc.path("out"), &bytes);
    sc.ok(&["export", "p", "snap", "orig"]);
    assert_eq!(std::fs::read(sc.path("orig")).expect("orig"), dense, "the snapshot keeps the old bytes");
    assert_thin_check(&sc.path("p"), "a sparse import over mapped blocks");
}

#[test]
fn an_all_hole_image_maps_nothing_and_exports_as_a_hole() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    let (img, bytes) = sparse_image(&sc, "img", 8 << 20, &[]);
    let out = sc.ok(&["import", "p", "web", s(&img), "--create"]);
    assert!(out.contains("0 blocks written, 0 unchanged, 0 unmapped"), "{out}");
    assert_eq!(device_json(&sc, "p", "web")["mapped_bytes"], 0);
    sc.ok(&["export", "p", "web", "out"]);
    assert_eq!(std::fs::read(sc.path("out")).expect("out"), bytes);
    assert!(data_extents(&sc.path("out")).is_empty(), "no data in the export");
}
