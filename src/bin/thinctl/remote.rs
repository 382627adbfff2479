//! The client side of a served pool's control socket.
//!
//! While `thinctl serve DIR` runs it holds the pool's exclusive lock, so the other
//! commands cannot open the files. Instead `create`, `snapshot`, `delete`,
//! `discard`, `resize`, `ls` and `status` find `DIR/control.sock`, send their
//! command line (without the program name and DIR) to the server, which runs it on
//! the pool it holds, and print the server's answer. A socket file nobody answers on
//! (left by a crash) is ignored. The other commands say the pool is busy. The server
//! side is `serve`.

use std::path::Path;

use thinpool::server::control;
use thinpool::volume::PoolChange;

use crate::error::{msg, CliError, CliResult};

/// Name of the control socket inside a pool directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// The command line a change is sent as.
pub fn change_argv(change: &PoolChange) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    let opt = |v: &mut Vec<String>, name: &str, value: Option<String>| {
        if let Some(x) = value {
            v.push(format!("--{name}"));
            v.push(x);
        }
    };
    match change {
        PoolChange::Create { name, size_bytes, id } => {
            v.extend(["create".into(), name.clone()]);
            opt(&mut v, "size", Some(size_bytes.to_string()));
            opt(&mut v, "id", id.map(|i| i.to_string()));
        }
        PoolChange::Snapshot { origin, name, id } => {
            v.extend(["snapshot".into(), origin.clone(), name.clone()]);
            opt(&mut v, "id", id.map(|i| i.to_string()));
        }
        PoolChange::Delete { name } => v.extend(["delete".into(), name.clone()]),
        PoolChange::Discard { name, offset, length } => {
            v.extend(["discard".into(), name.clone()]);
            opt(&mut v, "offset", offset.map(|o| o.to_string()));
            opt(&mut v, "length", length.map(|l| l.to_string()));
        }
        PoolChange::Resize { name, size_bytes } => {
            v.extend(["resize".into(), name.clone()]);
            opt(&mut v, "size", Some(size_bytes.to_string()));
        }
    }
    v
}

/// Send `argv` to the server of `dir` when one runs: prints its answer and returns
/// true (or its failure), or returns false when no server answers.
pub fn forward(dir: &Path, argv: &[String]) -> CliResult<bool> {
    let sock = dir.join(CONTROL_SOCKET);
    if !sock.exists() {
        return Ok(false);
    }
    match control::call(&sock, argv) {
        Ok(reply) => {
            print!("{}", reply.stdout);
            eprint!("{}", reply.stderr);
            if reply.code == 0 {
                Ok(true)
            } else {
                Err(CliError::Exit(reply.code))
            }
        }
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) => Ok(false),
        Err(e) => Err(msg(format!("the server of pool {} did not answer on {}: {e}", dir.display(), sock.display()))),
    }
}
