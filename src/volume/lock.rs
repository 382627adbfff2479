//! Locking a pool directory: an `flock` on `pool.lock`, shared for readers and
//! exclusive for writers, never waited for.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use super::{create_private, io_err, PoolDirError, LOCK_FILE};

/// How a pool directory is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Look only: shared lock, files opened read-only, nothing written.
    Read,
    /// Change: exclusive lock, files opened read-write.
    Write,
}

/// A lock held on a pool directory (released when dropped).
#[derive(Debug)]
pub struct DirLock {
    _flock: Option<Flock<File>>,
}

/// Lock `dir` (which must exist) the way [`PoolDir::open`](super::PoolDir::open) does, for work that
/// prepares a pool before it has a `pool.toml` (such as a restore).
pub fn lock_dir(dir: &Path, access: Access) -> Result<DirLock, PoolDirError> {
    Ok(DirLock { _flock: take_lock(dir, access)? })
}

/// Open `path` read-write, creating it with mode 0600 (whatever the umask) when it
/// does not exist. An existing lock file keeps its mode: it may belong to another
/// user who shares the pool.
fn open_or_create(path: &Path) -> io::Result<File> {
    match create_private(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new().read(true).write(true).open(path),
        other => other,
    }
}

fn take_lock(dir: &Path, access: Access) -> Result<Option<Flock<File>>, PoolDirError> {
    let path = dir.join(LOCK_FILE);
    let file = match open_or_create(&path) {
        Ok(f) => f,
        // A reader of a pool on a read-only file system or in a directory it may not
        // write to cannot take the lock, and nobody else can change the pool either.
        Err(_) if access == Access::Read => match File::open(&path) {
            Ok(f) => f,
            Err(_) => return Ok(None),
        },
        Err(e) => return Err(io_err("cannot open", &path)(e)),
    };
    let arg = match access {
        Access::Read => FlockArg::LockSharedNonblock,
        Access::Write => FlockArg::LockExclusiveNonblock,
    };
    match Flock::lock(file, arg) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(PoolDirError::Busy { dir: dir.to_path_buf() }),
        Err((_, e)) => Err(io_err("cannot lock", &path)(e.into())),
    }
}
