//! The checker's B-tree pass: a [`NodeVisitor`] on the one walker
//! ([`crate::btree::walk`]) that reads nodes straight from storage ([`RawNodes`]),
//! records every problem and goes on, counts a reference to each node each time it
//! is reached, and summarises each subtree once (post-order) so that a subtree
//! shared between trees is checked once and its summary reused.

use std::collections::{BTreeMap, HashSet};

use super::{Checker, ProblemKind};
use crate::btree::{self, Node, NodeSource, NodeVisitor, Step, Values, Walk};
use crate::error::{Corruption, MetaError};
use crate::format::checksum::{BlockKind, PrefixError};
use crate::format::node::{self, NodeError};
use crate::format::values::{unpack_block_time, DeviceDetails};
use crate::format::{zeroed_block, Block};
use crate::io::MetaStorage;
use crate::space_map::disk::Overflow;

/// Callback for leaf entries: (checker, key, value, first visit).
pub(super) type LeafFn<'f, 'a> = dyn FnMut(&mut Checker<'a>, u64, &[u8], bool) + 'f;

/// Summary of a subtree, remembered so shared subtrees are walked once.
#[derive(Debug, Clone, Copy)]
pub(super) struct Summary {
    /// Leaf entries below.
    pub(super) entries: u64,
    /// Smallest key below.
    pub(super) first: Option<u64>,
    /// Largest key below.
    pub(super) last: Option<u64>,
    /// Levels below (0 for a leaf).
    pub(super) height: usize,
}

/// Which tree is walked: decides the leaf value size, and whether the entries of a
/// subtree already checked are needed again (key sets are, bottom-level mappings
/// are not: the summary has their count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TreeKind {
    /// The top level of a mapping tree (device -> bottom-level root).
    Top,
    /// A bottom-level mapping tree (virtual block -> data block and time).
    Bottom,
    /// Any other tree, with leaf values of this many bytes.
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

/// Nodes read straight from a [`MetaStorage`], with no cache and no engine: each
/// read checks the checksum, the blocknr and the node structure (spec §3).
pub struct RawNodes<'a>(pub &'a dyn MetaStorage);

impl NodeSource for RawNodes<'_> {
    fn read_node(&mut self, b: u64, value_size: u32) -> Result<Box<Block>, MetaError> {
        let nr_blocks = self.0.nr_blocks();
        if b >= nr_blocks {
            return Err(MetaError::corrupt(b, Corruption::PastEnd { nr_blocks }));
        }
        let mut blk = zeroed_block();
        self.0.read_block(b, &mut blk)?;
        node::validate(&blk, b, value_size).map_err(|e| MetaError::corrupt(b, Corruption::Node(e)))?;
        Ok(blk)
    }
}

/// The problem a node the walker could not use stands for.
fn node_problem(err: MetaError) -> ProblemKind {
    match err {
        MetaError::Corrupt { what, .. } => match what {
            Corruption::Node(NodeError::Prefix(PrefixError::Checksum { stored, computed })) => {
                ProblemKind::Checksum { kind: BlockKind::Node, stored, computed }
            }
            Corruption::Node(NodeError::Prefix(PrefixError::BlockNr { stored })) => {
                ProblemKind::BlockNr { kind: BlockKind::Node, stored }
            }
            Corruption::Node(e) => ProblemKind::Node(e),
            Corruption::PastEnd { nr_blocks } => ProblemKind::PastEnd { nr_blocks },
            // What the walker itself refuses: too deep, or on its own path.
            _ => ProblemKind::Cycle,
        },
        MetaError::Io(e) => ProblemKind::Index { sm: "metadata", detail: format!("read error: {e}") },
        other => ProblemKind::Index { sm: "metadata", detail: other.to_string() },
    }
}

/// Is this the walker refusing a node (too deep, or a cycle), not a failed read?
fn refused(err: &MetaError) -> bool {
    matches!(err, MetaError::Corrupt { what: Corruption::TooDeep | Corruption::Tree(_), .. })
}

/// A node descended into, until the walker leaves it.
struct Frame {
    block: u64,
    /// Entries of a subtree already checked: read again, nothing counted.
    again: bool,
    depth: usize,
    /// Keys of an internal node (its children's parent keys).
    keys: Vec<u64>,
    /// Children reached so far.
    reached: usize,
    summary: Summary,
    /// Height of the first child summarised.
    child_height: Option<usize>,
}

