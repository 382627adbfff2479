//! The strict metadata checker behind `thinctl check`.
//!
//! It reads the metadata only through [`crate::format`] and a [`MetaStorage`], never
//! through the engine, and applies the union of what thin_check 0.9 and 1.x verify
//! (spec §8): checksums and blocknr of every reachable block, node structure, key
//! order inside and across nodes, parent keys, equal leaf depth, minimum fill, the
//! device-details and top-level key sets, each device's `mapped_blocks`, mapped data
//! blocks inside the data device, and every metadata and data reference count
//! recomputed from the trees (data counts are per distinct bottom-level leaf, §4.7)
//! and compared with the bitmaps and overflow trees of both space maps, leaks
//! included, plus `nr_allocated` and bitmap entries past the end.
//!
//! Trees are walked by the one walker ([`crate::btree::walk()`]) with the checking
//! visitor of `tree.rs` over nodes read straight from storage; the space maps are
//! read by the one reader of on-disk counts ([`crate::space_map::disk::read_counts`])
//! in `space_maps.rs`. Every walk is bounded (depth limit, each node checked once),
//! memory is bounded by the metadata size, and nothing on disk can make it panic.

pub mod recount;
mod space_maps;
mod tree;

use tree::{Summary, TreeKind};

pub use recount::audit;

use std::collections::{BTreeMap, HashMap};

use crate::format::checksum::{self, BlockKind, PrefixError};
use crate::format::node::NodeError;
use crate::format::space_map::{self as fsm, IndexEntry, ENTRIES_PER_BITMAP};
use crate::format::superblock::{Superblock, SuperblockError};
use crate::format::values::DeviceDetails;
use crate::format::{zeroed_block, Block, MAX_METADATA_BLOCKS};
use crate::io::MetaStorage;

/// What is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The superblock is unusable.
    Superblock(SuperblockError),
    /// Checksum mismatch for the block's expected kind.
    Checksum {
        /// The kind the block was read as.
        kind: BlockKind,
        /// Stored checksum.
        stored: u32,
        /// Checksum computed with the kind's salt.
        computed: u32,
    },
    /// The block's blocknr is not its location.
    BlockNr {
        /// The kind the block was read as.
        kind: BlockKind,
        /// Stored blocknr.
        stored: u64,
    },
    /// B-tree node structure (flags, geometry, count, value size, key order).
    Node(NodeError),
    /// max_entries not divisible by 3.
    MaxEntries(u32),
    /// An internal node with no entries.
    EmptyInternal,
    /// A non-root node below a third full (non-fatal in thin_check, still an error).
    Underfull {
        /// Entries held.
        nr_entries: u32,
        /// Room for entries.
        max_entries: u32,
    },
    /// A parent key above its child's first key.
    ParentKey {
        /// The parent's key for the child.
        parent_key: u64,
        /// The child's first key.
        child_first_key: u64,
    },
    /// A child holds keys at or past the next parent key.
    ChildPastNextKey {
        /// The child's last key.
        child_last_key: u64,
        /// The parent's next key.
        next_key: u64,
    },
    /// Leaves at different depths.
    Depth {
        /// Depth of the other leaves.
        expected: usize,
        /// Depth of this leaf.
        found: usize,
    },
    /// A node reached twice in one tree, or a tree deeper than possible.
    Cycle,
    /// A reference to a block past the metadata device / space map.
    PastEnd {
        /// Blocks there are.
        nr_blocks: u64,
    },
    /// A mapping to a data block past the data device.
    DataPastEnd {
        /// Thin device id.
        dev: u64,
        /// Virtual block.
        vblock: u64,
        /// Data block.
        data_block: u64,
        /// Blocks there are.
        nr_blocks: u64,
    },
    /// Device in one of details / top-level trees but not the other.
    DeviceSets {
        /// Thin device id.
        dev: u64,
        /// Found in the details tree (else in the top-level mapping tree).
        in_details: bool,
    },
    /// mapped_blocks differs from the counted mappings.
    MappedBlocks {
        /// Thin device id.
        dev: u64,
        /// What is recorded.
        recorded: u64,
        /// What was counted.
        counted: u64,
    },
    /// Metadata block count on disk differs from the references found.
    MetadataCount {
        /// References found.
        expected: u32,
        /// Count in the space map.
        on_disk: u32,
    },
    /// Data block count on disk differs from the number of distinct leaves mapping it.
    DataCount {
        /// Data block.
        data_block: u64,
        /// References found.
        expected: u32,
        /// Count in the space map.
        on_disk: u32,
    },
    /// Bitmap says 3 but the overflow tree has no entry, or the entry is below 3.
    Overflow {
        /// Which space map ("metadata" or "data").
        sm: &'static str,
        /// The block counted.
        block: u64,
        /// What is wrong.
        detail: String,
    },
    /// Bitmap entries past nr_blocks are not zero.
    BitmapTail {
        /// Which space map ("metadata" or "data").
        sm: &'static str,
        /// First block past the end with a non-zero entry.
        first: u64,
    },
    /// nr_allocated differs from the number of blocks in use.
    NrAllocated {
        /// Which space map ("metadata" or "data").
        sm: &'static str,
        /// What is recorded.
        recorded: u64,
        /// What was counted.
        counted: u64,
    },
    /// Space-map index problems.
    Index {
        /// Which space map ("metadata" or "data").
        sm: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// One problem found, with the metadata block it is about (when there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Metadata block concerned.
    pub block: Option<u64>,
    /// What is wrong.
    pub kind: ProblemKind,
}

