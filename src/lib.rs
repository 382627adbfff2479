//! thinpool: a userspace thin-provisioning block engine whose metadata is the Linux
//! dm-thin format byte for byte.
#![forbid(unsafe_code)]

pub mod btree;
pub mod check;
pub mod control;
pub mod error;
pub mod exports;
pub mod format;
pub mod fuzzing;
pub mod io;
pub mod metadata;
pub mod nbd;
pub mod pool;
pub mod pooldir;
pub mod serve;
pub mod service;
pub mod space_map;
pub mod transaction;
