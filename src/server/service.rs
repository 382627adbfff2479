//! A pool shared by many threads (the NBD server's connections, the control socket
//! and the periodic committer): the serving core's concurrency, modelled on
//! dm-thin.
//!
//! - **The metadata lock** (a mutex around the [`Pool`]) is held only for what
//!   reads or changes metadata: lookups, allocation, inserting mappings, device
//!   management. Data I/O happens outside it: reads (`pread` at the looked-up
//!   places), writes to mapped unshared blocks (one lookup, one `pwrite`), and the
//!   zero-fill or copy of a new block.
//! - **Block cells** (the kernel's bio prison): a write holds the cells of the
//!   virtual blocks it touches from its lookup until its new blocks are mapped, so
//!   two writes to one block are ordered while writes to other blocks run in
//!   parallel.
//! - **The I/O gate**: every data-path operation holds it shared; operations that
//!   must see no write in flight — snapshots, deletes, discards, write-zeroes,
//!   control commands — hold it exclusively, so a snapshot holds every write
//!   completed before it and no half of one in flight.
//! - **Group commit**: concurrent FLUSHes (and FUA writes, and the periodic commit)
//!   share one commit. A commit first stops new metadata changes and waits for the
//!   writes that are provisioning blocks, then syncs the data file *without* the
//!   metadata lock (reads and writes to mapped blocks keep flowing), then commits
//!   the metadata. So a commit never records a mapping whose data is not durable.
//! - **Reuse epoch**: a read looks up under the lock and reads outside it; a data
//!   block can only be handed to other data after the pool's reuse epoch moves, so
//!   when it moved during a read, the read is done again under the lock.
//!
//! Devices attached by clients are counted so that deleting an attached device can
//! be refused, atomically with the delete.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{MetaError, PoolError};
use crate::pool::{AllocRun, DataFile, Pool};
use crate::thin::DevId;

struct Inner {
    pool: Pool,
    attached: HashMap<DevId, usize>,
}

/// Virtual blocks held by writes in flight (the bio prison).
#[derive(Default)]
struct Cells {
    held: Mutex<HashSet<(DevId, u64)>>,
    freed: Condvar,
}

/// The cells of one write, released on drop.
struct CellGuard<'a> {
    cells: &'a Cells,
    keys: Vec<(DevId, u64)>,
}

impl Cells {
    /// Take every cell in `keys` at once (waiting while any is held), so writes
    /// never hold some cells while waiting for others.
    fn lock(&self, keys: Vec<(DevId, u64)>) -> CellGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while keys.iter().any(|k| held.contains(k)) {
            held = self.freed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.extend(keys.iter().copied());
        CellGuard { cells: self, keys }
    }
}

impl Drop for CellGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.cells.held.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            held.remove(k);
        }
        drop(held);
        self.cells.freed.notify_all();
    }
}

/// Data waiting for write-back past which a commit pre-syncs (see [`Service::flush`]).
const PRESYNC_BYTES: u64 = 1 << 20;

/// Blocks a discard unmaps per step (see [`Service::discard`]).
pub const DISCARD_WINDOW: u64 = 4096;

/// Released data blocks punched per slice (see [`Service::punch_pending`]).
const PUNCH_SLICE: usize = 8;

/// How long the caller of a commit (a FLUSH, a control request) spends punching
/// the blocks it released before it answers; the committer thread punches the
/// rest in the background.
const PUNCH_BUDGET: Duration = Duration::from_millis(500);

/// How long a write that found no free block waits for blocks being punched.
const PUNCHING_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct CommitState {
    /// A commit is syncing data before its barrier; changes still flow.
    presyncing: bool,
    /// A commit is between "stop changes" and "metadata committed".
    committing: bool,
    /// Metadata changes in flight (writes provisioning blocks, discards...).
    changes: usize,
    /// Commits started and finished so far.
    started: u64,
    finished: u64,
    /// The last commit that failed, with its error.
    failed: Option<(u64, String)>,
}

/// Group commit and the barrier between commits and metadata changes.
#[derive(Default)]
struct Commits {
    state: Mutex<CommitState>,
    cond: Condvar,
}

/// One metadata change in flight; a commit waits for it to end.
struct ChangeGuard<'a>(&'a Commits);

impl Commits {
    fn lock(&self) -> MutexGuard<'_, CommitState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Begin a metadata change: waits while a commit is syncing.
    fn change(&self) -> ChangeGuard<'_> {
        let mut s = self.lock();
        while s.committing {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.changes += 1;
        ChangeGuard(self)
    }
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.changes -= 1;
        drop(s);
        self.0.cond.notify_all();
    }
}

