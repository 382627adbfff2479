//! The difference between two thin devices' mappings, in `thin_delta`'s vocabulary,
//! at a cost proportional to what changed rather than to the devices' size.
//!
//! A snapshot shares its origin's mapping tree; every later change copies only the
//! path to the leaf it touches. So two devices related by snapshots share every
//! subtree that neither changed, *by block address*. The diff walks both trees in
//! lockstep, front to back, and skips a pair of pending subtrees that are the same
//! block without reading it; where they differ it descends (the side whose key range
//! starts first, the taller one on a tie), down to leaf entries, which it compares by
//! data block (the mapping's time is ignored: a block is the same when both devices
//! map it to the same data block).
//!
//! The result is a list of runs of virtual blocks, in ascending order, adjacent
//! runs of one kind merged:
//!
//! | kind | meaning |
//! |---|---|
//! | [`DeltaKind::Same`] | both map the block, to the same data block |
//! | [`DeltaKind::Different`] | both map it, to different data blocks |
//! | [`DeltaKind::LeftOnly`] | only the left device maps it |
//! | [`DeltaKind::RightOnly`] | only the right device maps it |
//!
//! A block neither device maps is in no run. `Same` runs are listed only when asked
//! for ([`DiffOptions::include_same`], like `thin_delta --verbose`): listing them
//! means reading the shared subtrees, which costs time proportional to the mapped
//! size; without them the walk reads only the nodes on paths where the trees differ
//! (plus at most one node per level where the trees' node boundaries do not line up).
//!
//! A block rewritten with the same bytes after a snapshot is mapped to a new data
//! block (copy-on-write), so it is reported as `Different`: the diff is exact about
//! mappings, and a superset of the blocks whose bytes differ.

use super::*;
use crate::btree::walk::{NodeSource, NodeVisitor, Step, Walk};
use crate::format::node;
use crate::io::MetaStorage;
use crate::units::VirtBlock;

/// How a run of virtual blocks compares between the left and the right device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeltaKind {
    /// Both devices map these blocks to the same data blocks.
    Same,
    /// Both devices map these blocks, to different data blocks.
    Different,
    /// Only the left device maps these blocks.
    LeftOnly,
    /// Only the right device maps these blocks.
    RightOnly,
}

impl DeltaKind {
    /// The word `thin_delta` uses: `same`, `different`, `left_only`, `right_only`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeltaKind::Same => "same",
            DeltaKind::Different => "different",
            DeltaKind::LeftOnly => "left_only",
            DeltaKind::RightOnly => "right_only",
        }
    }

    /// Does the run hold blocks whose contents may differ (every kind but `Same`)?
    pub fn is_change(self) -> bool {
        self != DeltaKind::Same
    }
}

