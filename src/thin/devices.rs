//! Thin devices: create, snapshot (O(1): share the origin's mapping root), delete,
//! and the pool's transaction id.

use super::*;

impl Metadata {
    pub(super) fn check_id(id: u64) -> Result<DevId, PoolError> {
        if id > MAX_DEV_ID {
            return Err(PoolError::BadDeviceId(id));
        }
        Ok(id as DevId)
    }

    /// Create an empty thin device (`create_thin`).
    pub fn create_thin(&mut self, id: u64) -> Result<(), PoolError> {
        self.writable()?;
        let id = Self::check_id(id)?;
        if self.devices.contains_key(&id) {
            return Err(PoolError::DeviceExists(id));
        }
        let cost = self.device_change_cost()?;
        self.ensure_metadata(MetaNeed::Grow(cost + 1))?;
        let root = btree::empty(&mut self.t, MAPPING)?;
        self.set_top_level(id, root)?;
        let details = DeviceDetails {
            mapped_blocks: 0,
            transaction_id: self.trans_id,
            creation_time: self.time,
            snapshotted_time: self.time,
        };
        self.devices.insert(id, Device { root, root_in_tree: root, details, details_dirty: true, touched: true });
        self.changed = true;
        Ok(())
    }

    /// Snapshot `origin` as `id` (`create_snap`): O(1), shares the origin's tree.
    pub fn create_snap(&mut self, id: u64, origin: u64) -> Result<(), PoolError> {
        self.writable()?;
        let id = Self::check_id(id)?;
        let origin = Self::check_id(origin)?;
        if self.devices.contains_key(&id) {
            return Err(PoolError::DeviceExists(id));
        }
        let o = self.dev(origin)?.clone();
        let cost = self.device_change_cost()?;
        self.ensure_metadata(MetaNeed::Grow(cost))?;
        if self.time >= MAX_TIME {
            return Err(PoolError::TimeExhausted);
        }
        self.t.meta_counts_mut().inc(o.root)?;
        self.set_top_level(id, o.root)?;
        self.time += 1;
        let details = DeviceDetails {
            mapped_blocks: o.details.mapped_blocks,
            transaction_id: self.trans_id,
            creation_time: self.time,
            snapshotted_time: self.time,
        };
        self.devices
            .insert(id, Device { root: o.root, root_in_tree: o.root, details, details_dirty: true, touched: true });
        if let Some(od) = self.devices.get_mut(&origin) {
            od.details.snapshotted_time = self.time;
            od.details_dirty = true;
        }
        self.changed = true;
        Ok(())
    }

    /// Delete a device, releasing every block only it referenced.
    pub fn delete(&mut self, id: u64) -> Result<(), PoolError> {
        self.writable()?;
        let id = Self::check_id(id)?;
        let d = self.dev(id)?.clone();
        let cost = self.device_change_cost()?;
        self.ensure_metadata(MetaNeed::Shrink(2 * cost))?;
        if d.root != d.root_in_tree {
            self.set_top_level(id, d.root)?;
        }
        self.mapping_root = btree::remove(&mut self.t, self.mapping_root, id as u64, TOP_LEVEL)?.0;
        self.details_root = btree::remove(&mut self.t, self.details_root, id as u64, DETAILS)?.0;
        self.devices.remove(&id);
        self.changed = true;
        Ok(())
    }

    /// Metadata blocks one change of the top-level and details trees may take at
    /// worst (a shadowed path, every node on it split once).
    fn device_change_cost(&mut self) -> Result<u64, PoolError> {
        let levels = btree::depth(&mut self.t, self.mapping_root, TOP_LEVEL)?
            + btree::depth(&mut self.t, self.details_root, DETAILS)?;
        Ok(2 * (levels + 2))
    }

    /// `set_transaction_id old new`.
    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<(), PoolError> {
        self.writable()?;
        if old != self.trans_id {
            return Err(PoolError::TransactionId { current: self.trans_id, given: old });
        }
        self.trans_id = new;
        self.changed = true;
        Ok(())
    }

    /// Transaction id.
    pub fn transaction_id(&self) -> u64 {
        self.trans_id
    }
}

impl Metadata {
    /// The block of the root of device `id`'s mapping tree. Every change to the
    /// device's mappings after a commit shadows the root, so an unchanged root since
    /// a commit means unchanged mappings (what replication's identity stamp relies on).
    pub fn device_root(&self, id: DevId) -> Result<u64, PoolError> {
        Ok(self.dev(id)?.root)
    }

    /// Freeze device `id` as a snapshot does its origin: the pool's time moves on
    /// and the device's `snapshotted_time` becomes the new time, so every block it
    /// maps now counts as shared and the next write to any of them copies it (and so
    /// changes the device's mapping root). Nothing else changes.
    pub fn freeze(&mut self, id: u64) -> Result<(), PoolError> {
        self.writable()?;
        let id = Self::check_id(id)?;
        self.dev(id)?;
        let cost = self.device_change_cost()?;
        self.ensure_metadata(MetaNeed::Grow(cost))?;
        if self.time >= MAX_TIME {
            return Err(PoolError::TimeExhausted);
        }
        self.time += 1;
        if let Some(d) = self.devices.get_mut(&id) {
            d.details.snapshotted_time = self.time;
            d.details_dirty = true;
        }
        self.changed = true;
        Ok(())
    }
}
