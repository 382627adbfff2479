//! The intermediate representation between pool metadata and its XML form, after
//! thin-provisioning-tools' `ir.rs`: a dump walks the metadata and calls a
//! [`MetadataVisitor`]; a restore reads XML and calls one. Each side knows only the
//! events, so the XML writer, the XML reader and the metadata builder are
//! independent of each other.
//!
//! Events come in document order: [`MetadataVisitor::superblock_b`], then for each
//! device [`MetadataVisitor::device_b`], its mapping runs in ascending virtual block
//! order ([`MetadataVisitor::map`]) and [`MetadataVisitor::device_e`], then
//! [`MetadataVisitor::superblock_e`].

use super::XmlError;

/// The pool-wide fields of a `<superblock>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Superblock {
    /// The uuid as the document gives it (bytes; at most 16 are kept on restore).
    pub uuid: Vec<u8>,
    /// The pool time (24 bits in the metadata).
    pub time: u32,
    /// The pool's transaction id.
    pub transaction: u64,
    /// Superblock flags (bit 0: needs check).
    pub flags: u32,
    /// Metadata format version.
    pub version: u32,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    /// Number of data blocks of the pool.
    pub nr_data_blocks: u64,
    /// The block of the held metadata snapshot, when the document names one.
    pub metadata_snap: Option<u64>,
}

/// The fields of a `<device>`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Device {
    /// The thin device id (24 bits).
    pub dev_id: u32,
    /// How many blocks the device maps, when the document says.
    pub mapped_blocks: Option<u64>,
    /// The device's transaction id.
    pub transaction: u64,
    /// The pool time at which the device was created.
    pub creation_time: u32,
    /// The pool time at which the device was last snapshotted.
    pub snap_time: u32,
}

/// A run of mappings: `len` consecutive virtual blocks from `thin_begin` map to
/// consecutive data blocks from `data_begin`, all with the same `time`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Map {
    /// First virtual block.
    pub thin_begin: u64,
    /// First data block.
    pub data_begin: u64,
    /// The time of every mapping in the run.
    pub time: u32,
    /// Number of blocks (a `single_mapping` is a run of one).
    pub len: u64,
}

impl Map {
    /// A run of one mapping.
    pub fn single(thin_begin: u64, data_begin: u64, time: u32) -> Map {
        Map { thin_begin, data_begin, time, len: 1 }
    }

    /// This run extended by the mapping `vblock -> data_block` at `time`, when that
    /// mapping continues it.
    pub fn extended(&self, vblock: u64, data_block: u64, time: u32) -> Option<Map> {
        let continues = self.thin_begin.checked_add(self.len) == Some(vblock)
            && self.data_begin.checked_add(self.len) == Some(data_block)
            && self.time == time;
        continues.then_some(Map { len: self.len + 1, ..*self })
    }
}

/// What receives the events of a dump or a restore. An error stops the walk or the
/// parse and is returned from it.
pub trait MetadataVisitor {
    /// The `<superblock>` opens.
    fn superblock_b(&mut self, sb: &Superblock) -> Result<(), XmlError>;
    /// The `</superblock>` closes.
    fn superblock_e(&mut self) -> Result<(), XmlError>;
    /// A `<device>` opens.
    fn device_b(&mut self, d: &Device) -> Result<(), XmlError>;
    /// The current `</device>` closes.
    fn device_e(&mut self) -> Result<(), XmlError>;
    /// A run of mappings of the current device.
    fn map(&mut self, m: &Map) -> Result<(), XmlError>;
}
