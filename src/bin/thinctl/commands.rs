//! The commands: each opens the pool directory, does its work, commits, and prints
//! one line (or a table, or JSON) on standard output; warnings go to standard error.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use thinpool::io::FileStorage;
use thinpool::volume::{
    Access, ChangeOutcome, CreateOptions, PoolChange, PoolDir, PoolDirError, DEFAULT_BLOCK_BYTES, DEFAULT_DATA_BYTES,
};

use crate::cli::{split_dir, Cli, Cmd, PoolCmd};
use crate::error::{describe, msg, CliError, CliResult};
use crate::open::{open_failed, open_pool, warn_all};
use crate::progress::{Progress, Unit};
use crate::units::format_size;
use crate::views::{failed_status_output, ls_output, outcome_line, status_output};
use crate::{image, remote, xml};

/// Run a parsed command line.
pub fn run(cli: Cli) -> CliResult {
    let cmd = match as_change(cli.cmd) {
        Ok(parsed) => {
            let (dir, c) = parsed?;
            return change(&dir, c);
        }
        Err(cmd) => cmd,
    };
    match cmd {
        Cmd::Pool(PoolCmd::Create { dir, data_size, block_size, metadata_size }) => pool_create(
            &dir.unwrap_or_else(crate::cli::default_dir),
            CreateOptions {
                data_bytes: data_size.unwrap_or(DEFAULT_DATA_BYTES),
                block_bytes: block_size.unwrap_or(DEFAULT_BLOCK_BYTES),
                metadata_bytes: metadata_size,
            },
        ),
        Cmd::Pool(PoolCmd::Adopt { dir, metadata, data, sizes }) => {
            pool_adopt(&dir.unwrap_or_else(crate::cli::default_dir), &metadata, &data, &sizes)
        }
        Cmd::Import { args, create } => {
            let (dir, rest) = split_dir(args, 2);
            image::import(&dir, &utf8(&rest[0], "NAME")?, Path::new(&rest[1]), create)
        }
        Cmd::Export { args } => {
            let (dir, rest) = split_dir(args, 2);
            image::export(&dir, &utf8(&rest[0], "NAME")?, &rest[1])
        }
        Cmd::Ls { dir, json } => ls(&dir.unwrap_or_else(crate::cli::default_dir), json),
        Cmd::Status { dir, json } => status(&dir.unwrap_or_else(crate::cli::default_dir), json),
        Cmd::Check { dir } => check(&dir.unwrap_or_else(crate::cli::default_dir)),
        Cmd::Dump { dir } => xml::dump(&dir.unwrap_or_else(crate::cli::default_dir)),
        Cmd::Restore(args) => xml::restore(&args),
        Cmd::Serve { dir, exports, listen, read_only, commit_interval_ms, workers } => {
            let default_pool = dir.is_none();
            let dir = dir.unwrap_or_else(crate::cli::default_dir);
            remote::serve(
                &dir,
                remote::ServeArgs {
                    exports,
                    listen,
                    read_only,
                    commit_interval_ms,
                    workers,
                    create_default: default_pool,
                },
            )
        }
        Cmd::Create { .. } | Cmd::Snapshot { .. } | Cmd::Delete { .. } | Cmd::Discard { .. } | Cmd::Resize { .. } => {
            Err(msg("internal error: a change was not dispatched"))
        }
    }
}

/// The pool directory and [`PoolChange`] of the commands a server also accepts
/// (create, snapshot, delete, discard, resize); any other command is handed back.
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

fn utf8(s: &OsString, what: &str) -> CliResult<String> {
    s.to_str().map(str::to_string).ok_or_else(|| msg(format!("{what} {s:?} is not valid UTF-8")))
}

fn pool_create(dir: &Path, opts: CreateOptions) -> CliResult {
    let (pd, pool) = PoolDir::create(dir, &opts)?;
    let st = pool.meta().status();
    let meta_bytes = std::fs::metadata(pd.metadata_path()).map(|m| m.len()).unwrap_or(0);
    println!(
        "created pool {}: {} of data in {} blocks of {}, {} of metadata",
        dir.display(),
        format_size(st.data_total_blocks * pool.block_bytes()),
        st.data_total_blocks,
        format_size(pool.block_bytes()),
        format_size(meta_bytes)
    );
    Ok(())
}

fn pool_adopt(dir: &Path, metadata: &Path, data: &Path, sizes: &[(u32, u64)]) -> CliResult {
    let mut by_id = BTreeMap::new();
    for &(id, size) in sizes {
        if by_id.insert(id, size).is_some() {
            return Err(msg(format!("--size {id}=... is given twice")));
        }
    }
    let (mut pd, pool) = PoolDir::adopt(dir, metadata, data, &by_id).map_err(|e| match e {
        PoolDirError::Pool(p) => msg(format!("cannot adopt {}: {p}", metadata.display())),
        other => other.into(),
    })?;
    warn_all(pd.take_warnings());
    let mut devs: Vec<(u32, String)> =
        pd.devices().map(|(n, e)| (e.id, format!("{n} ({})", format_size(e.size_bytes)))).collect();
    devs.sort();
    println!(
        "adopted pool {}: {} devices{}{} (nothing is written to the files until a command changes the pool)",
        dir.display(),
        devs.len(),
        if devs.is_empty() { "" } else { ": " },
        devs.into_iter().map(|d| d.1).collect::<Vec<_>>().join(", "),
    );
    drop(pool);
    Ok(())
}

