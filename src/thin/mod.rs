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

use crate::btree::{self, Replace, Values};
use crate::error::{Corruption, MetaError, PoolError};
use crate::format::checksum::BlockKind;
use crate::format::space_map::{SmRoot, ENTRIES_PER_BITMAP};
use crate::format::superblock::{self, Superblock};
use crate::format::values::{pack_block_time, unpack_block_time, DeviceDetails, MAX_TIME};
use crate::format::{MAX_DATA_BLOCKS, MAX_DEV_ID, MAX_METADATA_BLOCKS};
use crate::io::MetaStorage;
use crate::space_map::disk::{SpaceMaps, REF_COUNTS, SM_INDEX};
use crate::space_map::RefCounts;
use crate::transaction::Txn;

pub use crate::units::DevId;

/// Bottom-level mapping trees: `block_time` values, each a reference on a data block.
pub const MAPPING: Values = Values::DataRefs { data_block: |v| unpack_block_time(btree::u64_of(v)).0 };
/// The top-level mapping tree: device id -> root of the device's mapping tree.
pub const TOP_LEVEL: Values = Values::Subtrees { inner: &MAPPING };
/// The device-details tree: 24-byte `DeviceDetails` values.
pub const DETAILS: Values = Values::Plain(24);

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
    sms: SpaceMaps,
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
        t.set_committing(true);
        let mapping_root = btree::empty(&mut t, TOP_LEVEL)?;
        let details_root = btree::empty(&mut t, DETAILS)?;
        let sms = SpaceMaps::format(&mut t)?;
        t.set_committing(false);
        let sb = Superblock {
            magic: superblock::MAGIC,
            version: superblock::VERSION,
            data_block_size: data_block_sectors,
            metadata_block_size: superblock::METADATA_BLOCK_SECTORS,
            metadata_nr_blocks: nr_meta,
            ..Default::default()
        };
        let mut md = Metadata {
            t,
            read_only: false,
            sb,
            time: 0,
            trans_id: 0,
            held_root: 0,
            mapping_root,
            details_root,
            sms,
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

        let sms = SpaceMaps::load(&mut t, &sb)?;
        // Devices.
        let mut roots: BTreeMap<u64, u64> = BTreeMap::new();
        btree::visit(&mut t, sb.data_mapping_root, TOP_LEVEL, 0, u64::MAX, &mut |k, v| {
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
            sms,
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
            data_total_blocks: self.t.data_counts().nr_blocks(),
            data_used_blocks: self.t.data_counts().nr_allocated(),
            metadata_total_blocks: self.t.meta_counts().nr_blocks(),
            metadata_used_blocks: self.t.meta_counts().nr_allocated(),
            held_root: self.held_root,
            needs_check: self.sb.flags & superblock::FLAG_NEEDS_CHECK != 0,
        }
    }

    /// Reference count of a data block (tests and tools).
    pub fn data_ref_count(&self, b: u64) -> u32 {
        self.t.data_counts().get(b)
    }

    /// Reference count of a metadata block (tests and tools).
    pub fn meta_ref_count(&self, b: u64) -> u32 {
        self.t.meta_counts().get(b)
    }

    /// Bumped whenever a data block may become reusable: compare it before and after
    /// using a data block number outside the pool's lock.
    pub fn data_reuse_epoch(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.t.data_counts().reuse_epoch()
    }

    /// Data blocks with count 0. Blocks freed by the current transaction are included
    /// although they become allocatable only once it commits.
    pub fn data_free_now(&self) -> u64 {
        self.t.data_counts().nr_free()
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
        if d.root != d.root_in_tree {
            self.set_top_level(id, d.root)?;
        }
        self.mapping_root = btree::remove(&mut self.t, self.mapping_root, id as u64, TOP_LEVEL)?.0;
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
    fn set_top_level(&mut self, id: DevId, root: u64) -> Result<(), PoolError> {
        self.mapping_root =
            btree::insert(&mut self.t, self.mapping_root, id as u64, &root.to_le_bytes(), TOP_LEVEL, Replace::Raw)?
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
        self.map(id, vblock, data_block, self.time)
    }

    /// Insert (vblock -> data_block @ time) into the device's tree, keeping
    /// mapped_blocks; the data block's reference is the caller's.
    fn map(&mut self, id: DevId, vblock: u64, data_block: u64, time: u32) -> Result<(), PoolError> {
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
        self.dev(id)?;
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
        self.t.write_dirty()?;
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
        let blk = sb.encode(0);
        self.t.write_through(0, &blk)?;
        self.t.sync()?;
        self.sb = sb;
        self.t.set_committing(false);
        self.t.end_transaction();
        self.sms.end_transaction();
        let released_data = self.t.data_counts_mut().commit().released;
        self.t.meta_counts_mut().commit();
        self.changed = false;
        Ok(Committed { released_data })
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
        self.t.meta_counts_mut().inc(self.sb.data_mapping_root)?;
        self.t.meta_counts_mut().inc(self.sb.device_details_root)?;
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

impl Metadata {
    /// What a recount of every reference needs: the transaction manager and the
    /// roots it must start from (see [`crate::check::audit`]).
    pub fn recount_view(&mut self) -> (&mut Txn, RecountRoots) {
        let roots = RecountRoots {
            held_root: self.held_root,
            mapping_root: self.mapping_root,
            details_root: self.details_root,
            device_roots: self.devices.iter().map(|(&id, d)| (id, (d.root, d.details.mapped_blocks))).collect(),
            space_map_trees: vec![
                (self.sms.data_index_root, SM_INDEX),
                (self.sms.data_ref_root, REF_COUNTS),
                (self.sms.meta_ref_root, REF_COUNTS),
            ],
            space_map_blocks: self.sms.own_blocks().collect(),
        };
        (&mut self.t, roots)
    }
}

/// The roots of everything that holds references in the current transaction.
#[derive(Debug, Clone)]
pub struct RecountRoots {
    /// The held metadata snapshot's superblock (0: none).
    pub held_root: u64,
    /// Top-level mapping tree.
    pub mapping_root: u64,
    /// Device-details tree.
    pub details_root: u64,
    /// Each device's current mapping root (which may differ from the top-level
    /// tree's entry until commit) and its `mapped_blocks`.
    pub device_roots: BTreeMap<DevId, (u64, u64)>,
    /// Space-map trees with their values.
    pub space_map_trees: Vec<(u64, Values)>,
    /// Bitmaps and the index block.
    pub space_map_blocks: Vec<u64>,
}
