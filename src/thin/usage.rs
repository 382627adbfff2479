//! Reporting: the highest mapped block, and mapped and exclusive counts per device.

use super::*;

impl Metadata {
    /// Highest mapped virtual block of a device.
    pub fn highest_mapped(&mut self, id: DevId) -> Result<Option<u64>, PoolError> {
        let root = self.dev(id)?.root;
        Ok(btree::last_key(&mut self.t, root, MAPPING)?)
    }

    /// Mapped and exclusive block counts of every device: a mapped block is
    /// exclusive when no other device maps the same data block. Walks every mapping.
    pub fn usage(&mut self) -> Result<BTreeMap<DevId, (u64, u64)>, PoolError> {
        let mut owners: HashMap<u64, u32> = HashMap::new();
        let mut per_dev: Vec<(DevId, Vec<u64>)> = Vec::new();
        for id in self.device_ids() {
            let blocks: Vec<u64> = self.mappings(id, 0, u64::MAX)?.into_iter().map(|m| m.data_block).collect();
            for &b in &blocks {
                *owners.entry(b).or_default() += 1;
            }
            per_dev.push((id, blocks));
        }
        Ok(per_dev
            .into_iter()
            .map(|(id, blocks)| {
                let excl = blocks.iter().filter(|b| owners.get(b) == Some(&1)).count() as u64;
                (id, (blocks.len() as u64, excl))
            })
            .collect())
    }

    /// Blocks of one device that no other device maps (see [`Metadata::usage`]).
    pub fn exclusive_blocks(&mut self, id: DevId) -> Result<u64, PoolError> {
        self.dev(id)?;
        Ok(self.usage()?.get(&id).map_or(0, |u| u.1))
    }
}
