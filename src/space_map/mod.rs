//! In-memory reference counts of one space map (data or metadata).
//!
//! The engine keeps every count in memory (one byte per block, with an overflow map
//! for counts of 255 and more) and writes the on-disk bitmaps, index and overflow
//! tree at commit (see `thin::Metadata::commit`). This module has no I/O: it only tracks
//! counts, which bitmaps and overflow entries changed, and which blocks were in use
//! at the last commit, because a block in use then must not be handed out again
//! before the next commit (spec §4.8).

use std::collections::{BTreeSet, HashMap, HashSet};

use bitvec::vec::BitVec;

use crate::error::MetaError;
pub mod disk;
use crate::format::space_map::{IndexEntry, ENTRIES_PER_BITMAP};

const OVERFLOW: u8 = u8::MAX;

/// Reference counts of `nr_blocks` blocks.
#[derive(Debug, Clone)]
pub struct RefCounts {
    name: &'static str,
    nr_blocks: u64,
    counts: Vec<u8>,
    overflow: HashMap<u64, u32>,
    nr_allocated: u64,
    /// Non-zero entries per bitmap.
    used_per_bitmap: Vec<u32>,
    /// Bitmaps whose on-disk copy is stale.
    dirty_bitmaps: BTreeSet<u64>,
    /// Blocks whose overflow-tree entry may need inserting, updating or removing.
    dirty_overflow: BTreeSet<u64>,
    /// Count was non-zero at the last commit.
    committed_used: BitVec,
    /// Free blocks that were in use at the last commit (not allocatable before the
    /// next one).
    freed_uncommitted: u64,
    /// Free blocks held back from allocation for a while (see [`RefCounts::reserve`]);
    /// few at a time.
    reserved: HashSet<u64>,
    /// Blocks whose count changed since the last commit (deduplicated by `touched_flag`).
    touched: Vec<u64>,
    touched_flag: BitVec,
    cursor: u64,
    /// Bumped whenever a block may become reusable (a count drops to zero, or a
    /// commit makes blocks freed earlier allocatable). Readers that use a block
    /// number outside the pool's lock compare it before and after.
    /// Bumped whenever a block may become reusable (its count drops to zero, or a
    /// commit makes freed blocks allocatable).
    reuses: u64,
}

/// What a commit of the counts reports.
#[derive(Debug, Default)]
pub struct CommitOutcome {
    /// Blocks in use at the previous commit and free now.
    pub released: Vec<u64>,
}

impl RefCounts {
    /// All-zero counts for `nr_blocks` blocks.
    pub fn new(name: &'static str, nr_blocks: u64) -> RefCounts {
        let nb = nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        RefCounts {
            name,
            nr_blocks,
            counts: vec![0; nr_blocks as usize],
            overflow: HashMap::new(),
            nr_allocated: 0,
            used_per_bitmap: vec![0; nb],
            dirty_bitmaps: BTreeSet::new(),
            dirty_overflow: BTreeSet::new(),
            committed_used: BitVec::repeat(false, nr_blocks as usize),
            freed_uncommitted: 0,
            reserved: HashSet::new(),
            touched: Vec::new(),
            touched_flag: BitVec::repeat(false, nr_blocks as usize),
            cursor: 0,
            reuses: 0,
        }
    }

    /// Counts as read from disk: nothing dirty, committed state = these counts.
    pub fn from_counts(name: &'static str, nr_blocks: u64, counts: impl Fn(u64) -> u32) -> RefCounts {
        let mut rc = RefCounts::new(name, nr_blocks);
        for b in 0..nr_blocks {
            let c = counts(b);
            if c != 0 {
                rc.store(b, c);
                rc.nr_allocated += 1;
                rc.used_per_bitmap[(b / ENTRIES_PER_BITMAP) as usize] += 1;
                rc.committed_used.set(b as usize, true);
            }
        }
        rc
    }

    /// Set the count of `b` as read from disk: part of the committed state, nothing
    /// becomes dirty. Only for loading, before any change.
    pub fn load(&mut self, b: u64, c: u32) {
        if b >= self.nr_blocks || c == 0 {
            return;
        }
        if self.get(b) == 0 {
            self.nr_allocated += 1;
            self.used_per_bitmap[(b / ENTRIES_PER_BITMAP) as usize] += 1;
        }
        self.store(b, c);
        self.committed_used.set(b as usize, true);
    }

    /// How many times a block may have become reusable so far: a block handed out
    /// by [`RefCounts::alloc`] may have held other data when this moved since.
    pub fn reuses(&self) -> u64 {
        self.reuses
    }

    /// Number of blocks tracked.
    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    /// Blocks with a non-zero count.
    pub fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    /// Free blocks (count 0), including ones not reusable before the next commit.
    pub fn nr_free(&self) -> u64 {
        self.nr_blocks - self.nr_allocated
    }

