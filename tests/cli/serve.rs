//! `thinctl serve`: while it runs, the commands that change the pool (and `ls`,
//! `status`) go through its control socket; the rest find the pool busy.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::*;

/// A running `thinctl serve`, stopped (SIGTERM) when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(sc: &Scratch, pool: &str) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_thinctl"))
            .args(["serve", pool, "--listen", "127.0.0.1:0", "--commit-interval-ms", "100"])
            .current_dir(sc.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn thinctl serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        let addr = line
            .split("nbd://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("serve did not say where it listens: {line:?}"))
            .to_string();
        Server { child, addr }
    }

    /// SIGTERM and wait; the exit code.
    fn stop(mut self) -> Option<i32> {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("kill");
        let code = self.child.wait().expect("wait").code();
        std::mem::forget(self);
        code
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

#[test]
fn changes_to_a_served_pool_go_through_its_control_socket() {
    let sc = Scratch::new();
    let p = sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "8M"]);
    let server = Server::start(&sc, "p");
    assert!(p.join("control.sock").exists());
    assert!(sc.ok(&["create", "p", "db", "--size", "4M"]).contains("created \"db\" (id 1, 4 MiB)"));
    assert!(sc.ok(&["snapshot", "p", "web", "snap"]).contains("a snapshot of \"web\""));
    assert!(sc.ok(&["resize", "p", "db", "--size", "2M"]).contains("4 MiB -> 2 MiB"));
    assert!(sc.ok(&["discard", "p", "web"]).contains("discarded 0 blocks"));
    assert!(sc.ok(&["delete", "p", "snap"]).contains("deleted \"snap\""));
    let err = sc.run(&["delete", "p", "nope"]).fails(1).to_string();
    assert_eq!(err.trim(), "error: no such device \"nope\"; devices: web, db");
    sc.run(&["create", "p", "x"]).fails(2);
    let st = status_json(&sc, "p");
    assert_eq!(st["served"], true);
    assert_eq!(st["mode"], "rw");
    let names = device_names(&sc, "p");
    assert_eq!(names, ["web", "db"]);
    // Commands that need the files find the pool busy.
    for args in [vec!["export", "p", "web", "out"], vec!["dump", "p"], vec!["check", "p"]] {
        let err = sc.run(&args).fails(1).to_string();
        assert!(err.contains("pool p is busy: another thinctl or a server holds it"), "{args:?}: {err}");
    }
    assert_eq!(server.stop(), Some(0));
    assert!(!p.join("control.sock").exists(), "the socket is removed on the way out");
    assert_thin_check(&p, "changes through the control socket");
    assert_eq!(device_json(&sc, "p", "db")["size_bytes"], 2 << 20);
}

#[test]
fn a_served_pool_reports_errors_with_the_same_json_kinds() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "10M"]);
    let server = Server::start(&sc, "p");
    let r = sc.run(&["diff", "p", "web", "nosuch", "--json"]);
    r.fails(1);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON on standard output");
    assert_eq!(v["error"]["kind"], "no_such_device", "{v}");
    assert_eq!(v["error"]["message"], "no such device \"nosuch\"; devices: web");
    let r = sc.run(&["detach", "p", "web", "--json"]);
    r.fails(1);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("JSON on standard output");
    assert_eq!(v["error"]["kind"], "no_such_device", "{v}");
    assert!(v["error"]["message"].as_str().expect("message").contains("not attached"), "{v}");
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn data_written_over_nbd_is_in_the_pool_after_the_server_stops() {
    let sc = Scratch::new();
    let p = sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "4M"]);
    let data = pattern(50, 4 << 20);
    let img = sc.file("img", &data);
    let server = Server::start(&sc, "p");
    let out = Command::new("nbdcopy")
        .arg(&img)
        .arg(format!("nbd://{}/web", server.addr))
        .output()
        .unwrap_or_else(|e| panic!("nbdcopy not found ({e}): install libnbd-bin"));
    assert!(out.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(device_json(&sc, "p", "web")["mapped_bytes"], 4 << 20, "ls through the socket sees the writes");
    assert_eq!(server.stop(), Some(0));
    sc.ok(&["export", "p", "web", "out"]);
    assert_eq!(std::fs::read(sc.path("out")).expect("out"), data);
    assert_thin_check(&p, "writes over NBD");
}

