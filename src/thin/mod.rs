//! Pool metadata: the superblock, thin devices and their mappings, and commits.
//!
//! This layer owns the transaction manager and knows the shape of a dm-thin pool:
//! a two-level mapping tree (device id -> bottom-level tree of virtual block ->
//! block_time), a device-details tree, and two space maps whose on-disk form (bitmaps,
//! index, overflow ref-count trees) is written at commit from the in-memory counts,
//! repeating until the metadata blocks used to write them are themselves counted
//! (spec §5.11, "fixed point at commit").
//!
//! Device details and each device's current bottom-level root are kept in memory
//! and written into their trees at commit, as the kernel does for details. Before a
//! device's tree is first changed in a transaction its top-level entry is shadowed,
//! so a top-level leaf shared with a held metadata snapshot is copied (and its
//! subtree roots incremented) before the subtree root itself is shadowed.

use std::collections::{BTreeMap, HashMap};

use crate::btree::{self, Replace, Values, DETAILS, REF_COUNTS, SM_INDEX};
use crate::error::{Corruption, MetaError, PoolError};
use crate::format::checksum::BlockKind;
use crate::format::space_map::{self as fsm, IndexEntry, SmRoot, ENTRIES_PER_BITMAP};
use crate::format::superblock::{self, Superblock};
use crate::format::values::{pack_block_time, unpack_block_time, DeviceDetails, MAX_TIME};
use crate::format::{MAX_DATA_BLOCKS, MAX_DEV_ID, MAX_METADATA_BLOCKS};
use crate::io::MetaStorage;
use crate::space_map::RefCounts;
use crate::transaction::Txn;

pub use crate::units::DevId;

/// A mapped virtual block as stored: where it lives and when it was mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedBlock {
    /// The virtual block.
    pub vblock: u64,
    /// The data block holding it.
    pub data_block: u64,
    /// Pool time when the mapping was made.
    pub time: u32,
}

/// One mapping of a virtual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The data block holding the virtual block.
    pub data_block: u64,
    /// Pool time when the mapping was made.
    pub time: u32,
    /// The block may be shared with a snapshot (kernel rule: `snapshotted_time > time`).
    pub shared: bool,
}

#[derive(Debug, Clone)]
struct Device {
    root: u64,
    root_in_tree: u64,
    details: DeviceDetails,
    details_dirty: bool,
    touched: bool,
}

/// Summary numbers of the pool (like `dmsetup status` of a thin-pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub transaction_id: u64,
    pub time: u32,
    pub data_block_sectors: u32,
    pub data_total_blocks: u64,
    pub data_used_blocks: u64,
    pub metadata_total_blocks: u64,
    pub metadata_used_blocks: u64,
    pub held_root: u64,
    pub needs_check: bool,
}

/// Per-device details (public view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: DevId,
    pub mapped_blocks: u64,
    pub transaction_id: u64,
    pub creation_time: u32,
    pub snapshotted_time: u32,
}

/// What a commit did.
#[derive(Debug, Default)]
pub struct Committed {
    /// Data blocks that were in use before this commit and are free now.
    pub released_data: Vec<u64>,
}

/// An open pool's metadata.
pub struct Metadata {
    t: Txn,
    read_only: bool,
    sb: Superblock,
    time: u32,
    trans_id: u64,
    held_root: u64,
    mapping_root: u64,
    details_root: u64,
    data_index_root: u64,
    data_ref_root: u64,
    data_bitmaps: Vec<u64>,
    meta_bitmaps: Vec<u64>,
    meta_ref_root: u64,
    meta_index_loc: u64,
    index_shadowed: bool,
    devices: BTreeMap<DevId, Device>,
    changed: bool,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("trans_id", &self.trans_id)
            .field("time", &self.time)
            .field("devices", &self.devices.len())
            .finish()
    }
}

fn sm_err(what: String) -> Corruption {
    Corruption::SpaceMap(what)
}

