//! The errors of the command line, and how they are worded.

use thinpool::error::PoolError;
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

/// The kind of an error, in the words of the control protocol's
/// [`thinpool::server::protocol::ErrorKind`] (`no_such_device`, `attached`,
/// `no_space`, `corrupt`, `busy`, ...; `failed` for the rest), so that a script reads
/// the same kind whether the pool is served or not.
fn kind(e: &CliError) -> thinpool::server::protocol::ErrorKind {
    use thinpool::server::control::{dir_error_kind, pool_error_kind};
    use thinpool::server::protocol::ErrorKind;
    match e {
        CliError::Pool(p) => pool_error_kind(p),
        CliError::Dir(PoolDirError::Busy { .. }) => ErrorKind::Busy,
        CliError::Dir(d) => dir_error_kind(d),
        CliError::Remote(r) => r.kind,
        _ => ErrorKind::Failed,
    }
}

/// A failed command's error as JSON, for commands run with `--json`:
/// `{"error": {"kind": KIND, "message": MESSAGE}}`, the message being the line
/// [`describe`] words.
pub fn to_json(e: &CliError) -> serde_json::Value {
    serde_json::json!({ "error": { "kind": kind(e), "message": describe(e) } })
}

/// The one-line message for an error, with what to do where that is known (the
/// same for an error of a served pool, which arrives typed by kind).
pub fn describe(e: &CliError) -> String {
    use thinpool::server::protocol::ErrorKind;
    let base = e.to_string();
    match kind(e) {
        ErrorKind::NoSpace => format!("{base}: the pool is full; delete or discard devices, or grow the data file"),
        ErrorKind::Corrupt => format!("{base}; the metadata is damaged: `thinctl check` gives a full report"),
        _ => base,
    }
}
