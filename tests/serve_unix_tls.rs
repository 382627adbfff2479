//! `thinctl serve` over a Unix socket and over TLS, with real clients: libnbd's
//! nbdinfo and nbdcopy, qemu-img and qemu-io (TLS through a `tls-creds-x509`
//! object), and raw sockets for the protocol rules a client library hides
//! (`NBD_REP_ERR_TLS_REQD` before STARTTLS, EXPORT_NAME closing, a stalled TLS
//! handshake). Certificates are made in each test with `openssl`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use thinpool::nbd::wire;

fn thinctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinctl")).args(args).output().expect("run thinctl")
}

fn thinctl_ok(args: &[&str]) -> String {
    let out = thinctl(args);
    assert!(out.status.success(), "thinctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A pool in a temp dir with one 64 MiB device, "disk".
fn pool() -> (tempfile::TempDir, String) {
    let tmp = tempfile::tempdir().expect("tmp");
    let d = tmp.path().join("pool").to_str().expect("utf8").to_string();
    thinctl_ok(&["pool", "create", &d, "--data-size", "512M"]);
    thinctl_ok(&["create", &d, "disk", "--size", "64M"]);
    (tmp, d)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

/// A running `thinctl serve`; killed if the test fails.
struct Served {
    child: Child,
    first_line: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// SIGTERM, then wait (at most `within`) for a clean exit.
    fn stop(&mut self, within: Duration) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let end = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "thinctl serve exited with {status}");
                return;
            }
            assert!(Instant::now() < end, "thinctl serve did not exit within {within:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn serve(dir: &str, extra: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_thinctl"))
        .arg("serve")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("thinctl serve");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("serving line");
    assert!(line.contains("serving pool"), "thinctl serve {extra:?} did not start: {line:?}");
    Served { child, first_line: line }
}

/// Run a client tool; panics with the package to install when it is missing.
fn run(tool: &str, package: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} not runnable ({e}): install the Debian package {package}"))
}

