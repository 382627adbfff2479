//! Copy-on-write B-trees in the dm-thin node format: lookup here, changes in
//! [`mutate`], and the one walker every reader of a tree uses in [`mod@walk`].
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
//!
//! The tree knows nothing of what its values mean: a [`Values`] says how a value
//! holds references (on data blocks, on another tree, or none), and the layer that
//! owns the tree supplies it.

pub mod mutate;
pub mod walk;

pub use mutate::{delete_tree, empty, insert, remove, Inserted, Replace};
pub use walk::{next_at_or_after, visit, walk, Node, NodeSource, NodeVisitor, Step, Visitor, Walk};

use crate::error::{Corruption, MetaError};
use crate::format::node;
use crate::transaction::Txn;

/// Deepest tree accepted; anything deeper is a cycle.
pub const MAX_DEPTH: usize = 24;

/// What the values of a tree refer to, which decides reference counting.
#[derive(Debug, Clone, Copy)]
pub enum Values {
    /// 8-byte values each holding a reference on the data block that `data_block`
    /// extracts from the value.
    DataRefs {
        /// The data block a value refers to.
        data_block: fn(&[u8]) -> u64,
    },
    /// 8-byte values that are roots of other trees, whose values are `inner`.
    Subtrees {
        /// The values of the trees below.
        inner: &'static Values,
    },
    /// Values that reference nothing, of this many bytes.
    Plain(u32),
}

impl Values {
    /// Leaf value size in bytes.
    pub fn size(self) -> u32 {
        match self {
            Values::DataRefs { .. } | Values::Subtrees { .. } => 8,
            Values::Plain(n) => n,
        }
    }

    /// Take a reference on what `v` refers to.
    fn inc(self, t: &mut Txn, v: &[u8]) -> Result<(), MetaError> {
        match self {
            Values::DataRefs { data_block } => t.inc_data(data_block(v)),
            Values::Subtrees { .. } => t.inc_meta(u64_of(v)),
            Values::Plain(_) => Ok(()),
        }
    }

    /// Drop the reference `v` holds (a subtree whose last reference goes is released).
    fn dec(self, t: &mut Txn, v: &[u8]) -> Result<(), MetaError> {
        match self {
            Values::DataRefs { data_block } => t.dec_data(data_block(v)).map(|_| ()),
            Values::Subtrees { inner } => delete_tree(t, u64_of(v), *inner),
            Values::Plain(_) => Ok(()),
        }
    }

    /// Do `a` and `b` hold the same reference (so replacing one by the other changes
    /// no count)?
    fn same_target(self, a: &[u8], b: &[u8]) -> bool {
        match self {
            Values::DataRefs { data_block } => data_block(a) == data_block(b),
            _ => a == b,
        }
    }

    /// Do leaf values hold references at all?
    fn holds_refs(self) -> bool {
        !matches!(self, Values::Plain(_))
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
        u64_of(&self.bytes)
    }
}

fn too_deep(b: u64) -> MetaError {
    MetaError::corrupt(b, Corruption::TooDeep)
}

fn tree_err(b: u64, s: &str) -> MetaError {
    MetaError::corrupt(b, Corruption::Tree(s.to_string()))
}

/// The first 8 bytes of a value as a little-endian u64 (zero-padded when shorter).
pub fn u64_of(v: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[..n].copy_from_slice(&v[..n]);
    u64::from_le_bytes(b)
}

/// Look `key` up.
pub fn lookup(t: &mut Txn, root: u64, key: u64, vk: Values) -> Result<Option<Val>, MetaError> {
    let mut b = root;
    let mut path = Vec::new();
    for _ in 0..MAX_DEPTH {
        let blk = t.node(b, vk.size()).map_err(|e| e.under(&path))?;
        let h = node::header(blk);
        let Some(i) = node::lower_bound(blk, &h, key) else {
            return Ok(None);
        };
        if h.is_leaf() {
            return Ok((node::key(blk, i) == key).then(|| Val::new(node::value(blk, &h, i))));
        }
        path.push(b);
        b = node::value_u64(blk, &h, i);
    }
    Err(too_deep(b).under(&path))
}

/// Number of levels of the tree (1 for a lone leaf), down the leftmost spine.
pub fn depth(t: &mut Txn, root: u64, vk: Values) -> Result<u64, MetaError> {
    let mut b = root;
    let mut path = Vec::new();
    for level in 1..=MAX_DEPTH as u64 {
        let blk = t.node(b, vk.size()).map_err(|e| e.under(&path))?;
        let h = node::header(blk);
        if h.is_leaf() || h.nr_entries == 0 {
            return Ok(level);
        }
        path.push(b);
        b = node::value_u64(blk, &h, 0);
    }
    Err(too_deep(b).under(&path))
}

/// The largest key of the tree, found down the rightmost spine.
pub fn last_key(t: &mut Txn, root: u64, vk: Values) -> Result<Option<u64>, MetaError> {
    let mut b = root;
    let mut path = Vec::new();
    for _ in 0..MAX_DEPTH {
        let blk = t.node(b, vk.size()).map_err(|e| e.under(&path))?;
        let h = node::header(blk);
        let Some(i) = (h.nr_entries as usize).checked_sub(1) else { return Ok(None) };
        if h.is_leaf() {
            return Ok(Some(node::key(blk, i)));
        }
        path.push(b);
        b = node::value_u64(blk, &h, i);
    }
    Err(too_deep(b).under(&path))
}

/// Look up an 8-byte value.
pub fn lookup_u64(t: &mut Txn, root: u64, key: u64, vk: Values) -> Result<Option<u64>, MetaError> {
    Ok(lookup(t, root, key, vk)?.map(|v| v.as_u64()))
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
            assert_eq!(t.meta_count(b), n, "count of block {b}");
        }
        assert_eq!(t.meta_counts().nr_allocated(), refs.len() as u64 + 1, "leaked metadata blocks");
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
        t.inc_meta(a).expect("share");
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
        assert_eq!(t.meta_counts().nr_allocated(), 1);
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
            t.inc_meta(roots[0]).expect("share");
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
            prop_assert_eq!(t.meta_counts().nr_allocated(), 1);
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
