//! Block checksums and the common 16-byte block prefix.
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0 | u32 | csum: CRC-32C of bytes 4..4096, seeded with all ones, *not* inverted, XOR salt |
//! | 4 | u32 | flags (superblock, node) or padding (bitmap, index) |
//! | 8 | u64 | blocknr: the block's own location |
//!
//! `csum = !crc32c(bytes[4..]) ^ salt` where `crc32c` is the standard (inverted) CRC-32C.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::Block;

/// Offset of the stored checksum.
pub const CSUM_OFFSET: usize = 0;
/// Offset of the flags / padding word.
pub const FLAGS_OFFSET: usize = CSUM_OFFSET + 4;
/// Offset of the self-location field.
pub const BLOCKNR_OFFSET: usize = FLAGS_OFFSET + 4;

/// The kinds of metadata block, each with its checksum salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// Superblock, and the held metadata-snapshot copy.
    Superblock,
    /// A node of any B-tree.
    Node,
    /// A space-map bitmap block.
    Bitmap,
    /// The metadata space map's index block.
    Index,
}

impl BlockKind {
    /// The salt XORed into this kind's checksum.
    pub const fn salt(self) -> u32 {
        match self {
            BlockKind::Superblock => 160_774,
            BlockKind::Node => 121_107,
            BlockKind::Bitmap => 240_779,
            BlockKind::Index => 160_478,
        }
    }

    /// Human name for error messages.
    pub const fn name(self) -> &'static str {
        match self {
            BlockKind::Superblock => "superblock",
            BlockKind::Node => "btree node",
            BlockKind::Bitmap => "space-map bitmap",
            BlockKind::Index => "metadata space-map index",
        }
    }
}

/// The checksum the block should carry for `kind`.
pub fn compute(block: &Block, kind: BlockKind) -> u32 {
    !crc32c::crc32c(&block[FLAGS_OFFSET..]) ^ kind.salt()
}

/// The checksum stored in the block.
pub fn stored(block: &Block) -> u32 {
    LE::read_u32(&block[CSUM_OFFSET..])
}

/// The blocknr stored in the block.
pub fn stored_blocknr(block: &Block) -> u64 {
    LE::read_u64(&block[BLOCKNR_OFFSET..])
}

/// Set blocknr to `location`, then compute and store the checksum.
pub fn seal(block: &mut Block, kind: BlockKind, location: u64) {
    LE::write_u64(&mut block[BLOCKNR_OFFSET..], location);
    let csum = compute(block, kind);
    LE::write_u32(&mut block[CSUM_OFFSET..], csum);
}

/// Why a block failed its prefix check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixError {
    /// The checksum does not match the one computed with this kind's salt.
    Checksum {
        /// Stored value.
        stored: u32,
        /// Computed value.
        computed: u32,
    },
    /// The block says it lives somewhere else.
    BlockNr {
        /// The blocknr stored in the block.
        stored: u64,
    },
}

/// Check checksum (with `kind`'s salt), then that blocknr equals `location`.
pub fn verify(block: &Block, kind: BlockKind, location: u64) -> Result<(), PrefixError> {
    let computed = compute(block, kind);
    let stored = stored(block);
    if computed != stored {
        return Err(PrefixError::Checksum { stored, computed });
    }
    let nr = stored_blocknr(block);
    if nr != location {
        return Err(PrefixError::BlockNr { stored: nr });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_crc32c_check_value_is_the_castagnoli_one() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn salts_match_the_kernel_constants() {
        assert_eq!(BlockKind::Superblock.salt(), 0x0002_7406);
        assert_eq!(BlockKind::Node.salt(), 0x0001_D913);
        assert_eq!(BlockKind::Bitmap.salt(), 0x0003_AC8B);
        assert_eq!(BlockKind::Index.salt(), 0x0002_72DE);
    }

    #[test]
    fn a_sealed_block_verifies_and_a_flipped_byte_does_not() {
        let mut b = [0u8; 4096];
        b[100] = 7;
        seal(&mut b, BlockKind::Node, 42);
        assert_eq!(verify(&b, BlockKind::Node, 42), Ok(()));
        assert!(matches!(verify(&b, BlockKind::Bitmap, 42), Err(PrefixError::Checksum { .. })));
        assert_eq!(verify(&b, BlockKind::Node, 43), Err(PrefixError::BlockNr { stored: 42 }));
        b[4000] ^= 1;
        assert!(matches!(verify(&b, BlockKind::Node, 42), Err(PrefixError::Checksum { .. })));
    }
}
