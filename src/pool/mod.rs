//! A pool: metadata plus the data file, and the I/O paths of thin devices.
//!
//! Data block `N` lives at byte `N x block_size` of the data file. Reads of unmapped
//! blocks return zeros. A write to an unmapped block allocates one (the rest of the
//! block reads as zeros); a write to a block that may be shared with a snapshot
//! copies it first (spec §5.5). Discards unmap whole blocks only; a data block whose
//! count drops to zero is punched out of the data file once the commit that freed
//! it is durable, and is not reused before that commit.
//!
//! Both files are [`Storage`]; a pool opened read-only wraps both in
//! [`ReadOnlyStorage`], which is where read-only is enforced below the pool's entry
//! points. This file opens, commits and manages devices; the I/O paths live in
//! `read.rs` (reads, read plans, extents), `write.rs` (writes with allocate-on-write,
//! copy-on-write and zero-fill, write-zeroes) and `discard.rs`.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{MetaError, PoolError};
use crate::io::{is_read_only_error, FileStorage, MetaStorage, ReadOnlyStorage, Storage};
use crate::thin::{Committed, DevId, Metadata};

mod discard;
mod read;
mod write;

pub use read::{AllocRun, Located};

/// Bytes in a sector.
pub const SECTOR: u64 = 512;
/// Chunk size for copying and zeroing inside a data block.
const CHUNK: usize = 1 << 20;

/// Options for opening a pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Open without changing anything.
    pub read_only: bool,
}

/// An open pool.
pub struct Pool {
    md: Metadata,
    data: Arc<dyn Storage>,
    block_bytes: u64,
    /// Cleared once the data storage says it cannot punch holes.
    punch: bool,
    /// The data reuse epoch shared with readers outside the pool's lock: it moves
    /// before a data block that may have held other data is written again.
    reuse_epoch: Arc<AtomicU64>,
    /// When out of data blocks but the transaction freed some, commit and retry.
    commit_when_full: bool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("md", &self.md).field("block_bytes", &self.block_bytes).finish()
    }
}

/// A data storage error as the pool reports it: a change refused by read-only
/// storage is [`PoolError::ReadOnly`], anything else [`PoolError::DataIo`].
fn data_err(e: std::io::Error) -> PoolError {
    if is_read_only_error(&e) {
        PoolError::ReadOnly
    } else {
        PoolError::DataIo(e)
    }
}

impl Pool {
    /// Format a new pool: `metadata` and `data` are open read-write; the data file's
    /// length (rounded down to whole blocks) is the pool's data size.
    pub fn create(metadata: File, data: File, data_block_sectors: u32) -> Result<Pool, PoolError> {
        let metadata = FileStorage::new(metadata).map_err(MetaError::Io)?;
        Self::create_with(metadata, FileStorage::new(data).map_err(data_err)?, data_block_sectors)
    }

    /// [`Pool::create`] over any storages.
    pub fn create_with(
        metadata: impl Storage + 'static,
        data: impl Storage + 'static,
        data_block_sectors: u32,
    ) -> Result<Pool, PoolError> {
        let block_bytes = data_block_sectors as u64 * SECTOR;
        let nr = data.len().checked_div(block_bytes).unwrap_or(0);
        let md = Metadata::format(Box::new(metadata), data_block_sectors, nr)?;
        Ok(Pool {
            md,
            data: Arc::new(data),
            block_bytes,
            punch: true,
            reuse_epoch: Arc::default(),
            commit_when_full: true,
        })
    }

    /// Open an existing pool. A data file longer than the data space map, or a
    /// metadata file longer than the metadata space map, grows that space map (as a
    /// kernel resume does); a shorter data file is an error.
    pub fn open(metadata: File, data: File, opts: OpenOptions) -> Result<Pool, PoolError> {
        let metadata = FileStorage::new(metadata).map_err(MetaError::Io)?;
        Self::open_with(metadata, FileStorage::new(data).map_err(data_err)?, opts)
    }

