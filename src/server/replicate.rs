//! Send and receive on a served pool: the control socket's streaming requests
//! (see [`protocol`](crate::server::protocol) for the wire form) run
//! [`crate::stream::send`] and [`crate::stream::receive`] against the pool the server
//! holds. Their short exclusive steps (hidden snapshots, naming) hold the pool
//! directory and [`Service::with_pool`]; the bulk of the work (reading the hidden
//! snapshots, writing into the hidden device) goes through the service's read and
//! write paths beside the NBD clients.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::PoolError;
use crate::pool::Pool;
use crate::server::control::{StreamHandler, Streams};
use crate::server::protocol::{
    encode, ControlError, ErrorKind, Request, Response, ResponseLine, MAX_FRAME, PROTOCOL_VERSION,
};
use crate::server::service::Service;
use crate::stream::{self, ReplicationError, Target};
use crate::thin::DevId;
use crate::volume::PoolDir;

/// How long a streaming peer may stay silent (not reading our frames, not sending
/// stream bytes) before the request fails.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// How often a blocked read or write looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// The served pool as a replication [`Target`].
pub struct Served {
    service: Arc<Service>,
    pd: Arc<Mutex<PoolDir>>,
}

impl Served {
    /// The pool a server holds.
    pub fn new(service: Arc<Service>, pd: Arc<Mutex<PoolDir>>) -> Served {
        Served { service, pd }
    }
}

impl Target for Served {
    fn locked<R>(&self, f: impl FnOnce(&mut PoolDir, &mut Pool) -> R) -> R {
        let mut pd = self.pd.lock().unwrap_or_else(PoisonError::into_inner);
        self.service.with_pool(|pool| f(&mut pd, pool))
    }
    fn peek<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> R {
        self.service.with_pool_locked(f)
    }
    fn read(&self, dev: DevId, offset: u64, buf: &mut [u8]) -> Result<(), PoolError> {
        self.service.read(dev, offset, buf)
    }
    fn write(&self, dev: DevId, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        self.service.write(dev, offset, data)
    }
    fn write_zeroes(&self, dev: DevId, offset: u64, len: u64) -> Result<(), PoolError> {
        self.service.write_zeroes(dev, offset, len, true)
    }
    fn commit(&self) -> Result<(), PoolError> {
        self.service.flush()
    }
}

/// The control socket's stream handler for a served pool.
pub fn stream_handler(service: Arc<Service>, pd: Arc<Mutex<PoolDir>>, read_only: bool) -> Streams {
    let h: StreamHandler = Arc::new(move |request, conn, stop| {
        let target = Served::new(Arc::clone(&service), Arc::clone(&pd));
        handle(&target, read_only, request, conn, stop)
    });
    Streams(Some(h))
}

fn reply(conn: &UnixStream, response: Response) -> io::Result<()> {
    let mut w = Deadline { conn, stop: None };
    w.write_all(encode(&ResponseLine { version: PROTOCOL_VERSION, response }).as_bytes())?;
    w.flush()
}

fn to_control(e: ReplicationError) -> ControlError {
    match e {
        ReplicationError::Dir(d) => d.into(),
        ReplicationError::Pool(p) => p.into(),
        ReplicationError::Base(m) => ControlError::new(ErrorKind::Failed, m),
        ReplicationError::Stream(s) => ControlError::new(ErrorKind::BadRequest, s.to_string()),
    }
}

/// Run one streaming request on `conn`.
pub fn handle<T: Target>(
    target: &T,
    read_only: bool,
    request: Request,
    conn: &UnixStream,
    stop: &AtomicBool,
) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(POLL))?;
    conn.set_write_timeout(Some(POLL))?;
    match request {
        Request::Send { name, from } => {
            reply(conn, Response::Ready)?;
            let mut frames = Frames { out: Deadline { conn, stop: Some(stop) }, buf: Vec::new() };
            let r = stream::send(target, &name, from.as_deref(), &mut frames, &mut |_, _| {});
            // The end of the frames, then the outcome.
            let end = frames.flush_frame().and_then(|()| frames.out.write_all(&0u32.to_le_bytes()));
            let response = match r {
                Ok(report) => Response::Sent { report },
                Err(e) => Response::Error { error: to_control(e) },
            };
            end?;
            reply(conn, response)
        }
        Request::Receive { name } => {
            if read_only {
                let error = ControlError::new(ErrorKind::ReadOnly, "the pool is served read-only: it cannot receive");
                return reply(conn, Response::Error { error });
            }
            reply(conn, Response::Ready)?;
            let input = Deadline { conn, stop: Some(stop) };
            let response = match stream::receive(target, &name, input, &mut |_, _| {}) {
                Ok(report) => Response::Received { report },
                Err(e) => Response::Error { error: to_control(e) },
            };
            reply(conn, response)
        }
        _ => {
            let error = ControlError::new(ErrorKind::BadRequest, "not a streaming request");
            reply(conn, Response::Error { error })
        }
    }
}

