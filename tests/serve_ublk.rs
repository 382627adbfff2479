//! ublk on a host without the ublk driver (this project's build host: no
//! `/dev/ublk-control`): `thinctl serve --ublk` and `thinctl attach` fail with an
//! error naming the kernel option and the module, the server keeps serving, and
//! the control socket's `attach`/`detach`/`local_devices` answer typed errors.
//! `THINCTL_UBLK_CONTROL` points the check at a path that surely does not exist,
//! so the same holds on a host that has the driver. The devices themselves are
//! tested with the real kernel in `kernel_vm_ublk.rs`.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn thinctl(args: &[&str], control: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinctl"))
        .args(args)
        .env("THINCTL_UBLK_CONTROL", control)
        .output()
        .expect("run thinctl")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_with(out: &Output, words: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for w in words {
        assert!(err.contains(w), "{w:?} not in: {err}");
    }
}

#[test]
fn without_the_ublk_driver_serve_and_attach_name_the_kernel_option_and_the_module() {
    let tmp = tempfile::tempdir().expect("tmp");
    let missing = tmp.path().join("no-ublk-control");
    let missing = missing.to_str().expect("utf8");
    let dir = tmp.path().join("p");
    let d = dir.to_str().expect("utf8");
    ok(&thinctl(&["pool", "create", d, "--data-size", "16M"], missing));
    ok(&thinctl(&["create", d, "thin0", "--size", "4M"], missing));

    // serve --ublk refuses to start, and says why.
    let out = thinctl(&["serve", d, "--listen", "127.0.0.1:0", "--ublk", "thin0"], missing);
    fails_with(&out, &["cannot attach thin0 over ublk", "does not exist", "CONFIG_BLK_DEV_UBLK", "ublk_drv"]);
    // attach needs a server.
    fails_with(&thinctl(&["attach", d, "thin0"], missing), &["is not served", "thinctl serve"]);

    // A running server answers attach with the same error and keeps serving.
    let port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_thinctl"))
        .args(["serve", d, "--listen", &format!("127.0.0.1:{port}")])
        .env("THINCTL_UBLK_CONTROL", missing)
        .stdout(Stdio::piped())
        .spawn()
        .expect("serve");
    let mut line = String::new();
    BufReader::new(server.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("serving line");
    assert!(line.contains("serving pool"), "{line}");
    fails_with(&thinctl(&["attach", d, "thin0"], missing), &["does not exist", "CONFIG_BLK_DEV_UBLK", "ublk_drv"]);
    fails_with(&thinctl(&["attach", d, "thin0", "--read-only", "--json"], missing), &["CONFIG_BLK_DEV_UBLK"]);
    fails_with(&thinctl(&["detach", d, "thin0"], missing), &["\"thin0\" is not attached over ublk"]);
    assert_eq!(ok(&thinctl(&["attach", d, "--json"], missing)).trim(), r#"{"devices":[]}"#);
    assert_eq!(ok(&thinctl(&["attach", d], missing)), "");
    // Nothing holds the device: it can be deleted.
    ok(&thinctl(&["create", d, "other", "--size", "4M"], missing));
    ok(&thinctl(&["delete", d, "other"], missing));
    assert!(ok(&thinctl(&["status", d], missing)).contains("mode            rw"));

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    let begin = Instant::now();
    loop {
        if let Some(status) = server.try_wait().expect("wait") {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(begin.elapsed() < Duration::from_secs(10), "the server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(&thinctl(&["check", d], missing));
}
