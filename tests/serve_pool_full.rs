//! The pool filling up, end to end through the real `thinctl serve` and raw NBD
//! sockets on loopback: metadata exhaustion is a clean ENOSPC (not EIO) that leaves
//! reads, deletes and later writes working; metadata that may grow never runs out;
//! a full host file system reaches the client as ENOSPC and recovers once a TRIM
//! frees space; queue mode fails a write after --no-space-timeout and lets a waiting
//! write through when another connection frees a block.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use thinpool::nbd::wire;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const ENOSPC: u32 = 28;
const EIO: u32 = 5;

fn thinctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinctl")).args(args).output().expect("run thinctl")
}

fn thinctl_ok(args: &[&str]) -> String {
    let out = thinctl(args);
    assert!(
        out.status.success(),
        "thinctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_json(dir: &str) -> serde_json::Value {
    serde_json::from_str(&thinctl_ok(&["status", dir, "--json"])).expect("status --json")
}

/// `thinctl serve DIR ...` on an ephemeral loopback port; SIGKILLed if the test fails.
struct Served {
    child: Child,
    port: u16,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &str, extra: &[&str]) -> Served {
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["serve", dir, "--listen", &listen];
    args.extend_from_slice(extra);
    let child =
        Command::new(env!("CARGO_BIN_EXE_thinctl")).args(&args).stdout(Stdio::piped()).spawn().expect("thinctl serve");
    let mut served = Served { child, port };
    let mut line = String::new();
    BufReader::new(served.child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("serving line");
    assert!(line.contains("serving pool"), "{line}");
    served
}

impl Served {
    /// SIGTERM, then wait at most 30 s for the exit; its status.
    fn terminate(&mut self) -> ExitStatus {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "thinctl serve still running 30 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A minimal blocking NBD client: fixed newstyle, GO, simple replies, one request at a time.
struct Nbd(TcpStream);

impl Nbd {
    fn connect(port: u16, name: &str) -> Nbd {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.set_nodelay(true).expect("nodelay");
        // Every request finishes well within this (queued writes wait at most 2 s here).
        c.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).expect("hello");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        c.write_all(&(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES).to_be_bytes()).expect("flags");
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = wire::IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&wire::OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        c.write_all(&opt).expect("go");
        loop {
            let mut h = [0u8; 20];
            c.read_exact(&mut h).expect("option reply");
            let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
            let mut d = vec![0u8; len as usize];
            c.read_exact(&mut d).expect("option data");
            if kind == wire::REP_ACK {
                return Nbd(c);
            }
            assert_eq!(kind, wire::REP_INFO, "GO {name} refused");
        }
    }

    /// Send one request and read its simple reply header; the NBD error.
    fn request(&mut self, command: wire::Command, offset: u64, length: u32, payload: &[u8]) -> u32 {
        let r = wire::Request { flags: 0, command, cookie: offset ^ 0x5eed, offset, length };
        let mut msg = wire::encode_request(&r).to_vec();
        msg.extend_from_slice(payload);
        self.0.write_all(&msg).expect("request");
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).expect("reply");
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().expect("4")), wire::SIMPLE_REPLY_MAGIC);
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().expect("8")), offset ^ 0x5eed, "cookie");
        u32::from_be_bytes(h[4..8].try_into().expect("4"))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.request(wire::Command::Write, offset, data.len() as u32, data)
    }

    fn trim(&mut self, offset: u64, length: u64) -> u32 {
        self.request(wire::Command::Trim, offset, length as u32, &[])
    }

    fn flush(&mut self) -> u32 {
        self.request(wire::Command::Flush, 0, 0, &[])
    }

    /// Read; Err(NBD error) when the server failed it (simple replies carry no data then).
    fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, u32> {
        let err = self.request(wire::Command::Read, offset, length as u32, &[]);
        if err != 0 {
            return Err(err);
        }
        let mut buf = vec![0u8; length as usize];
        self.0.read_exact(&mut buf).expect("read payload");
        Ok(buf)
    }
}

/// What the device should hold: 4 KiB records by offset, each filled with one byte.
type Model = BTreeMap<u64, u8>;

