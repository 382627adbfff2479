//! A pool: metadata plus the data file, and the I/O paths of thin devices.
//!
//! Data block `N` lives at byte `N x block_size` of the data file. Reads of unmapped
//! blocks return zeros. A write to an unmapped block allocates one (the rest of the
//! block reads as zeros); a write to a block that may be shared with a snapshot
//! copies it first (spec §5.5). Discards unmap whole blocks only; a data block whose
//! count drops to zero is punched out of the data file once the commit that freed
//! it is durable, and is not reused before that commit.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use nix::fcntl::{fallocate, FallocateFlags};

use crate::error::PoolError;
use crate::io::{FileStorage, MetaStorage};
use crate::thin::{Committed, DevId, Metadata};

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
    data: File,
    block_bytes: u64,
    read_only: bool,
    punch: bool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("md", &self.md).field("block_bytes", &self.block_bytes).finish()
    }
}

fn data_err(e: std::io::Error) -> PoolError {
    PoolError::DataIo(e)
}

impl Pool {
    /// Format a new pool: `metadata` and `data` are open read-write; the data file's
    /// length (rounded down to whole blocks) is the pool's data size.
    pub fn create(metadata: File, data: File, data_block_sectors: u32) -> Result<Pool, PoolError> {
        Self::create_with(
            Box::new(FileStorage::new(metadata).map_err(crate::error::MetaError::Io)?),
            data,
            data_block_sectors,
        )
    }

    /// [`Pool::create`] over any metadata storage.
    pub fn create_with(storage: Box<dyn MetaStorage>, data: File, data_block_sectors: u32) -> Result<Pool, PoolError> {
        let block_bytes = data_block_sectors as u64 * SECTOR;
        let len = data.metadata().map_err(data_err)?.len();
        let nr = len.checked_div(block_bytes).unwrap_or(0);
        let md = Metadata::format(storage, data_block_sectors, nr)?;
        Ok(Pool { md, data, block_bytes, read_only: false, punch: true })
    }

    /// Open an existing pool. A data file longer than the data space map, or a
    /// metadata file longer than the metadata space map, grows that space map (as a
    /// kernel resume does); a shorter data file is an error.
    pub fn open(metadata: File, data: File, opts: OpenOptions) -> Result<Pool, PoolError> {
        Self::open_with(Box::new(FileStorage::new(metadata).map_err(crate::error::MetaError::Io)?), data, opts)
    }

