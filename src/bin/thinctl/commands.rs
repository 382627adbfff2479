//! The commands: each opens the pool directory, does its work, commits, and prints
//! one line (or a table, or JSON) on standard output; warnings go to standard error.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thinpool::io::FileStorage;
use thinpool::pool::Pool;
use thinpool::volume::{
    Access, ChangeOutcome, CreateOptions, PoolChange, PoolDir, PoolDirError, DEFAULT_BLOCK_BYTES, DEFAULT_DATA_BYTES,
};

use crate::cli::{split_dir, Cli, Cmd, PoolCmd};
use crate::error::{describe, msg, CliError, CliResult};
use crate::open::{open_failed, open_pool, warn_all};
use crate::progress::{Progress, Unit};
use crate::units::{format_size, format_time};
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

/// What a change did, in one line.
pub fn outcome_line(change: &PoolChange, outcome: ChangeOutcome, bs: u64) -> String {
    use ChangeOutcome as O;
    match (change, outcome) {
        (PoolChange::Create { name, size_bytes, .. }, O::Created { id }) => {
            format!("created \"{name}\" (id {id}, {})", format_size(*size_bytes))
        }
        (PoolChange::Snapshot { origin, name, .. }, O::Created { id }) => {
            format!("created \"{name}\" (id {id}), a snapshot of \"{origin}\"")
        }
        (PoolChange::Delete { name }, O::Deleted { id }) => format!("deleted \"{name}\" (id {id})"),
        (PoolChange::Resize { name, .. }, O::Resized { old_bytes, new_bytes, blocks_discarded }) => {
            let cut = if new_bytes < old_bytes {
                format!("; {blocks_discarded} blocks past the new end discarded")
            } else {
                String::new()
            };
            format!("resized \"{name}\": {} -> {}{cut}", format_size(old_bytes), format_size(new_bytes))
        }
        (PoolChange::Discard { name, offset, length }, O::Discarded { blocks }) => {
            let partial = match (offset, length) {
                (None, None) => false,
                (o, l) => {
                    let o = o.unwrap_or(0);
                    o % bs != 0 || l.is_some_and(|l| (o.saturating_add(l)) % bs != 0)
                }
            };
            let note = if partial {
                format!(
                    "; discard unmaps whole {} blocks only, partial blocks at the ends were left as they were",
                    format_size(bs)
                )
            } else {
                String::new()
            };
            format!("discarded {blocks} blocks ({}) of \"{name}\"{note}", format_size(blocks * bs))
        }
        (_, o) => format!("{o:?}"),
    }
}

#[derive(Serialize)]
struct DeviceJson {
    name: String,
    id: u32,
    size_bytes: u64,
    mapped_bytes: u64,
    exclusive_bytes: u64,
    creation_time: Option<u64>,
    snapshot_of: Option<String>,
    mapped_blocks: u64,
    exclusive_blocks: u64,
    thin_creation_time: u32,
    thin_snapshot_time: u32,
    thin_transaction_id: u64,
}

