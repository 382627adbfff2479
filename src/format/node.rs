//! B-tree node layout, shared by every tree of the pool.
//!
//! | offset | width | field |
//! |---|---|---|
//! | 0 | u32 | csum (salt 121107) |
//! | 4 | u32 | flags: 1 = INTERNAL, 2 = LEAF (exactly one) |
//! | 8 | u64 | blocknr |
//! | 16 | u32 | nr_entries |
//! | 20 | u32 | max_entries |
//! | 24 | u32 | value_size (internal nodes: 8) |
//! | 28 | u32 | padding (0) |
//! | 32 | 8 x max_entries | keys, u64, strictly ascending |
//! | 32 + 8 x max_entries | value_size x max_entries | values |
//!
//! Geometry is always read from the header: other writers may use another `max_entries`.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::checksum::{self, BlockKind, PrefixError};
use super::{Block, BLOCK_SIZE};

/// Flag of an internal node.
pub const INTERNAL: u32 = 1;
/// Flag of a leaf node.
pub const LEAF: u32 = 2;

const FLAGS: usize = 4;
const NR_ENTRIES: usize = 16;
const MAX_ENTRIES: usize = NR_ENTRIES + 4;
const VALUE_SIZE: usize = MAX_ENTRIES + 4;
/// Size of the node header; keys start here.
pub const HEADER_SIZE: usize = VALUE_SIZE + 8;

/// `max_entries` the kernel gives a node with this value size: a multiple of 3.
pub const fn max_entries_for(value_size: u32) -> u32 {
    let n = (BLOCK_SIZE as u32 - HEADER_SIZE as u32) / (8 + value_size);
    3 * (n / 3)
}

/// The header fields that give a node its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeHeader {
    /// Node kind: `INTERNAL` (1) or `LEAF` (2).
    pub flags: u32,
    /// Entries in use.
    pub nr_entries: u32,
    /// Capacity of the node for its value size.
    pub max_entries: u32,
    /// Bytes per value (8 in internal nodes).
    pub value_size: u32,
}

impl NodeHeader {
    /// Is this a leaf?
    pub fn is_leaf(&self) -> bool {
        self.flags & LEAF != 0
    }
    fn values_start(&self) -> usize {
        HEADER_SIZE + 8 * self.max_entries as usize
    }
    /// Byte offset of value `i`.
    pub fn value_offset(&self, i: usize) -> usize {
        self.values_start() + self.value_size as usize * i
    }
}

/// What is wrong with a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeError {
    /// Checksum or blocknr.
    Prefix(PrefixError),
    /// Neither or both of INTERNAL and LEAF.
    Flags(u32),
    /// `32 + (8 + value_size) x max_entries` exceeds the block.
    Geometry {
        /// Stored max_entries.
        max_entries: u32,
        /// Stored value size.
        value_size: u32,
    },
    /// More entries than room.
    NrEntries {
        /// Stored nr_entries.
        nr_entries: u32,
        /// Stored max_entries.
        max_entries: u32,
    },
    /// Value size not the one this tree uses.
    ValueSize {
        /// Stored value size.
        found: u32,
        /// What the tree needs.
        expected: u32,
    },
    /// Keys not strictly ascending at this index.
    KeyOrder {
        /// Index of the first key not above its predecessor.
        index: u32,
    },
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::Prefix(PrefixError::Checksum { stored, computed }) => {
                write!(f, "btree node checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
            NodeError::Prefix(PrefixError::BlockNr { stored }) => {
                write!(f, "btree node blocknr is {stored}, not its own location")
            }
            NodeError::Flags(x) => write!(f, "btree node flags {x:#x} (need exactly one of INTERNAL, LEAF)"),
            NodeError::Geometry { max_entries, value_size } => write!(
                f,
                "btree node geometry max_entries {max_entries} x value_size {value_size} does not fit a block"
            ),
            NodeError::NrEntries { nr_entries, max_entries } => {
                write!(f, "btree node nr_entries {nr_entries} > max_entries {max_entries}")
            }
            NodeError::ValueSize { found, expected } => {
                write!(f, "btree node value_size {found}, expected {expected}")
            }
            NodeError::KeyOrder { index } => write!(f, "btree node keys out of order at index {index}"),
        }
    }
}

/// Read the header without checking anything.
pub fn header(b: &Block) -> NodeHeader {
    NodeHeader {
        flags: LE::read_u32(&b[FLAGS..]),
        nr_entries: LE::read_u32(&b[NR_ENTRIES..]),
        max_entries: LE::read_u32(&b[MAX_ENTRIES..]),
        value_size: LE::read_u32(&b[VALUE_SIZE..]),
    }
}

