//! The space maps' on-disk form (spec §4): bitmaps of 2-bit counts, the metadata
//! space map's index block, the data space map's index tree, and the overflow
//! ref-count trees for counts of 3 and more. [`SpaceMaps`] loads the in-memory
//! [`RefCounts`] of both maps when a pool opens and writes them back at commit,
//! repeating until the blocks used to write them are themselves counted (§5.11,
//! "fixed point at commit"). [`read_counts`] is the one reader of on-disk counts:
//! the engine's load and the strict checker both use it.

use std::collections::{BTreeMap, BTreeSet};

use super::RefCounts;
use crate::btree::{self, NodeVisitor, Replace, Step, Values, Walk};
use crate::error::{Corruption, MetaError};
use crate::format::checksum::BlockKind;
use crate::format::space_map::{self as fsm, IndexEntry, SmRoot, ENTRIES_PER_BITMAP};
use crate::format::superblock::Superblock;
use crate::format::Block;
use crate::transaction::Txn;

/// Values of the data space map's index tree (16-byte index entries).
pub const SM_INDEX: Values = Values::Plain(16);
/// Values of the overflow ref-count trees (32-bit counts).
pub const REF_COUNTS: Values = Values::Plain(4);

fn sm_err(what: String) -> Corruption {
    Corruption::SpaceMap(what)
}

/// Where both space maps live on disk in the current transaction.
#[derive(Debug, Clone, Default)]
pub struct SpaceMaps {
    /// Root of the data space map's index tree.
    pub data_index_root: u64,
    /// Root of the data space map's overflow ref-count tree.
    pub data_ref_root: u64,
    /// Block of each data bitmap (0: not written yet).
    pub data_bitmaps: Vec<u64>,
    /// Block of each metadata bitmap (0: not written yet).
    pub meta_bitmaps: Vec<u64>,
    /// Root of the metadata space map's overflow ref-count tree.
    pub meta_ref_root: u64,
    /// Block of the metadata space map's index (0: not written yet).
    pub meta_index_loc: u64,
    /// Has the index block been moved in this transaction?
    pub index_shadowed: bool,
}

impl SpaceMaps {
    /// Empty on-disk maps for a new pool whose counts are in `t` (formatting).
    pub fn format(t: &mut Txn) -> Result<SpaceMaps, MetaError> {
        Ok(SpaceMaps {
            data_index_root: btree::empty(t, SM_INDEX)?,
            data_ref_root: btree::empty(t, REF_COUNTS)?,
            meta_ref_root: btree::empty(t, REF_COUNTS)?,
            data_bitmaps: vec![0; t.data_counts().nr_bitmaps() as usize],
            meta_bitmaps: vec![0; t.meta_counts().nr_bitmaps() as usize],
            meta_index_loc: 0,
            index_shadowed: false,
        })
    }

    /// Read both space maps named by `sb` and install their counts in `t`. The caller
    /// has checked the superblock's space-map sizes against the device.
    pub fn load(t: &mut Txn, sb: &Superblock) -> Result<SpaceMaps, MetaError> {
        let msm = sb.metadata_sm_root;
        let dsm = sb.data_sm_root;
        let nr_meta = msm.nr_blocks;
        let data_bitmaps_n = dsm.nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
        // Metadata space map: index block, bitmaps, overflow tree.
        let meta_index_loc = msm.bitmap_root;
        let entries = {
            let blk = t.index_block(meta_index_loc)?;
            fsm::index_decode(blk, meta_index_loc)
                .map_err(|e| MetaError::corrupt(meta_index_loc, Corruption::Index(e)))?
        };
        let meta_bitmaps_n = nr_meta.div_ceil(ENTRIES_PER_BITMAP) as usize;
        let meta_bitmaps: Vec<u64> = entries[..meta_bitmaps_n].iter().map(|e| e.blocknr).collect();
        let meta_counts = load_counts(t, "metadata", nr_meta, &meta_bitmaps, msm.ref_count_root, meta_index_loc)?;

        // Data space map: index tree, bitmaps, overflow tree.
        let mut index: Vec<Option<IndexEntry>> = vec![None; data_bitmaps_n as usize];
        let idx_root = dsm.bitmap_root;
        btree::visit(t, idx_root, SM_INDEX, 0, u64::MAX, &mut |k, v| match index.get_mut(k as usize) {
            Some(slot) => {
                *slot = Some(IndexEntry::decode(v));
                Ok(())
            }
            None => Err(MetaError::corrupt(
                idx_root,
                sm_err(format!("data space-map index has an entry for bitmap {k} of {data_bitmaps_n}")),
            )),
        })?;
        let mut data_bitmaps = Vec::with_capacity(index.len());
        for (i, e) in index.iter().enumerate() {
            match e {
                Some(e) => data_bitmaps.push(e.blocknr),
                None => {
                    return Err(MetaError::corrupt(idx_root, sm_err(format!("data space-map index lacks bitmap {i}"))))
                }
            }
        }
        let data_counts = load_counts(t, "data", dsm.nr_blocks, &data_bitmaps, dsm.ref_count_root, idx_root)?;
        t.set_counts(meta_counts, data_counts);
        Ok(SpaceMaps {
            data_index_root: idx_root,
            data_ref_root: dsm.ref_count_root,
            data_bitmaps,
            meta_bitmaps,
            meta_ref_root: msm.ref_count_root,
            meta_index_loc,
            index_shadowed: false,
        })
    }

