//! Replication between pools: `thinctl send` writes a device (or what changed in it
//! since a base) as a self-describing stream ([`format`](mod@format)), `thinctl receive`
//! recreates it in another pool. The same code runs on a pool a command opened
//! ([`Offline`]) and on a served pool ([`Target`] is implemented by the server over
//! its shared service), so a served pool sends and receives without pausing its
//! clients beyond the few short steps marked below.
//!
//! **Send** `SNAP [--from BASE]`:
//! 1. One short exclusive step: hidden snapshots of SNAP (and BASE) are taken at
//!    that instant (O(1)), which also freezes SNAP; SNAP's identity is checked
//!    (a stale or missing one is replaced by a new random identity); BASE must have
//!    a valid identity (it was sent or received before and has not changed since).
//!    The hidden ids are listed in `pool.toml` first; then a commit.
//! 2. The stream is written from the hidden snapshots (their metadata read under
//!    the metadata lock only, in short steps): every mapped block of SNAP
//!    (full) or every block where the two snapshots' mapping trees differ
//!    (incremental, through the tree diff that skips shared subtrees), all-zero
//!    blocks as ZERO records, blocks unmapped since the base as ZERO records.
//! 3. SNAP's identity is recorded (when SNAP did not change during the send), the
//!    hidden snapshots are deleted, commit.
//!
//! **Receive** `NAME`:
//! 1. The header is read and checked before the pool is touched. NAME must be new.
//!    A full stream starts from a new empty hidden device; an incremental one from a
//!    hidden snapshot of the device whose valid identity is the stream's base
//!    identity (none: refused, naming the identity and any device that had it but
//!    changed since), whose size must be the stream's base size.
//! 2. Records are written into the hidden device as they arrive (DATA as writes,
//!    ZERO as write-zeroes that unmap whole blocks).
//! 3. After the end record checks out: bytes past the device's size are cut, the
//!    device is frozen and committed, then named NAME with the stream's source
//!    identity in one `pool.toml` save. Any error before that (a truncated or
//!    damaged stream, a full pool) deletes the hidden device: the pool is as before.
//!    A crash leaves it listed as hidden, and the next writable open deletes it.
//!
//! **Block sizes.** Records are byte ranges, so the receiving pool's block size may
//! differ from the sending pool's: a block of the receiving pool that records cover
//! only partly is allocated whole and reads as zeros elsewhere. What is refused is a
//! stream whose own numbers break the format (a block size that is not a multiple of
//! 64 KiB from 64 KiB to 1 GiB, a device size of 0 or past 2^63 − 1, records out of
//! order or past the end).

pub mod format;

use std::cell::RefCell;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use format::{Header, Identity, Record, StreamError, StreamReader, StreamWriter, Totals};

use crate::error::PoolError;
use crate::pool::Pool;
use crate::thin::{DeltaKind, DevId, DiffOptions};
use crate::units::VirtBlock;
use crate::volume::{check_name, check_size, cut_after, IdentityState, PoolDir, PoolDirError};

/// Bytes read from the source per step.
const READ_BYTES: u64 = 1 << 20;
/// Mappings walked per short step.
const WALK_WINDOW: u64 = 4096;

/// Why a send or receive failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The stream is malformed, damaged or cut off (or could not be read/written).
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The pool directory refused (no such device, name taken, read-only...).
    #[error(transparent)]
    Dir(#[from] PoolDirError),
    /// The engine failed (no space, damaged metadata...).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// An incremental stream's base is not in the receiving pool, or the base given
    /// to send has no valid identity.
    #[error("{0}")]
    Base(String),
}

/// A pool to send from or receive into: exclusive short steps on the pool
/// directory and the engine, and data I/O that may run beside other clients.
pub trait Target {
    /// Run `f` with exclusive access to the pool directory and the pool.
    fn locked<R>(&self, f: impl FnOnce(&mut PoolDir, &mut Pool) -> R) -> R;
    /// Run `f` on the pool for what only reads the metadata of devices nobody
    /// changes (the hidden snapshots): a served pool holds its metadata lock only,
    /// and I/O goes on.
    fn peek<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> R;
    /// Read a device's bytes.
    fn read(&self, dev: DevId, offset: u64, buf: &mut [u8]) -> Result<(), PoolError>;
    /// Write a device's bytes.
    fn write(&self, dev: DevId, offset: u64, data: &[u8]) -> Result<(), PoolError>;
    /// Make a range read as zeros, unmapping whole blocks.
    fn write_zeroes(&self, dev: DevId, offset: u64, len: u64) -> Result<(), PoolError>;
    /// Make everything so far durable.
    fn commit(&self) -> Result<(), PoolError>;
}