    /// Free blocks that can be allocated now (free and not in use at the last
    /// commit).
    pub fn nr_allocatable(&self) -> u64 {
        self.nr_free() - self.freed_uncommitted - self.reserved.len() as u64
    }

    /// Hold back `b` from allocation until [`RefCounts::unreserve`] (a block whose
    /// bytes are being punched outside the pool's lock). False, and nothing held,
    /// unless `b` is allocatable now.
    pub fn reserve(&mut self, b: u64) -> bool {
        self.is_allocatable(b) && self.reserved.insert(b)
    }

    /// Let `b` be allocated again.
    pub fn unreserve(&mut self, b: u64) {
        self.reserved.remove(&b);
    }

    /// Blocks held back by [`RefCounts::reserve`].
    pub fn nr_reserved(&self) -> u64 {
        self.reserved.len() as u64
    }

    /// Number of bitmaps.
    pub fn nr_bitmaps(&self) -> u64 {
        self.used_per_bitmap.len() as u64
    }

    /// Reference count of `b` (0 for blocks past the end).
    pub fn get(&self, b: u64) -> u32 {
        match self.counts.get(b as usize) {
            Some(&OVERFLOW) => self.overflow.get(&b).copied().unwrap_or(u32::MAX),
            Some(&c) => c as u32,
            None => 0,
        }
    }

    fn store(&mut self, b: u64, c: u32) {
        if c >= OVERFLOW as u32 {
            self.counts[b as usize] = OVERFLOW;
            self.overflow.insert(b, c);
        } else {
            if self.counts[b as usize] == OVERFLOW {
                self.overflow.remove(&b);
            }
            self.counts[b as usize] = c as u8;
        }
    }

    fn check(&self, b: u64) -> Result<(), MetaError> {
        if b >= self.nr_blocks {
            return Err(MetaError::RefCount { sm: self.name, block: b, what: "block past the end of the space map" });
        }
        Ok(())
    }

    fn set(&mut self, b: u64, old: u32, new: u32) {
        self.store(b, new);
        let bm = b / ENTRIES_PER_BITMAP;
        if old == 0 && new != 0 {
            self.nr_allocated += 1;
            self.used_per_bitmap[bm as usize] += 1;
        } else if old != 0 && new == 0 {
            self.nr_allocated -= 1;
            self.used_per_bitmap[bm as usize] -= 1;
            self.reuses += 1;
        }
        if self.committed_used[b as usize] {
            if old != 0 && new == 0 {
                self.freed_uncommitted += 1;
            } else if old == 0 && new != 0 {
                self.freed_uncommitted -= 1;
            }
        }
        if old.min(3) != new.min(3) {
            self.dirty_bitmaps.insert(bm);
        }
        if old >= 3 || new >= 3 {
            self.dirty_overflow.insert(b);
        }
        if !self.touched_flag[b as usize] {
            self.touched_flag.set(b as usize, true);
            self.touched.push(b);
        }
    }

    /// Add one reference to `b`.
    pub fn inc(&mut self, b: u64) -> Result<(), MetaError> {
        self.check(b)?;
        let old = self.get(b);
        let new = old.checked_add(1).ok_or(MetaError::RefCount {
            sm: self.name,
            block: b,
            what: "reference count overflow",
        })?;
        self.set(b, old, new);
        Ok(())
    }

    /// Drop one reference to `b`. Returns the new count.
    pub fn dec(&mut self, b: u64) -> Result<u32, MetaError> {
        self.check(b)?;
        let old = self.get(b);
        if old == 0 {
            return Err(MetaError::RefCount { sm: self.name, block: b, what: "reference count would go below zero" });
        }
        self.set(b, old, old - 1);
        Ok(old - 1)
    }

    /// Can `b` be handed out now: count 0 now and at the last commit?
    pub fn is_allocatable(&self, b: u64) -> bool {
        b < self.nr_blocks
            && self.counts[b as usize] == 0
            && !self.committed_used[b as usize]
            && !self.reserved.contains(&b)
    }

    /// Find a block that is free now and was free at the last commit, searching from
    /// just after the last block handed out and wrapping; give it count 1.
    pub fn alloc(&mut self) -> Option<u64> {
        let n = self.nr_blocks;
        if n == 0 || self.nr_allocated == n {
            return None;
        }
        let start = self.cursor % n;
        let found = self.search(start, n).or_else(|| self.search(0, start))?;
        self.set(found, 0, 1);
        self.cursor = found + 1;
        Some(found)
    }

