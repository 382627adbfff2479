//! `thinctl rollback`: a device's contents become a snapshot's in O(1) (see
//! [`crate::thin::Metadata::rollback`]), from a pool opened here
//! ([`rollback_offline`]) or a served one ([`rollback_served`]), where it is refused
//! while a client has the device attached, atomically with the check.
//!
//! The device also takes the snapshot's virtual size (its contents are the
//! snapshot's, size included). `pool.toml` is saved before the metadata commit when
//! the size grows and after it when it shrinks, so a crash in between never leaves a
//! mapping past the recorded size.

use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::error::PoolError;
use crate::pool::Pool;
use crate::server::protocol::{ControlError, ErrorKind};
use crate::server::service::Service;
use crate::thin::DevId;
use crate::volume::{Access, PoolDir, PoolDirError};

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackOutcome {
    /// The device rolled back.
    pub device: String,
    /// Its id.
    pub device_id: DevId,
    /// The snapshot whose contents it took.
    pub snapshot: String,
    /// The snapshot's id.
    pub snapshot_id: DevId,
    /// The device's virtual size before.
    pub old_size_bytes: u64,
    /// Its size now (the snapshot's).
    pub size_bytes: u64,
    /// Blocks the device maps now.
    pub mapped_blocks: u64,
}

fn refuse_read_only(pd: &PoolDir) -> Result<(), PoolDirError> {
    if pd.access() != Access::Write || pd.config().options.read_only {
        return Err(PoolDirError::ReadOnly { dir: pd.dir().to_path_buf(), why: "it is read-only" });
    }
    Ok(())
}

/// Roll `device` back to `snapshot` with `step` doing the engine's part (the
/// rollback and its commit, in one step), saving the size around it.
fn rollback_with<E: From<PoolDirError>>(
    pd: &mut PoolDir,
    device: &str,
    snapshot: &str,
    step: impl FnOnce(DevId, DevId) -> Result<u64, E>,
) -> Result<RollbackOutcome, E> {
    refuse_read_only(pd)?;
    let d = pd.device(device)?.clone();
    let s = pd.device(snapshot)?.clone();
    if d.id == s.id {
        return Err(PoolDirError::Invalid(format!("\"{device}\" cannot be rolled back to itself")).into());
    }
    let grows = s.size_bytes > d.size_bytes;
    if grows {
        pd.set_size(device, s.size_bytes)?;
    }
    let mapped = match step(d.id, s.id) {
        Ok(m) => m,
        Err(e) => {
            if grows {
                pd.set_size(device, d.size_bytes)?;
            }
            return Err(e);
        }
    };
    if !grows {
        pd.set_size(device, s.size_bytes)?;
    }
    Ok(RollbackOutcome {
        device: device.to_string(),
        device_id: d.id,
        snapshot: snapshot.to_string(),
        snapshot_id: s.id,
        old_size_bytes: d.size_bytes,
        size_bytes: s.size_bytes,
        mapped_blocks: mapped,
    })
}

fn engine_step(pool: &mut Pool, dev: DevId, snap: DevId) -> Result<u64, PoolError> {
    pool.rollback(dev, snap)?;
    pool.commit()?;
    Ok(pool.meta().device_info(dev)?.mapped_blocks)
}

/// Roll `device` back to `snapshot` in a pool opened here.
pub fn rollback_offline(
    pd: &mut PoolDir,
    pool: &mut Pool,
    device: &str,
    snapshot: &str,
) -> Result<RollbackOutcome, PoolDirError> {
    rollback_with(pd, device, snapshot, |d, s| engine_step(pool, d, s).map_err(PoolDirError::from))
}

/// Roll `device` back to `snapshot` in a served pool: refused while a client has
/// `device` attached, the check and the rollback (and its commit) being one step.
pub fn rollback_served(
    service: &Service,
    pd: &Mutex<PoolDir>,
    read_only: bool,
    device: &str,
    snapshot: &str,
) -> Result<RollbackOutcome, ControlError> {
    let mut pd = pd.lock().unwrap_or_else(PoisonError::into_inner);
    if read_only {
        return Err(ControlError::new(
            ErrorKind::ReadOnly,
            format!("pool {} is served read-only: it cannot be changed", pd.dir().display()),
        ));
    }
    rollback_with(&mut pd, device, snapshot, |d, s| {
        service.with_pool_unattached(d, |pool| engine_step(pool, d, s)).map_err(|e| match service.attached(d) {
            0 => ControlError::from(e),
            n => ControlError::new(
                ErrorKind::Attached,
                format!("device \"{device}\" is attached by {n} NBD client(s); disconnect them before rolling it back"),
            ),
        })
    })
}
