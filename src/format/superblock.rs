//! The superblock (block 0), also used for the held metadata-snapshot copy.
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0x000 | u32 | csum (salt 160774) |
//! | 0x004 | u32 | flags (bit 0 = NEEDS_CHECK) |
//! | 0x008 | u64 | blocknr |
//! | 0x010 | 16 B | uuid |
//! | 0x020 | u64 | magic = 27022010 |
//! | 0x028 | u32 | version (the kernel writes 2) |
//! | 0x02C | u32 | time (incremented per snapshot) |
//! | 0x030 | u64 | trans_id |
//! | 0x038 | u64 | held_root (0 = none) |
//! | 0x040 | 128 B | data space-map root (32 bytes used, rest zero) |
//! | 0x0C0 | 128 B | metadata space-map root (same) |
//! | 0x140 | u64 | data_mapping_root |
//! | 0x148 | u64 | device_details_root |
//! | 0x150 | u32 | data_block_size (sectors) |
//! | 0x154 | u32 | metadata_block_size (sectors, always 8) |
//! | 0x158 | u64 | metadata_nr_blocks |
//! | 0x160 | u32 | compat_flags |
//! | 0x164 | u32 | compat_ro_flags |
//! | 0x168 | u32 | incompat_flags |
//! | 0x16C.. | | zero |

use byteorder::{ByteOrder, LittleEndian as LE};

use super::checksum::{self, BlockKind, PrefixError};
use super::space_map::SmRoot;
use super::{zeroed_block, Block};

/// The dm-thin superblock magic.
pub const MAGIC: u64 = 27_022_010;
/// Superblock version the kernel writes.
pub const VERSION: u32 = 2;
/// Flag bit: the metadata needs checking.
pub const FLAG_NEEDS_CHECK: u32 = 1;
/// Metadata block size in sectors.
pub const METADATA_BLOCK_SECTORS: u32 = 8;

const FLAGS: usize = 0x004;
const UUID: usize = 0x010;
const MAGIC_OFF: usize = 0x020;
const VERSION_OFF: usize = 0x028;
const TIME: usize = 0x02C;
const TRANS_ID: usize = 0x030;
const HELD_ROOT: usize = 0x038;
const DATA_SM_ROOT: usize = 0x040;
const META_SM_ROOT: usize = 0x0C0;
const DATA_MAPPING_ROOT: usize = 0x140;
const DEVICE_DETAILS_ROOT: usize = 0x148;
const DATA_BLOCK_SIZE: usize = 0x150;
const METADATA_BLOCK_SIZE: usize = 0x154;
const METADATA_NR_BLOCKS: usize = 0x158;
const COMPAT_FLAGS: usize = 0x160;
const COMPAT_RO_FLAGS: usize = 0x164;
const INCOMPAT_FLAGS: usize = 0x168;
/// Size of the encoded structure; the rest of the block is zero.
pub const STRUCT_SIZE: usize = 0x16C;

/// Decoded superblock fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Superblock {
    /// Flags (`FLAG_NEEDS_CHECK`).
    pub flags: u32,
    /// Unused by the kernel; zero.
    pub uuid: [u8; 16],
    /// `MAGIC`.
    pub magic: u64,
    /// Format version (1 or 2).
    pub version: u32,
    /// Pool time: bumped by every snapshot.
    pub time: u32,
    /// Transaction id set by userspace.
    pub trans_id: u64,
    /// Block of the held metadata snapshot (0: none).
    pub held_root: u64,
    /// Data space map root.
    pub data_sm_root: SmRoot,
    /// Metadata space map root.
    pub metadata_sm_root: SmRoot,
    /// Root of the two-level mapping tree.
    pub data_mapping_root: u64,
    /// Root of the device-details tree.
    pub device_details_root: u64,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    /// Metadata block size in sectors (8).
    pub metadata_block_size: u32,
    /// Metadata device size in blocks when formatted.
    pub metadata_nr_blocks: u64,
    /// Compatible feature flags.
    pub compat_flags: u32,
    /// Read-only-compatible feature flags.
    pub compat_ro_flags: u32,
    /// Incompatible feature flags.
    pub incompat_flags: u32,
}

/// Why a superblock was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuperblockError {
    /// Checksum or blocknr.
    Prefix(PrefixError),
    /// Wrong magic number.
    Magic(u64),
    /// Metadata block size other than 8 sectors.
    MetadataBlockSize(u32),
    /// Feature flags this implementation does not know.
    Features {
        /// Unknown incompatible flags.
        incompat: u32,
        /// Unknown read-only-compatible flags.
        compat_ro: u32,
    },
}

impl std::fmt::Display for SuperblockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SuperblockError::Prefix(PrefixError::Checksum { stored, computed }) => {
                write!(f, "superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
            SuperblockError::Prefix(PrefixError::BlockNr { stored }) => {
                write!(f, "superblock blocknr is {stored}, not its own location")
            }
            SuperblockError::Magic(m) => write!(f, "bad superblock magic {m} (expected {MAGIC})"),
            SuperblockError::MetadataBlockSize(s) => {
                write!(f, "metadata block size {s} sectors (only 8 is supported)")
            }
            SuperblockError::Features { incompat, compat_ro } => {
                write!(f, "unsupported feature flags (incompat {incompat:#x}, compat_ro {compat_ro:#x})")
            }
        }
    }
}