/// Read every record in the model (and check it), on `c`.
fn verify(c: &mut Nbd, model: &Model, what: &str) {
    for (&off, &byte) in model {
        let got = c.read(off, 4 * KIB).unwrap_or_else(|e| panic!("{what}: read at {off} failed with NBD error {e}"));
        assert!(got.iter().all(|&b| b == byte), "{what}: record at {off} should be all {byte:#x}");
    }
}

const DEVICE: u64 = 256 * MIB;

/// The i-th scattered 4 KiB record: spread over the device's 64 KiB blocks so that
/// each touches another leaf of the mapping tree.
fn scattered(i: u64) -> u64 {
    let blocks = DEVICE / (64 * KIB);
    let block = (i * 2_654_435_761) % blocks;
    block * 64 * KIB + ((i % 16) * 4 * KIB)
}

/// Outcome of the snapshot-and-scattered-writes workload.
struct Workload {
    model: Model,
    snapshots: Vec<String>,
    /// Offset and byte of the write that got ENOSPC, if one did.
    refused: Option<(u64, u8)>,
    /// A record written after the last snapshot: its block is mapped and unshared.
    unshared: Option<u64>,
    writes: u64,
}

/// Rounds of (a live snapshot through the control socket, then 64 scattered 4 KiB
/// writes) until a write fails or `rounds` are done. Every write answers 0 or ENOSPC,
/// never EIO.
fn snapshot_workload(d: &str, c: &mut Nbd, rounds: usize) -> Workload {
    let mut w = Workload { model: Model::new(), snapshots: Vec::new(), refused: None, unshared: None, writes: 0 };
    let mut i = 0u64;
    for round in 0..rounds {
        let name = format!("snap{round}");
        let out = thinctl(&["snapshot", d, "disk", &name]);
        if out.status.success() {
            w.snapshots.push(name);
            w.unshared = None;
        } else {
            let msg = String::from_utf8_lossy(&out.stderr).to_lowercase();
            assert!(
                msg.contains("space") || msg.contains("nospc"),
                "a snapshot refused for want of metadata should say so: {msg}"
            );
        }
        for _ in 0..64 {
            let off = scattered(i);
            let byte = (i % 251) as u8 + 1;
            i += 1;
            let err = c.write(off, &[byte; 4096]);
            assert_ne!(err, EIO, "write {i} at {off}: EIO where ENOSPC was expected");
            if err == ENOSPC {
                w.refused = Some((off, byte));
                return w;
            }
            assert_eq!(err, 0, "write {i} at {off}: NBD error {err}");
            w.model.insert(off, byte);
            w.unshared = Some(off);
            w.writes += 1;
        }
    }
    w
}