impl Problem {
    /// thin_check calls leaks and under-full nodes non-fatal (it still exits 1).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self.kind,
            ProblemKind::Underfull { .. }
                | ProblemKind::MetadataCount { expected: 0, .. }
                | ProblemKind::DataCount { expected: 0, .. }
        )
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(b) = self.block {
            write!(f, "metadata block {b}: ")?;
        }
        match &self.kind {
            ProblemKind::Superblock(e) => write!(f, "{e}"),
            ProblemKind::Checksum { kind, stored, computed } => {
                write!(f, "{} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})", kind.name())
            }
            ProblemKind::BlockNr { kind, stored } => write!(f, "{} blocknr is {stored}, not its own location", kind.name()),
            ProblemKind::Node(e) => write!(f, "{e}"),
            ProblemKind::MaxEntries(m) => write!(f, "btree node max_entries {m} is not a multiple of 3"),
            ProblemKind::EmptyInternal => write!(f, "internal btree node with no entries"),
            ProblemKind::Underfull { nr_entries, max_entries } => {
                write!(f, "non-root btree node holds {nr_entries} of {max_entries} entries (under a third)")
            }
            ProblemKind::ParentKey { parent_key, child_first_key } => {
                write!(f, "parent key {parent_key} is above the child's first key {child_first_key}")
            }
            ProblemKind::ChildPastNextKey { child_last_key, next_key } => {
                write!(f, "child holds key {child_last_key}, not below the next parent key {next_key}")
            }
            ProblemKind::Depth { expected, found } => write!(f, "leaf at depth {found}, other leaves at depth {expected}"),
            ProblemKind::Cycle => write!(f, "btree node reached twice in one tree (cycle)"),
            ProblemKind::PastEnd { nr_blocks } => write!(f, "referenced, but past the end of the metadata ({nr_blocks} blocks)"),
            ProblemKind::DataPastEnd { dev, vblock, data_block, nr_blocks } => write!(
                f,
                "device {dev} maps virtual block {vblock} to data block {data_block}, past the data device ({nr_blocks} blocks)"
            ),
            ProblemKind::DeviceSets { dev, in_details: true } => {
                write!(f, "device {dev} has details but no mapping tree")
            }
            ProblemKind::DeviceSets { dev, in_details: false } => {
                write!(f, "device {dev} has a mapping tree but no details")
            }
            ProblemKind::MappedBlocks { dev, recorded, counted } => {
                write!(f, "device {dev} records mapped_blocks {recorded} but maps {counted} blocks")
            }
            ProblemKind::MetadataCount { expected: 0, on_disk } => {
                write!(f, "leaked: metadata space map count {on_disk}, but nothing references it")
            }
            ProblemKind::MetadataCount { expected, on_disk } => {
                write!(f, "metadata space map count {on_disk}, but referenced {expected} times")
            }
            ProblemKind::DataCount { data_block, expected: 0, on_disk } => {
                write!(f, "data block {data_block} leaked: count {on_disk}, but no mapping references it")
            }
            ProblemKind::DataCount { data_block, expected, on_disk } => {
                write!(f, "data block {data_block}: count {on_disk}, but mapped from {expected} distinct leaves")
            }
            ProblemKind::Overflow { sm, block, detail } => write!(f, "{sm} space map, block {block}: {detail}"),
            ProblemKind::BitmapTail { sm, first } => {
                write!(f, "{sm} space-map bitmap has non-zero entries past the end (block {first})")
            }
            ProblemKind::NrAllocated { sm, recorded, counted } => {
                write!(f, "{sm} space map nr_allocated is {recorded}, but {counted} blocks are in use")
            }
            ProblemKind::Index { sm, detail } => write!(f, "{sm} space-map index: {detail}"),
        }
    }
}

