//! Changes to a pool's devices: create, snapshot, delete, discard and resize, as
//! [`PoolDir`] methods and as a typed [`PoolChange`] a server can receive; each is
//! committed to the metadata first and saved to `pool.toml` second.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{check_name, check_size, DeviceEntry, PoolDir, PoolDirError};
use crate::error::PoolError;
use crate::format::MAX_DEV_ID;
use crate::pool::Pool;
use crate::thin::DevId;

/// Discards walk this many virtual blocks between progress reports.
const DISCARD_WINDOW: u64 = 4096;

/// A change to a pool's devices: what `thinctl create/snapshot/delete/discard/resize`
/// do, in a form a server can receive over its control socket and apply with
/// [`PoolDir::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum PoolChange {
    /// Create an empty thin device.
    Create {
        /// The new device's name.
        name: String,
        /// Its virtual size in bytes.
        size_bytes: u64,
        /// Its id; default: the lowest free one.
        id: Option<DevId>,
    },
    /// Snapshot a device (thin or snapshot); the snapshot has the origin's size.
    Snapshot {
        /// The device to snapshot.
        origin: String,
        /// The snapshot's name.
        name: String,
        /// Its id; default: the lowest free one.
        id: Option<DevId>,
    },
    /// Delete a device.
    Delete {
        /// The device.
        name: String,
    },
    /// Unmap the whole blocks inside a byte range (the whole device when `offset` and
    /// `length` are both absent; to the end of the device when only `length` is).
    Discard {
        /// The device.
        name: String,
        /// Start of the range in bytes.
        offset: Option<u64>,
        /// Length of the range in bytes.
        length: Option<u64>,
    },
    /// Grow the pool's data and/or metadata (files and space maps), online or not.
    Extend {
        /// The data's new size.
        data: Option<Grow>,
        /// The metadata's new size.
        metadata: Option<Grow>,
    },
    /// Change the pool's thresholds, autoextend and no-space policy (`pool.toml`'s
    /// options; a server also applies them at once).
    SetHealth {
        /// What to change.
        change: super::HealthChange,
    },
    /// Change the virtual size; shrinking discards what is cut off.
    Resize {
        /// The device.
        name: String,
        /// The new virtual size in bytes.
        size_bytes: u64,
    },
}

/// What [`PoolDir::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ChangeOutcome {
    /// A device was created (thin or snapshot) with this id.
    Created {
        /// The new device's id.
        id: DevId,
    },
    /// The device was deleted.
    Deleted {
        /// The deleted device's id.
        id: DevId,
    },
    /// This many blocks were unmapped.
    Discarded {
        /// Blocks unmapped.
        blocks: u64,
    },
    /// The pool grew to these sizes.
    Extended {
        /// Data size in bytes now.
        data_bytes: u64,
        /// Metadata size in bytes now.
        metadata_bytes: u64,
    },
    /// The pool's health options, as saved.
    HealthSet {
        /// The options in `pool.toml` now.
        options: super::HealthOptions,
    },
    /// The size changed; `blocks_discarded` were cut off.
    Resized {
        /// The size before.
        old_bytes: u64,
        /// The size now.
        new_bytes: u64,
        /// Blocks unmapped past the new end.
        blocks_discarded: u64,
    },
}

/// A new size: absolute, or added to the current one (`+SIZE` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grow {
    /// Exactly this many bytes.
    To(u64),
    /// This many bytes more.
    By(u64),
}

