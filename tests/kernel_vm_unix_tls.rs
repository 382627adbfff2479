//! The kernel's NBD client over a Unix socket and over TLS, in the qemu guest of
//! tools/guest (one boot for both):
//!
//! 1. Unix socket: a guest cannot reach a Unix socket of the host, so `thinctl
//!    serve --socket` runs inside the guest (the binary and its libraries arrive on
//!    a disk as a cpio archive); `nbd-client -u SOCKET /dev/nbd0 -N thin0`
//!    attaches, ext4 is made and a file written, the device detached, attached again
//!    and the file read back; SIGTERM stops the server and removes the socket.
//! 2. TLS: `thinctl serve --tls require --tls-verify-peer` on the host; the guest's
//!    `nbd-client` attaches with its CA, client certificate and key, writes random
//!    bytes, and the host reads them back over TLS with nbdcopy.
//!
//! The guest boots under TCG; tools/guest/build.sh installs qemu and fetches the
//! kernel when missing, and the test fails if it cannot.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};

use common::guest::{payload_disk, run_guest};
use sha2::{Digest, Sha256};

fn thinctl_ok(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_thinctl")).args(args).output().expect("run thinctl");
    assert!(out.status.success(), "thinctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn run_ok(dir: &Path, tool: &str, package: &str, args: &[&str]) {
    let out = Command::new(tool)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} not runnable ({e}): install the Debian package {package}"));
    assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// CA, server (localhost, 127.0.0.1) and client certificates in `dir`.
fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let o = |args: &[&str]| run_ok(dir, "openssl", "openssl", args);
    o(&[
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
    ]);
    for (who, usage, san) in
        [("server", "serverAuth", "IP:127.0.0.1,DNS:localhost"), ("client", "clientAuth", "DNS:client")]
    {
        let (key, csr, ext, cert) =
            (format!("{who}-key.pem"), format!("{who}.csr"), format!("{who}.ext"), format!("{who}-cert.pem"));
        o(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &format!("/CN={who}")]);
        std::fs::write(
            dir.join(&ext),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage={usage}\nsubjectAltName={san}\n"
            ),
        )
        .expect("ext");
        o(&[
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
        ]);
    }
}

#[test]
fn the_kernel_attaches_over_a_unix_socket_and_over_tls_with_client_certificates() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = tmp.path().join("pki");
    make_pki(&pki);
    // thinctl at /sbin/thinctl, the shared libraries it loads (at their own paths) and
    // the client's TLS files (at /pki).
    let disk = payload_disk(
        tmp.path(),
        &[(Path::new(env!("CARGO_BIN_EXE_thinctl")), "sbin/thinctl")],
        &[
            (&pki.join("ca-cert.pem"), "pki/ca-cert.pem"),
            (&pki.join("client-cert.pem"), "pki/client-cert.pem"),
            (&pki.join("client-key.pem"), "pki/client-key.pem"),
        ],
    );

    // The TLS server, on the host.
    let dir = tmp.path().join("pool");
    let d = dir.to_str().expect("utf8");
    thinctl_ok(&["pool", "create", d, "--data-size", "256M"]);
    thinctl_ok(&["create", d, "thin0", "--size", "64M"]);
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_thinctl"))
        .args(["serve", d, "--listen", &format!("127.0.0.1:{port}"), "--tls", "require"])
        .args(["--tls-certificates", pki.to_str().expect("utf8"), "--tls-verify-peer"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("thinctl serve");
    let mut line = String::new();
    BufReader::new(server.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("serving line");
    assert!(line.contains("TLS required"), "{line}");

    let script = format!(
        r#"
cd / && cpio -idm < /dev/vda 2>/dev/null
echo "== unix socket, server in the guest"
/sbin/thinctl pool create /tmp/p --data-size 256M >/dev/null
/sbin/thinctl create /tmp/p thin0 --size 64M >/dev/null
/sbin/thinctl serve /tmp/p --socket /tmp/nbd.sock > /tmp/serve.log 2>&1 &
spid=$!
i=0; while [ ! -S /tmp/nbd.sock ]; do i=$((i+1)); [ $i -lt 300 ]; sleep 0.2; done
ls -l /tmp/nbd.sock
/sbin/nbd-client -u /tmp/nbd.sock /dev/nbd0 -N thin0
/sbin/mkfs.ext4 -q -F /dev/nbd0
mkdir -p /mnt/u
mount -t ext4 /dev/nbd0 /mnt/u
dd if=/dev/urandom of=/mnt/u/f bs=1M count=5 2>/dev/null
(cd /mnt/u && sha256sum f) > /tmp/u.sha
umount /mnt/u
/sbin/nbd-client -d /dev/nbd0
/sbin/nbd-client -u /tmp/nbd.sock /dev/nbd0 -N thin0
/sbin/e2fsck -fn /dev/nbd0
mount -t ext4 -o ro /dev/nbd0 /mnt/u
(cd /mnt/u && sha256sum -c /tmp/u.sha)
umount /mnt/u
/sbin/nbd-client -d /dev/nbd0
kill -TERM $spid
wait $spid && echo "server exit 0"
[ ! -e /tmp/nbd.sock ] && echo "socket removed"
echo "== TLS, server on the host"
/sbin/nbd-client 10.0.2.2 {port} /dev/nbd1 -N thin0 -cacertfile /pki/ca-cert.pem -certfile /pki/client-cert.pem -keyfile /pki/client-key.pem -tlshostname localhost
dd if=/dev/urandom of=/tmp/r bs=1M count=4 2>/dev/null
dd if=/tmp/r of=/dev/nbd1 bs=1M oflag=direct 2>/dev/null
sync
echo "tls-written $(sha256sum < /tmp/r | cut -d' ' -f1)"
echo 3 > /proc/sys/vm/drop_caches
echo "tls-read $(dd if=/dev/nbd1 bs=1M count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
/sbin/nbd-client -d /dev/nbd1
echo GUEST-OK
"#
    );
    let out = run_guest(&script, &[&disk], &[]);
    assert!(out.contains("GUEST-OK"), "{out}");
    assert!(out.contains("f: OK"), "the file written over the Unix socket reads back: {out}");
    assert!(out.contains("server exit 0") && out.contains("socket removed"), "{out}");
    let sha = |tag: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(tag).map(|s| s.trim().to_string()))
            .unwrap_or_else(|| panic!("no {tag} line: {out}"))
    };
    let written = sha("tls-written");
    assert_eq!(written.len(), 64, "{out}");
    assert_eq!(sha("tls-read"), written, "the guest read back what it wrote over TLS");

    // The host reads the same bytes over TLS, with its own client.
    let back = tmp.path().join("back.raw");
    let uri = format!("nbds://127.0.0.1:{port}/thin0?tls-certificates={}", pki.to_str().expect("utf8"));
    run_ok(tmp.path(), "nbdcopy", "libnbd-bin", &[&uri, back.to_str().expect("utf8")]);
    let bytes = std::fs::read(&back).expect("back");
    assert_eq!(format!("{:x}", Sha256::digest(&bytes[..4 << 20])), written);
    let _ = server.kill();
    let _ = server.wait();
}
