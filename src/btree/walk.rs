//! The one B-tree walker. Every reader of a tree — lookups of ranges, usage, dump,
//! the checker, the recount — is a [`NodeVisitor`] driven by [`walk`], not its own
//! descent (the shape of thin-provisioning-tools' `btree_walker.rs`).
//!
//! The walker reads nodes through a [`NodeSource`] (the transaction manager, or the
//! checker's raw reader), visits keys in order within a range, bounds the depth,
//! refuses cycles, and hands each node to the visitor with the path of blocks from
//! the root, so errors can name where in the tree a bad block hangs.

use std::collections::HashSet;

use super::{too_deep, tree_err, Values, MAX_DEPTH};
use crate::error::MetaError;
use crate::format::node::{self, NodeHeader};
use crate::format::Block;
use crate::transaction::Txn;

/// Where the walker reads validated nodes from.
pub trait NodeSource {
    /// Block `b` as a node whose leaves hold values of `value_size` bytes, validated
    /// (checksum, blocknr, structure).
    fn read_node(&mut self, b: u64, value_size: u32) -> Result<Box<Block>, MetaError>;
}

impl NodeSource for Txn {
    fn read_node(&mut self, b: u64, value_size: u32) -> Result<Box<Block>, MetaError> {
        Ok(Box::new(*self.node(b, value_size)?))
    }
}

/// A node as the walker shows it to a visitor.
#[derive(Debug)]
pub struct Node<'a> {
    /// Its block.
    pub block: u64,
    /// Its bytes (validated).
    pub data: &'a Block,
    /// Its header.
    pub header: NodeHeader,
    /// The blocks from the root down to its parent (empty for the root).
    pub path: &'a [u64],
    /// The parent's key for it (the smallest key it may hold), `None` for the root.
    pub parent_key: Option<u64>,
    /// The key of its next sibling (keys must stay below it), when there is one.
    pub next_key: Option<u64>,
}

impl Node<'_> {
    /// Depth of the node (the root is 0).
    pub fn depth(&self) -> usize {
        self.path.len()
    }
    /// Key `i`.
    pub fn key(&self, i: usize) -> u64 {
        node::key(self.data, i)
    }
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.header.nr_entries as usize
    }
    /// Has it no entries?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Value `i` as a u64 (children of internal nodes, 8-byte leaf values).
    pub fn value_u64(&self, i: usize) -> u64 {
        node::value_u64(self.data, &self.header, i)
    }
}

/// What the visitor wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Go on (into the node's entries or children, or to the next entry).
    Descend,
    /// Leave this node's entries and children alone.
    Skip,
    /// End the whole walk.
    Stop,
}

/// A reader of a tree, driven by [`walk`].
pub trait NodeVisitor {
    /// Every node, before its entries or children. The default descends.
    fn node(&mut self, _n: &Node<'_>) -> Result<Step, MetaError> {
        Ok(Step::Descend)
    }
    /// Every leaf entry inside the walk's key range, in key order.
    fn entry(&mut self, key: u64, value: &[u8]) -> Result<Step, MetaError>;
    /// Every node [`node`](Self::node) descended into, after its entries or
    /// children (post-order), unless the walk was stopped. The default does nothing.
    fn leave(&mut self, _n: &Node<'_>) -> Result<(), MetaError> {
        Ok(())
    }
    /// A node that could not be read or may not be there (too deep, a cycle, reached
    /// twice). The default ends the walk with the error, noting the path; a visitor
    /// that reports problems and goes on returns `Ok`.
    fn bad_node(&mut self, path: &[u64], _block: u64, err: MetaError) -> Result<(), MetaError> {
        Err(err.under(path))
    }
}

/// A walk's settings.
#[derive(Debug, Clone, Copy)]
pub struct Walk {
    /// Leaf values of the tree.
    pub values: Values,
    /// Smallest key visited.
    pub lo: u64,
    /// Keys at or above this are not visited; `None`: no upper bound.
    pub hi: Option<u64>,
    /// Refuse a node reached twice within the walk (a valid tree never shares nodes
    /// inside itself; sharing is between trees).
    pub once: bool,
}

impl Walk {
    /// Every key of a tree of `values`, each node once.
    pub fn all(values: Values) -> Walk {
        Walk { values, lo: 0, hi: None, once: true }
    }
    /// Keys in `[lo, hi)` of a tree of `values`, each node once.
    pub fn range(values: Values, lo: u64, hi: u64) -> Walk {
        Walk { values, lo, hi: Some(hi), once: true }
    }
}

struct Walker<'s, 'v, S: NodeSource + ?Sized, V: NodeVisitor + ?Sized> {
    src: &'s mut S,
    visitor: &'v mut V,
    cfg: Walk,
    path: Vec<u64>,
    seen: HashSet<u64>,
}

