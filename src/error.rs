//! Error types of the engine's layers.
//!
//! [`MetaError`] is what the metadata layers (block manager, space maps, B-trees,
//! transactions) return; [`PoolError`] adds what the pool and its data file can
//! fail with. Corruption always names the metadata block and what failed.

use std::io;

use crate::format::checksum::PrefixError;
use crate::format::node::NodeError;
use crate::format::superblock::SuperblockError;

/// What was found wrong in a metadata block.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// Superblock rejected.
    Superblock(SuperblockError),
    /// B-tree node rejected.
    Node(NodeError),
    /// Bitmap block checksum/blocknr.
    Bitmap(PrefixError),
    /// Metadata index block checksum/blocknr.
    Index(PrefixError),
    /// A reference to a block at or past the end of the metadata device.
    PastEnd {
        /// Blocks of the metadata device.
        nr_blocks: u64,
    },
    /// A tree deeper than any valid tree can be (a cycle).
    TooDeep,
    /// Inconsistent tree contents (missing entries, wrong shape).
    Tree(String),
    /// Inconsistent space-map contents.
    SpaceMap(String),
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Corruption::Superblock(e) => write!(f, "{e}"),
            Corruption::Node(e) => write!(f, "{e}"),
            Corruption::Bitmap(PrefixError::Checksum { stored, computed }) => {
                write!(f, "space-map bitmap checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")
            }
            Corruption::Bitmap(PrefixError::BlockNr { stored }) => {
                write!(f, "space-map bitmap blocknr is {stored}, not its own location")
            }
            Corruption::Index(PrefixError::Checksum { stored, computed }) => write!(
                f,
                "metadata space-map index checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Corruption::Index(PrefixError::BlockNr { stored }) => {
                write!(f, "metadata space-map index blocknr is {stored}, not its own location")
            }
            Corruption::PastEnd { nr_blocks } => {
                write!(f, "referenced, but past the end of the metadata device ({nr_blocks} blocks)")
            }
            Corruption::TooDeep => write!(f, "tree deeper than possible (cycle in the metadata)"),
            Corruption::Tree(s) => write!(f, "{s}"),
            Corruption::SpaceMap(s) => write!(f, "{s}"),
        }
    }
}

/// Errors of the metadata layers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// A metadata block is corrupt. `path` lists the tree nodes from the root down to
    /// the parent of `block` when the block was reached through a B-tree walk.
    #[error("metadata block {block}: {what}{}", TreePath(path))]
    Corrupt {
        /// The block that failed.
        block: u64,
        /// What is wrong with it.
        what: Corruption,
        /// Tree nodes from the root to the block's parent (empty when not in a tree).
        path: Vec<u64>,
    },
    /// I/O on the metadata file failed.
    #[error("metadata I/O error: {0}")]
    Io(#[from] io::Error),
    /// No free metadata block.
    #[error("out of metadata space ({nr_blocks} metadata blocks, all in use); grow the metadata file")]
    NoMetadataSpace {
        /// Metadata blocks in all.
        nr_blocks: u64,
    },
    /// A reference count would go below zero or past a limit (corrupt counts).
    #[error("{sm} space map: block {block}: {what}")]
    RefCount {
        /// Which space map.
        sm: &'static str,
        /// The block.
        block: u64,
        /// What went wrong.
        what: &'static str,
    },
    /// An earlier write or sync failed; nothing more is accepted until reopen.
    #[error("an earlier metadata write failed; reopen the pool (the last commit is intact)")]
    Poisoned,
    /// The metadata is read-only.
    #[error("the pool metadata is open read-only")]
    ReadOnly,
}

impl MetaError {
    /// Shorthand for a corruption error.
    pub fn corrupt(block: u64, what: Corruption) -> MetaError {
        MetaError::Corrupt { block, what, path: Vec::new() }
    }

    /// The same error, noting the tree path it was found under (the root first), if
    /// it is a corruption that carries no path yet.
    pub fn under(self, path: &[u64]) -> MetaError {
        match self {
            MetaError::Corrupt { block, what, path: p } if p.is_empty() => {
                MetaError::Corrupt { block, what, path: path.to_vec() }
            }
            other => other,
        }
    }
}

/// Displays a tree path as " (reached from root N through ...)", or nothing.
struct TreePath<'a>(&'a [u64]);

impl std::fmt::Display for TreePath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some((root, rest)) = self.0.split_first() else { return Ok(()) };
        write!(f, " (reached from tree root {root}")?;
        if !rest.is_empty() {
            write!(f, " through")?;
            for b in rest {
                write!(f, " {b}")?;
            }
        }
        write!(f, ")")
    }
}

/// Errors of the pool: everything a thin-device operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// Metadata failure (corruption, I/O, metadata full).
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// I/O on the data file failed.
    #[error("data file I/O error: {0}")]
    DataIo(io::Error),
    /// Every data block is in use.
    #[error("no free data block: the pool's {nr_blocks} data blocks are all in use")]
    NoSpace {
        /// Data blocks in all.
        nr_blocks: u64,
    },
    /// Unknown thin device.
    #[error("no thin device with id {0}")]
    NoSuchDevice(u32),
    /// Device id taken.
    #[error("thin device {0} already exists")]
    DeviceExists(u32),
    /// Device id over 24 bits.
    #[error("thin device id {0} is out of range (0..=16777215)")]
    BadDeviceId(u64),
    /// `set_transaction_id` with the wrong current value.
    #[error("transaction id mismatch: the pool is at {current}, not {given}")]
    TransactionId {
        /// The pool's transaction id.
        current: u64,
        /// The one the caller expected.
        given: u64,
    },
    /// A metadata snapshot is already held / none is held.
    #[error("{0}")]
    MetadataSnapshot(&'static str),
    /// The pool's time would wrap (16.7 M snapshots).
    #[error("pool time would pass 2^24 - 1; no more snapshots can be made")]
    TimeExhausted,
    /// Invalid argument or state.
    #[error("{0}")]
    Invalid(String),
    /// The pool is open read-only.
    #[error("the pool is open read-only")]
    ReadOnly,
}

impl PoolError {
    /// Is this "no space left" of any kind: data blocks, metadata blocks, or the
    /// host file system under the data file (ENOSPC, EDQUOT)? Clients see ENOSPC.
    pub fn is_no_space(&self) -> bool {
        match self {
            PoolError::NoSpace { .. } | PoolError::Meta(MetaError::NoMetadataSpace { .. }) => true,
            PoolError::DataIo(e) => matches!(
                e.raw_os_error().map(nix::errno::Errno::from_raw),
                Some(nix::errno::Errno::ENOSPC | nix::errno::Errno::EDQUOT)
            ),
            _ => false,
        }
    }

    /// Shorthand for [`PoolError::Invalid`].
    pub fn invalid(s: impl Into<String>) -> PoolError {
        PoolError::Invalid(s.into())
    }
}