    /// The superblock's space-map roots for the counts in `t`.
    pub fn roots(&self, t: &Txn) -> (SmRoot, SmRoot) {
        (
            SmRoot {
                nr_blocks: t.data_counts().nr_blocks(),
                nr_allocated: t.data_counts().nr_allocated(),
                bitmap_root: self.data_index_root,
                ref_count_root: self.data_ref_root,
            },
            SmRoot {
                nr_blocks: t.meta_counts().nr_blocks(),
                nr_allocated: t.meta_counts().nr_allocated(),
                bitmap_root: self.meta_index_loc,
                ref_count_root: self.meta_ref_root,
            },
        )
    }

    /// Make room for the bitmaps of grown maps (the counts in `t` were extended).
    pub fn fit(&mut self, t: &Txn) {
        self.data_bitmaps.resize(t.data_counts().nr_bitmaps() as usize, 0);
        self.meta_bitmaps.resize(t.meta_counts().nr_bitmaps() as usize, 0);
    }

    /// Drop the data bitmaps from `keep` on (the data space map shrank): their
    /// blocks are released and their index entries removed.
    pub fn drop_data_bitmaps(&mut self, t: &mut Txn, keep: u64) -> Result<(), MetaError> {
        while self.data_bitmaps.len() as u64 > keep {
            let i = self.data_bitmaps.len() as u64 - 1;
            let loc = self.data_bitmaps.pop().unwrap_or(0);
            if loc != 0 {
                t.dec_meta(loc)?;
            }
            self.data_index_root = btree::remove(t, self.data_index_root, i, SM_INDEX)?.0;
        }
        Ok(())
    }

    /// The transaction ended: the index block moves again in the next one.
    pub fn end_transaction(&mut self) {
        self.index_shadowed = false;
    }

    /// Every block the on-disk maps own outside their trees (bitmaps, index block).
    pub fn own_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.data_bitmaps
            .iter()
            .chain(self.meta_bitmaps.iter())
            .chain(std::iter::once(&self.meta_index_loc))
            .copied()
            .filter(|&b| b != 0)
    }

    /// Write bitmaps, index entries and overflow trees of both space maps until
    /// writing them changes no count.
    pub fn write(&mut self, t: &mut Txn) -> Result<(), MetaError> {
        for _round in 0..64 {
            let mut did = false;
            for i in t.data_counts_mut().take_dirty_bitmaps() {
                did = true;
                let loc = self.place_bitmap(t, self.data_bitmaps[i as usize])?;
                self.data_bitmaps[i as usize] = loc;
                let blk = fsm::bitmap_encode(t.data_counts().bitmap_values(i));
                t.put(loc, blk, BlockKind::Bitmap, 0);
                let e = t.data_counts().index_entry(i, loc);
                self.data_index_root =
                    btree::insert(t, self.data_index_root, i, &e.encode(), SM_INDEX, Replace::Raw)?.root;
            }
            for b in t.data_counts_mut().take_dirty_overflow() {
                did = true;
                self.data_ref_root = sync_overflow(t, self.data_ref_root, b, true)?;
            }
            for i in t.meta_counts_mut().take_dirty_bitmaps() {
                did = true;
                let loc = self.place_bitmap(t, self.meta_bitmaps[i as usize])?;
                self.meta_bitmaps[i as usize] = loc;
                let blk = fsm::bitmap_encode(t.meta_counts().bitmap_values(i));
                t.put(loc, blk, BlockKind::Bitmap, 0);
            }
            for b in t.meta_counts_mut().take_dirty_overflow() {
                did = true;
                self.meta_ref_root = sync_overflow(t, self.meta_ref_root, b, false)?;
            }
            if !self.index_shadowed {
                did = true;
                let old = self.meta_index_loc;
                self.meta_index_loc = self.place_bitmap(t, old)?;
                self.index_shadowed = true;
            }
            // Bitmaps written earlier in this round may have changed again.
            if !did && !t.meta_counts().is_dirty() && !t.data_counts().is_dirty() {
                let entries: Vec<IndexEntry> = (0..t.meta_counts().nr_bitmaps())
                    .map(|i| t.meta_counts().index_entry(i, self.meta_bitmaps[i as usize]))
                    .collect();
                let blk = fsm::index_encode(&entries, self.meta_index_loc);
                t.put(self.meta_index_loc, blk, BlockKind::Index, 0);
                return Ok(());
            }
        }
        Err(MetaError::corrupt(0, sm_err("space maps did not settle while committing".into())))
    }

    /// Location for a space-map block now at `old` (0 = none yet): in place when it was
    /// already written in this transaction, else a new block (the old one is released).
    fn place_bitmap(&mut self, t: &mut Txn, old: u64) -> Result<u64, MetaError> {
        if old != 0 && t.is_writable(old) {
            return Ok(old);
        }
        let loc = t.alloc_meta()?;
        if old != 0 {
            t.dec_meta(old)?;
        }
        Ok(loc)
    }
}

