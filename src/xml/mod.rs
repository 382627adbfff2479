//! The metadata as thin_dump's XML (spec §7): dump and restore, through an
//! intermediate representation ([`ir`]).
//!
//! - [`dump`](mod@dump): walk a pool's metadata into IR events and write them as Debian's
//!   `thin_dump` 0.9 prints them, byte for byte.
//! - [`restore`]: read such XML (from thin_dump 0.9, 1.x without `def`/`ref` blocks,
//!   or our dump) into IR events and build fresh metadata from them.
//! - [`dir`]: restore into a pool directory: the metadata is built in a temporary
//!   file, committed, and only then renamed over the pool's metadata, so a bad
//!   document changes nothing.

pub mod dir;
pub mod dump;
pub mod ir;
pub mod restore;

pub use dir::{restore_dir, DirTarget, RestoreEvents, RestoreOptions, RestoreSummary};
pub use dump::{dump, walk, XmlWriter};
pub use ir::MetadataVisitor;
pub use restore::{read_xml, MetadataBuilder, RestoreSink, Restored};

use crate::error::PoolError;
use crate::volume::PoolDirError;

/// Errors of dump and restore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum XmlError {
    /// The document is not well-formed XML.
    #[error("XML error at byte {pos}: {source}")]
    Syntax {
        /// Where the reader was.
        pos: u64,
        /// What the XML reader found.
        source: quick_xml::Error,
    },
    /// A problem with the element that starts at byte `pos`.
    #[error("XML at byte {pos}: {source}")]
    At {
        /// Where the element starts.
        pos: u64,
        /// The problem.
        source: Box<XmlError>,
    },
    /// An attribute that cannot be read.
    #[error("bad attribute: {0}")]
    BadAttribute(String),
    /// An attribute value that cannot be unescaped.
    #[error("bad value of {name}: {reason}")]
    BadValue {
        /// The attribute.
        name: String,
        /// Why.
        reason: String,
    },
    /// A required attribute is missing.
    #[error("<{elem}> lacks the {name} attribute")]
    MissingAttribute {
        /// The element.
        elem: &'static str,
        /// The attribute.
        name: &'static str,
    },
    /// A numeric attribute is not a number, or out of its type's range.
    #[error("<{elem} {name}=\"{value}\">: not a number in range")]
    NotANumber {
        /// The element.
        elem: &'static str,
        /// The attribute.
        name: &'static str,
        /// Its value.
        value: String,
    },
    /// A device id over 24 bits.
    #[error("<device dev_id=\"{0}\">: ids go up to {max}", max = crate::format::MAX_DEV_ID)]
    DevIdRange(u64),
    /// More than one `<superblock>`.
    #[error("a second <superblock>")]
    SecondSuperblock,
    /// thin_dump 1.x's shared mapping blocks.
    #[error("<{0}> (shared mapping blocks of thin_dump 1.x) is not supported: dump with thin_dump 0.9 or thinctl")]
    SharedBlocks(String),
    /// An element where it does not belong.
    #[error("unexpected <{name}>{}", parent.as_ref().map_or_else(|| " at the top level".to_string(), |p| format!(" inside <{p}>")))]
    UnexpectedElement {
        /// The element.
        name: String,
        /// The element it is in, if any.
        parent: Option<String>,
    },
    /// A closing tag that closes nothing open.
    #[error("unexpected </{0}>")]
    UnexpectedEnd(String),
    /// Text or CDATA (the format has none).
    #[error("unexpected text")]
    UnexpectedText,
    /// The document ends with this element open.
    #[error("the XML ends inside <{0}>")]
    EndsInside(String),
    /// The document has no `<superblock>`.
    #[error("the XML has no <superblock>")]
    NoSuperblock,
    /// A value the pool cannot take, or a target that cannot take the document;
    /// already worded.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and to which file.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The engine.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The pool directory layer.
    #[error(transparent)]
    Dir(#[from] PoolDirError),
}

impl XmlError {
    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> XmlError {
        let context = context.into();
        move |source| XmlError::Io { context, source }
    }
}
