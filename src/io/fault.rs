//! Storage for failure tests. [`Faults`] says which operation fails (the Nth, or
//! a given sync) and how much of a failing write still lands (a torn write).
//! [`CrashStorage`] is an image in memory that also keeps what is durable apart
//! from what was only written, so a test can build the image a crash at any moment
//! would leave ([`CrashImage`]); [`FaultStorage`] injects the same failures into any
//! other storage (a real file, say). The pool's data file and metadata file can
//! each sit on either.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::format::{Block, BLOCK_SIZE};

use super::{check_range, Storage};

/// Failures to inject, and the counts they are keyed on. Once one failure was
/// injected every later operation fails too, as on a device that went away.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Number of operations (reads, writes, syncs, hole punches) tried so far.
    pub ops: u64,
    /// Number of successful syncs so far.
    pub syncs: u64,
    /// When set, operation number `fail_at_op` (counting from 0, see `ops`) fails:
    /// `Some(ops)` fails the next operation.
    pub fail_at_op: Option<u64>,
    /// When set, the sync that would be number `fail_at_sync` (counting from 0, see
    /// `syncs`) fails.
    pub fail_at_sync: Option<u64>,
    /// When the operation that fails is a write, this many of its first bytes still
    /// reach the device: a torn write.
    pub tear: usize,
    /// Set once a failure was injected.
    pub failed: bool,
}

impl Faults {
    /// Clear the failure and what was set to cause one (the counts stay).
    pub fn clear(&mut self) {
        self.failed = false;
        self.fail_at_op = None;
        self.fail_at_sync = None;
        self.tear = 0;
    }

    /// Count one operation; fail it when a failure is due or was injected before.
    fn begin(&mut self, is_sync: bool) -> io::Result<()> {
        if self.failed {
            return Err(injected());
        }
        let op = self.ops;
        self.ops += 1;
        if self.fail_at_op == Some(op) || (is_sync && self.fail_at_sync == Some(self.syncs)) {
            self.failed = true;
            return Err(injected());
        }
        Ok(())
    }

    /// Count a write of `len` bytes: `Err((e, n))` when it fails, with its first
    /// `n` bytes landing anyway.
    fn begin_write(&mut self, len: usize) -> Result<(), (io::Error, usize)> {
        let was_failed = self.failed;
        self.begin(false).map_err(|e| (e, if was_failed { 0 } else { self.tear.min(len) }))
    }
}

/// The state behind a [`CrashStorage`]: what is durable, what is only written, and
/// the failures to inject. The image is held in 4 KiB pages, so its length is a
/// whole number of them.
#[derive(Debug, Clone, Default)]
pub struct CrashImage {
    /// Content as of the last sync, in 4 KiB pages.
    pub durable: Vec<Box<Block>>,
    /// Writes since the last sync, in order: (byte offset, bytes). A punched range
    /// is a write of zeros.
    pub pending: Vec<(u64, Vec<u8>)>,
    /// The failures to inject.
    pub faults: Faults,
}

fn injected() -> io::Error {
    io::Error::other("injected I/O failure")
}

/// Copy `data` into `pages` at byte `offset` (inside the image).
fn apply(pages: &mut [Box<Block>], offset: u64, data: &[u8]) {
    let mut done = 0;
    while done < data.len() {
        let pos = offset as usize + done;
        let (page, within) = (pos / BLOCK_SIZE, pos % BLOCK_SIZE);
        let n = (BLOCK_SIZE - within).min(data.len() - done);
        pages[page][within..within + n].copy_from_slice(&data[done..done + n]);
        done += n;
    }
}

impl CrashImage {
    /// Length of the device in bytes.
    pub fn len(&self) -> u64 {
        (self.durable.len() * BLOCK_SIZE) as u64
    }

    /// Is the device zero bytes long?
    pub fn is_empty(&self) -> bool {
        self.durable.is_empty()
    }

    /// The device as a crash right now would leave it when only the first `keep`
    /// pending writes reached the disk, in 4 KiB blocks.
    pub fn crashed(&self, keep: usize) -> Vec<Box<Block>> {
        let mut img = self.durable.clone();
        for (off, data) in self.pending.iter().take(keep) {
            apply(&mut img, *off, data);
        }
        img
    }