impl Grow {
    /// The size this asks for, given the current one.
    pub fn from(self, current: u64) -> u64 {
        match self {
            Grow::To(n) => n,
            Grow::By(n) => current.saturating_add(n),
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl PoolDir {
    fn lowest_free_id(pool: &Pool) -> Result<DevId, PoolDirError> {
        let used: BTreeSet<DevId> = pool.meta().device_ids().into_iter().collect();
        (0..=MAX_DEV_ID as DevId)
            .find(|i| !used.contains(i))
            .ok_or_else(|| PoolDirError::Invalid("every device id (0..=16777215) is in use".into()))
    }

    /// Check that `name` is valid and free and pick the id of a new device: `id` when
    /// it is free, else the lowest free id.
    pub fn new_device_id(&self, pool: &Pool, name: &str, id: Option<DevId>) -> Result<DevId, PoolDirError> {
        check_name(name)?;
        if self.config.devices.contains_key(name) {
            return Err(PoolDirError::NameTaken(name.to_string()));
        }
        match id {
            None => Self::lowest_free_id(pool),
            Some(id) if u64::from(id) > MAX_DEV_ID => {
                Err(PoolDirError::Invalid(format!("device id {id} is out of range (0..={MAX_DEV_ID})")))
            }
            Some(id) if pool.meta().has_device(id) => Err(PoolDirError::IdTaken {
                id,
                name: self.name_of(id).map_or_else(|| format!("thin{id}"), str::to_string),
            }),
            Some(id) => Ok(id),
        }
    }

    /// Create an empty thin device; returns its id. Committed, then saved.
    pub fn create_device(
        &mut self,
        pool: &mut Pool,
        name: &str,
        size_bytes: u64,
        id: Option<DevId>,
    ) -> Result<DevId, PoolDirError> {
        self.writable()?;
        check_size(size_bytes)?;
        let id = self.new_device_id(pool, name, id)?;
        pool.create_thin(id.into())?;
        pool.commit()?;
        self.config.devices.insert(
            name.to_string(),
            DeviceEntry { id, size_bytes, created: Some(now_unix()), snapshot_of: None, labels: Default::default() },
        );
        self.save()?;
        Ok(id)
    }

    /// Name a device that was created in the engine and committed by the caller (for
    /// work that must be committed together with the creation, like an import into a
    /// new device), and save.
    pub fn record_new_device(&mut self, name: &str, id: DevId, size_bytes: u64) -> Result<(), PoolDirError> {
        self.writable()?;
        check_size(size_bytes)?;
        check_name(name)?;
        if self.config.devices.contains_key(name) {
            return Err(PoolDirError::NameTaken(name.to_string()));
        }
        self.config.devices.insert(
            name.to_string(),
            DeviceEntry { id, size_bytes, created: Some(now_unix()), snapshot_of: None, labels: Default::default() },
        );
        self.save()
    }

    /// Snapshot `origin` (a thin device or a snapshot) as `name`; returns its id.
    pub fn snapshot(
        &mut self,
        pool: &mut Pool,
        origin: &str,
        name: &str,
        id: Option<DevId>,
    ) -> Result<DevId, PoolDirError> {
        self.writable()?;
        let o = self.device(origin)?.clone();
        let id = self.new_device_id(pool, name, id)?;
        pool.create_snap(id.into(), o.id.into())?;
        pool.commit()?;
        self.config.devices.insert(
            name.to_string(),
            DeviceEntry {
                id,
                size_bytes: o.size_bytes,
                created: Some(now_unix()),
                snapshot_of: Some(origin.to_string()),
                labels: Default::default(),
            },
        );
        self.save()?;
        Ok(id)
    }

    /// Delete a device; returns its id. Snapshots of it keep their data and lose
    /// their `snapshot_of`.
    pub fn delete(&mut self, pool: &mut Pool, name: &str) -> Result<DevId, PoolDirError> {
        self.delete_with(name, |id| {
            pool.delete(id.into())?;
            pool.commit().map_err(PoolDirError::from)
        })
    }

    /// Delete a device whose engine-side delete is done by `delete_and_commit(id)`
    /// (which must delete the thin device and commit, or fail changing nothing): a
    /// server passes one step that also refuses an attached device. Then the name is
    /// forgotten and `pool.toml` saved; returns the id. Snapshots of it lose their
    /// `snapshot_of`.
    pub fn delete_with<E: From<PoolDirError>>(
        &mut self,
        name: &str,
        delete_and_commit: impl FnOnce(DevId) -> Result<(), E>,
    ) -> Result<DevId, E> {
        self.writable()?;
        let id = self.device(name)?.id;
        delete_and_commit(id)?;
        self.forget(name);
        self.save()?;
        Ok(id)
    }

    /// Unmap the whole blocks inside `[offset, offset + length)` of `name` (see
    /// [`PoolChange::Discard`] for the defaults); `progress(done, total)` is called
    /// with virtual blocks as the walk goes. Returns the number of blocks unmapped.
    pub fn discard(
        &mut self,
        pool: &mut Pool,
        name: &str,
        offset: Option<u64>,
        length: Option<u64>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, PoolDirError> {
        let (id, start, len) = self.discard_range(name, offset, length)?;
        let n = discard_blocks(pool, id, start, len, progress)?;
        pool.commit()?;
        Ok(n)
    }

    /// The device and byte range a [`PoolChange::Discard`] of `name` covers, checked
    /// against the device's size: `(id, start, length)`.
    pub fn discard_range(
        &self,
        name: &str,
        offset: Option<u64>,
        length: Option<u64>,
    ) -> Result<(DevId, u64, u64), PoolDirError> {
        self.writable()?;
        let e = self.device(name)?.clone();
        let (start, len) = match (offset, length) {
            (None, None) => (0, u64::MAX),
            (off, len) => {
                let off = off.unwrap_or(0);
                if off > e.size_bytes {
                    return Err(PoolDirError::Invalid(format!(
                        "offset {off} is past the end of device \"{name}\" ({} bytes)",
                        e.size_bytes
                    )));
                }
                let len = len.unwrap_or(e.size_bytes - off);
                if off.checked_add(len).is_none_or(|end| end > e.size_bytes) {
                    return Err(PoolDirError::Invalid(format!(
                        "the range {off}+{len} goes past the end of device \"{name}\" ({} bytes)",
                        e.size_bytes
                    )));
                }
                (off, len)
            }
        };
        Ok((e.id, start, len))
    }

    /// Set the virtual size of `name`; shrinking unmaps the whole blocks past the new
    /// end and zeroes the rest of a partly cut block. Returns (old size, blocks unmapped).
    pub fn resize(&mut self, pool: &mut Pool, name: &str, size_bytes: u64) -> Result<(u64, u64), PoolDirError> {
        self.writable()?;
        check_size(size_bytes)?;
        let e = self.device(name)?.clone();
        let mut n = 0;
        if size_bytes < e.size_bytes {
            n = cut_after(pool, e.id, size_bytes)?;
        }
        pool.commit()?;
        self.set_size(name, size_bytes)?;
        Ok((e.size_bytes, n))
    }

    /// Record a new virtual size for `name` (no data changes) and save.
    pub fn set_size(&mut self, name: &str, size_bytes: u64) -> Result<(), PoolDirError> {
        self.writable()?;
        check_size(size_bytes)?;
        let entry = self
            .config
            .devices
            .get_mut(name)
            .ok_or_else(|| PoolDirError::NoSuchDevice { name: name.to_string(), known: Vec::new() })?;
        if entry.size_bytes != size_bytes {
            entry.size_bytes = size_bytes;
            self.save()?;
        }
        Ok(())
    }

    /// Apply a [`PoolChange`]: committed to the metadata, then saved to `pool.toml`.
    pub fn apply(&mut self, pool: &mut Pool, change: &PoolChange) -> Result<ChangeOutcome, PoolDirError> {
        Ok(match change {
            PoolChange::Create { name, size_bytes, id } => {
                ChangeOutcome::Created { id: self.create_device(pool, name, *size_bytes, *id)? }
            }
            PoolChange::Snapshot { origin, name, id } => {
                ChangeOutcome::Created { id: self.snapshot(pool, origin, name, *id)? }
            }
            PoolChange::Delete { name } => ChangeOutcome::Deleted { id: self.delete(pool, name)? },
            PoolChange::Discard { name, offset, length } => {
                ChangeOutcome::Discarded { blocks: self.discard(pool, name, *offset, *length, &mut |_, _| {})? }
            }
            PoolChange::Extend { data, metadata } => {
                self.writable()?;
                let st = pool.meta().status();
                let data_now = st.data_total_blocks * pool.block_bytes();
                let meta_now = st.metadata_total_blocks * crate::format::BLOCK_SIZE as u64;
                pool.extend(data.map(|g| g.from(data_now)), metadata.map(|g| g.from(meta_now)))?;
                pool.commit()?;
                let st = pool.meta().status();
                ChangeOutcome::Extended {
                    data_bytes: st.data_total_blocks * pool.block_bytes(),
                    metadata_bytes: st.metadata_total_blocks * crate::format::BLOCK_SIZE as u64,
                }
            }
            PoolChange::SetHealth { change } => ChangeOutcome::HealthSet { options: self.set_health(change)? },
            PoolChange::Resize { name, size_bytes } => {
                let (old, n) = self.resize(pool, name, *size_bytes)?;
                ChangeOutcome::Resized { old_bytes: old, new_bytes: *size_bytes, blocks_discarded: n }
            }
        })
    }
}

/// Unmap every whole block of `dev` inside `[offset, offset + len)`, in windows so
/// that `progress(done, total)` (virtual blocks) can follow. Not committed.
pub fn discard_blocks(
    pool: &mut Pool,
    dev: DevId,
    offset: u64,
    len: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, PoolError> {
    let bs = pool.block_bytes();
    let first = offset.div_ceil(bs);
    let mut end = offset.saturating_add(len) / bs;
    if let Some(h) = pool.highest_mapped(dev)? {
        end = end.min(h.saturating_add(1));
    } else {
        return Ok(0);
    }
    let total = end.saturating_sub(first);
    let mut vb = first;
    let mut n = 0;
    while vb < end {
        let Some((k, _)) = pool.next_mapped(dev, vb)? else { break };
        if k >= end {
            break;
        }
        let stop = k.saturating_add(DISCARD_WINDOW).min(end);
        n += pool.discard(dev, k * bs, (stop - k) * bs)?;
        progress(stop - first, total);
        vb = stop;
    }
    progress(total, total);
    Ok(n)
}

/// Make everything of `dev` from byte `size` on read as zeros: zero the tail of a
/// partly cut block (only when it is mapped) and unmap every block after it. Returns
/// the number of blocks unmapped. Not committed.
pub fn cut_after(pool: &mut Pool, dev: DevId, size: u64) -> Result<u64, PoolError> {
    let bs = pool.block_bytes();
    let aligned = size.div_ceil(bs).saturating_mul(bs);
    if aligned > size {
        pool.write_zeroes(dev, size, aligned - size, true)?;
    }
    discard_blocks(pool, dev, aligned, u64::MAX - aligned, &mut |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_changes_have_a_stable_json_form() {
        let c = PoolChange::Create { name: "web".into(), size_bytes: 4096, id: None };
        let j = serde_json::to_string(&c).expect("json");
        assert_eq!(j, r#"{"op":"create","name":"web","size_bytes":4096,"id":null}"#);
        assert_eq!(serde_json::from_str::<PoolChange>(&j).expect("back"), c);
    }
}