/// Apply one of the changes a server could also receive: sent to the server when
/// one serves the pool, else applied here under the pool's lock.
fn change(dir: &Path, change: PoolChange) -> CliResult {
    if remote::forward(dir, &remote::change_argv(&change))? {
        return Ok(());
    }
    let (mut pd, mut pool) = open_pool(dir, Access::Write)?;
    let outcome = match &change {
        PoolChange::Discard { name, offset, length } => {
            let mut bar = Progress::new("discarding", 1, Unit::Items);
            let mut started = false;
            let blocks = pd.discard(&mut pool, name, *offset, *length, &mut |done, total| {
                if !started {
                    bar = Progress::new("discarding", total.max(1), Unit::Items);
                    started = true;
                }
                bar.set(done);
            })?;
            ChangeOutcome::Discarded { blocks }
        }
        other => pd.apply(&mut pool, other)?,
    };
    println!("{}", outcome_line(&change, outcome, pool.block_bytes()));
    Ok(())
}

fn ls(dir: &Path, json: bool) -> CliResult {
    let mut argv = vec!["ls".to_string()];
    if json {
        argv.push("--json".into());
    }
    if remote::forward(dir, &argv)? {
        return Ok(());
    }
    let (pd, mut pool) = open_pool(dir, Access::Read)?;
    print!("{}", ls_output(dir, &pd, &mut pool, json)?);
    Ok(())
}

fn status(dir: &Path, json: bool) -> CliResult {
    let mut argv = vec!["status".to_string()];
    if json {
        argv.push("--json".into());
    }
    if remote::forward(dir, &argv)? {
        return Ok(());
    }
    let mut pd = PoolDir::open(dir, Access::Read)?;
    match pd.open_pool() {
        Err(e) => {
            let m = describe(&open_failed(dir, e));
            print!("{}", failed_status_output(dir, &m, json)?);
            Err(CliError::Failed(m))
        }
        Ok(pool) => {
            warn_all(pd.take_warnings());
            print!("{}", status_output(dir, &pd, &pool, json, false)?);
            Ok(())
        }
    }
}

fn check(dir: &Path) -> CliResult {
    let pd = PoolDir::open(dir, Access::Read)?;
    let path = pd.metadata_path();
    let file = File::open(&path).map_err(|e| msg(format!("cannot open {}: {e}", path.display())))?;
    let storage = FileStorage::new(file).map_err(|e| msg(format!("cannot read {}: {e}", path.display())))?;
    let report = {
        let _spin = Progress::new("checking the metadata", 0, Unit::Items);
        thinpool::check::check(&storage).map_err(|e| msg(format!("{}: {e}", path.display())))?
    };
    let mut problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    let st = &report.stats;
    let data_path = pd.data_path();
    if let Ok(m) = std::fs::metadata(&data_path) {
        let need = st.data_nr_blocks.saturating_mul(u64::from(st.data_block_sectors) * 512);
        if m.len() < need {
            problems.push(format!(
                "the data file {} holds {} bytes, less than the {} data blocks the metadata has ({need} bytes)",
                data_path.display(),
                m.len(),
                st.data_nr_blocks
            ));
        }
    } else {
        problems.push(format!("the data file {} cannot be read", data_path.display()));
    }
    if problems.is_empty() {
        // Names are only advisory: report drift, do not fail on it.
        let ids: Vec<u64> = st.devices.iter().map(|d| d.dev_id).collect();
        for (name, e) in pd.devices() {
            if !ids.contains(&u64::from(e.id)) {
                eprintln!("warning: pool.toml names device {} \"{name}\", which the metadata does not have", e.id);
            }
        }
        for id in &ids {
            if !pd.devices().any(|(_, e)| u64::from(e.id) == *id) {
                eprintln!("warning: device {id} has no name in pool.toml (it will appear as thin{id})");
            }
        }
        println!(
            "{}: metadata is consistent: {} devices, {}/{} data blocks and {}/{} metadata blocks in use, transaction {}",
            path.display(),
            st.devices.len(),
            st.data_blocks_in_use,
            st.data_nr_blocks,
            st.metadata_blocks_in_use,
            st.metadata_nr_blocks,
            st.transaction_id
        );
        return Ok(());
    }
    for p in &problems {
        println!("{p}");
    }
    Err(CliError::Failed(format!(
        "{}: {} problem{} found (listed above)",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    )))
}