impl Metadata {
    /// Format `storage` as a new, empty pool with `nr_data_blocks` data blocks of
    /// `data_block_sectors` sectors, and commit it.
    pub fn format(
        storage: Box<dyn MetaStorage>,
        data_block_sectors: u32,
        nr_data_blocks: u64,
    ) -> Result<Metadata, PoolError> {
        if !crate::format::valid_data_block_sectors(data_block_sectors) {
            return Err(PoolError::invalid(format!(
                "data block size {data_block_sectors} sectors: must be a multiple of 128 between 128 and 2097152"
            )));
        }
        if nr_data_blocks > MAX_DATA_BLOCKS {
            return Err(PoolError::invalid(format!("{nr_data_blocks} data blocks: more than 2^40")));
        }
        let nr_meta = storage.nr_blocks().min(MAX_METADATA_BLOCKS);
        if nr_meta < 64 {
            return Err(PoolError::invalid(format!(
                "metadata device of {nr_meta} blocks is too small (at least 64 blocks of 4 KiB)"
            )));
        }
        let mut meta = RefCounts::new("metadata", nr_meta);
        meta.inc(0)?;
        meta.mark_all_dirty();
        let mut data = RefCounts::new("data", nr_data_blocks);
        data.mark_all_dirty();
        let mut t = Txn::new(storage, meta, data);
        t.committing = true;
        let mapping_root = btree::empty(&mut t, Values::Subtrees)?;
        let details_root = btree::empty(&mut t, DETAILS)?;
        let data_index_root = btree::empty(&mut t, SM_INDEX)?;
        let data_ref_root = btree::empty(&mut t, REF_COUNTS)?;
        let meta_ref_root = btree::empty(&mut t, REF_COUNTS)?;
        t.committing = false;
        let sb = Superblock {
            magic: superblock::MAGIC,
            version: superblock::VERSION,
            data_block_size: data_block_sectors,
            metadata_block_size: superblock::METADATA_BLOCK_SECTORS,
            metadata_nr_blocks: nr_meta,
            ..Default::default()
        };
        let mut md = Metadata {
            data_bitmaps: vec![0; t.data.nr_bitmaps() as usize],
            meta_bitmaps: vec![0; t.meta.nr_bitmaps() as usize],
            t,
            read_only: false,
            sb,
            time: 0,
            trans_id: 0,
            held_root: 0,
            mapping_root,
            details_root,
            data_index_root,
            data_ref_root,
            meta_ref_root,
            meta_index_loc: 0,
            index_shadowed: false,
            devices: BTreeMap::new(),
            changed: true,
        };
        md.commit(&mut || Ok(()))?;
        Ok(md)
    }

