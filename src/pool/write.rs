//! Writing thin devices: allocate-on-write for unmapped blocks (the rest of a new
//! block is zero-filled), copy-on-write for blocks a snapshot may share, writes in
//! place otherwise; and write-zeroes, with or without unmapping.

use std::io;

use super::{data_err, Pool, CHUNK};
use crate::error::PoolError;
use crate::thin::DevId;

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
        self.writable()?;
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
                    result = self.data.write_at(src, m.data_block * bs + within).map_err(data_err);
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
        self.data.write_at(src, base + within).map_err(data_err)
    }

    fn copy_block(&mut self, from: u64, to: u64) -> Result<(), PoolError> {
        let bs = self.block_bytes;
        let mut buf = vec![0u8; (bs as usize).min(CHUNK)];
        let mut off = 0u64;
        while off < bs {
            let n = (bs - off).min(buf.len() as u64) as usize;
            self.data.read_at(&mut buf[..n], from * bs + off).map_err(data_err)?;
            self.data.write_at(&buf[..n], to * bs + off).map_err(data_err)?;
            off += n as u64;
        }
        Ok(())
    }

    /// Make `[off, off+len)` of the data file read as zeros: punch a hole, or write
    /// zeros where the storage cannot punch.
    fn zero_range(&mut self, off: u64, len: u64) -> Result<(), PoolError> {
        if self.punch {
            match self.data.punch_hole(off, len) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => self.punch = false,
                Err(e) => return Err(data_err(e)),
            }
        }
        let buf = vec![0u8; (len as usize).min(CHUNK)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.data.write_at(&buf[..n], off + done).map_err(data_err)?;
            done += n as u64;
        }
        Ok(())
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
        }
        Ok(())
    }
}