#[derive(Serialize)]
struct LsJson {
    devices: Vec<DeviceJson>,
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

/// What `ls` prints.
pub fn ls_output(dir: &Path, pd: &PoolDir, pool: &mut Pool, json: bool) -> CliResult<String> {
    let bs = pool.block_bytes();
    let usage = pool.metadata().usage()?;
    let mut devices = Vec::new();
    for (name, e) in pd.devices() {
        let info = pool.meta().device_info(e.id)?;
        let (mapped, excl) = usage.get(&e.id).copied().unwrap_or((0, 0));
        devices.push(DeviceJson {
            name: name.to_string(),
            id: e.id,
            size_bytes: e.size_bytes,
            mapped_bytes: mapped * bs,
            exclusive_bytes: excl * bs,
            creation_time: e.created,
            snapshot_of: e.snapshot_of.clone(),
            mapped_blocks: mapped,
            exclusive_blocks: excl,
            thin_creation_time: info.creation_time,
            thin_snapshot_time: info.snapshotted_time,
            thin_transaction_id: info.transaction_id,
        });
    }
    devices.sort_by_key(|d| d.id);
    if json {
        return Ok(format!("{}\n", to_json(&LsJson { devices })?));
    }
    if devices.is_empty() {
        return Ok(format!(
            "no devices in {}; create one with `thinctl create {} NAME --size SIZE`\n",
            dir.display(),
            dir.display()
        ));
    }
    let header = ["NAME", "ID", "SIZE", "MAPPED", "EXCLUSIVE", "CREATED", "SNAPSHOT-OF"];
    let rows: Vec<[String; 7]> = devices
        .iter()
        .map(|d| {
            [
                d.name.clone(),
                d.id.to_string(),
                format_size(d.size_bytes),
                format_size(d.mapped_bytes),
                format_size(d.exclusive_bytes),
                d.creation_time.map_or_else(|| "-".to_string(), format_time),
                d.snapshot_of.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    Ok(table(&header, &rows))
}

fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width = [0usize; N];
    for (i, h) in header.iter().enumerate() {
        width[i] = h.len();
    }
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn to_json<T: Serialize>(v: &T) -> CliResult<String> {
    serde_json::to_string_pretty(v).map_err(|e| msg(format!("cannot write JSON: {e}")))
}

#[derive(Serialize, Default)]
struct StatusJson {
    transaction_id: Option<u64>,
    metadata_used_blocks: Option<u64>,
    metadata_total_blocks: Option<u64>,
    data_used_blocks: Option<u64>,
    data_total_blocks: Option<u64>,
    data_block_size_bytes: Option<u64>,
    mode: &'static str,
    held_root: Option<u64>,
    metadata_block_size_bytes: u64,
    metadata_used_blocks_dmsetup: Option<u64>,
    needs_check: Option<bool>,
    time: Option<u32>,
    devices: Option<usize>,
    served: bool,
    error: Option<String>,
}

fn writable(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
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
            let out = StatusJson {
                metadata_block_size_bytes: 4096,
                mode: "fail",
                error: Some(m.clone()),
                ..Default::default()
            };
            print!("{}", status_text(dir, &out, json)?);
            Err(CliError::Failed(m))
        }
        Ok(pool) => {
            warn_all(pd.take_warnings());
            print!("{}", status_output(dir, &pd, &pool, json, false)?);
            Ok(())
        }
    }
}

/// What `status` prints for an open pool; `served` when a server holds it.
pub fn status_output(dir: &Path, pd: &PoolDir, pool: &Pool, json: bool, served: bool) -> CliResult<String> {
    let st = pool.meta().status();
    let total = st.metadata_total_blocks;
    // dmsetup counts the kernel's metadata reserve (min(4096, total / 10)) as used.
    let reserve = (total / 10).min(4096);
    let mode = if pd.config().options.read_only
        || st.needs_check
        || !writable(&pd.metadata_path())
        || !writable(&pd.data_path())
    {
        "ro"
    } else if st.data_used_blocks >= st.data_total_blocks {
        "out-of-data-space"
    } else {
        "rw"
    };
    let out = StatusJson {
        transaction_id: Some(st.transaction_id),
        metadata_used_blocks: Some(st.metadata_used_blocks),
        metadata_total_blocks: Some(total),
        data_used_blocks: Some(st.data_used_blocks),
        data_total_blocks: Some(st.data_total_blocks),
        data_block_size_bytes: Some(pool.block_bytes()),
        mode,
        held_root: (st.held_root != 0).then_some(st.held_root),
        metadata_block_size_bytes: 4096,
        metadata_used_blocks_dmsetup: Some((st.metadata_used_blocks + reserve).min(total)),
        needs_check: Some(st.needs_check),
        time: Some(st.time),
        devices: Some(pool.meta().device_ids().len()),
        served,
        error: None,
    };
    status_text(dir, &out, json)
}

fn status_text(dir: &Path, s: &StatusJson, json: bool) -> CliResult<String> {
    if json {
        return Ok(format!("{}\n", to_json(s)?));
    }
    let mut o = String::new();
    o.push_str(&format!("pool            {}{}\n", dir.display(), if s.served { " (served)" } else { "" }));
    o.push_str(&format!("mode            {}\n", s.mode));
    if let Some(e) = &s.error {
        o.push_str(&format!("error           {e}\n"));
        return Ok(o);
    }
    let pct = |u: u64, t: u64| u.saturating_mul(100).checked_div(t).unwrap_or(0);
    let (mu, mt) = (s.metadata_used_blocks.unwrap_or(0), s.metadata_total_blocks.unwrap_or(0));
    let (du, dt) = (s.data_used_blocks.unwrap_or(0), s.data_total_blocks.unwrap_or(0));
    let bs = s.data_block_size_bytes.unwrap_or(0);
    o.push_str(&format!("transaction id  {}\n", s.transaction_id.unwrap_or(0)));
    o.push_str(&format!("metadata        {mu}/{mt} blocks of 4 KiB used ({}%)\n", pct(mu, mt)));
    o.push_str(&format!(
        "data            {du}/{dt} blocks of {} used ({}%; {} of {})\n",
        format_size(bs),
        pct(du, dt),
        format_size(du * bs),
        format_size(dt * bs)
    ));
    o.push_str(&format!("held root       {}\n", s.held_root.map_or_else(|| "-".to_string(), |r| r.to_string())));
    o.push_str(&format!("needs check     {}\n", if s.needs_check == Some(true) { "yes" } else { "no" }));
    o.push_str(&format!("devices         {}\n", s.devices.unwrap_or(0)));
    Ok(o)
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