#[test]
fn metadata_exhaustion_is_enospc_and_the_pool_keeps_working() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let d = dir.to_str().expect("utf8").to_string();
    thinctl_ok(&["pool", "create", &d, "--data-size", "256M", "--metadata-size", "256k"]);
    // The device is created through the server: offline, `thinctl create` grows a
    // 256 KiB metadata file to 4.25 MiB by itself (no --metadata-max offline).
    let mut server = serve(&d, &["--metadata-max", "0", "--no-space", "error"]);
    thinctl_ok(&["create", &d, "disk", "--size", "256M"]);
    let mut c = Nbd::connect(server.port, "disk");

    let w = snapshot_workload(&d, &mut c, 1000);
    let (refused_off, refused_byte) = w.refused.expect("256 KiB of metadata that may not grow never filled up");
    let st = status_json(&d);
    eprintln!("ENOSPC after {} writes and {} snapshots: {st}", w.writes, w.snapshots.len());
    let size = std::fs::metadata(dir.join("metadata")).expect("metadata").len();
    assert_eq!(size, 256 * KIB, "the metadata file grew under --metadata-max 0: {st}");

    // The refused write changed nothing; reads are right on this connection and a new one.
    let mut before = w.model.clone();
    before.entry(refused_off).or_insert(0);
    verify(&mut c, &before, "old connection after ENOSPC");
    let mut c2 = Nbd::connect(server.port, "disk");
    verify(&mut c2, &before, "new connection after ENOSPC");
    let st = status_json(&d);
    assert_eq!(st["mode"], "out-of-metadata-space", "{st}");

    // What needs no new metadata keeps working: FLUSH, and (when one is known) a write
    // to a block mapped only by "disk".
    assert_eq!(c.flush(), 0, "FLUSH while out of metadata space");
    let mut model = w.model.clone();
    if let Some(off) = w.unshared {
        assert_eq!(c.write(off, &[0xee; 4096]), 0, "write to a mapped unshared block while out of metadata");
        model.insert(off, 0xee);
    }
    // The same write again still fails cleanly.
    assert_eq!(c.write(refused_off, &[refused_byte; 4096]), ENOSPC, "still out of metadata space");

    // Deleting the snapshots online frees metadata; writes resume without a restart.
    for s in &w.snapshots {
        thinctl_ok(&["delete", &d, s]);
    }
    assert_eq!(c.write(refused_off, &[refused_byte; 4096]), 0, "write after the snapshots were deleted");
    model.insert(refused_off, refused_byte);
    for k in 0..64u64 {
        let off = scattered(1_000_000 + k);
        assert_eq!(c2.write(off, &[0x42; 4096]), 0, "new write {k} after the deletes");
        model.insert(off, 0x42);
    }
    assert_eq!(c.flush(), 0);
    verify(&mut c2, &model, "after the deletes");
    let st = status_json(&d);
    assert_eq!(st["mode"], "rw", "{st}");
    drop(c);
    drop(c2);

    assert!(server.terminate().success(), "serve exits 0 on SIGTERM");
    common::assert_checks_pass(&dir.join("metadata"));
    thinctl_ok(&["check", &d]);
    // And what was flushed is what a fresh server serves.
    let server = serve(&d, &[]);
    let mut c = Nbd::connect(server.port, "disk");
    verify(&mut c, &model, "after a restart");
}

#[test]
fn metadata_that_may_grow_never_runs_out() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let d = dir.to_str().expect("utf8").to_string();
    thinctl_ok(&["pool", "create", &d, "--data-size", "256M", "--metadata-size", "256k"]);
    let mut server = serve(&d, &["--no-space", "error"]);
    thinctl_ok(&["create", &d, "disk", "--size", "256M"]);
    let mut c = Nbd::connect(server.port, "disk");
    // Well past what fills 256 KiB (the test above needs far fewer rounds).
    let w = snapshot_workload(&d, &mut c, 40);
    assert!(w.refused.is_none(), "ENOSPC at {:?} although metadata may grow", w.refused);
    assert_eq!(w.snapshots.len(), 40, "every snapshot succeeded");
    let grown = std::fs::metadata(dir.join("metadata")).expect("metadata").len();
    assert!(grown > 256 * KIB, "the metadata file did not grow ({grown} bytes)");
    let st = status_json(&d);
    assert_eq!(st["mode"], "rw", "{st}");
    assert!(st["metadata_total_blocks"].as_u64().expect("total") * 4096 > 256 * KIB, "{st}");
    verify(&mut c, &w.model, "after growing");
    assert_eq!(c.flush(), 0);
    drop(c);
    assert!(server.terminate().success(), "serve exits 0 on SIGTERM");
    common::assert_checks_pass(&dir.join("metadata"));
    thinctl_ok(&["check", &d]);
}

/// A small tmpfs mounted on a temporary directory; unmounted on drop (lazily, so a
/// failing test still leaves nothing mounted).
struct SmallFs {
    mnt: PathBuf,
    _tmp: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let tmp = tempfile::tempdir().expect("tmp");
        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .output()
            .unwrap_or_else(|e| panic!("mount not found ({e})"));
        assert!(out.status.success(), "mount tmpfs (tests run as root): {}", String::from_utf8_lossy(&out.stderr));
        SmallFs { mnt, _tmp: tmp }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf8").to_string()
}

const CHUNK: u64 = 64 * KIB;

fn chunk_byte(off: u64) -> u8 {
    ((off / CHUNK) % 251) as u8 + 1
}

