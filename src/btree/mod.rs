//! Copy-on-write B-trees in the dm-thin node format.
//!
//! Every change shadows the path it touches (spec §5.1): a block allocated in the
//! current transaction and not shared is changed in place; any other block is copied
//! to a new block, and when the original was shared (count > 1) the copy's children
//! (internal nodes) or values (leaves, through [`Values`]) gain a reference.
//!
//! The algorithms differ from the kernel's (splits happen on the way up, rebalancing
//! after a removal), but keep every invariant of spec §3.2: leaves at one depth, keys
//! strictly ascending, a parent key <= its child's first key, non-root nodes at least a
//! third full, `max_entries` divisible by 3, internal nodes with value_size 8.

use crate::error::{Corruption, MetaError};
use crate::format::checksum::BlockKind;
use crate::format::node::{self, NodeHeader, INTERNAL, LEAF};
use crate::format::values::unpack_block_time;
use crate::format::{zeroed_block, Block};
use crate::transaction::Txn;

/// Deepest tree accepted; anything deeper is a cycle.
pub const MAX_DEPTH: usize = 24;

/// What the values of a tree refer to, which decides reference counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Bottom-level mapping tree: block_time values referencing data blocks.
    Mapping,
    /// Top-level mapping tree: values are roots of bottom-level trees.
    Subtrees,
    /// Values that reference nothing, of this many bytes.
    Plain(u32),
}

/// Value size of device-details leaves.
pub const DETAILS: Values = Values::Plain(24);
/// Value size of data space-map index leaves.
pub const SM_INDEX: Values = Values::Plain(16);
/// Value size of ref-count tree leaves.
pub const REF_COUNTS: Values = Values::Plain(4);

impl Values {
    /// Leaf value size in bytes.
    pub fn size(self) -> u32 {
        match self {
            Values::Mapping | Values::Subtrees => 8,
            Values::Plain(n) => n,
        }
    }
}

/// A value copied out of a node (at most 24 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Val {
    bytes: [u8; 24],
    len: u8,
}

impl Val {
    /// Copy `v` (at most 24 bytes).
    pub fn new(v: &[u8]) -> Val {
        let mut bytes = [0u8; 24];
        let len = v.len().min(24);
        bytes[..len].copy_from_slice(&v[..len]);
        Val { bytes, len: len as u8 }
    }
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
    /// The first 8 bytes as a u64 (for 8-byte values).
    pub fn as_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[..8]);
        u64::from_le_bytes(b)
    }
}

fn too_deep(b: u64) -> MetaError {
    MetaError::corrupt(b, Corruption::TooDeep)
}

fn tree_err(b: u64, s: &str) -> MetaError {
    MetaError::corrupt(b, Corruption::Tree(s.to_string()))
}

fn u64_of(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[..8]);
    u64::from_le_bytes(b)
}

fn inc_value(t: &mut Txn, vk: Values, v: &[u8]) -> Result<(), MetaError> {
    match vk {
        Values::Mapping => t.data.inc(unpack_block_time(u64_of(v)).0),
        Values::Subtrees => t.meta.inc(u64_of(v)),
        Values::Plain(_) => Ok(()),
    }
}

fn dec_value(t: &mut Txn, vk: Values, v: &[u8]) -> Result<(), MetaError> {
    match vk {
        Values::Mapping => t.data.dec(unpack_block_time(u64_of(v)).0).map(|_| ()),
        Values::Subtrees => delete_tree(t, u64_of(v), Values::Mapping),
        Values::Plain(_) => Ok(()),
    }
}

fn values_equal(vk: Values, a: &[u8], b: &[u8]) -> bool {
    match vk {
        Values::Mapping => unpack_block_time(u64_of(a)).0 == unpack_block_time(u64_of(b)).0,
        _ => a == b,
    }
}

/// A new empty leaf (count 1) for a tree of `vk` values.
pub fn empty(t: &mut Txn, vk: Values) -> Result<u64, MetaError> {
    let b = t.alloc_meta()?;
    let mut blk = zeroed_block();
    node::init(&mut blk, LEAF, vk.size());
    t.put(b, blk, BlockKind::Node, vk.size());
    Ok(b)
}