/// Numbers gathered while checking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Transaction id in the superblock.
    pub transaction_id: u64,
    /// Snapshot time in the superblock.
    pub time: u32,
    /// Data block size in 512-byte sectors.
    pub data_block_sectors: u32,
    /// Blocks of the data device.
    pub data_nr_blocks: u64,
    /// Data blocks with a non-zero count.
    pub data_blocks_in_use: u64,
    /// Blocks of the metadata space map.
    pub metadata_nr_blocks: u64,
    /// Metadata blocks with a non-zero count.
    pub metadata_blocks_in_use: u64,
    /// Block of the held metadata snapshot (0: none).
    pub held_root: u64,
    /// Each thin device with details.
    pub devices: Vec<DeviceStats>,
}

/// Per-device numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Thin device id.
    pub dev_id: u64,
    /// Mappings counted in its tree.
    pub mapped_blocks: u64,
    /// Its details entry.
    pub details: DeviceDetails,
    /// Its highest mapped virtual block.
    pub highest_mapped: Option<u64>,
}

/// The result of a check.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Everything found wrong.
    pub problems: Vec<Problem>,
    /// What was found.
    pub stats: CheckStats,
}

impl CheckReport {
    /// No problem at all.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
    /// A problem thin_check would call fatal.
    pub fn has_fatal(&self) -> bool {
        self.problems.iter().any(Problem::is_fatal)
    }
}

/// The check could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Reading the metadata failed.
    #[error("cannot read the metadata: {0}")]
    Io(#[from] std::io::Error),
}

struct Checker<'a> {
    storage: &'a dyn MetaStorage,
    nr_meta: u64,
    nr_data: u64,
    meta_refs: Vec<u32>,
    data_refs: HashMap<u64, u32>,
    summaries: HashMap<u64, Summary>,
    /// Top-level leaf entries found: dev -> subtree root.
    problems: Vec<Problem>,
    max_problems: usize,
}

impl<'a> Checker<'a> {
    fn problem(&mut self, block: Option<u64>, kind: ProblemKind) {
        if self.problems.len() < self.max_problems {
            self.problems.push(Problem { block, kind });
        }
    }

    /// Count a reference to metadata block `b`; false when it is past the end.
    fn reference(&mut self, b: u64) -> bool {
        match self.meta_refs.get_mut(b as usize) {
            Some(c) => {
                *c = c.saturating_add(1);
                true
            }
            None => {
                self.problem(Some(b), ProblemKind::PastEnd { nr_blocks: self.nr_meta });
                false
            }
        }
    }

