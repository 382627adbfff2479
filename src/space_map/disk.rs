//! The space maps' on-disk form (spec §4): bitmaps of 2-bit counts, the metadata
//! space map's index block, the data space map's index tree, and the overflow
//! ref-count trees for counts of 3 and more. [`SpaceMaps`] loads the in-memory
//! [`RefCounts`] of both maps when a pool opens and writes them back at commit,
//! repeating until the blocks used to write them are themselves counted (§5.11,
//! "fixed point at commit").

use std::collections::HashMap;

use super::RefCounts;
use crate::btree::{self, Replace, Values};
use crate::error::{Corruption, MetaError};
use crate::format::checksum::BlockKind;
use crate::format::space_map::{self as fsm, IndexEntry, SmRoot, ENTRIES_PER_BITMAP};
use crate::format::superblock::Superblock;
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

/// Read a space map's bitmaps and overflow tree into counts.
fn load_counts(
    t: &mut Txn,
    name: &'static str,
    nr_blocks: u64,
    bitmaps: &[u64],
    ref_root: u64,
    index_block: u64,
) -> Result<RefCounts, MetaError> {
    let mut overflow: HashMap<u64, u32> = HashMap::new();
    btree::visit(t, ref_root, REF_COUNTS, 0, u64::MAX, &mut |k, v| {
        overflow.insert(k, u32::from_le_bytes(v[..4].try_into().unwrap_or_default()));
        Ok(())
    })?;
    let mut rc = RefCounts::new(name, nr_blocks);
    for (i, &loc) in bitmaps.iter().enumerate() {
        if loc == 0 {
            return Err(MetaError::corrupt(
                index_block,
                sm_err(format!("{name} space-map index entry {i} has no bitmap block")),
            ));
        }
        let blk = t.bitmap(loc)?;
        let start = i as u64 * ENTRIES_PER_BITMAP;
        let end = (start + ENTRIES_PER_BITMAP).min(nr_blocks);
        let mut threes = Vec::new();
        for b in start..end {
            let v = fsm::bitmap_get(blk, (b - start) as usize);
            match v {
                0 => {}
                3 => threes.push(b),
                v => rc.load(b, v as u32),
            }
        }
        for b in threes {
            match overflow.get(&b) {
                Some(&c) if c >= 3 => rc.load(b, c),
                Some(&c) => {
                    return Err(MetaError::corrupt(
                        ref_root,
                        sm_err(format!("{name} ref-count tree holds {c} for block {b} (must be >= 3)")),
                    ))
                }
                None => {
                    return Err(MetaError::corrupt(
                        loc,
                        sm_err(format!("{name} block {b} has bitmap count 3 but no ref-count tree entry")),
                    ))
                }
            }
        }
    }
    Ok(rc)
}
