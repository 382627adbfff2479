//! Instant rollback: a device takes a snapshot's mapping tree (one more reference
//! on its root, O(1)) and lets go of its own (what only it held is freed at the next
//! commit). dm-thin has no such operation; LVM needs a deferred merge for it.

use super::*;

impl Metadata {
    /// Make device `id`'s mappings those of device `snapshot` (any other device,
    /// typically one of its snapshots): `id` gets a new reference to `snapshot`'s
    /// mapping root and drops its own tree. Both devices then share every block, as
    /// after a snapshot: the pool time moves on and both devices' snapshot time is
    /// set to it, so a write to either copies the block first.
    pub fn rollback(&mut self, id: u64, snapshot: u64) -> Result<(), PoolError> {
        self.writable()?;
        let id = Self::check_id(id)?;
        let snapshot = Self::check_id(snapshot)?;
        let s = self.dev(snapshot)?.clone();
        self.dev(id)?;
        if id == snapshot {
            return Err(PoolError::invalid(format!("thin device {id} cannot be rolled back to itself")));
        }
        let cost = self.mapping_change_cost(id)?;
        self.ensure_metadata(MetaNeed::Shrink(2 * cost))?;
        if self.time >= MAX_TIME {
            return Err(PoolError::TimeExhausted);
        }
        // The device's top-level entry is shadowed first (a leaf shared with a held
        // metadata snapshot is copied with its subtree roots counted), then points at
        // the snapshot's root, whose new reference it takes.
        let old = self.touch(id)?;
        self.t.meta_counts_mut().inc(s.root)?;
        self.set_top_level(id, s.root)?;
        self.time += 1;
        let time = self.time;
        if let Some(d) = self.devices.get_mut(&id) {
            d.root = s.root;
            d.details.mapped_blocks = s.details.mapped_blocks;
            d.details.snapshotted_time = time;
            d.details_dirty = true;
        }
        if let Some(sd) = self.devices.get_mut(&snapshot) {
            sd.details.snapshotted_time = time;
            sd.details_dirty = true;
        }
        self.changed = true;
        // The device's own tree loses its reference: what only it held is freed.
        btree::delete_tree(&mut self.t, old, MAPPING)?;
        Ok(())
    }
}
