//! An NBD server (fixed newstyle handshake, simple and structured replies,
//! `base:allocation` block status) over an [`Export`]/[`Catalog`] interface.
//!
//! Requests are parsed, then validated, then executed; every error becomes an NBD
//! errno in one place ([`export::errno`]). Nothing sized by the client is allocated
//! before it is checked against the limits.
//!
//! - [`wire`]: constants, typed option and command codes, header encoding.
//! - `handshake.rs`: the greeting and option haggling, one function per option
//!   (no I/O: replies go to a buffer); the attach guard.
//! - `transmission.rs`: request framing, validation and execution (no I/O).
//! - `reply.rs`: the reply buffer, which reuses its memory without zeroing it.
//! - `conn.rs`: one connection: buffers, backpressure, phases, its driver.
//! - `transport.rs`: its TCP or Unix socket, and TLS after STARTTLS.
//! - [`tls`]: the TLS mode and the certificate directory.
//! - [`server`]: the reactor, the connection threads, the blocking pool, the
//!   limits and shutdown; the byte-stream driver [`serve_connection`].
//! - [`export`]: what the server needs from storage; [`mem`]: an in-memory one.

mod conn;
mod contexts;
pub mod export;
mod handshake;
pub mod mem;
mod reply;
pub mod server;
pub mod tls;
mod transmission;
mod transport;
pub mod wire;

pub use export::{Catalog, Export, ExportError, Extent};
pub use server::{serve_connection, Limits, Server, ServerConfig, SocketAccess};
pub use tls::{TlsError, TlsMode, TlsSetup};
