//! `thinpool-snapshotter DIR --socket PATH`: containerd's proxy snapshotter over a
//! thinpool pool (see the crate docs and the README's "containerd snapshotter").

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use thinpool_snapshotter::attach::AttachMode;
use thinpool_snapshotter::serve::{run, Options};
use thinpool_snapshotter::units::parse_size;

/// containerd proxy snapshotter backed by a thinpool pool.
#[derive(Debug, Parser)]
#[command(name = "thinpool-snapshotter", version)]
struct Args {
    /// The pool directory (created when it does not exist).
    dir: PathBuf,
    /// Unix socket for containerd (the `address` of its `[proxy_plugins]` entry).
    #[arg(long)]
    socket: PathBuf,
    /// NBD address the devices are served on (for nbd-client); port 0 picks one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// How mounts are made: `nbd` attaches /dev/nbdN with nbd-client (root, nbd
    /// module); `none` attaches nothing and names the NBD export.
    #[arg(long, value_enum, default_value = "nbd")]
    attach: AttachMode,
    /// Virtual size of every snapshot's file system (thin: unused space costs
    /// nothing).
    #[arg(long, default_value = "1T", value_parser = size)]
    size: u64,
    /// Data size of the pool when DIR is created here.
    #[arg(long, default_value = "8G", value_parser = size)]
    data_size: u64,
    /// Commit period for writes no client flushed, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    commit_interval_ms: u64,
    /// Print errors and the ready line as JSON.
    #[arg(long)]
    json: bool,
}

fn size(s: &str) -> Result<u64, String> {
    parse_size(s).filter(|&n| n > 0).ok_or_else(|| format!("\"{s}\" is not a size (e.g. 512, 64k, 10G, 1T)"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let opts = Options {
        dir: args.dir.clone(),
        socket: args.socket.clone(),
        listen: args.listen.clone(),
        attach: args.attach,
        size: args.size,
        data_bytes: args.data_size,
        commit_interval: Duration::from_millis(args.commit_interval_ms.max(1)),
    };
    let json = args.json;
    let stop = Arc::new(AtomicBool::new(false));
    let r = run(
        &opts,
        stop,
        |w| {
            if json {
                eprintln!("{}", serde_json::json!({ "warning": w }));
            } else {
                eprintln!("warning: {w}");
            }
        },
        |ready| {
            let mut out = std::io::stdout();
            let _ = if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "socket": ready.socket, "nbd": ready.nbd.to_string(), "control": ready.control,
                    })
                )
            } else {
                writeln!(
                    out,
                    "thinpool-snapshotter: serving containerd snapshots on {}; NBD on {}; control socket {}",
                    ready.socket.display(),
                    ready.nbd,
                    ready.control.display()
                )
            };
            let _ = out.flush();
        },
    );
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                eprintln!("{}", serde_json::json!({ "error": e.to_string() }));
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}
