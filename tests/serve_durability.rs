//! `thinctl serve` loses nothing a client flushed when it is killed with SIGKILL, and
//! the metadata it leaves behind passes both checkers. Several connections to one
//! export see each other's flushed writes (CAN_MULTI_CONN).

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

fn thinctl(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_thinctl")).args(args).output().expect("run thinctl");
    assert!(out.status.success(), "thinctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn serve(dir: &str) -> (Child, u16) {
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinctl"))
        .args(["serve", dir, "--listen", &format!("127.0.0.1:{port}"), "--commit-interval-ms", "600000"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("thinctl serve");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("serving line");
    assert!(line.contains("serving pool"), "{line}");
    (child, port)
}

fn qemu_io(port: u16, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    args.push(&uri);
    let out =
        Command::new("qemu-io").args(&args).output().unwrap_or_else(|e| panic!("qemu-io ({e}): install qemu-utils"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("failed"), "qemu-io {cmds:?}: {text}");
    text
}

#[test]
fn flushed_writes_survive_sigkill_and_the_pool_stays_consistent() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let d = dir.to_str().expect("utf8").to_string();
    thinctl(&["pool", "create", &d, "--data-size", "256M"]);
    thinctl(&["create", &d, "disk", "--size", "64M"]);
    let (mut server, port) = serve(&d);
    // The periodic commit is 10 minutes away: only the flush makes these durable.
    qemu_io(port, &["write -P 0x5a 0 4M", "write -P 0x17 20M 300k", "flush"]);
    // Another connection sees the first one's writes.
    qemu_io(port, &["read -P 0x5a 0 4M", "read -P 0x17 20M 300k"]);
    // Then a snapshot through the control socket, and more flushed writes.
    thinctl(&["snapshot", &d, "disk", "before"]);
    qemu_io(port, &["write -P 0x66 1M 64k", "flush"]);
    server.kill().expect("SIGKILL");
    server.wait().expect("wait");
    common::assert_checks_pass(&dir.join("metadata"));

    let (mut server, port) = serve(&d);
    qemu_io(port, &["read -P 0x5a 0 1M", "read -P 0x66 1M 64k", "read -P 0x5a 1088k 2944k", "read -P 0x17 20M 300k"]);
    let ls = thinctl(&["ls", &d]);
    assert!(ls.contains("before"), "{ls}");
    server.kill().expect("SIGKILL");
    server.wait().expect("wait");
    // The snapshot holds the data from before the later write.
    let out = tmp.path().join("before.raw");
    thinctl(&["export", &d, "before", out.to_str().expect("utf8")]);
    let bytes = std::fs::read(&out).expect("export");
    assert!(bytes[..4 << 20].iter().all(|&b| b == 0x5a));
    assert!(bytes[20 << 20..(20 << 20) + 300 * 1024].iter().all(|&b| b == 0x17));
}

/// A minimal NBD client: fixed newstyle, GO, then blocking writes.
struct RawClient(std::net::TcpStream);

impl RawClient {
    fn connect(port: u16, name: &str) -> RawClient {
        use std::io::{Read, Write};
        use thinpool::nbd::wire;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.set_nodelay(true).expect("nodelay");
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).expect("hello");
        c.write_all(&3u32.to_be_bytes()).expect("flags");
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
                return RawClient(c);
            }
            assert_eq!(kind, wire::REP_INFO);
        }
    }

    /// Write and wait for the acknowledgement.
    fn write(&mut self, offset: u64, data: &[u8]) {
        use std::io::{Read, Write};
        use thinpool::nbd::wire;
        let r = wire::Request {
            flags: 0,
            command: wire::Command::Write,
            cookie: offset,
            offset,
            length: data.len() as u32,
        };
        let mut msg = wire::encode_request(&r).to_vec();
        msg.extend_from_slice(data);
        self.0.write_all(&msg).expect("request");
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).expect("reply");
        assert_eq!(&h[4..8], &[0, 0, 0, 0], "write failed");
    }
}

#[test]
fn a_live_snapshot_holds_every_write_acknowledged_before_it() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let d = dir.to_str().expect("utf8").to_string();
    thinctl(&["pool", "create", &d, "--data-size", "512M"]);
    thinctl(&["create", &d, "disk", "--size", "64M"]);
    let (mut server, port) = serve(&d);
    // Write 4 KiB record i at offset i*4096 holding the byte (i % 251) + 1, in order,
    // each acknowledged before the next; `acked` counts the acknowledged ones.
    let acked = Arc::new(AtomicU64::new(0));
    let a2 = Arc::clone(&acked);
    let writer = std::thread::spawn(move || {
        let mut c = RawClient::connect(port, "disk");
        for i in 0..4096u64 {
            c.write(i * 4096, &[((i % 251) + 1) as u8; 4096]);
            a2.store(i + 1, Ordering::SeqCst);
        }
    });
    while acked.load(Ordering::SeqCst) < 300 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let before = acked.load(Ordering::SeqCst);
    thinctl(&["snapshot", &d, "disk", "snap"]);
    let after = acked.load(Ordering::SeqCst);
    writer.join().expect("writer");
    let out = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().expect("kill");
    assert!(out.success());
    assert!(server.wait().expect("wait").success(), "serve exits 0 on SIGTERM");
    common::assert_checks_pass(&dir.join("metadata"));
    let path = tmp.path().join("snap.raw");
    thinctl(&["export", &d, "snap", path.to_str().expect("utf8")]);
    let snap = std::fs::read(&path).expect("export");
    // Records acknowledged before the snapshot command are in it; records written
    // after it returned are not; the ones in between may be either.
    let first_absent = (0..4096u64).find(|&i| snap[(i * 4096) as usize] == 0).unwrap_or(4096);
    assert!(first_absent >= before, "record {first_absent} acknowledged before the snapshot is missing");
    assert!(first_absent <= after + 1, "records written after the snapshot ({first_absent} > {after}) leaked into it");
    for i in 0..4096u64 {
        let rec = &snap[(i * 4096) as usize..((i + 1) * 4096) as usize];
        let want = if i < first_absent { ((i % 251) + 1) as u8 } else { 0 };
        assert!(rec.iter().all(|&b| b == want), "record {i} is torn or misplaced in the snapshot");
    }
    eprintln!("snapshot taken after {before}..{after} acknowledged writes; it holds the first {first_absent}");
}
