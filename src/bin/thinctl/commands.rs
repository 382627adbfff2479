//! The commands: each opens the pool directory, does its work, commits, and prints
//! one line (or a table, or JSON) on standard output; warnings go to standard error.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use thinpool::io::FileStorage;
use thinpool::server::protocol::{Request, Response};
use thinpool::server::usage;
use thinpool::volume::{Access, ChangeOutcome, CreateOptions, PoolChange, PoolDir, PoolDirError};

use crate::error::{describe, msg, CliError, CliResult};
use crate::open::{open_failed, open_pool, warn_all};
use crate::progress::{Progress, Unit};
use crate::remote;
use crate::units::format_size;
use crate::views::{failed_status_output, ls_output, outcome_line, status_output};

/// `thinctl pool create`.
pub fn pool_create(dir: &Path, opts: CreateOptions) -> CliResult {
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

/// `thinctl pool adopt`.
pub fn pool_adopt(dir: &Path, metadata: &Path, data: &Path, sizes: &[(u32, u64)]) -> CliResult {
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
pub fn change(dir: &Path, change: PoolChange) -> CliResult {
    match remote::forward(dir, Request::Change { change: change.clone() })? {
        Some(Response::Changed { outcome, block_bytes }) => {
            println!("{}", outcome_line(&change, outcome, block_bytes));
            return Ok(());
        }
        Some(other) => return Err(remote::unexpected(dir, &other)),
        None => {}
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

/// `thinctl ls`.
pub fn ls(dir: &Path, json: bool) -> CliResult {
    let listing = match remote::forward(dir, Request::Ls)? {
        Some(Response::Listing { listing }) => listing,
        Some(other) => return Err(remote::unexpected(dir, &other)),
        None => {
            let (pd, mut pool) = open_pool(dir, Access::Read)?;
            usage::listing(&pd, &mut pool)?
        }
    };
    print!("{}", ls_output(dir, &listing, json)?);
    Ok(())
}

/// `thinctl status`.
pub fn status(dir: &Path, json: bool) -> CliResult {
    match remote::forward(dir, Request::Status)? {
        Some(Response::Status { status }) => {
            print!("{}", status_output(dir, &status, json, true)?);
            return Ok(());
        }
        Some(other) => return Err(remote::unexpected(dir, &other)),
        None => {}
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
            print!("{}", status_output(dir, &usage::status(&pd, &pool), json, false)?);
            Ok(())
        }
    }
}

/// `thinctl check`.
pub fn check(dir: &Path) -> CliResult {
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
