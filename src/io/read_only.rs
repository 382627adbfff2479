//! The one place read-only is enforced below the pool: [`ReadOnlyStorage`] wraps any
//! [`Storage`] and refuses every change with a [`ReadOnlyError`] (an
//! [`io::ErrorKind::PermissionDenied`] error carrying it, so callers can tell it
//! from a real I/O failure with [`is_read_only_error`]).

use std::io;

use super::Storage;

/// A change was asked of read-only storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the storage is open read-only")]
pub struct ReadOnlyError;

/// The error every refused change returns.
pub(crate) fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, ReadOnlyError)
}

/// Was `e` returned because the storage is read-only?
pub fn is_read_only_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<ReadOnlyError>())
}

/// Any storage, read-only: reads pass through, writes and hole punches fail with
/// [`ReadOnlyError`], and a sync succeeds (nothing was written through it).
#[derive(Debug, Clone, Default)]
pub struct ReadOnlyStorage<S> {
    inner: S,
}

impl<S: Storage> ReadOnlyStorage<S> {
    /// Wrap `inner`.
    pub fn new(inner: S) -> ReadOnlyStorage<S> {
        ReadOnlyStorage { inner }
    }

    /// The storage underneath.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Storage> Storage for ReadOnlyStorage<S> {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn grow(&self, _new_len: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;

    #[test]
    fn the_wrapper_reads_through_and_refuses_changes_with_a_typed_error() {
        let m = MemStorage::from_bytes(b"hello".to_vec());
        let ro = ReadOnlyStorage::new(m);
        let mut buf = [0u8; 5];
        ro.read_at(&mut buf, 0).expect("read");
        assert_eq!(&buf, b"hello");
        let e = ro.write_at(b"j", 0).expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(is_read_only_error(&e));
        assert!(is_read_only_error(&ro.punch_hole(0, 1).expect_err("refused")));
        assert!(!is_read_only_error(&io::Error::new(io::ErrorKind::PermissionDenied, "other")));
        ro.sync().expect("sync");
        assert_eq!(ro.into_inner().to_bytes(), b"hello");
    }
}
