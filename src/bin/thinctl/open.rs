//! Opening a pool directory for a command, and what every command prints about it.

use std::path::Path;

use thinpool::error::{MetaError, PoolError};
use thinpool::pool::Pool;
use thinpool::volume::{Access, PoolDir, PoolDirError};

use crate::error::{msg, CliError, CliResult};

/// Print warnings on standard error.
pub fn warn_all(warnings: Vec<String>) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// Open the pool in `dir` (lock, pool.toml, engine), printing reconciliation warnings.
pub fn open_pool(dir: &Path, access: Access) -> CliResult<(PoolDir, Pool)> {
    let mut pd = PoolDir::open(dir, access)?;
    let pool = pd.open_pool().map_err(|e| open_failed(dir, e))?;
    warn_all(pd.take_warnings());
    Ok((pd, pool))
}

/// The error of a pool that does not open, with what to do where that is known.
pub fn open_failed(dir: &Path, e: PoolDirError) -> CliError {
    match e {
        PoolDirError::Pool(p @ PoolError::Meta(MetaError::Corrupt { .. })) => msg(format!(
            "cannot open the pool in {}: {p}; the metadata is damaged: `thinctl check {}` gives a full report",
            dir.display(),
            dir.display()
        )),
        PoolDirError::Pool(p) => msg(format!("cannot open the pool in {}: {p}", dir.display())),
        other => other.into(),
    }
}