    fn search(&self, from: u64, to: u64) -> Option<u64> {
        let mut b = from;
        while b < to {
            let bm = (b / ENTRIES_PER_BITMAP) as usize;
            let bm_end = ((bm as u64 + 1) * ENTRIES_PER_BITMAP).min(to);
            let bm_len = ((bm as u64 + 1) * ENTRIES_PER_BITMAP).min(self.nr_blocks) - bm as u64 * ENTRIES_PER_BITMAP;
            if u64::from(self.used_per_bitmap[bm]) >= bm_len {
                b = bm_end;
                continue;
            }
            let slice = &self.counts[b as usize..bm_end as usize];
            let mut off = 0usize;
            while let Some(p) = slice[off..].iter().position(|&c| c == 0) {
                let cand = b + (off + p) as u64;
                if !self.committed_used[cand as usize] && (self.reserved.is_empty() || !self.reserved.contains(&cand)) {
                    return Some(cand);
                }
                off += p + 1;
            }
            b = bm_end;
        }
        None
    }

    /// Grow to `new_nr` blocks (new blocks free, their bitmaps dirty).
    pub fn extend(&mut self, new_nr: u64) {
        if new_nr <= self.nr_blocks {
            return;
        }
        let old_bitmaps = self.used_per_bitmap.len() as u64;
        self.counts.resize(new_nr as usize, 0);
        self.committed_used.resize(new_nr as usize, false);
        self.touched_flag.resize(new_nr as usize, false);
        let nb = new_nr.div_ceil(ENTRIES_PER_BITMAP);
        self.used_per_bitmap.resize(nb as usize, 0);
        for i in old_bitmaps..nb {
            self.dirty_bitmaps.insert(i);
        }
        // The last old bitmap's nr_free does not change (entries past the end count as free).
        self.nr_blocks = new_nr;
    }

    /// The first block at or past `from` that is in use now or was at the last
    /// commit (such a block cannot be cut off).
    pub fn first_used_from(&self, from: u64) -> Option<u64> {
        (from..self.nr_blocks).find(|&b| self.counts[b as usize] != 0 || self.committed_used[b as usize])
    }

    /// Shrink to `new_nr` blocks. Every block cut off must be free now and at the
    /// last commit ([`RefCounts::first_used_from`]); the caller checks.
    pub fn shrink(&mut self, new_nr: u64) {
        if new_nr >= self.nr_blocks {
            return;
        }
        debug_assert!(self.first_used_from(new_nr).is_none());
        self.counts.truncate(new_nr as usize);
        self.committed_used.truncate(new_nr as usize);
        self.touched_flag.truncate(new_nr as usize);
        self.touched.retain(|&b| b < new_nr);
        self.overflow.retain(|&b, _| b < new_nr);
        self.dirty_overflow.retain(|&b| b < new_nr);
        self.reserved.retain(|&b| b < new_nr);
        let nb = new_nr.div_ceil(ENTRIES_PER_BITMAP);
        self.used_per_bitmap.truncate(nb as usize);
        self.dirty_bitmaps.retain(|&i| i < nb);
        if nb > 0 {
            // The last bitmap's free count changes with the end.
            self.dirty_bitmaps.insert(nb - 1);
        }
        self.cursor = self.cursor.min(new_nr);
        self.nr_blocks = new_nr;
    }

    /// Mark every bitmap dirty (a freshly formatted space map).
    pub fn mark_all_dirty(&mut self) {
        for i in 0..self.nr_bitmaps() {
            self.dirty_bitmaps.insert(i);
        }
    }

