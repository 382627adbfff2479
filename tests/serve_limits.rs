//! A client cannot push the server over: unread replies do not grow its memory, a
//! connection flood costs no thread per connection and does not keep a new client
//! out, over the connection limit a client is refused cleanly, a stalled handshake
//! times out, stalled clients do not hold up SIGTERM, and an aborted handshake
//! releases the device it opened. Real sockets on loopback; the real `thinctl serve`
//! where the default limits suffice, the library's server where a limit is set low.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thinpool::nbd::mem::MemCatalog;
use thinpool::nbd::{wire, Limits, Server, ServerConfig};

const MIB: u64 = 1 << 20;

fn thinctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_thinctl")).args(args).output().expect("run thinctl")
}

fn thinctl_ok(args: &[&str]) -> String {
    let out = thinctl(args);
    assert!(out.status.success(), "thinctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pool in a temp dir with one 256 MiB device, "disk".
fn pool() -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path().join("pool").to_str().expect("utf8").to_string();
    thinctl_ok(&["pool", "create", &d, "--data-size", "1G"]);
    thinctl_ok(&["create", &d, "disk", "--size", "256M"]);
    (tmp, d)
}

/// `thinctl serve DIR` on an ephemeral port; killed if the test fails.
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

fn serve(dir: &str) -> Served {
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinctl"))
        .args(["serve", dir, "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("thinctl serve");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("serving line");
    assert!(line.contains("serving pool"), "{line}");
    Served { child, port }
}

impl Served {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kb * 1024
    }

    fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid())).expect("task").count()
    }

    /// SIGTERM, then wait at most `bound` for the exit; its status.
    fn terminate_within(&mut self, bound: Duration) -> std::process::ExitStatus {
        let ok = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("kill");
        assert!(ok.success());
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(t0.elapsed() < bound, "thinctl serve still running {bound:?} after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = wire::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn info_request(name: &str) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    data
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

/// Connect, then GO to `name` (no structured replies).
fn connect(port: u16, name: &str) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).expect("hello");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    c.write_all(&(wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES).to_be_bytes()).expect("flags");
    c.write_all(&option(wire::OPT_GO, &info_request(name))).expect("go");
    loop {
        let (_, kind, _) = read_option_reply(&mut c);
        if kind == wire::REP_ACK {
            return c;
        }
        assert_eq!(kind, wire::REP_INFO, "GO {name} refused");
    }
}

fn request(command: wire::Command, cookie: u64, offset: u64, length: u32) -> [u8; wire::REQUEST_SIZE] {
    wire::encode_request(&wire::Request { flags: 0, command, cookie, offset, length })
}

/// Write `data` at `offset` and check the reply; then read it back.
fn write_and_read_back(c: &mut TcpStream, offset: u64, data: &[u8]) {
    c.write_all(&request(wire::Command::Write, 1, offset, data.len() as u32)).expect("write");
    c.write_all(data).expect("payload");
    let mut h = [0u8; 16];
    c.read_exact(&mut h).expect("write reply");
    assert_eq!(h, wire::simple_reply(0, 1));
    c.write_all(&request(wire::Command::Read, 2, offset, data.len() as u32)).expect("read");
    c.read_exact(&mut h).expect("read reply");
    assert_eq!(h, wire::simple_reply(0, 2));
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).expect("read data");
    assert!(back == data, "read back different bytes");
}

#[test]
fn unread_replies_do_not_grow_the_servers_memory_past_the_cap() {
    let (_tmp, d) = pool();
    let mut s = serve(&d);
    // Map the region once, so the writes below overwrite and the reads read data.
    let mut c = connect(s.port, "disk");
    for i in 0..4u64 {
        write_and_read_back(&mut c, i * 32 * MIB, &vec![0x5a; (32 * MIB) as usize]);
    }
    let base = s.rss();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(base));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (Arc::clone(&peak), Arc::clone(&done), s.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kb) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak.fetch_max(kb * 1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // One connection sends 32 MiB WRITEs and never reads a reply; another asks for
    // 32 MiB READs (3.2 GiB of replies) and never reads them.
    let mut w = connect(s.port, "disk");
    w.set_write_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let payload = vec![0xa5u8; (32 * MIB) as usize];
    for i in 0..16u64 {
        w.write_all(&request(wire::Command::Write, i, (i % 4) * 32 * MIB, payload.len() as u32)).expect("write");
        w.write_all(&payload).expect("payload");
    }
    let mut r = connect(s.port, "disk");
    r.set_write_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut reqs = Vec::new();
    for i in 0..100u64 {
        reqs.extend_from_slice(&request(wire::Command::Read, i, (i % 4) * 32 * MIB, (32 * MIB) as u32));
    }
    r.write_all(&reqs).expect("read requests");
    // Let the server do all it will do with them.
    std::thread::sleep(Duration::from_secs(3));
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let peak = peak.load(Ordering::Relaxed);
    // The cap is 64 MiB per connection, plus one request being read or executed.
    let bound = base + 64 * MIB + 3 * 32 * MIB + 32 * MIB;
    eprintln!("server RSS: {} MiB before, {} MiB at most while not read", base / MIB, peak / MIB);
    assert!(peak <= bound, "RSS grew to {} MiB (from {} MiB)", peak / MIB, base / MIB);
    // Meanwhile another client is served, and SIGTERM ends the server although two
    // clients are not reading.
    write_and_read_back(&mut c, 200 * MIB, &[7u8; 4096]);
    let status = s.terminate_within(Duration::from_secs(10));
    assert!(status.success(), "serve exited with {status}");
}