/// Make `b` writable: itself when it is exclusive to this transaction, otherwise a copy.
fn shadow(t: &mut Txn, b: u64, vk: Values) -> Result<u64, MetaError> {
    if t.is_writable(b) {
        return Ok(b);
    }
    let copy = Box::new(*t.node(b, vk.size())?);
    let shared = t.meta.get(b) > 1;
    let nb = t.alloc_meta()?;
    t.dec_meta(b)?;
    t.put(nb, copy, BlockKind::Node, vk.size());
    if shared {
        inc_children(t, nb, vk)?;
    }
    Ok(nb)
}

fn inc_children(t: &mut Txn, b: u64, vk: Values) -> Result<(), MetaError> {
    let blk = t.node(b, vk.size())?;
    let h = node::header(blk);
    if h.is_leaf() {
        if let Values::Plain(_) = vk {
            return Ok(());
        }
        let vals: Vec<u64> = (0..h.nr_entries as usize).map(|i| node::value_u64(blk, &h, i)).collect();
        for v in vals {
            inc_value(t, vk, &v.to_le_bytes())?;
        }
    } else {
        let kids: Vec<u64> = (0..h.nr_entries as usize).map(|i| node::value_u64(blk, &h, i)).collect();
        for k in kids {
            t.meta.inc(k)?;
        }
    }
    Ok(())
}

/// Look `key` up.
pub fn lookup(t: &mut Txn, root: u64, key: u64, vk: Values) -> Result<Option<Val>, MetaError> {
    let mut b = root;
    for _ in 0..MAX_DEPTH {
        let blk = t.node(b, vk.size())?;
        let h = node::header(blk);
        let Some(i) = node::lower_bound(blk, &h, key) else {
            return Ok(None);
        };
        if h.is_leaf() {
            return Ok((node::key(blk, i) == key).then(|| Val::new(node::value(blk, &h, i))));
        }
        b = node::value_u64(blk, &h, i);
    }
    Err(too_deep(b))
}

/// Look up an 8-byte value.
pub fn lookup_u64(t: &mut Txn, root: u64, key: u64, vk: Values) -> Result<Option<u64>, MetaError> {
    Ok(lookup(t, root, key, vk)?.map(|v| v.as_u64()))
}

/// What [`insert`] did.
#[derive(Debug, Clone, Copy)]
pub struct Inserted {
    /// The tree's root after the insert.
    pub root: u64,
    /// The value the key had before, if any.
    pub old: Option<Val>,
}

/// How an insert treats the value it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Drop the old value's reference when it differs (the usual insert).
    DecOld,
    /// Overwrite without touching references (the caller moved them already).
    Raw,
}

enum Up {
    Done(u64),
    Split { left: u64, right_key: u64, right: u64 },
}

/// Insert or overwrite `key`. A new value's reference is handed over by the caller
/// (insert never increments it).
pub fn insert(
    t: &mut Txn,
    root: u64,
    key: u64,
    value: &[u8],
    vk: Values,
    replace: Replace,
) -> Result<Inserted, MetaError> {
    let mut old = None;
    let up = insert_rec(t, root, key, value, vk, 0, &mut old)?;
    let root = match up {
        Up::Done(r) => r,
        Up::Split { left, right_key, right } => {
            let left_key = node::key(t.node_mut(left)?, 0);
            let nr = t.alloc_meta()?;
            let mut blk = zeroed_block();
            let mut h = node::init(&mut blk, INTERNAL, 8);
            node::insert_at(&mut blk, &mut h, 0, left_key, &left.to_le_bytes());
            node::insert_at(&mut blk, &mut h, 1, right_key, &right.to_le_bytes());
            t.put(nr, blk, BlockKind::Node, vk.size());
            nr
        }
    };
    if let (Some(o), Replace::DecOld) = (old, replace) {
        if !values_equal(vk, o.as_bytes(), value) {
            dec_value(t, vk, o.as_bytes())?;
        }
    }
    Ok(Inserted { root, old })
}

