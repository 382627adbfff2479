//! `thinpool-snapshotter DIR --socket PATH`: containerd's proxy snapshotter over a
//! thinpool pool (see the crate docs and the README's "containerd snapshotter").

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use thinpool_snapshotter::attach::{AttachMode, Kernel};
use thinpool_snapshotter::privsep;
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
    /// Started as root, run as this user (`NAME`, `UID` or `UID:GID`) with
    /// everything but the kernel attach: with `--attach nbd` a helper process
    /// keeps root only to run `nbd-client` and to tell whether a `/dev/nbdN` is open.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
}

fn size(s: &str) -> Result<u64, String> {
    parse_size(s).filter(|&n| n > 0).ok_or_else(|| format!("\"{s}\" is not a size (e.g. 512, 64k, 10G, 1T)"))
}

fn fail(json: bool, e: &str) -> ExitCode {
    if json {
        eprintln!("{}", serde_json::json!({ "error": e }));
    } else {
        eprintln!("error: {e}");
    }
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == privsep::HELPER_ARG) {
        return privsep::helper_main();
    }
    let args = Args::parse();
    let mut kernel: Option<Arc<dyn Kernel>> = None;
    if let Some(user) = &args.user {
        // Before any thread exists: the helper first (it keeps root), then drop.
        let (uid, gid) = match privsep::parse_user(user) {
            Ok(ids) => ids,
            Err(e) => return fail(args.json, &format!("--user: {e}")),
        };
        if args.attach == AttachMode::Nbd {
            match privsep::Helper::spawn() {
                Ok(h) => kernel = Some(Arc::new(h)),
                Err(e) => return fail(args.json, &e.to_string()),
            }
        }
        if let Err(e) = privsep::drop_privileges(uid, gid) {
            return fail(args.json, &format!("--user {user}: {e}"));
        }
    }
    let opts = Options {
        dir: args.dir.clone(),
        socket: args.socket.clone(),
        listen: args.listen.clone(),
        attach: args.attach,
        size: args.size,
        data_bytes: args.data_size,
        commit_interval: Duration::from_millis(args.commit_interval_ms.max(1)),
        kernel,
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
        Err(e) => fail(json, &e.to_string()),
    }
}
