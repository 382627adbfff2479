//! The units every layer speaks: thin device ids and the three block address spaces,
//! kept apart by type so that a virtual block can never be passed where a data block
//! is meant; and the splitter that cuts a byte range into per-block pieces.
//!
//! This is a leaf module: anyone may use it, it uses nothing of the crate.

use std::fmt;

macro_rules! newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$inner> for $name {
            fn from(v: $inner) -> $name {
                $name(v)
            }
        }
    };
}

newtype!(
    /// A virtual block of a thin device: byte `N x block size` of the device.
    VirtBlock(u64)
);
newtype!(
    /// A data block of the pool: byte `N x block size` of the data file.
    DataBlock(u64)
);
newtype!(
    /// A 4 KiB block of the metadata file.
    MetaBlock(u64)
);

/// A thin device id (24 bits on disk).
pub type DevId = u32;

/// One piece of a byte range cut at block boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The block the piece falls in.
    pub block: u64,
    /// Offset of the piece inside that block.
    pub within: u64,
    /// Length of the piece in bytes (never past the block's end).
    pub len: u64,
}

impl Piece {
    /// Does the piece cover its whole block?
    pub fn is_whole(&self, block_bytes: u64) -> bool {
        self.within == 0 && self.len == block_bytes
    }
}

/// Cut `[offset, offset + len)` into pieces of at most one block each, in order.
/// `block_bytes` must not be zero (an empty iterator is returned if it is).
pub fn pieces(offset: u64, len: u64, block_bytes: u64) -> impl Iterator<Item = Piece> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end || block_bytes == 0 {
            return None;
        }
        let block = pos / block_bytes;
        let within = pos % block_bytes;
        let n = (block_bytes - within).min(end - pos);
        pos += n;
        Some(Piece { block, within, len: n })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_exactly_and_never_cross_a_block() {
        let got: Vec<Piece> = pieces(100, 300, 128).collect();
        assert_eq!(
            got,
            vec![
                Piece { block: 0, within: 100, len: 28 },
                Piece { block: 1, within: 0, len: 128 },
                Piece { block: 2, within: 0, len: 128 },
                Piece { block: 3, within: 0, len: 16 },
            ]
        );
        assert!(got[1].is_whole(128));
        assert_eq!(pieces(0, 0, 128).count(), 0);
        assert_eq!(pieces(u64::MAX - 1, 10, 128).map(|p| p.len).sum::<u64>(), 1);
    }
}
