//! What replication (`thinctl send` / `thinctl receive`) keeps in `pool.toml`:
//! snapshot identities and hidden work devices.
//!
//! **Identities.** A device that was sent or received has a 128-bit identity
//! (`[identities.NAME]` in `pool.toml`): random when a device is first sent, the
//! source's when a device is received (the received device reproduces it), so an
//! incremental stream names its base by identity, not by name. An identity holds
//! only while the device is unchanged; it is stamped with the device's id, size,
//! mapped block count and mapping-tree root at a commit after which the device was
//! frozen ([`Metadata::freeze`](crate::thin::Metadata::freeze): every block counts as
//! shared, so the next write to any of them copies it and moves the root). A device
//! whose stamp no longer matches has no valid identity: as a source it gets a new
//! one, as a base it is refused. (The one change the stamp could miss is a root
//! block number reused for the same device after several commits, with the same
//! mapped count and size.)
//!
//! **Hidden devices.** Sending works on hidden snapshots taken at one instant, and
//! receiving writes into a hidden device named only at the end. Their ids are listed
//! in `pool.toml` (`hidden = [...]`) before they are created, so a crash or a cut-off
//! leaves nothing visible behind: [`PoolDir::open_pool`] (writable) deletes every
//! listed device that has no name, and reconciling never names them `thin<ID>`.

use serde::{Deserialize, Serialize};

use super::{PoolDir, PoolDirError};
use crate::pool::Pool;
use crate::thin::DevId;

/// A device's replication identity and the stamp that says it still holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityEntry {
    /// 32 hex digits.
    pub uuid: String,
    /// The device id it was stamped for.
    pub id: DevId,
    /// The device's mapping-tree root block when stamped.
    pub root: u64,
    /// The device's mapped blocks when stamped.
    pub mapped_blocks: u64,
    /// The device's virtual size when stamped.
    pub size_bytes: u64,
}

/// What a device's identity is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityState {
    /// None was ever recorded.
    None,
    /// Recorded, but the device changed since.
    Stale([u8; 16]),
    /// Recorded and still valid.
    Valid([u8; 16]),
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, out) in b.iter_mut().enumerate() {
        *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    (b != [0; 16]).then_some(b)
}

fn hex(b: &[u8; 16]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The stamp of device `id` now: (root, mapped blocks).
fn stamp(pool: &Pool, id: DevId) -> Result<(u64, u64), PoolDirError> {
    let root = pool.meta().device_root(id)?;
    let mapped = pool.meta().device_info(id)?.mapped_blocks;
    Ok((root, mapped))
}

impl PoolDir {
    /// The identity of device `name` and whether it still holds.
    pub fn identity(&self, pool: &Pool, name: &str) -> Result<IdentityState, PoolDirError> {
        let e = self.device(name)?;
        let Some(rec) = self.config.identities.get(name) else { return Ok(IdentityState::None) };
        let Some(uuid) = parse_uuid(&rec.uuid) else { return Ok(IdentityState::None) };
        if rec.id != e.id || !pool.meta().has_device(e.id) {
            return Ok(IdentityState::Stale(uuid));
        }
        let (root, mapped) = stamp(pool, e.id)?;
        Ok(if root == rec.root && mapped == rec.mapped_blocks && e.size_bytes == rec.size_bytes {
            IdentityState::Valid(uuid)
        } else {
            IdentityState::Stale(uuid)
        })
    }

    /// The devices whose valid identity is `uuid` (by name).
    pub fn devices_with_identity(&self, pool: &Pool, uuid: &[u8; 16]) -> Result<Vec<String>, PoolDirError> {
        let mut out = Vec::new();
        for name in self.config.identities.keys() {
            if self.config.devices.contains_key(name) && self.identity(pool, name)? == IdentityState::Valid(*uuid) {
                out.push(name.clone());
            }
        }
        Ok(out)
    }

    /// The names whose recorded (maybe stale) identity is `uuid`.
    pub fn devices_once_with_identity(&self, uuid: &[u8; 16]) -> Vec<String> {
        let h = hex(uuid);
        self.config
            .identities
            .iter()
            .filter(|(n, r)| r.uuid == h && self.config.devices.contains_key(*n))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Record `uuid` as the identity of device `name` in memory, stamped with its
    /// state now (the caller has frozen and will commit it before saving).
    pub fn set_identity(
        &mut self,
        pool: &Pool,
        name: &str,
        id: DevId,
        uuid: &[u8; 16],
        size_bytes: u64,
    ) -> Result<(), PoolDirError> {
        let (root, mapped_blocks) = stamp(pool, id)?;
        self.config
            .identities
            .insert(name.to_string(), IdentityEntry { uuid: hex(uuid), id, root, mapped_blocks, size_bytes });
        Ok(())
    }

    /// Forget the identity recorded for `name` when no device has that name.
    pub fn drop_unnamed_identity(&mut self, name: &str) {
        if !self.config.devices.contains_key(name) {
            self.config.identities.remove(name);
        }
    }

    /// List `ids` as hidden devices and save, before creating them.
    pub fn hide(&mut self, ids: &[DevId]) -> Result<(), PoolDirError> {
        self.writable()?;
        for &id in ids {
            if !self.config.hidden.contains(&id) {
                self.config.hidden.push(id);
            }
        }
        self.save()
    }

    /// Take `ids` off the hidden list (in memory; the caller saves).
    pub fn unhide(&mut self, ids: &[DevId]) {
        self.config.hidden.retain(|h| !ids.contains(h));
    }

    /// The hidden device ids.
    pub fn hidden(&self) -> &[DevId] {
        &self.config.hidden
    }

    /// Lowest free device ids, `n` of them, skipping hidden ones.
    pub fn free_ids(&self, pool: &Pool, n: usize) -> Result<Vec<DevId>, PoolDirError> {
        let ids: Vec<DevId> = (0..=crate::format::MAX_DEV_ID as DevId)
            .filter(|i| !pool.meta().has_device(*i) && !self.config.hidden.contains(i))
            .take(n)
            .collect();
        if ids.len() < n {
            return Err(PoolDirError::Invalid("every device id (0..=16777215) is in use".into()));
        }
        Ok(ids)
    }

    /// Delete the hidden devices left by an interrupted send or receive (those with
    /// no name), commit, and save an empty hidden list. Called by a writable
    /// [`PoolDir::open_pool`].
    pub fn clean_hidden(&mut self, pool: &mut Pool) -> Result<(), PoolDirError> {
        if self.config.hidden.is_empty() {
            return Ok(());
        }
        let named: Vec<DevId> = self.config.devices.values().map(|e| e.id).collect();
        let mut deleted = 0;
        for id in self.config.hidden.clone() {
            if pool.meta().has_device(id) && !named.contains(&id) {
                pool.delete(id.into())?;
                deleted += 1;
            }
        }
        if deleted > 0 {
            pool.commit()?;
            self.warnings.push(format!("deleted {deleted} hidden device(s) left by an interrupted send or receive"));
        }
        self.config.hidden.clear();
        self.save()
    }
}
