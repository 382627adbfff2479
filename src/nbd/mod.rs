//! An NBD server (fixed newstyle handshake, simple and structured replies,
//! `base:allocation` block status) over an [`Export`]/[`Catalog`] interface.
//!
//! Requests are parsed, then validated, then executed; every error becomes an NBD
//! errno in one place ([`export::errno`]). Nothing sized by the client is allocated
//! before it is checked against the limits.

pub mod export;
mod handshake;
pub mod mem;
pub mod server;
mod transmission;
pub mod wire;

pub use export::{Catalog, Export, ExportError, Extent};
pub use server::{serve_connection, Server, ServerConfig};
