//! What an NBD export needs from the storage below it: the [`Export`] and
//! [`Catalog`] traits, the [`ExportError`]s they report, and [`errno`], the one
//! mapping from those errors to wire errnos.

use std::sync::Arc;

use super::wire;

/// One allocation extent for `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// Unallocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// One extent of a metadata context other than `base:allocation` (see
/// [`Catalog::meta_contexts`]): its length and the context's flags for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextExtent {
    /// Length in bytes.
    pub length: u64,
    /// The context's flags.
    pub flags: u32,
}

/// Errors an export reports; [`errno`] maps them to the wire.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The pool has no free data block (`ENOSPC`).
    #[error("no space left in the pool")]
    NoSpace,
    /// A write to a read-only export (`EPERM`).
    #[error("export is read-only")]
    ReadOnly,
    /// The request is not valid for this export (`EINVAL`).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The export cannot do this (`ENOTSUP`).
    #[error("not supported")]
    NotSupported,
    /// The storage below failed (`EIO`).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Any other failure (`EIO`).
    #[error("{0}")]
    Other(String),
}

/// The NBD error code for an export error (the one place this mapping lives).
pub fn errno(e: &ExportError) -> u32 {
    match e {
        ExportError::NoSpace => wire::ENOSPC,
        ExportError::ReadOnly => wire::EPERM,
        ExportError::Invalid(_) => wire::EINVAL,
        ExportError::NotSupported => wire::ENOTSUP,
        ExportError::Io(_) | ExportError::Other(_) => wire::EIO,
    }
}

/// One export.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Preferred I/O size (the pool's data block size).
    fn preferred_block_size(&self) -> u32;
    /// Writes are refused.
    fn read_only(&self) -> bool;
    /// Read `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;
    /// Write `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ExportError>;
    /// Make every completed write on every connection and export durable.
    fn flush(&self) -> Result<(), ExportError>;
    /// Discard: whole pool blocks in the range are unmapped, and a partly discarded
    /// block once every byte of it has been discarded.
    fn trim(&self, offset: u64, len: u64) -> Result<(), ExportError>;
    /// Zero a range; `may_unmap` = !NO_HOLE; `fast` = FAST_ZERO.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fast: bool) -> Result<(), ExportError>;
    /// Extents covering `[offset, offset+len)`, in order (may stop early, at least 1 byte).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError>;
    /// Extents of an extra metadata context, named by the `key` its catalog gave
    /// it ([`Catalog::meta_contexts`]), covering `[offset, offset+len)` in order
    /// (may stop early, at least 1 byte). The default offers none.
    fn context_extents(&self, _key: u64, _offset: u64, _len: u64) -> Result<Vec<ContextExtent>, ExportError> {
        Err(ExportError::NotSupported)
    }
}

/// The exports a server offers.
pub trait Catalog: Send + Sync {
    /// (name, description) of every export; the default export has name "".
    fn list(&self) -> Vec<(String, String)>;
    /// Open an export for a connection.
    fn open(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// A connection to `name` ended.
    fn close(&self, _name: &str) {}
    /// Metadata contexts other than `base:allocation` that export `export` offers,
    /// matching `query`: a full context name, a namespace prefix ending in `:`, or
    /// `""` for all. Each comes with a key that [`Export::context_extents`] takes.
    /// The default offers none.
    fn meta_contexts(&self, _export: &str, _query: &str) -> Vec<(String, u64)> {
        Vec::new()
    }
}
