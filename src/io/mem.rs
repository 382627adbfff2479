//! Storage in memory: [`MemStorage`], a writable image (tests, benchmarks, tools
//! working on copies), and [`read_only_copy`], a read-only copy of bytes
//! (fuzzing, checks of images already in memory).

use std::io;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{check_range, Storage};

/// A writable image in memory. Writes are durable at once; [`Storage::sync`] does
/// nothing. Punched ranges are filled with zeros.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// `len` zero bytes.
    pub fn new(len: u64) -> MemStorage {
        MemStorage::from_bytes(vec![0; len as usize])
    }

    /// An image holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage { bytes: RwLock::new(bytes) }
    }

    /// A copy of the whole image.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.read().clone()
    }

    // A panic while the lock was held cannot leave a write half done in a way the
    // caller did not see fail, so a poisoned lock is used as is.
    fn read(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.bytes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.bytes.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for MemStorage {
    fn len(&self) -> u64 {
        self.read().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.read();
        check_range(offset, buf.len(), bytes.len() as u64)?;
        buf.copy_from_slice(&bytes[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.write();
        check_range(offset, buf.len(), bytes.len() as u64)?;
        bytes[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn grow(&self, new_len: u64) -> io::Result<()> {
        let mut bytes = self.write();
        if new_len > bytes.len() as u64 {
            bytes.resize(new_len as usize, 0);
        }
        Ok(())
    }
    fn shrink(&self, new_len: u64) -> io::Result<()> {
        let mut bytes = self.write();
        if new_len < bytes.len() as u64 {
            bytes.truncate(new_len as usize);
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.write();
        let end = offset.saturating_add(len).min(bytes.len() as u64);
        if offset < end {
            bytes[offset as usize..end as usize].fill(0);
        }
        Ok(())
    }
}

/// A read-only in-memory copy of `bytes` (fuzzing, checks of images held in memory):
/// writes fail with a [`super::ReadOnlyError`]. As a [`super::MetaStorage`] a
/// trailing partial block is ignored.
pub fn read_only_copy(bytes: &[u8]) -> super::ReadOnlyStorage<MemStorage> {
    super::ReadOnlyStorage::new(MemStorage::from_bytes(bytes.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::is_read_only_error;

    #[test]
    fn memory_reads_back_writes_and_a_slice_refuses_them() {
        let m = MemStorage::new(100);
        m.write_at(b"abc", 10).expect("write");
        m.punch_hole(11, 1).expect("punch");
        let mut buf = [0u8; 3];
        m.read_at(&mut buf, 10).expect("read");
        assert_eq!(&buf, b"a\0c");
        let bytes = m.to_bytes();
        let s = read_only_copy(&bytes);
        s.read_at(&mut buf, 10).expect("read");
        assert_eq!(&buf, b"a\0c");
        assert!(is_read_only_error(&s.write_at(b"x", 0).expect_err("read-only")));
        assert!(s.is_read_only());
    }
}
