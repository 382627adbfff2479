//! Growth of the space maps, the commit (data made durable first, then every new
//! metadata block, then the superblock) and the held metadata snapshot.

use super::*;

/// A commit in steps whose metadata blocks are written but not yet durable (see
/// [`Metadata::commit_prepare`]).
#[derive(Debug)]
pub struct PreparedCommit {
    sb: Superblock,
}

impl Metadata {
    /// Grow the data space map to `nr_blocks` (the data device grew).
    pub fn extend_data(&mut self, nr_blocks: u64) -> Result<(), PoolError> {
        self.writable()?;
        if nr_blocks < self.t.data_counts().nr_blocks() {
            return Err(PoolError::invalid("the data space map cannot shrink"));
        }
        if nr_blocks > MAX_DATA_BLOCKS {
            return Err(PoolError::invalid("more than 2^40 data blocks"));
        }
        if nr_blocks > self.t.data_counts().nr_blocks() {
            self.t.data_counts_mut().extend(nr_blocks);
            self.sms.fit(&self.t);
            self.changed = true;
        }
        Ok(())
    }

    /// Shrink the data space map to `nr_blocks` (the data device is to shrink).
    /// Refused unless every block cut off is free now and was at the last commit.
    pub fn shrink_data(&mut self, nr_blocks: u64) -> Result<(), PoolError> {
        self.writable()?;
        let have = self.t.data_counts().nr_blocks();
        if nr_blocks >= have {
            return Ok(());
        }
        if nr_blocks == 0 {
            return Err(PoolError::invalid("the data cannot shrink to no blocks"));
        }
        if let Some(b) = self.t.data_counts().first_used_from(nr_blocks) {
            return Err(PoolError::invalid(format!(
                "the data cannot shrink to {nr_blocks} blocks: data block {b} past the new end is in use"
            )));
        }
        self.ensure_metadata(MetaNeed::Shrink(4))?;
        let keep = nr_blocks.div_ceil(crate::format::space_map::ENTRIES_PER_BITMAP);
        self.sms.drop_data_bitmaps(&mut self.t, keep)?;
        self.t.data_counts_mut().shrink(nr_blocks);
        self.sms.fit(&self.t);
        self.changed = true;
        Ok(())
    }

    /// Grow the metadata space map to the device's size (capped at the format limit).
    pub fn extend_metadata(&mut self) -> Result<(), PoolError> {
        self.writable()?;
        let n = self.t.device_blocks().min(MAX_METADATA_BLOCKS);
        if n > self.t.meta_counts().nr_blocks() {
            self.t.meta_counts_mut().extend(n);
            self.sms.fit(&self.t);
            self.changed = true;
        }
        Ok(())
    }

    /// The metadata device, for syncing it outside the pool's lock during a
    /// commit in steps (see [`Metadata::commit_prepare`]).
    pub fn storage(&self) -> std::sync::Arc<dyn MetaStorage> {
        self.t.storage()
    }

    /// Has anything changed since the last commit?
    pub fn is_dirty(&self) -> bool {
        self.changed
    }

    /// Commit: `sync_data` runs first (the data device must be durable before the
    /// metadata that points at it), then every new metadata block is written and
    /// synced, then the superblock is written and synced. On error nothing more is
    /// accepted until reopen; the previous commit stays intact on disk.
    pub fn commit(&mut self, sync_data: &mut dyn FnMut() -> std::io::Result<()>) -> Result<Committed, PoolError> {
        if self.read_only {
            return Ok(Committed::default());
        }
        if self.t.is_poisoned() {
            return Err(MetaError::Poisoned.into());
        }
        if !self.changed {
            // Nothing to commit, but writes in place must still become durable.
            sync_data().map_err(PoolError::DataIo)?;
            return Ok(Committed::default());
        }
        let r = self.commit_inner(sync_data);
        if r.is_err() {
            self.t.poison();
        }
        r
    }

    fn commit_inner(&mut self, sync_data: &mut dyn FnMut() -> std::io::Result<()>) -> Result<Committed, PoolError> {
        let p = self.prepare_inner(sync_data)?;
        self.t.sync()?;
        self.write_superblock(&p)?;
        self.t.sync()?;
        Ok(self.commit_finish(p))
    }