fn run_ok(tool: &str, package: &str, args: &[&str]) -> String {
    let out = run(tool, package, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nbdinfo(uri: &str) -> Output {
    run("nbdinfo", "libnbd-bin", &[uri])
}

// ---------------------------------------------------------------------------------
// Certificates

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("openssl not runnable ({e}): install the Debian package openssl"));
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA in `dir` (ca-cert.pem, ca-key.pem), and certificates it signed in the
/// layout nbdkit, qemu and libnbd read: server-cert.pem/server-key.pem (for
/// 127.0.0.1 and localhost) and client-cert.pem/client-key.pem.
fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=thinpool test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    for (who, usage, san) in
        [("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"), ("client", "clientAuth", "DNS:client")]
    {
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let ext = format!("{who}.ext");
        let cert = format!("{who}-cert.pem");
        openssl(
            dir,
            &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &format!("/CN={who}")],
        );
        std::fs::write(
            dir.join(&ext),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={usage}\nsubjectAltName={san}\n"
            ),
        )
        .expect("ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}

/// A directory holding only `from`'s CA certificate (a client that checks the
/// server but has no certificate of its own).
fn ca_only(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    std::fs::copy(from.join("ca-cert.pem"), to.join("ca-cert.pem")).expect("copy");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

// ---------------------------------------------------------------------------------
// A raw NBD client, for what client libraries do not let us send

fn send_option<S: Write>(c: &mut S, opt: u32, data: &[u8]) {
    let mut v = wire::IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    c.write_all(&v).expect("send option");
}

/// (option, reply type, data)
fn read_option_reply<S: Read>(c: &mut S) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    c.read_exact(&mut h).expect("option reply");
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
    let mut data = vec![0u8; len];
    c.read_exact(&mut data).expect("option reply data");
    (u32::from_be_bytes([h[8], h[9], h[10], h[11]]), u32::from_be_bytes([h[12], h[13], h[14], h[15]]), data)
}

/// Read the greeting and send the client flags (fixed newstyle, no zeroes).
fn greet<S: Read + Write>(c: &mut S) {
    let mut hello = [0u8; 18];
    c.read_exact(&mut hello).expect("greeting");
    assert_eq!(&hello[..8], &wire::NBDMAGIC.to_be_bytes());
    c.write_all(&3u32.to_be_bytes()).expect("flags");
}

fn go_payload(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// The peer closed the connection (reads end or reset within a few seconds).
fn is_closed<S: Read>(c: &mut S) -> bool {
    let mut b = [0u8; 64];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

// ---------------------------------------------------------------------------------
// Unix sockets

#[test]
fn a_unix_socket_alone_serves_nbdinfo_qemu_img_and_qemu_io_and_is_removed_on_sigterm() {
    let (tmp, dir) = pool();
    let sock = tmp.path().join("nbd.sock");
    let mut served = serve(&dir, &["--socket", s(&sock)]);
    assert!(!served.first_line.contains("nbd://"), "no TCP without --listen: {}", served.first_line);
    let meta = std::fs::symlink_metadata(&sock).expect("socket file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    assert_eq!(meta.uid(), nix::unistd::getuid().as_raw());

    let uri = format!("nbd+unix:///disk?socket={}", s(&sock));
    let info = run_ok("nbdinfo", "libnbd-bin", &[&uri]);
    assert!(info.contains("export-size: 67108864"), "{info}");
    let img = run_ok("qemu-img", "qemu-utils", &["info", &uri]);
    assert!(img.contains("virtual size: 64 MiB (67108864 bytes)"), "{img}");
    let io = run_ok(
        "qemu-io",
        "qemu-utils",
        &["-f", "raw", "-c", "write -P 0xab 1M 3M", "-c", "read -P 0xab 1M 3M", "-c", "read -P 0 0 1M", &uri],
    );
    assert!(!io.contains("Pattern verification failed"), "{io}");
    assert_eq!(io.matches("read ").count(), 2, "{io}");

    served.stop(Duration::from_secs(10));
    assert!(!sock.exists(), "the socket file is removed on SIGTERM");
    common_check(&dir);

    // What was written is there for the next server.
    let _again = serve(&dir, &["--socket", s(&sock)]);
    let io = run_ok("qemu-io", "qemu-utils", &["-f", "raw", "-c", "read -P 0xab 1M 3M", &uri]);
    assert!(!io.contains("Pattern verification failed"), "{io}");
}

/// The pool's metadata passes Debian's thin_check.
fn common_check(dir: &str) {
    let out = Command::new("thin_check")
        .arg(Path::new(dir).join("metadata"))
        .output()
        .unwrap_or_else(|e| panic!("thin_check not found ({e}): install thin-provisioning-tools"));
    assert!(out.status.success(), "thin_check: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_unix_socket_next_to_tcp_serves_the_same_device() {
    let (tmp, dir) = pool();
    let sock = tmp.path().join("nbd.sock");
    let port = free_port();
    let mut served = serve(&dir, &["--socket", s(&sock), "--listen", &format!("127.0.0.1:{port}")]);
    assert!(served.first_line.contains("nbd://") && served.first_line.contains("nbd+unix"), "{}", served.first_line);
    let unix = format!("nbd+unix:///disk?socket={}", s(&sock));
    let tcp = format!("nbd://127.0.0.1:{port}/disk");
    run_ok("qemu-io", "qemu-utils", &["-f", "raw", "-c", "write -P 0x5a 0 2M", &unix]);
    let io = run_ok("qemu-io", "qemu-utils", &["-f", "raw", "-c", "read -P 0x5a 0 2M", &tcp]);
    assert!(!io.contains("Pattern verification failed"), "{io}");

    // nbdcopy (several connections, many requests in flight) both ways over the socket.
    let src = tmp.path().join("src.raw");
    let mut data = vec![0u8; 24 << 20];
    let mut x = 0x9e3779b97f4a7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&src, &data).expect("write src");
    run_ok("nbdcopy", "libnbd-bin", &[s(&src), &unix]);
    let back = tmp.path().join("back.raw");
    run_ok("nbdcopy", "libnbd-bin", &[&tcp, s(&back)]);
    let got = std::fs::read(&back).expect("read back");
    assert!(got[..data.len()] == data[..], "nbdcopy over the Unix socket and back over TCP differ");
    served.stop(Duration::from_secs(10));
    assert!(!sock.exists());
}

#[test]
fn a_stale_socket_is_replaced_a_live_one_is_refused_and_a_plain_file_is_kept() {
    let (tmp, dir) = pool();
    let sock = tmp.path().join("nbd.sock");
    // Stale: a socket file nobody listens on (a crashed server's).
    drop(UnixListener::bind(&sock).expect("bind"));
    assert!(sock.exists());
    let _served = serve(&dir, &["--socket", s(&sock)]);
    let info = run_ok("nbdinfo", "libnbd-bin", &[&format!("nbd+unix:///disk?socket={}", s(&sock))]);
    assert!(info.contains("export-size"), "{info}");

    // Live: a second server (another pool) is refused, and the first keeps serving.
    let (_tmp2, dir2) = pool();
    let out = thinctl(&["serve", &dir2, "--socket", s(&sock)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by a running server"), "{err}");
    let info = run_ok("nbdinfo", "libnbd-bin", &[&format!("nbd+unix:///disk?socket={}", s(&sock))]);
    assert!(info.contains("export-size"), "{info}");

    // Not a socket: left alone.
    let file = tmp.path().join("plain");
    std::fs::write(&file, b"keep me").expect("write");
    let out = thinctl(&["serve", &dir2, "--socket", s(&file)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).expect("read"), b"keep me");
}

#[test]
fn socket_group_makes_the_socket_0660_with_that_group_and_an_unknown_group_is_named() {
    let (tmp, dir) = pool();
    // A group that exists on every Debian system, other than ours where possible.
    let groups = std::fs::read_to_string("/etc/group").expect("/etc/group");
    let (name, gid) = groups
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse::<u32>().ok()?))
        })
        .find(|(n, _)| n == "daemon" || n == "adm")
        .expect("group daemon or adm in /etc/group");
    let sock = tmp.path().join("g.sock");
    let mut served = serve(&dir, &["--socket", s(&sock), "--socket-group", &name]);
    let meta = std::fs::symlink_metadata(&sock).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    if nix::unistd::getuid().is_root() {
        assert_eq!(meta.gid(), gid, "group {name}");
    }
    run_ok("nbdinfo", "libnbd-bin", &[&format!("nbd+unix:///disk?socket={}", s(&sock))]);
    served.stop(Duration::from_secs(10));

    let out = thinctl(&["serve", &dir, "--socket", s(&sock), "--socket-group", "no-such-group-here"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no group named \"no-such-group-here\""), "{err}");
}

#[test]
fn unix_clients_share_the_connection_limit_and_a_stalled_one_does_not_hold_up_sigterm() {
    let (tmp, dir) = pool();
    let sock = tmp.path().join("nbd.sock");
    let mut served = serve(&dir, &["--socket", s(&sock), "--max-connections", "1", "--handshake-timeout-ms", "60000"]);
    let mut first = UnixStream::connect(&sock).expect("connect");
    greet(&mut first);
    // A second client past the limit of one is refused, cleanly.
    let mut second = UnixStream::connect(&sock).expect("connect");
    second.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    greet(&mut second);
    send_option(&mut second, wire::OPT_LIST, b"");
    let (_, kind, msg) = read_option_reply(&mut second);
    assert_eq!(kind, wire::REP_ERR_POLICY, "{}", String::from_utf8_lossy(&msg));
    // The first is stalled in the handshake: SIGTERM is not held up by it.
    served.stop(Duration::from_secs(10));
    assert!(!sock.exists());
}

// ---------------------------------------------------------------------------------
// TLS

#[test]
fn tls_require_serves_libnbd_and_qemu_refuses_plaintext_and_a_wrong_ca_and_keeps_serving() {
    let (tmp, dir) = pool();
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let client = tmp.path().join("client");
    ca_only(&pki, &client);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _served = serve(&dir, &["--listen", &listen, "--tls", "require", "--tls-certificates", s(&pki)]);
    let tls_uri = format!("nbds://{listen}/disk?tls-certificates={}", s(&client));

    let info = run_ok("nbdinfo", "libnbd-bin", &[&tls_uri]);
    assert!(info.contains("with TLS") && info.contains("export-size: 67108864"), "{info}");

    // qemu-img and qemu-io with a tls-creds-x509 object.
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(&client));
    let opts = format!("driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0");
    let img = run_ok("qemu-img", "qemu-utils", &["info", "--object", &creds, "--image-opts", &opts]);
    assert!(img.contains("virtual size: 64 MiB (67108864 bytes)"), "{img}");
    let io = run_ok(
        "qemu-io",
        "qemu-utils",
        &["--object", &creds, "--image-opts", &opts, "-c", "write -P 0xc3 0 4M", "-c", "read -P 0xc3 0 4M"],
    );
    assert!(!io.contains("Pattern verification failed") && io.contains("read 4194304/4194304"), "{io}");

    // A plaintext client is refused with the reason.
    let out = run("qemu-img", "qemu-utils", &["info", &format!("nbd://{listen}/disk")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires TLS"), "{err}");
    let out = nbdinfo(&format!("nbd://{listen}/disk"));
    assert!(!out.status.success(), "plaintext nbdinfo must fail against --tls require");

    // On the wire: every option but STARTTLS and ABORT gets ERR_TLS_REQD ...
    let mut c = TcpStream::connect(&listen).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    greet(&mut c);
    for (opt, data) in [
        (wire::OPT_LIST, Vec::new()),
        (wire::OPT_STRUCTURED_REPLY, Vec::new()),
        (wire::OPT_INFO, go_payload("disk")),
        (wire::OPT_GO, go_payload("disk")),
    ] {
        send_option(&mut c, opt, &data);
        let (o, kind, _) = read_option_reply(&mut c);
        assert_eq!((o, kind), (opt, wire::REP_ERR_TLS_REQD), "option {opt}");
    }
    send_option(&mut c, wire::OPT_ABORT, b"");
    assert_eq!(read_option_reply(&mut c).1, wire::REP_ACK);
    // ... and EXPORT_NAME, which cannot be refused, closes the connection.
    let mut c = TcpStream::connect(&listen).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    greet(&mut c);
    send_option(&mut c, wire::OPT_EXPORT_NAME, b"disk");
    assert!(is_closed(&mut c), "EXPORT_NAME before TLS must close the connection");

    // A client that trusts another CA fails the handshake.
    let other = tmp.path().join("other");
    make_pki(&other);
    let wrong = tmp.path().join("wrong");
    ca_only(&other, &wrong);
    let out = nbdinfo(&format!("nbds://{listen}/disk?tls-certificates={}", s(&wrong)));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let creds_wrong = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(&wrong));
    let out = run("qemu-img", "qemu-utils", &["info", "--object", &creds_wrong, "--image-opts", &opts]);
    assert!(!out.status.success(), "qemu-img with the wrong CA must fail");

    // The server survived all of it, and the data written over TLS is there.
    let io = run_ok("qemu-io", "qemu-utils", &["--object", &creds, "--image-opts", &opts, "-c", "read -P 0xc3 0 4M"]);
    assert!(!io.contains("Pattern verification failed"), "{io}");
}

#[test]
fn tls_moves_large_transfers_intact_over_tcp_and_unix_sockets() {
    let (tmp, dir) = pool();
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let port = free_port();
    let sock = tmp.path().join("nbd.sock");
    let mut served = serve(
        &dir,
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--socket",
            s(&sock),
            "--tls",
            "require",
            "--tls-certificates",
            s(&pki),
        ],
    );
    let src = tmp.path().join("src.raw");
    let mut data = vec![0u8; 40 << 20];
    let mut x = 0x2545f4914f6cdd1du64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    // A hole in the middle, to get hole chunks back.
    data[8 << 20..12 << 20].fill(0);
    std::fs::write(&src, &data).expect("write src");
    let tcp = format!("nbds://127.0.0.1:{port}/disk?tls-certificates={}", s(&pki));
    let unix = format!("nbds+unix:///disk?socket={}&tls-certificates={}", s(&sock), s(&pki));
    run_ok("nbdcopy", "libnbd-bin", &[s(&src), &tcp]);
    let back = tmp.path().join("back.raw");
    run_ok("nbdcopy", "libnbd-bin", &[&unix, s(&back)]);
    let got = std::fs::read(&back).expect("read back");
    assert!(got[..data.len()] == data[..], "bytes differ after nbdcopy in over TLS/TCP and out over TLS/Unix");
    let info = run_ok("nbdinfo", "libnbd-bin", &["--map", &unix]);
    assert!(info.contains("hole"), "{info}");
    served.stop(Duration::from_secs(10));
    common_check(&dir);
}

#[test]
fn tls_verify_peer_accepts_clients_of_the_ca_and_refuses_the_others() {
    let (tmp, dir) = pool();
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _served =
        serve(&dir, &["--listen", &listen, "--tls", "require", "--tls-certificates", s(&pki), "--tls-verify-peer"]);
    // pki holds ca-cert.pem plus client-cert.pem/client-key.pem of the same CA.
    let info = run_ok("nbdinfo", "libnbd-bin", &[&format!("nbds://{listen}/disk?tls-certificates={}", s(&pki))]);
    assert!(info.contains("with TLS"), "{info}");
    let creds = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(&pki));
    let opts = format!("driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0");
    run_ok("qemu-img", "qemu-utils", &["info", "--object", &creds, "--image-opts", &opts]);

    // No client certificate.
    let bare = tmp.path().join("bare");
    ca_only(&pki, &bare);
    let out = nbdinfo(&format!("nbds://{listen}/disk?tls-certificates={}", s(&bare)));
    assert!(!out.status.success(), "a client without a certificate must be refused");
    // A client certificate from another CA (the client still trusts our server).
    let other = tmp.path().join("other");
    make_pki(&other);
    std::fs::copy(pki.join("ca-cert.pem"), other.join("ca-cert.pem")).expect("copy");
    let out = nbdinfo(&format!("nbds://{listen}/disk?tls-certificates={}", s(&other)));
    assert!(!out.status.success(), "a client certificate of another CA must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("alert") || err.contains("certificate"), "{err}");

    let info = run_ok("nbdinfo", "libnbd-bin", &[&format!("nbds://{listen}/disk?tls-certificates={}", s(&pki))]);
    assert!(info.contains("with TLS"), "the server keeps serving: {info}");
}

#[test]
fn tls_on_serves_plaintext_and_tls_clients_alike() {
    let (tmp, dir) = pool();
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _served = serve(&dir, &["--listen", &listen, "--tls", "on", "--tls-certificates", s(&pki)]);
    let plain = run_ok("nbdinfo", "libnbd-bin", &[&format!("nbd://{listen}/disk")]);
    assert!(plain.contains("without TLS") && plain.contains("export-size"), "{plain}");
    let tls = run_ok("nbdinfo", "libnbd-bin", &[&format!("nbds://{listen}/disk?tls-certificates={}", s(&pki))]);
    assert!(tls.contains("with TLS") && tls.contains("export-size"), "{tls}");
    // A second STARTTLS inside TLS is invalid; that needs a TLS client of our own,
    // so here: STARTTLS with a payload is refused and the connection goes on.
    let mut c = TcpStream::connect(&listen).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    greet(&mut c);
    send_option(&mut c, wire::OPT_STARTTLS, b"x");
    assert_eq!(read_option_reply(&mut c).1, wire::REP_ERR_INVALID);
    send_option(&mut c, wire::OPT_LIST, b"");
    let (_, kind, _) = read_option_reply(&mut c);
    assert_eq!(kind, wire::REP_SERVER, "plaintext options work with --tls on");
}

#[test]
fn a_stalled_tls_handshake_times_out_and_does_not_hold_up_sigterm() {
    let (tmp, dir) = pool();
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut served = serve(
        &dir,
        &["--listen", &listen, "--tls", "require", "--tls-certificates", s(&pki), "--handshake-timeout-ms", "1000"],
    );
    let stall = |c: &mut TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        greet(c);
        send_option(c, wire::OPT_STARTTLS, b"");
        assert_eq!(read_option_reply(c).1, wire::REP_ACK);
        // ... and never send a ClientHello.
    };
    let mut c = TcpStream::connect(&listen).expect("connect");
    stall(&mut c);
    let t = Instant::now();
    assert!(is_closed(&mut c), "a stalled TLS handshake is closed");
    assert!(t.elapsed() < Duration::from_secs(5), "closed after {:?}", t.elapsed());
    // Half a ClientHello, then silence, and SIGTERM: the server exits at once.
    let mut c = TcpStream::connect(&listen).expect("connect");
    stall(&mut c);
    c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).expect("partial record");
    served.stop(Duration::from_secs(5));
}