/// The connection with blocking reads and writes that give up after
/// [`IDLE_TIMEOUT`] without progress, or when the server stops.
struct Deadline<'a> {
    conn: &'a UnixStream,
    stop: Option<&'a AtomicBool>,
}

impl Deadline<'_> {
    fn wait<R>(&mut self, mut op: impl FnMut(&UnixStream) -> io::Result<R>) -> io::Result<R> {
        let since = Instant::now();
        loop {
            match op(self.conn) {
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    if self.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                        return Err(io::Error::new(io::ErrorKind::Interrupted, "the server is stopping"));
                    }
                    if since.elapsed() >= IDLE_TIMEOUT {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the peer was silent for {} s", IDLE_TIMEOUT.as_secs()),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.wait(|mut c| c.read(buf))
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wait(|mut c| c.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Frames of at most [`MAX_FRAME`] bytes around what is written.
struct Frames<'a> {
    out: Deadline<'a>,
    buf: Vec<u8>,
}

impl Frames<'_> {
    fn flush_frame(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.out.write_all(&(self.buf.len() as u32).to_le_bytes())?;
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }
}

impl Write for Frames<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = MAX_FRAME as usize - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == MAX_FRAME as usize {
            self.flush_frame()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flush_frame()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::protocol::{decode_request, RequestLine};

    #[test]
    fn streaming_requests_have_a_stable_wire_form() {
        let send = Request::Send { name: "s2".into(), from: Some("s1".into()) };
        let line = encode(&RequestLine { version: 2, request: send.clone() });
        assert_eq!(line, "{\"version\":2,\"request\":{\"op\":\"send\",\"name\":\"s2\",\"from\":\"s1\"}}\n");
        assert_eq!(decode_request(line.trim_end().as_bytes()).expect("decode"), send);
        let recv = Request::Receive { name: "s2".into() };
        let line = encode(&RequestLine { version: 2, request: recv.clone() });
        assert_eq!(line, "{\"version\":2,\"request\":{\"op\":\"receive\",\"name\":\"s2\"}}\n");
        assert_eq!(decode_request(line.trim_end().as_bytes()).expect("decode"), recv);
        assert!(send.is_streaming() && recv.is_streaming() && !Request::Ls.is_streaming());
        assert_eq!(
            encode(&ResponseLine { version: 2, response: Response::Ready }),
            "{\"version\":2,\"response\":{\"result\":\"ready\"}}\n"
        );
        // A client of version 1 still gets its old requests answered.
        assert_eq!(decode_request(br#"{"version":1,"request":{"op":"ls"}}"#).expect("v1"), Request::Ls);
    }

    #[test]
    fn frames_are_at_most_max_frame_bytes() {
        let (a, b) = UnixStream::pair().expect("pair");
        let writer = std::thread::spawn(move || {
            let mut f = Frames { out: Deadline { conn: &a, stop: None }, buf: Vec::new() };
            f.write_all(&vec![7u8; MAX_FRAME as usize * 2 + 5]).expect("write");
            f.flush().expect("flush");
        });
        let mut r = &b;
        let mut lens = Vec::new();
        let mut total = 0;
        while total < MAX_FRAME as usize * 2 + 5 {
            let mut len = [0u8; 4];
            r.read_exact(&mut len).expect("len");
            let n = u32::from_le_bytes(len) as usize;
            let mut body = vec![0u8; n];
            r.read_exact(&mut body).expect("body");
            assert!(body.iter().all(|&x| x == 7));
            lens.push(n);
            total += n;
        }
        writer.join().expect("writer");
        assert_eq!(lens, vec![MAX_FRAME as usize, MAX_FRAME as usize, 5]);
    }
}
