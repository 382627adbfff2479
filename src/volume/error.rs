//! The errors of the pool directory layer.

use std::io;
use std::path::{Path, PathBuf};

use crate::error::PoolError;

/// Errors of the pool directory layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolDirError {
    /// The directory holds no pool.
    #[error("no pool at {}: {why}; create one with `thinctl pool create {}`", .dir.display(), .dir.display())]
    NotAPool {
        /// The directory.
        dir: PathBuf,
        /// What is missing.
        why: String,
    },
    /// The directory already holds a pool or other files.
    #[error("{}: {why}", .dir.display())]
    Exists {
        /// The directory.
        dir: PathBuf,
        /// What it holds.
        why: String,
    },
    /// Another process holds the pool's lock.
    #[error("pool {} is busy: another thinctl or a server holds it", .dir.display())]
    Busy {
        /// The pool directory.
        dir: PathBuf,
    },
    /// A file operation failed.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        /// What was being done ("cannot open", ...).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The user may not read (or write) a pool file or the pool directory.
    #[error("{what} {}: permission denied", .path.display())]
    PermissionDenied {
        /// What was being done ("cannot open", ...).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
    },
    /// A pool file (metadata, data, `pool.toml`) is a FIFO, a device, a socket or a
    /// directory: it is never opened, since reading it could block forever.
    #[error("{} is {kind}, not a regular file; a pool's metadata, data and pool.toml must be regular files", .path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is ("a FIFO", "a block device", ...).
        kind: &'static str,
    },
    /// `pool.toml` is malformed or inconsistent.
    #[error("{}: {msg}", .path.display())]
    Config {
        /// The `pool.toml` file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// No device with that name.
    #[error("no such device \"{name}\"; {}", known_list(.known))]
    NoSuchDevice {
        /// The name asked for.
        name: String,
        /// The names the pool has, by id.
        known: Vec<String>,
    },
    /// The name is taken.
    #[error("a device named \"{0}\" already exists; choose another name or delete it first")]
    NameTaken(String),
    /// The device id is taken.
    #[error("device id {id} is already used by \"{name}\"; omit --id to use the lowest free id")]
    IdTaken {
        /// The id asked for.
        id: u32,
        /// The device that has it.
        name: String,
    },
    /// The name is not acceptable.
    #[error("invalid device name \"{name}\": {why}")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The pool is read-only (option or access mode).
    #[error("pool {} is read-only: {why}", .dir.display())]
    ReadOnly {
        /// The pool directory.
        dir: PathBuf,
        /// Why it is read-only.
        why: &'static str,
    },
    /// An argument is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The engine refused.
    #[error(transparent)]
    Pool(#[from] PoolError),
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "the pool has no devices".to_string()
    } else {
        format!("devices: {}", known.join(", "))
    }
}

/// The error of a file operation on `path`: [`PoolDirError::PermissionDenied`] when
/// the user may not, [`PoolDirError::Io`] otherwise.
pub(super) fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PoolDirError + 'a {
    move |source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            PoolDirError::PermissionDenied { what, path: path.to_path_buf() }
        } else {
            PoolDirError::Io { what, path: path.to_path_buf(), source }
        }
    }
}