/// Check the 64 KiB blocks in `[from, upto)` hold what `fill_host` wrote.
fn check_chunks(c: &mut Nbd, from: u64, upto: u64, what: &str) {
    let mut o = from;
    while o < upto {
        let got = c.read(o, CHUNK).unwrap_or_else(|e| panic!("{what}: read at {o}: NBD error {e}"));
        assert!(got.iter().all(|&b| b == chunk_byte(o)), "{what}: block at {o} lost its data");
        o += CHUNK;
    }
}

/// A pool on a 24 MiB tmpfs whose sparse data file is 256 MiB, served, and filled
/// with 64 KiB writes (flushed every 1 MiB) until the host refuses one: that write
/// gets ENOSPC, not EIO. Returns (fs, pool dir, server, connection, offset of the
/// refused write, bytes written and flushed before it).
fn fill_host() -> (SmallFs, String, Served, Nbd, u64, u64) {
    let fs = SmallFs::mount("24m");
    let d = path_str(&fs.mnt.join("pool"));
    thinctl_ok(&["pool", "create", &d, "--data-size", "256M", "--metadata-size", "2M"]);
    thinctl_ok(&["create", &d, "disk", "--size", "256M"]);
    let server = serve(&d, &["--no-space", "error", "--metadata-max", "0", "--commit-interval-ms", "600000"]);
    let mut c = Nbd::connect(server.port, "disk");
    let mut flushed = 0u64; // bytes [0, flushed) were written and flushed
    let mut off = 0u64;
    let refused = loop {
        assert!(off < 256 * MIB, "a 24 MiB tmpfs held 256 MiB of data");
        let err = c.write(off, &vec![chunk_byte(off); CHUNK as usize]);
        assert_ne!(err, EIO, "write at {off}: EIO where ENOSPC was expected (host file system full)");
        if err == ENOSPC {
            break off;
        }
        assert_eq!(err, 0, "write at {off}: NBD error {err}");
        off += CHUNK;
        if off % MIB == 0 {
            assert_eq!(c.flush(), 0, "FLUSH at {off}");
            flushed = off;
        }
    };
    eprintln!("host full after {refused} bytes; {flushed} flushed");
    assert!(flushed >= 8 * MIB, "only {flushed} bytes fit in a 24 MiB tmpfs");
    (fs, d, server, c, refused, flushed)
}

#[test]
fn a_full_host_file_system_is_enospc_and_flushed_data_stays_readable() {
    let (_fs, d, server, mut c, refused, flushed) = fill_host();
    let st = status_json(&d);
    assert_ne!(st["mode"], "fail", "{st}");
    // The refused write again: ENOSPC again, not EIO.
    assert_eq!(c.write(refused, &vec![0x99; CHUNK as usize]), ENOSPC, "the refused write, retried");
    check_chunks(&mut c, 0, flushed, "old connection with the host full");
    let mut c2 = Nbd::connect(server.port, "disk");
    check_chunks(&mut c2, 0, flushed, "new connection with the host full");
    drop(server); // SIGKILL: the last commit is what is on disk
    let dir = Path::new(&d);
    common::assert_checks_pass(&dir.join("metadata"));
    thinctl_ok(&["check", &d]);
}

/// Fails on core (bug found here): with the host full, the first commit after the
/// refused write (here the FLUSH after the TRIM) writes new metadata blocks into
/// holes of the sparse metadata file, the host refuses them (pwrite ENOSPC on
/// `metadata`), and the pool goes to `fail`: EIO for everything until it is
/// reopened, with nothing logged. It passes when the metadata file's blocks are
/// allocated beforehand (`fallocate -l 2M DIR/metadata`).
#[test]
fn a_full_host_file_system_recovers_after_trim_and_flush() {
    let (_fs, d, mut server, mut c, refused, flushed) = fill_host();
    // Free 4 MiB at the start by TRIM, FLUSH (the holes are punched once the freeing
    // commit is durable), then writes resume.
    let mut c2 = Nbd::connect(server.port, "disk");
    assert_eq!(c2.trim(0, 4 * MIB), 0, "TRIM with the host full");
    let err = c2.flush();
    assert_eq!(err, 0, "FLUSH after the TRIM with the host full (mode now {})", status_json(&d)["mode"]);
    for k in 0..16u64 {
        let o = refused + k * CHUNK;
        let err = c.write(o, &vec![0x77; CHUNK as usize]);
        assert_eq!(err, 0, "write {k} at {o} after freeing 4 MiB: NBD error {err}");
    }
    assert_eq!(c.flush(), 0);
    for k in 0..16u64 {
        let got = c2.read(refused + k * CHUNK, CHUNK).expect("read the new writes");
        assert!(got.iter().all(|&b| b == 0x77));
    }
    let zeros = c2.read(0, 4 * MIB).expect("read the trimmed range");
    assert!(zeros.iter().all(|&b| b == 0), "the trimmed range reads as zeros");
    check_chunks(&mut c2, 4 * MIB, flushed, "the rest of the flushed data after the TRIM");
    assert_eq!(status_json(&d)["mode"], "rw");
    drop(c);
    drop(c2);
    assert!(server.terminate().success(), "serve exits 0 on SIGTERM");
    common::assert_checks_pass(&Path::new(&d).join("metadata"));
    thinctl_ok(&["check", &d]);
}

