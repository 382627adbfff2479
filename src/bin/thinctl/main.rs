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
//! commands report the pool busy (see `remote`), except `send` and `receive`, which
//! stream through the same socket (`send`, `receive`).
//!
//! JSON outputs (stable: fields are only ever added):
//! - `ls --json`: `{"devices": [{"name", "id", "size_bytes", "mapped_bytes",
//!   "exclusive_bytes", "creation_time", "snapshot_of", ...}]}`; `creation_time` is the
//!   wall-clock creation time in unix seconds (UTC) or null when unknown (adopted or
//!   recovered devices), `snapshot_of` the origin's name or null.
//! - `status --json`: `{"transaction_id", "metadata_used_blocks", "metadata_total_blocks",
//!   "data_used_blocks", "data_total_blocks", "data_block_size_bytes", "mode", "held_root",
//!   ...}`; `mode` is `rw`, `ro`, `out-of-data-space` or `fail`, `held_root` the block of
//!   the held metadata snapshot or null. Also `out-of-metadata-space`, with `reason`,
//!   `metadata_reserve_blocks`, the thresholds and which are `thresholds_crossed`, and
//!   the autoextend and no-space settings in force (see `health`).
//! - A command with `--json` that fails also prints `{"error": {"kind", "message"}}`
//!   where its JSON would have gone (see `json_errors` and `error::to_json`).
//!
//! Layout: this file parses the arguments (`cli`) and dispatches; `commands` (pool
//! and device commands), `image` (import, export), `xml` (dump, restore) and `serve`
//! (`thinctl serve` and the server side of the control socket) do the work through
//! the library; `remote` (the client side of the control socket), `open` (opening a
//! pool), `views` (what ls, status and changes print) and `error` are shared by them.
//! Nothing imports this dispatcher: the control socket carries typed requests
//! (`thinpool::server::protocol`), run in the server by its `Controller`.

mod attach;
mod cli;
mod commands;
mod diff;
mod error;
mod health;
mod image;
mod open;
mod progress;
mod receive;
mod remote;
mod rollback;
mod send;
mod serve;
mod ublk;
mod units;
mod views;
mod xml;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use thinpool::volume::{CreateOptions, PoolChange, DEFAULT_BLOCK_BYTES, DEFAULT_DATA_BYTES};

use crate::cli::{as_change, default_dir, split_dir, utf8, Cli, Cmd, PoolCmd};
use crate::error::{msg, CliResult};