    /// Take the set of dirty bitmaps.
    pub fn take_dirty_bitmaps(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.dirty_bitmaps)
    }

    /// Take the set of blocks whose overflow entry may have changed.
    pub fn take_dirty_overflow(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.dirty_overflow)
    }

    /// Anything left to write?
    pub fn is_dirty(&self) -> bool {
        !self.dirty_bitmaps.is_empty() || !self.dirty_overflow.is_empty()
    }

    /// The two-bit values of bitmap `i` (entries past nr_blocks are 0).
    pub fn bitmap_values(&self, i: u64) -> impl Iterator<Item = u8> + '_ {
        let start = i * ENTRIES_PER_BITMAP;
        let end = (start + ENTRIES_PER_BITMAP).min(self.nr_blocks);
        (start..end).map(|b| self.get(b).min(3) as u8)
    }

    /// The index entry of bitmap `i` located at `blocknr`, in the kernel's convention:
    /// nr_free counts entries past nr_blocks as free, none_free_before is the first free entry.
    pub fn index_entry(&self, i: u64, blocknr: u64) -> IndexEntry {
        let start = i * ENTRIES_PER_BITMAP;
        let end = (start + ENTRIES_PER_BITMAP).min(self.nr_blocks);
        let used = self.used_per_bitmap.get(i as usize).copied().unwrap_or(0);
        let first_free = (start..end).position(|b| self.counts[b as usize] == 0).map_or(end - start, |p| p as u64);
        IndexEntry {
            blocknr,
            nr_free: (ENTRIES_PER_BITMAP as u32).saturating_sub(used),
            none_free_before: first_free as u32,
        }
    }

    /// The transaction was committed: the current counts become the committed state.
    /// Returns the blocks released by the transaction.
    pub fn commit(&mut self) -> CommitOutcome {
        self.reuses += 1;
        self.freed_uncommitted = 0;
        let mut released = Vec::new();
        for b in std::mem::take(&mut self.touched) {
            let i = b as usize;
            self.touched_flag.set(i, false);
            let used = self.counts[i] != 0;
            if self.committed_used[i] && !used {
                released.push(b);
            }
            self.committed_used.set(i, used);
        }
        CommitOutcome { released }
    }

    /// Every block with count >= 3 and its count (for writing the overflow tree).
    pub fn overflow_value(&self, b: u64) -> Option<u32> {
        let c = self.get(b);
        (c >= 3).then_some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_freed_in_a_transaction_are_not_allocatable_before_it_commits() {
        let mut rc = RefCounts::new("t", 4);
        let a = rc.alloc().expect("a");
        rc.commit();
        assert_eq!(rc.nr_allocatable(), 3);
        rc.dec(a).expect("dec");
        assert_eq!((rc.nr_free(), rc.nr_allocatable()), (4, 3));
        rc.inc(a).expect("inc again");
        assert_eq!((rc.nr_free(), rc.nr_allocatable()), (3, 3));
        rc.dec(a).expect("dec");
        rc.commit();
        assert_eq!(rc.nr_allocatable(), 4);
    }

    #[test]
    fn a_reserved_block_is_not_allocated_until_unreserved() {
        let mut rc = RefCounts::new("t", 3);
        let a = rc.alloc().expect("a");
        assert!(!rc.reserve(a), "a used block cannot be reserved");
        rc.commit();
        rc.dec(a).expect("dec");
        assert!(!rc.reserve(a), "nor one the last commit still uses");
        rc.commit();
        assert!(rc.reserve(a));
        assert!(!rc.reserve(a), "reserved once");
        assert_eq!((rc.nr_free(), rc.nr_allocatable(), rc.nr_reserved()), (3, 2, 1));
        let got: Vec<u64> = (0..2).map(|_| rc.alloc().expect("alloc")).collect();
        assert!(!got.contains(&a), "{got:?} skips the reserved block {a}");
        assert_eq!(rc.alloc(), None, "only the reserved block is left");
        rc.commit();
        assert!(!rc.is_allocatable(a), "a commit keeps the reservation");
        rc.unreserve(a);
        assert_eq!(rc.alloc(), Some(a));
    }

    #[test]
    fn a_block_freed_in_a_transaction_is_not_reused_before_commit() {
        let mut rc = RefCounts::new("data", 4);
        let a = rc.alloc().expect("free");
        rc.commit();
        rc.dec(a).expect("dec");
        let mut got = vec![];
        while let Some(b) = rc.alloc() {
            got.push(b);
        }
        assert!(!got.contains(&a), "{a} reused before commit: {got:?}");
        assert_eq!(got.len(), 3);
        let out = rc.commit();
        assert_eq!(out.released, vec![a]);
        assert_eq!(rc.alloc(), Some(a));
    }

    #[test]
    fn counts_past_254_use_the_overflow_map_and_come_back() {
        let mut rc = RefCounts::new("metadata", 10);
        for _ in 0..300 {
            rc.inc(3).expect("inc");
        }
        assert_eq!(rc.get(3), 300);
        for _ in 0..299 {
            rc.dec(3).expect("dec");
        }
        assert_eq!(rc.get(3), 1);
        assert_eq!(rc.nr_allocated(), 1);
        assert!(rc.dec(3).is_ok());
        assert!(rc.dec(3).is_err());
    }

    #[test]
    fn index_entries_follow_the_kernel_convention() {
        let mut rc = RefCounts::new("metadata", 1024);
        for _ in 0..8 {
            rc.alloc();
        }
        let e = rc.index_entry(0, 3);
        assert_eq!((e.nr_free, e.none_free_before), (16312, 8));
    }

    #[test]
    fn allocation_wraps_around_to_the_start() {
        let mut rc = RefCounts::new("data", 40000);
        for _ in 0..39999 {
            rc.alloc().expect("room");
        }
        rc.commit();
        rc.dec(5).expect("dec");
        rc.commit();
        assert_eq!(rc.alloc(), Some(39999));
        assert_eq!(rc.alloc(), Some(5));
        assert_eq!(rc.alloc(), None);
    }
}
