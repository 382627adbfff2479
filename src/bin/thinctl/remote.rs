//! The client side of a served pool's control socket.
//!
//! While `thinctl serve DIR` runs it holds the pool's exclusive lock, so the other
//! commands cannot open the files. Instead `create`, `snapshot`, `delete`,
//! `discard`, `resize`, `ls` and `status` find `DIR/control.sock` and send the server
//! a typed request (`thinpool::server::protocol`); the server answers with data (an
//! outcome, a listing, a status) that the command prints exactly as it prints them
//! for a pool it opened itself (`views`), or with a typed error worded the same way.
//! A socket file nobody answers on (left by a crash) is ignored. The other commands
//! find the pool busy. The server side is `thinpool::server::control::Controller`.

use std::path::Path;

use thinpool::server::control::{self, CallError};
use thinpool::server::protocol::{Request, Response};

use crate::error::{msg, CliError, CliResult};

/// Name of the control socket inside a pool directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Send `request` to the server of `dir` when one runs: its response (`None` when no
/// server answers). An error response is returned as [`CliError::Remote`].
pub fn forward(dir: &Path, request: Request) -> CliResult<Option<Response>> {
    let sock = dir.join(CONTROL_SOCKET);
    if !sock.exists() {
        return Ok(None);
    }
    match control::call(&sock, &request) {
        Ok(Response::Error { error }) => Err(CliError::Remote(error)),
        Ok(response) => Ok(Some(response)),
        Err(CallError::Connect(e))
            if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) =>
        {
            Ok(None)
        }
        Err(e) => Err(msg(format!("the server of pool {} did not answer on {}: {e}", dir.display(), sock.display()))),
    }
}

/// The error for a response of the wrong kind.
pub fn unexpected(dir: &Path, response: &Response) -> CliError {
    msg(format!("the server of pool {} answered with an unexpected response: {response:?}", dir.display()))
}