/// Write the overflow-tree entry of block `b` from its current count.
fn sync_overflow(t: &mut Txn, root: u64, b: u64, data: bool) -> Result<u64, MetaError> {
    let v = if data { t.data_counts().overflow_value(b) } else { t.meta_counts().overflow_value(b) };
    match v {
        Some(c) => Ok(btree::insert(t, root, b, &c.to_le_bytes(), REF_COUNTS, Replace::Raw)?.root),
        None => Ok(btree::remove(t, root, b, REF_COUNTS)?.0),
    }
}

/// The entries of an overflow ref-count tree (block -> count, spec §4.4), gathered
/// by walking the tree with it as the visitor, or by feeding it entries with
/// [`add`](Self::add).
#[derive(Debug, Clone, Default)]
pub struct Overflow(pub BTreeMap<u64, u32>);

impl Overflow {
    /// Note one entry of the tree (a 32-bit little-endian count).
    pub fn add(&mut self, key: u64, value: &[u8]) {
        let mut c = [0u8; 4];
        let n = value.len().min(4);
        c[..n].copy_from_slice(&value[..n]);
        self.0.insert(key, u32::from_le_bytes(c));
    }
}

impl NodeVisitor for Overflow {
    fn entry(&mut self, key: u64, value: &[u8]) -> Result<Step, MetaError> {
        self.add(key, value);
        Ok(Step::Descend)
    }
}

/// A rule of the on-disk space map (spec §4) that [`read_counts`] found broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The bitmap at `loc` has non-zero entries past the end of the map, the first
    /// for `block`.
    Tail {
        /// The bitmap.
        loc: u64,
        /// The first block past the end with a non-zero entry.
        block: u64,
    },
    /// The bitmap at `loc` says 3 (or more) for `block`, but the ref-count tree holds
    /// `count`, below 3. The count read is `count`.
    Below3 {
        /// The bitmap.
        loc: u64,
        /// The block counted.
        block: u64,
        /// What the ref-count tree holds.
        count: u32,
    },
    /// The bitmap at `loc` says 3 (or more) for `block`, but the ref-count tree has no
    /// entry for it. The count read is 3.
    Missing {
        /// The bitmap.
        loc: u64,
        /// The block counted.
        block: u64,
    },
    /// The ref-count tree holds `count` for `block`, whose bitmap entry is not 3 (or
    /// whose bitmap was not read).
    Orphan {
        /// The block.
        block: u64,
        /// What the ref-count tree holds.
        count: u32,
    },
}

