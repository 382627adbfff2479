//! A pool shared by many threads (the NBD server's connections, the control socket
//! and the periodic committer).
//!
//! One mutex serialises every operation on the pool, which is also the block-level
//! lock the kernel's bio prison provides: two writes to one block never interleave,
//! and a snapshot taken through [`Service::with_pool`] sees every write that
//! completed before it. Devices attached by clients are counted so that deleting an
//! attached device can be refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::PoolError;
use crate::io::Storage;
use crate::pool::{AllocRun, Pool};
use crate::thin::DevId;

struct Inner {
    pool: Pool,
    attached: HashMap<DevId, usize>,
}

/// A pool shared between threads.
pub struct Service {
    inner: Mutex<Inner>,
    /// A second handle on the data storage, for reads outside the lock.
    data: Arc<dyn Storage>,
    /// The data reuse epoch of the pool (see [`Service::read`]).
    reuse_epoch: Arc<AtomicU64>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

impl Service {
    /// Share `pool`.
    pub fn new(pool: Pool) -> Arc<Service> {
        let data = pool.data_storage();
        let reuse_epoch = pool.data_reuse_epoch();
        Arc::new(Service { inner: Mutex::new(Inner { pool, attached: HashMap::new() }), data, reuse_epoch })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the pool half-changed on disk
        // (commits are atomic), so keep serving from the same state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` with exclusive access to the pool (management operations).
    pub fn with_pool<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> R {
        f(&mut self.lock().pool)
    }

    /// Read from a device. The mapping is looked up under the lock and the data read
    /// outside it, so reads overlap each other and writes; a data block can only be
    /// handed to another device after the reuse epoch moves, so when it moved during
    /// the read the read is done again under the lock.
    pub fn read(&self, dev: DevId, offset: u64, buf: &mut [u8]) -> Result<(), PoolError> {
        let data = &self.data;
        let (plan, before) = {
            let mut g = self.lock();
            let plan = g.pool.read_plan(dev, offset, buf.len() as u64)?;
            (plan, self.reuse_epoch.load(Ordering::SeqCst))
        };
        let mut done = 0usize;
        for piece in plan {
            let out = &mut buf[done..done + piece.len as usize];
            match piece.at {
                None => out.fill(0),
                Some(pos) => data.read_at(out, pos).map_err(PoolError::DataIo)?,
            }
            done += piece.len as usize;
        }
        if self.reuse_epoch.load(Ordering::SeqCst) != before {
            return self.lock().pool.read(dev, offset, buf);
        }
        Ok(())
    }

    /// Write to a device.
    pub fn write(&self, dev: DevId, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        self.lock().pool.write(dev, offset, data)
    }

    /// Commit: every write completed so far becomes durable.
    pub fn flush(&self) -> Result<(), PoolError> {
        self.lock().pool.commit()
    }

    /// Discard whole blocks.
    pub fn discard(&self, dev: DevId, offset: u64, len: u64) -> Result<u64, PoolError> {
        self.lock().pool.discard(dev, offset, len)
    }

    /// Zero a range (see [`Pool::write_zeroes`]).
    pub fn write_zeroes(&self, dev: DevId, offset: u64, len: u64, unmap: bool) -> Result<(), PoolError> {
        self.lock().pool.write_zeroes(dev, offset, len, unmap)
    }

    /// Allocation extents (see [`Pool::extents`]).
    pub fn extents(&self, dev: DevId, offset: u64, len: u64) -> Result<Vec<AllocRun>, PoolError> {
        self.lock().pool.extents(dev, offset, len)
    }

    /// A client attached the device.
    pub fn attach(&self, dev: DevId) {
        *self.lock().attached.entry(dev).or_default() += 1;
    }

    /// A client detached the device.
    pub fn detach(&self, dev: DevId) {
        let mut g = self.lock();
        if let Some(n) = g.attached.get_mut(&dev) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                g.attached.remove(&dev);
            }
        }
    }

    /// Number of clients attached to the device.
    pub fn attached(&self, dev: DevId) -> usize {
        self.lock().attached.get(&dev).copied().unwrap_or(0)
    }

