//! The command tree. The pool directory comes first and may be left out everywhere
//! (default `./thinpool`), so each command takes its positional arguments as one list
//! and [`split_dir`] tells the directory from the rest by counting.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use thinpool::volume::{Grow, PoolChange};

use crate::error::{msg, CliResult};
use crate::units::{parse_id_size, parse_size};

/// Manage thinpool pools: thin provisioning in userspace with Linux dm-thin metadata.
///
/// A pool is a directory (DIR, default ./thinpool) holding the dm-thin `metadata`,
/// the `data` file and `pool.toml` (device names and sizes). SIZE accepts bytes or a
/// binary unit: 512, 64k, 64KiB, 1G, 10GiB (k, M, G, T, P are powers of 1024;
/// `s` is 512-byte sectors). Exit status: 0 done, 1 failed, 2 usage error.
#[derive(Debug, Parser)]
#[command(name = "thinctl", version, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run: the size does not matter
pub enum Cmd {
    /// Create or adopt a pool.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Create an empty thin device.
    #[command(override_usage = "thinctl create [DIR] NAME --size SIZE [--id ID]")]
    Create {
        #[arg(value_name = "DIR_NAME", num_args = 1..=2, required = true)]
        args: Vec<OsString>,
        /// Virtual size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Device id (default: the lowest free id).
        #[arg(long)]
        id: Option<u32>,
    },
    /// Snapshot a thin device or a snapshot (O(1); shares every block).
    #[command(override_usage = "thinctl snapshot [DIR] ORIGIN NAME [--id ID]")]
    Snapshot {
        #[arg(value_name = "DIR_ORIGIN_NAME", num_args = 2..=3, required = true)]
        args: Vec<OsString>,
        /// Device id (default: the lowest free id).
        #[arg(long)]
        id: Option<u32>,
    },
    /// Delete a device (its snapshots keep their data).
    #[command(override_usage = "thinctl delete [DIR] NAME")]
    Delete {
        #[arg(value_name = "DIR_NAME", num_args = 1..=2, required = true)]
        args: Vec<OsString>,
    },
    /// Unmap the whole blocks of a byte range (the whole device by default).
    #[command(override_usage = "thinctl discard [DIR] NAME [--offset BYTES] [--length BYTES]")]
    Discard {
        #[arg(value_name = "DIR_NAME", num_args = 1..=2, required = true)]
        args: Vec<OsString>,
        /// Start of the range (bytes or SIZE).
        #[arg(long, value_parser = parse_size)]
        offset: Option<u64>,
        /// Length of the range (default: to the end of the device).
        #[arg(long, value_parser = parse_size)]
        length: Option<u64>,
    },
    /// Grow or shrink a device's virtual size (shrinking discards what is cut off).
    #[command(override_usage = "thinctl resize [DIR] NAME --size SIZE")]
    Resize {
        #[arg(value_name = "DIR_NAME", num_args = 1..=2, required = true)]
        args: Vec<OsString>,
        /// New virtual size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Make a device's content equal to a raw image (all-zero blocks end up unmapped).
    #[command(override_usage = "thinctl import [DIR] NAME FILE [--create]")]
    Import {
        #[arg(value_name = "DIR_NAME_FILE", num_args = 2..=3, required = true)]
        args: Vec<OsString>,
        /// Create NAME (sized to the image) when it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Write a device's raw bytes to FILE (holes for unmapped blocks) or `-` (stdout).
    #[command(override_usage = "thinctl export [DIR] NAME FILE|- [--sync]")]
    Export {
        #[arg(value_name = "DIR_NAME_FILE", num_args = 2..=3, required = true)]
        args: Vec<OsString>,
        /// fsync FILE before exiting, so the copy survives a host crash (like `dd
        /// conv=fsync`). Without it FILE's data may still be in the page cache when the
        /// command returns, as after `cp`, `dd` or `qemu-img convert`.
        #[arg(long)]
        sync: bool,
    },
    /// List devices: name, id, size, mapped and exclusive bytes, creation, origin.
    Ls {
        /// The pool directory.
        dir: Option<PathBuf>,
        /// Print JSON: {"devices": [{"name", "id", "size_bytes", "mapped_bytes",
        /// "exclusive_bytes", "creation_time", "snapshot_of", ...}]}.
        #[arg(long)]
        json: bool,
    },
    /// Pool status, like `dmsetup status` of a thin-pool.
    Status {
        /// The pool directory.
        dir: Option<PathBuf>,
        /// Print JSON: {"transaction_id", "metadata_used_blocks", "metadata_total_blocks",
        /// "data_used_blocks", "data_total_blocks", "data_block_size_bytes", "mode",
        /// "held_root", ...}.
        #[arg(long)]
        json: bool,
    },
    /// The runs of blocks where TO differs from FROM, in thin_delta's words
    /// (different, left_only, right_only; same with --same); on a served pool taken at
    /// one instant while clients keep running.
    #[command(override_usage = "thinctl diff [DIR] FROM TO [--same] [--json]")]
    Diff {
        #[arg(value_name = "DIR_FROM_TO", num_args = 2..=3, required = true)]
        args: Vec<OsString>,
        /// List the runs both map to the same data blocks too (reads every mapping).
        #[arg(long)]
        same: bool,
        /// Print JSON: {"left", "right", "left_id", "right_id", "block_bytes",
        /// "changed_blocks", "changed_bytes", "runs": [{"kind", "begin_block",
        /// "length_blocks", "offset_bytes", "length_bytes"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Make DEVICE's contents (and size) SNAPSHOT's at once (O(1): DEVICE shares
    /// SNAPSHOT's mappings; what only DEVICE held is freed); refused while a client
    /// has DEVICE attached.
    #[command(override_usage = "thinctl rollback [DIR] DEVICE SNAPSHOT")]
    Rollback {
        #[arg(value_name = "DIR_DEVICE_SNAPSHOT", num_args = 2..=3, required = true)]
        args: Vec<OsString>,
    },
    /// Check the metadata strictly (exit 0 only when it is consistent).
    Check {
        /// The pool directory.
        dir: Option<PathBuf>,
    },
    /// Print the metadata as XML in thin_dump's format (thin_restore reads it).
    Dump {
        /// The pool directory.
        dir: Option<PathBuf>,
    },
    /// Build fresh metadata from thin_dump XML read from standard input.
    Restore(RestoreArgs),
    /// Serve every device over NBD (export name = device name) until SIGINT/SIGTERM;
    /// changes reach the served pool through DIR/control.sock.
    ///
    /// With no DIR it serves ./thinpool, and when that does not exist creates it first
    /// with an 8 GiB sparse data file and one 1 GiB device, thin0. The first-created
    /// device is also the default export (empty name).
    Serve {
        /// The pool directory.
        dir: Option<PathBuf>,
        /// Export only these devices (repeatable; default: every device).
        #[arg(long = "export", value_name = "NAME")]
        exports: Vec<String>,
        /// TCP address to listen on [default: 127.0.0.1:10809, unless --socket is given].
        #[arg(long)]
        listen: Option<String>,
        /// Refuse writes and changes.
        #[arg(long)]
        read_only: bool,
        /// Commit period for writes no client flushed, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        commit_interval_ms: u64,
        /// Limits and policies.
        #[command(flatten)]
        tuning: ServeTuning,
        /// Unix socket and TLS.
        #[command(flatten)]
        access: crate::serve::ServeAccess,
    },
    /// Write a device as a replication stream to standard output (only what changed
    /// since BASE with --from); `thinctl receive` recreates it in another pool.
    #[command(override_usage = "thinctl send [DIR] NAME [--from BASE] > STREAM")]
    Send {
        #[arg(value_name = "DIR_NAME", num_args = 1..=2, required = true)]
        args: Vec<OsString>,
        /// Send only the changes since BASE, a device sent (or received) before and
        /// unchanged since; the receiving pool must hold its copy.
        #[arg(long, value_name = "BASE")]
        from: Option<String>,
        /// Print the summary (on standard error) as JSON: {"device_bytes",
        /// "block_bytes", "source_identity", "base_identity", "data_records",
        /// "data_bytes", "zero_records", "zero_bytes", "stream_bytes", ...}.
        #[arg(long)]
        json: bool,
    },
    /// Create device NAME from a replication stream read from standard input (an
    /// incremental stream applies on top of the copy of its base).
    #[command(override_usage = "thinctl receive [DIR] NAME < STREAM")]
    Receive {
        #[arg(value_name = "DIR_NAME", num_args = 1..=2, required = true)]
        args: Vec<OsString>,
        /// Print the summary as JSON (the fields of send's, plus "id" and "base_name").
        #[arg(long)]
        json: bool,
    },
    /// Attach a device of a served pool as a local block device over ublk
    /// (/dev/ublkbN), asking the running `thinctl serve DIR`; prints the device path.
    /// With no NAME, lists the attached devices.
    #[command(override_usage = "thinctl attach [DIR] [NAME] [--read-only] [--json]")]
    Attach {
        #[arg(value_name = "DIR_NAME", num_args = 0..=2)]
        args: Vec<OsString>,
        /// The kernel sees a read-only disk; writes are refused.
        #[arg(long)]
        read_only: bool,
        /// Print {"name", "kind", "path", "dev_id", "read_only"} (a list:
        /// {"devices": [...]}).
        #[arg(long)]
        json: bool,
    },
    /// Remove the local block device (ublk) of a device of a served pool.
    #[command(override_usage = "thinctl detach [DIR] NAME [--json]")]
    Detach {
        #[arg(value_name = "DIR_NAME", num_args = 1..=2, required = true)]
        args: Vec<OsString>,
        /// Print what was removed as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// What a write does when the pool has no free data block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NoSpaceMode {
    /// Wait (up to --no-space-timeout) for space to appear, then fail with ENOSPC.
    Queue,
    /// Fail with ENOSPC at once (dm-thin's error_if_no_space).
    Error,
}

/// `thinctl serve`'s limits and policies.
#[derive(Debug, Clone, Args)]
pub struct ServeTuning {
    /// Threads of the blocking pool (FLUSH and FUA), shared by every connection.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Connections served at once; more are refused (NBD_REP_ERR_POLICY).
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Time a client has from connecting to choosing an export, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// On SIGTERM/SIGINT, how long connections with requests in flight get, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub shutdown_grace_ms: u64,
    /// Threads driving connections that have work (idle connections hold none).
    #[arg(long, default_value_t = 32)]
    pub max_threads: usize,
    /// Requests one connection may have queued for the blocking pool.
    #[arg(long, default_value_t = 64)]
    pub max_requests_per_connection: usize,
    /// Unsent reply bytes plus queued payloads per connection before it stops being read.
    #[arg(long, value_parser = parse_size, default_value = "64MiB")]
    pub max_bytes_per_connection: u64,
    /// When the pool is out of data space: queue writes or fail them [default: the
    /// pool's setting (thinctl pool set), else queue].
    #[arg(long, value_enum)]
    pub no_space: Option<NoSpaceMode>,
    /// How long a queued write waits for space, in seconds (dm-thin's no_space_timeout)
    /// [default: the pool's setting, else 60].
    #[arg(long)]
    pub no_space_timeout: Option<u64>,
    /// Data use (percent) at which to log, run --on-threshold and autoextend.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub data_threshold: Option<u8>,
    /// Metadata use (percent) at which to log and run --on-threshold.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub metadata_threshold: Option<u8>,
    /// Command (sh -c) run once per threshold crossing, with THINPOOL_DIR,
    /// THINPOOL_KIND (data or metadata) and THINPOOL_PERCENT set.
    #[arg(long, value_name = "CMD")]
    pub on_threshold: Option<String>,
    /// When --data-threshold is crossed, grow the data file by this percent.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub autoextend_percent: Option<u8>,
    /// Largest size autoextend grows the data to.
    #[arg(long, value_parser = parse_size)]
    pub autoextend_max: Option<u64>,
    /// Largest size the metadata file grows to by itself (0: never grows).
    #[arg(long, value_parser = parse_size, default_value = "16GiB")]
    pub metadata_max: u64,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The pool directory (new, or holding only a data file; with --force an existing pool).
    pub dir: Option<PathBuf>,
    /// Read the XML from FILE instead of standard input.
    #[arg(short, long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Replace the metadata of an existing pool.
    #[arg(long)]
    pub force: bool,
    /// Metadata file size for a new pool (default: 48 bytes per data block, 2 MiB..16 GiB).
    #[arg(long, value_parser = parse_size)]
    pub metadata_size: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Create a pool: sparse data file, formatted metadata, pool.toml.
    Create {
        /// The pool directory (must not exist or be empty).
        dir: Option<PathBuf>,
        /// Data size (a sparse file) [default: 1GiB].
        #[arg(long, value_parser = parse_size)]
        data_size: Option<u64>,
        /// Data block size: a multiple of 64KiB up to 1GiB [default: 64KiB].
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// Metadata size [default: 48 bytes per data block, at least 2MiB, at most 16GiB].
        #[arg(long, value_parser = parse_size)]
        metadata_size: Option<u64>,
    },
    /// Take an existing dm-thin metadata/data pair (kernel or LVM) without changing it
    /// until the first write.
    Adopt {
        /// The pool directory to create (holds only pool.toml).
        dir: Option<PathBuf>,
        /// The dm-thin metadata file.
        #[arg(long, value_name = "FILE")]
        metadata: PathBuf,
        /// The data file.
        #[arg(long, value_name = "FILE")]
        data: PathBuf,
        /// Virtual size of device ID (repeat for each device; default: up to its
        /// highest mapped block).
        #[arg(long = "size", value_name = "ID=SIZE", value_parser = parse_id_size)]
        sizes: Vec<(u32, u64)>,
    },
    /// Grow the data and/or the metadata, on a served pool too (no restart, no
    /// disconnect): SIZE is the new size, +SIZE what to add.
    Extend {
        /// The pool directory.
        dir: Option<PathBuf>,
        /// New data size (SIZE or +SIZE); shrinking is refused.
        #[arg(long, value_parser = parse_grow, value_name = "[+]SIZE")]
        data_size: Option<Grow>,
        /// New metadata size (SIZE or +SIZE, at most about 16 GiB); shrinking is refused.
        #[arg(long, value_parser = parse_grow, value_name = "[+]SIZE")]
        metadata_size: Option<Grow>,
    },
    /// Set the pool's thresholds, autoextend and no-space policy (kept in pool.toml;
    /// on a served pool in force at once). `thinctl serve` flags override them for a
    /// run; `thinctl status` shows them.
    Set(crate::health::SetArgs),
    /// How much metadata a pool needs (what thin_metadata_size answers).
    MetadataSize {
        /// Data size.
        #[arg(long, value_parser = parse_size)]
        data_size: u64,
        /// Data block size [default: 64KiB].
        #[arg(long, value_parser = parse_size, default_value = "64KiB")]
        block_size: u64,
        /// Thin devices and snapshots the pool will hold.
        #[arg(long, default_value_t = 1)]
        max_thins: u64,
    },
}

/// `SIZE` or `+SIZE`.
fn parse_grow(s: &str) -> Result<Grow, String> {
    match s.strip_prefix('+') {
        Some(rest) => parse_size(rest).map(Grow::By),
        None => parse_size(s).map(Grow::To),
    }
}

/// The default pool directory.
pub fn default_dir() -> PathBuf {
    PathBuf::from(thinpool::volume::DEFAULT_DIR)
}

/// Split positional arguments into the pool directory (present when there are more
/// than `rest` of them) and the others.
pub fn split_dir(mut args: Vec<OsString>, rest: usize) -> (PathBuf, Vec<OsString>) {
    if args.len() > rest {
        let dir = args.remove(0);
        (PathBuf::from(dir), args)
    } else {
        (default_dir(), args)
    }
}

/// The pool directory and [`PoolChange`] of the commands a server also accepts
/// (create, snapshot, delete, discard, resize); any other command is handed back.
#[allow(clippy::result_large_err)] // hands back the command it does not take, once per run
pub fn as_change(cmd: Cmd) -> Result<CliResult<(PathBuf, PoolChange)>, Cmd> {
    let one = |args: Vec<OsString>, n: usize| -> CliResult<(PathBuf, Vec<String>)> {
        let (dir, rest) = split_dir(args, n);
        let names = rest.iter().map(|a| utf8(a, "NAME")).collect::<CliResult<Vec<_>>>()?;
        Ok((dir, names))
    };
    Ok(match cmd {
        Cmd::Create { args, size, id } => {
            one(args, 1).map(|(dir, mut n)| (dir, PoolChange::Create { name: n.remove(0), size_bytes: size, id }))
        }
        Cmd::Snapshot { args, id } => one(args, 2).map(|(dir, mut n)| {
            let origin = n.remove(0);
            (dir, PoolChange::Snapshot { origin, name: n.remove(0), id })
        }),
        Cmd::Delete { args } => one(args, 1).map(|(dir, mut n)| (dir, PoolChange::Delete { name: n.remove(0) })),
        Cmd::Discard { args, offset, length } => {
            one(args, 1).map(|(dir, mut n)| (dir, PoolChange::Discard { name: n.remove(0), offset, length }))
        }
        Cmd::Resize { args, size } => {
            one(args, 1).map(|(dir, mut n)| (dir, PoolChange::Resize { name: n.remove(0), size_bytes: size }))
        }
        other => return Err(other),
    })
}

/// `s` as UTF-8, or an error naming it as `what`.
pub fn utf8(s: &OsString, what: &str) -> CliResult<String> {
    s.to_str().map(str::to_string).ok_or_else(|| msg(format!("{what} {s:?} is not valid UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_tree_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_pool_directory_is_optional() {
        let (d, r) = split_dir(vec!["web".into()], 1);
        assert_eq!((d, r), (default_dir(), vec![OsString::from("web")]));
        let (d, r) = split_dir(vec!["p".into(), "web".into()], 1);
        assert_eq!((d, r), (PathBuf::from("p"), vec![OsString::from("web")]));
    }
}
