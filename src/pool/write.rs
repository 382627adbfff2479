//! Writing thin devices: allocate-on-write for unmapped blocks (the rest of a new
//! block is zero-filled), copy-on-write for blocks a snapshot may share, writes in
//! place otherwise; and write-zeroes, with or without unmapping.

use super::data::DataFile;
use super::{Pool, CHUNK};
use crate::error::PoolError;
use crate::thin::{DevId, MetaNeed};

/// Where one piece of a write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Into this mapped, unshared data block.
    InPlace(u64),
    /// Into a new data block, first filled from `old` (copy-on-write) or zeros.
    New {
        /// The new block.
        block: u64,
        /// The block it replaces, if the virtual block was mapped (shared).
        old: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    vblock: u64,
    within: u64,
    len: u64,
    target: Target,
}

/// A write looked up and allocated by [`Pool::plan_write`], waiting for its data
/// I/O ([`WritePlan::write_data`]) and its mappings ([`Pool::finish_write`]).
#[derive(Debug)]
#[must_use = "a plan holds allocated blocks until finish_write"]
pub struct WritePlan {
    dev: DevId,
    pieces: Vec<Planned>,
}

impl WritePlan {
    /// The virtual blocks the write touches, in order.
    pub fn vblocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.pieces.iter().map(|p| p.vblock)
    }

    /// Does the write map new blocks (allocate-on-write or copy-on-write)?
    pub fn allocates(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p.target, Target::New { .. }))
    }

    /// Write `data` where the plan says: in place, or into the new blocks (zero-filled
    /// or copied first). Touches no metadata.
    pub fn write_data(&self, file: &DataFile, data: &[u8]) -> Result<(), PoolError> {
        let bs = file.block_bytes();
        let mut done = 0usize;
        for p in &self.pieces {
            let src = &data[done..done + p.len as usize];
            done += p.len as usize;
            match p.target {
                Target::InPlace(b) => file.write_at(src, b * bs + p.within)?,
                Target::New { block, old } => file.fill_new_block(block, old, p.within, src)?,
            }
        }
        Ok(())
    }
}

impl Pool {
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
                self.publish_reuses();
                return Ok(got);
            }
            for b in got {
                self.md.release_data_block(b)?;
            }
            if attempt == 0 && self.commit_when_full && self.md.commit_would_free_data() {
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
        let plan = self.plan_write(dev, offset, data.len() as u64)?;
        let r = plan.write_data(&self.data, data);
        self.finish_write(plan, r)
    }

    /// Look up where a write of `len` bytes at `offset` goes. Pieces that land in
    /// mapped, unshared blocks are written in place; the others get a freshly
    /// allocated block each (all or none: [`PoolError::NoSpace`] changes nothing).
    /// No data is touched and no mapping changes: [`WritePlan::write_data`] does the
    /// data I/O (it needs no metadata, so it may run outside the metadata lock), then
    /// [`Pool::finish_write`] maps the new blocks.
    pub fn plan_write(&mut self, dev: DevId, offset: u64, len: u64) -> Result<WritePlan, PoolError> {
        let mut pieces = self.look_up_pieces(dev, offset, len)?;
        let need = pieces.iter().filter(|p| matches!(p.target, Target::New { .. })).count();
        if need > 0 {
            self.make_metadata_room()?;
            // Refuse before allocating when the mappings could not be inserted.
            let cost = self.md.mapping_change_cost(dev)?;
            self.md.ensure_metadata(MetaNeed::Grow(cost))?;
        }
        let mut fresh = self.alloc_n(need)?.into_iter();
        for p in &mut pieces {
            if let Target::New { block, .. } = &mut p.target {
                *block = fresh.next().ok_or_else(|| PoolError::invalid("allocated fewer blocks than planned"))?;
            }
        }
        Ok(WritePlan { dev, pieces })
    }

    /// [`Pool::plan_write`] for a write that lands only in mapped, unshared blocks;
    /// `None` (with nothing changed) when it would need new blocks.
    pub fn plan_in_place(&mut self, dev: DevId, offset: u64, len: u64) -> Result<Option<WritePlan>, PoolError> {
        let pieces = self.look_up_pieces(dev, offset, len)?;
        if pieces.iter().any(|p| matches!(p.target, Target::New { .. })) {
            return Ok(None);
        }
        Ok(Some(WritePlan { dev, pieces }))
    }

    /// Where each piece of a write goes; new blocks are not allocated yet.
    fn look_up_pieces(&mut self, dev: DevId, offset: u64, len: u64) -> Result<Vec<Planned>, PoolError> {
        self.writable()?;
        self.check_dev(dev)?;
        let mut pieces = Vec::new();
        for (vb, within, n) in self.pieces(offset, len).collect::<Vec<_>>() {
            self.discarded.written(dev, vb, within, n);
            let target = match self.md.lookup(dev, vb)? {
                Some(m) if !m.shared => Target::InPlace(m.data_block),
                found => Target::New { block: u64::MAX, old: found.map(|m| m.data_block) },
            };
            pieces.push(Planned { vblock: vb, within, len: n, target });
        }
        Ok(pieces)
    }

    /// Complete a planned write whose data I/O ended with `result`: on success map
    /// every new block; on failure release them (mappings stay as they were; pieces
    /// written in place may hold the new bytes). Returns `result`.
    pub fn finish_write(&mut self, plan: WritePlan, result: Result<(), PoolError>) -> Result<(), PoolError> {
        let mut outcome = result;
        for p in plan.pieces {
            let Target::New { block, .. } = p.target else { continue };
            if outcome.is_ok() {
                outcome = self.md.insert_mapping(plan.dev, p.vblock, block);
                if outcome.is_ok() {
                    continue;
                }
            }
            self.md.release_data_block(block)?;
        }
        outcome
    }

    /// Make `[offset, offset+len)` read as zeros. With `unmap`, whole blocks are
    /// unmapped and the partial blocks at the ends get zeros written only where they
    /// are mapped (an unmapped block reads as zeros already); without it, zeros are
    /// written everywhere, so every block in the range ends up mapped.
    pub fn write_zeroes(&mut self, dev: DevId, offset: u64, len: u64, unmap: bool) -> Result<(), PoolError> {
        self.writable()?;
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
            if unmap {
                self.zeroed(dev, vb, within, n)?;
            }
        }
        Ok(())
    }
}