/// Full validation of a node read from `location`: checksum, blocknr, flags, geometry,
/// entry count, value size (internal nodes 8, leaves `leaf_value_size`) and key order.
pub fn validate(b: &Block, location: u64, leaf_value_size: u32) -> Result<NodeHeader, NodeError> {
    checksum::verify(b, BlockKind::Node, location).map_err(NodeError::Prefix)?;
    validate_structure(b, leaf_value_size)
}

/// [`validate`] without the checksum/blocknr check.
pub fn validate_structure(b: &Block, leaf_value_size: u32) -> Result<NodeHeader, NodeError> {
    let h = header(b);
    let kind = h.flags & (INTERNAL | LEAF);
    if kind != INTERNAL && kind != LEAF || h.flags & !(INTERNAL | LEAF) != 0 {
        return Err(NodeError::Flags(h.flags));
    }
    let need = HEADER_SIZE as u64 + (8 + h.value_size as u64) * h.max_entries as u64;
    if need > BLOCK_SIZE as u64 || h.value_size == 0 || h.max_entries == 0 {
        return Err(NodeError::Geometry { max_entries: h.max_entries, value_size: h.value_size });
    }
    if h.nr_entries > h.max_entries {
        return Err(NodeError::NrEntries { nr_entries: h.nr_entries, max_entries: h.max_entries });
    }
    let expected = if h.is_leaf() { leaf_value_size } else { 8 };
    if h.value_size != expected {
        return Err(NodeError::ValueSize { found: h.value_size, expected });
    }
    for i in 1..h.nr_entries as usize {
        if key(b, i) <= key(b, i - 1) {
            return Err(NodeError::KeyOrder { index: i as u32 });
        }
    }
    Ok(h)
}

/// Key `i`.
pub fn key(b: &Block, i: usize) -> u64 {
    LE::read_u64(&b[HEADER_SIZE + 8 * i..])
}

/// Value `i` as raw bytes.
pub fn value<'a>(b: &'a Block, h: &NodeHeader, i: usize) -> &'a [u8] {
    let off = h.value_offset(i);
    &b[off..off + h.value_size as usize]
}

/// Value `i` of an 8-byte-valued node.
pub fn value_u64(b: &Block, h: &NodeHeader, i: usize) -> u64 {
    LE::read_u64(&b[h.value_offset(i)..])
}

/// Initialise `b` as an empty node (`max_entries` as the kernel computes it).
pub fn init(b: &mut Block, flags: u32, value_size: u32) -> NodeHeader {
    b.fill(0);
    let h = NodeHeader { flags, nr_entries: 0, max_entries: max_entries_for(value_size), value_size };
    write_header(b, &h);
    h
}

/// Write the header fields (flags, nr, max, value_size, padding).
pub fn write_header(b: &mut Block, h: &NodeHeader) {
    LE::write_u32(&mut b[FLAGS..], h.flags);
    LE::write_u32(&mut b[NR_ENTRIES..], h.nr_entries);
    LE::write_u32(&mut b[MAX_ENTRIES..], h.max_entries);
    LE::write_u32(&mut b[VALUE_SIZE..], h.value_size);
    LE::write_u32(&mut b[VALUE_SIZE + 4..], 0);
}

/// Overwrite key `i`.
pub fn set_key(b: &mut Block, i: usize, k: u64) {
    LE::write_u64(&mut b[HEADER_SIZE + 8 * i..], k);
}

/// Overwrite value `i` with `v` (`v.len()` must be the value size).
pub fn set_value(b: &mut Block, h: &NodeHeader, i: usize, v: &[u8]) {
    let off = h.value_offset(i);
    b[off..off + h.value_size as usize].copy_from_slice(v);
}

/// Overwrite value `i` of an 8-byte-valued node.
pub fn set_value_u64(b: &mut Block, h: &NodeHeader, i: usize, v: u64) {
    LE::write_u64(&mut b[h.value_offset(i)..], v);
}

/// Insert (k, v) at index `i`, shifting later entries up. Needs `nr < max`.
pub fn insert_at(b: &mut Block, h: &mut NodeHeader, i: usize, k: u64, v: &[u8]) {
    let nr = h.nr_entries as usize;
    debug_assert!(nr < h.max_entries as usize && i <= nr);
    let ks = HEADER_SIZE + 8 * i;
    b.copy_within(ks..HEADER_SIZE + 8 * nr, ks + 8);
    let vs = h.value_size as usize;
    let vo = h.value_offset(i);
    b.copy_within(vo..h.value_offset(nr), vo + vs);
    h.nr_entries += 1;
    LE::write_u32(&mut b[NR_ENTRIES..], h.nr_entries);
    set_key(b, i, k);
    set_value(b, h, i, v);
}

