//! The NBD server with real clients: libnbd's nbdinfo and nbdcopy, qemu-io and
//! qemu-img, fio's nbd engine, and raw sockets sending malformed requests. Each
//! test serves a fresh pool on 127.0.0.1 with an ephemeral port.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use thinpool::nbd::{wire, Server, ServerConfig};
use thinpool::pool::Pool;
use thinpool::server::exports::{ExportedDevice, PoolCatalog};
use thinpool::server::service::Service;

const MIB: u64 = 1 << 20;

struct Served {
    _dir: tempfile::TempDir,
    port: u16,
    service: Arc<Service>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Served {
    fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A pool with devices thin0 (64 MiB) and thin1 (16 MiB), served.
fn serve() -> Served {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 16 * MIB, 512 * MIB);
    let mut pool = Pool::create(m, d, 128).expect("pool");
    pool.create_thin(0).expect("thin");
    pool.create_thin(1).expect("thin");
    pool.commit().expect("commit");
    let service = Service::new(pool);
    let devices = vec![
        ExportedDevice { name: "thin0".into(), id: 0, size: 64 * MIB },
        ExportedDevice { name: "thin1".into(), id: 1, size: 16 * MIB },
    ];
    let catalog = PoolCatalog::new(Arc::clone(&service), devices, Some("thin0".into()), false);
    let server = Server::bind("127.0.0.1:0", catalog, ServerConfig::default()).expect("bind");
    let port = server.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let thread = std::thread::spawn(move || server.serve(s2).expect("serve"));
    Served { _dir: dir, port, service, stop, thread: Some(thread) }
}

/// Run a client tool; panics with the package to install when it is missing.
fn run(tool: &str, package: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} not runnable ({e}): install the Debian package {package}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn map(s: &Served, name: &str) -> Vec<(u64, u64, String)> {
    let out = run("nbdinfo", "libnbd-bin", &["--map", &s.uri(name)]);
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.first()?.parse().ok()?, f.get(1)?.parse().ok()?, f[3..].join(" ")))
        })
        .collect()
}

#[test]
fn nbdinfo_lists_every_device_as_an_export() {
    let s = serve();
    let out = run("nbdinfo", "libnbd-bin", &["--list", &format!("nbd://127.0.0.1:{}", s.port)]);
    assert!(out.contains("export=\"thin0\""), "{out}");
    assert!(out.contains("export=\"thin1\""), "{out}");
    let info = run("nbdinfo", "libnbd-bin", &[&s.uri("thin1")]);
    assert!(info.contains(&format!("export-size: {}", 16 * MIB)), "{info}");
    assert!(info.contains("can_multi_conn: true"), "{info}");
    assert!(info.contains("block_size_preferred: 65536"), "{info}");
}

#[test]
fn nbdinfo_map_shows_holes_data_and_holes_again_after_trim() {
    let s = serve();
    assert_eq!(map(&s, "thin0"), vec![(0, 64 * MIB, "hole,zero".to_string())]);
    run("qemu-io", "qemu-utils", &["-f", "raw", "-c", "write -P 0x5c 1M 1M", &s.uri("thin0")]);
    let m = map(&s, "thin0");
    assert_eq!(
        m,
        vec![(0, MIB, "hole,zero".into()), (MIB, MIB, "data".into()), (2 * MIB, 62 * MIB, "hole,zero".into())]
    );
    run("qemu-io", "qemu-utils", &["-f", "raw", "-c", "discard 1M 1M", &s.uri("thin0")]);
    assert_eq!(map(&s, "thin0"), vec![(0, 64 * MIB, "hole,zero".to_string())]);
    assert_eq!(s.service.with_pool(|p| p.meta().status().data_used_blocks), 0);
}

