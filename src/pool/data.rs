//! The data file as the I/O paths use it: whole data blocks over a [`Storage`],
//! shared by the pool and by I/O done outside the metadata lock. Every method takes
//! `&self`; nothing here touches metadata.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::data_err;
use crate::error::PoolError;
use crate::io::Storage;

/// Chunk size for zeroing inside a data block when holes cannot be punched.
const CHUNK: usize = 1 << 20;

/// The data blocks of a pool.
pub struct DataFile {
    storage: Arc<dyn Storage>,
    block_bytes: u64,
    /// Cleared once the storage says it cannot punch holes.
    punch: AtomicBool,
    /// Bytes written since the last sync began (an estimate of what a sync has to
    /// write back).
    unsynced: AtomicU64,
}

impl std::fmt::Debug for DataFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataFile").field("block_bytes", &self.block_bytes).finish_non_exhaustive()
    }
}

impl DataFile {
    /// Data blocks of `block_bytes` bytes on `storage`.
    pub fn new(storage: Arc<dyn Storage>, block_bytes: u64) -> DataFile {
        DataFile { storage, block_bytes, punch: AtomicBool::new(true), unsynced: AtomicU64::new(0) }
    }

    /// The storage underneath.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Block size in bytes.
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// Number of whole blocks the storage holds.
    pub fn nr_blocks(&self) -> u64 {
        self.storage.len() / self.block_bytes
    }

    /// Read `buf.len()` bytes at byte `pos` of the data file.
    pub fn read_at(&self, buf: &mut [u8], pos: u64) -> Result<(), PoolError> {
        self.storage.read_at(buf, pos).map_err(data_err)
    }

    /// Write `buf` at byte `pos` of the data file.
    pub fn write_at(&self, buf: &[u8], pos: u64) -> Result<(), PoolError> {
        self.unsynced.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.storage.write_at(buf, pos).map_err(data_err)
    }

    /// Make every write so far durable.
    pub fn sync(&self) -> Result<(), PoolError> {
        self.unsynced.store(0, Ordering::Relaxed);
        self.storage.sync().map_err(PoolError::DataIo)
    }

    /// Bytes written since the last sync began: what the next sync may have to
    /// write back (copies and zeroing counted as whole blocks).
    pub fn unsynced_bytes(&self) -> u64 {
        self.unsynced.load(Ordering::Relaxed)
    }

    /// Prepare new data block `nb` for a write of `src` at `within`: unless the write
    /// covers the whole block, first make it a copy of `old` (copy-on-write) or zeros
    /// (a first write); then write `src`.
    pub fn fill_new_block(&self, nb: u64, old: Option<u64>, within: u64, src: &[u8]) -> Result<(), PoolError> {
        let bs = self.block_bytes;
        let base = nb * bs;
        if !(within == 0 && src.len() as u64 == bs) {
            match old {
                Some(ob) => {
                    self.unsynced.fetch_add(bs, Ordering::Relaxed);
                    self.storage.copy_range(ob * bs, base, bs).map_err(data_err)?
                }
                None => self.zero_range(base, bs)?,
            }
        }
        self.write_at(src, base + within)
    }

    /// Make `[off, off+len)` of the data file read as zeros: punch a hole, or write
    /// zeros where the storage cannot punch.
    fn zero_range(&self, off: u64, len: u64) -> Result<(), PoolError> {
        // Blocks never written, or punched when they were released, are holes
        // already: far cheaper to ask than to punch (which locks the file).
        if self.storage.is_hole(off, len).map_err(data_err)? {
            return Ok(());
        }
        if self.punch.load(Ordering::Relaxed) {
            match self.storage.punch_hole(off, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => self.punch.store(false, Ordering::Relaxed),
                Err(e) => return Err(data_err(e)),
            }
        }
        let buf = vec![0u8; (len as usize).min(CHUNK)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.write_at(&buf[..n], off + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Give the space of `blocks` (freed by a durable commit) back to the host file
    /// system. Best effort: a failed punch only costs host space, and turns punching
    /// off.
    pub fn punch_released(&self, mut blocks: Vec<u64>) {
        if !self.punch.load(Ordering::Relaxed) || blocks.is_empty() {
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
            if self.storage.punch_hole(start * bs, run * bs).is_err() {
                self.punch.store(false, Ordering::Relaxed);
                return;
            }
            i = j;
        }
    }
}
