//! The NBD server: the listener and its accept loop, and the connection driver that
//! runs the handshake (`handshake.rs`) and then the transmission phase
//! (`transmission.rs`) on each connection.
//!
//! Each TCP connection gets a reader thread that parses requests and a few worker
//! threads that execute them; replies are written under a per-connection lock and
//! may complete out of order. [`serve_connection`] runs the same protocol code over
//! any byte stream, one request at a time (the fuzz target uses it).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::export::Catalog;
use super::handshake::negotiate;
use super::transmission::transmission;

/// Largest READ/WRITE payload accepted (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Refuse writes on every export.
    pub read_only: bool,
    /// Worker threads per connection (0: execute on the reader thread).
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { read_only: false, workers: 4 }
    }
}

/// A bound NBD server.
pub struct Server {
    listener: TcpListener,
    catalog: Arc<dyn Catalog>,
    config: ServerConfig,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.listener.local_addr().ok()).finish()
    }
}

impl Server {
    /// Bind to `addr` (use port 0 for an ephemeral port).
    pub fn bind(addr: &str, catalog: Arc<dyn Catalog>, config: ServerConfig) -> io::Result<Server> {
        let listener = TcpListener::bind(addr)?;
        Ok(Server { listener, catalog, config })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept connections until `stop` is set; then stop accepting, let every
    /// connection finish its in-flight requests, and return.
    pub fn serve(&self, stop: Arc<AtomicBool>) -> io::Result<()> {
        self.listener.set_nonblocking(true)?;
        let mut conns: Vec<std::thread::JoinHandle<()>> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let catalog = Arc::clone(&self.catalog);
                    let config = self.config.clone();
                    let stop = Arc::clone(&stop);
                    conns.push(std::thread::spawn(move || {
                        if let Err(e) = handle_tcp(stream, catalog, config, stop) {
                            if e.kind() != io::ErrorKind::UnexpectedEof {
                                eprintln!("thinpool nbd: connection ended: {e}");
                            }
                        }
                    }));
                    conns.retain(|h| !h.is_finished());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => eprintln!("thinpool nbd: accept failed: {e}"),
            }
        }
        for h in conns {
            let _ = h.join();
        }
        Ok(())
    }
}

fn handle_tcp(
    stream: TcpStream,
    catalog: Arc<dyn Catalog>,
    config: ServerConfig,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = stream.try_clone()?;
    let writer = Arc::new(Mutex::new(stream));
    let Some(session) = negotiate(&mut reader, &writer, catalog.as_ref(), config.read_only)? else { return Ok(()) };
    // A read timeout lets the reader notice a shutdown between requests.
    reader.set_read_timeout(Some(Duration::from_millis(200)))?;
    let name = session.name.clone();
    let r = transmission(&mut reader, &writer, session, config.workers, &stop);
    catalog.close(&name);
    r
}

/// Serve one client over any byte stream, one request at a time: the protocol
/// without threads (used by the fuzz target and tests).
pub fn serve_connection<R: Read, W: Write + Send + 'static>(
    reader: &mut R,
    writer: Arc<Mutex<W>>,
    catalog: &dyn Catalog,
    config: &ServerConfig,
) -> io::Result<()> {
    let Some(session) = negotiate(reader, &writer, catalog, config.read_only)? else { return Ok(()) };
    let name = session.name.clone();
    let r = transmission(reader, &writer, session, 0, &AtomicBool::new(false));
    catalog.close(&name);
    r
}

/// Write `parts` as one message under the connection's writer lock, then flush.
pub(super) fn send<W: Write>(w: &Mutex<W>, parts: &[&[u8]]) -> io::Result<()> {
    let mut g = w.lock().map_err(|_| io::Error::other("writer lock poisoned"))?;
    for p in parts {
        g.write_all(p)?;
    }
    g.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::mem::MemCatalog;
    use crate::nbd::wire;

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = wire::IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn a_scripted_session_over_a_byte_stream_gets_the_expected_replies() {
        let mut input = 3u32.to_be_bytes().to_vec();
        let mut go = 1u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"a");
        go.extend_from_slice(&0u16.to_be_bytes());
        input.extend(opt(wire::OPT_GO, &go));
        let w = wire::Request {
            flags: wire::CMD_FLAG_FUA,
            command: wire::Command::Write,
            cookie: 1,
            offset: 100,
            length: 4,
        };
        input.extend_from_slice(&wire::encode_request(&w));
        input.extend_from_slice(b"abcd");
        let r = wire::Request { flags: 0, command: wire::Command::Read, cookie: 2, offset: 98, length: 8 };
        input.extend_from_slice(&wire::encode_request(&r));
        let d = wire::Request { flags: 0, command: wire::Command::Disc, cookie: 3, offset: 0, length: 0 };
        input.extend_from_slice(&wire::encode_request(&d));
        let out = Arc::new(Mutex::new(Vec::new()));
        let catalog = MemCatalog::new(&[("a", 1 << 20)]);
        serve_connection(
            &mut input.as_slice(),
            Arc::clone(&out),
            &catalog,
            &ServerConfig { read_only: false, workers: 0 },
        )
        .expect("session");
        let out = out.lock().expect("lock").clone();
        // The last reply is the read: header with cookie 2, then the bytes.
        let tail = &out[out.len() - 24..];
        assert_eq!(&tail[..16], &wire::simple_reply(0, 2));
        assert_eq!(&tail[16..], b"\0\0abcd\0\0");
        // Before it, the write's reply with cookie 1.
        assert_eq!(&out[out.len() - 40..out.len() - 24], &wire::simple_reply(0, 1));
    }
}
