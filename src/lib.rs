//! thinpool: a userspace thin-provisioning block engine whose metadata is the Linux
//! dm-thin format byte for byte, served over NBD.
//!
//! # Layers
//!
//! Folders are layers, listed here in the order a request's data flows, top to
//! bottom. A layer uses only layers below it; `format`, `units` and `error` are leaves
//! anyone may use.
//!
//! | layer | what it is | it may use |
//! |---|---|---|
//! | [`server`] | the serving process: the pool shared between threads, thin devices as NBD exports, the typed control socket, `run` | `nbd`, `volume`, `pool`, `thin`, `io` |
//! | [`nbd`] | the NBD protocol: wire format (typed commands and options), handshake, transmission, over an `Export` trait; knows nothing of pools | leaves |
//! | [`volume`] | a pool directory: `pool.toml`, names and sizes, locking, create/adopt, reconcile, typed changes | `pool`, `thin` |
//! | [`stream`] | replication: the send/receive stream format and sending and receiving devices between pools | `volume`, `pool`, `thin` |
//! | [`xml`] | `thin_dump` XML dump and restore through an intermediate representation | `volume`, `pool`, `thin`, `io` |
//! | [`pool`] | the I/O paths of thin devices over the data storage: read, write, copy-on-write, zero-fill, discard, commit | `thin`, `io` |
//! | [`check`] | the strict checker (reads only storage and format) and the recount of live metadata; never on the write path | `thin`, `btree`, `space_map`, `transaction`, `io` |
//! | [`thin`] | dm-thin metadata: devices, mappings, snapshots, commit, held root, usage | `btree`, `space_map`, `transaction`, `io` |
//! | [`btree`] | copy-on-write B-trees: lookup, mutation, and the one walker every reader uses | `transaction` |
//! | [`space_map`] | reference counts in memory (no I/O; the transaction manager keeps them) and their on-disk form (`space_map::disk`, written through `btree` at commit) | `btree`, `transaction` (disk form only) |
//! | [`transaction`] | the block cache, shadowing, the two maps' counts, sticky failure | `io`, `space_map` counts |
//! | [`io`] | one storage trait for both files: real file, memory, fault injection, read-only | `format` |
//! | [`mod@format`], [`units`], [`error`] | on-disk byte tables (pure encode/decode), block-address newtypes and the range splitter, error types | nothing |
//!
//! [`fuzzing`] holds the fuzz targets' bodies so that `cargo test` replays their seeds.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod btree;
pub mod check;
pub mod error;
pub mod format;
pub mod fuzzing;
pub mod io;
pub mod nbd;
pub mod pool;
pub mod server;
pub mod space_map;
pub mod stream;
pub mod thin;
pub mod transaction;
pub mod units;
pub mod volume;
pub mod xml;
