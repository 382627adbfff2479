//! `thinctl`: the command line of thinpool.
//!
//! A pool is a directory (default `./thinpool`) holding the dm-thin `metadata`, the
//! `data` file and `pool.toml` (device names and sizes; see `thinpool::volume`).
//! Every command that changes the pool commits it before it exits successfully; a
//! failed command changes nothing it had not already committed. Exit status: 0 done,
//! 1 failed, 2 usage error.
//!
//! While `thinctl serve DIR` runs, `create`, `snapshot`, `delete`, `discard`,
//! `resize`, `ls` and `status` are sent to it over `DIR/control.sock`; the other
//! commands report the pool busy (see `remote`).
//!
//! JSON outputs (stable: fields are only ever added):
//! - `ls --json`: `{"devices": [{"name", "id", "size_bytes", "mapped_bytes",
//!   "exclusive_bytes", "creation_time", "snapshot_of", ...}]}`; `creation_time` is the
//!   wall-clock creation time in unix seconds (UTC) or null when unknown (adopted or
//!   recovered devices), `snapshot_of` the origin's name or null.
//! - `status --json`: `{"transaction_id", "metadata_used_blocks", "metadata_total_blocks",
//!   "data_used_blocks", "data_total_blocks", "data_block_size_bytes", "mode", "held_root",
//!   ...}`; `mode` is `rw`, `ro`, `out-of-data-space` or `fail`, `held_root` the block of
//!   the held metadata snapshot or null.

mod cli;
mod commands;
mod error;
mod image;
mod open;
mod progress;
mod remote;
mod units;
mod views;
mod xml;

use std::process::ExitCode;

use clap::Parser;

use crate::error::CliError;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Exit(code)) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {}", error::describe(&e));
            ExitCode::from(1)
        }
    }
}
