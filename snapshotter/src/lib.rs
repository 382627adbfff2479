//! thinpool-snapshotter: a containerd proxy snapshotter backed by a thinpool pool.
//!
//! containerd's snapshots gRPC API (`containerd.services.snapshots.v1.Snapshots`)
//! served on a Unix socket; every snapshot is a thin device of one pool, with an
//! ext4 file system that comes from one base formatted once per pool. The process
//! owns the pool: it also serves the devices over NBD (for `nbd-client`, which makes
//! the kernel block devices that mounts name) and answers `thinctl` on the pool's
//! control socket, like `thinctl serve` (which cannot run on the same pool at the
//! same time: the pool's lock says it is busy).
//!
//! | module | what |
//! |---|---|
//! | [`store`] | the snapshots as devices and labels in `pool.toml` (no other database) |
//! | [`base`] | the base file system: `mkfs.ext4` once, copied into a thin device |
//! | [`attach`] | `/dev/nbdN` through `nbd-client` (the only part that needs root) |
//! | [`privsep`] | `--user`: a root helper that only attaches, the rest as the user |
//! | [`grpc`] | the gRPC service over the store |
//! | [`filter`] | containerd's list filters |
//! | [`serve`] | the process: pool, NBD server, control socket, gRPC socket, signals |
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod attach;
pub mod base;
pub mod error;
pub mod filter;
pub mod grpc;
pub mod privsep;
pub mod serve;
pub mod store;
pub mod units;
