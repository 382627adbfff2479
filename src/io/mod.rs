//! Storage under the pool: one byte-addressed [`Storage`] trait for both the data
//! file and the metadata file, and the metadata's 4 KiB-block view of it,
//! [`MetaStorage`], which every [`Storage`] gets for free.
//!
//! Backends, one per file:
//! - [`file`](mod@file): a real file ([`FileStorage`]);
//! - [`mem`]: an image in memory ([`MemStorage`]) and a borrowed read-only view of
//!   bytes ([`read_only_copy`]);
//! - [`fault`]: failure injection ([`Faults`]: fail at the Nth operation or at a
//!   given sync, tear the failing write): [`CrashStorage`] is an in-memory image that
//!   also keeps durable and pending writes apart, so a crash loses what was not
//!   synced ([`CrashImage`]); [`FaultStorage`] wraps any other storage;
//! - [`read_only`]: a wrapper over any storage that refuses every change
//!   ([`ReadOnlyStorage`]); a pool opened read-only wraps both of its files in it.

use std::io;
use std::sync::Arc;

use crate::format::{Block, BLOCK_SIZE};

pub mod fault;
pub mod file;
pub mod mem;
pub mod read_only;

pub use fault::{CrashImage, CrashStorage, FaultStorage, Faults};
pub use file::FileStorage;
pub use mem::{read_only_copy, MemStorage};
pub use read_only::{is_read_only_error, ReadOnlyError, ReadOnlyStorage};