#[test]
fn queue_mode_times_out_with_enospc_and_lets_a_waiting_write_through_after_a_trim() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let d = dir.to_str().expect("utf8").to_string();
    // 16 data blocks of 64 KiB behind a 16 MiB device.
    thinctl_ok(&["pool", "create", &d, "--data-size", "1M"]);
    thinctl_ok(&["create", &d, "disk", "--size", "16M"]);
    let mut server = serve(&d, &["--no-space-timeout", "2"]);
    let mut c = Nbd::connect(server.port, "disk");
    let blk = 64 * KIB;
    for b in 0..16u64 {
        assert_eq!(c.write(b * blk, &vec![b as u8 + 1; blk as usize]), 0, "fill block {b}");
    }
    assert_eq!(c.flush(), 0);

    // Nothing frees space: the write waits about --no-space-timeout, then ENOSPC.
    let t0 = Instant::now();
    let err = c.write(20 * blk, &[0xab; 4096]);
    let waited = t0.elapsed();
    assert_eq!(err, ENOSPC, "a write to a full pool after the queue timeout");
    assert!(waited >= Duration::from_millis(1500), "ENOSPC after {waited:?}, before the 2 s timeout");
    assert!(waited < Duration::from_secs(60), "ENOSPC after {waited:?}");
    let st = status_json(&d);
    assert_eq!(st["mode"], "out-of-data-space", "{st}");

    // A write waits on the full pool; another connection TRIMs a block; the write goes through.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut w = Nbd::connect(server.port, "disk");
    let waiter = std::thread::spawn(move || {
        let t0 = Instant::now();
        let err = w.write(21 * blk, &[0xcd; 4096]);
        tx.send((err, t0.elapsed())).expect("send");
        w
    });
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "a write to a full pool did not wait (queue mode)");
    assert_eq!(c.trim(3 * blk, blk), 0, "TRIM of one whole block");
    let (err, took) = rx.recv_timeout(Duration::from_secs(30)).expect("the waiting write finished");
    assert_eq!(err, 0, "the waiting write after the TRIM freed a block (after {took:?})");
    let mut w = waiter.join().expect("waiter");
    assert_eq!(w.flush(), 0);
    let got = c.read(21 * blk, 4096).expect("read");
    assert!(got.iter().all(|&b| b == 0xcd));
    let got = c.read(3 * blk, blk).expect("read");
    assert!(got.iter().all(|&b| b == 0), "the trimmed block reads as zeros");
    for b in (0..16u64).filter(|&b| b != 3) {
        let got = c.read(b * blk, blk).expect("read");
        assert!(got.iter().all(|&x| x == b as u8 + 1), "block {b}");
    }
    drop(c);
    drop(w);
    assert!(server.terminate().success(), "serve exits 0 on SIGTERM");
    common::assert_checks_pass(&dir.join("metadata"));
    thinctl_ok(&["check", &d]);
}

