//! B-tree values with structure: the bottom-level mapping value and device details.
//!
//! **block_time** (u64): `data_block << 24 | time`, data block 40 bits, time 24 bits.
//!
//! **Device details** (24 bytes):
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0 | u64 | mapped_blocks |
//! | 8 | u64 | transaction_id (pool trans id at creation) |
//! | 16 | u32 | creation_time |
//! | 20 | u32 | snapshotted_time |

use byteorder::{ByteOrder, LittleEndian as LE};

/// Largest time a mapping can carry.
pub const MAX_TIME: u32 = (1 << 24) - 1;

/// Pack a mapping value.
pub fn pack_block_time(data_block: u64, time: u32) -> u64 {
    (data_block << 24) | (time as u64 & MAX_TIME as u64)
}

/// Unpack a mapping value into (data block, time).
pub fn unpack_block_time(v: u64) -> (u64, u32) {
    (v >> 24, (v & MAX_TIME as u64) as u32)
}

/// Per-device details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceDetails {
    /// Virtual blocks mapped.
    pub mapped_blocks: u64,
    /// Transaction id when last changed.
    pub transaction_id: u64,
    /// Pool time at creation.
    pub creation_time: u32,
    /// Pool time of the last snapshot taken of (or from) it.
    pub snapshotted_time: u32,
}

impl DeviceDetails {
    /// Encoded size.
    pub const SIZE: usize = 24;

    /// Decode 24 bytes.
    pub fn decode(b: &[u8]) -> DeviceDetails {
        DeviceDetails {
            mapped_blocks: LE::read_u64(&b[0..]),
            transaction_id: LE::read_u64(&b[8..]),
            creation_time: LE::read_u32(&b[16..]),
            snapshotted_time: LE::read_u32(&b[20..]),
        }
    }

    /// Encode to 24 bytes.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        LE::write_u64(&mut b[0..], self.mapped_blocks);
        LE::write_u64(&mut b[8..], self.transaction_id);
        LE::write_u32(&mut b[16..], self.creation_time);
        LE::write_u32(&mut b[20..], self.snapshotted_time);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_time_packs_like_the_kernel_example() {
        let v = pack_block_time(64, 2);
        assert_eq!(v.to_le_bytes(), [0x02, 0, 0, 0x40, 0, 0, 0, 0]);
        assert_eq!(unpack_block_time(v), (64, 2));
    }

    #[test]
    fn device_details_match_the_kernel_example() {
        let d = DeviceDetails { mapped_blocks: 65, transaction_id: 0, creation_time: 0, snapshotted_time: 2 };
        let mut want = [0u8; 24];
        want[0] = 0x41;
        want[20] = 2;
        assert_eq!(d.encode(), want);
        assert_eq!(DeviceDetails::decode(&want), d);
    }
}