#[test]
fn bad_tls_settings_are_refused_with_what_is_wrong() {
    let (tmp, dir) = pool();
    let out = thinctl(&["serve", &dir, "--tls", "require"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --tls-certificates"), "{out:?}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let out = thinctl(&["serve", &dir, "--tls", "on", "--tls-certificates", s(&empty)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server-cert.pem: missing"), "{err}");
    let out = thinctl(&["serve", &dir, "--tls-certificates", s(&empty)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls is off"), "{out:?}");
    // A key that is not the certificate's.
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let mixed: PathBuf = tmp.path().join("mixed");
    std::fs::create_dir(&mixed).expect("mkdir");
    std::fs::copy(pki.join("server-cert.pem"), mixed.join("server-cert.pem")).expect("copy");
    std::fs::copy(pki.join("client-key.pem"), mixed.join("server-key.pem")).expect("copy");
    let out = thinctl(&["serve", &dir, "--tls", "on", "--tls-certificates", s(&mixed)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server-cert.pem with") && err.contains("server-key.pem"), "{err}");
}

// ---------------------------------------------------------------------------------
// TLS from a client of our own (rustls), for what libnbd and qemu never send

fn tls_client_config(pki: &Path) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(pki.join("ca-cert.pem")).expect("ca-cert.pem") {
        roots.add(cert.expect("pem")).expect("root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connect, optionally negotiate structured replies in plain text, then STARTTLS.
/// With `pipelined`, the ClientHello goes out in the same write as STARTTLS,
/// before its acknowledgement was read.
fn start_tls(listen: &str, pki: &Path, structured_first: bool, pipelined: bool) -> TlsStream {
    let mut sock = TcpStream::connect(listen).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    greet(&mut sock);
    if structured_first {
        send_option(&mut sock, wire::OPT_STRUCTURED_REPLY, b"");
        assert_eq!(read_option_reply(&mut sock).1, wire::REP_ACK);
    }
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(tls_client_config(pki), name).expect("client");
    if pipelined {
        let mut bytes = wire::IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&wire::OPT_STARTTLS.to_be_bytes());
        bytes.extend_from_slice(&0u32.to_be_bytes());
        while conn.wants_write() {
            conn.write_tls(&mut bytes).expect("client hello");
        }
        sock.write_all(&bytes).expect("STARTTLS and ClientHello in one write");
    } else {
        send_option(&mut sock, wire::OPT_STARTTLS, b"");
    }
    let (opt, kind, _) = read_option_reply(&mut sock);
    assert_eq!((opt, kind), (wire::OPT_STARTTLS, wire::REP_ACK));
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
    }
    tls
}

/// GO on `name`: the transmission flags.
fn go(c: &mut TlsStream, name: &str) -> u16 {
    send_option(c, wire::OPT_GO, &go_payload(name));
    let mut flags = None;
    loop {
        let (_, kind, data) = read_option_reply(c);
        match kind {
            wire::REP_INFO if u16::from_be_bytes([data[0], data[1]]) == wire::INFO_EXPORT => {
                flags = Some(u16::from_be_bytes([data[10], data[11]]));
            }
            wire::REP_INFO => {}
            wire::REP_ACK => return flags.expect("INFO_EXPORT before ACK"),
            other => panic!("GO answered with {other:#x}: {}", String::from_utf8_lossy(&data)),
        }
    }
}

fn read_request(cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[0..4].copy_from_slice(&wire::REQUEST_MAGIC.to_be_bytes());
    r[6..8].copy_from_slice(&wire::CMD_READ.to_be_bytes());
    r[8..16].copy_from_slice(&cookie.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&length.to_be_bytes());
    r
}

/// A simple reply's (magic, error, cookie).
fn reply_header<S: Read>(c: &mut S) -> (u32, u32, u64) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).expect("reply header");
    (
        u32::from_be_bytes(h[0..4].try_into().expect("4")),
        u32::from_be_bytes(h[4..8].try_into().expect("4")),
        u64::from_be_bytes(h[8..16].try_into().expect("8")),
    )
}

#[test]
fn starttls_forgets_what_was_negotiated_before_and_refuses_a_second_starttls() {
    let (tmp, dir) = pool();
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let listen = format!("127.0.0.1:{}", free_port());
    let _served = serve(&dir, &["--listen", &listen, "--tls", "on", "--tls-certificates", s(&pki)]);
    for pipelined in [false, true] {
        let mut c = start_tls(&listen, &pki, true, pipelined);
        send_option(&mut c, wire::OPT_STARTTLS, b"");
        assert_eq!(read_option_reply(&mut c).1, wire::REP_ERR_INVALID, "a second STARTTLS");
        // Structured replies were agreed in plain text only: forgotten, so no DF flag
        // and a simple reply to READ.
        let flags = go(&mut c, "disk");
        assert_eq!(flags & wire::TF_SEND_DF, 0, "structured replies must not survive STARTTLS");
        c.write_all(&read_request(7, 0, 4096)).expect("read");
        assert_eq!(reply_header(&mut c), (wire::SIMPLE_REPLY_MAGIC, 0, 7));
        let mut data = vec![1u8; 4096];
        c.read_exact(&mut data).expect("data");
        assert!(data.iter().all(|&b| b == 0));
    }
}

#[test]
fn a_tls_client_that_pipelines_far_past_the_caps_gets_every_reply() {
    let (tmp, dir) = pool();
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let listen = format!("127.0.0.1:{}", free_port());
    let _served = serve(
        &dir,
        &["--listen", &listen, "--tls", "require", "--tls-certificates", s(&pki), "--max-bytes-per-connection", "1MiB"],
    );
    let mut c = start_tls(&listen, &pki, false, false);
    go(&mut c, "disk");
    // 3000 reads (84 KB of requests, more than one input buffer) in one go, before
    // reading any of the 12 MiB of replies: the server stops reading at its cap and
    // must go on, in order, as the client reads.
    const N: u64 = 3000;
    let mut batch = Vec::with_capacity(N as usize * 28);
    for i in 0..N {
        batch.extend_from_slice(&read_request(i, (i % 1024) * 4096, 4096));
    }
    c.write_all(&batch).expect("pipelined requests");
    std::thread::sleep(Duration::from_millis(300));
    let mut seen = vec![false; N as usize];
    let mut data = vec![0u8; 4096];
    for _ in 0..N {
        let (magic, error, cookie) = reply_header(&mut c);
        assert_eq!((magic, error), (wire::SIMPLE_REPLY_MAGIC, 0));
        assert!(cookie < N && !seen[cookie as usize], "cookie {cookie}");
        seen[cookie as usize] = true;
        c.read_exact(&mut data).expect("data");
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn fio_with_flushes_and_verify_over_tls_on_a_unix_socket() {
    let (tmp, dir) = pool();
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let sock = tmp.path().join("nbd.sock");
    let mut served = serve(
        &dir,
        &[
            "--socket",
            s(&sock),
            "--tls",
            "require",
            "--tls-certificates",
            s(&pki),
            "--max-requests-per-connection",
            "4",
        ],
    );
    // Flushes go to the blocking pool and finish out of order with the reads and
    // writes around them; at most 4 per connection are queued there.
    // fio does not let libnbd read tls-certificates from the URI; libnbd's default
    // is $HOME/.pki/libnbd.
    let home = tmp.path().join("home");
    ca_only(&pki, &home.join(".pki/libnbd"));
    let out = Command::new("fio")
        .env("HOME", &home)
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri=nbds+unix:///disk?socket={}", s(&sock)),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8m",
            "--numjobs=2",
            "--offset_increment=16m",
            "--iodepth=16",
            "--fsync=4",
            "--verify=crc32c",
            "--do_verify=1",
            "--group_reporting",
            "--verify_state_save=0",
        ])
        .output()
        .unwrap_or_else(|e| panic!("fio not runnable ({e}): install the Debian package fio"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("err= 0"), "{text}");
    assert!(!text.contains("verify: bad"), "{text}");
    served.stop(Duration::from_secs(10));
    common_check(&dir);
}

#[test]
fn sigterm_during_tls_traffic_on_both_listeners_exits_cleanly_within_the_grace() {
    let (tmp, dir) = pool();
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    let sock = tmp.path().join("nbd.sock");
    let port = free_port();
    let mut served = serve(
        &dir,
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--socket",
            s(&sock),
            "--tls",
            "require",
            "--tls-certificates",
            s(&pki),
            "--shutdown-grace-ms",
            "1000",
        ],
    );
    let home = tmp.path().join("home");
    ca_only(&pki, &home.join(".pki/libnbd"));
    let fio = |uri: String| {
        Command::new("fio")
            .env("HOME", &home)
            .args(["--name=load", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randrw", "--bs=64k"])
            .args(["--size=32m", "--iodepth=16", "--time_based", "--runtime=60", "--fsync=8"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("fio not runnable ({e}): install the Debian package fio"))
    };
    let mut clients =
        vec![fio(format!("nbds://127.0.0.1:{port}/disk")), fio(format!("nbds+unix:///disk?socket={}", s(&sock)))];
    std::thread::sleep(Duration::from_secs(2));
    for c in &mut clients {
        assert!(c.try_wait().expect("wait").is_none(), "fio over TLS ended before SIGTERM (could not connect?)");
    }
    let t = Instant::now();
    served.stop(Duration::from_secs(10));
    eprintln!("thinctl serve exited {:?} after SIGTERM under TLS load", t.elapsed());
    assert!(!sock.exists(), "the socket file is removed");
    for c in &mut clients {
        let _ = c.kill();
        let _ = c.wait();
    }
    common_check(&dir);
}

#[test]
fn a_socket_path_near_the_address_limit_is_bound_in_place_with_its_mode() {
    let (tmp, dir) = pool();
    // 100 bytes: fits a socket address (108), the temporary name next to it does not.
    let base = tmp.path().to_str().expect("utf8").len() + 1;
    let sub = tmp.path().join("d".repeat(100 - base - "/n.sock".len()));
    std::fs::create_dir(&sub).expect("mkdir");
    let sock = sub.join("n.sock");
    assert_eq!(s(&sock).len(), 100);
    let mut served = serve(&dir, &["--socket", s(&sock)]);
    let meta = std::fs::symlink_metadata(&sock).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let info = run_ok("nbdinfo", "libnbd-bin", &[&format!("nbd+unix:///disk?socket={}", s(&sock))]);
    assert!(info.contains("export-size"), "{info}");
    served.stop(Duration::from_secs(10));
    assert!(!sock.exists());
    assert_eq!(std::fs::read_dir(&sub).expect("dir").count(), 0, "no temporary file left behind");
}