impl Superblock {
    /// Decode and validate a superblock found at `location`.
    pub fn decode(block: &Block, location: u64) -> Result<Superblock, SuperblockError> {
        checksum::verify(block, BlockKind::Superblock, location).map_err(SuperblockError::Prefix)?;
        let sb = Self::decode_unchecked(block);
        if sb.magic != MAGIC {
            return Err(SuperblockError::Magic(sb.magic));
        }
        if sb.metadata_block_size != METADATA_BLOCK_SECTORS {
            return Err(SuperblockError::MetadataBlockSize(sb.metadata_block_size));
        }
        if sb.incompat_flags != 0 || sb.compat_ro_flags != 0 {
            return Err(SuperblockError::Features { incompat: sb.incompat_flags, compat_ro: sb.compat_ro_flags });
        }
        Ok(sb)
    }

    /// Decode the fields without any validation.
    pub fn decode_unchecked(b: &Block) -> Superblock {
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[UUID..UUID + 16]);
        Superblock {
            flags: LE::read_u32(&b[FLAGS..]),
            uuid,
            magic: LE::read_u64(&b[MAGIC_OFF..]),
            version: LE::read_u32(&b[VERSION_OFF..]),
            time: LE::read_u32(&b[TIME..]),
            trans_id: LE::read_u64(&b[TRANS_ID..]),
            held_root: LE::read_u64(&b[HELD_ROOT..]),
            data_sm_root: SmRoot::decode(&b[DATA_SM_ROOT..DATA_SM_ROOT + SmRoot::SIZE]),
            metadata_sm_root: SmRoot::decode(&b[META_SM_ROOT..META_SM_ROOT + SmRoot::SIZE]),
            data_mapping_root: LE::read_u64(&b[DATA_MAPPING_ROOT..]),
            device_details_root: LE::read_u64(&b[DEVICE_DETAILS_ROOT..]),
            data_block_size: LE::read_u32(&b[DATA_BLOCK_SIZE..]),
            metadata_block_size: LE::read_u32(&b[METADATA_BLOCK_SIZE..]),
            metadata_nr_blocks: LE::read_u64(&b[METADATA_NR_BLOCKS..]),
            compat_flags: LE::read_u32(&b[COMPAT_FLAGS..]),
            compat_ro_flags: LE::read_u32(&b[COMPAT_RO_FLAGS..]),
            incompat_flags: LE::read_u32(&b[INCOMPAT_FLAGS..]),
        }
    }

    /// Encode into a fresh block, sealed for `location` (0 for the live superblock).
    pub fn encode(&self, location: u64) -> Box<Block> {
        let mut b = zeroed_block();
        LE::write_u32(&mut b[FLAGS..], self.flags);
        b[UUID..UUID + 16].copy_from_slice(&self.uuid);
        LE::write_u64(&mut b[MAGIC_OFF..], self.magic);
        LE::write_u32(&mut b[VERSION_OFF..], self.version);
        LE::write_u32(&mut b[TIME..], self.time);
        LE::write_u64(&mut b[TRANS_ID..], self.trans_id);
        LE::write_u64(&mut b[HELD_ROOT..], self.held_root);
        self.data_sm_root.encode(&mut b[DATA_SM_ROOT..DATA_SM_ROOT + SmRoot::SIZE]);
        self.metadata_sm_root.encode(&mut b[META_SM_ROOT..META_SM_ROOT + SmRoot::SIZE]);
        LE::write_u64(&mut b[DATA_MAPPING_ROOT..], self.data_mapping_root);
        LE::write_u64(&mut b[DEVICE_DETAILS_ROOT..], self.device_details_root);
        LE::write_u32(&mut b[DATA_BLOCK_SIZE..], self.data_block_size);
        LE::write_u32(&mut b[METADATA_BLOCK_SIZE..], self.metadata_block_size);
        LE::write_u64(&mut b[METADATA_NR_BLOCKS..], self.metadata_nr_blocks);
        LE::write_u32(&mut b[COMPAT_FLAGS..], self.compat_flags);
        LE::write_u32(&mut b[COMPAT_RO_FLAGS..], self.compat_ro_flags);
        LE::write_u32(&mut b[INCOMPAT_FLAGS..], self.incompat_flags);
        checksum::seal(&mut b, BlockKind::Superblock, location);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_field_offsets_match_the_byte_table() {
        let sb = Superblock {
            flags: 1,
            uuid: [9; 16],
            magic: MAGIC,
            version: 2,
            time: 3,
            trans_id: 4,
            held_root: 5,
            data_sm_root: SmRoot { nr_blocks: 6, nr_allocated: 7, bitmap_root: 8, ref_count_root: 9 },
            metadata_sm_root: SmRoot { nr_blocks: 10, nr_allocated: 11, bitmap_root: 12, ref_count_root: 13 },
            data_mapping_root: 14,
            device_details_root: 15,
            data_block_size: 128,
            metadata_block_size: 8,
            metadata_nr_blocks: 1024,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        };
        let b = sb.encode(0);
        assert_eq!(&b[0x20..0x28], &[0xba, 0x52, 0x9c, 0x01, 0, 0, 0, 0]);
        assert_eq!(LE::read_u32(&b[0x2C..]), 3);
        assert_eq!(LE::read_u64(&b[0x40..]), 6);
        assert_eq!(LE::read_u64(&b[0x58..]), 9);
        assert_eq!(LE::read_u64(&b[0xC0..]), 10);
        assert_eq!(LE::read_u64(&b[0x140..]), 14);
        assert_eq!(LE::read_u32(&b[0x150..]), 128);
        assert_eq!(LE::read_u64(&b[0x158..]), 1024);
        assert!(b[STRUCT_SIZE..].iter().all(|&x| x == 0));
        assert_eq!(Superblock::decode(&b, 0), Ok(sb));
    }

    #[test]
    fn a_wrong_magic_is_rejected_even_with_a_good_checksum() {
        let sb = Superblock { magic: 1, metadata_block_size: 8, ..Default::default() };
        let b = sb.encode(0);
        assert_eq!(Superblock::decode(&b, 0), Err(SuperblockError::Magic(1)));
    }
}