impl<S: NodeSource + ?Sized, V: NodeVisitor + ?Sized> Walker<'_, '_, S, V> {
    /// Returns `Step::Stop` when the walk must end.
    fn node(&mut self, b: u64, parent_key: Option<u64>, next_key: Option<u64>) -> Result<Step, MetaError> {
        if self.path.len() >= MAX_DEPTH {
            self.visitor.bad_node(&self.path, b, too_deep(b))?;
            return Ok(Step::Skip);
        }
        if self.path.contains(&b) || (self.cfg.once && !self.seen.insert(b)) {
            self.visitor.bad_node(&self.path, b, tree_err(b, "btree node reached twice in one tree (cycle)"))?;
            return Ok(Step::Skip);
        }
        let blk = match self.src.read_node(b, self.cfg.values.size()) {
            Ok(blk) => blk,
            Err(e) => {
                self.visitor.bad_node(&self.path, b, e)?;
                return Ok(Step::Skip);
            }
        };
        let h = node::header(&blk);
        let n = Node { block: b, data: &blk, header: h, path: &self.path, parent_key, next_key };
        match self.visitor.node(&n)? {
            Step::Descend => {}
            other => return Ok(other),
        }
        let nr = h.nr_entries as usize;
        let lo = self.cfg.lo;
        let hi = self.cfg.hi;
        let past = move |k: u64| hi.is_some_and(|hi| k >= hi);
        if h.is_leaf() {
            let start = node::lower_bound(&blk, &h, lo).map_or(0, |i| if node::key(&blk, i) < lo { i + 1 } else { i });
            for i in start..nr {
                let k = node::key(&blk, i);
                if past(k) {
                    break;
                }
                if self.visitor.entry(k, node::value(&blk, &h, i))? == Step::Stop {
                    return Ok(Step::Stop);
                }
            }
            self.visitor.leave(&n)?;
            return Ok(Step::Descend);
        }
        let start = node::lower_bound(&blk, &h, lo).unwrap_or(0);
        self.path.push(b);
        for i in start..nr {
            let k = node::key(&blk, i);
            if past(k) {
                break;
            }
            let next = if i + 1 < nr { Some(node::key(&blk, i + 1)) } else { next_key };
            if self.node(node::value_u64(&blk, &h, i), Some(k), next)? == Step::Stop {
                self.path.pop();
                return Ok(Step::Stop);
            }
        }
        self.path.pop();
        let n = Node { block: b, data: &blk, header: h, path: &self.path, parent_key, next_key };
        self.visitor.leave(&n)?;
        Ok(Step::Descend)
    }
}

/// Walk the tree at `root` with `visitor`. Returns `false` when the visitor stopped
/// the walk early.
pub fn walk<S: NodeSource + ?Sized, V: NodeVisitor + ?Sized>(
    src: &mut S,
    root: u64,
    cfg: Walk,
    visitor: &mut V,
) -> Result<bool, MetaError> {
    let mut w = Walker { src, visitor, cfg, path: Vec::new(), seen: HashSet::new() };
    Ok(w.node(root, None, None)? != Step::Stop)
}

/// Callback of [`visit`]: key and raw value.
pub type Visitor<'a> = dyn FnMut(u64, &[u8]) -> Result<(), MetaError> + 'a;

struct EachEntry<'f, 'a>(&'f mut Visitor<'a>);

impl NodeVisitor for EachEntry<'_, '_> {
    fn entry(&mut self, key: u64, value: &[u8]) -> Result<Step, MetaError> {
        (self.0)(key, value)?;
        Ok(Step::Descend)
    }
}

/// Call `f(key, value)` for every entry with `lo <= key < hi`, in key order. A node
/// reached twice (a cycle or a shared node inside one tree) is reported as corruption.
pub fn visit(t: &mut Txn, root: u64, vk: Values, lo: u64, hi: u64, f: &mut Visitor<'_>) -> Result<(), MetaError> {
    walk(t, root, Walk::range(vk, lo, hi), &mut EachEntry(f)).map(|_| ())
}

struct First(Option<(u64, u64)>);

impl NodeVisitor for First {
    fn entry(&mut self, key: u64, value: &[u8]) -> Result<Step, MetaError> {
        self.0 = Some((key, super::u64_of(value)));
        Ok(Step::Stop)
    }
}

/// The first entry with key >= `k`, for 8-byte-valued trees.
pub fn next_at_or_after(t: &mut Txn, root: u64, k: u64, vk: Values) -> Result<Option<(u64, u64)>, MetaError> {
    let mut first = First(None);
    walk(t, root, Walk::range(vk, k, u64::MAX), &mut first)?;
    Ok(first.0)
}