#[test]
fn a_socket_left_by_a_killed_server_is_ignored() {
    let sc = Scratch::new();
    let p = sc.pool("p", "64M");
    let server = Server::start(&sc, "p");
    drop(server); // SIGKILL: no cleanup
    assert!(p.join("control.sock").exists(), "the killed server left its socket");
    assert!(sc.ok(&["create", "p", "web", "--size", "1M"]).contains("created \"web\""));
    assert!(sc.ok(&["ls", "p"]).contains("web"));
    // A new server replaces the stale socket.
    let server = Server::start(&sc, "p");
    assert!(sc.ok(&["status", "p"]).contains("(served)"));
    assert_eq!(server.stop(), Some(0));
}

#[test]
fn a_read_only_server_refuses_changes() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "1M"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinctl"))
        .args(["serve", "p", "--listen", "127.0.0.1:0", "--read-only"])
        .current_dir(sc.dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    assert!(line.contains("(read-only)"), "{line}");
    let err = sc.run(&["delete", "p", "web"]).fails(1).to_string();
    assert!(err.contains("served read-only"), "{err}");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("kill");
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    assert!(sc.ok(&["ls", "p"]).contains("web"), "the device is still there");
}

/// Attach to `name` as an NBD client (fixed newstyle, OPT_GO) and stay attached
/// until the stream is dropped.
fn nbd_attach(addr: &str, name: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).expect("hello");
    assert_eq!(&hello[..8], b"NBDMAGIC");
    // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
    c.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = 0x4948_4156_454F_5054u64.to_be_bytes().to_vec(); // IHAVEOPT
    opt.extend_from_slice(&7u32.to_be_bytes()); // OPT_GO
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    c.write_all(&opt).expect("OPT_GO");
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut d = vec![0u8; len as usize];
        c.read_exact(&mut d).expect("option data");
        match kind {
            1 => return c,                                            // ACK: attached
            3 => {}                                                   // INFO
            other => panic!("OPT_GO for {name} answered {other:#x}"), // an error
        }
    }
}

#[test]
fn a_device_an_nbd_client_holds_is_not_deleted_until_it_disconnects() {
    let sc = Scratch::new();
    let p = sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "4M"]);
    sc.ok(&["create", "p", "spare", "--size", "1M"]);
    let server = Server::start(&sc, "p");
    let client = nbd_attach(&server.addr, "web");
    let err = sc.run(&["delete", "p", "web"]).fails(1).to_string();
    assert_eq!(err.trim(), "error: device \"web\" is attached by 1 NBD client(s); disconnect them before deleting it");
    assert_eq!(device_names(&sc, "p"), ["web", "spare"], "a refused delete changes nothing");
    // Devices nobody holds are deleted as usual.
    assert!(sc.ok(&["delete", "p", "spare"]).contains("deleted \"spare\""));
    drop(client);
    // The server sees the disconnect shortly after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let r = sc.run(&["delete", "p", "web"]);
        if r.code == 0 {
            assert!(r.stdout.contains("deleted \"web\" (id 0)"), "{}", r.stdout);
            break;
        }
        assert!(r.stderr.contains("is attached by"), "{}", r.stderr);
        assert!(std::time::Instant::now() < deadline, "the detach was never seen");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(device_names(&sc, "p").is_empty());
    assert_eq!(server.stop(), Some(0));
    assert_thin_check(&p, "a delete after the client left");
}

