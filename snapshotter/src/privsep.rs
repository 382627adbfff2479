//! Privilege separation for `--attach nbd --user USER`: started as root, the
//! snapshotter starts a helper (itself, with the hidden first argument
//! [`HELPER_ARG`]) that keeps root, then drops to USER for everything else — the
//! pool, `mkfs.ext4`, the NBD server, the gRPC service. The helper does exactly the
//! kernel attach: connect a `/dev/nbdN` to a `ctr-N` export on the loopback with
//! `nbd-client`, disconnect a `/dev/nbdN`, and tell whether one is open (mounted).
//!
//! The two talk over the helper's stdin and stdout, one JSON object per line. The
//! helper trusts nothing it reads: lines are at most [`MAX_LINE`] bytes, the device
//! must be an existing `/dev/nbdN`, the export a snapshot's name (`ctr-N`), the
//! server address a loopback one; anything else is refused with an error naming it.
//! It ignores SIGINT and SIGTERM, sits in its own process group, and exits when its
//! stdin closes (the snapshotter exited, or was killed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};

use crate::attach::{Kernel, NbdClient};
use crate::error::SnapError;

/// The first argument that makes the binary the helper.
pub const HELPER_ARG: &str = "__attach-helper";
/// Longest request or reply line.
pub const MAX_LINE: usize = 4096;

/// Read one line of at most [`MAX_LINE`] bytes; `None` at end of input.
fn read_line(r: &mut impl BufRead) -> Result<Option<String>, String> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(format!("a line longer than {MAX_LINE} bytes (or cut off)"));
    }
    buf.pop();
    String::from_utf8(buf).map(Some).map_err(|_| "a line that is not UTF-8".to_string())
}

/// Check a request and do it; the reply's error text when refused or failed.
fn serve_request(kernel: &dyn Kernel, line: &str) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not a JSON request: {e}"))?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).ok_or_else(|| format!("the request has no \"{k}\" string"));
    let op = s("op")?;
    let dev = s("device")?;
    let n = dev.strip_prefix("/dev/nbd").unwrap_or("");
    if n.is_empty() || n.len() > 6 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("\"{}\" is not an NBD device node (/dev/nbdN)", dev.chars().take(64).collect::<String>()));
    }
    if !kernel.devices().iter().any(|d| d == dev) {
        return Err(format!("the kernel has no {dev}"));
    }
    match op {
        "busy" => kernel.busy(dev).map(|b| serde_json::json!({ "busy": b })),
        "disconnect" => kernel.disconnect(dev).map(|()| serde_json::json!({})),
        "connect" => {
            let name = s("export")?;
            let id = name.strip_prefix("ctr-").unwrap_or("");
            if id.is_empty() || id.len() > 10 || !id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "\"{}\" is not a snapshot's export (ctr-N)",
                    name.chars().take(64).collect::<String>()
                ));
            }
            let addr: SocketAddr = s("addr")?.parse().map_err(|e| format!("bad server address: {e}"))?;
            if !addr.ip().is_loopback() && !addr.ip().is_unspecified() {
                return Err(format!(
                    "{addr} is not on the loopback: the helper attaches only the snapshotter's own exports"
                ));
            }
            let ro = v.get("read_only").and_then(|x| x.as_bool()).unwrap_or(false);
            kernel.connect(dev, addr, name, ro).map(|()| serde_json::json!({}))
        }
        other => Err(format!("unknown operation \"{}\"", other.chars().take(32).collect::<String>())),
    }
}

/// Serve requests from `input` to `output` until `input` ends.
pub fn serve_helper(kernel: &dyn Kernel, input: &mut impl BufRead, output: &mut impl Write) -> std::io::Result<()> {
    loop {
        let reply = match read_line(input) {
            Ok(None) => return Ok(()),
            Ok(Some(line)) => serve_request(kernel, &line),
            Err(e) => {
                // Cannot find the next request's start: answer and stop.
                let r = serde_json::json!({ "error": e });
                writeln!(output, "{r}")?;
                return output.flush();
            }
        };
        let r = match reply {
            Ok(v) => v,
            Err(e) => serde_json::json!({ "error": e }),
        };
        writeln!(output, "{r}")?;
        output.flush()?;
    }
}

