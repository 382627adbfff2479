//! The control socket of a running server (`DIR/control.sock`, mode 0600).
//!
//! A client sends one JSON line `{"argv": ["snapshot", "thin0", "snap1"]}`: a
//! `thinctl` command line without the program name and pool directory. The server
//! runs it against the pool it holds open and answers with one JSON line
//! `{"code": 0, "stdout": "...", "stderr": "..."}`. So `thinctl` commands that change
//! a served pool behave exactly as they do on a pool that is not served.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// A command sent to the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request {
    /// Command line without the program name and pool directory.
    pub argv: Vec<String>,
}

/// The outcome of a command.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    /// Exit code (0 ok, 1 failed, 2 usage).
    pub code: i32,
    /// What the command printed.
    pub stdout: String,
    /// Its error messages.
    pub stderr: String,
}

/// Runs commands for the control socket.
pub type Handler = Arc<dyn Fn(Vec<String>) -> Reply + Send + Sync>;

/// Send `argv` to the server listening on `sock` and wait for its reply.
pub fn call(sock: &Path, argv: &[String]) -> io::Result<Reply> {
    let mut s = UnixStream::connect(sock)?;
    let mut line = serde_json::to_string(&Request { argv: argv.to_vec() }).map_err(io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    serde_json::from_str(&reply)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad reply from the server: {e}")))
}

/// Listen on `sock` (replacing a stale socket file) until `stop` is set.
pub fn serve(sock: PathBuf, handler: Handler, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
    if sock.exists() {
        // A live server would answer; a stale socket file is left by a crash.
        if UnixStream::connect(&sock).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by a running server", sock.display()),
            ));
        }
        std::fs::remove_file(&sock)?;
    }
    let listener = UnixListener::bind(&sock)?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((conn, _)) => {
                    if let Err(e) = answer(conn, &handler) {
                        eprintln!("thinpool control: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    eprintln!("thinpool control: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let _ = std::fs::remove_file(&sock);
    }))
}

fn answer(conn: UnixStream, handler: &Handler) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_LINE)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handler(req.argv),
        Err(e) => Reply { code: 2, stdout: String::new(), stderr: format!("bad control request: {e}") },
    };
    let mut out = serde_json::to_string(&reply).map_err(io::Error::other)?;
    out.push('\n');
    (&conn).write_all(out.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_sent_over_the_socket_is_run_and_answered() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("control.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Handler = Arc::new(|argv: Vec<String>| Reply {
            code: argv.len() as i32,
            stdout: argv.join(" "),
            stderr: String::new(),
        });
        let t = serve(sock.clone(), handler, Arc::clone(&stop)).expect("serve");
        let mode = std::fs::metadata(&sock).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let r = call(&sock, &["create".into(), "web".into()]).expect("call");
        assert_eq!(r, Reply { code: 2, stdout: "create web".into(), stderr: String::new() });
        // A second server on the same socket is refused while the first runs.
        assert!(serve(sock.clone(), Arc::new(|_| Reply::default()), Arc::new(AtomicBool::new(false))).is_err());
        stop.store(true, Ordering::Relaxed);
        t.join().expect("join");
        assert!(!sock.exists());
    }
}