/// A pool this process opened (and locked) itself.
pub struct Offline<'a> {
    pd: RefCell<&'a mut PoolDir>,
    pool: RefCell<&'a mut Pool>,
}

impl<'a> Offline<'a> {
    /// Wrap an open pool directory and its pool.
    pub fn new(pd: &'a mut PoolDir, pool: &'a mut Pool) -> Offline<'a> {
        Offline { pd: RefCell::new(pd), pool: RefCell::new(pool) }
    }
}

impl Target for Offline<'_> {
    fn locked<R>(&self, f: impl FnOnce(&mut PoolDir, &mut Pool) -> R) -> R {
        f(&mut self.pd.borrow_mut(), &mut self.pool.borrow_mut())
    }
    fn peek<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> R {
        f(&mut self.pool.borrow_mut())
    }
    fn read(&self, dev: DevId, offset: u64, buf: &mut [u8]) -> Result<(), PoolError> {
        self.pool.borrow_mut().read(dev, offset, buf)
    }
    fn write(&self, dev: DevId, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        self.pool.borrow_mut().write(dev, offset, data)
    }
    fn write_zeroes(&self, dev: DevId, offset: u64, len: u64) -> Result<(), PoolError> {
        self.pool.borrow_mut().write_zeroes(dev, offset, len, true)
    }
    fn commit(&self) -> Result<(), PoolError> {
        self.pool.borrow_mut().commit()
    }
}

/// What a send or a receive did (the control socket carries it as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamReport {
    /// The device's virtual size in bytes.
    pub device_bytes: u64,
    /// The sending pool's block size in bytes.
    pub block_bytes: u64,
    /// The identity the stream reproduces (32 hex digits).
    pub source_identity: String,
    /// The base's identity, for an incremental stream.
    pub base_identity: Option<String>,
    /// DATA records.
    pub data_records: u64,
    /// DATA bytes.
    pub data_bytes: u64,
    /// ZERO records.
    pub zero_records: u64,
    /// ZERO bytes.
    pub zero_bytes: u64,
    /// Stream bytes, header to end record.
    pub stream_bytes: u64,
    /// Send: whether the source device's identity was recorded (false when it
    /// changed during the send: the stream is still valid, but the device cannot be
    /// a base later until it is sent again).
    pub identity_recorded: bool,
    /// Receive: the new device's id.
    pub id: Option<DevId>,
    /// Receive: the base device an incremental stream was applied on top of.
    pub base_name: Option<String>,
}

impl StreamReport {
    fn new(h: &Header, t: &Totals, stream_bytes: u64) -> StreamReport {
        StreamReport {
            device_bytes: h.device_bytes,
            block_bytes: h.block_bytes,
            source_identity: h.source.to_hex(),
            base_identity: h.base.map(|(b, _)| b.to_hex()),
            data_records: t.data_records,
            data_bytes: t.data_bytes,
            zero_records: t.zero_records,
            zero_bytes: t.zero_bytes,
            stream_bytes,
            identity_recorded: false,
            id: None,
            base_name: None,
        }
    }
}

fn all_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0) && chunks.remainder().iter().all(|&x| x == 0)
}

/// Runs of virtual blocks `[lo, hi)` to send and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendRun {
    /// Send the bytes of these blocks (all-zero blocks go as ZERO records).
    Data(u64, u64),
    /// These blocks read as zeros now.
    Zero(u64, u64),
}

/// Stream the bytes of `[offset, end)` of `dev`: in reads of at most
/// [`READ_BYTES`], each block-or-MiB piece as DATA, or ZERO when all zero.
fn emit_bytes<T: Target, W: Write>(
    t: &T,
    dev: DevId,
    w: &mut StreamWriter<W>,
    bs: u64,
    offset: u64,
    end: u64,
    buf: &mut Vec<u8>,
) -> Result<(), ReplicationError> {
    let piece = bs.min(READ_BYTES);
    let mut at = offset;
    while at < end {
        let n = (end - at).min(READ_BYTES);
        buf.resize(n as usize, 0);
        t.read(dev, at, buf)?;
        for (i, p) in buf.chunks(piece as usize).enumerate() {
            let o = at + i as u64 * piece;
            if all_zero(p) {
                w.zero(o, p.len() as u64)?;
            } else {
                w.data(o, p)?;
            }
        }
        at += n;
    }
    Ok(())
}