#[test]
fn a_connection_flood_costs_no_threads_and_does_not_keep_a_new_client_out() {
    let (_tmp, d) = pool();
    let s = serve(&d);
    // 300 connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..300 {
        let mut c = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).expect("hello");
        idle.push(c);
    }
    // And 50 past GO that then stay idle.
    let mut attached: Vec<TcpStream> = (0..50).map(|_| connect(s.port, "disk")).collect();
    // The bound: main (also the reactor), committer, control socket, health monitor,
    // the blocking pool (4) and at most 32 connection threads; the handshakes above
    // used some.
    let during = s.threads();
    assert!(during <= 4 + 4 + 32, "{during} threads for 350 connections");
    // Once they are idle their connections hold no thread at all.
    let t0 = Instant::now();
    let settled = loop {
        let n = s.threads();
        if n <= 4 + 4 + 1 || t0.elapsed() > Duration::from_secs(10) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("server threads: {during} during the handshakes of 350 connections, {settled} once they idle");
    assert!(settled <= 4 + 4 + 1, "{settled} threads for 350 idle connections");
    // A new client works.
    let mut c = connect(s.port, "disk");
    write_and_read_back(&mut c, 0, &[0x42u8; 65536]);
    // And the attached ones still do.
    write_and_read_back(&mut attached[17], 65536, &[0x43u8; 4096]);
    drop(idle);
}

#[test]
fn stalled_clients_do_not_hold_up_sigterm() {
    let (_tmp, d) = pool();
    let mut s = serve(&d);
    // Stalled in the handshake, halfway through an option.
    let mut a = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    let mut hello = [0u8; 18];
    a.read_exact(&mut hello).expect("hello");
    a.write_all(&3u32.to_be_bytes()).expect("flags");
    a.write_all(&option(wire::OPT_GO, &info_request("disk"))[..10]).expect("half an option");
    // Stalled inside a WRITE payload.
    let mut b = connect(s.port, "disk");
    b.write_all(&request(wire::Command::Write, 1, 0, MIB as u32)).expect("write");
    b.write_all(&[1u8; 1000]).expect("part of the payload");
    // Connected, never a byte sent.
    let _c = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
    // Attached and idle.
    let _e = connect(s.port, "disk");
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let status = s.terminate_within(Duration::from_secs(8));
    assert!(status.success(), "serve exited with {status}");
    eprintln!("exited {:?} after SIGTERM", t0.elapsed());
    // The pool it left is consistent.
    thinctl_ok(&["check", &d]);
}