/// Debian's `thin_restore` writes a pool whose 256 KiB of metadata holds 6000
/// mappings (58 of 64 blocks used: below the reserve of 16 free); adopted as `dir`
/// with a 1 GiB sparse data file.
fn pool_at_the_metadata_reserve(tmp: &Path) -> String {
    let xml = tmp.join("full.xml");
    std::fs::write(
        &xml,
        "<superblock uuid=\"\" time=\"1\" transaction=\"1\" flags=\"0\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"16384\">\n\
         <device dev_id=\"0\" mapped_blocks=\"6000\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
         <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"6000\" time=\"0\"/>\n\
         </device>\n</superblock>\n",
    )
    .expect("xml");
    let meta = tmp.join("meta");
    std::fs::File::create(&meta).and_then(|f| f.set_len(256 * KIB)).expect("metadata file");
    let data = tmp.join("data");
    std::fs::File::create(&data).and_then(|f| f.set_len(1 << 30)).expect("data file");
    let out = Command::new("thin_restore")
        .arg("-i")
        .arg(&xml)
        .arg("-o")
        .arg(&meta)
        .output()
        .unwrap_or_else(|e| panic!("thin_restore not found ({e}): install thin-provisioning-tools"));
    assert!(out.status.success(), "thin_restore: {}", String::from_utf8_lossy(&out.stderr));
    let d = path_str(&tmp.join("pool"));
    thinctl_ok(&["pool", "adopt", &d, "--metadata", &path_str(&meta), "--data", &path_str(&data)]);
    d
}

