//! On-disk formats of the dm-thin metadata device, byte for byte.
//!
//! Every structure is encoded and decoded in exactly one module here, with a byte
//! table in its doc comment. Nothing in `format` does I/O: functions take and return
//! 4096-byte buffers. All integers are little-endian (`byteorder::LittleEndian`).
//!
//! | module | structure |
//! |---|---|
//! | [`checksum`] | CRC-32C with per-block-type salts, common block prefix |
//! | [`superblock`] | block 0 (and the held metadata-snapshot copy) |
//! | [`node`] | B-tree node header, keys and values |
//! | [`space_map`] | space-map root, index entry, bitmap block, metadata index block |
//! | [`values`] | mapping value (block_time) and device details |

pub mod checksum;
pub mod node;
pub mod space_map;
pub mod superblock;
pub mod values;

/// Size of every metadata block, in bytes. The kernel supports no other.
pub const BLOCK_SIZE: usize = 4096;

/// One metadata block.
pub type Block = [u8; BLOCK_SIZE];

/// A new all-zero block on the heap.
pub fn zeroed_block() -> Box<Block> {
    Box::new([0u8; BLOCK_SIZE])
}

/// Largest number of metadata blocks the single metadata index block can describe
/// (255 bitmaps x 16320 entries).
pub const MAX_METADATA_BLOCKS: u64 = 255 * space_map::ENTRIES_PER_BITMAP;

/// Thin device ids are 24-bit.
pub const MAX_DEV_ID: u64 = (1 << 24) - 1;

/// Data block numbers are 40-bit (they share a u64 with a 24-bit time).
pub const MAX_DATA_BLOCKS: u64 = 1 << 40;

/// Data block size limits, in 512-byte sectors (64 KiB ..= 1 GiB, multiple of 64 KiB).
pub const MIN_DATA_BLOCK_SECTORS: u32 = 128;
/// See [`MIN_DATA_BLOCK_SECTORS`].
pub const MAX_DATA_BLOCK_SECTORS: u32 = 2_097_152;

/// Is `sectors` a data block size dm-thin accepts?
pub fn valid_data_block_sectors(sectors: u32) -> bool {
    (MIN_DATA_BLOCK_SECTORS..=MAX_DATA_BLOCK_SECTORS).contains(&sectors) && sectors % MIN_DATA_BLOCK_SECTORS == 0
}