    /// Open existing metadata. Everything read is validated; a damaged block is an
    /// error naming the block.
    pub fn open(storage: Box<dyn MetaStorage>, read_only: bool) -> Result<Metadata, PoolError> {
        let dev_blocks = storage.nr_blocks();
        if dev_blocks == 0 {
            return Err(MetaError::corrupt(0, Corruption::PastEnd { nr_blocks: 0 }).into());
        }
        let mut raw = crate::format::zeroed_block();
        storage.read_block(0, &mut raw).map_err(MetaError::Io)?;
        if raw.iter().all(|&b| b == 0) {
            return Err(PoolError::invalid("the metadata device is not formatted (block 0 is all zeros)"));
        }
        let sb = Superblock::decode(&raw, 0).map_err(|e| MetaError::corrupt(0, Corruption::Superblock(e)))?;
        if !read_only && sb.flags & superblock::FLAG_NEEDS_CHECK != 0 {
            return Err(PoolError::invalid(
                "the metadata has the needs_check flag set: check and repair it first (thin_check --clear-needs-check-flag)",
            ));
        }
        let msm = sb.metadata_sm_root;
        let dsm = sb.data_sm_root;
        if msm.nr_blocks > dev_blocks || msm.nr_blocks > MAX_METADATA_BLOCKS || msm.nr_blocks == 0 {
            return Err(MetaError::corrupt(
                0,
                sm_err(format!("metadata space map has {} blocks but the device holds {dev_blocks}", msm.nr_blocks)),
            )
            .into());
        }
        let nr_meta = msm.nr_blocks;
        // Bitmaps are metadata blocks, so a valid data space map cannot have more
        // bitmaps than there are metadata blocks: this bounds the allocation below.
        let data_bitmaps_n = dsm.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
        if dsm.nr_blocks > MAX_DATA_BLOCKS || data_bitmaps_n > nr_meta {
            return Err(MetaError::corrupt(0, sm_err(format!("data space map claims {} blocks", dsm.nr_blocks))).into());
        }
        // A temporary manager to read the trees; its counts are replaced below.
        let mut t = Txn::new(storage, RefCounts::new("metadata", nr_meta), RefCounts::new("data", 0));

        // Metadata space map: index block, bitmaps, overflow tree.
        let meta_index_loc = msm.bitmap_root;
        let entries = {
            let blk = t.index_block(meta_index_loc)?;
            fsm::index_decode(blk, meta_index_loc)
                .map_err(|e| MetaError::corrupt(meta_index_loc, Corruption::Index(e)))?
        };
        let meta_bitmaps_n = nr_meta.div_ceil(ENTRIES_PER_BITMAP) as usize;
        let meta_bitmaps: Vec<u64> = entries[..meta_bitmaps_n].iter().map(|e| e.blocknr).collect();
        let meta_counts = load_counts(&mut t, "metadata", nr_meta, &meta_bitmaps, msm.ref_count_root, meta_index_loc)?;

        // Data space map: index tree, bitmaps, overflow tree.
        let mut index: Vec<Option<IndexEntry>> = vec![None; data_bitmaps_n as usize];
        let idx_root = dsm.bitmap_root;
        btree::visit(&mut t, idx_root, SM_INDEX, 0, u64::MAX, &mut |k, v| match index.get_mut(k as usize) {
            Some(slot) => {
                *slot = Some(IndexEntry::decode(v));
                Ok(())
            }
            None => Err(MetaError::corrupt(
                idx_root,
                sm_err(format!("data space-map index has an entry for bitmap {k} of {data_bitmaps_n}")),
            )),
        })?;
        let mut data_bitmaps = Vec::with_capacity(index.len());
        for (i, e) in index.iter().enumerate() {
            match e {
                Some(e) => data_bitmaps.push(e.blocknr),
                None => {
                    return Err(
                        MetaError::corrupt(idx_root, sm_err(format!("data space-map index lacks bitmap {i}"))).into()
                    )
                }
            }
        }
        let data_counts = load_counts(&mut t, "data", dsm.nr_blocks, &data_bitmaps, dsm.ref_count_root, idx_root)?;
        t.meta = meta_counts;
        t.data = data_counts;

        // Devices.
        let mut roots: BTreeMap<u64, u64> = BTreeMap::new();
        btree::visit(&mut t, sb.data_mapping_root, Values::Subtrees, 0, u64::MAX, &mut |k, v| {
            roots.insert(k, u64::from_le_bytes(v[..8].try_into().unwrap_or_default()));
            Ok(())
        })?;
        let mut details: BTreeMap<u64, DeviceDetails> = BTreeMap::new();
        btree::visit(&mut t, sb.device_details_root, DETAILS, 0, u64::MAX, &mut |k, v| {
            details.insert(k, DeviceDetails::decode(v));
            Ok(())
        })?;
        let mut devices = BTreeMap::new();
        for (&id, &root) in &roots {
            let d = details.get(&id).copied().ok_or_else(|| {
                MetaError::corrupt(
                    sb.device_details_root,
                    Corruption::Tree(format!("thin device {id} has mappings but no details")),
                )
            })?;
            if id > MAX_DEV_ID {
                return Err(MetaError::corrupt(
                    sb.data_mapping_root,
                    Corruption::Tree(format!("thin device id {id} exceeds 24 bits")),
                )
                .into());
            }
            devices.insert(
                id as DevId,
                Device { root, root_in_tree: root, details: d, details_dirty: false, touched: false },
            );
        }
        if let Some((&id, _)) = details.iter().find(|(id, _)| !roots.contains_key(id)) {
            return Err(MetaError::corrupt(
                sb.data_mapping_root,
                Corruption::Tree(format!("thin device {id} has details but no mapping tree")),
            )
            .into());
        }
        Ok(Metadata {
            t,
            read_only,
            time: sb.time,
            trans_id: sb.trans_id,
            held_root: sb.held_root,
            mapping_root: sb.data_mapping_root,
            details_root: sb.device_details_root,
            data_index_root: idx_root,
            data_ref_root: dsm.ref_count_root,
            data_bitmaps,
            meta_bitmaps,
            meta_ref_root: msm.ref_count_root,
            meta_index_loc,
            index_shadowed: false,
            devices,
            changed: false,
            sb,
        })
    }

    fn writable(&self) -> Result<(), PoolError> {
        if self.read_only {
            return Err(PoolError::ReadOnly);
        }
        Ok(())
    }

    /// Data block size in 512-byte sectors.
    pub fn data_block_sectors(&self) -> u32 {
        self.sb.data_block_size
    }

    /// Pool time.
    pub fn time(&self) -> u32 {
        self.time
    }