/// Run a parsed command line.
fn run(cli: Cli) -> CliResult {
    let cmd = match as_change(cli.cmd) {
        Ok(parsed) => {
            let (dir, c) = parsed?;
            return commands::change(&dir, c);
        }
        Err(cmd) => cmd,
    };
    match cmd {
        Cmd::Pool(PoolCmd::Create { dir, data_size, block_size, metadata_size }) => commands::pool_create(
            &dir.unwrap_or_else(default_dir),
            CreateOptions {
                data_bytes: data_size.unwrap_or(DEFAULT_DATA_BYTES),
                block_bytes: block_size.unwrap_or(DEFAULT_BLOCK_BYTES),
                metadata_bytes: metadata_size,
            },
        ),
        Cmd::Pool(PoolCmd::Extend { dir, data_size, metadata_size }) => {
            if data_size.is_none() && metadata_size.is_none() {
                return Err(msg("pool extend: give --data-size and/or --metadata-size"));
            }
            commands::change(
                &dir.unwrap_or_else(default_dir),
                PoolChange::Extend { data: data_size, metadata: metadata_size },
            )
        }
        Cmd::Pool(PoolCmd::Set(args)) => health::pool_set(args),
        Cmd::Pool(PoolCmd::MetadataSize { data_size, block_size, max_thins }) => {
            let bytes = thinpool::volume::metadata_bytes_needed(data_size, block_size, max_thins);
            println!("{bytes} bytes ({})", crate::units::format_size(bytes));
            Ok(())
        }
        Cmd::Pool(PoolCmd::Adopt { dir, metadata, data, sizes }) => {
            commands::pool_adopt(&dir.unwrap_or_else(default_dir), &metadata, &data, &sizes)
        }
        Cmd::Import { args, create } => {
            let (dir, rest) = split_dir(args, 2);
            image::import(&dir, &utf8(&rest[0], "NAME")?, Path::new(&rest[1]), create)
        }
        Cmd::Export { args, sync } => {
            let (dir, rest) = split_dir(args, 2);
            image::export(&dir, &utf8(&rest[0], "NAME")?, &rest[1], sync)
        }
        Cmd::Ls { dir, json } => commands::ls(&dir.unwrap_or_else(default_dir), json),
        Cmd::Status { dir, json } => commands::status(&dir.unwrap_or_else(default_dir), json),
        Cmd::Check { dir } => commands::check(&dir.unwrap_or_else(default_dir)),
        Cmd::Diff { args, same, json } => {
            let (dir, rest) = split_dir(args, 2);
            diff::diff(&dir, &utf8(&rest[0], "FROM")?, &utf8(&rest[1], "TO")?, same, json)
        }
        Cmd::Rollback { args } => {
            let (dir, rest) = split_dir(args, 2);
            rollback::rollback(&dir, &utf8(&rest[0], "DEVICE")?, &utf8(&rest[1], "SNAPSHOT")?)
        }
        Cmd::Dump { dir } => xml::dump(&dir.unwrap_or_else(default_dir)),
        Cmd::Restore(args) => xml::restore(&args),
        Cmd::Serve { dir, exports, listen, read_only, commit_interval_ms, tuning, access } => {
            let default_pool = dir.is_none();
            let dir = dir.unwrap_or_else(default_dir);
            serve::serve(
                &dir,
                serve::ServeArgs {
                    exports,
                    listen,
                    read_only,
                    commit_interval_ms,
                    tuning,
                    create_default: default_pool,
                    access,
                },
            )
        }
        Cmd::Send { args, from, json } => {
            let (dir, rest) = split_dir(args, 1);
            send::send(&dir, &utf8(&rest[0], "NAME")?, from.as_deref(), json)
        }
        Cmd::Receive { args, json } => {
            let (dir, rest) = split_dir(args, 1);
            receive::receive(&dir, &utf8(&rest[0], "NAME")?, json)
        }
        Cmd::Attach { args, read_only, json } => {
            if args.len() == 2 || (args.len() == 1 && !std::path::Path::new(&args[0]).join("pool.toml").exists()) {
                let (dir, rest) = split_dir(args, 1);
                attach::attach(&dir, &utf8(&rest[0], "NAME")?, read_only, json)
            } else {
                let (dir, _) = split_dir(args, 0);
                attach::list(&dir, json)
            }
        }
        Cmd::Detach { args, json } => {
            let (dir, rest) = split_dir(args, 1);
            attach::detach(&dir, &utf8(&rest[0], "NAME")?, json)
        }
        Cmd::Create { .. } | Cmd::Snapshot { .. } | Cmd::Delete { .. } | Cmd::Discard { .. } | Cmd::Resize { .. } => {
            Err(msg("internal error: a change was not dispatched"))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = json_errors(&cli.cmd);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error::describe(&e));
            // A `Failed` command already printed its answer (`status --json` of a
            // pool that cannot open prints its status, mode "fail").
            let json = if matches!(e, error::CliError::Failed(_)) { JsonErrors::No } else { json };
            match json {
                JsonErrors::No => {}
                JsonErrors::Stdout => println!("{}", error::to_json(&e)),
                JsonErrors::Stderr => eprintln!("{}", error::to_json(&e)),
            }
            ExitCode::from(1)
        }
    }
}

/// Where a command run with `--json` prints its error as JSON too
/// (`{"error": {"kind", "message"}}`, see [`error::to_json`]), after the usual
/// `error: ...` line on standard error.
enum JsonErrors {
    No,
    /// Where its JSON answer would have gone.
    Stdout,
    /// `send`: its standard output is the stream, its JSON summary goes to standard error.
    Stderr,
}

fn json_errors(cmd: &Cmd) -> JsonErrors {
    match cmd {
        Cmd::Send { json: true, .. } => JsonErrors::Stderr,
        Cmd::Ls { json: true, .. }
        | Cmd::Status { json: true, .. }
        | Cmd::Diff { json: true, .. }
        | Cmd::Receive { json: true, .. }
        | Cmd::Attach { json: true, .. }
        | Cmd::Detach { json: true, .. } => JsonErrors::Stdout,
        _ => JsonErrors::No,
    }
}
