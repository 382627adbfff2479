//! The serving process: a pool shared between threads, thin devices as NBD exports,
//! the control socket, and [`run`], which puts them together for `thinctl serve`.

pub mod changed;
pub mod control;
pub mod diff;
pub mod exports;
pub mod health;
pub mod local;
pub mod protocol;
pub mod replicate;
pub mod rollback;
pub mod run;
pub mod service;
pub mod usage;
