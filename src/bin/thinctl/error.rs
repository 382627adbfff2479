//! The errors of the command line, and how they are worded.

use thinpool::error::{MetaError, PoolError};
use thinpool::volume::PoolDirError;

/// Errors of the command line: the library's, plus messages made here.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The pool directory layer.
    #[error(transparent)]
    Dir(#[from] PoolDirError),
    /// The engine.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Dump and restore (their engine and pool directory errors go to `Pool` and `Dir`).
    #[error(transparent)]
    Xml(thinpool::xml::XmlError),
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Msg(String),
    /// The command ran and its answer is "no" (check found problems); already reported.
    #[error("{0}")]
    Failed(String),
    /// The server of a served pool refused or failed the request.
    #[error(transparent)]
    Remote(#[from] thinpool::server::protocol::ControlError),
}

impl From<thinpool::xml::XmlError> for CliError {
    fn from(e: thinpool::xml::XmlError) -> Self {
        use thinpool::xml::XmlError;
        match e {
            XmlError::Pool(p) => CliError::Pool(p),
            XmlError::Dir(d) => CliError::Dir(d),
            other => CliError::Xml(other),
        }
    }
}

/// Result of a command.
pub type CliResult<T = ()> = Result<T, CliError>;

/// Shorthand for a worded error.
pub fn msg(s: impl Into<String>) -> CliError {
    CliError::Msg(s.into())
}

/// The one-line message for an error, with what to do where that is known (the
/// same for an error of a served pool, which arrives typed by kind).
pub fn describe(e: &CliError) -> String {
    use thinpool::server::protocol::ErrorKind;
    let base = e.to_string();
    let kind = match e {
        CliError::Pool(p) | CliError::Dir(PoolDirError::Pool(p)) => match p {
            PoolError::NoSpace { .. } => Some(ErrorKind::NoSpace),
            PoolError::Meta(MetaError::Corrupt { .. }) => Some(ErrorKind::Corrupt),
            _ => None,
        },
        CliError::Remote(r) => Some(r.kind),
        _ => None,
    };
    match kind {
        Some(ErrorKind::NoSpace) => {
            format!("{base}: the pool is full; delete or discard devices, or grow the data file")
        }
        Some(ErrorKind::Corrupt) => format!("{base}; the metadata is damaged: `thinctl check` gives a full report"),
        _ => base,
    }
}