fn insert_rec(
    t: &mut Txn,
    b: u64,
    key: u64,
    value: &[u8],
    vk: Values,
    depth: usize,
    old: &mut Option<Val>,
) -> Result<Up, MetaError> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    let nb = shadow(t, b, vk)?;
    let blk = t.node_mut(nb)?;
    let h = node::header(blk);
    let lb = node::lower_bound(blk, &h, key);
    if h.is_leaf() {
        if let Some(i) = lb {
            if node::key(blk, i) == key {
                *old = Some(Val::new(node::value(blk, &h, i)));
                node::set_value(blk, &h, i, value);
                return Ok(Up::Done(nb));
            }
        }
        return insert_entry(t, nb, h, lb.map_or(0, |i| i + 1), key, value, vk);
    }
    if h.nr_entries == 0 {
        return Err(tree_err(nb, "internal btree node with no entries"));
    }
    let i = match lb {
        Some(i) => i,
        None => {
            node::set_key(blk, 0, key);
            0
        }
    };
    let child = node::value_u64(blk, &h, i);
    match insert_rec(t, child, key, value, vk, depth + 1, old)? {
        Up::Done(c) => {
            node::set_value_u64(t.node_mut(nb)?, &h, i, c);
            Ok(Up::Done(nb))
        }
        Up::Split { left, right_key, right } => {
            node::set_value_u64(t.node_mut(nb)?, &h, i, left);
            insert_entry(t, nb, h, i + 1, right_key, &right.to_le_bytes(), vk)
        }
    }
}

/// Insert an entry at `pos` of writable node `nb`, splitting it when full.
fn insert_entry(
    t: &mut Txn,
    nb: u64,
    mut h: NodeHeader,
    pos: usize,
    key: u64,
    value: &[u8],
    vk: Values,
) -> Result<Up, MetaError> {
    if h.nr_entries < h.max_entries {
        node::insert_at(t.node_mut(nb)?, &mut h, pos, key, value);
        return Ok(Up::Done(nb));
    }
    let rb = t.alloc_meta()?;
    let mut right = zeroed_block();
    let mut rh = NodeHeader { nr_entries: 0, ..h };
    node::write_header(&mut right, &rh);
    let nr = h.nr_entries as usize;
    let mid = nr / 2;
    {
        let left = t.node_mut(nb)?;
        node::append_from(&mut right, &mut rh, left, &h, mid, nr - mid);
        node::set_nr_entries(left, &mut h, mid as u32);
        if pos <= mid {
            node::insert_at(left, &mut h, pos, key, value);
        } else {
            node::insert_at(&mut right, &mut rh, pos - mid, key, value);
        }
    }
    let right_key = node::key(&right, 0);
    t.put(rb, right, BlockKind::Node, vk.size());
    Ok(Up::Split { left: nb, right_key, right: rb })
}

/// Remove `key` (dropping its value's reference). Returns the new root and the old
/// value; a missing key changes nothing.
pub fn remove(t: &mut Txn, root: u64, key: u64, vk: Values) -> Result<(u64, Option<Val>), MetaError> {
    if lookup(t, root, key, vk)?.is_none() {
        return Ok((root, None));
    }
    let (mut r, old) = remove_rec(t, root, key, vk, 0)?;
    // An internal root with one child is replaced by that child.
    loop {
        let blk = t.node(r, vk.size())?;
        let h = node::header(blk);
        if h.is_leaf() || h.nr_entries != 1 {
            break;
        }
        let child = node::value_u64(blk, &h, 0);
        if t.meta.get(r) > 1 {
            t.meta.inc(child)?;
        }
        t.dec_meta(r)?;
        r = child;
    }
    dec_value(t, vk, old.as_bytes())?;
    Ok((r, Some(old)))
}

