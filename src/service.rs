//! A pool shared by many threads (the NBD server's connections, the control socket
//! and the periodic committer).
//!
//! One mutex serialises every operation on the pool, which is also the block-level
//! lock the kernel's bio prison provides: two writes to one block never interleave,
//! and a snapshot taken through [`Service::with_pool`] sees every write that
//! completed before it. Devices attached by clients are counted so that deleting an
//! attached device can be refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::PoolError;
use crate::metadata::DevId;
use crate::pool::Pool;

struct Inner {
    pool: Pool,
    attached: HashMap<DevId, usize>,
}

/// A pool shared between threads.
pub struct Service {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

impl Service {
    /// Share `pool`.
    pub fn new(pool: Pool) -> Arc<Service> {
        Arc::new(Service { inner: Mutex::new(Inner { pool, attached: HashMap::new() }) })
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

    /// Read from a device.
    pub fn read(&self, dev: DevId, offset: u64, buf: &mut [u8]) -> Result<(), PoolError> {
        self.lock().pool.read(dev, offset, buf)
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
    pub fn extents(&self, dev: DevId, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, PoolError> {
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
