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

mod commit;
mod devices;
mod diff;
mod mapping;
mod restore;
mod rollback;
mod usage;

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
pub use commit::PreparedCommit;
pub use diff::{
    diff_committed, diff_step_in, diff_walk_in, DeltaKind, DeltaRun, DiffOptions, DiffStats, DiffWalk, HeldMappings,
    HELD_FOR_DIFF,
};

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
    /// Transaction id.
    pub transaction_id: u64,
    /// Pool time.
    pub time: u32,
    /// Data block size in sectors.
    pub data_block_sectors: u32,
    /// Data blocks in the pool.
    pub data_total_blocks: u64,
    /// Data blocks in use.
    pub data_used_blocks: u64,
    /// Metadata blocks.
    pub metadata_total_blocks: u64,
    /// Metadata blocks in use.
    pub metadata_used_blocks: u64,
    /// Held metadata snapshot (0: none).
    pub held_root: u64,
    /// The needs_check flag.
    pub needs_check: bool,
    /// What the pool can do now (dm-thin's vocabulary).
    pub mode: PoolMode,
}

/// A pool's mode, in dm-thin's words (`dmsetup status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// Reads and writes work.
    ReadWrite,
    /// Every data block is in use: writes that need a new block fail (or wait).
    OutOfDataSpace,
    /// Free metadata is down to the reserve: changes that need new metadata fail;
    /// reads, writes to mapped unshared blocks, discards, deletes and commits work.
    OutOfMetadataSpace,
    /// Open read-only.
    ReadOnly,
    /// A metadata write failed: nothing more is accepted until the pool is reopened.
    Fail,
}

impl PoolMode {
    /// The word `dmsetup status` and `thinctl status` print.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::ReadWrite => "rw",
            PoolMode::OutOfDataSpace => "out-of-data-space",
            PoolMode::OutOfMetadataSpace => "out-of-metadata-space",
            PoolMode::ReadOnly => "ro",
            PoolMode::Fail => "fail",
        }
    }
}

/// How much metadata an operation may need, and whether it may use the reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaNeed {
    /// An operation that adds metadata (a new mapping, device or snapshot): it must
    /// leave the whole reserve free.
    Grow(u64),
    /// An operation that frees space (discard, delete): it may use the reserve but
    /// the commit's share of it.
    Shrink(u64),
}

/// Per-device details (public view).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id.
    pub id: DevId,
    /// Virtual blocks mapped.
    pub mapped_blocks: u64,
    /// Transaction id.
    pub transaction_id: u64,
    /// Pool time at creation.
    pub creation_time: u32,
    /// Pool time of the last snapshot involving it.
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
    /// The last metadata need refused (what `mode` tests again), if any.
    last_refused: std::cell::Cell<Option<u64>>,
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
            last_refused: Default::default(),
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
            last_refused: Default::default(),
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
            mode: self.mode(),
        }
    }

    /// Metadata blocks allocatable now, in all, and kept in reserve.
    pub fn metadata_room(&self) -> (u64, u64, u64) {
        let m = self.t.meta_counts();
        (m.nr_allocatable(), m.nr_blocks(), self.t.meta_reserve())
    }

    /// The pool's mode now.
    pub fn mode(&self) -> PoolMode {
        if self.t.is_poisoned() {
            PoolMode::Fail
        } else if self.read_only || self.sb.flags & superblock::FLAG_NEEDS_CHECK != 0 {
            PoolMode::ReadOnly
        } else if self.room_for(MetaNeed::Grow(self.last_refused.get().unwrap_or(1))).is_err() {
            PoolMode::OutOfMetadataSpace
        } else if self.t.data_counts().nr_allocated() >= self.t.data_counts().nr_blocks() {
            PoolMode::OutOfDataSpace
        } else {
            PoolMode::ReadWrite
        }
    }

    /// Is there room for an operation needing `need` metadata blocks? Refusing
    /// before anything changes is what keeps a full metadata area from poisoning
    /// the pool: an operation that passed never runs out half way.
    pub fn ensure_metadata(&self, need: MetaNeed) -> Result<(), PoolError> {
        let r = self.room_for(need);
        if let MetaNeed::Grow(n) = need {
            self.last_refused.set(r.is_err().then_some(n));
        }
        r
    }

    fn room_for(&self, need: MetaNeed) -> Result<(), PoolError> {
        let have = self.t.meta_counts().nr_allocatable();
        let (keep, n) = match need {
            MetaNeed::Grow(n) => (self.t.meta_reserve(), n),
            MetaNeed::Shrink(n) => (self.t.commit_share(), n),
        };
        if have < keep.saturating_add(n) {
            return Err(MetaError::NoMetadataSpace { nr_blocks: self.t.meta_counts().nr_blocks() }.into());
        }
        Ok(())
    }

    /// Metadata blocks one change to a device's mappings may take at worst: a path
    /// through the top-level tree and through the device's tree shadowed, and every
    /// node on both split once.
    pub fn mapping_change_cost(&mut self, id: DevId) -> Result<u64, PoolError> {
        let root = self.dev(id)?.root;
        let levels =
            btree::depth(&mut self.t, root, MAPPING)? + btree::depth(&mut self.t, self.mapping_root, TOP_LEVEL)?;
        Ok(2 * (levels + 2))
    }

    /// Reference count of a data block (tests and tools).
    pub fn data_ref_count(&self, b: u64) -> u32 {
        self.t.data_counts().get(b)
    }

    /// Hold data block `b` back from allocation until [`Metadata::unreserve_data_block`],
    /// if it is free both in the current transaction and in the last commit (so
    /// nothing, durable or not, uses its bytes): true when it is held.
    pub fn reserve_data_block(&mut self, b: u64) -> bool {
        self.t.data_counts_mut().reserve(b)
    }

    /// Let a block held by [`Metadata::reserve_data_block`] be allocated again.
    pub fn unreserve_data_block(&mut self, b: u64) {
        self.t.data_counts_mut().unreserve(b);
    }

    /// Data blocks held back by [`Metadata::reserve_data_block`].
    pub fn data_blocks_reserved(&self) -> u64 {
        self.t.data_counts().nr_reserved()
    }

    /// Reference count of a metadata block (tests and tools).
    pub fn meta_ref_count(&self, b: u64) -> u32 {
        self.t.meta_counts().get(b)
    }

    /// The data space map's reuse counter (see [`RefCounts::reuses`]).
    pub fn data_reuses(&self) -> u64 {
        self.t.data_counts().reuses()
    }

    /// Data blocks with count 0. Blocks freed by the current transaction are included
    /// although they become allocatable only once it commits.
    pub fn data_free_now(&self) -> u64 {
        self.t.data_counts().nr_free()
    }

    fn dev(&self, id: DevId) -> Result<&Device, PoolError> {
        self.devices.get(&id).ok_or(PoolError::NoSuchDevice(id))
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