/// A reader of one space map's on-disk counts, driven by [`read_counts`]: it says
/// where bitmaps come from and what to do with each count and each broken rule.
pub trait CountVisitor {
    /// Bitmap `index` of the map, stored at `loc`, validated (checksum, blocknr);
    /// `None` to go on without it.
    fn bitmap(&mut self, index: usize, loc: u64) -> Result<Option<Box<Block>>, MetaError>;
    /// The count of `block` (below the map's end), read from the bitmap at `loc` or,
    /// when the bitmap says 3, from the ref-count tree.
    fn count(&mut self, block: u64, count: u32, loc: u64) -> Result<(), MetaError>;
    /// A broken rule; an error ends the read.
    fn fault(&mut self, fault: Fault) -> Result<(), MetaError>;
}

/// Read the counts of a space map of `nr_blocks` blocks from its bitmaps (in index
/// order) and its ref-count tree's entries: a bitmap entry of 0 to 2 is the count,
/// 3 means the ref-count tree holds it (at least 3). Every entry of every bitmap
/// read is looked at, so entries past the end and ref-count entries no bitmap asks
/// for are reported too.
pub fn read_counts<V: CountVisitor + ?Sized>(
    nr_blocks: u64,
    bitmaps: &[u64],
    overflow: &Overflow,
    v: &mut V,
) -> Result<(), MetaError> {
    let mut asked = BTreeSet::new();
    for (i, &loc) in bitmaps.iter().enumerate() {
        let Some(blk) = v.bitmap(i, loc)? else { continue };
        let start = i as u64 * ENTRIES_PER_BITMAP;
        let mut tail_reported = false;
        for e in 0..ENTRIES_PER_BITMAP {
            let block = start + e;
            let bits = fsm::bitmap_get(&blk, e as usize);
            if block >= nr_blocks {
                if bits != 0 && !tail_reported {
                    v.fault(Fault::Tail { loc, block })?;
                    tail_reported = true;
                }
                continue;
            }
            let count = if bits == 3 {
                asked.insert(block);
                match overflow.0.get(&block) {
                    Some(&c) if c >= 3 => c,
                    Some(&count) => {
                        v.fault(Fault::Below3 { loc, block, count })?;
                        count
                    }
                    None => {
                        v.fault(Fault::Missing { loc, block })?;
                        3
                    }
                }
            } else {
                u32::from(bits)
            };
            v.count(block, count, loc)?;
        }
    }
    for (&block, &count) in &overflow.0 {
        if !asked.contains(&block) {
            v.fault(Fault::Orphan { block, count })?;
        }
    }
    Ok(())
}

/// The engine's reading of a space map: counts go into [`RefCounts`], and any
/// broken rule that leaves a count unknown is an error.
struct Load<'t> {
    t: &'t mut Txn,
    name: &'static str,
    rc: RefCounts,
    ref_root: u64,
    index_block: u64,
}

impl CountVisitor for Load<'_> {
    fn bitmap(&mut self, index: usize, loc: u64) -> Result<Option<Box<Block>>, MetaError> {
        if loc == 0 {
            let name = self.name;
            return Err(MetaError::corrupt(
                self.index_block,
                sm_err(format!("{name} space-map index entry {index} has no bitmap block")),
            ));
        }
        Ok(Some(Box::new(*self.t.bitmap(loc)?)))
    }

    fn count(&mut self, block: u64, count: u32, _loc: u64) -> Result<(), MetaError> {
        self.rc.load(block, count);
        Ok(())
    }

    fn fault(&mut self, fault: Fault) -> Result<(), MetaError> {
        let name = self.name;
        match fault {
            Fault::Below3 { block, count, .. } => Err(MetaError::corrupt(
                self.ref_root,
                sm_err(format!("{name} ref-count tree holds {count} for block {block} (must be >= 3)")),
            )),
            Fault::Missing { loc, block } => Err(MetaError::corrupt(
                loc,
                sm_err(format!("{name} block {block} has bitmap count 3 but no ref-count tree entry")),
            )),
            // Nothing the engine counts depends on these.
            Fault::Tail { .. } | Fault::Orphan { .. } => Ok(()),
        }
    }
}

/// Read a space map's bitmaps and overflow tree into counts.
fn load_counts(
    t: &mut Txn,
    name: &'static str,
    nr_blocks: u64,
    bitmaps: &[u64],
    ref_root: u64,
    index_block: u64,
) -> Result<RefCounts, MetaError> {
    let mut overflow = Overflow::default();
    btree::walk(t, ref_root, Walk::all(REF_COUNTS), &mut overflow)?;
    let mut load = Load { t, name, rc: RefCounts::new(name, nr_blocks), ref_root, index_block };
    read_counts(nr_blocks, bitmaps, &overflow, &mut load)?;
    Ok(load.rc)
}
