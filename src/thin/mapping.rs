//! Mappings of virtual blocks: lookup, listing, allocation of data blocks, insert
//! and remove, each keeping the device's `mapped_blocks` and the time rule that
//! tells a block shared with a snapshot.

use super::*;

impl Metadata {
    /// Look up a virtual block.
    pub fn lookup(&mut self, id: DevId, vblock: u64) -> Result<Option<Mapping>, PoolError> {
        let d = self.dev(id)?;
        let (root, stime) = (d.root, d.details.snapshotted_time);
        let Some(v) = btree::lookup_u64(&mut self.t, root, vblock, MAPPING)? else { return Ok(None) };
        let (data_block, time) = unpack_block_time(v);
        if data_block >= self.t.data_counts().nr_blocks() {
            return Err(MetaError::corrupt(
                root,
                Corruption::Tree(format!(
                    "device {id} maps virtual block {vblock} to data block {data_block}, past the end of the data device ({} blocks)",
                    self.t.data_counts().nr_blocks()
                )),
            )
            .into());
        }
        Ok(Some(Mapping { data_block, time, shared: stime > time }))
    }

    /// The first mapped virtual block at or after `vblock`, with its data block.
    pub fn next_mapped(&mut self, id: DevId, vblock: u64) -> Result<Option<(u64, u64)>, PoolError> {
        let root = self.dev(id)?.root;
        Ok(btree::next_at_or_after(&mut self.t, root, vblock, MAPPING)?.map(|(k, v)| (k, unpack_block_time(v).0)))
    }

    /// Every mapping of a device with `lo <= vblock < hi`, in order.
    pub fn mappings(&mut self, id: DevId, lo: u64, hi: u64) -> Result<Vec<MappedBlock>, PoolError> {
        let root = self.dev(id)?.root;
        let mut out = Vec::new();
        btree::visit(&mut self.t, root, MAPPING, lo, hi, &mut |k, v| {
            let (b, tm) = unpack_block_time(u64::from_le_bytes(v[..8].try_into().unwrap_or_default()));
            out.push(MappedBlock { vblock: k, data_block: b, time: tm });
            Ok(())
        })?;
        Ok(out)
    }

    /// The next batch of mappings of a device at or after `from` and below `hi`: the
    /// mappings of `[k, min(k + window, hi))` where `k` is the first mapped block at
    /// or after `from`. Holes are skipped at the cost of one descent; an empty batch
    /// means nothing is mapped in `[from, hi)`. Callers walk a device by calling again
    /// from the last returned block plus one.
    pub fn mapping_window(
        &mut self,
        id: DevId,
        from: u64,
        hi: u64,
        window: u64,
    ) -> Result<Vec<MappedBlock>, PoolError> {
        match self.next_mapped(id, from)? {
            Some((k, _)) if k < hi => self.mappings(id, k, k.saturating_add(window.max(1)).min(hi)),
            _ => Ok(Vec::new()),
        }
    }

    /// Point the top-level entry of `id` at `root`, handing over the reference the
    /// caller holds (no count changes for the old value: it was moved already).
    pub(super) fn set_top_level(&mut self, id: DevId, root: u64) -> Result<(), PoolError> {
        self.mapping_root =
            btree::insert(&mut self.t, self.mapping_root, id as u64, &root.to_le_bytes(), TOP_LEVEL, Replace::Raw)?
                .root;
        Ok(())
    }

    pub(super) fn touch(&mut self, id: DevId) -> Result<u64, PoolError> {
        let d = self.devices.get(&id).ok_or(PoolError::NoSuchDevice(id))?;
        let root = d.root;
        if !d.touched {
            self.set_top_level(id, root)?;
            if let Some(d) = self.devices.get_mut(&id) {
                d.touched = true;
            }
        }
        Ok(root)
    }

    /// Allocate a data block (count 1). `None` when every block is in use or was in
    /// use at the last commit.
    pub fn alloc_data_block(&mut self) -> Result<Option<u64>, PoolError> {
        self.writable()?;
        self.changed = true;
        Ok(self.t.data_counts_mut().alloc())
    }

    /// Drop a reference to a data block obtained from [`Metadata::alloc_data_block`]
    /// that was not used.
    pub fn release_data_block(&mut self, b: u64) -> Result<(), PoolError> {
        self.t.data_counts_mut().dec(b)?;
        Ok(())
    }

    /// Are there free data blocks that only a commit would make allocatable?
    pub fn commit_would_free_data(&self) -> bool {
        self.t.data_counts().nr_free() > 0
    }

    /// Map `vblock` of device `id` to `data_block` (whose reference the caller hands
    /// over), at the current pool time. The old mapping's block loses a reference.
    pub fn insert_mapping(&mut self, id: DevId, vblock: u64, data_block: u64) -> Result<(), PoolError> {
        self.writable()?;
        let cost = self.mapping_change_cost(id)?;
        self.ensure_metadata(MetaNeed::Grow(cost))?;
        self.map(id, vblock, data_block, self.time)
    }

    /// Insert (vblock -> data_block @ time) into the device's tree, keeping
    /// mapped_blocks; the data block's reference is the caller's.
    pub(super) fn map(&mut self, id: DevId, vblock: u64, data_block: u64, time: u32) -> Result<(), PoolError> {
        let root = self.touch(id)?;
        let v = pack_block_time(data_block, time);
        let r = btree::insert(&mut self.t, root, vblock, &v.to_le_bytes(), MAPPING, Replace::DecOld)?;
        let d = self.devices.get_mut(&id).ok_or(PoolError::NoSuchDevice(id))?;
        d.root = r.root;
        if r.old.is_none() {
            d.details.mapped_blocks += 1;
        }
        d.details_dirty = true;
        self.changed = true;
        Ok(())
    }

    /// Unmap `vblock`; its data block loses a reference. Returns whether it was mapped.
    pub fn remove_mapping(&mut self, id: DevId, vblock: u64) -> Result<bool, PoolError> {
        self.writable()?;
        let root = self.dev(id)?.root;
        if btree::lookup(&mut self.t, root, vblock, MAPPING)?.is_none() {
            return Ok(false);
        }
        let cost = self.mapping_change_cost(id)?;
        self.ensure_metadata(MetaNeed::Shrink(cost))?;
        let root = self.touch(id)?;
        let (r, old) = btree::remove(&mut self.t, root, vblock, MAPPING)?;
        let d = self.devices.get_mut(&id).ok_or(PoolError::NoSuchDevice(id))?;
        d.root = r;
        if old.is_some() {
            d.details.mapped_blocks = d.details.mapped_blocks.saturating_sub(1);
        }
        d.details_dirty = true;
        self.changed = true;
        Ok(old.is_some())
    }
}