    /// Ids of every thin device, ascending.
    pub fn device_ids(&self) -> Vec<DevId> {
        self.devices.keys().copied().collect()
    }

    /// Does the device exist?
    pub fn has_device(&self, id: DevId) -> bool {
        self.devices.contains_key(&id)
    }

    /// Details of one device.
    pub fn device_info(&self, id: DevId) -> Result<DeviceInfo, PoolError> {
        let d = self.devices.get(&id).ok_or(PoolError::NoSuchDevice(id))?;
        Ok(DeviceInfo {
            id,
            mapped_blocks: d.details.mapped_blocks,
            transaction_id: d.details.transaction_id,
            creation_time: d.details.creation_time,
            snapshotted_time: d.details.snapshotted_time,
        })
    }

    /// Pool status numbers.
    pub fn status(&self) -> Status {
        Status {
            transaction_id: self.trans_id,
            time: self.time,
            data_block_sectors: self.sb.data_block_size,
            data_total_blocks: self.t.data.nr_blocks(),
            data_used_blocks: self.t.data.nr_allocated(),
            metadata_total_blocks: self.t.meta.nr_blocks(),
            metadata_used_blocks: self.t.meta.nr_allocated(),
            held_root: self.held_root,
            needs_check: self.sb.flags & superblock::FLAG_NEEDS_CHECK != 0,
        }
    }

    /// Reference count of a data block (tests and tools).
    pub fn data_ref_count(&self, b: u64) -> u32 {
        self.t.data.get(b)
    }

    /// Reference count of a metadata block (tests and tools).
    pub fn meta_ref_count(&self, b: u64) -> u32 {
        self.t.meta.get(b)
    }

    /// Bumped whenever a data block may become reusable: compare it before and after
    /// using a data block number outside the pool's lock.
    pub fn data_reuse_epoch(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.t.data.reuse_epoch()
    }

    /// Data blocks with count 0. Blocks freed by the current transaction are included
    /// although they become allocatable only once it commits.
    pub fn data_free_now(&self) -> u64 {
        self.t.data.nr_free()
    }

    fn dev(&self, id: DevId) -> Result<&Device, PoolError> {
        self.devices.get(&id).ok_or(PoolError::NoSuchDevice(id))
    }

