//! What only a restore (`thin_restore`, `thinctl restore`) needs: devices with given
//! details, mappings with explicit times, and the pool time.

use super::*;

impl Metadata {
    /// Restore support (`thin_restore`): create device `id` with these details;
    /// `mapped_blocks` counts the mappings added with [`Metadata::restore_mapping`].
    pub fn restore_device(
        &mut self,
        id: u64,
        transaction_id: u64,
        creation_time: u32,
        snapshotted_time: u32,
    ) -> Result<(), PoolError> {
        self.create_thin(id)?;
        let id = id as DevId;
        if let Some(d) = self.devices.get_mut(&id) {
            d.details = DeviceDetails { mapped_blocks: 0, transaction_id, creation_time, snapshotted_time };
        }
        Ok(())
    }

    /// Restore support: map `vblock` of `id` to `data_block` with an explicit time,
    /// taking a new reference on the data block.
    pub fn restore_mapping(&mut self, id: DevId, vblock: u64, data_block: u64, time: u32) -> Result<(), PoolError> {
        self.writable()?;
        if data_block >= self.t.data_counts().nr_blocks() {
            return Err(PoolError::invalid(format!(
                "data block {data_block} is past the end of the pool ({} blocks)",
                self.t.data_counts().nr_blocks()
            )));
        }
        if time > MAX_TIME {
            return Err(PoolError::invalid(format!("mapping time {time} exceeds 24 bits")));
        }
        let cost = self.mapping_change_cost(id)?;
        self.ensure_metadata(MetaNeed::Grow(cost))?;
        self.t.data_counts_mut().inc(data_block)?;
        self.map(id, vblock, data_block, time)
    }

    /// Restore support: set the pool time (and transaction id with
    /// [`Metadata::set_transaction_id`]).
    pub fn set_time(&mut self, time: u32) -> Result<(), PoolError> {
        self.writable()?;
        if time > MAX_TIME {
            return Err(PoolError::invalid(format!("pool time {time} exceeds 24 bits")));
        }
        self.time = time;
        self.changed = true;
        Ok(())
    }
}
