//! Reading thin devices: bytes ([`Pool::read`]), where they live in the data file
//! ([`Pool::read_plan`], for reads outside the pool's lock) and which ranges are
//! mapped ([`Pool::extents`]).

use super::Pool;
use crate::error::PoolError;
use crate::thin::DevId;

/// A piece of a read: `len` bytes found at byte `at` of the data file, or nowhere
/// (`None`: unmapped, reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// Length in bytes.
    pub len: u64,
    /// Offset in the data file, `None` when unmapped.
    pub at: Option<u64>,
}

/// A run of a device's allocation: `len` bytes, all mapped or all unmapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocRun {
    /// Length in bytes.
    pub len: u64,
    /// Mapped (holds data) or not (reads as zeros).
    pub mapped: bool,
}

impl Pool {
    /// Read `buf.len()` bytes of device `dev` at byte `offset`.
    pub fn read(&mut self, dev: DevId, offset: u64, buf: &mut [u8]) -> Result<(), PoolError> {
        self.check_dev(dev)?;
        let mut done = 0usize;
        for (vb, within, n) in self.pieces(offset, buf.len() as u64).collect::<Vec<_>>() {
            let out = &mut buf[done..done + n as usize];
            match self.md.lookup(dev, vb)? {
                None => out.fill(0),
                Some(m) => self.data.read_at(out, m.data_block * self.block_bytes + within)?,
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Where the bytes of `[offset, offset+len)` live: per piece, its length and its
    /// offset in the data file (`None`: unmapped, reads as zeros). Valid until the data
    /// reuse epoch ([`Pool::data_reuse_epoch`]) changes.
    pub fn read_plan(&mut self, dev: DevId, offset: u64, len: u64) -> Result<Vec<Located>, PoolError> {
        self.check_dev(dev)?;
        let mut plan: Vec<Located> = Vec::new();
        for (vb, within, n) in self.pieces(offset, len).collect::<Vec<_>>() {
            let at = self.md.lookup(dev, vb)?.map(|m| m.data_block * self.block_bytes + within);
            match (plan.last_mut(), at) {
                (Some(Located { len: l, at: Some(prev) }), Some(a)) if *prev + *l == a => *l += n,
                (Some(Located { len: l, at: None }), None) => *l += n,
                _ => plan.push(Located { len: n, at }),
            }
        }
        Ok(plan)
    }

    /// Allocation of `[offset, offset+len)`: runs in order, covering the range
    /// exactly. Unmapped runs read as zeros.
    pub fn extents(&mut self, dev: DevId, offset: u64, len: u64) -> Result<Vec<AllocRun>, PoolError> {
        self.check_dev(dev)?;
        let bs = self.block_bytes;
        let end = offset.saturating_add(len);
        if end <= offset {
            return Ok(Vec::new());
        }
        let first = offset / bs;
        let last = (end - 1) / bs;
        let mapped: Vec<u64> = self.md.mappings(dev, first, last + 1)?.into_iter().map(|m| m.vblock).collect();
        let mut out: Vec<AllocRun> = Vec::new();
        let mut push = |n: u64, m: bool| match out.last_mut() {
            Some(last) if last.mapped == m => last.len += n,
            _ => out.push(AllocRun { len: n, mapped: m }),
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
}
