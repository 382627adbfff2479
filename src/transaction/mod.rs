//! The transaction manager: a block cache over [`MetaStorage`], the set of blocks
//! shadowed (allocated) in the current transaction, and the two space maps' counts.
//!
//! Blocks are validated once, when read from storage: checksum with the salt of the
//! kind the reader expects, blocknr, and (for nodes) structure. Blocks allocated in
//! the current transaction live only in memory until [`Txn::write_dirty`] seals them
//! (blocknr + checksum) and writes them. After any failed write or sync the manager
//! is poisoned and refuses everything until the pool is reopened.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::error::{Corruption, MetaError};
use crate::format::checksum::{self, BlockKind};
use crate::format::{node, space_map as fsm, Block};
use crate::io::MetaStorage;
use crate::space_map::RefCounts;

/// Clean blocks kept in the cache before it is trimmed.
pub const DEFAULT_CACHE_BLOCKS: usize = 1 << 16;

#[derive(Debug)]
struct Cached {
    data: Box<Block>,
    kind: BlockKind,
    /// Leaf value size the node was validated for (nodes only).
    value_size: u32,
    dirty: bool,
}

/// Blocks, shadows and counts of one open metadata device.
pub struct Txn {
    storage: Arc<dyn MetaStorage>,
    cache: HashMap<u64, Cached>,
    clean: usize,
    cache_limit: usize,
    /// Blocks allocated in this transaction (writable in place while their count is 1).
    shadowed: HashSet<u64>,
    poisoned: bool,
    /// Counts of metadata blocks.
    meta: RefCounts,
    /// Counts of data blocks.
    data: RefCounts,
    /// When set, allocations may dig into the reserve (during commit).
    committing: bool,
}