    fn check_id(id: u64) -> Result<DevId, PoolError> {
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
        let root = btree::empty(&mut self.t, Values::Mapping)?;
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
        if self.time >= MAX_TIME {
            return Err(PoolError::TimeExhausted);
        }
        self.t.meta.inc(o.root)?;
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
        if d.root != d.root_in_tree {
            self.set_top_level(id, d.root)?;
        }
        self.mapping_root = btree::remove(&mut self.t, self.mapping_root, id as u64, Values::Subtrees)?.0;
        self.details_root = btree::remove(&mut self.t, self.details_root, id as u64, DETAILS)?.0;
        self.devices.remove(&id);
        self.changed = true;
        Ok(())
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

    /// Look up a virtual block.
    pub fn lookup(&mut self, id: DevId, vblock: u64) -> Result<Option<Mapping>, PoolError> {
        let d = self.dev(id)?;
        let (root, stime) = (d.root, d.details.snapshotted_time);
        let Some(v) = btree::lookup_u64(&mut self.t, root, vblock, Values::Mapping)? else { return Ok(None) };
        let (data_block, time) = unpack_block_time(v);
        if data_block >= self.t.data.nr_blocks() {
            return Err(MetaError::corrupt(
                root,
                Corruption::Tree(format!(
                    "device {id} maps virtual block {vblock} to data block {data_block}, past the end of the data device ({} blocks)",
                    self.t.data.nr_blocks()
                )),
            )
            .into());
        }
        Ok(Some(Mapping { data_block, time, shared: stime > time }))
    }

    /// The first mapped virtual block at or after `vblock`, with its data block.
    pub fn next_mapped(&mut self, id: DevId, vblock: u64) -> Result<Option<(u64, u64)>, PoolError> {
        let root = self.dev(id)?.root;
        Ok(btree::next_at_or_after(&mut self.t, root, vblock, Values::Mapping)?
            .map(|(k, v)| (k, unpack_block_time(v).0)))
    }

    /// Every mapping of a device with `lo <= vblock < hi`, in order.
    pub fn mappings(&mut self, id: DevId, lo: u64, hi: u64) -> Result<Vec<MappedBlock>, PoolError> {
        let root = self.dev(id)?.root;
        let mut out = Vec::new();
        btree::visit(&mut self.t, root, Values::Mapping, lo, hi, &mut |k, v| {
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
    fn set_top_level(&mut self, id: DevId, root: u64) -> Result<(), PoolError> {
        self.mapping_root = btree::insert(
            &mut self.t,
            self.mapping_root,
            id as u64,
            &root.to_le_bytes(),
            Values::Subtrees,
            Replace::Raw,
        )?
        .root;
        Ok(())
    }

    fn touch(&mut self, id: DevId) -> Result<u64, PoolError> {
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
        Ok(self.t.data.alloc())
    }

    /// Drop a reference to a data block obtained from [`Metadata::alloc_data_block`]
    /// that was not used.
    pub fn release_data_block(&mut self, b: u64) -> Result<(), PoolError> {
        self.t.data.dec(b)?;
        Ok(())
    }

    /// Are there free data blocks that only a commit would make allocatable?
    pub fn commit_would_free_data(&self) -> bool {
        self.t.data.nr_free() > 0
    }

    /// Map `vblock` of device `id` to `data_block` (whose reference the caller hands
    /// over), at the current pool time. The old mapping's block loses a reference.
    pub fn insert_mapping(&mut self, id: DevId, vblock: u64, data_block: u64) -> Result<(), PoolError> {
        self.writable()?;
        self.map(id, vblock, data_block, self.time)
    }

    /// Insert (vblock -> data_block @ time) into the device's tree, keeping
    /// mapped_blocks; the data block's reference is the caller's.
    fn map(&mut self, id: DevId, vblock: u64, data_block: u64, time: u32) -> Result<(), PoolError> {
        let root = self.touch(id)?;
        let v = pack_block_time(data_block, time);
        let r = btree::insert(&mut self.t, root, vblock, &v.to_le_bytes(), Values::Mapping, Replace::DecOld)?;
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
        if btree::lookup(&mut self.t, root, vblock, Values::Mapping)?.is_none() {
            return Ok(false);
        }
        let root = self.touch(id)?;
        let (r, old) = btree::remove(&mut self.t, root, vblock, Values::Mapping)?;
        let d = self.devices.get_mut(&id).ok_or(PoolError::NoSuchDevice(id))?;
        d.root = r;
        if old.is_some() {
            d.details.mapped_blocks = d.details.mapped_blocks.saturating_sub(1);
        }
        d.details_dirty = true;
        self.changed = true;
        Ok(old.is_some())
    }

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
        if data_block >= self.t.data.nr_blocks() {
            return Err(PoolError::invalid(format!(
                "data block {data_block} is past the end of the pool ({} blocks)",
                self.t.data.nr_blocks()
            )));
        }
        if time > MAX_TIME {
            return Err(PoolError::invalid(format!("mapping time {time} exceeds 24 bits")));
        }
        self.dev(id)?;
        self.t.data.inc(data_block)?;
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

    /// Grow the data space map to `nr_blocks` (the data device grew).
    pub fn extend_data(&mut self, nr_blocks: u64) -> Result<(), PoolError> {
        self.writable()?;
        if nr_blocks < self.t.data.nr_blocks() {
            return Err(PoolError::invalid("the data space map cannot shrink"));
        }
        if nr_blocks > MAX_DATA_BLOCKS {
            return Err(PoolError::invalid("more than 2^40 data blocks"));
        }
        if nr_blocks > self.t.data.nr_blocks() {
            self.t.data.extend(nr_blocks);
            self.data_bitmaps.resize(self.t.data.nr_bitmaps() as usize, 0);
            self.changed = true;
        }
        Ok(())
    }

    /// Grow the metadata space map to the device's size (capped at the format limit).
    pub fn extend_metadata(&mut self) -> Result<(), PoolError> {
        self.writable()?;
        let n = self.t.device_blocks().min(MAX_METADATA_BLOCKS);
        if n > self.t.meta.nr_blocks() {
            self.t.meta.extend(n);
            self.meta_bitmaps.resize(self.t.meta.nr_bitmaps() as usize, 0);
            self.changed = true;
        }
        Ok(())
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
        sync_data().map_err(PoolError::DataIo)?;
        self.t.committing = true;
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
        self.write_space_maps()?;
        self.t.write_dirty()?;
        let sb = Superblock {
            time: self.time,
            trans_id: self.trans_id,
            held_root: self.held_root,
            data_sm_root: SmRoot {
                nr_blocks: self.t.data.nr_blocks(),
                nr_allocated: self.t.data.nr_allocated(),
                bitmap_root: self.data_index_root,
                ref_count_root: self.data_ref_root,
            },
            metadata_sm_root: SmRoot {
                nr_blocks: self.t.meta.nr_blocks(),
                nr_allocated: self.t.meta.nr_allocated(),
                bitmap_root: self.meta_index_loc,
                ref_count_root: self.meta_ref_root,
            },
            data_mapping_root: self.mapping_root,
            device_details_root: self.details_root,
            ..self.sb.clone()
        };
        let blk = sb.encode(0);
        self.t.write_through(0, &blk)?;
        self.t.sync()?;
        self.sb = sb;
        self.t.committing = false;
        self.t.end_transaction();
        self.index_shadowed = false;
        let released_data = self.t.data.commit().released;
        self.t.meta.commit();
        self.changed = false;
        Ok(Committed { released_data })
    }

    /// Write bitmaps, index entries and overflow trees of both space maps until
    /// writing them changes no count.
    fn write_space_maps(&mut self) -> Result<(), MetaError> {
        for _round in 0..64 {
            let mut did = false;
            for i in self.t.data.take_dirty_bitmaps() {
                did = true;
                let loc = self.place_bitmap(self.data_bitmaps[i as usize])?;
                self.data_bitmaps[i as usize] = loc;
                let blk = fsm::bitmap_encode(self.t.data.bitmap_values(i));
                self.t.put(loc, blk, BlockKind::Bitmap, 0);
                let e = self.t.data.index_entry(i, loc);
                self.data_index_root =
                    btree::insert(&mut self.t, self.data_index_root, i, &e.encode(), SM_INDEX, Replace::Raw)?.root;
            }
            for b in self.t.data.take_dirty_overflow() {
                did = true;
                self.data_ref_root = sync_overflow(&mut self.t, self.data_ref_root, b, true)?;
            }
            for i in self.t.meta.take_dirty_bitmaps() {
                did = true;
                let loc = self.place_bitmap(self.meta_bitmaps[i as usize])?;
                self.meta_bitmaps[i as usize] = loc;
                let blk = fsm::bitmap_encode(self.t.meta.bitmap_values(i));
                self.t.put(loc, blk, BlockKind::Bitmap, 0);
            }
            for b in self.t.meta.take_dirty_overflow() {
                did = true;
                self.meta_ref_root = sync_overflow(&mut self.t, self.meta_ref_root, b, false)?;
            }
            if !self.index_shadowed {
                did = true;
                let old = self.meta_index_loc;
                self.meta_index_loc = self.place_bitmap(old)?;
                self.index_shadowed = true;
            }
            // Bitmaps written earlier in this round may have changed again.
            if !did && !self.t.meta.is_dirty() && !self.t.data.is_dirty() {
                let entries: Vec<IndexEntry> = (0..self.t.meta.nr_bitmaps())
                    .map(|i| self.t.meta.index_entry(i, self.meta_bitmaps[i as usize]))
                    .collect();
                let blk = fsm::index_encode(&entries, self.meta_index_loc);
                self.t.put(self.meta_index_loc, blk, BlockKind::Index, 0);
                return Ok(());
            }
        }
        Err(MetaError::corrupt(0, sm_err("space maps did not settle while committing".into())))
    }

    /// Location for a space-map block now at `old` (0 = none yet): in place when it was
    /// already written in this transaction, else a new block (the old one is released).
    fn place_bitmap(&mut self, old: u64) -> Result<u64, MetaError> {
        if old != 0 && self.t.is_writable(old) {
            return Ok(old);
        }
        let loc = self.t.alloc_meta()?;
        if old != 0 {
            self.t.dec_meta(old)?;
        }
        Ok(loc)
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
        let h = self.t.alloc_meta()?;
        let copy = Superblock {
            data_sm_root: SmRoot::default(),
            metadata_sm_root: SmRoot::default(),
            held_root: 0,
            ..self.sb.clone()
        };
        self.t.put(h, copy.encode(h), BlockKind::Superblock, 0);
        self.t.meta.inc(self.sb.data_mapping_root)?;
        self.t.meta.inc(self.sb.device_details_root)?;
        self.held_root = h;
        self.changed = true;
        self.commit(sync_data)?;
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
        btree::delete_tree(&mut self.t, held.data_mapping_root, Values::Subtrees)?;
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

    /// Highest mapped virtual block of a device.
    pub fn highest_mapped(&mut self, id: DevId) -> Result<Option<u64>, PoolError> {
        let root = self.dev(id)?.root;
        let mut last = None;
        // Walk down the rightmost spine.
        let mut b = root;
        for _ in 0..btree::MAX_DEPTH {
            let blk = self.t.node(b, 8)?;
            let h = crate::format::node::header(blk);
            if h.nr_entries == 0 {
                return Ok(last);
            }
            let i = h.nr_entries as usize - 1;
            if h.is_leaf() {
                last = Some(crate::format::node::key(blk, i));
                return Ok(last);
            }
            b = crate::format::node::value_u64(blk, &h, i);
        }
        Err(MetaError::corrupt(b, Corruption::TooDeep).into())
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

/// Reference counts recomputed by walking trees.
#[derive(Debug, Default)]
struct Recount {
    meta: HashMap<u64, u32>,
    data: HashMap<u64, u32>,
    seen: std::collections::HashSet<u64>,
    mappings: u64,
}

impl Recount {
    /// Count one reference to node `b`; walk it the first time it is reached.
    /// `roots` replaces top-level leaf values (the live tree's pending roots).
    fn tree(
        &mut self,
        t: &mut Txn,
        b: u64,
        vk: Values,
        roots: Option<&BTreeMap<DevId, Device>>,
        depth: usize,
    ) -> Result<(), String> {
        if depth > btree::MAX_DEPTH {
            return Err(format!("tree through block {b} is too deep"));
        }
        *self.meta.entry(b).or_default() += 1;
        if !self.seen.insert(b) {
            return Ok(());
        }
        let blk = Box::new(*t.node(b, vk.size()).map_err(|e| e.to_string())?);
        let h = crate::format::node::header(&blk);
        for i in 0..h.nr_entries as usize {
            let key = crate::format::node::key(&blk, i);
            if !h.is_leaf() {
                self.tree(t, crate::format::node::value_u64(&blk, &h, i), vk, roots, depth + 1)?;
                continue;
            }
            match vk {
                Values::Mapping => {
                    let (d, _) = unpack_block_time(crate::format::node::value_u64(&blk, &h, i));
                    *self.data.entry(d).or_default() += 1;
                }
                Values::Subtrees => {
                    let stored = crate::format::node::value_u64(&blk, &h, i);
                    let sub = match roots {
                        Some(r) => r.get(&(key as DevId)).map(|d| d.root).unwrap_or(stored),
                        None => stored,
                    };
                    self.tree(t, sub, Values::Mapping, None, 0)?;
                }
                Values::Plain(_) => {}
            }
        }
        Ok(())
    }
}

impl Metadata {
    /// Recount every reference from the current (possibly uncommitted) trees and
    /// compare with the in-memory space maps: each metadata block's count with the
    /// references to it, each data block's count with the number of distinct
    /// bottom-level leaves mapping it, and each device's mapped_blocks with its
    /// mappings. For tests and `--paranoid` runs; it walks all metadata.
    pub fn audit(&mut self) -> Result<(), String> {
        let mut rc = Recount::default();
        rc.meta.insert(0, 1);
        if self.held_root != 0 {
            *rc.meta.entry(self.held_root).or_default() += 1;
            let raw = self.t.read_uncached(self.held_root).map_err(|e| e.to_string())?;
            let held = Superblock::decode(&raw, self.held_root).map_err(|e| e.to_string())?;
            rc.tree(&mut self.t, held.data_mapping_root, Values::Subtrees, None, 0)?;
            rc.tree(&mut self.t, held.device_details_root, DETAILS, None, 0)?;
        }
        let devices = self.devices.clone();
        rc.tree(&mut self.t, self.mapping_root, Values::Subtrees, Some(&devices), 0)?;
        rc.tree(&mut self.t, self.details_root, DETAILS, None, 0)?;
        rc.tree(&mut self.t, self.data_index_root, SM_INDEX, None, 0)?;
        rc.tree(&mut self.t, self.data_ref_root, REF_COUNTS, None, 0)?;
        rc.tree(&mut self.t, self.meta_ref_root, REF_COUNTS, None, 0)?;
        for &b in self.data_bitmaps.iter().chain(self.meta_bitmaps.iter()) {
            if b != 0 {
                *rc.meta.entry(b).or_default() += 1;
            }
        }
        if self.meta_index_loc != 0 {
            *rc.meta.entry(self.meta_index_loc).or_default() += 1;
        }
        for (id, d) in &devices {
            if !rc.seen.contains(&d.root) {
                return Err(format!("device {id}: root {} is not reachable from the top-level tree", d.root));
            }
            let mut n = 0u64;
            btree::visit(&mut self.t, d.root, Values::Mapping, 0, u64::MAX, &mut |_, _| {
                n += 1;
                Ok(())
            })
            .map_err(|e| e.to_string())?;
            if n != d.details.mapped_blocks {
                return Err(format!("device {id}: mapped_blocks {} but {n} mappings", d.details.mapped_blocks));
            }
            rc.mappings += n;
        }
        let mut used = 0;
        for b in 0..self.t.meta.nr_blocks() {
            let want = rc.meta.get(&b).copied().unwrap_or(0);
            let have = self.t.meta.get(b);
            if want != have {
                return Err(format!("metadata block {b}: count {have}, referenced {want} times"));
            }
            used += u64::from(have != 0);
        }
        if used != self.t.meta.nr_allocated() {
            return Err(format!("metadata nr_allocated {} but {used} blocks in use", self.t.meta.nr_allocated()));
        }
        let mut used = 0;
        for b in 0..self.t.data.nr_blocks() {
            let want = rc.data.get(&b).copied().unwrap_or(0);
            let have = self.t.data.get(b);
            if want != have {
                return Err(format!("data block {b}: count {have}, mapped from {want} distinct leaves"));
            }
            used += u64::from(have != 0);
        }
        if used != self.t.data.nr_allocated() || used + self.t.data.nr_free() != self.t.data.nr_blocks() {
            return Err(format!(
                "data: {used} blocks in use, nr_allocated {}, free {}, total {}",
                self.t.data.nr_allocated(),
                self.t.data.nr_free(),
                self.t.data.nr_blocks()
            ));
        }
        Ok(())
    }
}

/// Write the overflow-tree entry of block `b` from its current count.
fn sync_overflow(t: &mut Txn, root: u64, b: u64, data: bool) -> Result<u64, MetaError> {
    let v = if data { t.data.overflow_value(b) } else { t.meta.overflow_value(b) };
    match v {
        Some(c) => Ok(btree::insert(t, root, b, &c.to_le_bytes(), REF_COUNTS, Replace::Raw)?.root),
        None => Ok(btree::remove(t, root, b, REF_COUNTS)?.0),
    }
}

/// Read a space map's bitmaps and overflow tree into counts.
fn load_counts(
    t: &mut Txn,
    name: &'static str,
    nr_blocks: u64,
    bitmaps: &[u64],
    ref_root: u64,
    index_block: u64,
) -> Result<RefCounts, MetaError> {
    let mut overflow: HashMap<u64, u32> = HashMap::new();
    btree::visit(t, ref_root, REF_COUNTS, 0, u64::MAX, &mut |k, v| {
        overflow.insert(k, u32::from_le_bytes(v[..4].try_into().unwrap_or_default()));
        Ok(())
    })?;
    let mut rc = RefCounts::new(name, nr_blocks);
    for (i, &loc) in bitmaps.iter().enumerate() {
        if loc == 0 {
            return Err(MetaError::corrupt(
                index_block,
                sm_err(format!("{name} space-map index entry {i} has no bitmap block")),
            ));
        }
        let blk = t.bitmap(loc)?;
        let start = i as u64 * ENTRIES_PER_BITMAP;
        let end = (start + ENTRIES_PER_BITMAP).min(nr_blocks);
        let mut threes = Vec::new();
        for b in start..end {
            let v = fsm::bitmap_get(blk, (b - start) as usize);
            match v {
                0 => {}
                3 => threes.push(b),
                v => rc.load(b, v as u32),
            }
        }
        for b in threes {
            match overflow.get(&b) {
                Some(&c) if c >= 3 => rc.load(b, c),
                Some(&c) => {
                    return Err(MetaError::corrupt(
                        ref_root,
                        sm_err(format!("{name} ref-count tree holds {c} for block {b} (must be >= 3)")),
                    ))
                }
                None => {
                    return Err(MetaError::corrupt(
                        loc,
                        sm_err(format!("{name} block {b} has bitmap count 3 but no ref-count tree entry")),
                    ))
                }
            }
        }
    }
    Ok(rc)
}