/// The checking visitor of one tree.
struct TreeCheck<'c, 'a, 'r, 'f> {
    c: &'c mut Checker<'a>,
    kind: TreeKind,
    on_leaf: &'r mut LeafFn<'f, 'a>,
    stack: Vec<Frame>,
    /// Checked subtrees whose entries were read again in this walk (once is enough).
    again: HashSet<u64>,
    root: Option<Summary>,
}

impl TreeCheck<'_, '_, '_, '_> {
    /// A child of the innermost frame is reached: its index there, and whether the
    /// walk is reading a checked subtree again.
    fn reach(&mut self) -> (Option<usize>, bool) {
        match self.stack.last_mut() {
            Some(f) => {
                f.reached += 1;
                (Some(f.reached - 1), f.again)
            }
            None => (None, false),
        }
    }

    /// The summary of child `i` of the innermost frame (or of the root) is known.
    fn summarised(&mut self, i: Option<usize>, child: u64, cs: Summary) {
        let (Some(i), Some(f)) = (i, self.stack.last_mut()) else {
            self.root = Some(cs);
            return;
        };
        let n = f.keys.len();
        // The walker reaches each child of an internal node once, in order.
        let Some(&key) = f.keys.get(i) else { return };
        let mut found = Vec::new();
        f.summary.entries += cs.entries;
        if let Some(first) = cs.first {
            if key > first {
                found.push((None, ProblemKind::ParentKey { parent_key: key, child_first_key: first }));
            }
            if i == 0 {
                f.summary.first = Some(first);
            }
        }
        if let (Some(last), true) = (cs.last, i + 1 < n) {
            let next = f.keys[i + 1];
            if last >= next {
                found.push((Some(child), ProblemKind::ChildPastNextKey { child_last_key: last, next_key: next }));
            }
        }
        if cs.last.is_some() && i + 1 == n {
            f.summary.last = cs.last;
        }
        match f.child_height {
            None => f.child_height = Some(cs.height),
            Some(h) if h != cs.height => found
                .push((Some(child), ProblemKind::Depth { expected: f.depth + 1 + h, found: f.depth + 1 + cs.height })),
            Some(_) => {}
        }
        let parent = f.block;
        for (block, kind) in found {
            self.c.problem(Some(block.unwrap_or(parent)), kind);
        }
    }
}

impl NodeVisitor for TreeCheck<'_, '_, '_, '_> {
    fn node(&mut self, n: &Node<'_>) -> Result<Step, MetaError> {
        let b = n.block;
        let (i, again) = self.reach();
        if again {
            // Only what was checked is read again; nothing is counted or reported.
            let checked = self.c.summaries.contains_key(&b) && self.again.insert(b);
            if checked {
                self.stack.push(Frame::again(b, n.depth()));
            }
            return Ok(if checked { Step::Descend } else { Step::Skip });
        }
        if !self.c.reference(b) {
            return Ok(Step::Skip);
        }
        if let Some(s) = self.c.summaries.get(&b).copied() {
            self.summarised(i, b, s);
            // Bottom-level entries of a shared subtree are not needed again (its
            // summary has the counts); key sets of the other trees are.
            if self.kind != TreeKind::Bottom && self.again.insert(b) {
                self.stack.push(Frame::again(b, n.depth()));
                return Ok(Step::Descend);
            }
            return Ok(Step::Skip);
        }
        let h = n.header;
        if h.max_entries % 3 != 0 {
            self.c.problem(Some(b), ProblemKind::MaxEntries(h.max_entries));
        }
        if n.depth() > 0 && h.nr_entries < h.max_entries / 3 {
            self.c.problem(Some(b), ProblemKind::Underfull { nr_entries: h.nr_entries, max_entries: h.max_entries });
        }
        let len = n.len();
        let leaf = h.is_leaf();
        if !leaf && len == 0 {
            self.c.problem(Some(b), ProblemKind::EmptyInternal);
        }
        self.stack.push(Frame {
            block: b,
            again: false,
            depth: n.depth(),
            keys: if leaf { Vec::new() } else { (0..len).map(|i| n.key(i)).collect() },
            reached: 0,
            summary: Summary {
                entries: if leaf { len as u64 } else { 0 },
                first: (len > 0).then(|| n.key(0)),
                last: (len > 0).then(|| n.key(len - 1)),
                height: 0,
            },
            child_height: None,
        });
        Ok(Step::Descend)
    }