    /// The first step of a commit done in steps, for a caller that syncs the
    /// metadata device (`Metadata::storage`) without holding the metadata: the same
    /// commit as [`Metadata::commit`], in this order:
    /// 1. `commit_prepare`: `sync_data`, then every new metadata block written
    ///    (not yet durable);
    /// 2. the caller syncs the metadata device;
    /// 3. [`Metadata::commit_write_superblock`];
    /// 4. the caller syncs the metadata device again;
    /// 5. [`Metadata::commit_finish`] (or [`Metadata::commit_abort`] when a
    ///    sync failed).
    ///
    /// Between the steps the metadata may be read (lookups), never changed: the
    /// caller keeps every change out until step 5. `None`: nothing to commit
    /// (`sync_data` ran).
    pub fn commit_prepare(
        &mut self,
        sync_data: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<Option<PreparedCommit>, PoolError> {
        if self.read_only {
            return Ok(None);
        }
        if self.t.is_poisoned() {
            return Err(MetaError::Poisoned.into());
        }
        if !self.changed {
            sync_data().map_err(PoolError::DataIo)?;
            return Ok(None);
        }
        let r = self.prepare_inner(sync_data);
        if r.is_err() {
            self.t.poison();
        }
        r.map(Some)
    }

    /// Step 3 of a commit in steps (see [`Metadata::commit_prepare`]): write the
    /// new superblock (not yet durable).
    pub fn commit_write_superblock(&mut self, p: &PreparedCommit) -> Result<(), PoolError> {
        let r = self.write_superblock(p);
        if r.is_err() {
            self.t.poison();
        }
        r
    }

    /// The last step of a commit (see [`Metadata::commit_prepare`]): the
    /// superblock is durable; a new transaction begins.
    pub fn commit_finish(&mut self, p: PreparedCommit) -> Committed {
        self.sb = p.sb;
        self.t.set_committing(false);
        self.t.end_transaction();
        self.sms.end_transaction();
        let released_data = self.t.data_counts_mut().commit().released;
        self.t.meta_counts_mut().commit();
        self.changed = false;
        Committed { released_data }
    }

    /// A step of a commit in steps failed outside (a sync of the metadata
    /// device): nothing more is accepted until reopen, as after any failed
    /// commit; the previous commit stays intact on disk.
    pub fn commit_abort(&mut self, _p: PreparedCommit) {
        self.t.poison();
    }

    fn write_superblock(&mut self, p: &PreparedCommit) -> Result<(), PoolError> {
        let blk = p.sb.encode(0);
        self.t.write_through(0, &blk)?;
        Ok(())
    }

    fn prepare_inner(
        &mut self,
        sync_data: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<PreparedCommit, PoolError> {
        sync_data().map_err(PoolError::DataIo)?;
        self.t.set_committing(true);
        // Device details and roots into their trees.
        let ids: Vec<DevId> = self.devices.keys().copied().collect();
        for id in ids {
            let Some(d) = self.devices.get(&id).cloned() else {
                continue;
            };
            if d.details_dirty {
                self.details_root = btree::insert(
                    &mut self.t,
                    self.details_root,
                    id as u64,
                    &d.details.encode(),
                    DETAILS,
                    Replace::Raw,
                )?
                .root;
            }
            if d.root != d.root_in_tree {
                self.set_top_level(id, d.root)?;
            }
            if let Some(d) = self.devices.get_mut(&id) {
                d.details_dirty = false;
                d.root_in_tree = d.root;
                d.touched = false;
            }
        }
        self.sms.write(&mut self.t)?;
        self.t.write_dirty_blocks()?;
        let (data_sm_root, metadata_sm_root) = self.sms.roots(&self.t);
        let sb = Superblock {
            time: self.time,
            trans_id: self.trans_id,
            held_root: self.held_root,
            data_sm_root,
            metadata_sm_root,
            data_mapping_root: self.mapping_root,
            device_details_root: self.details_root,
            ..self.sb.clone()
        };
        Ok(PreparedCommit { sb })
    }

    /// Take a metadata snapshot (`reserve_metadata_snap`): commit, then copy the
    /// superblock to a new block that holds the current trees, and commit again.
    pub fn reserve_metadata_snap(
        &mut self,
        sync_data: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<u64, PoolError> {
        self.writable()?;
        if self.held_root != 0 {
            return Err(PoolError::MetadataSnapshot("a metadata snapshot is already held; release it first"));
        }
        self.changed = true;
        self.commit(sync_data)?;
        let uuid = self.sb.uuid;
        let h = self.put_held_copy(uuid)?;
        self.commit(sync_data)?;
        Ok(h)
    }

    /// Copy the committed superblock (its trees) to a new metadata block carrying
    /// `uuid`, take a reference on both trees for it and make it the held root (as
    /// `reserve_metadata_snap` does: the copy has no space-map roots and no held
    /// root of its own). The caller commits.
    pub(super) fn put_held_copy(&mut self, uuid: [u8; 16]) -> Result<u64, PoolError> {
        let h = self.t.alloc_meta()?;
        let copy = Superblock {
            data_sm_root: SmRoot::default(),
            metadata_sm_root: SmRoot::default(),
            held_root: 0,
            uuid,
            ..self.sb.clone()
        };
        self.t.put(h, copy.encode(h), BlockKind::Superblock, 0);
        self.t.meta_counts_mut().inc(self.sb.data_mapping_root)?;
        self.t.meta_counts_mut().inc(self.sb.device_details_root)?;
        self.held_root = h;
        self.changed = true;
        Ok(h)
    }

    /// Release the held metadata snapshot (`release_metadata_snap`).
    pub fn release_metadata_snap(
        &mut self,
        sync_data: &mut dyn FnMut() -> std::io::Result<()>,
    ) -> Result<(), PoolError> {
        self.writable()?;
        let h = self.held_root;
        if h == 0 {
            return Err(PoolError::MetadataSnapshot("no metadata snapshot is held"));
        }
        let raw = self.t.read_uncached(h)?;
        let held = Superblock::decode(&raw, h).map_err(|e| MetaError::corrupt(h, Corruption::Superblock(e)))?;
        self.held_root = 0;
        btree::delete_tree(&mut self.t, held.data_mapping_root, TOP_LEVEL)?;
        btree::delete_tree(&mut self.t, held.device_details_root, DETAILS)?;
        self.t.dec_meta(h)?;
        self.changed = true;
        self.commit(sync_data)?;
        Ok(())
    }

    /// The committed superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }
}