#[test]
fn offline_status_reports_the_metadata_reserve_and_the_thresholds_kept_in_pool_toml() {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = pool_at_the_metadata_reserve(tmp.path());
    let st = status_json(&d);
    assert_eq!(st["mode"], "out-of-metadata-space", "{st}");
    let free =
        st["metadata_total_blocks"].as_u64().expect("total") - st["metadata_used_blocks"].as_u64().expect("used");
    assert_eq!(st["metadata_reserve_blocks"], 16, "{st}");
    assert!(free <= 16, "the fixture is at the reserve: {st}");
    let reason = st["reason"].as_str().expect("a reason");
    assert!(reason.contains("reserve") && reason.contains("pool extend"), "{reason}");
    assert_eq!(st["thresholds_crossed"], serde_json::json!([]), "no thresholds set: {st}");
    assert_eq!((st["no_space"].as_str(), st["no_space_timeout_s"].as_u64()), (Some("queue"), Some(60)), "{st}");

    // Thresholds are kept in pool.toml and judged offline too.
    let out = thinctl_ok(&["pool", "set", &d, "--metadata-threshold", "80", "--data-threshold", "50"]);
    assert!(out.contains("data threshold 50%, metadata threshold 80%"), "{out}");
    let toml = std::fs::read_to_string(Path::new(&d).join("pool.toml")).expect("pool.toml");
    assert!(toml.contains("data_threshold = 50") && toml.contains("metadata_threshold = 80"), "{toml}");
    let st = status_json(&d);
    assert_eq!((st["data_threshold"].as_u64(), st["metadata_threshold"].as_u64()), (Some(50), Some(80)), "{st}");
    assert_eq!(st["thresholds_crossed"], serde_json::json!(["metadata"]), "90% metadata, 36% data: {st}");
    let text = thinctl_ok(&["status", &d]);
    assert!(text.contains("thresholds      data 50%, metadata 80% (crossed)"), "{text}");
    assert!(text.contains("reason          free metadata"), "{text}");
    let out = thinctl(&["pool", "set", &d, "--data-threshold", "0"]);
    assert_eq!(out.status.code(), Some(2), "0% is a usage error");

    // A pool.toml without the options (as older versions wrote it) still opens.
    let old: String = toml.lines().filter(|l| !l.contains("threshold")).map(|l| format!("{l}\n")).collect();
    std::fs::write(Path::new(&d).join("pool.toml"), old).expect("write");
    let st = status_json(&d);
    assert_eq!((st["data_threshold"].is_null(), st["metadata_threshold"].is_null()), (true, true), "{st}");
    // A hand-edited value out of range is an error naming it.
    let toml = std::fs::read_to_string(Path::new(&d).join("pool.toml")).expect("pool.toml");
    let bad = toml.replace("read_only = false", "read_only = false\nno_space_timeout_s = 999999");
    std::fs::write(Path::new(&d).join("pool.toml"), bad).expect("write");
    let out = thinctl(&["status", &d]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no_space_timeout_s = 999999 is out of range"), "{err}");
    std::fs::write(Path::new(&d).join("pool.toml"), toml).expect("write");

    // Growing the metadata offline leaves the reserve behind: rw again.
    thinctl_ok(&["pool", "extend", &d, "--metadata-size", "+1M"]);
    let st = status_json(&d);
    assert_eq!(st["mode"], "rw", "{st}");
    assert!(st["reason"].is_null(), "{st}");
    common::assert_checks_pass(&Path::new(&d).join("../meta"));
    thinctl_ok(&["check", &d]);
}

#[test]
fn served_status_shows_the_settings_in_force_and_pool_set_applies_them_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let d = path_str(&dir);
    thinctl_ok(&["pool", "create", &d, "--data-size", "16M"]);
    thinctl_ok(&["create", &d, "disk", "--size", "64M"]);
    thinctl_ok(&["pool", "set", &d, "--data-threshold", "50", "--no-space-timeout", "7"]);
    let log = tmp.path().join("crossings");
    let cmd = format!("echo \"$THINPOOL_KIND $THINPOOL_PERCENT\" >> {}", log.display());
    let mut server = serve(&d, &["--no-space", "error", "--on-threshold", &cmd]);
    let st = status_json(&d);
    assert_eq!(st["served"], true);
    assert_eq!(st["data_threshold"], 50, "pool.toml's threshold: {st}");
    assert_eq!((st["no_space"].as_str(), st["no_space_timeout_s"].as_u64()), (Some("error"), Some(7)), "{st}");

    // Set through the control socket: saved in pool.toml and in force at once.
    let out = thinctl_ok(&["pool", "set", &d, "--data-threshold", "10"]);
    assert!(out.contains("data threshold 10%"), "{out}");
    let toml = std::fs::read_to_string(dir.join("pool.toml")).expect("pool.toml");
    assert!(toml.contains("data_threshold = 10"), "{toml}");
    assert_eq!(status_json(&d)["data_threshold"], 10);

    // 2 MiB of 16: 12% crosses 10%; the command runs once, status says so.
    let mut c = Nbd::connect(server.port, "disk");
    for b in 0..32u64 {
        assert_eq!(c.write(b * CHUNK, &vec![chunk_byte(b * CHUNK); CHUNK as usize]), 0);
    }
    assert_eq!(c.flush(), 0);
    let t0 = Instant::now();
    while std::fs::read_to_string(&log).unwrap_or_default().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(10), "the threshold command did not run");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(std::fs::read_to_string(&log).expect("log"), "data 12\n", "once per crossing");
    let st = status_json(&d);
    assert_eq!(st["thresholds_crossed"], serde_json::json!(["data"]), "{st}");
    assert_eq!(st["data_used_percent"], 12, "{st}");

    // The no-space policy too, over the --no-space flag: queue for 1 s.
    thinctl_ok(&["pool", "set", &d, "--no-space", "queue", "--no-space-timeout", "1"]);
    for b in 32..256u64 {
        assert_eq!(c.write(b * CHUNK, &vec![chunk_byte(b * CHUNK); CHUNK as usize]), 0, "fill block {b}");
    }
    let t0 = Instant::now();
    assert_eq!(c.write(300 * CHUNK, &[1u8; 4096]), ENOSPC, "the pool is full");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(900), "queued about 1 s, not {waited:?} (error mode would not wait)");
    let st = status_json(&d);
    assert_eq!(st["mode"], "out-of-data-space", "{st}");
    assert!(st["reason"].as_str().expect("reason").contains("wait up to 1 s"), "{st}");
    drop(c);
    assert!(server.terminate().success(), "serve exits 0 on SIGTERM");
    common::assert_checks_pass(&dir.join("metadata"));

    // Served read-only: mode ro, with the reason.
    let _ro = serve(&d, &["--read-only"]);
    let st = status_json(&d);
    assert_eq!((st["mode"].as_str(), st["reason"].as_str()), (Some("ro"), Some("served with --read-only")), "{st}");
}