    /// [`Pool::open`] over any storages. Read-only, both are wrapped in
    /// [`ReadOnlyStorage`].
    pub fn open_with(
        metadata: impl Storage + 'static,
        data: impl Storage + 'static,
        opts: OpenOptions,
    ) -> Result<Pool, PoolError> {
        let (metadata, data): (Box<dyn MetaStorage>, Arc<dyn Storage>) = if opts.read_only {
            (Box::new(ReadOnlyStorage::new(metadata)), Arc::new(ReadOnlyStorage::new(data)))
        } else {
            (Box::new(metadata), Arc::new(data))
        };
        let md = Metadata::open(metadata, opts.read_only)?;
        let block_bytes = md.data_block_sectors() as u64 * SECTOR;
        let nr = data.len() / block_bytes;
        let have = md.status().data_total_blocks;
        let mut pool = Pool { md, data, block_bytes, punch: true, reuse_epoch: Arc::default(), commit_when_full: true };
        if nr < have {
            return Err(PoolError::invalid(format!(
                "the data file holds {nr} blocks of {block_bytes} bytes but the pool has {have}: it is too short"
            )));
        }
        if !opts.read_only {
            // Like a kernel resume: a longer data or metadata file grows its space map.
            let meta_before = pool.md.status().metadata_total_blocks;
            pool.md.extend_metadata()?;
            if nr > have {
                pool.md.extend_data(nr)?;
            }
            if nr > have || pool.md.status().metadata_total_blocks > meta_before {
                pool.commit()?;
            }
        }
        Ok(pool)
    }

    /// The metadata (device management, status, mappings).
    pub fn metadata(&mut self) -> &mut Metadata {
        &mut self.md
    }

    /// Read-only view of the metadata.
    pub fn meta(&self) -> &Metadata {
        &self.md
    }

    /// Data block size in bytes.
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// A second handle on the data storage, for reading raw blocks outside the
    /// pool (for instance at the offsets [`Pool::read_plan`] returns). It is
    /// read-only when the pool is.
    pub fn data_storage(&self) -> Arc<dyn Storage> {
        Arc::clone(&self.data)
    }

    /// The one read-only check at the entry of every changing I/O path; below it,
    /// the read-only data storage refuses changes by itself.
    fn writable(&self) -> Result<(), PoolError> {
        if self.data.is_read_only() {
            return Err(PoolError::ReadOnly);
        }
        Ok(())
    }

    fn check_dev(&self, dev: DevId) -> Result<(), PoolError> {
        if !self.md.has_device(dev) {
            return Err(PoolError::NoSuchDevice(dev));
        }
        Ok(())
    }

    /// Split `[offset, offset+len)` into per-block pieces: (vblock, offset in block, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> {
        crate::units::pieces(offset, len, self.block_bytes).map(|p| (p.block, p.within, p.len))
    }

    /// Make everything so far durable. Data blocks the commit released are punched
    /// out of the data file afterwards.
    pub fn commit(&mut self) -> Result<(), PoolError> {
        let data = &self.data;
        let Committed { released_data } = self.md.commit(&mut || data.sync())?;
        self.publish_reuses();
        self.punch_released(released_data);
        Ok(())
    }

    /// Whether a write that finds no free data block commits by itself when the
    /// transaction freed blocks (the default), or fails with
    /// [`PoolError::NoSpace`] and leaves the commit to its caller.
    pub fn set_commit_when_full(&mut self, on: bool) {
        self.commit_when_full = on;
    }

    /// The data reuse epoch: reads done outside the pool's lock compare it before and
    /// after; when it moved, a block they read may have been given to other data.
    pub fn data_reuse_epoch(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.reuse_epoch)
    }

    /// Make the metadata's reuse count visible to readers. Called after allocating
    /// data blocks (before their data is written) and after a commit (before freed
    /// blocks are punched).
    fn publish_reuses(&self) {
        self.reuse_epoch.fetch_max(self.md.data_reuses(), Ordering::SeqCst);
    }

    fn punch_released(&mut self, mut blocks: Vec<u64>) {
        if !self.punch || blocks.is_empty() {
            return;
        }
        blocks.sort_unstable();
        let bs = self.block_bytes;
        let mut i = 0;
        while i < blocks.len() {
            let start = blocks[i];
            let mut j = i + 1;
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
                j += 1;
            }
            let run = (j - i) as u64;
            // Best effort: a failed punch only costs host space.
            if self.data.punch_hole(start * bs, run * bs).is_err() {
                self.punch = false;
                return;
            }
            i = j;
        }
    }

    /// Create a thin device.
    pub fn create_thin(&mut self, id: u64) -> Result<(), PoolError> {
        self.md.create_thin(id)
    }

    /// Snapshot `origin` as `id`.
    pub fn create_snap(&mut self, id: u64, origin: u64) -> Result<(), PoolError> {
        self.md.create_snap(id, origin)
    }

    /// Delete a device.
    pub fn delete(&mut self, id: u64) -> Result<(), PoolError> {
        self.md.delete(id)
    }
}