#[test]
fn qemu_io_writes_and_reads_back_a_pattern() {
    let s = serve();
    let out = run(
        "qemu-io",
        "qemu-utils",
        &["-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M", &s.uri("thin0")],
    );
    assert!(out.contains("wrote 1048576/1048576"), "{out}");
    assert!(out.contains("read 1048576/1048576"), "{out}");
    // Unaligned write across a block boundary, then an unwritten region reads as zeros.
    let out = run(
        "qemu-io",
        "qemu-utils",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 65000 1000",
            "-c",
            "read -P 0x11 65000 1000",
            "-c",
            "read -P 0 2M 1M",
            &s.uri("thin0"),
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn qemu_img_convert_and_nbdcopy_move_the_same_bytes_and_keep_holes() {
    let s = serve();
    let dir = tempfile::tempdir().expect("tmp");
    // A 16 MiB image: random data, a zero gap, more random data.
    let mut img = vec![0u8; (16 * MIB) as usize];
    let mut x = 0x9E37_79B9u32;
    for (i, b) in img.iter_mut().enumerate() {
        if !(4 * MIB as usize..12 * MIB as usize).contains(&i) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
    }
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &img).expect("write image");
    run("nbdcopy", "libnbd-bin", &[src.to_str().expect("path"), &s.uri("thin1")]);
    let back = dir.path().join("back.raw");
    run(
        "qemu-img",
        "qemu-utils",
        &["convert", "-f", "raw", "-O", "raw", &s.uri("thin1"), back.to_str().expect("path")],
    );
    assert!(std::fs::read(&back).expect("read back") == img, "qemu-img convert read different bytes");
    let copy = dir.path().join("copy.raw");
    run("nbdcopy", "libnbd-bin", &[&s.uri("thin1"), copy.to_str().expect("path")]);
    assert!(std::fs::read(&copy).expect("read copy") == img, "nbdcopy read different bytes");
    // The zero gap never became mapped: 8 MiB of 64 KiB blocks stay holes.
    let m = map(&s, "thin1");
    assert!(m.contains(&(4 * MIB, 8 * MIB, "hole,zero".to_string())), "{m:?}");
    // qemu-img map agrees with the pool's own mapping.
    let qmap = run("qemu-img", "qemu-utils", &["map", "--output=json", "-f", "raw", &s.uri("thin1")]);
    assert!(
        qmap.contains(&format!(
            "\"start\": {}, \"length\": {}, \"depth\": 0, \"present\": false, \"zero\": true",
            4 * MIB,
            8 * MIB
        )) || qmap.contains(&format!(
            "\"start\": {}, \"length\": {}, \"depth\": 0, \"present\": true, \"zero\": true",
            4 * MIB,
            8 * MIB
        )),
        "{qmap}"
    );
    let mapped = s.service.with_pool(|p| p.meta().device_info(1).expect("info").mapped_blocks);
    assert_eq!(mapped, 128, "8 MiB of data in 64 KiB blocks");
}

#[test]
fn fio_random_writes_verify_with_two_jobs() {
    let s = serve();
    let out = run(
        "fio",
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", s.uri("thin0")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8m",
            "--numjobs=2",
            "--offset_increment=16m",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--group_reporting",
            "--verify_state_save=0",
        ],
    );
    assert!(out.contains("err= 0"), "{out}");
    assert!(!out.contains("verify: bad"), "{out}");
}

/// Raw protocol helpers.
fn handshake(port: u16, name: &str, structured: bool) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).expect("hello");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    c.write_all(&(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES).to_be_bytes()).expect("flags");
    if structured {
        send_option(&mut c, wire::OPT_STRUCTURED_REPLY, &[]);
        let (_, kind, _) = read_option_reply(&mut c);
        assert_eq!(kind, wire::REP_ACK);
    }
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut c, wire::OPT_GO, &data);
    loop {
        let (_, kind, _) = read_option_reply(&mut c);
        if kind == wire::REP_ACK {
            return c;
        }
        assert_eq!(kind, wire::REP_INFO);
    }
}

fn send_option(c: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = wire::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    c.write_all(&b).expect("option");
}

fn read_option_reply(c: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).expect("option reply");
    let opt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
    let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
    let mut d = vec![0u8; len as usize];
    c.read_exact(&mut d).expect("option data");
    (opt, kind, d)
}

fn request(c: &mut TcpStream, kind: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
    let r = wire::Request { flags: 0, command: wire::Command::from_wire(kind), cookie, offset, length };
    c.write_all(&wire::encode_request(&r)).expect("request");
    c.write_all(payload).expect("payload");
}

fn simple_reply(c: &mut TcpStream) -> (u32, u64) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).expect("reply");
    assert_eq!(&h[..4], &wire::SIMPLE_REPLY_MAGIC.to_be_bytes());
    (u32::from_be_bytes(h[4..8].try_into().expect("4")), u64::from_be_bytes(h[8..16].try_into().expect("8")))
}

fn is_closed(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    let mut b = [0u8; 1];
    matches!(c.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn an_unknown_option_gets_err_unsup_and_go_still_works() {
    let s = serve();
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).expect("hello");
    c.write_all(&3u32.to_be_bytes()).expect("flags");
    send_option(&mut c, 0xdead, b"junk");
    let (opt, kind, _) = read_option_reply(&mut c);
    assert_eq!((opt, kind), (0xdead, wire::REP_ERR_UNSUP));
    // An unknown export is NBD_REP_ERR_UNKNOWN, not a hang-up.
    let mut data = 4u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"nope");
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut c, wire::OPT_GO, &data);
    assert_eq!(read_option_reply(&mut c).1, wire::REP_ERR_UNKNOWN);
}

