//! thinpool: a userspace thin-provisioning block engine whose metadata is the Linux
//! dm-thin format byte for byte.
#![forbid(unsafe_code)]

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
pub mod thin;
pub mod transaction;
pub mod units;
pub mod volume;