/// The helper's `main`: serve on stdin/stdout, ignoring SIGINT and SIGTERM.
pub fn helper_main() -> ExitCode {
    let ignored = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, Arc::clone(&ignored)) {
            eprintln!("thinpool-snapshotter attach helper: cannot ignore signal {sig}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut output = std::io::stdout().lock();
    match serve_helper(&NbdClient, &mut input, &mut output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// The snapshotter's side: a [`Kernel`] whose privileged operations go to the
/// helper; reading sysfs (devices, connection pids, boot id) needs no privilege.
#[derive(Debug)]
pub struct Helper {
    io: Mutex<(ChildStdin, BufReader<ChildStdout>)>,
    child: Mutex<Child>,
}

impl Helper {
    /// Start the helper (the running binary, as the current, privileged, user).
    pub fn spawn() -> Result<Helper, SnapError> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe()
            .map_err(|e| SnapError::Attach(format!("cannot find the snapshotter's own binary for the helper: {e}")))?;
        let mut child = Command::new(exe)
            .arg(HELPER_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| SnapError::Attach(format!("cannot start the attach helper: {e}")))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(SnapError::Attach("the attach helper has no pipes".into()));
        };
        Ok(Helper { io: Mutex::new((stdin, BufReader::new(stdout))), child: Mutex::new(child) })
    }

    fn call(&self, req: serde_json::Value) -> Result<serde_json::Value, String> {
        let mut io = self.io.lock().unwrap_or_else(PoisonError::into_inner);
        let gone = |e: &dyn std::fmt::Display| format!("the attach helper is gone ({e})");
        writeln!(io.0, "{req}").map_err(|e| gone(&e))?;
        io.0.flush().map_err(|e| gone(&e))?;
        let line = read_line(&mut io.1).map_err(|e| gone(&e))?.ok_or_else(|| gone(&"it closed its output"))?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("the attach helper said nonsense: {e}"))?;
        match v.get("error").and_then(|e| e.as_str()) {
            Some(e) => Err(e.to_string()),
            None => Ok(v),
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Closing its stdin ends it.
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        drop(child.stdin.take());
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Kernel for Helper {
    fn devices(&self) -> Vec<String> {
        NbdClient.devices()
    }
    fn connected(&self, dev: &str) -> Option<u32> {
        NbdClient.connected(dev)
    }
    fn busy(&self, dev: &str) -> Result<bool, String> {
        let v = self.call(serde_json::json!({ "op": "busy", "device": dev }))?;
        v.get("busy").and_then(|b| b.as_bool()).ok_or_else(|| "the attach helper's reply has no \"busy\"".into())
    }
    fn connect(&self, dev: &str, addr: SocketAddr, name: &str, read_only: bool) -> Result<(), String> {
        self.call(serde_json::json!({
            "op": "connect", "device": dev, "addr": addr.to_string(), "export": name, "read_only": read_only,
        }))
        .map(|_| ())
    }
    fn disconnect(&self, dev: &str) -> Result<(), String> {
        self.call(serde_json::json!({ "op": "disconnect", "device": dev })).map(|_| ())
    }
    fn boot_id(&self) -> String {
        NbdClient.boot_id()
    }
}

/// Become `uid`:`gid` for good (no supplementary groups), checking it took.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), String> {
    use nix::unistd::{getegid, geteuid, getgid, getuid, setgid, setgroups, setuid, Gid, Uid};
    setgroups(&[]).map_err(|e| format!("cannot drop the supplementary groups: {e}"))?;
    setgid(Gid::from_raw(gid)).map_err(|e| format!("cannot become group {gid}: {e}"))?;
    setuid(Uid::from_raw(uid)).map_err(|e| format!("cannot become user {uid}: {e}"))?;
    if getuid().as_raw() != uid || geteuid().as_raw() != uid || getgid().as_raw() != gid || getegid().as_raw() != gid {
        return Err(format!("still not user {uid} and group {gid} after setuid"));
    }
    if uid != 0 && setuid(Uid::from_raw(0)).is_ok() {
        return Err("could become root again after dropping privileges".into());
    }
    Ok(())
}

/// Parse `--user`: `UID`, `UID:GID` or a user name from /etc/passwd (its group).
pub fn parse_user(s: &str) -> Result<(u32, u32), String> {
    let num = |x: &str| x.parse::<u32>().map_err(|_| format!("\"{x}\" is not a user or group id"));
    if let Some((u, g)) = s.split_once(':') {
        return Ok((num(u)?, num(g)?));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
        let u = num(s)?;
        return Ok((u, u));
    }
    match nix::unistd::User::from_name(s) {
        Ok(Some(u)) => Ok((u.uid.as_raw(), u.gid.as_raw())),
        Ok(None) => Err(format!("no user \"{s}\" in /etc/passwd")),
        Err(e) => Err(format!("cannot look up user \"{s}\": {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as M;

    #[derive(Debug, Default)]
    struct Rec(M<Vec<String>>);
    impl Kernel for Rec {
        fn devices(&self) -> Vec<String> {
            vec!["/dev/nbd0".into(), "/dev/nbd1".into()]
        }
        fn connected(&self, _: &str) -> Option<u32> {
            None
        }
        fn busy(&self, dev: &str) -> Result<bool, String> {
            self.0.lock().unwrap().push(format!("busy {dev}"));
            Ok(true)
        }
        fn connect(&self, dev: &str, addr: SocketAddr, name: &str, ro: bool) -> Result<(), String> {
            self.0.lock().unwrap().push(format!("connect {dev} {addr} {name} {ro}"));
            Ok(())
        }
        fn disconnect(&self, dev: &str) -> Result<(), String> {
            self.0.lock().unwrap().push(format!("disconnect {dev}"));
            Err("not connected".into())
        }
        fn boot_id(&self) -> String {
            String::new()
        }
    }

    fn serve(input: &str) -> (Vec<serde_json::Value>, Vec<String>) {
        let k = Rec::default();
        let mut out = Vec::new();
        serve_helper(&k, &mut input.as_bytes(), &mut out).unwrap();
        let replies = String::from_utf8(out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let done = k.0.lock().unwrap().clone();
        (replies, done)
    }

    #[test]
    fn the_helper_refuses_what_is_not_an_attach_of_our_own_exports() {
        // (Needs no nbd module: every request here is refused before the device
        // is looked up, or names a device that does not exist.)
        let bad = [
            (r#"{"op":"connect","device":"/dev/sda","addr":"127.0.0.1:1","export":"ctr-1"}"#, "not an NBD device node"),
            (r#"{"op":"connect","device":"/dev/nbd","addr":"127.0.0.1:1","export":"ctr-1"}"#, "not an NBD device node"),
            (r#"{"op":"disconnect","device":"/dev/nbd1/../sda"}"#, "not an NBD device node"),
            (r#"{"op":"busy","device":"/dev/nbd999999"}"#, "the kernel has no /dev/nbd999999"),
            (r#"{"op":"connect"}"#, "no \"device\""),
            ("[1,2]", "no \"op\""),
            ("garbage", "not a JSON request"),
        ];
        for (req, want) in bad {
            let (replies, done) = serve(&format!("{req}\n"));
            let e = replies[0]["error"].as_str().unwrap_or_else(|| panic!("{req}: {:?}", replies[0]));
            assert!(e.contains(want), "{req}: {e}");
            assert!(done.is_empty(), "{req}: nothing done");
        }
        // A line past the limit is refused and ends the session.
        let (replies, done) = serve(&("x".repeat(MAX_LINE + 10) + "\n{\"op\":\"busy\"}\n"));
        assert_eq!(replies.len(), 1);
        assert!(replies[0]["error"].as_str().unwrap().contains("longer than"));
        assert!(done.is_empty());
    }

    #[test]
    fn the_helper_checks_export_names_and_addresses_and_does_the_rest() {
        let (replies, done) = serve(concat!(
            r#"{"op":"connect","device":"/dev/nbd0","addr":"10.0.0.1:10809","export":"ctr-1"}"#,
            "\n",
            r#"{"op":"connect","device":"/dev/nbd0","addr":"127.0.0.1:10809","export":"../etc"}"#,
            "\n",
            r#"{"op":"connect","device":"/dev/nbd0","addr":"127.0.0.1:10809","export":"ctr-7","read_only":true}"#,
            "\n",
            r#"{"op":"busy","device":"/dev/nbd0"}"#,
            "\n",
            r#"{"op":"disconnect","device":"/dev/nbd0"}"#,
            "\n",
        ));
        assert!(replies[0]["error"].as_str().unwrap().contains("not on the loopback"));
        assert!(replies[1]["error"].as_str().unwrap().contains("not a snapshot's export"));
        assert_eq!(replies[2], serde_json::json!({}));
        assert_eq!(replies[3]["busy"], true);
        assert_eq!(replies[4]["error"], "not connected");
        assert_eq!(
            done,
            vec!["connect /dev/nbd0 127.0.0.1:10809 ctr-7 true", "busy /dev/nbd0", "disconnect /dev/nbd0"]
        );
    }

    #[test]
    fn user_specs_parse() {
        assert_eq!(parse_user("65534").unwrap(), (65534, 65534));
        assert_eq!(parse_user("1000:100").unwrap(), (1000, 100));
        assert!(parse_user("1000:x").unwrap_err().contains("not a user or group id"));
        assert_eq!(parse_user("root").unwrap(), (0, 0));
        assert!(parse_user("no-such-user-here").unwrap_err().contains("no user"));
    }
}