    /// Delete a device unless a client has it attached.
    pub fn delete(&self, dev: DevId) -> Result<(), PoolError> {
        let mut g = self.lock();
        if g.attached.get(&dev).copied().unwrap_or(0) > 0 {
            return Err(PoolError::invalid(format!(
                "thin device {dev} is attached by a client; disconnect it before deleting"
            )));
        }
        g.pool.delete(dev as u64)?;
        g.pool.commit()
    }

    /// Commit every `period` while anything changed, until `stop` is set; a final
    /// commit happens on the way out. Errors are reported on stderr.
    pub fn spawn_committer(self: &Arc<Self>, period: Duration, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            let tick = Duration::from_millis(50).min(period);
            let mut waited = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                waited += tick;
                if waited < period {
                    continue;
                }
                waited = Duration::ZERO;
                let mut g = me.lock();
                if g.pool.meta().is_dirty() {
                    if let Err(e) = g.pool.commit() {
                        eprintln!("thinpool: periodic commit failed: {e}");
                    }
                }
            }
            if let Err(e) = me.flush() {
                eprintln!("thinpool: final commit failed: {e}");
            }
        })
    }
}

#[cfg(test)]
fn tiny_pool(dir: &std::path::Path, data_bytes: u64) -> Pool {
    let open = |name: &str, len: u64| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join(name))
            .expect("file");
        f.set_len(len).expect("len");
        f
    };
    let mut p = Pool::create(open("m", 1 << 20), open("d", data_bytes), 128).expect("pool");
    p.create_thin(0).expect("thin");
    p.create_thin(1).expect("thin");
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_racing_a_discard_never_sees_another_devices_data() {
        let dir = tempfile::tempdir().expect("tmp");
        // One data block: the block device 0 gives up is the one device 1 gets.
        let mut pool = super::tiny_pool(dir.path(), 65536);
        pool.commit().expect("commit");
        let svc = Service::new(pool);
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2) = (Arc::clone(&svc), Arc::clone(&stop));
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut reads = 0u64;
            while !st2.load(Ordering::Relaxed) {
                s2.read(0, 0, &mut buf).expect("read");
                assert!(
                    buf.iter().all(|&b| b == 0xAA) || buf.iter().all(|&b| b == 0),
                    "device 0 showed device 1's bytes"
                );
                reads += 1;
            }
            reads
        });
        for i in 0..3000 {
            svc.write(0, 0, &[0xAA; 65536]).expect("write 0");
            svc.discard(0, 0, 65536).expect("discard 0");
            // The block device 0 just gave up is reused for device 1.
            svc.write(1, (i % 3) * 65536, &[0xBB; 65536]).expect("write 1");
            svc.discard(1, 0, 3 * 65536).expect("discard 1");
            if i % 100 == 0 {
                svc.flush().expect("commit");
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().expect("reader") > 0);
    }
}

#[cfg(test)]
mod epoch_tests {
    use super::*;

    #[test]
    fn a_data_block_is_never_handed_to_another_device_without_the_reuse_epoch_moving() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut p = super::tiny_pool(dir.path(), 65536);
        let epoch = p.data_reuse_epoch();
        let mut reused = 0;
        for round in 0..40u64 {
            p.write(0, 0, &[1u8; 65536]).expect("write");
            let plan = p.read_plan(0, 0, 65536).expect("plan");
            let before = epoch.load(Ordering::SeqCst);
            p.discard(0, 0, 65536).expect("discard");
            if round % 7 == 0 {
                p.commit().expect("commit");
            }
            p.write(1, (round % 3) * 65536, &[2u8; 65536]).expect("write");
            let other = p.read_plan(1, (round % 3) * 65536, 65536).expect("plan");
            if other[0].at == plan[0].at {
                reused += 1;
                assert_ne!(epoch.load(Ordering::SeqCst), before, "block reused with no epoch change");
            }
            p.discard(1, 0, 3 * 65536).expect("discard");
        }
        assert!(reused > 5, "the scenario must actually reuse blocks ({reused} times)");
    }
}
