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