/// fio's nbd engine writing `size` of random 64 KiB blocks with crc32c verify
/// (written, then all read back and checked), in the background.
fn fio_verify(port: u16, name: &str, size: &str) -> Child {
    Command::new("fio")
        .args([
            "--name=grow",
            "--ioengine=nbd",
            &format!("--uri=nbd://127.0.0.1:{port}/{name}"),
            "--rw=randwrite",
            "--bs=64k",
            &format!("--size={size}"),
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--group_reporting",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("fio not found ({e}): install fio"))
}

/// Wait at most 180 s for fio; its output, after checking it succeeded and verified.
fn fio_finish(fio: Child) -> String {
    let pid = fio.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fio.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(180)) {
        Ok(out) => out.expect("fio output"),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("fio still running after 180 s");
        }
    };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fio failed: {text}");
    assert!(text.contains("err= 0"), "fio saw errors: {text}");
    assert!(!text.contains("verify: bad") && !text.contains("bad magic"), "fio's verify failed: {text}");
    text
}

#[test]
fn the_pool_grows_online_while_fio_writes_with_verify() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let d = path_str(&dir);
    // 32 MiB of data (512 blocks) behind a 128 MiB device; fio writes 96 MiB.
    thinctl_ok(&["pool", "create", &d, "--data-size", "32M"]);
    thinctl_ok(&["create", &d, "disk", "--size", "128M"]);
    let mut server = serve(&d, &[]);
    let fio = fio_verify(server.port, "disk", "96m");
    // Grow once fio has used half of the data (a write that finds the pool full
    // meanwhile waits: queue mode).
    let t0 = Instant::now();
    let used_at_grow = loop {
        let st = status_json(&d);
        let used = st["data_used_blocks"].as_u64().expect("used");
        if used >= 256 {
            break used;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "fio never used half of the pool: {st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = thinctl_ok(&["pool", "extend", &d, "--data-size", "256M"]);
    assert!(out.contains("data 256 MiB"), "{out}");
    let text = fio_finish(fio);
    let st = status_json(&d);
    eprintln!("grown at {used_at_grow} of 512 blocks used; after fio: {st}");
    assert_eq!(st["data_total_blocks"], 4096, "{st}");
    assert_eq!(
        st["data_used_blocks"], 1536,
        "fio's 96 MiB all landed, two thirds of it in the new space: {st}\n{text}"
    );
    assert_eq!(st["mode"], "rw", "{st}");
    assert!(server.terminate().success(), "serve exits 0 on SIGTERM");
    assert_eq!(std::fs::metadata(dir.join("data")).expect("data").len(), 256 * MIB);
    common::assert_checks_pass(&dir.join("metadata"));
    thinctl_ok(&["check", &d]);
}

#[test]
fn autoextend_set_in_pool_toml_grows_the_data_while_fio_fills_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let d = path_str(&dir);
    thinctl_ok(&["pool", "create", &d, "--data-size", "32M"]);
    thinctl_ok(&["create", &d, "disk", "--size", "128M"]);
    thinctl_ok(&[
        "pool",
        "set",
        &d,
        "--data-threshold",
        "60",
        "--autoextend-percent",
        "100",
        "--autoextend-max",
        "256M",
    ]);
    let mut server = serve(&d, &[]);
    // 96 MiB into 32 MiB: writes that find the pool full wait (queue mode) until the
    // monitor autoextends it (it looks every 0.5 s), 32 -> 64 -> 128 MiB at least.
    fio_finish(fio_verify(server.port, "disk", "96m"));
    let st = status_json(&d);
    eprintln!("after fio: {st}");
    assert_eq!(st["data_used_blocks"], 1536, "{st}");
    let total = st["data_total_blocks"].as_u64().expect("total");
    assert!((2048..=4096).contains(&total), "autoextended to 128..256 MiB by doubling: {st}");
    assert!(server.terminate().success(), "serve exits 0 on SIGTERM");
    assert_eq!(std::fs::metadata(dir.join("data")).expect("data").len(), total * 64 * KIB);
    common::assert_checks_pass(&dir.join("metadata"));
    thinctl_ok(&["check", &d]);
}
