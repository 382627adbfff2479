//! Discarding: whole blocks inside a range are unmapped; their data blocks are
//! punched out of the data file once the commit that freed them is durable
//! ([`Pool::commit`]).
//!
//! dm-thin only frees a block when one discard covers all of it, so a file system
//! that discards 4 KiB at a time on 64 KiB blocks leaves space stuck. Here the
//! discarded (or zeroed) sub-ranges of mapped blocks are remembered in memory;
//! once every byte of a block has been discarded, it is unmapped and released.
//! Losing this memory (a restart, a crash) only loses a chance to free: nothing
//! on disk depends on it. A write to a block forgets what it overwrites.

use std::collections::HashMap;

use super::Pool;
use crate::error::PoolError;
use crate::thin::DevId;

/// Most blocks whose partial discards are remembered at once; past it the oldest
/// are forgotten (a bound on memory, not on correctness).
const MAX_TRACKED: usize = 1 << 20;

/// Discarded sub-ranges of mapped blocks: sorted, disjoint `[start, end)` byte
/// ranges inside each block.
#[derive(Debug, Default)]
pub(super) struct PartialDiscards {
    ranges: HashMap<(DevId, u64), Vec<(u64, u64)>>,
}

impl PartialDiscards {
    /// Remember `[within, within + len)` of block `vb` as discarded; true when the
    /// whole block of `block_bytes` is now discarded (and forgotten).
    fn add(&mut self, dev: DevId, vb: u64, within: u64, len: u64, block_bytes: u64) -> bool {
        if self.ranges.len() >= MAX_TRACKED && !self.ranges.contains_key(&(dev, vb)) {
            return false;
        }
        let v = self.ranges.entry((dev, vb)).or_default();
        let (mut s, mut e) = (within, within + len);
        v.retain(|&(a, b)| {
            if b < s || a > e {
                return true;
            }
            s = s.min(a);
            e = e.max(b);
            false
        });
        let at = v.partition_point(|&(a, _)| a < s);
        v.insert(at, (s, e));
        if v.len() == 1 && v[0] == (0, block_bytes) {
            self.ranges.remove(&(dev, vb));
            return true;
        }
        false
    }

    /// Block `vb` got `[within, within + len)` written: those bytes are live again.
    pub(super) fn written(&mut self, dev: DevId, vb: u64, within: u64, len: u64) {
        let Some(v) = self.ranges.get_mut(&(dev, vb)) else { return };
        let (s, e) = (within, within + len);
        let mut out = Vec::with_capacity(v.len() + 1);
        for &(a, b) in v.iter() {
            if b <= s || a >= e {
                out.push((a, b));
                continue;
            }
            if a < s {
                out.push((a, s));
            }
            if b > e {
                out.push((e, b));
            }
        }
        if out.is_empty() {
            self.ranges.remove(&(dev, vb));
        } else {
            *v = out;
        }
    }

    /// Forget block `vb` (unmapped).
    fn forget(&mut self, dev: DevId, vb: u64) {
        self.ranges.remove(&(dev, vb));
    }

    /// Forget a deleted device.
    pub(super) fn forget_device(&mut self, dev: DevId) {
        self.ranges.retain(|&(d, _), _| d != dev);
    }
}

impl Pool {
    /// Discard `[offset, offset+len)`: every whole block inside is unmapped; the
    /// partial blocks at the ends are remembered, and unmapped once all of their
    /// bytes have been discarded. Returns the number of blocks unmapped.
    pub fn discard(&mut self, dev: DevId, offset: u64, len: u64) -> Result<u64, PoolError> {
        self.writable()?;
        self.check_dev(dev)?;
        let bs = self.block_bytes;
        let end = offset.saturating_add(len);
        let first = offset.div_ceil(bs);
        let last = end / bs;
        let mut n = 0;
        // The partial blocks at the ends.
        let mut partial = Vec::new();
        if first > last {
            partial.push((offset / bs, offset % bs, len));
        } else {
            if offset % bs != 0 {
                partial.push((offset / bs, offset % bs, first * bs - offset));
            }
            if end % bs != 0 {
                partial.push((last, 0, end % bs));
            }
        }
        for (vb, within, l) in partial {
            if l > 0 && self.md.lookup(dev, vb)?.is_some() && self.discarded.add(dev, vb, within, l, bs) {
                n += u64::from(self.md.remove_mapping(dev, vb)?);
            }
        }
        let mut vb = first;
        while vb < last {
            match self.md.next_mapped(dev, vb)? {
                Some((k, _)) if k < last => {
                    if self.md.remove_mapping(dev, k)? {
                        n += 1;
                    }
                    self.discarded.forget(dev, k);
                    vb = k + 1;
                }
                _ => break,
            }
        }
        Ok(n)
    }

    /// Remember that `[within, within + len)` of mapped block `vb` reads as zeros
    /// now (write-zeroes); unmap the block once all of it has been discarded or
    /// zeroed.
    pub(super) fn zeroed(&mut self, dev: DevId, vb: u64, within: u64, len: u64) -> Result<(), PoolError> {
        if self.discarded.add(dev, vb, within, len, self.block_bytes) {
            self.md.remove_mapping(dev, vb)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_ranges_merge_until_the_block_is_whole_and_writes_take_bytes_back() {
        let mut p = PartialDiscards::default();
        assert!(!p.add(0, 5, 0, 4096, 16384));
        assert!(!p.add(0, 5, 8192, 4096, 16384));
        p.written(0, 5, 8192, 100);
        assert!(!p.add(0, 5, 4096, 4096, 16384));
        assert!(!p.add(0, 5, 12288, 4096, 16384));
        // 8192..8292 was written after its discard: still live.
        assert_eq!(p.ranges[&(0, 5)], vec![(0, 8192), (8292, 16384)]);
        assert!(p.add(0, 5, 8000, 400, 16384), "every byte discarded now");
        assert!(p.ranges.is_empty());
    }
}
