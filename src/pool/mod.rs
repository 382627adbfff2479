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
use crate::format::{BLOCK_SIZE, MAX_METADATA_BLOCKS};
use crate::io::{is_read_only_error, FileStorage, ReadOnlyStorage, Storage};
use crate::thin::{Committed, DevId, MappedBlock, Metadata};

mod data;
mod diff;
mod discard;
mod read;
mod write;

pub use data::DataFile;
pub use read::{AllocRun, Located};
pub use write::WritePlan;

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
    data: Arc<DataFile>,
    block_bytes: u64,
    /// The data reuse epoch shared with readers outside the pool's lock: it moves
    /// before a data block that may have held other data is written again.
    reuse_epoch: Arc<AtomicU64>,
    /// The metadata storage, kept to grow it.
    meta_storage: Arc<dyn Storage>,
    /// The metadata storage grows by itself up to this many bytes (0: never).
    meta_max_bytes: u64,
    /// Discarded sub-ranges of mapped blocks (see `discard.rs`).
    discarded: discard::PartialDiscards,
    /// When out of data blocks but the transaction freed some, commit and retry
    /// (off when a serving core owns the commits).
    commit_when_full: bool,
    /// Punch released blocks later, in slices ([`Pool::punch_pending`]), rather
    /// than inside the commit (on when a serving core owns the commits).
    defer_punch: bool,
    /// Runs `(first, count)` of data blocks released by durable commits, not
    /// punched yet (with `defer_punch`).
    pending_punch: Vec<(u64, u64)>,
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
        let meta: Arc<dyn Storage> = Arc::new(metadata);
        // Metadata gets its host space now: a full host file system later must not
        // make a commit fail half way (the data file stays sparse).
        meta.allocate().map_err(MetaError::Io)?;
        let md = Metadata::format(Box::new(Arc::clone(&meta)), data_block_sectors, nr)?;
        let data = Arc::new(DataFile::new(Arc::new(data), block_bytes));
        Ok(Pool::assemble(md, meta, data, block_bytes))
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
        let (meta, data): (Arc<dyn Storage>, Arc<dyn Storage>) = if opts.read_only {
            (Arc::new(ReadOnlyStorage::new(metadata)), Arc::new(ReadOnlyStorage::new(data)))
        } else {
            (Arc::new(metadata), Arc::new(data))
        };
        let md = Metadata::open(Box::new(Arc::clone(&meta)), opts.read_only)?;
        if !opts.read_only {
            if let Err(e) = meta.allocate() {
                eprintln!("thinpool: warning: cannot reserve host space for the metadata file: {e}; a full host file system could stop commits");
            }
        }
        let block_bytes = md.data_block_sectors() as u64 * SECTOR;
        let nr = data.len() / block_bytes;
        let have = md.status().data_total_blocks;
        let data = Arc::new(DataFile::new(data, block_bytes));
        let mut pool = Pool::assemble(md, meta, data, block_bytes);
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

    fn assemble(md: Metadata, meta_storage: Arc<dyn Storage>, data: Arc<DataFile>, block_bytes: u64) -> Pool {
        Pool {
            md,
            data,
            block_bytes,
            reuse_epoch: Arc::default(),
            meta_storage,
            meta_max_bytes: MAX_METADATA_BLOCKS * BLOCK_SIZE as u64,
            commit_when_full: true,
            defer_punch: false,
            pending_punch: Vec::new(),
            discarded: Default::default(),
        }
    }

    /// Let the metadata storage grow by itself up to `max_bytes` (at most dm-thin's
    /// limit, about 16 GiB; 0 turns growing off). On by default, up to the limit.
    pub fn set_metadata_max_bytes(&mut self, max_bytes: u64) {
        self.meta_max_bytes = max_bytes.min(MAX_METADATA_BLOCKS * BLOCK_SIZE as u64);
    }

    /// Grow the metadata storage (sparse) and its space map before it runs short:
    /// when fewer than an eighth of its blocks (at least 64) beyond the reserve are
    /// free, by a quarter (at least 4 MiB), up to the configured maximum. Growing
    /// is best effort: when the host refuses, the reserve rules still apply.
    fn make_metadata_room(&mut self) -> Result<(), PoolError> {
        let (free, total, reserve) = self.md.metadata_room();
        if free >= reserve + (total / 8).max(16) || self.data.storage().is_read_only() {
            return Ok(());
        }
        let cur = self.meta_storage.len();
        let target = (cur + (cur / 4).max(4 << 20)).min(self.meta_max_bytes) / BLOCK_SIZE as u64 * BLOCK_SIZE as u64;
        if target <= cur {
            return Ok(());
        }
        match self.meta_storage.grow(target).and_then(|()| self.meta_storage.allocate()) {
            Ok(()) => self.md.extend_metadata(),
            Err(e) => {
                eprintln!("thinpool: cannot grow the metadata file to {target} bytes: {e}");
                Ok(())
            }
        }
    }

    /// Shrink the data to `nr` blocks: refused (nothing changed) unless no block
    /// past the new end is in use. Committed at once, then the data file is cut;
    /// a crash in between leaves a longer file, which is harmless.
    fn shrink_data(&mut self, nr: u64) -> Result<(), PoolError> {
        // Blocks freed since the last commit are still in use on disk: commit first.
        if self.md.is_dirty() {
            self.commit()?;
        }
        self.md.shrink_data(nr)?;
        self.commit()?;
        self.data.storage().shrink(nr * self.block_bytes).map_err(data_err)
    }

    /// Grow the pool: the data file to `data_bytes` and/or the metadata file to
    /// `metadata_bytes` (sparse), and their space maps, at once usable by the next
    /// write; committed with the next commit. Shrinking the data is refused unless
    /// no block past the new end is in use (then it is committed at once and the
    /// data file cut; dm-thin cannot shrink at all); shrinking metadata is refused.
    pub fn extend(&mut self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<(), PoolError> {
        self.writable()?;
        if let Some(bytes) = metadata_bytes {
            let cur = self.meta_storage.len();
            let max = MAX_METADATA_BLOCKS * BLOCK_SIZE as u64;
            if bytes < cur {
                return Err(PoolError::invalid(format!(
                    "metadata cannot shrink: it is {cur} bytes, {bytes} asked for"
                )));
            }
            if bytes > max {
                return Err(PoolError::invalid(format!(
                    "metadata of {bytes} bytes is past dm-thin's limit of {max} bytes"
                )));
            }
            self.meta_storage.grow(bytes / BLOCK_SIZE as u64 * BLOCK_SIZE as u64).map_err(MetaError::Io)?;
            self.md.extend_metadata()?;
        }
        if let Some(bytes) = data_bytes {
            let nr = bytes / self.block_bytes;
            let have = self.md.status().data_total_blocks;
            if nr < have {
                return self.shrink_data(nr);
            }
            self.data.storage().grow(nr * self.block_bytes).map_err(data_err)?;
            self.md.extend_data(nr)?;
        }
        Ok(())
    }

    /// The metadata itself, around the pool: for what works on metadata alone
    /// (restore, dump, the recount, held metadata snapshots, tests). The I/O paths
    /// and device management go through the pool's own methods.
    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.md
    }

    /// Mappings of a device with `lo <= vblock < hi` (see [`Metadata::mappings`]).
    pub fn mappings(&mut self, dev: DevId, lo: u64, hi: u64) -> Result<Vec<MappedBlock>, PoolError> {
        self.md.mappings(dev, lo, hi)
    }

    /// The next batch of a device's mappings (see [`Metadata::mapping_window`]).
    pub fn mapping_window(
        &mut self,
        dev: DevId,
        from: u64,
        hi: u64,
        window: u64,
    ) -> Result<Vec<MappedBlock>, PoolError> {
        self.md.mapping_window(dev, from, hi, window)
    }

    /// The first mapped virtual block at or after `vblock`, with its data block.
    pub fn next_mapped(&mut self, dev: DevId, vblock: u64) -> Result<Option<(u64, u64)>, PoolError> {
        self.md.next_mapped(dev, vblock)
    }

    /// The highest mapped virtual block of a device.
    pub fn highest_mapped(&mut self, dev: DevId) -> Result<Option<u64>, PoolError> {
        self.md.highest_mapped(dev)
    }

    /// Mapped and exclusive block counts of every device (see [`Metadata::usage`]).
    pub fn usage(&mut self) -> Result<std::collections::BTreeMap<DevId, (u64, u64)>, PoolError> {
        self.md.usage()
    }

    /// `set_transaction_id old new`.
    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<(), PoolError> {
        self.md.set_transaction_id(old, new)
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
        Arc::clone(self.data.storage())
    }

    /// The data blocks, for I/O done outside the pool (see [`WritePlan`]).
    pub fn data_file(&self) -> Arc<DataFile> {
        Arc::clone(&self.data)
    }

    /// The one read-only check at the entry of every changing I/O path; below it,
    /// the read-only data storage refuses changes by itself.
    fn writable(&self) -> Result<(), PoolError> {
        if self.data.storage().is_read_only() {
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
        let data = Arc::clone(&self.data);
        self.commit_with(&mut || data.storage().sync())
    }

    /// [`Pool::commit`] with another way of making the data durable first (the
    /// serving core syncs the data file itself, outside the metadata lock, and
    /// passes a no-op).
    pub fn commit_with(&mut self, sync_data: &mut dyn FnMut() -> std::io::Result<()>) -> Result<(), PoolError> {
        let Committed { released_data } = self.md.commit(sync_data)?;
        self.publish_reuses();
        self.release(released_data);
        Ok(())
    }

    /// Blocks a durable commit released: punch them now, or queue them.
    fn release(&mut self, released: Vec<u64>) {
        if self.defer_punch {
            let mut released = released;
            released.sort_unstable();
            for b in released {
                match self.pending_punch.last_mut() {
                    Some((first, n)) if *first + *n == b => *n += 1,
                    _ => self.pending_punch.push((b, 1)),
                }
            }
        } else {
            self.data.punch_released(released);
        }
    }

    /// Whether commits punch the blocks they release themselves (the default), or
    /// queue them for [`Pool::take_punches`]: on a file system with fragmented
    /// extents a punch costs about 0.1 ms per block, so a commit that released
    /// 200,000 blocks held a serving core's lock for 20 s.
    pub fn set_defer_punch(&mut self, on: bool) {
        self.defer_punch = on;
    }

    /// Take at most `max` of the queued released blocks (see
    /// [`Pool::set_defer_punch`]) to punch outside the pool's lock: those still
    /// free (neither the committed nor the current state uses them; a block
    /// allocated again since its release is dropped from the queue) are held back
    /// from allocation until [`Pool::punched`]. Also says whether more wait.
    pub fn take_punches(&mut self, max: usize) -> (Vec<u64>, bool) {
        let (mut slice, mut done) = (Vec::new(), 0u64);
        while done < max as u64 {
            let Some((first, n)) = self.pending_punch.pop() else { break };
            let take = n.min(max as u64 - done);
            done += take;
            if take < n {
                self.pending_punch.push((first, n - take));
            }
            let from = first + (n - take);
            slice.extend((from..from + take).filter(|&b| self.md.reserve_data_block(b)));
        }
        if self.pending_punch.is_empty() {
            self.pending_punch = Vec::new();
        }
        (slice, !self.pending_punch.is_empty())
    }

    /// Blocks from [`Pool::take_punches`] are punched (or the punch failed): they
    /// can be allocated again.
    pub fn punched(&mut self, blocks: &[u64]) {
        for &b in blocks {
            self.md.unreserve_data_block(b);
        }
    }

    /// Free data blocks held back while they are punched.
    pub fn data_blocks_reserved(&self) -> u64 {
        self.md.data_blocks_reserved()
    }

    /// Released blocks waiting to be punched.
    pub fn punches_pending(&self) -> u64 {
        self.pending_punch.iter().map(|&(_, n)| n).sum()
    }

    /// A commit in steps for a serving core that syncs outside its lock (see
    /// [`Metadata::commit_prepare`]): the data must already be durable. `None`:
    /// nothing changed.
    pub fn commit_prepare(&mut self) -> Result<Option<crate::thin::PreparedCommit>, PoolError> {
        self.md.commit_prepare(&mut || Ok(()))
    }

    /// Step 3 of a commit in steps: write the superblock.
    pub fn commit_write_superblock(&mut self, p: &crate::thin::PreparedCommit) -> Result<(), PoolError> {
        self.md.commit_write_superblock(p)
    }

    /// The last step of a commit in steps: the superblock is durable.
    pub fn commit_finish(&mut self, p: crate::thin::PreparedCommit) {
        let Committed { released_data } = self.md.commit_finish(p);
        self.publish_reuses();
        self.release(released_data);
    }

    /// A sync of a commit in steps failed: the pool refuses changes until reopened.
    pub fn commit_abort(&mut self, p: crate::thin::PreparedCommit) {
        self.md.commit_abort(p);
    }

    /// The metadata device (to sync it outside the lock in a commit in steps).
    pub fn metadata_storage(&self) -> Arc<dyn crate::io::MetaStorage> {
        self.md.storage()
    }

    /// Whether a write that finds no free data block commits by itself when the
    /// transaction freed blocks (the default), or fails with
    /// [`PoolError::NoSpace`] and leaves the commit to its caller (a serving core
    /// that must not commit while other writes are half done).
    pub fn set_commit_when_full(&mut self, on: bool) {
        self.commit_when_full = on;
    }

    /// Are there data blocks that only a commit would make allocatable?
    pub fn commit_would_free_data(&self) -> bool {
        self.md.commit_would_free_data()
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

    /// Create a thin device.
    pub fn create_thin(&mut self, id: u64) -> Result<(), PoolError> {
        self.make_metadata_room()?;
        self.md.create_thin(id)
    }

    /// Snapshot `origin` as `id`.
    pub fn create_snap(&mut self, id: u64, origin: u64) -> Result<(), PoolError> {
        self.make_metadata_room()?;
        self.md.create_snap(id, origin)
    }

    /// Delete a device.
    pub fn delete(&mut self, id: u64) -> Result<(), PoolError> {
        self.md.delete(id)?;
        self.discarded.forget_device(id as DevId);
        Ok(())
    }
}
