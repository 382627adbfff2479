//! Changing a tree: insert, remove (with rebalancing), delete a whole tree. Every
//! change shadows the nodes it touches (spec §5.1) and keeps the reference counts of
//! nodes and values (through [`Values`]) exact.

use super::{lookup, too_deep, tree_err, Val, Values, MAX_DEPTH};
use crate::error::MetaError;
use crate::format::checksum::BlockKind;
use crate::format::node::{self, NodeHeader, INTERNAL, LEAF};
use crate::format::zeroed_block;
use crate::transaction::Txn;

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
    let shared = t.meta_count(b) > 1;
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
        if !vk.holds_refs() {
            return Ok(());
        }
        let vals: Vec<u64> = (0..h.nr_entries as usize).map(|i| node::value_u64(blk, &h, i)).collect();
        for v in vals {
            vk.inc(t, &v.to_le_bytes())?;
        }
    } else {
        let kids: Vec<u64> = (0..h.nr_entries as usize).map(|i| node::value_u64(blk, &h, i)).collect();
        for k in kids {
            t.inc_meta(k)?;
        }
    }
    Ok(())
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
        if !vk.same_target(o.as_bytes(), value) {
            vk.dec(t, o.as_bytes())?;
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
        if t.meta_count(r) > 1 {
            t.inc_meta(child)?;
        }
        t.dec_meta(r)?;
        r = child;
    }
    vk.dec(t, old.as_bytes())?;
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
    if t.meta_count(b) > 1 {
        t.dec_meta(b)?;
        return Ok(());
    }
    let blk = t.node(b, vk.size())?;
    let h = node::header(blk);
    if h.is_leaf() {
        if !vk.holds_refs() {
            return t.dec_meta(b).map(|_| ());
        }
        let vals: Vec<[u8; 8]> =
            (0..h.nr_entries as usize).map(|i| node::value_u64(blk, &h, i).to_le_bytes()).collect();
        for v in vals {
            vk.dec(t, &v)?;
        }
    } else {
        let kids: Vec<u64> = (0..h.nr_entries as usize).map(|i| node::value_u64(blk, &h, i)).collect();
        for c in kids {
            delete_rec(t, c, vk, depth + 1)?;
        }
    }
    t.dec_meta(b)?;
    Ok(())
}