    /// [`Pool::open`] over any metadata storage.
    pub fn open_with(storage: Box<dyn MetaStorage>, data: File, opts: OpenOptions) -> Result<Pool, PoolError> {
        let md = Metadata::open(storage, opts.read_only)?;
        let block_bytes = md.data_block_sectors() as u64 * SECTOR;
        let len = data.metadata().map_err(data_err)?.len();
        let nr = len / block_bytes;
        let have = md.status().data_total_blocks;
        let mut pool = Pool { md, data, block_bytes, read_only: opts.read_only, punch: true };
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

    /// Read `buf.len()` bytes of device `dev` at byte `offset`.
    pub fn read(&mut self, dev: DevId, offset: u64, buf: &mut [u8]) -> Result<(), PoolError> {
        self.check_dev(dev)?;
        let mut done = 0usize;
        for (vb, within, n) in self.pieces(offset, buf.len() as u64).collect::<Vec<_>>() {
            let out = &mut buf[done..done + n as usize];
            match self.md.lookup(dev, vb)? {
                None => out.fill(0),
                Some(m) => self.data.read_exact_at(out, m.data_block * self.block_bytes + within).map_err(data_err)?,
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Where the bytes of `[offset, offset+len)` live: per piece, its length and its
    /// offset in the data file (`None`: unmapped, reads as zeros). Valid until the data
    /// reuse epoch ([`Metadata::data_reuse_epoch`]) changes.
    pub fn read_plan(&mut self, dev: DevId, offset: u64, len: u64) -> Result<Vec<(u64, Option<u64>)>, PoolError> {
        self.check_dev(dev)?;
        let mut plan: Vec<(u64, Option<u64>)> = Vec::new();
        for (vb, within, n) in self.pieces(offset, len).collect::<Vec<_>>() {
            let at = self.md.lookup(dev, vb)?.map(|m| m.data_block * self.block_bytes + within);
            match (plan.last_mut(), at) {
                (Some((l, Some(prev))), Some(a)) if *prev + *l == a => *l += n,
                (Some((l, None)), None) => *l += n,
                _ => plan.push((n, at)),
            }
        }
        Ok(plan)
    }

    /// Allocate `n` data blocks, all or none. When the pool is full but the current
    /// transaction freed blocks, commit (which makes them reusable) and try again.
    fn alloc_n(&mut self, n: usize) -> Result<Vec<u64>, PoolError> {
        for attempt in 0..2 {
            let mut got = Vec::with_capacity(n);
            while got.len() < n {
                match self.md.alloc_data_block()? {
                    Some(b) => got.push(b),
                    None => break,
                }
            }
            if got.len() == n {
                return Ok(got);
            }
            for b in got {
                self.md.release_data_block(b)?;
            }
            if attempt == 0 && self.md.commit_would_free_data() {
                self.commit()?;
            } else {
                break;
            }
        }
        Err(PoolError::NoSpace { nr_blocks: self.md.status().data_total_blocks })
    }

    /// Write `data` to device `dev` at byte `offset`. When the pool lacks the data
    /// blocks the write needs, it fails with [`PoolError::NoSpace`] and changes nothing.
    pub fn write(&mut self, dev: DevId, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        if self.read_only {
            return Err(PoolError::ReadOnly);
        }
        self.check_dev(dev)?;
        let mut plan = Vec::new();
        for (vb, within, n) in self.pieces(offset, data.len() as u64).collect::<Vec<_>>() {
            plan.push((vb, within, n, self.md.lookup(dev, vb)?));
        }
        let need = plan.iter().filter(|p| p.3.is_none_or(|m| m.shared)).count();
        let mut fresh = self.alloc_n(need)?.into_iter();
        let mut done = 0usize;
        let bs = self.block_bytes;
        let mut result = Ok(());
        for (vb, within, n, found) in plan {
            let src = &data[done..done + n as usize];
            done += n as usize;
            if result.is_err() {
                continue;
            }
            match found {
                Some(m) if !m.shared => {
                    result = self.data.write_all_at(src, m.data_block * bs + within).map_err(data_err);
                }
                _ => {
                    let Some(nb) = fresh.next() else { continue };
                    let whole = within == 0 && n == bs;
                    result = self
                        .fill_new_block(nb, found.map(|m| m.data_block), whole, within, src)
                        .and_then(|()| self.md.insert_mapping(dev, vb, nb));
                    if result.is_err() {
                        let _ = self.md.release_data_block(nb);
                    }
                }
            }
        }
        for nb in fresh {
            self.md.release_data_block(nb)?;
        }
        result
    }

    /// Prepare new data block `nb`: a copy of `old` (or zeros), with `src` at `within`.
    fn fill_new_block(
        &mut self,
        nb: u64,
        old: Option<u64>,
        whole: bool,
        within: u64,
        src: &[u8],
    ) -> Result<(), PoolError> {
        let bs = self.block_bytes;
        let base = nb * bs;
        if !whole {
            match old {
                Some(ob) => self.copy_block(ob, nb)?,
                None => self.zero_range(base, bs)?,
            }
        }
        self.data.write_all_at(src, base + within).map_err(data_err)
    }

    fn copy_block(&mut self, from: u64, to: u64) -> Result<(), PoolError> {
        let bs = self.block_bytes;
        let mut buf = vec![0u8; (bs as usize).min(CHUNK)];
        let mut off = 0u64;
        while off < bs {
            let n = (bs - off).min(buf.len() as u64) as usize;
            self.data.read_exact_at(&mut buf[..n], from * bs + off).map_err(data_err)?;
            self.data.write_all_at(&buf[..n], to * bs + off).map_err(data_err)?;
            off += n as u64;
        }
        Ok(())
    }

    /// Make `[off, off+len)` of the data file read as zeros: punch a hole, or write
    /// zeros where the file system cannot punch.
    fn zero_range(&mut self, off: u64, len: u64) -> Result<(), PoolError> {
        if self.punch {
            match fallocate(
                self.data.as_raw_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                off as i64,
                len as i64,
            ) {
                Ok(()) => return Ok(()),
                Err(nix::errno::Errno::EOPNOTSUPP) => self.punch = false,
                Err(e) => return Err(data_err(e.into())),
            }
        }
        let buf = vec![0u8; (len as usize).min(CHUNK)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.data.write_all_at(&buf[..n], off + done).map_err(data_err)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Discard `[offset, offset+len)`: every whole block inside is unmapped; partial
    /// blocks at the ends are left alone. Returns the number of blocks unmapped.
    pub fn discard(&mut self, dev: DevId, offset: u64, len: u64) -> Result<u64, PoolError> {
        if self.read_only {
            return Err(PoolError::ReadOnly);
        }
        self.check_dev(dev)?;
        let bs = self.block_bytes;
        let first = offset.div_ceil(bs);
        let end = offset.saturating_add(len) / bs;
        let mut vb = first;
        let mut n = 0;
        while vb < end {
            match self.md.next_mapped(dev, vb)? {
                Some((k, _)) if k < end => {
                    if self.md.remove_mapping(dev, k)? {
                        n += 1;
                    }
                    vb = k + 1;
                }
                _ => break,
            }
        }
        Ok(n)
    }

    /// Make `[offset, offset+len)` read as zeros. With `unmap`, whole blocks are
    /// unmapped and the partial blocks at the ends get zeros written only where they
    /// are mapped (an unmapped block reads as zeros already); without it, zeros are
    /// written everywhere, so every block in the range ends up mapped.
    pub fn write_zeroes(&mut self, dev: DevId, offset: u64, len: u64, unmap: bool) -> Result<(), PoolError> {
        if self.read_only {
            return Err(PoolError::ReadOnly);
        }
        self.check_dev(dev)?;
        let zeros = vec![0u8; (self.block_bytes as usize).min(CHUNK)];
        for (vb, within, n) in self.pieces(offset, len).collect::<Vec<_>>() {
            if unmap {
                if within == 0 && n == self.block_bytes {
                    self.md.remove_mapping(dev, vb)?;
                    continue;
                }
                if self.md.lookup(dev, vb)?.is_none() {
                    continue;
                }
            }
            let mut done = 0u64;
            while done < n {
                let k = (n - done).min(zeros.len() as u64);
                self.write(dev, vb * self.block_bytes + within + done, &zeros[..k as usize])?;
                done += k;
            }
        }
        Ok(())
    }

    /// Allocation of `[offset, offset+len)`: runs of (length, mapped), in order,
    /// covering the range exactly. Unmapped runs read as zeros.
    pub fn extents(&mut self, dev: DevId, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, PoolError> {
        self.check_dev(dev)?;
        let bs = self.block_bytes;
        let end = offset.saturating_add(len);
        if end <= offset {
            return Ok(Vec::new());
        }
        let first = offset / bs;
        let last = (end - 1) / bs;
        let mapped: Vec<u64> = self.md.mappings(dev, first, last + 1)?.into_iter().map(|m| m.vblock).collect();
        let mut out: Vec<(u64, bool)> = Vec::new();
        let mut push = |n: u64, m: bool| match out.last_mut() {
            Some(last) if last.1 == m => last.0 += n,
            _ => out.push((n, m)),
        };
        let mut pos = offset;
        for vb in mapped {
            let start = (vb * bs).max(offset);
            if start > pos {
                push(start - pos, false);
            }
            let stop = ((vb + 1) * bs).min(end);
            push(stop - start, true);
            pos = stop;
        }
        if pos < end {
            push(end - pos, false);
        }
        Ok(out)
    }

    /// Make everything so far durable. Data blocks the commit released are punched
    /// out of the data file afterwards.
    pub fn commit(&mut self) -> Result<(), PoolError> {
        let data = &self.data;
        let Committed { released_data } = self.md.commit(&mut || data.sync_data())?;
        self.punch_released(released_data);
        Ok(())
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
            if fallocate(
                self.data.as_raw_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                (start * bs) as i64,
                (run * bs) as i64,
            )
            .is_err()
            {
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

    /// The data file (for tools that read raw blocks).
    pub fn data_file(&self) -> &File {
        &self.data
    }
}