#[test]
fn an_aborted_handshake_releases_the_attach_count() {
    let (_tmp, d) = pool();
    let s = serve(&d);
    for round in 0..20 {
        let c = TcpStream::connect(("127.0.0.1", s.port)).expect("connect");
        let mut c2 = c.try_clone().expect("clone");
        let mut hello = [0u8; 18];
        c2.read_exact(&mut hello).expect("hello");
        let mut msg = 3u32.to_be_bytes().to_vec();
        msg.extend(option(wire::OPT_INFO, &info_request("disk")));
        if round % 2 == 1 {
            msg.extend(option(wire::OPT_GO, &info_request("disk")));
        }
        c2.write_all(&msg).expect("options");
        // Reset (RST, not FIN) without reading any reply.
        nix::sys::socket::setsockopt(
            &c,
            nix::sys::socket::sockopt::Linger,
            &nix::libc::linger { l_onoff: 1, l_linger: 0 },
        )
        .expect("SO_LINGER");
        drop(c);
        drop(c2);
    }
    // The server has seen every reset within a few seconds; then the device is free.
    let t0 = Instant::now();
    loop {
        let out = thinctl(&["delete", &d, "disk"]);
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("attached"), "delete failed: {err}");
        assert!(t0.elapsed() < Duration::from_secs(10), "the device stays attached: {err}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let ls = thinctl_ok(&["ls", &d]);
    assert!(!ls.contains("disk"), "{ls}");
}

/// A server of the library with `limits`, on an in-memory export "a".
fn lib_server(limits: Limits) -> (u16, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let catalog = Arc::new(MemCatalog::new(&[("a", 16 * MIB)]));
    let server = Server::bind("127.0.0.1:0", catalog, ServerConfig::default()).expect("bind").with_limits(limits);
    let port = server.local_addr().expect("addr").port();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    (port, stop, std::thread::spawn(move || server.serve(s2).expect("serve")))
}

#[test]
fn over_the_connection_limit_a_client_is_refused_with_err_policy() {
    let (port, stop, t) = lib_server(Limits { max_connections: 2, ..Limits::default() });
    let mut first = connect(port, "a");
    let _second = connect(port, "a");
    let mut third = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    third.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut hello = [0u8; 18];
    third.read_exact(&mut hello).expect("hello");
    third.write_all(&3u32.to_be_bytes()).expect("flags");
    third.write_all(&option(wire::OPT_GO, &info_request("a"))).expect("go");
    let (opt, kind, msg) = read_option_reply(&mut third);
    assert_eq!((opt, kind), (wire::OPT_GO, wire::REP_ERR_POLICY));
    assert!(String::from_utf8_lossy(&msg).contains("limit of 2 connections"));
    third.write_all(&option(wire::OPT_ABORT, &[])).expect("abort");
    assert_eq!(read_option_reply(&mut third).1, wire::REP_ACK);
    // When one leaves, a new client gets in.
    write_and_read_back(&mut first, 0, &[9u8; 512]);
    drop(first);
    let t0 = Instant::now();
    let mut fourth = loop {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).expect("hello");
        c.write_all(&3u32.to_be_bytes()).expect("flags");
        c.write_all(&option(wire::OPT_GO, &info_request("a"))).expect("go");
        let (_, kind, _) = read_option_reply(&mut c);
        if kind == wire::REP_INFO {
            loop {
                if read_option_reply(&mut c).1 == wire::REP_ACK {
                    break;
                }
            }
            break c;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the freed slot is never reused");
        std::thread::sleep(Duration::from_millis(50));
    };
    write_and_read_back(&mut fourth, 4096, &[8u8; 512]);
    stop.store(true, Ordering::Relaxed);
    t.join().expect("server");
}

#[test]
fn a_client_that_does_not_finish_the_handshake_is_closed_after_the_timeout() {
    let (port, stop, t) = lib_server(Limits { handshake_timeout: Duration::from_millis(300), ..Limits::default() });
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).expect("hello");
    c.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut b = [0u8; 1];
    let r = c.read(&mut b);
    assert!(
        matches!(&r, Ok(0)) || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the server closes a stalled handshake: {r:?}"
    );
    // A client that completes it in time is served as long as it likes.
    let mut ok = connect(port, "a");
    std::thread::sleep(Duration::from_millis(600));
    write_and_read_back(&mut ok, 0, &[1u8; 512]);
    stop.store(true, Ordering::Relaxed);
    t.join().expect("server");
}

#[test]
fn serve_raises_a_low_open_file_limit_to_fit_max_connections() {
    let (_tmp, d) = pool();
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    // A shell with a soft limit of 256 descriptors starts the server.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} serve {d} --listen 127.0.0.1:{port} --max-connections 1000",
            env!("CARGO_BIN_EXE_thinctl")
        ))
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("serving line");
    let s = Served { child, port };
    assert!(line.contains("serving pool"), "{line}");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.pid())).expect("limits");
    let row = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files row");
    let f: Vec<&str> = row.split_whitespace().collect();
    let (soft, hard) = (f[3], f[4]);
    let hard_n: u64 = hard.parse().unwrap_or(u64::MAX);
    let want = 1128.min(hard_n);
    let soft_n: u64 = soft.parse().expect("soft limit");
    assert!(soft_n >= want, "soft open-file limit {soft} < {want} (hard {hard}): {row}");
    // And the clients fit: 400 connections past the old limit of 256 all get the greeting.
    let mut conns = Vec::new();
    for _ in 0..400 {
        let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).expect("greeting past the old descriptor limit");
        conns.push(c);
    }
}