impl std::fmt::Display for DeltaKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A run of consecutive virtual blocks of one [`DeltaKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeltaRun {
    /// How the blocks compare.
    pub kind: DeltaKind,
    /// The first virtual block.
    pub begin: VirtBlock,
    /// Number of blocks (at least 1).
    pub len: u64,
}

impl DeltaRun {
    /// The block after the last one of the run.
    pub fn end(&self) -> VirtBlock {
        VirtBlock(self.begin.0.saturating_add(self.len))
    }
}

/// What a diff lists and over which virtual blocks. Build it with
/// `DiffOptions { .., ..Default::default() }`: fields may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiffOptions {
    /// List `Same` runs too (reads the shared subtrees: cost proportional to the
    /// mapped size instead of to the changes).
    pub include_same: bool,
    /// The first virtual block considered.
    pub from: VirtBlock,
    /// Blocks at or after this one are not considered (`None`: no bound).
    pub to: Option<VirtBlock>,
}

impl DiffOptions {
    /// Only the blocks in `[from, to)`, without `Same` runs.
    pub fn range(from: VirtBlock, to: VirtBlock) -> DiffOptions {
        DiffOptions { from, to: Some(to), ..Default::default() }
    }
}

/// What a diff read: for tests and benchmarks that show its cost follows the changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiffStats {
    /// B-tree nodes read (on both sides).
    pub nodes_read: u64,
    /// Pairs of identical subtrees skipped without reading them.
    pub shared_skipped: u64,
}

/// Something pending on one side of the walk, in key order.
#[derive(Debug, Clone, Copy)]
enum Item {
    /// A leaf entry: virtual block and data block.
    Entry { key: u64, data: u64 },
    /// A subtree not read yet, whose keys lie in `[lo, hi)`, `height` levels above
    /// the leaves (0: a leaf).
    Node { block: u64, lo: u64, hi: Option<u64>, height: usize },
}

/// A diff being walked in steps (see [`Metadata::diff_walk`]).
#[derive(Debug)]
pub struct DiffWalk {
    a: Side,
    b: Side,
    runs: Runs,
    opts: DiffOptions,
    stats: DiffStats,
    /// Data blocks of the pool: mapped ones must be below.
    nr_data: u64,
}

impl DiffWalk {
    /// The runs found and what the walk read (complete once
    /// [`Metadata::diff_step`] returned `true`).
    pub fn finish(self) -> (Vec<DeltaRun>, DiffStats) {
        (self.runs.out, self.stats)
    }

    /// What the walk read so far.
    pub fn stats(&self) -> DiffStats {
        self.stats
    }
}

/// One side of the walk: pending items, the front last.
#[derive(Debug)]
struct Side {
    stack: Vec<Item>,
    /// The last entry key taken from this side (keys must ascend).
    last: Option<u64>,
    root: u64,
}

/// Runs being built, adjacent runs of one kind merged.
#[derive(Debug)]
struct Runs {
    out: Vec<DeltaRun>,
    include_same: bool,
}

impl Runs {
    fn push(&mut self, kind: DeltaKind, key: u64) {
        if kind == DeltaKind::Same && !self.include_same {
            return;
        }
        if let Some(r) = self.out.last_mut() {
            if r.kind == kind && r.begin.0.checked_add(r.len) == Some(key) {
                r.len += 1;
                return;
            }
        }
        self.out.push(DeltaRun { kind, begin: VirtBlock(key), len: 1 });
    }
}

/// The uuid a metadata snapshot held for a diff carries in its superblock copy, so
/// that one left behind by an interrupted diff can be told from a snapshot someone
/// else holds (the kernel and `thin_check` ignore the field).
pub const HELD_FOR_DIFF: [u8; 16] = *b"thinpool:diff\0\0\0";

/// Every device's mapping tree at one instant, kept by a held metadata snapshot
/// (dm-thin's `reserve_metadata_snap`): while it is held, changes to the devices
/// copy the nodes they touch, so these trees stay as they were and can be walked
/// at leisure. Crash-safe: a commit while it is held records it on disk like any
/// held snapshot; [`Metadata::hold_mappings`] releases one an interrupted diff left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldMappings {
    /// The block of the superblock copy (the pool's `held_root`).
    pub block: u64,
    mapping_root: u64,
    details_root: u64,
}

impl Metadata {
    /// Hold every device's mappings as they are now (see [`HeldMappings`]). The
    /// metadata must be committed (nothing changed since), so that the held trees are
    /// the committed ones. Refused when the pool is read-only or a metadata snapshot
    /// is already held.
    pub fn hold_mappings(&mut self) -> Result<HeldMappings, PoolError> {
        self.writable()?;
        if self.changed {
            return Err(PoolError::MetadataSnapshot("the metadata has uncommitted changes: commit before holding it"));
        }
        if self.held_root != 0 {
            return Err(PoolError::MetadataSnapshot("a metadata snapshot is already held"));
        }
        self.ensure_metadata(MetaNeed::Grow(1))?;
        let h = self.put_held_copy(HELD_FOR_DIFF)?;
        Ok(HeldMappings {
            block: h,
            mapping_root: self.sb.data_mapping_root,
            details_root: self.sb.device_details_root,
        })
    }

    /// Let go of mappings held by [`Metadata::hold_mappings`]: what only they kept is
    /// freed (at the next commit, like any release).
    pub fn release_held_mappings(&mut self, held: &HeldMappings) -> Result<(), PoolError> {
        self.writable()?;
        if self.held_root != held.block || held.block == 0 {
            return Err(PoolError::MetadataSnapshot("those mappings are not held"));
        }
        self.held_root = 0;
        self.changed = true;
        btree::delete_tree(&mut self.t, held.mapping_root, TOP_LEVEL)?;
        btree::delete_tree(&mut self.t, held.details_root, DETAILS)?;
        self.t.dec_meta(held.block)?;
        Ok(())
    }

    /// The root of device `id`'s mapping tree in held mappings.
    pub fn held_device_root(&mut self, held: &HeldMappings, id: DevId) -> Result<u64, PoolError> {
        btree::lookup_u64(&mut self.t, held.mapping_root, id as u64, TOP_LEVEL)?.ok_or(PoolError::NoSuchDevice(id))
    }

    /// Release a committed held snapshot whose copy carries [`HELD_FOR_DIFF`]: one
    /// a diff took and could not release (its process ended). `false` when none is
    /// held, or the held one is someone else's or was taken in this transaction.
    /// Call it only while no [`HeldMappings`] of this pool is in use: it cannot tell
    /// a live hold that was committed from a stale one.
    pub fn release_stale_hold(&mut self) -> Result<bool, PoolError> {
        let h = self.held_root;
        if h == 0 || self.sb.held_root != h {
            return Ok(false);
        }
        let raw = self.t.read_uncached(h)?;
        let held = Superblock::decode(&raw, h).map_err(|e| MetaError::corrupt(h, Corruption::Superblock(e)))?;
        if held.uuid != HELD_FOR_DIFF {
            return Ok(false);
        }
        let stale =
            HeldMappings { block: h, mapping_root: held.data_mapping_root, details_root: held.device_details_root };
        self.release_held_mappings(&stale)?;
        Ok(true)
    }
}

/// Pop the front entry of `s` (key `key`), checking keys ascend.
fn take(s: &mut Side, key: u64) -> Result<(), PoolError> {
    s.stack.pop();
    if s.last.is_some_and(|l| l >= key) {
        return Err(corrupt(s.root, format!("mapping tree keys out of order at virtual block {key}")));
    }
    s.last = Some(key);
    Ok(())
}

fn corrupt(b: u64, what: String) -> PoolError {
    MetaError::corrupt(b, Corruption::Tree(what)).into()
}

impl Metadata {
    /// The runs where device `left` and device `right` differ (see the module docs).
    pub fn diff(&mut self, left: DevId, right: DevId) -> Result<Vec<DeltaRun>, PoolError> {
        self.diff_with(left, right, &DiffOptions::default())
    }

    /// [`Metadata::diff`] with options: `Same` runs, a range of virtual blocks.
    pub fn diff_with(&mut self, left: DevId, right: DevId, opts: &DiffOptions) -> Result<Vec<DeltaRun>, PoolError> {
        Ok(self.diff_stats(left, right, opts)?.0)
    }

    /// [`Metadata::diff_with`], also saying how much it read.
    pub fn diff_stats(
        &mut self,
        left: DevId,
        right: DevId,
        opts: &DiffOptions,
    ) -> Result<(Vec<DeltaRun>, DiffStats), PoolError> {
        let l = self.dev(left)?.root;
        let r = self.dev(right)?.root;
        self.diff_roots(l, r, opts)
    }

    /// The diff of two mapping trees given by their roots (for trees pinned or held
    /// apart from the devices, such as a held metadata snapshot's).
    pub fn diff_roots(
        &mut self,
        left_root: u64,
        right_root: u64,
        opts: &DiffOptions,
    ) -> Result<(Vec<DeltaRun>, DiffStats), PoolError> {
        let mut walk = self.diff_walk(left_root, right_root, opts)?;
        while !self.diff_step(&mut walk, u64::MAX)? {}
        Ok(walk.finish())
    }

    /// Start a diff of two mapping trees that is walked in steps
    /// ([`Metadata::diff_step`]), so a caller may let go of the metadata between
    /// steps. The trees must not change until the walk ends: hold them (see
    /// [`Metadata::hold_mappings`]) or keep the metadata locked.
    pub fn diff_walk(&mut self, left_root: u64, right_root: u64, opts: &DiffOptions) -> Result<DiffWalk, PoolError> {
        let nr_data = self.t.data_counts().nr_blocks();
        diff_walk_in(&mut self.t, left_root, right_root, opts, nr_data)
    }

    /// Walk on until the diff is complete (`true`) or `max_nodes` nodes were read
    /// in this step (`false`: call again).
    pub fn diff_step(&mut self, w: &mut DiffWalk, max_nodes: u64) -> Result<bool, PoolError> {
        diff_step_in(&mut self.t, w, max_nodes)
    }
}

/// [`Metadata::diff_walk`] over any source of validated nodes (the transaction
/// manager, or a storage read directly): mapped data blocks must be below
/// `nr_data_blocks`.
pub fn diff_walk_in<S: NodeSource + ?Sized>(
    src: &mut S,
    left_root: u64,
    right_root: u64,
    opts: &DiffOptions,
    nr_data_blocks: u64,
) -> Result<DiffWalk, PoolError> {
    let mut sides = [left_root, right_root].map(|root| Side { stack: Vec::new(), last: None, root });
    if opts.to.is_none_or(|t| t > opts.from) {
        for s in &mut sides {
            let height = height_of(src, s.root)?;
            s.stack.push(Item::Node { block: s.root, lo: 0, hi: None, height });
        }
    }
    let [a, b] = sides;
    Ok(DiffWalk {
        a,
        b,
        runs: Runs { out: Vec::new(), include_same: opts.include_same },
        opts: *opts,
        stats: DiffStats::default(),
        nr_data: nr_data_blocks,
    })
}

/// Levels above the leaves of the tree at `root` (0: a lone leaf), down its
/// leftmost spine.
fn height_of<S: NodeSource + ?Sized>(src: &mut S, root: u64) -> Result<usize, PoolError> {
    let mut b = root;
    for level in 0..btree::MAX_DEPTH {
        let blk = src.read_node(b, MAPPING.size())?;
        let h = node::header(&blk);
        if h.is_leaf() || h.nr_entries == 0 {
            return Ok(level);
        }
        b = node::value_u64(&blk, &h, 0);
    }
    Err(MetaError::corrupt(root, Corruption::TooDeep).into())
}

/// [`Metadata::diff_step`] over any source of validated nodes.
pub fn diff_step_in<S: NodeSource + ?Sized>(src: &mut S, w: &mut DiffWalk, max_nodes: u64) -> Result<bool, PoolError> {
    let from = w.opts.from.0;
    let to = w.opts.to.map(|t| t.0);
    let include_same = w.opts.include_same;
    let nr_data = w.nr_data;
    let limit = w.stats.nodes_read.saturating_add(max_nodes.max(1));
    let DiffWalk { a, b, runs, stats, .. } = w;
    loop {
        if stats.nodes_read >= limit {
            return Ok(false);
        }
        match (a.stack.last().copied(), b.stack.last().copied()) {
            (None, None) => return Ok(true),
            (Some(Item::Entry { key: ka, data: da }), Some(Item::Entry { key: kb, data: db })) => {
                if ka < kb {
                    take(a, ka)?;
                    runs.push(DeltaKind::LeftOnly, ka);
                } else if kb < ka {
                    take(b, kb)?;
                    runs.push(DeltaKind::RightOnly, kb);
                } else {
                    take(a, ka)?;
                    take(b, kb)?;
                    runs.push(if da == db { DeltaKind::Same } else { DeltaKind::Different }, ka);
                }
            }
            (Some(Item::Entry { key, .. }), None) => {
                take(a, key)?;
                runs.push(DeltaKind::LeftOnly, key);
            }
            (None, Some(Item::Entry { key, .. })) => {
                take(b, key)?;
                runs.push(DeltaKind::RightOnly, key);
            }
            (Some(Item::Node { block: x, .. }), Some(Item::Node { block: y, .. })) if x == y => {
                // The same subtree on both sides: identical mappings.
                a.stack.pop();
                b.stack.pop();
                stats.shared_skipped += 1;
                if include_same {
                    same_subtree(src, x, from, to, runs)?;
                }
            }
            (Some(Item::Node { lo: la, height: ha, .. }), Some(Item::Node { lo: lb, height: hb, .. })) => {
                // Descend where the keys start first; on a tie, the taller one
                // (the other may be one of its subtrees).
                if (la, std::cmp::Reverse(ha)) <= (lb, std::cmp::Reverse(hb)) {
                    expand(src, a, from, to, stats, nr_data)?;
                } else {
                    expand(src, b, from, to, stats, nr_data)?;
                }
            }
            (Some(Item::Node { lo, .. }), Some(Item::Entry { key, .. })) => {
                if lo > key {
                    take(b, key)?;
                    runs.push(DeltaKind::RightOnly, key);
                } else {
                    expand(src, a, from, to, stats, nr_data)?;
                }
            }
            (Some(Item::Entry { key, .. }), Some(Item::Node { lo, .. })) => {
                if lo > key {
                    take(a, key)?;
                    runs.push(DeltaKind::LeftOnly, key);
                } else {
                    expand(src, b, from, to, stats, nr_data)?;
                }
            }
            (Some(Item::Node { .. }), None) => expand(src, a, from, to, stats, nr_data)?,
            (None, Some(Item::Node { .. })) => expand(src, b, from, to, stats, nr_data)?,
        }
    }
}

/// Replace the front node of `s` by its entries or children within `[from, to)`.
fn expand<S: NodeSource + ?Sized>(
    src: &mut S,
    s: &mut Side,
    from: u64,
    to: Option<u64>,
    stats: &mut DiffStats,
    nr_data: u64,
) -> Result<(), PoolError> {
    let Some(Item::Node { block, lo, hi, height }) = s.stack.pop() else { return Ok(()) };
    stats.nodes_read += 1;
    let blk = src.read_node(block, MAPPING.size())?;
    let blk = &*blk;
    let h = node::header(blk);
    if h.is_leaf() != (height == 0) {
        return Err(corrupt(block, "mapping tree has leaves at different depths".to_string()));
    }
    let nr = h.nr_entries as usize;
    let within = |k: u64| k >= lo && hi.is_none_or(|hi| k < hi);
    // Pushed back to front: the front is on top.
    for i in (0..nr).rev() {
        let k = node::key(blk, i);
        if !within(k) {
            return Err(corrupt(block, format!("key {k} outside the range its parent gives ({lo}..)")));
        }
        if h.is_leaf() {
            if k < from || to.is_some_and(|t| k >= t) {
                continue;
            }
            let data = unpack_block_time(node::value_u64(blk, &h, i)).0;
            if data >= nr_data {
                return Err(corrupt(
                    block,
                    format!("virtual block {k} maps to data block {data}, past the end of the data device ({nr_data} blocks)"),
                ));
            }
            s.stack.push(Item::Entry { key: k, data });
        } else {
            let child_hi = if i + 1 < nr { Some(node::key(blk, i + 1)) } else { hi };
            // Children wholly outside [from, to) are not needed.
            if child_hi.is_some_and(|ch| ch <= from) || to.is_some_and(|t| k >= t) {
                continue;
            }
            let child = node::value_u64(blk, &h, i);
            s.stack.push(Item::Node { block: child, lo: k, hi: child_hi, height: height - 1 });
        }
    }
    Ok(())
}

/// Collects the keys a walk visits.
struct Keys(Vec<u64>);

impl NodeVisitor for Keys {
    fn entry(&mut self, key: u64, _value: &[u8]) -> Result<Step, MetaError> {
        self.0.push(key);
        Ok(Step::Descend)
    }
}

/// Every entry of a subtree both devices share, within `[from, to)`, as `Same`.
fn same_subtree<S: NodeSource + ?Sized>(
    src: &mut S,
    root: u64,
    from: u64,
    to: Option<u64>,
    runs: &mut Runs,
) -> Result<(), PoolError> {
    let mut keys = Keys(Vec::new());
    btree::walk(src, root, Walk { values: MAPPING, lo: from, hi: to, once: true }, &mut keys)?;
    for k in keys.0 {
        runs.push(DeltaKind::Same, k);
    }
    Ok(())
}

/// The value of the first entry a walk visits.
struct FirstValue(Option<u64>);

impl NodeVisitor for FirstValue {
    fn entry(&mut self, _key: u64, value: &[u8]) -> Result<Step, MetaError> {
        self.0 = Some(btree::u64_of(value));
        Ok(Step::Stop)
    }
}

/// Nodes read straight from a metadata storage: no cache, no engine; each read
/// checks the checksum, the blocknr and the node's structure.
struct StorageNodes<'a>(&'a dyn MetaStorage);

impl NodeSource for StorageNodes<'_> {
    fn read_node(&mut self, b: u64, value_size: u32) -> Result<Box<crate::format::Block>, MetaError> {
        let nr_blocks = self.0.nr_blocks();
        if b >= nr_blocks {
            return Err(MetaError::corrupt(b, Corruption::PastEnd { nr_blocks }));
        }
        let mut blk = crate::format::zeroed_block();
        self.0.read_block(b, &mut blk).map_err(MetaError::Io)?;
        node::validate(&blk, b, value_size).map_err(|e| MetaError::corrupt(b, Corruption::Node(e)))?;
        Ok(blk)
    }
}

/// The diff of devices `left` and `right` as last committed to `storage` (a pool's
/// metadata), read straight from it: no space maps are loaded and nothing is cached,
/// so the cost is the nodes on the changed paths. For a pool no one else changes
/// (an offline pool under its lock); a live pool's engine holds newer state.
pub fn diff_committed(
    storage: &dyn MetaStorage,
    left: DevId,
    right: DevId,
    opts: &DiffOptions,
) -> Result<(Vec<DeltaRun>, DiffStats), PoolError> {
    if storage.nr_blocks() == 0 {
        return Err(MetaError::corrupt(0, Corruption::PastEnd { nr_blocks: 0 }).into());
    }
    let mut raw = crate::format::zeroed_block();
    storage.read_block(0, &mut raw).map_err(MetaError::Io)?;
    let sb = Superblock::decode(&raw, 0).map_err(|e| MetaError::corrupt(0, Corruption::Superblock(e)))?;
    let mut src = StorageNodes(storage);
    let mut root_of = |id: DevId| -> Result<u64, PoolError> {
        let id64 = u64::from(id);
        let mut first = FirstValue(None);
        btree::walk(&mut src, sb.data_mapping_root, Walk::range(TOP_LEVEL, id64, id64 + 1), &mut first)?;
        first.0.ok_or(PoolError::NoSuchDevice(id))
    };
    let (l, r) = (root_of(left)?, root_of(right)?);
    let mut w = diff_walk_in(&mut src, l, r, opts, sb.data_sm_root.nr_blocks)?;
    while !diff_step_in(&mut src, &mut w, u64::MAX)? {}
    Ok(w.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;

    fn md() -> Metadata {
        Metadata::format(Box::new(MemStorage::new(64 << 20)), 128, 1 << 20).expect("format")
    }

    fn map_n(m: &mut Metadata, id: DevId, keys: impl Iterator<Item = u64>) {
        for k in keys {
            let b = m.alloc_data_block().expect("alloc").expect("room");
            m.insert_mapping(id, k, b).expect("map");
        }
    }

    fn naive(m: &mut Metadata, l: DevId, r: DevId, same: bool) -> Vec<DeltaRun> {
        let lm: BTreeMap<u64, u64> =
            m.mappings(l, 0, u64::MAX).expect("l").iter().map(|x| (x.vblock, x.data_block)).collect();
        let rm: BTreeMap<u64, u64> =
            m.mappings(r, 0, u64::MAX).expect("r").iter().map(|x| (x.vblock, x.data_block)).collect();
        let mut keys: Vec<u64> = lm.keys().chain(rm.keys()).copied().collect();
        keys.sort_unstable();
        keys.dedup();
        let mut runs = Runs { out: Vec::new(), include_same: same };
        for k in keys {
            let kind = match (lm.get(&k), rm.get(&k)) {
                (Some(a), Some(b)) if a == b => DeltaKind::Same,
                (Some(_), Some(_)) => DeltaKind::Different,
                (Some(_), None) => DeltaKind::LeftOnly,
                _ => DeltaKind::RightOnly,
            };
            runs.push(kind, k);
        }
        runs.out
    }

    #[test]
    fn a_snapshot_of_a_large_device_diffs_by_reading_only_the_changed_paths() {
        let mut m = md();
        m.create_thin(0).expect("create");
        map_n(&mut m, 0, 0..100_000);
        m.commit(&mut || Ok(())).expect("commit");
        m.create_snap(1, 0).expect("snap");
        // Ten scattered changes on the origin, one block unmapped, two added past the end.
        for k in (0..10u64).map(|i| i * 9_973 + 5) {
            let b = m.alloc_data_block().expect("alloc").expect("room");
            m.insert_mapping(0, k, b).expect("map");
        }
        m.remove_mapping(0, 50_000).expect("unmap");
        map_n(&mut m, 0, 200_000..200_002);
        let (runs, stats) = m.diff_stats(1, 0, &DiffOptions::default()).expect("diff");
        assert_eq!(runs, naive(&mut m, 1, 0, false));
        assert_eq!(runs.len(), 12);
        assert_eq!(runs[runs.len() - 1], DeltaRun { kind: DeltaKind::RightOnly, begin: VirtBlock(200_000), len: 2 });
        assert!(runs.contains(&DeltaRun { kind: DeltaKind::LeftOnly, begin: VirtBlock(50_000), len: 1 }));
        // 100,000 mappings fill about 500 leaves; the changed paths are a few dozen nodes.
        assert!(stats.nodes_read < 80, "read {} nodes", stats.nodes_read);
        assert!(stats.shared_skipped > 0);
        // The same diff with Same runs reads everything and agrees with the naive one.
        let all = m.diff_with(1, 0, &DiffOptions { include_same: true, ..Default::default() }).expect("all");
        assert_eq!(all, naive(&mut m, 1, 0, true));
        let blocks: u64 = all.iter().map(|r| r.len).sum();
        assert_eq!(blocks, 100_002);
        // Swapping the sides swaps left_only and right_only.
        let swapped = m.diff(0, 1).expect("swapped");
        assert_eq!(swapped, naive(&mut m, 0, 1, false));
    }

    #[test]
    fn a_range_limits_the_runs_and_cuts_them_at_its_ends() {
        let mut m = md();
        m.create_thin(0).expect("create");
        m.create_thin(1).expect("create");
        map_n(&mut m, 0, 0..3000);
        let opts = DiffOptions::range(VirtBlock(100), VirtBlock(2500));
        assert_eq!(
            m.diff_with(0, 1, &opts).expect("diff"),
            vec![DeltaRun { kind: DeltaKind::LeftOnly, begin: VirtBlock(100), len: 2400 }]
        );
        assert!(m.diff_with(0, 1, &DiffOptions::range(VirtBlock(5), VirtBlock(5))).expect("empty").is_empty());
        assert!(m.diff_with(0, 1, &DiffOptions::range(VirtBlock(3000), VirtBlock(9000))).expect("past").is_empty());
        assert!(m.diff(0, 0).expect("self").is_empty());
        assert!(matches!(m.diff(0, 7), Err(PoolError::NoSuchDevice(7))));
    }
}