fn remove_rec(t: &mut Txn, b: u64, key: u64, vk: Values, depth: usize) -> Result<(u64, Val), MetaError> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    let nb = shadow(t, b, vk)?;
    let blk = t.node_mut(nb)?;
    let mut h = node::header(blk);
    let i = node::lower_bound(blk, &h, key).ok_or_else(|| tree_err(nb, "key vanished during removal"))?;
    if h.is_leaf() {
        if node::key(blk, i) != key {
            return Err(tree_err(nb, "key vanished during removal"));
        }
        let old = Val::new(node::value(blk, &h, i));
        node::remove_at(blk, &mut h, i);
        return Ok((nb, old));
    }
    let child = node::value_u64(blk, &h, i);
    let (nc, old) = remove_rec(t, child, key, vk, depth + 1)?;
    node::set_value_u64(t.node_mut(nb)?, &h, i, nc);
    let ch = node::header(t.node_mut(nc)?);
    if ch.nr_entries < ch.max_entries / 3 && h.nr_entries > 1 {
        rebalance(t, nb, i, vk)?;
    }
    Ok((nb, old))
}

/// Child `i` of writable node `parent` is under-full: merge it with a sibling or
/// share entries with it.
fn rebalance(t: &mut Txn, parent: u64, i: usize, vk: Values) -> Result<(), MetaError> {
    let ph = node::header(t.node_mut(parent)?);
    let n = ph.nr_entries as usize;
    let (li, ri) = if i + 1 < n { (i, i + 1) } else { (i - 1, i) };
    let lold = node::value_u64(t.node_mut(parent)?, &ph, li);
    let l = shadow(t, lold, vk)?;
    node::set_value_u64(t.node_mut(parent)?, &ph, li, l);
    let rold = node::value_u64(t.node_mut(parent)?, &ph, ri);
    let r = shadow(t, rold, vk)?;
    node::set_value_u64(t.node_mut(parent)?, &ph, ri, r);

    let mut lblk = Box::new(*t.node_mut(l)?);
    let rblk = Box::new(*t.node_mut(r)?);
    let mut lh = node::header(&lblk);
    let rh = node::header(&rblk);
    if lh.value_size != rh.value_size || lh.flags != rh.flags {
        return Err(tree_err(r, "sibling btree nodes of different kinds"));
    }
    let total = (lh.nr_entries + rh.nr_entries) as usize;
    let cap = lh.max_entries.min(rh.max_entries) as usize;
    if total <= cap {
        node::append_from(&mut lblk, &mut lh, &rblk, &rh, 0, rh.nr_entries as usize);
        t.put(l, lblk, BlockKind::Node, vk.size());
        let mut ph = ph;
        node::remove_at(t.node_mut(parent)?, &mut ph, ri);
        t.dec_meta(r)?;
        return Ok(());
    }
    let target_left = total / 2;
    let mut nr_blk = zeroed_block();
    let mut nrh = NodeHeader { nr_entries: 0, ..rh };
    node::write_header(&mut nr_blk, &nrh);
    if (lh.nr_entries as usize) > target_left {
        let moved = lh.nr_entries as usize - target_left;
        node::append_from(&mut nr_blk, &mut nrh, &lblk, &lh, target_left, moved);
        node::append_from(&mut nr_blk, &mut nrh, &rblk, &rh, 0, rh.nr_entries as usize);
        node::set_nr_entries(&mut lblk, &mut lh, target_left as u32);
    } else {
        let moved = target_left - lh.nr_entries as usize;
        node::append_from(&mut lblk, &mut lh, &rblk, &rh, 0, moved);
        node::append_from(&mut nr_blk, &mut nrh, &rblk, &rh, moved, rh.nr_entries as usize - moved);
    }
    let rkey = node::key(&nr_blk, 0);
    t.put(l, lblk, BlockKind::Node, vk.size());
    t.put(r, nr_blk, BlockKind::Node, vk.size());
    node::set_key(t.node_mut(parent)?, ri, rkey);
    Ok(())
}

/// Release a whole tree (spec §3.8): shared nodes are only decremented; exclusive
/// ones release their children or values and are freed.
pub fn delete_tree(t: &mut Txn, root: u64, vk: Values) -> Result<(), MetaError> {
    delete_rec(t, root, vk, 0)
}

