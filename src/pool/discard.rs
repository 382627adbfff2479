//! Discarding: whole blocks inside a range are unmapped; their data blocks are
//! punched out of the data file once the commit that freed them is durable
//! ([`Pool::commit`]).

use super::Pool;
use crate::error::PoolError;
use crate::thin::DevId;

impl Pool {
    /// Discard `[offset, offset+len)`: every whole block inside is unmapped; partial
    /// blocks at the ends are left alone. Returns the number of blocks unmapped.
    pub fn discard(&mut self, dev: DevId, offset: u64, len: u64) -> Result<u64, PoolError> {
        self.writable()?;
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
}
