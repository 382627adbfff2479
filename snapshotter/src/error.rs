//! The snapshotter's errors, and the gRPC status each one becomes (containerd turns
//! the codes back into its `errdefs`: NotFound, AlreadyExists, FailedPrecondition,
//! InvalidArgument).

use containerd_snapshots::tonic::{Code, Status};
use thinpool::error::PoolError;
use thinpool::volume::PoolDirError;

/// What went wrong with a snapshot request.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// No snapshot has this key or name.
    #[error("snapshot \"{0}\" does not exist")]
    NotFound(String),
    /// A snapshot with this key or name exists already.
    #[error("snapshot \"{0}\" already exists")]
    AlreadyExists(String),
    /// The snapshot is not in a state that allows the request.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is malformed (bad key, label, filter or field path).
    #[error("{0}")]
    InvalidArgument(String),
    /// The pool directory refused or failed.
    #[error("{0}")]
    Dir(#[from] PoolDirError),
    /// The engine refused or failed.
    #[error("{0}")]
    Pool(#[from] PoolError),
    /// Formatting the base file system failed.
    #[error("cannot format the base file system: {0}")]
    Mkfs(String),
    /// Attaching or detaching a kernel block device failed.
    #[error("{0}")]
    Attach(String),
}

impl SnapError {
    /// The gRPC code containerd gets for this error.
    pub fn code(&self) -> Code {
        let no_space = |e: &PoolError| e.is_no_space();
        match self {
            SnapError::NotFound(_) => Code::NotFound,
            SnapError::AlreadyExists(_) => Code::AlreadyExists,
            SnapError::FailedPrecondition(_) => Code::FailedPrecondition,
            SnapError::InvalidArgument(_) => Code::InvalidArgument,
            SnapError::Pool(e) | SnapError::Dir(PoolDirError::Pool(e)) if no_space(e) => Code::ResourceExhausted,
            SnapError::Dir(PoolDirError::ReadOnly { .. }) | SnapError::Pool(PoolError::ReadOnly) => {
                Code::FailedPrecondition
            }
            _ => Code::Internal,
        }
    }
}

impl From<SnapError> for Status {
    fn from(e: SnapError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}
