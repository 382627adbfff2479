//! The recount the model tests use: every reference recomputed from the live
//! (possibly uncommitted) trees through the transaction manager and compared with
//! the in-memory space maps. The strict checker ([`super::check`]) does the same for
//! what is on disk; both walk trees with [`crate::btree::walk()`].

use std::collections::{HashMap, HashSet};

use crate::btree::{self, Node, NodeVisitor, Step, Values, Walk};
use crate::error::MetaError;
use crate::format::superblock::Superblock;
use crate::thin::{Metadata, DETAILS, MAPPING, TOP_LEVEL};
use crate::transaction::Txn;

/// References counted by walking trees.
#[derive(Debug, Default)]
struct Recount {
    meta: HashMap<u64, u32>,
    data: HashMap<u64, u32>,
    seen: HashSet<u64>,
}

/// Counts the references one tree holds; collects the subtrees its values name.
struct Counter<'a> {
    rc: &'a mut Recount,
    values: Values,
    subtrees: Vec<(u64, u64)>,
}

impl NodeVisitor for Counter<'_> {
    fn node(&mut self, n: &Node<'_>) -> Result<Step, MetaError> {
        *self.rc.meta.entry(n.block).or_default() += 1;
        // A node shared with another tree is counted each time but walked once.
        Ok(if self.rc.seen.insert(n.block) { Step::Descend } else { Step::Skip })
    }

    fn entry(&mut self, key: u64, value: &[u8]) -> Result<Step, MetaError> {
        match self.values {
            Values::DataRefs { data_block } => *self.rc.data.entry(data_block(value)).or_default() += 1,
            Values::Subtrees { .. } => self.subtrees.push((key, btree::u64_of(value))),
            Values::Plain(_) => {}
        }
        Ok(Step::Descend)
    }
}

impl Recount {
    /// Count one reference to the tree at `root` and everything below it, walking
    /// each node once. `overrides` replaces subtree roots (a device's pending root).
    fn tree(&mut self, t: &mut Txn, root: u64, values: Values, overrides: &HashMap<u64, u64>) -> Result<(), String> {
        let mut c = Counter { rc: self, values, subtrees: Vec::new() };
        btree::walk(t, root, Walk { once: false, ..Walk::all(values) }, &mut c).map_err(|e| e.to_string())?;
        let subs = std::mem::take(&mut c.subtrees);
        if let Values::Subtrees { inner } = values {
            for (key, stored) in subs {
                let sub = overrides.get(&key).copied().unwrap_or(stored);
                self.tree(t, sub, *inner, &HashMap::new())?;
            }
        }
        Ok(())
    }
}

/// Count the entries of a tree.
fn count_entries(t: &mut Txn, root: u64, values: Values) -> Result<u64, String> {
    let mut n = 0u64;
    btree::visit(t, root, values, 0, u64::MAX, &mut |_, _| {
        n += 1;
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(n)
}

/// Recount every reference from the current (possibly uncommitted) trees and
/// compare with the in-memory space maps: each metadata block's count with the
/// references to it, each data block's count with the number of distinct
/// bottom-level leaves mapping it, and each device's mapped_blocks with its
/// mappings. For tests and `--paranoid` runs; it walks all metadata.
pub fn audit(md: &mut Metadata) -> Result<(), String> {
    let (t, roots) = md.recount_view();
    let mut rc = Recount::default();
    let none = HashMap::new();
    rc.meta.insert(0, 1);
    if roots.held_root != 0 {
        *rc.meta.entry(roots.held_root).or_default() += 1;
        let raw = t.read_uncached(roots.held_root).map_err(|e| e.to_string())?;
        let held = Superblock::decode(&raw, roots.held_root).map_err(|e| e.to_string())?;
        rc.tree(t, held.data_mapping_root, TOP_LEVEL, &none)?;
        rc.tree(t, held.device_details_root, DETAILS, &none)?;
    }
    let pending: HashMap<u64, u64> = roots.device_roots.iter().map(|(&id, &(root, _))| (id as u64, root)).collect();
    rc.tree(t, roots.mapping_root, TOP_LEVEL, &pending)?;
    rc.tree(t, roots.details_root, DETAILS, &none)?;
    for &(root, values) in &roots.space_map_trees {
        rc.tree(t, root, values, &none)?;
    }
    for &b in &roots.space_map_blocks {
        *rc.meta.entry(b).or_default() += 1;
    }
    for (id, &(root, mapped_blocks)) in &roots.device_roots {
        if !rc.seen.contains(&root) {
            return Err(format!("device {id}: root {root} is not reachable from the top-level tree"));
        }
        let n = count_entries(t, root, MAPPING)?;
        if n != mapped_blocks {
            return Err(format!("device {id}: mapped_blocks {mapped_blocks} but {n} mappings"));
        }
    }
    let meta = t.meta_counts();
    let mut used = 0;
    for b in 0..meta.nr_blocks() {
        let want = rc.meta.get(&b).copied().unwrap_or(0);
        let have = meta.get(b);
        if want != have {
            return Err(format!("metadata block {b}: count {have}, referenced {want} times"));
        }
        used += u64::from(have != 0);
    }
    if used != meta.nr_allocated() {
        return Err(format!("metadata nr_allocated {} but {used} blocks in use", meta.nr_allocated()));
    }
    let data = t.data_counts();
    let mut used = 0;
    for b in 0..data.nr_blocks() {
        let want = rc.data.get(&b).copied().unwrap_or(0);
        let have = data.get(b);
        if want != have {
            return Err(format!("data block {b}: count {have}, mapped from {want} distinct leaves"));
        }
        used += u64::from(have != 0);
    }
    if used != data.nr_allocated() || used + data.nr_free() != data.nr_blocks() {
        return Err(format!(
            "data: {used} blocks in use, nr_allocated {}, free {}, total {}",
            data.nr_allocated(),
            data.nr_free(),
            data.nr_blocks()
        ));
    }
    Ok(())
}