/// Remove entry `i`, shifting later entries down.
pub fn remove_at(b: &mut Block, h: &mut NodeHeader, i: usize) {
    let nr = h.nr_entries as usize;
    debug_assert!(i < nr);
    let ks = HEADER_SIZE + 8 * i;
    b.copy_within(ks + 8..HEADER_SIZE + 8 * nr, ks);
    let vs = h.value_size as usize;
    let vo = h.value_offset(i);
    b.copy_within(vo + vs..h.value_offset(nr), vo);
    h.nr_entries -= 1;
    LE::write_u32(&mut b[NR_ENTRIES..], h.nr_entries);
}

/// Set nr_entries.
pub fn set_nr_entries(b: &mut Block, h: &mut NodeHeader, nr: u32) {
    h.nr_entries = nr;
    LE::write_u32(&mut b[NR_ENTRIES..], nr);
}

/// Largest index whose key is <= `k`, or None when `k` is below every key.
pub fn lower_bound(b: &Block, h: &NodeHeader, k: u64) -> Option<usize> {
    let (mut lo, mut hi) = (0usize, h.nr_entries as usize);
    // Invariant: keys[..lo] <= k, keys[hi..] > k.
    while lo < hi {
        let mid = (lo + hi) / 2;
        if key(b, mid) <= k {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo.checked_sub(1)
}

/// Copy entries `[from, from+n)` of `src` to the end of `dst`. Both nodes must have
/// the same value size, and `dst` must have room.
pub fn append_from(dst: &mut Block, dh: &mut NodeHeader, src: &Block, sh: &NodeHeader, from: usize, n: usize) {
    let at = dh.nr_entries as usize;
    debug_assert!(at + n <= dh.max_entries as usize && dh.value_size == sh.value_size);
    dst[HEADER_SIZE + 8 * at..HEADER_SIZE + 8 * (at + n)]
        .copy_from_slice(&src[HEADER_SIZE + 8 * from..HEADER_SIZE + 8 * (from + n)]);
    let vs = sh.value_size as usize;
    let (so, doff) = (sh.value_offset(from), dh.value_offset(at));
    dst[doff..doff + vs * n].copy_from_slice(&src[so..so + vs * n]);
    set_nr_entries(dst, dh, (at + n) as u32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::zeroed_block;

    #[test]
    fn max_entries_match_the_kernel_table() {
        assert_eq!(max_entries_for(4), 336);
        assert_eq!(max_entries_for(8), 252);
        assert_eq!(max_entries_for(16), 168);
        assert_eq!(max_entries_for(24), 126);
    }

    #[test]
    fn the_kernel_example_header_decodes() {
        let mut b = zeroed_block();
        let bytes = [
            0xba, 0x70, 0x54, 0xe4, 2, 0, 0, 0, 0x26, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0xfc, 0, 0, 0, 8, 0, 0, 0, 0, 0,
            0, 0,
        ];
        b[..32].copy_from_slice(&bytes);
        let h = header(&b);
        assert_eq!(h, NodeHeader { flags: LEAF, nr_entries: 3, max_entries: 252, value_size: 8 });
        assert_eq!(checksum::stored_blocknr(&b), 38);
    }

    #[test]
    fn insert_remove_and_search_keep_keys_and_values_together() {
        let mut b = zeroed_block();
        let mut h = init(&mut b, LEAF, 8);
        for k in [5u64, 1, 9, 3] {
            let i = lower_bound(&b, &h, k).map_or(0, |i| i + 1);
            insert_at(&mut b, &mut h, i, k, &(k * 100).to_le_bytes());
        }
        let keys: Vec<u64> = (0..4).map(|i| key(&b, i)).collect();
        assert_eq!(keys, vec![1, 3, 5, 9]);
        assert_eq!(value_u64(&b, &h, 2), 500);
        remove_at(&mut b, &mut h, 1);
        assert_eq!((key(&b, 1), value_u64(&b, &h, 1)), (5, 500));
        assert_eq!(lower_bound(&b, &h, 0), None);
        assert_eq!(lower_bound(&b, &h, 6), Some(1));
        checksum::seal(&mut b, BlockKind::Node, 7);
        assert_eq!(validate(&b, 7, 8).map(|h| h.nr_entries), Ok(3));
        assert_eq!(validate(&b, 7, 24), Err(NodeError::ValueSize { found: 8, expected: 24 }));
    }

    #[test]
    fn keys_out_of_order_are_reported_with_their_index() {
        let mut b = zeroed_block();
        let mut h = init(&mut b, LEAF, 8);
        insert_at(&mut b, &mut h, 0, 1, &[0; 8]);
        insert_at(&mut b, &mut h, 1, 2, &[0; 8]);
        set_key(&mut b, 1, 1);
        assert_eq!(validate_structure(&b, 8), Err(NodeError::KeyOrder { index: 1 }));
    }
}