impl std::fmt::Debug for Txn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("cached", &self.cache.len())
            .field("shadowed", &self.shadowed.len())
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Txn {
    /// A transaction manager over `storage` with the given counts.
    pub fn new(storage: Box<dyn MetaStorage>, meta: RefCounts, data: RefCounts) -> Txn {
        Txn {
            storage: Arc::from(storage),
            cache: HashMap::new(),
            clean: 0,
            cache_limit: DEFAULT_CACHE_BLOCKS,
            shadowed: HashSet::new(),
            poisoned: false,
            meta,
            data,
            committing: false,
        }
    }

    /// Counts of metadata blocks.
    pub fn meta_counts(&self) -> &RefCounts {
        &self.meta
    }

    /// Counts of data blocks.
    pub fn data_counts(&self) -> &RefCounts {
        &self.data
    }

    /// Counts of metadata blocks, to change (space-map writing, growth).
    pub fn meta_counts_mut(&mut self) -> &mut RefCounts {
        &mut self.meta
    }

    /// Counts of data blocks, to change (allocation, growth).
    pub fn data_counts_mut(&mut self) -> &mut RefCounts {
        &mut self.data
    }

    /// Replace both sets of counts (after loading them from disk).
    pub fn set_counts(&mut self, meta: RefCounts, data: RefCounts) {
        self.meta = meta;
        self.data = data;
    }

    /// Count of metadata block `b`.
    pub fn meta_count(&self, b: u64) -> u32 {
        self.meta.get(b)
    }

    /// Take a reference on metadata block `b`.
    pub fn inc_meta(&mut self, b: u64) -> Result<(), MetaError> {
        self.meta.inc(b)
    }

    /// Take a reference on data block `b`.
    pub fn inc_data(&mut self, b: u64) -> Result<(), MetaError> {
        self.data.inc(b)
    }

    /// Drop a reference on data block `b`; returns the new count.
    pub fn dec_data(&mut self, b: u64) -> Result<u32, MetaError> {
        self.data.dec(b)
    }

    /// Metadata blocks kept back: operations that add metadata must leave this many
    /// allocatable; deletes and discards may use half of it; the other half is a
    /// commit's.
    pub fn meta_reserve(&self) -> u64 {
        (self.meta.nr_blocks() / 50).clamp(16, 1024)
    }

    /// The part of the reserve only a commit may use.
    pub fn commit_share(&self) -> u64 {
        self.meta_reserve() / 2
    }

    /// While set, metadata allocations may use the blocks kept back for commits.
    pub fn set_committing(&mut self, on: bool) {
        self.committing = on;
    }

    /// Number of blocks of the underlying device.
    pub fn device_blocks(&self) -> u64 {
        self.storage.nr_blocks()
    }

    fn ensure_ok(&self) -> Result<(), MetaError> {
        if self.poisoned {
            Err(MetaError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn in_range(&self, b: u64) -> Result<(), MetaError> {
        let n = self.meta.nr_blocks().min(self.storage.nr_blocks());
        if b >= n {
            return Err(MetaError::corrupt(b, Corruption::PastEnd { nr_blocks: n }));
        }
        Ok(())
    }

    /// Read a block from storage without caching or validation.
    pub fn read_uncached(&self, b: u64) -> Result<Box<Block>, MetaError> {
        self.ensure_ok()?;
        let mut buf = crate::format::zeroed_block();
        self.storage.read_block(b, &mut buf)?;
        Ok(buf)
    }

    fn load(&mut self, b: u64, kind: BlockKind, value_size: u32) -> Result<&Cached, MetaError> {
        self.ensure_ok()?;
        self.in_range(b)?;
        let need_load = match self.cache.get(&b) {
            None => true,
            Some(c) => {
                if c.kind != kind || (kind == BlockKind::Node && c.value_size != value_size) {
                    // Asked for as something else: validate the bytes again for the new kind.
                    if c.dirty {
                        return Err(MetaError::corrupt(
                            b,
                            Corruption::Tree(format!("referenced as a {} but holds a {}", kind.name(), c.kind.name())),
                        ));
                    }
                    true
                } else {
                    false
                }
            }
        };
        if need_load {
            let data = self.read_uncached(b)?;
            match kind {
                BlockKind::Node => {
                    node::validate(&data, b, value_size).map_err(|e| MetaError::corrupt(b, Corruption::Node(e)))?;
                }
                BlockKind::Bitmap => {
                    fsm::bitmap_verify(&data, b).map_err(|e| MetaError::corrupt(b, Corruption::Bitmap(e)))?;
                }
                BlockKind::Index => {
                    checksum::verify(&data, BlockKind::Index, b)
                        .map_err(|e| MetaError::corrupt(b, Corruption::Index(e)))?;
                }
                BlockKind::Superblock => {
                    checksum::verify(&data, BlockKind::Superblock, b).map_err(|e| {
                        MetaError::corrupt(
                            b,
                            Corruption::Superblock(crate::format::superblock::SuperblockError::Prefix(e)),
                        )
                    })?;
                }
            }
            if self.clean >= self.cache_limit {
                self.trim_cache();
            }
            if self.cache.insert(b, Cached { data, kind, value_size, dirty: false }).is_none() {
                self.clean += 1;
            }
        }
        self.cache.get(&b).ok_or(MetaError::Poisoned)
    }

    fn trim_cache(&mut self) {
        self.cache.retain(|_, c| c.dirty);
        self.clean = 0;
    }

    /// A validated B-tree node whose leaves carry `value_size`-byte values.
    pub fn node(&mut self, b: u64, value_size: u32) -> Result<&Block, MetaError> {
        Ok(&self.load(b, BlockKind::Node, value_size)?.data)
    }

    /// A validated bitmap block.
    pub fn bitmap(&mut self, b: u64) -> Result<&Block, MetaError> {
        Ok(&self.load(b, BlockKind::Bitmap, 0)?.data)
    }

    /// A validated metadata index block.
    pub fn index_block(&mut self, b: u64) -> Result<&Block, MetaError> {
        Ok(&self.load(b, BlockKind::Index, 0)?.data)
    }

    /// Mutable access to a block shadowed in this transaction.
    pub fn node_mut(&mut self, b: u64) -> Result<&mut Block, MetaError> {
        match self.cache.get_mut(&b) {
            Some(c) if c.dirty => Ok(&mut c.data),
            _ => Err(MetaError::corrupt(b, Corruption::Tree("internal error: writing a block not shadowed".into()))),
        }
    }

    /// Install `data` as the new content of block `b` (allocated in this transaction).
    pub fn put(&mut self, b: u64, data: Box<Block>, kind: BlockKind, value_size: u32) {
        if let Some(old) = self.cache.insert(b, Cached { data, kind, value_size, dirty: true }) {
            if !old.dirty {
                self.clean -= 1;
            }
        }
    }

    /// Is `b` allocated in this transaction and not shared, so writable in place?
    pub fn is_writable(&self, b: u64) -> bool {
        self.shadowed.contains(&b) && self.meta.get(b) == 1
    }

    /// Allocate a metadata block (count 1) for this transaction.
    pub fn alloc_meta(&mut self) -> Result<u64, MetaError> {
        self.ensure_ok()?;
        // Operations check for room before they start (the thin layer's
        // `ensure_metadata`); this is the backstop that keeps a commit's share.
        if !self.committing && self.meta.nr_allocatable() <= self.commit_share() {
            return Err(MetaError::NoMetadataSpace { nr_blocks: self.meta.nr_blocks() });
        }
        let b = self.meta.alloc().ok_or(MetaError::NoMetadataSpace { nr_blocks: self.meta.nr_blocks() })?;
        // The space map never exceeds the device (checked at open), so this is only a guard.
        let limit = self.storage.nr_blocks();
        if b >= limit {
            return Err(MetaError::corrupt(b, Corruption::PastEnd { nr_blocks: limit }));
        }
        self.shadowed.insert(b);
        Ok(b)
    }

    /// Drop a reference to metadata block `b`; forget it when it becomes free.
    pub fn dec_meta(&mut self, b: u64) -> Result<u32, MetaError> {
        let c = self.meta.dec(b)?;
        if c == 0 {
            if let Some(old) = self.cache.remove(&b) {
                if !old.dirty {
                    self.clean -= 1;
                }
            }
            self.shadowed.remove(&b);
        }
        Ok(c)
    }

    /// Seal and write every dirty block, then sync. Errors poison the manager.
    pub fn write_dirty(&mut self) -> Result<(), MetaError> {
        self.write_dirty_blocks()?;
        self.sync()
    }

    /// The metadata device, for a caller that syncs it without holding the
    /// manager (a commit's syncs outside the pool's lock: see
    /// `Metadata::commit_prepare`). Writes still go through the manager.
    pub fn storage(&self) -> Arc<dyn MetaStorage> {
        Arc::clone(&self.storage)
    }

    /// Seal and write every dirty block, without a sync. Errors poison the manager.
    pub fn write_dirty_blocks(&mut self) -> Result<(), MetaError> {
        self.ensure_ok()?;
        let mut dirty: Vec<u64> = self.cache.iter().filter(|(_, c)| c.dirty).map(|(&b, _)| b).collect();
        dirty.sort_unstable();
        for b in dirty {
            let Some(c) = self.cache.get_mut(&b) else {
                continue;
            };
            checksum::seal(&mut c.data, c.kind, b);
            c.dirty = false;
            self.clean += 1;
            if let Err(e) = self.storage.write_block(b, &c.data) {
                self.poisoned = true;
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Sync the device. Errors poison the manager.
    pub fn sync(&mut self) -> Result<(), MetaError> {
        self.ensure_ok()?;
        if let Err(e) = self.storage.sync() {
            self.poisoned = true;
            return Err(e.into());
        }
        Ok(())
    }

    /// Write a sealed block straight to storage (the superblock).
    pub fn write_through(&mut self, b: u64, data: &Block) -> Result<(), MetaError> {
        self.ensure_ok()?;
        if let Err(e) = self.storage.write_block(b, data) {
            self.poisoned = true;
            return Err(e.into());
        }
        Ok(())
    }

    /// End of transaction: nothing is shadowed any more.
    pub fn end_transaction(&mut self) {
        self.shadowed.clear();
    }

    /// Mark the manager failed (used when a commit step fails above this layer).
    pub fn poison(&mut self) {
        self.poisoned = true;
    }

    /// Has a write failed?
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Number of blocks in the cache (diagnostics, tests).
    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }
}
