//! `thinctl receive`: a replication stream from standard input becomes a new device
//! (see `thinpool::stream`), in a pool opened here or, while the pool is served,
//! through the server's control socket (the `receive` streaming request).

use std::io::{BufReader, IsTerminal, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

use thinpool::server::protocol::{Request, Response};
use thinpool::stream::{self, Offline, StreamReport};
use thinpool::volume::Access;

use crate::error::{msg, CliResult};
use crate::open::open_pool;
use crate::progress::{Progress, Unit};
use crate::send::{describe_report, read_reply, repl_err, request, served};
use crate::units::format_size;

/// `thinctl receive`.
pub fn receive(dir: &Path, name: &str, json: bool) -> CliResult {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(msg(
            "refusing to read a replication stream from a terminal: redirect standard input (thinctl receive ... < FILE, or thinctl send ... | thinctl receive ...)",
        ));
    }
    let input = BufReader::with_capacity(1 << 20, stdin.lock());
    let report = match served(dir)? {
        Some(s) => receive_remote(dir, &s, name, input)?,
        None => {
            let (mut pd, mut pool) = open_pool(dir, Access::Write)?;
            let target = Offline::new(&mut pd, &mut pool);
            let mut bar: Option<Progress> = None;
            stream::receive(&target, name, input, &mut |done, total| {
                bar.get_or_insert_with(|| Progress::new("receiving", total, Unit::Bytes)).set(done)
            })
            .map_err(repl_err)?
        }
    };
    if json {
        println!("{}", serde_json::to_string(&report).map_err(|e| msg(e.to_string()))?);
        return Ok(());
    }
    let kind = match &report.base_name {
        Some(b) => format!("incremental, on top of \"{b}\""),
        None => "full".to_string(),
    };
    println!(
        "received \"{name}\" (id {}, {}, {kind}): {}",
        report.id.map_or_else(|| "?".into(), |i| i.to_string()),
        format_size(report.device_bytes),
        describe_report(&report)
    );
    Ok(())
}

/// `receive` through the server: the stream is copied to the socket once the
/// server is ready; a server that stops reading (it refused the stream) is
/// answered by reading its reply.
fn receive_remote(dir: &Path, s: &UnixStream, name: &str, mut input: impl Read) -> CliResult<StreamReport> {
    let mut r = BufReader::new(s);
    match request(dir, s, &mut r, Request::Receive { name: name.to_string() })? {
        Response::Ready => {}
        other => return Err(crate::remote::unexpected(dir, &other)),
    }
    let bar = Progress::new("receiving (served pool)", 0, Unit::Bytes);
    let mut buf = vec![0u8; 1 << 20];
    let mut read_failed = None;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                read_failed = Some(e);
                break;
            }
        };
        if (&*s).write_all(&buf[..n]).is_err() {
            // The server stopped reading: its reply says why.
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    drop(bar);
    let reply = read_reply(dir, &mut r);
    if let Some(e) = read_failed {
        return Err(msg(format!("cannot read the stream from standard input: {e}; nothing was received")));
    }
    match reply? {
        Response::Received { report } => Ok(report),
        other => Err(crate::remote::unexpected(dir, &other)),
    }
}