fn delete_rec(t: &mut Txn, b: u64, vk: Values, depth: usize) -> Result<(), MetaError> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    if t.meta.get(b) > 1 {
        t.dec_meta(b)?;
        return Ok(());
    }
    let blk = t.node(b, vk.size())?;
    let h = node::header(blk);
    let vals: Vec<u64> = match (h.is_leaf(), vk) {
        (true, Values::Plain(_)) => Vec::new(),
        _ => (0..h.nr_entries as usize).map(|i| node::value_u64(blk, &h, i)).collect(),
    };
    if h.is_leaf() {
        for v in vals {
            match vk {
                Values::Mapping => {
                    t.data.dec(unpack_block_time(v).0)?;
                }
                Values::Subtrees => delete_rec(t, v, Values::Mapping, 0)?,
                Values::Plain(_) => {}
            }
        }
    } else {
        for c in vals {
            delete_rec(t, c, vk, depth + 1)?;
        }
    }
    t.dec_meta(b)?;
    Ok(())
}

/// Callback of [`visit`]: key and raw value.
pub type Visitor<'a> = dyn FnMut(u64, &[u8]) -> Result<(), MetaError> + 'a;

/// Call `f(key, value)` for every entry with `lo <= key < hi`, in key order. A node
/// reached twice (a cycle or a shared node inside one tree) is reported as corruption.
pub fn visit(t: &mut Txn, root: u64, vk: Values, lo: u64, hi: u64, f: &mut Visitor<'_>) -> Result<(), MetaError> {
    let mut seen = std::collections::HashSet::new();
    visit_rec(t, root, vk, lo, hi, f, 0, &mut seen)
}

#[allow(clippy::too_many_arguments)]
fn visit_rec(
    t: &mut Txn,
    b: u64,
    vk: Values,
    lo: u64,
    hi: u64,
    f: &mut Visitor<'_>,
    depth: usize,
    seen: &mut std::collections::HashSet<u64>,
) -> Result<(), MetaError> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    if !seen.insert(b) {
        return Err(tree_err(b, "btree node reached twice in one tree (cycle)"));
    }
    let blk: Box<Block> = Box::new(*t.node(b, vk.size())?);
    let h = node::header(&blk);
    let n = h.nr_entries as usize;
    if h.is_leaf() {
        let start = node::lower_bound(&blk, &h, lo).map_or(0, |i| if node::key(&blk, i) < lo { i + 1 } else { i });
        for i in start..n {
            let k = node::key(&blk, i);
            if k >= hi {
                break;
            }
            f(k, node::value(&blk, &h, i))?;
        }
        return Ok(());
    }
    let start = node::lower_bound(&blk, &h, lo).unwrap_or(0);
    for i in start..n {
        if node::key(&blk, i) >= hi {
            break;
        }
        visit_rec(t, node::value_u64(&blk, &h, i), vk, lo, hi, f, depth + 1, seen)?;
    }
    Ok(())
}

/// The first entry with key >= `k`, for 8-byte-valued trees.
pub fn next_at_or_after(t: &mut Txn, root: u64, k: u64, vk: Values) -> Result<Option<(u64, u64)>, MetaError> {
    // Bounds the walk on corrupt trees whose leaves are all empty.
    let mut budget = t.meta.nr_blocks().max(1);
    next_rec(t, root, k, vk, 0, &mut budget)
}

