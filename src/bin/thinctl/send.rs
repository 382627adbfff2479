//! `thinctl send`: a device as a replication stream on standard output (see
//! `thinpool::stream`), from a pool opened here or, while the pool is served,
//! through the server's control socket (the `send` streaming request).

use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use thinpool::server::protocol::{encode, Request, RequestLine, Response, ResponseLine, MAX_FRAME, PROTOCOL_VERSION};
use thinpool::stream::{self, Offline, ReplicationError, StreamReport};
use thinpool::volume::Access;

use crate::error::{msg, CliError, CliResult};
use crate::open::open_pool;
use crate::progress::{Progress, Unit};
use crate::remote::CONTROL_SOCKET;
use crate::units::format_size;

/// A replication error as the command line words it.
pub fn repl_err(e: ReplicationError) -> CliError {
    match e {
        ReplicationError::Dir(d) => CliError::Dir(d),
        ReplicationError::Pool(p) => CliError::Pool(p),
        other => msg(other.to_string()),
    }
}

/// Connect to the server of `dir` when one runs.
pub fn served(dir: &Path) -> CliResult<Option<UnixStream>> {
    let sock = dir.join(CONTROL_SOCKET);
    if !sock.exists() {
        return Ok(None);
    }
    match UnixStream::connect(&sock) {
        Ok(s) => Ok(Some(s)),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) => Ok(None),
        Err(e) => Err(msg(format!("cannot reach the server of pool {} on {}: {e}", dir.display(), sock.display()))),
    }
}

/// Send a request line and read one reply line.
pub fn request(dir: &Path, s: &UnixStream, r: &mut impl BufRead, request: Request) -> CliResult<Response> {
    (&*s)
        .write_all(encode(&RequestLine { version: PROTOCOL_VERSION, request }).as_bytes())
        .map_err(|e| msg(format!("the server of pool {} stopped answering: {e}", dir.display())))?;
    read_reply(dir, r)
}

/// Read one reply line; an error reply is [`CliError::Remote`].
pub fn read_reply(dir: &Path, r: &mut impl BufRead) -> CliResult<Response> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| msg(format!("the server of pool {} stopped answering: {e}", dir.display())))?;
    if line.is_empty() {
        return Err(msg(format!("the server of pool {} closed the connection without answering", dir.display())));
    }
    match serde_json::from_str::<ResponseLine>(&line) {
        Ok(ResponseLine { response: Response::Error { error }, .. }) => Err(CliError::Remote(error)),
        Ok(r) => Ok(r.response),
        Err(e) => Err(msg(format!("bad reply from the server of pool {}: {e}", dir.display()))),
    }
}

/// What a send or receive says about its stream.
pub fn describe_report(r: &StreamReport) -> String {
    format!(
        "{} data records ({}), {} zero runs ({}); stream {}; identity {}",
        r.data_records,
        format_size(r.data_bytes),
        r.zero_records,
        format_size(r.zero_bytes),
        format_size(r.stream_bytes),
        r.source_identity
    )
}

/// `thinctl send`.
pub fn send(dir: &Path, name: &str, from: Option<&str>, json: bool) -> CliResult {
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        return Err(msg(
            "refusing to write a replication stream to a terminal: redirect standard output (thinctl send ... > FILE, or | thinctl receive ...)",
        ));
    }
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let report = match served(dir)? {
        Some(s) => send_remote(dir, &s, name, from, &mut out)?,
        None => {
            let (mut pd, mut pool) = open_pool(dir, Access::Write)?;
            let size = pd.device(name)?.size_bytes;
            let mut bar = Progress::new("sending", size, Unit::Bytes);
            let target = Offline::new(&mut pd, &mut pool);
            stream::send(&target, name, from, &mut out, &mut |done, _| bar.set(done)).map_err(repl_err)?
        }
    };
    out.flush().map_err(|e| msg(format!("cannot write the stream: {e}")))?;
    if json {
        eprintln!("{}", serde_json::to_string(&report).map_err(|e| msg(e.to_string()))?);
        return Ok(());
    }
    let kind = match from {
        Some(b) => format!("changes since \"{b}\""),
        None => "full".to_string(),
    };
    eprintln!("sent \"{name}\" ({}, {kind}): {}", format_size(report.device_bytes), describe_report(&report));
    if !report.identity_recorded {
        eprintln!(
            "warning: \"{name}\" changed while it was sent: the stream holds it as it was, but it cannot be the base of a later incremental send"
        );
    }
    Ok(())
}

/// `send` through the server: the frames go to `out` as they come.
fn send_remote(
    dir: &Path,
    s: &UnixStream,
    name: &str,
    from: Option<&str>,
    out: &mut impl Write,
) -> CliResult<StreamReport> {
    let mut r = BufReader::with_capacity(1 << 20, s);
    let req = Request::Send { name: name.to_string(), from: from.map(str::to_string) };
    match request(dir, s, &mut r, req)? {
        Response::Ready => {}
        other => return Err(crate::remote::unexpected(dir, &other)),
    }
    let bar = Progress::new("sending (served pool)", 0, Unit::Bytes);
    let lost = |e: std::io::Error| msg(format!("the server of pool {} stopped sending: {e}", dir.display()));
    let mut buf = vec![0u8; MAX_FRAME as usize];
    loop {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).map_err(lost)?;
        let n = u32::from_le_bytes(len);
        if n == 0 {
            break;
        }
        if n > MAX_FRAME {
            return Err(msg(format!(
                "the server of pool {} sent a frame of {n} bytes (at most {MAX_FRAME})",
                dir.display()
            )));
        }
        r.read_exact(&mut buf[..n as usize]).map_err(lost)?;
        out.write_all(&buf[..n as usize]).map_err(|e| msg(format!("cannot write the stream: {e}")))?;
    }
    drop(bar);
    match read_reply(dir, &mut r)? {
        Response::Sent { report } => Ok(report),
        other => Err(crate::remote::unexpected(dir, &other)),
    }
}