/// Send device `snap` (and the changes since `base`) as a stream into `out`;
/// `progress(done, total)` follows in bytes of the device.
pub fn send<T: Target, W: Write>(
    t: &T,
    snap: &str,
    base: Option<&str>,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<StreamReport, ReplicationError> {
    // Step 1: hidden snapshots at one instant, identities.
    struct Prep {
        header: Header,
        snap_id: DevId,
        hs: DevId,
        hb: Option<DevId>,
    }
    let prep = t.locked(|pd, pool| -> Result<Prep, ReplicationError> {
        let e = pd.device(snap)?.clone();
        let base_info = match base {
            None => None,
            Some(b) => {
                let be = pd.device(b)?.clone();
                if b == snap {
                    return Err(ReplicationError::Base(format!("--from {b}: the base is the device being sent")));
                }
                match pd.identity(pool, b)? {
                    IdentityState::Valid(uuid) => Some((be, Identity(uuid))),
                    IdentityState::None => {
                        return Err(ReplicationError::Base(format!(
                            "--from {b}: \"{b}\" has never been sent or received, so no other pool can hold it as a base; send it in full first"
                        )))
                    }
                    IdentityState::Stale(_) => {
                        return Err(ReplicationError::Base(format!(
                            "--from {b}: \"{b}\" was changed after it was sent or received, so it no longer matches the copy a receiver holds; choose an unchanged base or send in full"
                        )))
                    }
                }
            }
        };
        let source = match pd.identity(pool, snap)? {
            IdentityState::Valid(uuid) => Identity(uuid),
            _ => Identity::random().map_err(|e| PoolDirError::Invalid(format!("cannot draw a random identity: {e}")))?,
        };
        let ids = pd.free_ids(pool, if base_info.is_some() { 2 } else { 1 })?;
        pd.hide(&ids)?;
        let made = (|| -> Result<(), PoolError> {
            pool.create_snap(ids[0].into(), e.id.into())?;
            if let Some((be, _)) = &base_info {
                pool.create_snap(ids[1].into(), be.id.into())?;
            }
            Ok(())
        })();
        if let Err(err) = made {
            for &id in &ids {
                if pool.meta().has_device(id) {
                    let _ = pool.delete(id.into());
                }
            }
            pd.unhide(&ids);
            let _ = pd.save();
            return Err(err.into());
        }
        let header = Header {
            block_bytes: pool.block_bytes(),
            device_bytes: e.size_bytes,
            source,
            base: base_info.as_ref().map(|(be, id)| (*id, be.size_bytes)),
        };
        Ok(Prep { header, snap_id: e.id, hs: ids[0], hb: base_info.map(|_| ids[1]) })
    })?;
    let hidden: Vec<DevId> = std::iter::once(prep.hs).chain(prep.hb).collect();
    let result = (|| -> Result<StreamReport, ReplicationError> {
        t.commit()?;
        let (totals, stream_bytes) = write_stream(t, &prep.header, prep.hs, prep.hb, out, progress)?;
        // Step 3: record SNAP's identity when SNAP is still what was sent.
        let recorded = t.locked(|pd, pool| -> Result<bool, ReplicationError> {
            let same = pool.meta().has_device(prep.snap_id)
                && pd.device(snap).map(|e| e.id == prep.snap_id && e.size_bytes == prep.header.device_bytes)?
                && pool.meta().device_root(prep.snap_id)? == pool.meta().device_root(prep.hs)?;
            if same {
                pd.set_identity(pool, snap, prep.snap_id, &prep.header.source.0, prep.header.device_bytes)?;
            }
            Ok(same)
        })?;
        let mut report = StreamReport::new(&prep.header, &totals, stream_bytes);
        report.identity_recorded = recorded;
        Ok(report)
    })();
    // Always: delete the hidden snapshots, commit, then drop them from the list
    // (saving also records the identity).
    let cleanup = t.locked(|_, pool| -> Result<(), ReplicationError> {
        for &id in &hidden {
            if pool.meta().has_device(id) {
                pool.delete(id.into())?;
            }
        }
        Ok(())
    });
    let committed = cleanup.and_then(|()| t.commit().map_err(ReplicationError::from));
    let saved = committed.and_then(|()| {
        t.locked(|pd, _| {
            pd.unhide(&hidden);
            pd.save()
        })
        .map_err(ReplicationError::from)
    });
    let summary = result?;
    saved?;
    Ok(summary)
}

/// The runs to send: every mapped block of `hs` in `[lo, hi)`.
fn mapped_runs<T: Target>(t: &T, hs: DevId, lo: u64, hi: u64, out: &mut Vec<SendRun>) -> Result<(), ReplicationError> {
    let mut vb = lo;
    while vb < hi {
        let maps = t.peek(|pool| pool.mapping_window(hs, vb, hi, WALK_WINDOW))?;
        let Some(last) = maps.last().map(|m| m.vblock) else { break };
        for m in maps {
            match out.last_mut() {
                Some(SendRun::Data(_, e)) if *e == m.vblock => *e += 1,
                _ => out.push(SendRun::Data(m.vblock, m.vblock + 1)),
            }
        }
        vb = last + 1;
    }
    Ok(())
}

/// B-tree nodes the diff reads per step under the lock.
const DIFF_STEP_NODES: u64 = 128;

/// The runs to send for an incremental stream: where the mapping trees of `hb`
/// and `hs` differ in `[0, hi)`, by the tree diff that skips shared subtrees
/// (blocks only `hb` maps read as zeros now). The hidden snapshots do not change,
/// so the walk goes in short steps under the metadata lock only, and sees one
/// instant.
fn changed_runs<T: Target>(
    t: &T,
    hb: DevId,
    hs: DevId,
    hi: u64,
    out: &mut Vec<SendRun>,
) -> Result<(), ReplicationError> {
    let opts = DiffOptions::range(VirtBlock(0), VirtBlock(hi));
    let mut walk = t.peek(|pool| -> Result<_, PoolError> {
        let md = pool.metadata_mut();
        let (l, r) = (md.device_root(hb)?, md.device_root(hs)?);
        md.diff_walk(l, r, &opts)
    })?;
    while !t.peek(|pool| pool.metadata_mut().diff_step(&mut walk, DIFF_STEP_NODES))? {}
    for run in walk.finish().0 {
        let (lo, end) = (run.begin.0, run.end().0);
        let next = match run.kind {
            DeltaKind::Same => continue,
            DeltaKind::LeftOnly => SendRun::Zero(lo, end),
            DeltaKind::Different | DeltaKind::RightOnly => SendRun::Data(lo, end),
        };
        match (out.last_mut(), next) {
            (Some(SendRun::Data(_, e)), SendRun::Data(s, n)) if *e == s => *e = n,
            (Some(SendRun::Zero(_, e)), SendRun::Zero(s, n)) if *e == s => *e = n,
            _ => out.push(next),
        }
    }
    Ok(())
}

fn write_stream<T: Target, W: Write>(
    t: &T,
    header: &Header,
    hs: DevId,
    hb: Option<DevId>,
    out: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Totals, u64), ReplicationError> {
    let bs = header.block_bytes;
    let size = header.device_bytes;
    let nblk = size.div_ceil(bs);
    let mut runs = Vec::new();
    match (hb, header.base) {
        (Some(hb), Some((_, base_bytes))) => {
            // Blocks wholly inside the base: what differs. From the block holding the
            // base's end on: everything mapped (the receiver zeroes that tail first).
            let split = (base_bytes / bs).min(nblk);
            changed_runs(t, hb, hs, split, &mut runs)?;
            mapped_runs(t, hs, split, nblk, &mut runs)?;
        }
        _ => mapped_runs(t, hs, 0, nblk, &mut runs)?,
    }
    let mut w = StreamWriter::new(out, *header)?;
    let mut buf = Vec::new();
    for run in runs {
        match run {
            SendRun::Data(lo, hi) => {
                emit_bytes(t, hs, &mut w, bs, lo * bs, (hi * bs).min(size), &mut buf)?;
                progress(hi * bs, nblk * bs);
            }
            SendRun::Zero(lo, hi) => {
                let (s, e) = (lo * bs, (hi * bs).min(size));
                if s < e {
                    w.zero(s, e - s)?;
                }
            }
        }
    }
    let stream_bytes = w.bytes_written();
    let (totals, _) = w.finish()?;
    progress(nblk * bs, nblk * bs);
    Ok((totals, stream_bytes + (format::RECORD_HEADER_BYTES + format::END_PAYLOAD_BYTES) as u64))
}

/// Receive a stream from `input` as new device `name`; `progress(done, total)`
/// follows in bytes of the device (the last record's end).
pub fn receive<T: Target, R: Read>(
    t: &T,
    name: &str,
    input: R,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<StreamReport, ReplicationError> {
    let mut reader = StreamReader::new(input)?;
    let header = *reader.header();
    // Step 1: checks, then the hidden device.
    let (id, base_name) = t.locked(|pd, pool| -> Result<(DevId, Option<String>), ReplicationError> {
        check_name(name)?;
        if pd.device(name).is_ok() {
            return Err(PoolDirError::NameTaken(name.to_string()).into());
        }
        check_size(header.device_bytes)?;
        let base = match header.base {
            None => None,
            Some((uuid, base_bytes)) => {
                let found = pd.devices_with_identity(pool, &uuid.0)?;
                let Some(b) = found.into_iter().find(|n| pd.device(n).is_ok_and(|e| e.size_bytes == base_bytes))
                else {
                    let once = pd.devices_once_with_identity(&uuid.0);
                    return Err(ReplicationError::Base(if once.is_empty() {
                        format!(
                            "this incremental stream applies on top of a device with identity {uuid} ({base_bytes} bytes), and pool {} has none; receive its base first",
                            pd.dir().display()
                        )
                    } else {
                        format!(
                            "this incremental stream applies on top of identity {uuid}, which device(s) {} had but changed since (written, discarded or resized); nothing was changed",
                            once.join(", ")
                        )
                    }));
                };
                Some((pd.device(&b)?.id, b))
            }
        };
        let id = pd.free_ids(pool, 1)?[0];
        pd.hide(&[id])?;
        let made = (|| -> Result<(), PoolError> {
            match &base {
                None => pool.create_thin(id.into()),
                Some((bid, _)) => {
                    pool.create_snap(id.into(), (*bid).into())?;
                    // The base's bytes from the block holding its end on are sent
                    // again in full: start them from zeros.
                    let (bs, bb) = (header.block_bytes, header.base.map_or(0, |b| b.1));
                    cut_after(pool, id, bb / bs * bs).map(|_| ())
                }
            }
        })();
        if let Err(e) = made {
            if pool.meta().has_device(id) {
                let _ = pool.delete(id.into());
            }
            pd.unhide(&[id]);
            let _ = pd.save();
            return Err(e.into());
        }
        Ok((id, base.map(|(_, n)| n)))
    })?;
    // Step 2: the records.
    let applied = (|| -> Result<(), ReplicationError> {
        while let Some(rec) = reader.next_record()? {
            match rec {
                Record::Data { offset, bytes } => {
                    t.write(id, offset, bytes)?;
                    progress(offset + bytes.len() as u64, header.device_bytes);
                }
                Record::Zero { offset, len } => {
                    t.write_zeroes(id, offset, len)?;
                    progress(offset + len, header.device_bytes);
                }
            }
        }
        // Step 3: cut past the end, freeze, commit, name.
        t.locked(|_, pool| -> Result<(), PoolError> {
            cut_after(pool, id, header.device_bytes)?;
            pool.metadata_mut().freeze(id.into())
        })?;
        t.commit()?;
        t.locked(|pd, pool| -> Result<(), PoolDirError> {
            pd.unhide(&[id]);
            pd.set_identity(pool, name, id, &header.source.0, header.device_bytes)?;
            pd.record_new_device(name, id, header.device_bytes)
        })?;
        Ok(())
    })();
    if let Err(e) = applied {
        // Nothing of it stays: delete the hidden device, commit, forget it.
        t.locked(|pd, _| pd.drop_unnamed_identity(name));
        let _ = t.locked(|_, pool| if pool.meta().has_device(id) { pool.delete(id.into()) } else { Ok(()) });
        if t.commit().is_ok() {
            let _ = t.locked(|pd, _| {
                pd.unhide(&[id]);
                pd.save()
            });
        }
        return Err(e);
    }
    let mut report = StreamReport::new(&header, &reader.totals(), reader.bytes_read());
    report.identity_recorded = true;
    report.id = Some(id);
    report.base_name = base_name;
    Ok(report)
}