fn next_rec(
    t: &mut Txn,
    b: u64,
    k: u64,
    vk: Values,
    depth: usize,
    budget: &mut u64,
) -> Result<Option<(u64, u64)>, MetaError> {
    if depth >= MAX_DEPTH || *budget == 0 {
        return Err(too_deep(b));
    }
    *budget -= 1;
    let blk = t.node(b, vk.size())?;
    let h = node::header(blk);
    let n = h.nr_entries as usize;
    if h.is_leaf() {
        let i = match node::lower_bound(blk, &h, k) {
            Some(i) if node::key(blk, i) == k => i,
            Some(i) => i + 1,
            None => 0,
        };
        return Ok((i < n).then(|| (node::key(blk, i), node::value_u64(blk, &h, i))));
    }
    let kids: Vec<u64> = (node::lower_bound(blk, &h, k).unwrap_or(0)..n).map(|i| node::value_u64(blk, &h, i)).collect();
    for c in kids {
        if let Some(found) = next_rec(t, c, k, vk, depth + 1, budget)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::CrashStorage;
    use crate::space_map::RefCounts;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap, HashSet};

    fn txn(meta_blocks: u64) -> Txn {
        let mut meta = RefCounts::new("metadata", meta_blocks);
        meta.inc(0).expect("superblock");
        Txn::new(Box::new(CrashStorage::new(meta_blocks)), meta, RefCounts::new("data", 1 << 20))
    }

    /// Walk a tree: check shape invariants, count node references (a node reached
    /// again through another parent gains a reference, its children do not), return entries.
    fn walk(
        t: &mut Txn,
        root: u64,
        vk: Values,
        refs: &mut HashMap<u64, u32>,
        seen: &mut HashSet<u64>,
    ) -> Vec<(u64, u64)> {
        #[allow(clippy::too_many_arguments)]
        fn rec(
            t: &mut Txn,
            b: u64,
            vk: Values,
            is_root: bool,
            depth: usize,
            count: bool,
            leaf_depth: &mut Option<usize>,
            out: &mut Vec<(u64, u64)>,
            refs: &mut HashMap<u64, u32>,
            seen: &mut HashSet<u64>,
        ) {
            if count {
                *refs.entry(b).or_default() += 1;
            }
            let count_children = count && seen.insert(b);
            let blk = Box::new(*t.node(b, vk.size()).expect("node"));
            let h = node::header(&blk);
            assert!(h.max_entries % 3 == 0);
            if !is_root {
                assert!(h.nr_entries >= h.max_entries / 3, "under-full node {b}: {h:?}");
            }
            if h.is_leaf() {
                match leaf_depth {
                    Some(d) => assert_eq!(*d, depth, "leaves at different depths"),
                    None => *leaf_depth = Some(depth),
                }
                for i in 0..h.nr_entries as usize {
                    out.push((node::key(&blk, i), node::value_u64(&blk, &h, i)));
                }
                return;
            }
            for i in 0..h.nr_entries as usize {
                let c = node::value_u64(&blk, &h, i);
                let before = out.len();
                rec(t, c, vk, false, depth + 1, count_children, leaf_depth, out, refs, seen);
                if out.len() > before {
                    assert!(node::key(&blk, i) <= out[before].0, "parent key above child's first key");
                }
            }
        }
        let mut out = Vec::new();
        rec(t, root, vk, true, 0, true, &mut None, &mut out, refs, seen);
        for w in out.windows(2) {
            assert!(w[0].0 < w[1].0, "keys out of order across leaves");
        }
        out
    }

    fn check_counts(t: &mut Txn, trees: &[(u64, BTreeMap<u64, u64>)], vk: Values) {
        let mut refs = HashMap::new();
        let mut seen = HashSet::new();
        for (root, model) in trees {
            let got = walk(t, *root, vk, &mut refs, &mut seen);
            let want: Vec<(u64, u64)> = model.iter().map(|(&k, &v)| (k, v)).collect();
            assert_eq!(got, want);
        }
        for (&b, &n) in &refs {
            assert_eq!(t.meta.get(b), n, "count of block {b}");
        }
        assert_eq!(t.meta.nr_allocated(), refs.len() as u64 + 1, "leaked metadata blocks");
    }

    #[test]
    fn three_level_trees_shared_at_every_level_keep_exact_counts() {
        let mut t = txn(1 << 16);
        let vk = Values::Plain(8);
        let mut a = empty(&mut t, vk).expect("empty");
        let mut ma = BTreeMap::new();
        // Random order so that nodes end up partly full and the tree has three levels.
        let mut x = 12345u64;
        for _ in 0..60_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let k = (x >> 33) % 200_000;
            a = insert(&mut t, a, k, &k.to_le_bytes(), vk, Replace::DecOld).expect("ins").root;
            ma.insert(k, k);
        }
        t.end_transaction();
        t.meta.inc(a).expect("share");
        let (mut b, mut mb) = (a, ma.clone());
        for k in (0..200_000u64).step_by(7) {
            let (r, old) = remove(&mut t, b, k, vk).expect("rm");
            b = r;
            assert_eq!(old.map(|o| o.as_u64()), mb.remove(&k));
        }
        for k in (0..200_000u64).step_by(13) {
            a = insert(&mut t, a, k, &(k + 1).to_le_bytes(), vk, Replace::DecOld).expect("ins").root;
            ma.insert(k, k + 1);
        }
        check_counts(&mut t, &[(a, ma), (b, mb)], vk);
        delete_tree(&mut t, a, vk).expect("del");
        delete_tree(&mut t, b, vk).expect("del");
        assert_eq!(t.meta.nr_allocated(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u16),
        Remove(u16),
        Commit,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u16..3000, any::<u16>()).prop_map(|(k, v)| Op::Insert(k, v)),
            3 => (0u16..3000).prop_map(Op::Remove),
            1 => Just(Op::Commit),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn two_trees_sharing_nodes_match_their_models(ops in proptest::collection::vec((any::<bool>(), op()), 1..1500)) {
            let mut t = txn(1 << 14);
            let vk = Values::Plain(8);
            let mut roots = [empty(&mut t, vk).expect("empty"), 0];
            let mut models = [BTreeMap::new(), BTreeMap::new()];
            // Fill tree 0, then share it with tree 1 the way a snapshot does.
            for k in 0..700u64 {
                roots[0] = insert(&mut t, roots[0], k * 3, &k.to_le_bytes(), vk, Replace::DecOld).expect("ins").root;
                models[0].insert(k * 3, k);
            }
            t.meta.inc(roots[0]).expect("share");
            roots[1] = roots[0];
            models[1] = models[0].clone();
            for (which, op) in ops {
                let w = which as usize;
                match op {
                    Op::Insert(k, v) => {
                        roots[w] = insert(&mut t, roots[w], k as u64, &(v as u64).to_le_bytes(), vk, Replace::DecOld).expect("ins").root;
                        models[w].insert(k as u64, v as u64);
                    }
                    Op::Remove(k) => {
                        let (r, old) = remove(&mut t, roots[w], k as u64, vk).expect("rm");
                        roots[w] = r;
                        prop_assert_eq!(old.map(|o| o.as_u64()), models[w].remove(&(k as u64)));
                    }
                    Op::Commit => t.end_transaction(),
                }
            }
            for w in 0..2 {
                for (&k, &v) in &models[w] {
                    prop_assert_eq!(lookup_u64(&mut t, roots[w], k, vk).expect("lookup"), Some(v));
                }
            }
            check_counts(&mut t, &[(roots[0], models[0].clone()), (roots[1], models[1].clone())], vk);
            // Deleting both trees frees everything but the superblock.
            delete_tree(&mut t, roots[0], vk).expect("del");
            delete_tree(&mut t, roots[1], vk).expect("del");
            prop_assert_eq!(t.meta.nr_allocated(), 1);
        }
    }

    #[test]
    fn next_at_or_after_finds_the_following_key_across_leaves() {
        let mut t = txn(4096);
        let vk = Values::Plain(8);
        let mut r = empty(&mut t, vk).expect("empty");
        for k in (0..2000u64).map(|k| k * 2) {
            r = insert(&mut t, r, k, &k.to_le_bytes(), vk, Replace::DecOld).expect("ins").root;
        }
        assert_eq!(next_at_or_after(&mut t, r, 501, vk).expect("next"), Some((502, 502)));
        assert_eq!(next_at_or_after(&mut t, r, 3998, vk).expect("next"), Some((3998, 3998)));
        assert_eq!(next_at_or_after(&mut t, r, 3999, vk).expect("next"), None);
        let mut seen = vec![];
        visit(&mut t, r, vk, 100, 111, &mut |k, _| {
            seen.push(k);
            Ok(())
        })
        .expect("visit");
        assert_eq!(seen, vec![100, 102, 104, 106, 108, 110]);
    }
}