/// What a write that needs a new data block does when the pool has none: dm-thin's
/// `error_if_no_space` (fail at once) or its default queueing, bounded like its
/// `no_space_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSpacePolicy {
    /// Fail with ENOSPC at once.
    Error,
    /// Wait up to this long for space to appear (a discard, a delete, a grow),
    /// then fail with ENOSPC.
    Queue(Duration),
}

impl Default for NoSpacePolicy {
    fn default() -> Self {
        NoSpacePolicy::Queue(Duration::from_secs(60))
    }
}

/// Wakes writes waiting for data space whenever some may have appeared.
#[derive(Default)]
struct SpaceEvents {
    generation: Mutex<u64>,
    cond: Condvar,
}

impl SpaceEvents {
    fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cond.notify_all();
    }

    /// Wait until the generation moves past `seen` or `until` passes; true if it
    /// moved.
    fn wait(&self, seen: u64, until: std::time::Instant) -> bool {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        while *g == seen {
            let now = std::time::Instant::now();
            if now >= until {
                return false;
            }
            g = self.cond.wait_timeout(g, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}

/// A pool shared between threads.
pub struct Service {
    inner: Mutex<Inner>,
    data: Arc<DataFile>,
    /// The data reuse epoch of the pool (see [`Service::read`]).
    reuse_epoch: Arc<AtomicU64>,
    block_bytes: u64,
    cells: Cells,
    gate: RwLock<()>,
    commits: Commits,
    no_space: Mutex<NoSpacePolicy>,
    space: SpaceEvents,
    /// "Metadata space exhausted" was logged and no write has succeeded since.
    meta_full_logged: AtomicBool,
    /// Unsynced data past which a commit pre-syncs (see [`Service::flush`]).
    presync_bytes: AtomicU64,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

impl Service {
    /// Share `pool`.
    pub fn new(mut pool: Pool) -> Arc<Service> {
        pool.set_commit_when_full(false);
        pool.set_defer_punch(true);
        let data = pool.data_file();
        let reuse_epoch = pool.data_reuse_epoch();
        let block_bytes = pool.block_bytes();
        Arc::new(Service {
            inner: Mutex::new(Inner { pool, attached: HashMap::new() }),
            data,
            reuse_epoch,
            block_bytes,
            cells: Cells::default(),
            gate: RwLock::new(()),
            commits: Commits::default(),
            no_space: Mutex::new(NoSpacePolicy::default()),
            space: SpaceEvents::default(),
            meta_full_logged: AtomicBool::new(false),
            presync_bytes: AtomicU64::new(PRESYNC_BYTES),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the pool half-changed on disk
        // (commits are atomic), so keep serving from the same state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    fn quiesce(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Data block size in bytes.
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    /// Run `f` with exclusive access to the pool (management operations): no write
    /// is in flight, no commit is syncing, and nothing else runs until `f` returns.
    pub fn with_pool<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> R {
        let r = {
            let _quiet = self.quiesce();
            let _change = self.commits.change();
            f(&mut self.lock().pool)
        };
        self.space.notify();
        self.punch_pending(PUNCH_BUDGET);
        r
    }

    /// Run `f` under the metadata lock only, for what reads metadata (a step of a
    /// diff walk): I/O outside the lock goes on, nothing is quiesced.
    pub fn with_pool_locked<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> R {
        f(&mut self.lock().pool)
    }

    /// Read from a device. The mapping is looked up under the lock and the data read
    /// outside it, so reads overlap each other and writes; a data block can only be
    /// handed to another device after the reuse epoch moves, so when it moved during
    /// the read the read is done again under the lock.
    pub fn read(&self, dev: DevId, offset: u64, buf: &mut [u8]) -> Result<(), PoolError> {
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
                Some(pos) => self.data.read_at(out, pos)?,
            }
            done += piece.len as usize;
        }
        if self.reuse_epoch.load(Ordering::SeqCst) != before {
            return self.lock().pool.read(dev, offset, buf);
        }
        Ok(())
    }

    /// Read from a device for a reply that sends holes as holes: like
    /// [`Service::read`], but unmapped pieces are left untouched in `buf` and
    /// reported, as `(length, hole)` runs in order, from the same lookup.
    pub fn read_sparse(&self, dev: DevId, offset: u64, buf: &mut [u8]) -> Result<Vec<(u64, bool)>, PoolError> {
        let (plan, before) = {
            let mut g = self.lock();
            let plan = g.pool.read_plan(dev, offset, buf.len() as u64)?;
            (plan, self.reuse_epoch.load(Ordering::SeqCst))
        };
        let mut done = 0usize;
        for piece in &plan {
            if let Some(pos) = piece.at {
                self.data.read_at(&mut buf[done..done + piece.len as usize], pos)?;
            }
            done += piece.len as usize;
        }
        let runs = |plan: &[crate::pool::Located]| plan.iter().map(|p| (p.len, p.at.is_none())).collect();
        if self.reuse_epoch.load(Ordering::SeqCst) != before {
            let mut g = self.lock();
            let plan = g.pool.read_plan(dev, offset, buf.len() as u64)?;
            g.pool.read(dev, offset, buf)?;
            return Ok(runs(&plan));
        }
        Ok(runs(&plan))
    }

    /// Write to a device: a write to mapped, unshared blocks is one lookup and one
    /// `pwrite`; one that needs new blocks allocates them under the metadata lock,
    /// fills them outside it, and maps them under it again.
    pub fn write(&self, dev: DevId, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        let mut deadline = None;
        let mut punching_deadline = None;
        let mut committed = false;
        loop {
            let space_seen = self.space.generation();
            match self.try_write(dev, offset, data) {
                Err(PoolError::NoSpace { .. }) if !committed && self.lock().pool.commit_would_free_data() => {
                    // Blocks freed in this transaction become usable after a commit.
                    committed = true;
                    self.flush()?;
                }
                Err(e @ PoolError::NoSpace { .. }) if self.lock().pool.data_blocks_reserved() > 0 => {
                    // Free blocks are being punched: they are back in moments,
                    // whatever the no-space policy.
                    let until = *punching_deadline.get_or_insert_with(|| Instant::now() + PUNCHING_WAIT);
                    if !self.space.wait(space_seen, until) {
                        return Err(e);
                    }
                }
                Err(e @ PoolError::NoSpace { .. }) => {
                    let NoSpacePolicy::Queue(wait) = self.no_space_policy() else { return Err(e) };
                    let until = *deadline.get_or_insert_with(|| std::time::Instant::now() + wait);
                    if !self.space.wait(space_seen, until) {
                        return Err(e);
                    }
                    committed = false;
                }
                Err(e @ PoolError::Meta(MetaError::NoMetadataSpace { .. })) => {
                    self.metadata_exhausted();
                    return Err(e);
                }
                other => {
                    if other.is_ok() {
                        self.meta_full_logged.store(false, Ordering::Relaxed);
                    }
                    return other;
                }
            }
        }
    }

    /// Say once (until a later write succeeds) that metadata ran out, and how to grow it.
    fn metadata_exhausted(&self) {
        if self.meta_full_logged.swap(true, Ordering::Relaxed) {
            return;
        }
        let st = self.status();
        eprintln!(
            "thinpool: metadata space exhausted: {} of {} blocks used; grow it with `thinctl pool extend DIR --metadata-size +SIZE` (writes that need new metadata get ENOSPC until then)",
            st.metadata_used_blocks, st.metadata_total_blocks
        );
    }

    /// One attempt at a write (see [`Service::write`]), holding the I/O gate and
    /// the cells of its blocks only while it runs.
    fn try_write(&self, dev: DevId, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        let _io = self.io_gate();
        let keys: Vec<(DevId, u64)> =
            crate::units::pieces(offset, data.len() as u64, self.block_bytes).map(|p| (dev, p.block)).collect();
        let _cells = self.cells.lock(keys);
        if let Some(plan) = self.lock().pool.plan_in_place(dev, offset, data.len() as u64)? {
            return plan.write_data(&self.data, data);
        }
        // Blocks allocated here must not reach a commit unmapped: this write is a
        // metadata change that a commit waits for.
        let _change = self.commits.change();
        let plan = self.lock().pool.plan_write(dev, offset, data.len() as u64)?;
        let r = plan.write_data(&self.data, data);
        self.lock().pool.finish_write(plan, r)
    }

    /// Pre-sync (see [`Service::flush`]) when at least `bytes` of data wait for
    /// write-back (default 1 MiB; 0: always, as the crash tests do).
    pub fn set_presync_bytes(&self, bytes: u64) {
        self.presync_bytes.store(bytes, Ordering::Relaxed);
    }

    /// What a write that finds the pool out of data space does.
    pub fn no_space_policy(&self) -> NoSpacePolicy {
        *self.no_space.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set what a write that finds the pool out of data space does.
    pub fn set_no_space_policy(&self, policy: NoSpacePolicy) {
        *self.no_space.lock().unwrap_or_else(|e| e.into_inner()) = policy;
        self.space.notify();
    }

    /// Commit: every write completed so far becomes durable. Concurrent callers
    /// share one commit (group commit).
    ///
    /// A commit stops metadata changes (writes that provision blocks) only for its
    /// last part: when much data is waiting to be written back, the data file is
    /// synced first with changes still flowing ("pre-sync"), and synced again
    /// behind the barrier, which then has little left to write. (perf: with 4 KiB
    /// allocating writes at QD32, the one sync behind the barrier held every
    /// allocating write for the whole write-back, each second.)
    pub fn flush(&self) -> Result<(), PoolError> {
        let mut s = self.commits.lock();
        // The first commit that seals (raises its barrier) after this call holds
        // every write completed before it: one still pre-syncing has not sealed.
        let need = if s.presyncing { s.started } else { s.started + 1 };
        loop {
            if s.finished >= need {
                return match &s.failed {
                    Some((seq, e)) if *seq >= need => Err(PoolError::invalid(format!("commit failed: {e}"))),
                    _ => Ok(()),
                };
            }
            if !s.committing && !s.presyncing && s.started == s.finished {
                break;
            }
            s = self.commits.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.started += 1;
        let seq = s.started;
        if self.data.unsynced_bytes() >= self.presync_bytes.load(Ordering::Relaxed) {
            s.presyncing = true;
            drop(s);
            // Errors here show again in the sync behind the barrier.
            let _ = self.data.sync();
            s = self.commits.lock();
            s.presyncing = false;
        }
        s.committing = true;
        while s.changes > 0 {
            s = self.commits.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        drop(s);
        let r = self.commit_now();
        self.space.notify();
        let mut s = self.commits.lock();
        s.committing = false;
        s.finished = seq;
        if let Err(e) = &r {
            if s.failed.is_none() {
                eprintln!("thinpool: commit failed: {e}; the pool now refuses changes until it is reopened (the last commit is intact)");
            }
            s.failed = Some((seq, e.to_string()));
        }
        drop(s);
        self.commits.cond.notify_all();
        self.punch_pending(PUNCH_BUDGET);
        r
    }

    /// Punch the data blocks that commits released (see [`Pool::set_defer_punch`])
    /// for at most about `budget`, [`PUNCH_SLICE`] blocks at a time: each slice is
    /// taken under the metadata lock and held back from allocation while it is
    /// punched outside the lock, so reads and writes go on meanwhile (a punch costs
    /// ext4 about 0.1 ms per block of fragmented extents). True while more wait.
    pub fn punch_pending(&self, budget: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            let (blocks, more) = self.lock().pool.take_punches(PUNCH_SLICE);
            if !blocks.is_empty() {
                self.data.punch_released(blocks.clone());
                self.lock().pool.punched(&blocks);
                self.space.notify();
            }
            if !more {
                return false;
            }
            if t0.elapsed() >= budget {
                return true;
            }
        }
    }

    /// The commit itself, with no metadata change in flight: data first, outside
    /// the metadata lock, then the metadata. The new metadata blocks and the
    /// superblock are written under the lock, but the two syncs of the metadata
    /// device run outside it, so lookups (reads, overwrites of mapped blocks) go
    /// on meanwhile; changes stay out until the commit ends (the barrier). (perf:
    /// with a client committing after every write, readers of other devices
    /// waited on those syncs.)
    fn commit_now(&self) -> Result<(), PoolError> {
        self.data.sync()?;
        let (p, meta) = {
            let mut g = self.lock();
            match g.pool.commit_prepare()? {
                None => return Ok(()),
                Some(p) => (p, g.pool.metadata_storage()),
            }
        };
        if let Err(e) = meta.sync() {
            self.lock().pool.commit_abort(p);
            return Err(MetaError::from(e).into());
        }
        {
            let mut g = self.lock();
            if let Err(e) = g.pool.commit_write_superblock(&p) {
                g.pool.commit_abort(p);
                return Err(e);
            }
        }
        if let Err(e) = meta.sync() {
            self.lock().pool.commit_abort(p);
            return Err(MetaError::from(e).into());
        }
        self.lock().pool.commit_finish(p);
        Ok(())
    }

    /// Discard a range: whole blocks are unmapped, partial ones once every byte of
    /// them has been discarded (see [`Pool::discard`]). Not committed. A long range
    /// is done in windows of [`DISCARD_WINDOW`] blocks, each one step with I/O
    /// quiesced, so reads and writes go on in between (unmapping 200,000 blocks in
    /// one step held every client for 5 s); stretches with nothing mapped are
    /// skipped.
    pub fn discard(&self, dev: DevId, offset: u64, len: u64) -> Result<u64, PoolError> {
        let bs = self.block_bytes;
        let end = offset.saturating_add(len);
        let (mut at, mut n) = (offset, 0);
        while at < end {
            let step = {
                let _quiet = self.quiesce();
                let _change = self.commits.change();
                let mut g = self.lock();
                // Jump to the next mapped block; none left in the range: done (a
                // partial block at `at` is mapped or covered by the jump's check).
                let from = at.div_ceil(bs);
                if at % bs == 0 || g.pool.next_mapped(dev, at / bs)?.is_none_or(|(k, _)| k != at / bs) {
                    match g.pool.next_mapped(dev, from)? {
                        Some((k, _)) if k.saturating_mul(bs) < end => at = at.max(k * bs),
                        _ => break,
                    }
                }
                let stop = (at / bs).saturating_add(DISCARD_WINDOW + 1).saturating_mul(bs).min(end);
                let r = g.pool.discard(dev, at, stop - at).map(|k| (k, stop));
                drop(g);
                self.space.notify();
                r?
            };
            n += step.0;
            at = step.1;
            if at < end {
                // Let the reads and writes that queued behind this step in first
                // (the next step's quiesce would otherwise win the gate again).
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(n)
    }

    /// Zero a range (see [`Pool::write_zeroes`]).
    pub fn write_zeroes(&self, dev: DevId, offset: u64, len: u64, unmap: bool) -> Result<(), PoolError> {
        let _quiet = self.quiesce();
        let _change = self.commits.change();
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

    /// Delete a device unless a client has it attached: the check and the delete
    /// are one step under the metadata lock, so no client can attach in between.
    pub fn delete(&self, dev: DevId) -> Result<(), PoolError> {
        let r = {
            let _quiet = self.quiesce();
            let _change = self.commits.change();
            let mut g = self.lock();
            if g.attached.get(&dev).copied().unwrap_or(0) > 0 {
                return Err(PoolError::invalid(format!(
                    "thin device {dev} is attached by a client; disconnect it before deleting"
                )));
            }
            g.pool.delete(dev as u64)?;
            g.pool.commit()
        };
        self.space.notify();
        self.punch_pending(PUNCH_BUDGET);
        r
    }

    /// Run `f` on the pool unless a client has `dev` attached: the check and `f`
    /// are one step under the metadata lock, with I/O quiesced as for
    /// [`Service::with_pool`], so no client can attach in between. An attached device
    /// is [`PoolError::Invalid`] and `f` does not run.
    pub fn with_pool_unattached<R>(
        &self,
        dev: DevId,
        f: impl FnOnce(&mut Pool) -> Result<R, PoolError>,
    ) -> Result<R, PoolError> {
        let r = {
            let _quiet = self.quiesce();
            let _change = self.commits.change();
            let mut g = self.lock();
            if let Some(&n) = g.attached.get(&dev).filter(|&&n| n > 0) {
                return Err(PoolError::invalid(format!("thin device {dev} is attached by {n} client(s)")));
            }
            f(&mut g.pool)
        };
        self.space.notify();
        self.punch_pending(PUNCH_BUDGET);
        r
    }

    /// The pool's status, read under the metadata lock only (no I/O is paused).
    pub fn status(&self) -> crate::thin::Status {
        self.lock().pool.meta().status()
    }

    /// Has anything changed since the last commit?
    fn dirty(&self) -> bool {
        self.lock().pool.meta().is_dirty()
    }

    /// Commit every `period` while anything changed, until `stop` is set; a final
    /// commit happens on the way out. Errors are reported on stderr.
    pub fn spawn_committer(self: &Arc<Self>, period: Duration, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        let me = Arc::clone(self);
        std::thread::spawn(move || {
            let tick = Duration::from_millis(50).min(period);
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                // Blocks released by commits are punched here in the background,
                // half of the time at most; otherwise the thread sleeps.
                if me.punch_pending(tick / 2) {
                    std::thread::sleep(tick / 2);
                } else {
                    std::thread::sleep(tick);
                }
                if last.elapsed() < period {
                    continue;
                }
                last = Instant::now();
                if me.dirty() {
                    if let Err(e) = me.flush() {
                        eprintln!("thinpool: periodic commit failed: {e}");
                    }
                }
            }
            // The final commit punches for at most PUNCH_BUDGET: shutdown stays
            // bounded; blocks still waiting keep their host space.
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

#[cfg(test)]
mod commit_tests {
    use super::*;
    use crate::io::{CrashStorage, MemStorage};

    #[test]
    fn released_blocks_are_punched_after_the_commit_and_never_after_reuse() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut pool = super::tiny_pool(dir.path(), 64 * 65536);
        pool.commit().expect("commit");
        let svc = Service::new(pool);
        let data = dir.path().join("d");
        let allocated = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&data).expect("stat").blocks() * 512
        };
        for b in 0..48u64 {
            svc.write(0, b * 65536, &[0x5a; 65536]).expect("write");
        }
        svc.flush().expect("flush");
        assert!(allocated() >= 48 * 65536, "{} bytes allocated", allocated());
        assert_eq!(svc.discard(0, 0, 48 * 65536).expect("discard"), 48);
        // The commit makes the release durable; its caller then punches (in
        // slices, outside the lock) before it returns.
        svc.flush().expect("flush");
        assert!(allocated() < 8 * 65536, "{} bytes still allocated after the punch", allocated());
        assert_eq!(svc.with_pool_locked(|p| (p.punches_pending(), p.data_blocks_reserved())), (0, 0));
        // Released, allocated again and written before the punch runs: the queued
        // punch must skip it.
        for b in 0..48u64 {
            svc.write(1, b * 65536, &[0x11; 65536]).expect("write");
        }
        svc.flush().expect("flush");
        svc.discard(1, 0, 24 * 65536).expect("discard");
        svc.with_pool(|p| {
            p.set_defer_punch(true);
            p.commit()
        })
        .expect("commit");
        for b in 0..24u64 {
            svc.write(0, b * 65536, &[0x22; 65536]).expect("write into released blocks");
        }
        svc.flush().expect("flush");
        svc.punch_pending(Duration::from_secs(5));
        let mut buf = vec![0u8; 65536];
        for b in 0..24u64 {
            svc.read(0, b * 65536, &mut buf).expect("read");
            assert!(buf.iter().all(|&x| x == 0x22), "device 0 block {b} lost its bytes to a punch");
        }
        for b in 24..48u64 {
            svc.read(1, b * 65536, &mut buf).expect("read");
            assert!(buf.iter().all(|&x| x == 0x11), "device 1 block {b}");
        }
    }

    #[test]
    fn concurrent_flushes_share_commits() {
        let meta = CrashStorage::new(256);
        let mut p = Pool::create_with(meta.clone(), MemStorage::new(64 * 65536), 128).expect("pool");
        p.create_thin(0).expect("thin");
        p.commit().expect("commit");
        let svc = Service::new(p);
        let before = meta.lock().faults.syncs;
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let svc = Arc::clone(&svc);
                std::thread::spawn(move || {
                    for i in 0..20u64 {
                        svc.write(0, (t * 20 + i) % 64 * 65536, &[t as u8 + 1; 4096]).expect("write");
                        svc.flush().expect("flush");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        // Each metadata commit syncs twice (blocks, then superblock).
        let commits = (meta.lock().faults.syncs - before) / 2;
        assert!(commits > 0, "flushes commit");
        assert!(commits < 160, "160 flushes from 8 threads took {commits} commits: none was shared");
    }

    #[test]
    fn a_flush_after_a_write_makes_that_write_durable() {
        let meta = CrashStorage::new(256);
        let data = CrashStorage::with_len(8 * 65536);
        let mut p = Pool::create_with(meta.clone(), data.clone(), 128).expect("pool");
        p.create_thin(0).expect("thin");
        let svc = Service::new(p);
        svc.write(0, 65536, &[7u8; 65536]).expect("write");
        svc.flush().expect("flush");
        drop(svc);
        meta.lock().crash();
        data.lock().crash();
        let mut p = Pool::open_with(meta, data, crate::pool::OpenOptions { read_only: true }).expect("open");
        let mut buf = vec![0u8; 65536];
        p.read(0, 65536, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 7), "the flushed write survived the crash");
    }
}
