//! What a connection's bytes travel over: a TCP or Unix stream socket, and, after
//! `NBD_OPT_STARTTLS`, a TLS session on it.
//!
//! The socket is non-blocking and shared by the connection's driving thread (which
//! reads) and whoever writes replies (the driver, or a blocking-pool thread finishing
//! a FLUSH). Without TLS both use the socket directly. With TLS the rustls
//! connection is one state machine for both directions, so it sits behind a mutex;
//! the lock order is the connection's outbox first, then this mutex (the read side
//! takes only this one).
//!
//! TLS keeps bytes where `poll` cannot see them: records already read from the socket
//! but not yet decrypted, and plaintext decrypted but not yet taken. [`Transport::read`]
//! decrypts what is buffered before it reads the socket and returns `WouldBlock` only
//! when rustls holds no plaintext and the socket has nothing; and
//! [`Transport::buffered_input`] tells the reactor that a parked connection has input
//! although its socket is quiet.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rustls::ServerConnection;

/// Encrypted bytes (and plaintext before the handshake ends) rustls may hold for
/// one connection before it refuses more: bounds the memory of a client that
/// does not read.
const TLS_BUFFER_LIMIT: usize = 256 << 10;

/// An accepted stream socket.
pub(super) enum Sock {
    /// TCP.
    Tcp(TcpStream),
    /// A Unix domain stream socket.
    Unix(UnixStream),
}

impl Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Sock::Tcp(s) => (&*s).read(buf),
            Sock::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Sock::Tcp(s) => (&*s).write(buf),
            Sock::Unix(s) => (&*s).write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match *self {
            Sock::Tcp(s) => (&*s).write_vectored(bufs),
            Sock::Unix(s) => (&*s).write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sock {
    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// A connection's socket and, once started, its TLS session.
pub(super) struct Transport {
    sock: Sock,
    tls: OnceLock<Mutex<ServerConnection>>,
}

impl Transport {
    pub(super) fn new(sock: Sock) -> Transport {
        Transport { sock, tls: OnceLock::new() }
    }

    /// The socket, for `poll`.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        match &self.sock {
            Sock::Tcp(s) => s.as_fd(),
            Sock::Unix(s) => s.as_fd(),
        }
    }

    /// TLS has been started (its handshake may still be running).
    pub(super) fn is_tls(&self) -> bool {
        self.tls.get().is_some()
    }

    /// Start TLS on this connection (after the STARTTLS acknowledgement was queued).
    /// `early` is what the client sent after its STARTTLS that was already read: the
    /// start of its TLS handshake.
    pub(super) fn start_tls(&self, config: Arc<rustls::ServerConfig>, early: &[u8]) -> io::Result<()> {
        let mut conn = ServerConnection::new(config).map_err(tls_error)?;
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        let mut rest = early;
        while !rest.is_empty() {
            if conn.read_tls(&mut rest)? == 0 {
                break;
            }
        }
        self.tls.set(Mutex::new(conn)).map_err(|_| io::Error::other("TLS was already started"))
    }

    /// Read what the client sent (plaintext): `WouldBlock` when nothing is there,
    /// `Ok(0)` at the end of input.
    pub(super) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.get() else {
            return (&self.sock).read(buf);
        };
        let mut t = lock(tls);
        loop {
            match t.reader().read(buf) {
                Ok(n) => return Ok(n), // 0: the client closed the session cleanly
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The socket ended without close_notify: for NBD the same as an end.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // Records read earlier may still be waiting to be decrypted.
            if t.process_new_packets().map_err(tls_error)?.plaintext_bytes_to_read() > 0 {
                continue;
            }
            match t.read_tls(&mut &self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            t.process_new_packets().map_err(tls_error)?;
        }
    }

    /// Input is waiting inside the TLS session (decrypted or decryptable) that a
    /// `poll` on the socket would not report.
    pub(super) fn buffered_input(&self) -> bool {
        match self.tls.get() {
            None => false,
            // An error is sticky: report it as input, so that the driver reads it.
            Some(tls) => lock(tls).process_new_packets().map_or(true, |s| s.plaintext_bytes_to_read() > 0),
        }
    }

    /// Write to the socket as is (no TLS, or before it starts).
    pub(super) fn write_raw(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.sock).write_vectored(bufs)
    }

    /// Send the TLS records rustls holds: `Ok(true)` once all are written,
    /// `Ok(false)` when the socket would block first.
    pub(super) fn tls_flush(&self) -> io::Result<bool> {
        let Some(tls) = self.tls.get() else { return Ok(true) };
        let mut t = lock(tls);
        while t.wants_write() {
            match t.write_tls(&mut &self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Hand plaintext to the TLS session (encrypted into its buffer, up to its
    /// limit): the bytes taken, 0 when the buffer is full.
    pub(super) fn tls_write(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let Some(tls) = self.tls.get() else { return self.write_raw(bufs) };
        lock(tls).writer().write_vectored(bufs)
    }

    /// TLS records are waiting for the socket.
    pub(super) fn tls_pending(&self) -> bool {
        self.tls.get().is_some_and(|t| lock(t).wants_write())
    }

    /// End the connection: close the TLS session (best effort, never blocking),
    /// then shut the socket down both ways.
    pub(super) fn close(&self) {
        if let Some(tls) = self.tls.get() {
            let mut t = lock(tls);
            t.send_close_notify();
            // Also sends an alert queued by a failed handshake, so the client
            // learns why.
            for _ in 0..4 {
                match t.write_tls(&mut &self.sock) {
                    Ok(n) if n > 0 && t.wants_write() => {}
                    _ => break,
                }
            }
        }
        self.sock.shutdown();
    }
}