    /// [`CrashImage::crashed`] as one run of bytes.
    pub fn crashed_bytes(&self, keep: usize) -> Vec<u8> {
        self.crashed(keep).iter().flat_map(|b| b.iter().copied()).collect()
    }

    /// Crash and power on again: every pending write is lost and the injected
    /// failures are cleared, so the device works again with its durable content.
    pub fn crash(&mut self) {
        self.pending.clear();
        self.faults.clear();
    }

    fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset as usize + done;
            let (page, within) = (pos / BLOCK_SIZE, pos % BLOCK_SIZE);
            let n = (BLOCK_SIZE - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&self.durable[page][within..within + n]);
            done += n;
        }
        let end = offset + buf.len() as u64;
        for (off, data) in &self.pending {
            let (from, to) = ((*off).max(offset), (off + data.len() as u64).min(end));
            if from < to {
                let src = &data[(from - off) as usize..(to - off) as usize];
                buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
            }
        }
    }
}

/// In-memory storage over a shared [`CrashImage`]: reads see every write, a sync
/// makes the pending writes durable, and the test keeps a handle on the image (or a
/// clone of the storage) to inject failures and build crash images.
#[derive(Debug, Clone)]
pub struct CrashStorage {
    /// Shared with the test.
    pub image: Arc<Mutex<CrashImage>>,
}

impl CrashStorage {
    /// A zeroed device of `nr_blocks` 4 KiB blocks.
    pub fn new(nr_blocks: u64) -> CrashStorage {
        CrashStorage::from_blocks((0..nr_blocks).map(|_| Box::new([0u8; BLOCK_SIZE])).collect())
    }

    /// A device whose durable content is `blocks`.
    pub fn from_blocks(blocks: Vec<Box<Block>>) -> CrashStorage {
        CrashStorage { image: Arc::new(Mutex::new(CrashImage { durable: blocks, ..Default::default() })) }
    }

    /// A zeroed device of `len` bytes, rounded up to whole 4 KiB blocks.
    pub fn with_len(len: u64) -> CrashStorage {
        CrashStorage::new(len.div_ceil(BLOCK_SIZE as u64))
    }

    /// The image, locked (a test poking at it while the storage is in use).
    pub fn lock(&self) -> MutexGuard<'_, CrashImage> {
        // The image is only changed in whole steps, so a poisoned lock is still usable.
        self.image.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for CrashStorage {
    fn len(&self) -> u64 {
        self.lock().len()
    }
    fn grow(&self, new_len: u64) -> io::Result<()> {
        let mut img = self.lock();
        img.faults.begin(false)?;
        let blocks = new_len.div_ceil(BLOCK_SIZE as u64) as usize;
        while img.durable.len() < blocks {
            img.durable.push(Box::new([0u8; BLOCK_SIZE]));
        }
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut img = self.lock();
        img.faults.begin(false)?;
        check_range(offset, buf.len(), img.len())?;
        img.read(buf, offset);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut img = self.lock();
        if let Err((e, torn)) = img.faults.begin_write(buf.len()) {
            if torn > 0 && check_range(offset, torn, img.len()).is_ok() {
                img.pending.push((offset, buf[..torn].to_vec()));
            }
            return Err(e);
        }
        check_range(offset, buf.len(), img.len())?;
        img.pending.push((offset, buf.to_vec()));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut img = self.lock();
        img.faults.begin(true)?;
        let pending = std::mem::take(&mut img.pending);
        for (off, data) in pending {
            apply(&mut img.durable, off, &data);
        }
        img.faults.syncs += 1;
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut img = self.lock();
        img.faults.begin(false)?;
        let end = offset.saturating_add(len).min(img.len());
        if offset < end {
            img.pending.push((offset, vec![0; (end - offset) as usize]));
        }
        Ok(())
    }
}

/// Any storage with failures injected: operations pass through to it until the
/// [`Faults`] (shared, see [`FaultStorage::faults`]) say one fails; a torn write
/// writes its first bytes through. Unlike [`CrashStorage`] it does not hold
/// writes back until a sync, so it cannot lose them.
#[derive(Debug, Clone)]
pub struct FaultStorage<S> {
    inner: S,
    faults: Arc<Mutex<Faults>>,
}

impl<S: Storage> FaultStorage<S> {
    /// Wrap `inner`, with no failure set.
    pub fn new(inner: S) -> FaultStorage<S> {
        FaultStorage { inner, faults: Arc::default() }
    }

