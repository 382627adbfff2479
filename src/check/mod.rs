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
//! Every walk is bounded (depth limit, each node walked once), memory is bounded by
//! the metadata size, and nothing on disk can make it panic.

pub mod recount;

pub use recount::audit;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::format::checksum::{self, BlockKind, PrefixError};
use crate::format::node::{self, NodeError};
use crate::format::space_map::{self as fsm, IndexEntry, ENTRIES_PER_BITMAP};
use crate::format::superblock::{Superblock, SuperblockError};
use crate::format::values::{unpack_block_time, DeviceDetails};
use crate::format::{zeroed_block, Block, MAX_METADATA_BLOCKS};
use crate::io::MetaStorage;

const MAX_DEPTH: usize = 24;

/// What is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The superblock is unusable.
    Superblock(SuperblockError),
    /// Checksum mismatch for the block's expected kind.
    Checksum { kind: BlockKind, stored: u32, computed: u32 },
    /// The block's blocknr is not its location.
    BlockNr { kind: BlockKind, stored: u64 },
    /// B-tree node structure (flags, geometry, count, value size, key order).
    Node(NodeError),
    /// max_entries not divisible by 3.
    MaxEntries(u32),
    /// An internal node with no entries.
    EmptyInternal,
    /// A non-root node below a third full (non-fatal in thin_check, still an error).
    Underfull { nr_entries: u32, max_entries: u32 },
    /// A parent key above its child's first key.
    ParentKey { parent_key: u64, child_first_key: u64 },
    /// A child holds keys at or past the next parent key.
    ChildPastNextKey { child_last_key: u64, next_key: u64 },
    /// Leaves at different depths.
    Depth { expected: usize, found: usize },
    /// A node reached twice in one tree, or a tree deeper than possible.
    Cycle,
    /// A reference to a block past the metadata device / space map.
    PastEnd { nr_blocks: u64 },
    /// A mapping to a data block past the data device.
    DataPastEnd { dev: u64, vblock: u64, data_block: u64, nr_blocks: u64 },
    /// Device in one of details / top-level trees but not the other.
    DeviceSets { dev: u64, in_details: bool },
    /// mapped_blocks differs from the counted mappings.
    MappedBlocks { dev: u64, recorded: u64, counted: u64 },
    /// Metadata block count on disk differs from the references found.
    MetadataCount { expected: u32, on_disk: u32 },
    /// Data block count on disk differs from the number of distinct leaves mapping it.
    DataCount { data_block: u64, expected: u32, on_disk: u32 },
    /// Bitmap says 3 but the overflow tree has no entry, or the entry is below 3.
    Overflow { sm: &'static str, block: u64, detail: String },
    /// Bitmap entries past nr_blocks are not zero.
    BitmapTail { sm: &'static str, first: u64 },
    /// nr_allocated differs from the number of blocks in use.
    NrAllocated { sm: &'static str, recorded: u64, counted: u64 },
    /// Space-map index problems.
    Index { sm: &'static str, detail: String },
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
    pub transaction_id: u64,
    pub time: u32,
    pub data_block_sectors: u32,
    pub data_nr_blocks: u64,
    pub data_blocks_in_use: u64,
    pub metadata_nr_blocks: u64,
    pub metadata_blocks_in_use: u64,
    pub held_root: u64,
    pub devices: Vec<DeviceStats>,
}

/// Per-device numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStats {
    pub dev_id: u64,
    pub mapped_blocks: u64,
    pub details: DeviceDetails,
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

/// Callback for leaf entries: (checker, key, value, first visit).
type LeafFn<'f, 'a> = dyn FnMut(&mut Checker<'a>, u64, &[u8], bool) + 'f;

/// Summary of a subtree, remembered so shared subtrees are walked once.
#[derive(Debug, Clone, Copy)]
struct Summary {
    entries: u64,
    first: Option<u64>,
    last: Option<u64>,
    height: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TreeKind {
    Top,
    Bottom,
    Plain(u32),
}

impl TreeKind {
    fn value_size(self) -> u32 {
        match self {
            TreeKind::Top | TreeKind::Bottom => 8,
            TreeKind::Plain(n) => n,
        }
    }
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

    /// Walk the tree at `b`, counting references; returns its summary.
    /// `on_leaf` gets (key, value, first) for every leaf entry; `first` is false for
    /// entries of a subtree already walked through another parent (its references
    /// were counted then).
    fn tree(
        &mut self,
        b: u64,
        kind: TreeKind,
        is_root: bool,
        depth: usize,
        path: &mut BTreeSet<u64>,
        on_leaf: &mut LeafFn<'_, 'a>,
    ) -> Option<Summary> {
        if !self.reference(b) {
            return None;
        }
        if depth >= MAX_DEPTH || path.contains(&b) {
            self.problem(Some(b), ProblemKind::Cycle);
            return None;
        }
        if let Some(s) = self.summaries.get(&b).copied() {
            // Bottom-level entries of a shared subtree are not needed again (its
            // summary has the counts); key sets of the other trees are.
            if kind != TreeKind::Bottom {
                self.enumerate(b, kind, depth, on_leaf);
            }
            return Some(s);
        }
        let blk = self.read(b, BlockKind::Node)?;
        let h = match node::validate_structure(&blk, kind.value_size()) {
            Ok(h) => h,
            Err(e) => {
                self.problem(Some(b), ProblemKind::Node(e));
                return None;
            }
        };
        if h.max_entries % 3 != 0 {
            self.problem(Some(b), ProblemKind::MaxEntries(h.max_entries));
        }
        if !is_root && h.nr_entries < h.max_entries / 3 {
            self.problem(Some(b), ProblemKind::Underfull { nr_entries: h.nr_entries, max_entries: h.max_entries });
        }
        let n = h.nr_entries as usize;
        let mut summary = Summary {
            entries: 0,
            first: (n > 0).then(|| node::key(&blk, 0)),
            last: (n > 0).then(|| node::key(&blk, n - 1)),
            height: 0,
        };
        if h.is_leaf() {
            summary.entries = n as u64;
            for i in 0..n {
                on_leaf(self, node::key(&blk, i), node::value(&blk, &h, i), true);
            }
        } else {
            if n == 0 {
                self.problem(Some(b), ProblemKind::EmptyInternal);
            }
            path.insert(b);
            let mut height = None;
            for i in 0..n {
                let key = node::key(&blk, i);
                let child = node::value_u64(&blk, &h, i);
                let Some(cs) = self.tree(child, kind, false, depth + 1, path, on_leaf) else { continue };
                summary.entries += cs.entries;
                if let Some(first) = cs.first {
                    if key > first {
                        self.problem(Some(b), ProblemKind::ParentKey { parent_key: key, child_first_key: first });
                    }
                    if i == 0 {
                        summary.first = Some(first);
                    }
                }
                if let (Some(last), true) = (cs.last, i + 1 < n) {
                    let next = node::key(&blk, i + 1);
                    if last >= next {
                        self.problem(
                            Some(child),
                            ProblemKind::ChildPastNextKey { child_last_key: last, next_key: next },
                        );
                    }
                }
                if cs.last.is_some() && i + 1 == n {
                    summary.last = cs.last;
                }
                match height {
                    None => height = Some(cs.height),
                    Some(hgt) if hgt != cs.height => self.problem(
                        Some(child),
                        ProblemKind::Depth { expected: depth + 1 + hgt, found: depth + 1 + cs.height },
                    ),
                    Some(_) => {}
                }
            }
            path.remove(&b);
            summary.height = height.map_or(1, |x| x + 1);
        }
        self.summaries.insert(b, summary);
        Some(summary)
    }

    /// Entries of an already checked subtree, read again without counting anything.
    fn enumerate(&mut self, b: u64, kind: TreeKind, depth: usize, on_leaf: &mut LeafFn<'_, 'a>) {
        if depth >= MAX_DEPTH {
            return;
        }
        let mut blk = zeroed_block();
        if self.storage.read_block(b, &mut blk).is_err() {
            return;
        }
        let Ok(h) = node::validate_structure(&blk, kind.value_size()) else { return };
        for i in 0..h.nr_entries as usize {
            if h.is_leaf() {
                on_leaf(self, node::key(&blk, i), node::value(&blk, &h, i), false);
            } else {
                let child = node::value_u64(&blk, &h, i);
                if self.summaries.contains_key(&child) {
                    self.enumerate(child, kind, depth + 1, on_leaf);
                }
            }
        }
    }

    /// Walk a two-level mapping tree; returns dev -> (subtree root, summary), and
    /// whether the top level was read whole (no problem found in it).
    fn mapping_tree(&mut self, root: u64) -> (BTreeMap<u64, (u64, Option<Summary>)>, bool) {
        let mut subtrees: Vec<(u64, u64, bool)> = Vec::new();
        let before = self.problems.len();
        self.tree(root, TreeKind::Top, true, 0, &mut BTreeSet::new(), &mut |_, k, v, first| {
            subtrees.push((k, u64::from_le_bytes(v[..8].try_into().unwrap_or_default()), first));
        });
        let whole = self.problems.len() == before;
        let mut out = BTreeMap::new();
        for (dev, sub, first) in subtrees {
            if !first {
                // Counted through the other parent of this top-level leaf.
                out.insert(dev, (sub, self.summaries.get(&sub).copied()));
                continue;
            }
            let nr_data = self.nr_data;
            let s = self.tree(sub, TreeKind::Bottom, true, 0, &mut BTreeSet::new(), &mut |c, vblock, v, first| {
                if !first {
                    return;
                }
                let (d, _) = unpack_block_time(u64::from_le_bytes(v[..8].try_into().unwrap_or_default()));
                if d >= nr_data {
                    c.problem(None, ProblemKind::DataPastEnd { dev, vblock, data_block: d, nr_blocks: nr_data });
                } else {
                    *c.data_refs.entry(d).or_default() += 1;
                }
            });
            out.insert(dev, (sub, s));
        }
        (out, whole)
    }

    /// Walk a details tree; also whether it was read whole.
    fn details_tree(&mut self, root: u64) -> (BTreeMap<u64, DeviceDetails>, bool) {
        let mut details = BTreeMap::new();
        let before = self.problems.len();
        self.tree(root, TreeKind::Plain(24), true, 0, &mut BTreeSet::new(), &mut |_, k, v, _| {
            details.insert(k, DeviceDetails::decode(v));
        });
        let whole = self.problems.len() == before;
        (details, whole)
    }

    /// Read one space map's on-disk counts and compare them with `expected(b)`.
    #[allow(clippy::too_many_arguments)]
    fn compare_space_map(
        &mut self,
        sm: &'static str,
        nr_blocks: u64,
        nr_allocated: u64,
        bitmaps: &[u64],
        overflow: &BTreeMap<u64, u32>,
        expected: &dyn Fn(&Self, u64) -> u32,
    ) -> u64 {
        let mut in_use = 0u64;
        let mut seen_overflow = BTreeSet::new();
        for (i, &loc) in bitmaps.iter().enumerate() {
            let start = i as u64 * ENTRIES_PER_BITMAP;
            let Some(blk) = self.read(loc, BlockKind::Bitmap) else { continue };
            let mut tail_reported = false;
            for e in 0..ENTRIES_PER_BITMAP {
                let b = start + e;
                let v = fsm::bitmap_get(&blk, e as usize);
                if b >= nr_blocks {
                    if v != 0 && !tail_reported {
                        self.problem(Some(loc), ProblemKind::BitmapTail { sm, first: b });
                        tail_reported = true;
                    }
                    continue;
                }
                let on_disk = if v == 3 {
                    seen_overflow.insert(b);
                    match overflow.get(&b) {
                        Some(&c) if c >= 3 => c,
                        Some(&c) => {
                            self.problem(
                                Some(loc),
                                ProblemKind::Overflow {
                                    sm,
                                    block: b,
                                    detail: format!("ref-count tree holds {c}, below 3"),
                                },
                            );
                            c
                        }
                        None => {
                            self.problem(
                                Some(loc),
                                ProblemKind::Overflow {
                                    sm,
                                    block: b,
                                    detail: "bitmap says 3 or more but the ref-count tree has no entry".into(),
                                },
                            );
                            3
                        }
                    }
                } else {
                    u32::from(v)
                };
                in_use += u64::from(on_disk != 0);
                let want = expected(self, b);
                if want != on_disk {
                    if sm == "metadata" {
                        self.problem(Some(b), ProblemKind::MetadataCount { expected: want, on_disk });
                    } else {
                        self.problem(Some(loc), ProblemKind::DataCount { data_block: b, expected: want, on_disk });
                    }
                }
            }
        }
        for (&b, &c) in overflow {
            if !seen_overflow.contains(&b) {
                self.problem(
                    None,
                    ProblemKind::Overflow {
                        sm,
                        block: b,
                        detail: format!("ref-count tree holds {c} but the bitmap entry is not 3"),
                    },
                );
            }
        }
        if in_use != nr_allocated {
            self.problem(None, ProblemKind::NrAllocated { sm, recorded: nr_allocated, counted: in_use });
        }
        in_use
    }

    fn overflow_tree(&mut self, root: u64) -> BTreeMap<u64, u32> {
        let mut out = BTreeMap::new();
        self.tree(root, TreeKind::Plain(4), true, 0, &mut BTreeSet::new(), &mut |_, k, v, _| {
            out.insert(k, u32::from_le_bytes(v[..4].try_into().unwrap_or_default()));
        });
        out
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
    c.tree(dsm.bitmap_root, TreeKind::Plain(16), true, 0, &mut BTreeSet::new(), &mut |_, k, v, _| {
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
        nr_meta,
        msm.nr_allocated,
        &meta_bitmaps,
        &meta_overflow,
        &|c: &Checker<'_>, b| c.meta_refs.get(b as usize).copied().unwrap_or(0),
    );
    report.stats.data_blocks_in_use = c.compare_space_map(
        "data",
        dsm.nr_blocks,
        dsm.nr_allocated,
        &data_bitmaps,
        &data_overflow,
        &|c: &Checker<'_>, b| c.data_refs.get(&b).copied().unwrap_or(0),
    );
    report.problems = c.problems;
    Ok(report)
}