#[test]
fn the_control_socket_answers_bad_requests_and_silent_clients_hold_nobody_up() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let sc = Scratch::new();
    let p = sc.pool("p", "64M");
    let server = Server::start(&sc, "p");
    let sock = p.join("control.sock");
    let ask = |bytes: &[u8]| -> serde_json::Value {
        let mut s = UnixStream::connect(&sock).expect("connect");
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = String::new();
        s.read_to_string(&mut out).expect("reply");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    };
    // The old command-line form is not a request any more.
    let r = ask(b"{\"argv\": [\"delete\", \"web\"]}\n");
    assert_eq!(r["response"]["result"], "error");
    assert_eq!(r["response"]["error"]["kind"], "bad_request");
    let r = ask(b"{\"version\": 1, \"request\": {\"op\": \"explode\"}}\n");
    assert_eq!(r["response"]["error"]["kind"], "bad_request");
    let r = ask(&[b'{'; 200_000]);
    assert_eq!(r["response"]["error"]["kind"], "bad_request");
    // A typed request by hand.
    let r = ask(b"{\"version\": 1, \"request\": {\"op\": \"status\"}}\n");
    assert_eq!(r["response"]["result"], "status");
    assert_eq!(r["response"]["status"]["mode"], "rw");
    // Clients that connect and say nothing do not hold up thinctl.
    let silent: Vec<UnixStream> = (0..4).map(|_| UnixStream::connect(&sock).expect("connect")).collect();
    let begin = std::time::Instant::now();
    assert!(sc.ok(&["create", "p", "web", "--size", "1M"]).contains("created \"web\""));
    assert!(sc.ok(&["ls", "p"]).contains("web"));
    assert!(begin.elapsed() < std::time::Duration::from_secs(3), "{:?}", begin.elapsed());
    // Nor the server's shutdown.
    let begin = std::time::Instant::now();
    assert_eq!(server.stop(), Some(0));
    assert!(begin.elapsed() < std::time::Duration::from_secs(4), "{:?}", begin.elapsed());
    drop(silent);
}

#[test]
fn a_pool_grows_offline_and_while_served_and_shrinks_only_an_unused_tail() {
    let sc = Scratch::new();
    let p = sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "1G"]);
    let out = sc.ok(&["pool", "extend", "p", "--data-size", "+64M", "--metadata-size", "8M"]);
    assert!(out.contains("data 128 MiB (2048 blocks of 64 KiB), metadata 8 MiB"), "{out}");
    // 20 MiB of data: blocks 0..320 in use.
    let img = sc.path("img");
    std::fs::write(&img, vec![0x5au8; 20 << 20]).expect("image");
    sc.ok(&["import", "p", "web", img.to_str().expect("utf-8")]);
    let err = sc.run(&["pool", "extend", "p", "--data-size", "16M"]).fails(1).to_string();
    assert!(err.contains("cannot shrink") && err.contains("data block 256 past the new end is in use"), "{err}");
    let err = sc.run(&["pool", "extend", "p", "--metadata-size", "4M"]).fails(1).to_string();
    assert!(err.contains("metadata cannot shrink"), "{err}");
    let out = sc.ok(&["pool", "extend", "p", "--data-size", "32M"]);
    assert!(out.contains("data 32 MiB (512 blocks of 64 KiB)"), "{out}");
    assert_eq!(std::fs::metadata(p.join("data")).expect("data").len(), 32 << 20);
    assert_thin_check(&p, "shrink");
    sc.run(&["pool", "extend", "p"]).fails(1);
    let server = Server::start(&sc, "p");
    let out = sc.ok(&["pool", "extend", "p", "--data-size", "256M"]);
    assert!(out.contains("data 256 MiB (4096 blocks"), "served: {out}");
    assert_eq!(status_json(&sc, "p")["data_total_blocks"], 4096);
    assert_eq!(server.stop(), Some(0));
    assert_eq!(std::fs::metadata(p.join("data")).expect("data").len(), 256 << 20);
    assert_eq!(std::fs::metadata(p.join("metadata")).expect("metadata").len(), 8 << 20);
    assert_thin_check(&p, "extend");
    let out = sc.ok(&["pool", "metadata-size", "--data-size", "16G", "--max-thins", "200"]);
    assert!(out.contains("bytes ("), "{out}");
}