#[test]
fn bad_requests_get_protocol_errors_and_the_server_keeps_serving() {
    let s = serve();
    let mut c = handshake(s.port, "thin1", false);
    // Read past the end: EINVAL.
    request(&mut c, wire::CMD_READ, 1, 16 * MIB - 512, 1024, &[]);
    assert_eq!(simple_reply(&mut c), (wire::EINVAL, 1));
    // Write past the end: ENOSPC (payload consumed, connection still in sync).
    request(&mut c, wire::CMD_WRITE, 2, 16 * MIB, 512, &[7u8; 512]);
    assert_eq!(simple_reply(&mut c), (wire::ENOSPC, 2));
    // Offset overflow.
    request(&mut c, wire::CMD_TRIM, 3, u64::MAX - 10, 4096, &[]);
    assert_eq!(simple_reply(&mut c), (wire::EINVAL, 3));
    // Read over the maximum payload.
    request(&mut c, wire::CMD_READ, 4, 0, 64 << 20, &[]);
    assert_eq!(simple_reply(&mut c), (wire::EINVAL, 4));
    // Unknown command.
    request(&mut c, 99, 5, 0, 0, &[]);
    assert_eq!(simple_reply(&mut c), (wire::EINVAL, 5));
    // Block status without negotiating base:allocation.
    request(&mut c, wire::CMD_BLOCK_STATUS, 6, 0, 4096, &[]);
    assert_eq!(simple_reply(&mut c), (wire::EINVAL, 6));
    // A valid write and read still work on the same connection.
    request(&mut c, wire::CMD_WRITE, 7, 4096, 512, &[9u8; 512]);
    assert_eq!(simple_reply(&mut c), (0, 7));
    request(&mut c, wire::CMD_READ, 8, 4096, 512, &[]);
    assert_eq!(simple_reply(&mut c), (0, 8));
    let mut data = [0u8; 512];
    c.read_exact(&mut data).expect("data");
    assert_eq!(data, [9u8; 512]);

    // A write announcing more than the maximum payload: disconnected.
    let mut c2 = handshake(s.port, "thin1", false);
    request(&mut c2, wire::CMD_WRITE, 1, 0, 1 << 30, &[]);
    assert!(is_closed(&mut c2));
    // A wrong request magic: disconnected.
    let mut c3 = handshake(s.port, "thin1", false);
    c3.write_all(&[0xffu8; 28]).expect("garbage");
    assert!(is_closed(&mut c3));
    // A truncated write payload: the server waits, then the client goes away.
    let mut c4 = handshake(s.port, "thin1", false);
    request(&mut c4, wire::CMD_WRITE, 1, 0, 4096, &[1u8; 100]);
    drop(c4);
    // Garbage instead of a handshake.
    let mut c5 = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    let mut hello = [0u8; 18];
    c5.read_exact(&mut hello).expect("hello");
    c5.write_all(&[0xAB; 64]).expect("garbage");
    assert!(is_closed(&mut c5));
    // The first connection is unaffected.
    request(&mut c, wire::CMD_FLUSH, 9, 0, 0, &[]);
    assert_eq!(simple_reply(&mut c), (0, 9));
    let info = run("nbdinfo", "libnbd-bin", &[&s.uri("thin1")]);
    assert!(info.contains("export-size"), "{info}");
}

#[test]
fn structured_reads_send_hole_chunks_for_unmapped_blocks() {
    let s = serve();
    let mut c = handshake(s.port, "thin1", true);
    request(&mut c, wire::CMD_WRITE, 1, 65536, 65536, &[3u8; 65536]);
    assert_eq!(simple_reply(&mut c), (0, 1));
    request(&mut c, wire::CMD_READ, 2, 0, 3 * 65536, &[]);
    let mut kinds = Vec::new();
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).expect("chunk");
        assert_eq!(&h[..4], &wire::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut p = vec![0u8; len as usize];
        c.read_exact(&mut p).expect("payload");
        let off = u64::from_be_bytes(p[..8].try_into().expect("8"));
        kinds.push((kind, off));
        if kind == wire::REPLY_TYPE_OFFSET_DATA {
            assert!(p[8..].iter().all(|&b| b == 3));
        }
        if flags & wire::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert_eq!(
        kinds,
        vec![
            (wire::REPLY_TYPE_OFFSET_HOLE, 0),
            (wire::REPLY_TYPE_OFFSET_DATA, 65536),
            (wire::REPLY_TYPE_OFFSET_HOLE, 131072)
        ]
    );
}