    fn read(&mut self, b: u64, kind: BlockKind) -> Option<Box<Block>> {
        let mut blk = zeroed_block();
        if b >= self.storage.nr_blocks() {
            self.problem(Some(b), ProblemKind::PastEnd { nr_blocks: self.storage.nr_blocks() });
            return None;
        }
        if let Err(e) = self.storage.read_block(b, &mut blk) {
            self.problem(Some(b), ProblemKind::Index { sm: "metadata", detail: format!("read error: {e}") });
            return None;
        }
        match checksum::verify(&blk, kind, b) {
            Ok(()) => Some(blk),
            Err(PrefixError::Checksum { stored, computed }) => {
                self.problem(Some(b), ProblemKind::Checksum { kind, stored, computed });
                None
            }
            Err(PrefixError::BlockNr { stored }) => {
                self.problem(Some(b), ProblemKind::BlockNr { kind, stored });
                None
            }
        }
    }
}

/// Check the metadata held by `storage`.
pub fn check(storage: &dyn MetaStorage) -> Result<CheckReport, CheckError> {
    let mut report = CheckReport::default();
    let dev_blocks = storage.nr_blocks();
    if dev_blocks == 0 {
        report.problems.push(Problem { block: Some(0), kind: ProblemKind::PastEnd { nr_blocks: 0 } });
        return Ok(report);
    }
    let mut raw = zeroed_block();
    storage.read_block(0, &mut raw)?;
    let sb = match Superblock::decode(&raw, 0) {
        Ok(sb) => sb,
        Err(e) => {
            report.problems.push(Problem { block: Some(0), kind: ProblemKind::Superblock(e) });
            return Ok(report);
        }
    };
    let msm = sb.metadata_sm_root;
    let dsm = sb.data_sm_root;
    report.stats = CheckStats {
        transaction_id: sb.trans_id,
        time: sb.time,
        data_block_sectors: sb.data_block_size,
        data_nr_blocks: dsm.nr_blocks,
        metadata_nr_blocks: msm.nr_blocks,
        held_root: sb.held_root,
        ..Default::default()
    };
    if msm.nr_blocks == 0 || msm.nr_blocks > dev_blocks || msm.nr_blocks > MAX_METADATA_BLOCKS {
        report.problems.push(Problem {
            block: Some(0),
            kind: ProblemKind::Index {
                sm: "metadata",
                detail: format!("space map claims {} blocks, the device holds {dev_blocks}", msm.nr_blocks),
            },
        });
        return Ok(report);
    }
    let nr_meta = msm.nr_blocks;
    let mut c = Checker {
        storage,
        nr_meta,
        nr_data: dsm.nr_blocks,
        meta_refs: vec![0; nr_meta as usize],
        data_refs: HashMap::new(),
        summaries: HashMap::new(),
        problems: Vec::new(),
        max_problems: 10_000,
    };
    c.reference(0);

    // Metadata space map: index block, bitmaps, overflow tree.
    let mut meta_bitmaps = Vec::new();
    if c.reference(msm.bitmap_root) {
        if let Some(blk) = c.read(msm.bitmap_root, BlockKind::Index) {
            let entries: Vec<IndexEntry> = fsm::index_decode(&blk, msm.bitmap_root).unwrap_or_default();
            let n = nr_meta.div_ceil(ENTRIES_PER_BITMAP) as usize;
            for (i, e) in entries.iter().take(n).enumerate() {
                if e.blocknr == 0 {
                    c.problem(
                        Some(msm.bitmap_root),
                        ProblemKind::Index { sm: "metadata", detail: format!("entry {i} has no bitmap") },
                    );
                } else if c.reference(e.blocknr) {
                    meta_bitmaps.push(e.blocknr);
                }
            }
        }
    }
    let meta_overflow = c.overflow_tree(msm.ref_count_root);

    // Data space map: index tree, bitmaps, overflow tree.
    let data_bitmaps_n = dsm.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
    let mut index_entries: BTreeMap<u64, IndexEntry> = BTreeMap::new();
    c.tree(dsm.bitmap_root, TreeKind::Plain(16), &mut |_, k, v, _| {
        index_entries.insert(k, IndexEntry::decode(v));
    });
    let mut data_bitmaps = Vec::new();
    if data_bitmaps_n > nr_meta {
        c.problem(
            Some(0),
            ProblemKind::Index {
                sm: "data",
                detail: format!("{} data blocks need more bitmaps than there are metadata blocks", dsm.nr_blocks),
            },
        );
    } else {
        for i in 0..data_bitmaps_n {
            match index_entries.get(&i) {
                Some(e) if c.reference(e.blocknr) => data_bitmaps.push(e.blocknr),
                Some(_) => {}
                None => c.problem(
                    Some(dsm.bitmap_root),
                    ProblemKind::Index { sm: "data", detail: format!("no entry for bitmap {i}") },
                ),
            }
        }
    }
    if let Some((&k, _)) = index_entries.range(data_bitmaps_n..).next() {
        c.problem(
            Some(dsm.bitmap_root),
            ProblemKind::Index { sm: "data", detail: format!("entry for bitmap {k} past the end") },
        );
    }
    let data_overflow = c.overflow_tree(dsm.ref_count_root);

    // Live trees.
    // Key sets are compared only when both trees were read whole: a damaged node
    // is reported once, not as every device it hid.
    let (devices, top_whole) = c.mapping_tree(sb.data_mapping_root);
    let (details, details_whole) = c.details_tree(sb.device_details_root);
    let compare_sets = top_whole && details_whole;
    for (&dev, (_, summary)) in &devices {
        match details.get(&dev) {
            None if compare_sets => {
                c.problem(Some(sb.device_details_root), ProblemKind::DeviceSets { dev, in_details: false })
            }
            None => {}
            Some(d) => {
                let counted = summary.map_or(0, |s| s.entries);
                if summary.is_some() && d.mapped_blocks != counted {
                    c.problem(
                        Some(sb.device_details_root),
                        ProblemKind::MappedBlocks { dev, recorded: d.mapped_blocks, counted },
                    );
                }
                report.stats.devices.push(DeviceStats {
                    dev_id: dev,
                    mapped_blocks: counted,
                    details: *d,
                    highest_mapped: summary.and_then(|s| s.last),
                });
            }
        }
    }
    for &dev in details.keys() {
        if compare_sets && !devices.contains_key(&dev) {
            c.problem(Some(sb.data_mapping_root), ProblemKind::DeviceSets { dev, in_details: true });
        }
    }

    // Held metadata snapshot.
    if sb.held_root != 0 && c.reference(sb.held_root) {
        if let Some(blk) = c.read(sb.held_root, BlockKind::Superblock) {
            let held = Superblock::decode_unchecked(&blk);
            let (hdevs, htop_whole) = c.mapping_tree(held.data_mapping_root);
            let (hdetails, hdetails_whole) = c.details_tree(held.device_details_root);
            for &dev in hdevs.keys() {
                if htop_whole && hdetails_whole && !hdetails.contains_key(&dev) {
                    c.problem(Some(sb.held_root), ProblemKind::DeviceSets { dev, in_details: false });
                }
            }
        }
    }

    // Compare counts with both space maps.
    report.stats.metadata_blocks_in_use = c.compare_space_map(
        "metadata",
        (nr_meta, msm.nr_allocated),
        &meta_bitmaps,
        &meta_overflow,
        &|c: &Checker<'_>, b| c.meta_refs.get(b as usize).copied().unwrap_or(0),
    );
    report.stats.data_blocks_in_use = c.compare_space_map(
        "data",
        (dsm.nr_blocks, dsm.nr_allocated),
        &data_bitmaps,
        &data_overflow,
        &|c: &Checker<'_>, b| c.data_refs.get(&b).copied().unwrap_or(0),
    );
    report.problems = c.problems;
    Ok(report)
}
