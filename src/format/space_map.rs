//! Space-map structures.
//!
//! **Space-map root** (first 32 bytes of each 128-byte area in the superblock):
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0 | u64 | nr_blocks |
//! | 8 | u64 | nr_allocated (blocks with count >= 1) |
//! | 16 | u64 | bitmap_root (data: index btree root; metadata: index block) |
//! | 24 | u64 | ref_count_root (overflow btree, u32 values) |
//!
//! **Index entry** (16 bytes; data index btree value, metadata index block slot):
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0 | u64 | blocknr of the bitmap block |
//! | 8 | u32 | nr_free (entries past nr_blocks count as free) |
//! | 12 | u32 | none_free_before (lower bound of the first free entry) |
//!
//! **Bitmap block** (salt 240779): csum u32, not_used u32, blocknr u64, then 4080 bytes of
//! 16320 two-bit entries. Entry `e` is in byte `16 + e/4`; bit `2(e%4)` has value 2 and bit
//! `2(e%4)+1` value 1. Value 3 means "count >= 3, see the ref-count tree".
//!
//! **Metadata index block** (salt 160478): csum u32, padding u32, blocknr u64, then 255 index
//! entries of 16 bytes.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::checksum::{self, BlockKind, PrefixError};
use super::{zeroed_block, Block, BLOCK_SIZE};

/// Two-bit entries per bitmap block.
pub const ENTRIES_PER_BITMAP: u64 = ((BLOCK_SIZE - BITMAP_HEADER) * 4) as u64;
/// Bitmap header size.
pub const BITMAP_HEADER: usize = 16;
/// Index entries in the metadata index block.
pub const MAX_METADATA_BITMAPS: usize = 255;
const INDEX_HEADER: usize = 16;

/// A space-map root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmRoot {
    /// Blocks the space map covers.
    pub nr_blocks: u64,
    /// Blocks with a non-zero count.
    pub nr_allocated: u64,
    /// Index: the metadata index block, or the root of the data index tree.
    pub bitmap_root: u64,
    /// Root of the overflow ref-count tree (counts of 3 and more).
    pub ref_count_root: u64,
}

impl SmRoot {
    /// Encoded size.
    pub const SIZE: usize = 32;

    /// Decode from exactly 32 bytes.
    pub fn decode(b: &[u8]) -> SmRoot {
        SmRoot {
            nr_blocks: LE::read_u64(&b[0..]),
            nr_allocated: LE::read_u64(&b[8..]),
            bitmap_root: LE::read_u64(&b[16..]),
            ref_count_root: LE::read_u64(&b[24..]),
        }
    }

    /// Encode into exactly 32 bytes.
    pub fn encode(&self, b: &mut [u8]) {
        LE::write_u64(&mut b[0..], self.nr_blocks);
        LE::write_u64(&mut b[8..], self.nr_allocated);
        LE::write_u64(&mut b[16..], self.bitmap_root);
        LE::write_u64(&mut b[24..], self.ref_count_root);
    }
}

/// One index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    /// Block holding the bitmap.
    pub blocknr: u64,
    /// Free entries in the bitmap.
    pub nr_free: u32,
    /// No free entry before this index in the bitmap.
    pub none_free_before: u32,
}

impl IndexEntry {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Decode from 16 bytes.
    pub fn decode(b: &[u8]) -> IndexEntry {
        IndexEntry {
            blocknr: LE::read_u64(&b[0..]),
            nr_free: LE::read_u32(&b[8..]),
            none_free_before: LE::read_u32(&b[12..]),
        }
    }

    /// Encode to 16 bytes.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        LE::write_u64(&mut b[0..], self.blocknr);
        LE::write_u32(&mut b[8..], self.nr_free);
        LE::write_u32(&mut b[12..], self.none_free_before);
        b
    }
}

/// Two-bit entry `e` of a bitmap block.
pub fn bitmap_get(b: &Block, e: usize) -> u8 {
    let byte = b[BITMAP_HEADER + e / 4];
    let shift = 2 * (e % 4);
    let hi = (byte >> shift) & 1;
    let lo = (byte >> (shift + 1)) & 1;
    (hi << 1) | lo
}

/// Set two-bit entry `e` to `v` (0..=3).
pub fn bitmap_set(b: &mut Block, e: usize, v: u8) {
    let shift = 2 * (e % 4);
    let bits = (((v >> 1) & 1) << shift) | ((v & 1) << (shift + 1));
    let byte = &mut b[BITMAP_HEADER + e / 4];
    *byte = (*byte & !(3 << shift)) | bits;
}

/// Encode a bitmap from per-entry values (at most 16320, each 0..=3); the rest are 0.
/// The block is not sealed.
pub fn bitmap_encode(values: impl Iterator<Item = u8>) -> Box<Block> {
    let mut b = zeroed_block();
    for (e, v) in values.enumerate().take(ENTRIES_PER_BITMAP as usize) {
        if v != 0 {
            bitmap_set(&mut b, e, v);
        }
    }
    b
}

/// Check a bitmap block's checksum and blocknr.
pub fn bitmap_verify(b: &Block, location: u64) -> Result<(), PrefixError> {
    checksum::verify(b, BlockKind::Bitmap, location)
}

/// Decode the metadata index block: its 255 entries (unused ones are zero).
pub fn index_decode(b: &Block, location: u64) -> Result<Vec<IndexEntry>, PrefixError> {
    checksum::verify(b, BlockKind::Index, location)?;
    Ok((0..MAX_METADATA_BITMAPS).map(|i| IndexEntry::decode(&b[INDEX_HEADER + IndexEntry::SIZE * i..])).collect())
}

/// Encode the metadata index block, sealed for `location`.
pub fn index_encode(entries: &[IndexEntry], location: u64) -> Box<Block> {
    let mut b = zeroed_block();
    for (i, e) in entries.iter().take(MAX_METADATA_BITMAPS).enumerate() {
        let off = INDEX_HEADER + IndexEntry::SIZE * i;
        b[off..off + IndexEntry::SIZE].copy_from_slice(&e.encode());
    }
    checksum::seal(&mut b, BlockKind::Index, location);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bit_order_matches_kernel_bytes() {
        let b = bitmap_encode([1u8, 1, 1, 1].into_iter());
        assert_eq!(b[16], 0xAA);
        let b = bitmap_encode([2u8, 2, 3, 3].into_iter());
        assert_eq!(b[16], 0xF5);
        let b = bitmap_encode([1u8, 0, 1, 0].into_iter());
        assert_eq!(b[16], 0x22);
        for (e, v) in [1u8, 0, 1, 0].into_iter().enumerate() {
            assert_eq!(bitmap_get(&b, e), v);
        }
    }

    #[test]
    fn entries_per_bitmap_is_16320() {
        assert_eq!(ENTRIES_PER_BITMAP, 16320);
    }

    #[test]
    fn index_block_round_trips() {
        let entries = vec![
            IndexEntry { blocknr: 3, nr_free: 16312, none_free_before: 8 },
            IndexEntry { blocknr: 99, nr_free: 16320, none_free_before: 0 },
        ];
        let b = index_encode(&entries, 1);
        let back = index_decode(&b, 1).expect("valid");
        assert_eq!(&back[..2], &entries[..]);
        assert_eq!(back[2], IndexEntry::default());
        assert!(index_decode(&b, 2).is_err());
    }
}