/// A fixed-length run of bytes that can be read, written and made durable: the data
/// file and the metadata file both sit on one.
///
/// Every access must lie inside `[0, len())`; one that does not fails with
/// [`io::ErrorKind::UnexpectedEof`] and changes nothing. Writes are not durable
/// until [`Storage::sync`] returns. All methods take `&self`, so one storage can be
/// shared (`Arc<dyn Storage>`) between the pool and readers outside its lock.
pub trait Storage: Send + Sync {
    /// Length in bytes.
    fn len(&self) -> u64;
    /// Is the storage zero bytes long?
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset` (not durable until [`Storage::sync`]).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every earlier write durable.
    fn sync(&self) -> io::Result<()>;
    /// Deallocate `[offset, offset + len)` so that it reads as zeros. A backend that
    /// cannot fails with [`io::ErrorKind::Unsupported`] (the default); the caller
    /// then writes zeros instead.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::Error::new(io::ErrorKind::Unsupported, "this storage cannot punch holes"))
    }
    /// Is `[offset, offset + len)` known to be a hole (it reads as zeros and holds
    /// no space)? `false` when unknown, the default. Asking costs far less than
    /// punching: a new data block that is a hole already needs no zeroing.
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(false)
    }
    /// Does the storage refuse every change (see [`ReadOnlyStorage`])?
    fn is_read_only(&self) -> bool {
        false
    }
    /// Grow the storage to `new_len` bytes (the new bytes read as zeros; a file
    /// grows sparse). A backend that cannot fails with
    /// [`io::ErrorKind::Unsupported`] (the default).
    fn grow(&self, new_len: u64) -> io::Result<()> {
        let _ = new_len;
        Err(io::Error::new(io::ErrorKind::Unsupported, "this storage cannot grow"))
    }
    /// Shrink the storage to `new_len` bytes (what lies past it is dropped). A
    /// backend that cannot fails with [`io::ErrorKind::Unsupported`] (the default).
    fn shrink(&self, new_len: u64) -> io::Result<()> {
        let _ = new_len;
        Err(io::Error::new(io::ErrorKind::Unsupported, "this storage cannot shrink"))
    }
    /// Make sure every byte of the storage has space on the host, so that later
    /// writes cannot fail for lack of it (a file: `fallocate`). The default does
    /// nothing (memory has its space).
    fn allocate(&self) -> io::Result<()> {
        Ok(())
    }
    /// Copy `len` bytes from `from` to `to` inside the storage (the ranges do not
    /// overlap). The default reads and writes through a bounded buffer; a file
    /// uses `copy_file_range`, which shares extents where the file system can
    /// (XFS, btrfs) instead of copying bytes.
    fn copy_range(&self, from: u64, to: u64, len: u64) -> io::Result<()> {
        copy_through_memory(self, from, to, len)
    }
}

/// Largest buffer [`copy_through_memory`] uses.
const COPY_CHUNK: u64 = 1 << 20;

/// Copy `len` bytes from `from` to `to` by reading and writing through a bounded
/// buffer ([`Storage::copy_range`]'s default).
pub(crate) fn copy_through_memory<S: Storage + ?Sized>(s: &S, from: u64, to: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(COPY_CHUNK) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        s.read_at(&mut buf[..n], from + done)?;
        s.write_at(&buf[..n], to + done)?;
        done += n as u64;
    }
    Ok(())
}

macro_rules! forward_storage {
    ($($ptr:ident)::+) => {
        impl<S: Storage + ?Sized> Storage for $($ptr)::+<S> {
            fn len(&self) -> u64 {
                (**self).len()
            }
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }
            fn sync(&self) -> io::Result<()> {
                (**self).sync()
            }
            fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
                (**self).punch_hole(offset, len)
            }
            fn is_read_only(&self) -> bool {
                (**self).is_read_only()
            }
            fn copy_range(&self, from: u64, to: u64, len: u64) -> io::Result<()> {
                (**self).copy_range(from, to, len)
            }
            fn grow(&self, new_len: u64) -> io::Result<()> {
                (**self).grow(new_len)
            }
            fn shrink(&self, new_len: u64) -> io::Result<()> {
                (**self).shrink(new_len)
            }
            fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
                (**self).is_hole(offset, len)
            }
            fn allocate(&self) -> io::Result<()> {
                (**self).allocate()
            }
        }
    };
}

forward_storage!(Box);
forward_storage!(Arc);

/// Whole 4 KiB blocks of the metadata device: the view the transaction manager and
/// the checker use. Every [`Storage`] is one (block `b` is bytes
/// `[b x 4096, (b + 1) x 4096)`; a trailing partial block is not part of the device).
pub trait MetaStorage: Send + Sync {
    /// Number of whole blocks the device holds.
    fn nr_blocks(&self) -> u64;
    /// Read block `b` into `buf`.
    fn read_block(&self, b: u64, buf: &mut Block) -> io::Result<()>;
    /// Write `buf` to block `b` (not durable until [`MetaStorage::sync`]).
    fn write_block(&self, b: u64, buf: &Block) -> io::Result<()>;
    /// Make every earlier write durable.
    fn sync(&self) -> io::Result<()>;
}

fn block_out_of_range(b: u64, n: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("metadata block {b} is past the end of the device ({n} blocks)"),
    )
}

impl<S: Storage + ?Sized> MetaStorage for S {
    fn nr_blocks(&self) -> u64 {
        self.len() / BLOCK_SIZE as u64
    }
    fn read_block(&self, b: u64, buf: &mut Block) -> io::Result<()> {
        let n = self.nr_blocks();
        if b >= n {
            return Err(block_out_of_range(b, n));
        }
        self.read_at(&mut buf[..], b * BLOCK_SIZE as u64)
    }
    fn write_block(&self, b: u64, buf: &Block) -> io::Result<()> {
        let n = self.nr_blocks();
        if b >= n {
            return Err(block_out_of_range(b, n));
        }
        self.write_at(&buf[..], b * BLOCK_SIZE as u64)
    }
    fn sync(&self) -> io::Result<()> {
        Storage::sync(self)
    }
}

/// `Ok` when `[offset, offset + n)` lies inside a storage of `len` bytes, else the
/// error every backend returns for an access past the end.
pub(crate) fn check_range(offset: u64, n: usize, len: u64) -> io::Result<()> {
    match offset.checked_add(n as u64) {
        Some(end) if end <= len => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{n} bytes at offset {offset} are past the end of the storage ({len} bytes)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_storage_is_a_block_device_that_checks_its_bounds() {
        let m = MemStorage::new(3 * BLOCK_SIZE as u64 + 100);
        assert_eq!(m.nr_blocks(), 3);
        let blk = [7u8; BLOCK_SIZE];
        m.write_block(2, &blk).expect("write");
        let mut out = [0u8; BLOCK_SIZE];
        m.read_block(2, &mut out).expect("read");
        assert_eq!(out, blk);
        assert_eq!(m.read_block(3, &mut out).expect_err("past end").kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(m.write_at(&[1, 2], m.len() - 1).expect_err("past end").kind(), io::ErrorKind::UnexpectedEof);
        MetaStorage::sync(&m).expect("sync");
    }
}