    /// The failures, shared with every clone of this storage.
    pub fn faults(&self) -> Arc<Mutex<Faults>> {
        Arc::clone(&self.faults)
    }

    /// The storage underneath.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, Faults> {
        // The counts are only changed in whole steps, so a poisoned lock is still usable.
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S: Storage> Storage for FaultStorage<S> {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn grow(&self, new_len: u64) -> io::Result<()> {
        self.lock().begin(false)?;
        self.inner.grow(new_len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.lock().begin(false)?;
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = self.lock().begin_write(buf.len());
        match r {
            Ok(()) => self.inner.write_at(buf, offset),
            Err((e, torn)) => {
                if torn > 0 {
                    let _ = self.inner.write_at(&buf[..torn], offset);
                }
                Err(e)
            }
        }
    }
    fn sync(&self) -> io::Result<()> {
        let mut f = self.lock();
        f.begin(true)?;
        self.inner.sync()?;
        f.syncs += 1;
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.lock().begin(false)?;
        self.inner.punch_hole(offset, len)
    }
    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemStorage;

    #[test]
    fn only_synced_writes_survive_a_crash() {
        let s = CrashStorage::new(2);
        s.write_at(b"durable", 4090).expect("write");
        s.sync().expect("sync");
        s.write_at(b"lost", 0).expect("write");
        let mut buf = [0u8; 7];
        s.read_at(&mut buf[..4], 0).expect("read");
        assert_eq!(&buf[..4], b"lost", "reads see pending writes");
        assert_eq!(&s.lock().crashed_bytes(1)[..4], b"lost");
        s.lock().crash();
        s.read_at(&mut buf[..4], 0).expect("read");
        assert_eq!(&buf[..4], &[0; 4]);
        s.read_at(&mut buf, 4090).expect("read across pages");
        assert_eq!(&buf, b"durable");
    }

    #[test]
    fn the_nth_operation_fails_tears_its_write_and_nothing_after_is_accepted() {
        let s = CrashStorage::with_len(100);
        assert_eq!(s.len(), BLOCK_SIZE as u64);
        s.write_at(b"ok", 0).expect("write");
        {
            let mut img = s.lock();
            img.faults.fail_at_op = Some(img.faults.ops);
            img.faults.tear = 3;
        }
        s.write_at(b"torn write", 10).expect_err("fails");
        assert!(s.sync().is_err() && s.read_at(&mut [0u8; 1], 0).is_err(), "failed for good");
        let img = s.lock();
        assert_eq!(&img.crashed_bytes(2)[..13], b"ok\0\0\0\0\0\0\0\0tor");
        assert!(img.faults.failed);
    }

    #[test]
    fn a_sync_can_be_made_to_fail() {
        let s = CrashStorage::new(1);
        s.lock().faults.fail_at_sync = Some(1);
        s.sync().expect("first sync");
        s.write_at(b"x", 0).expect("write");
        assert!(s.sync().is_err());
        assert_eq!(s.lock().faults.syncs, 1);
        assert_eq!(s.lock().pending.len(), 1);
    }

    #[test]
    fn the_wrapper_injects_the_same_failures_into_any_storage() {
        let s = FaultStorage::new(MemStorage::new(16));
        let faults = s.faults();
        s.write_at(b"ok", 0).expect("write");
        s.sync().expect("sync");
        {
            let mut f = faults.lock().expect("lock");
            f.fail_at_op = Some(f.ops + 1);
            f.tear = 2;
        }
        s.read_at(&mut [0u8; 2], 0).expect("the next operation still works");
        s.write_at(b"torn", 4).expect_err("then one fails");
        assert!(s.read_at(&mut [0u8; 2], 0).is_err(), "and every one after it");
        assert_eq!(s.inner().to_bytes()[..8], *b"ok\0\0to\0\0");
        faults.lock().expect("lock").clear();
        s.sync().expect("works again once cleared");
        assert_eq!(faults.lock().expect("lock").syncs, 2);
    }
}