    fn entry(&mut self, key: u64, value: &[u8]) -> Result<Step, MetaError> {
        let first = !self.stack.last().is_some_and(|f| f.again);
        (self.on_leaf)(self.c, key, value, first);
        Ok(Step::Descend)
    }

    fn leave(&mut self, n: &Node<'_>) -> Result<(), MetaError> {
        let Some(mut f) = self.stack.pop() else { return Ok(()) };
        if f.again {
            return Ok(());
        }
        if !n.header.is_leaf() {
            f.summary.height = f.child_height.map_or(1, |h| h + 1);
        }
        self.c.summaries.insert(n.block, f.summary);
        let i = self.stack.last().map(|p| p.reached.saturating_sub(1));
        self.summarised(i, n.block, f.summary);
        Ok(())
    }

    fn bad_node(&mut self, _path: &[u64], b: u64, err: MetaError) -> Result<(), MetaError> {
        let (i, again) = self.reach();
        if again || !self.c.reference(b) {
            return Ok(());
        }
        if refused(&err) {
            self.c.problem(Some(b), ProblemKind::Cycle);
        } else if let Some(s) = self.c.summaries.get(&b).copied() {
            // Checked before, through another parent.
            self.summarised(i, b, s);
        } else {
            self.c.problem(Some(b), node_problem(err));
        }
        Ok(())
    }
}

impl Frame {
    fn again(block: u64, depth: usize) -> Frame {
        Frame {
            block,
            again: true,
            depth,
            keys: Vec::new(),
            reached: 0,
            summary: Summary { entries: 0, first: None, last: None, height: 0 },
            child_height: None,
        }
    }
}

impl<'a> Checker<'a> {
    /// Walk the tree at `root`, counting references and checking its shape; returns
    /// its summary (`None` when the root itself is unusable). `on_leaf` gets (key,
    /// value, first) for every leaf entry; `first` is false for entries of a subtree
    /// already checked through another parent (its references were counted then).
    pub(super) fn tree(&mut self, root: u64, kind: TreeKind, on_leaf: &mut LeafFn<'_, 'a>) -> Option<Summary> {
        let storage = self.storage;
        let mut v = TreeCheck { c: self, kind, on_leaf, stack: Vec::new(), again: HashSet::new(), root: None };
        let cfg = Walk { values: Values::Plain(kind.value_size()), lo: 0, hi: None, once: false };
        // The visitor reports every problem and never fails the walk.
        let _ = btree::walk(&mut RawNodes(storage), root, cfg, &mut v);
        v.root
    }

    /// Walk a two-level mapping tree; returns dev -> (subtree root, summary), and
    /// whether the top level was read whole (no problem found in it).
    pub(super) fn mapping_tree(&mut self, root: u64) -> (BTreeMap<u64, (u64, Option<Summary>)>, bool) {
        let mut subtrees: Vec<(u64, u64, bool)> = Vec::new();
        let before = self.problems.len();
        self.tree(root, TreeKind::Top, &mut |_, k, v, first| {
            subtrees.push((k, btree::u64_of(v), first));
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
            let s = self.tree(sub, TreeKind::Bottom, &mut |c, vblock, v, first| {
                if !first {
                    return;
                }
                let (d, _) = unpack_block_time(btree::u64_of(v));
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
    pub(super) fn details_tree(&mut self, root: u64) -> (BTreeMap<u64, DeviceDetails>, bool) {
        let mut details = BTreeMap::new();
        let before = self.problems.len();
        self.tree(root, TreeKind::Plain(24), &mut |_, k, v, _| {
            details.insert(k, DeviceDetails::decode(v));
        });
        let whole = self.problems.len() == before;
        (details, whole)
    }

    /// Walk an overflow ref-count tree.
    pub(super) fn overflow_tree(&mut self, root: u64) -> Overflow {
        let mut out = Overflow::default();
        self.tree(root, TreeKind::Plain(4), &mut |_, k, v, _| out.add(k, v));
        out
    }
}
