//! Block storage under the metadata: a real file, an in-memory image, and a
//! crash-simulating image for tests. Everything above talks to [`MetaStorage`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use crate::format::{Block, BLOCK_SIZE};

/// Whole 4 KiB blocks of the metadata device.
pub trait MetaStorage: Send {
    /// Number of whole blocks the device holds.
    fn nr_blocks(&self) -> u64;
    /// Read block `b` into `buf`.
    fn read_block(&self, b: u64, buf: &mut Block) -> io::Result<()>;
    /// Write `buf` to block `b` (not durable until [`MetaStorage::sync`]).
    fn write_block(&mut self, b: u64, buf: &Block) -> io::Result<()>;
    /// Make every earlier write durable.
    fn sync(&mut self) -> io::Result<()>;
}

/// A metadata file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    nr_blocks: u64,
}

impl FileStorage {
    /// Use an open file; its length decides the number of blocks.
    pub fn new(file: File) -> io::Result<FileStorage> {
        let len = file.metadata()?.len();
        Ok(FileStorage { file, nr_blocks: len / BLOCK_SIZE as u64 })
    }
}

fn out_of_range(b: u64, n: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("metadata block {b} is past the end of the device ({n} blocks)"),
    )
}

impl MetaStorage for FileStorage {
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }
    fn read_block(&self, b: u64, buf: &mut Block) -> io::Result<()> {
        if b >= self.nr_blocks {
            return Err(out_of_range(b, self.nr_blocks));
        }
        self.file.read_exact_at(buf, b * BLOCK_SIZE as u64)
    }
    fn write_block(&mut self, b: u64, buf: &Block) -> io::Result<()> {
        if b >= self.nr_blocks {
            return Err(out_of_range(b, self.nr_blocks));
        }
        self.file.write_all_at(buf, b * BLOCK_SIZE as u64)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// The state behind a [`CrashStorage`]: what is durable and what is only written.
#[derive(Debug, Clone, Default)]
pub struct CrashImage {
    /// Content as of the last sync.
    pub durable: Vec<Box<Block>>,
    /// Writes since the last sync, in order.
    pub pending: Vec<(u64, Box<Block>)>,
    /// Number of syncs so far.
    pub syncs: u64,
    /// When set, the storage fails every operation once `syncs` reaches this value
    /// (the sync itself fails and nothing after it is accepted).
    pub fail_at_sync: Option<u64>,
    /// Set once a failure was injected.
    pub failed: bool,
}

impl CrashImage {
    /// The device as a crash right now would leave it when only the first `keep`
    /// pending writes reached the disk.
    pub fn crashed(&self, keep: usize) -> Vec<Box<Block>> {
        let mut img = self.durable.clone();
        for (b, data) in self.pending.iter().take(keep) {
            img[*b as usize] = data.clone();
        }
        img
    }
}

/// In-memory storage that keeps durable and pending writes apart, so tests can
/// reconstruct what a crash at any moment would leave, and can inject an I/O failure.
#[derive(Debug, Clone)]
pub struct CrashStorage {
    /// Shared with the test.
    pub image: Arc<Mutex<CrashImage>>,
}

impl CrashStorage {
    /// A zeroed device of `nr_blocks` blocks.
    pub fn new(nr_blocks: u64) -> CrashStorage {
        let durable = (0..nr_blocks).map(|_| Box::new([0u8; BLOCK_SIZE])).collect();
        CrashStorage { image: Arc::new(Mutex::new(CrashImage { durable, ..Default::default() })) }
    }

    /// A device whose durable content is `blocks`.
    pub fn from_blocks(blocks: Vec<Box<Block>>) -> CrashStorage {
        CrashStorage { image: Arc::new(Mutex::new(CrashImage { durable: blocks, ..Default::default() })) }
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, CrashImage>> {
        self.image.lock().map_err(|_| io::Error::other("crash storage lock poisoned"))
    }
}

impl MetaStorage for CrashStorage {
    fn nr_blocks(&self) -> u64 {
        self.image.lock().map(|i| i.durable.len() as u64).unwrap_or(0)
    }
    fn read_block(&self, b: u64, buf: &mut Block) -> io::Result<()> {
        let img = self.lock()?;
        if img.failed {
            return Err(io::Error::other("injected I/O failure"));
        }
        let n = img.durable.len() as u64;
        if b >= n {
            return Err(out_of_range(b, n));
        }
        let found = img.pending.iter().rev().find(|(pb, _)| *pb == b).map(|(_, d)| d);
        buf.copy_from_slice(&found.unwrap_or(&img.durable[b as usize])[..]);
        Ok(())
    }
    fn write_block(&mut self, b: u64, buf: &Block) -> io::Result<()> {
        let mut img = self.lock()?;
        if img.failed {
            return Err(io::Error::other("injected I/O failure"));
        }
        let n = img.durable.len() as u64;
        if b >= n {
            return Err(out_of_range(b, n));
        }
        img.pending.push((b, Box::new(*buf)));
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        let mut img = self.lock()?;
        if img.failed || img.fail_at_sync == Some(img.syncs) {
            img.failed = true;
            return Err(io::Error::other("injected I/O failure"));
        }
        let pending = std::mem::take(&mut img.pending);
        for (b, data) in pending {
            img.durable[b as usize] = data;
        }
        img.syncs += 1;
        Ok(())
    }
}

/// Read-only view of a metadata image held in memory (fuzzing, checks of copies).
#[derive(Debug, Clone)]
pub struct SliceStorage<'a> {
    bytes: &'a [u8],
}

impl<'a> SliceStorage<'a> {
    /// Wrap bytes; a trailing partial block is ignored.
    pub fn new(bytes: &'a [u8]) -> Self {
        SliceStorage { bytes }
    }
}

impl MetaStorage for SliceStorage<'_> {
    fn nr_blocks(&self) -> u64 {
        (self.bytes.len() / BLOCK_SIZE) as u64
    }
    fn read_block(&self, b: u64, buf: &mut Block) -> io::Result<()> {
        let n = self.nr_blocks();
        if b >= n {
            return Err(out_of_range(b, n));
        }
        let off = b as usize * BLOCK_SIZE;
        buf.copy_from_slice(&self.bytes[off..off + BLOCK_SIZE]);
        Ok(())
    }
    fn write_block(&mut self, _b: u64, _buf: &Block) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only metadata image"))
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}
