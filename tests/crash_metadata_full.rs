//! Crashes around the metadata boundary. A pool whose metadata may not grow is
//! filled with snapshots and scattered writes until a write is refused for want of
//! metadata; then come the boundary steps: the refused allocation again (with a
//! commit after it), a delete and a discard that free space while the pool is out of
//! metadata space, the refused write again (now it fits) and a new snapshot, each
//! committed. A crash is injected at every sync of the metadata and of the data
//! file in those steps, keeping none, half or all of the metadata writes issued
//! since the previous sync; every image must pass the strict checker and Debian's
//! `thin_check`, reopen, and read back exactly the last committed state or the one
//! being committed. The same is done when the metadata may grow from that point on:
//! the refused write then grows the metadata file and its space map instead, and
//! the crashes fall around that growth.

mod common;

use std::path::Path;

use thinpool::error::{MetaError, PoolError};
use thinpool::io::{CrashImage, CrashStorage};
use thinpool::pool::{OpenOptions as PoolOpen, Pool};

const BS: u64 = 64 * 1024;
/// 256 KiB of metadata: 64 blocks, a reserve of 16.
const META_BLOCKS: u64 = 64;
const DATA_BLOCKS: u64 = 512;
/// Virtual blocks written in each device (spread so that they sit in many leaves).
const SPREAD: u64 = 1 << 20;

/// Every device's mapped blocks with a digest of their bytes.
type State = Vec<(u32, Vec<(u64, u64)>)>;

fn digest(bytes: &[u8]) -> u64 {
    // Two CRC32Cs (the library's hardware-accelerated one): enough to tell blocks apart.
    let half = bytes.len() / 2;
    (u64::from(crc32c::crc32c(&bytes[..half])) << 32) | u64::from(crc32c::crc32c(&bytes[half..]))
}

fn state(p: &mut Pool) -> State {
    let mut buf = vec![0u8; BS as usize];
    p.meta()
        .device_ids()
        .into_iter()
        .map(|id| {
            let maps = p.mappings(id, 0, u64::MAX).expect("mappings");
            let blocks = maps
                .iter()
                .map(|m| {
                    p.read(id, m.vblock * BS, &mut buf).expect("read");
                    (m.vblock, digest(&buf))
                })
                .collect();
            (id, blocks)
        })
        .collect()
}

/// The 4 KiB a step writes: says which device, block and step.
fn record(dev: u32, vb: u64, step: u64) -> Vec<u8> {
    let word = (u64::from(dev) << 48) ^ (vb << 8) ^ step ^ 0x5a5a_0000_0000_0000;
    word.to_le_bytes().iter().copied().cycle().take(4096).collect()
}

/// The i-th scattered virtual block.
fn scattered(i: u64) -> u64 {
    (i * 2_654_435_761) % SPREAD
}

fn is_meta_full(e: &PoolError) -> bool {
    matches!(e, PoolError::Meta(MetaError::NoMetadataSpace { .. }))
}

/// Fill: device 0 with scattered writes, then rounds of (snapshot of 0, scattered
/// writes into the snapshot and into 0), committed, until a write is refused.
/// Returns the id of the last snapshot and how many writes were done.
fn fill(p: &mut Pool) -> (u32, u64) {
    p.create_thin(0).expect("thin");
    let mut i = 0u64;
    for _ in 0..24 {
        p.write(0, scattered(i) * BS, &record(0, scattered(i), i)).expect("first writes");
        i += 1;
    }
    p.commit().expect("commit");
    for snap in 1u32.. {
        match p.create_snap(snap.into(), 0) {
            Ok(()) => {}
            Err(e) if is_meta_full(&e) => {
                p.commit().expect("commit");
                return (snap - 1, i);
            }
            Err(e) => panic!("snapshot {snap}: {e}"),
        }
        for dev in [snap, 0] {
            for _ in 0..4 {
                let vb = scattered(i);
                match p.write(dev, vb * BS, &record(dev, vb, i)) {
                    Ok(()) => i += 1,
                    Err(e) if is_meta_full(&e) => {
                        p.commit().expect("commit");
                        return (snap, i);
                    }
                    Err(e) => panic!("write {i}: {e}"),
                }
            }
        }
        p.commit().expect("commit");
        assert!(snap < 500, "the metadata never filled up");
    }
    unreachable!()
}

/// The block of the write refused at the boundary, once step 0 found it.
#[derive(Default)]
struct Boundary {
    refused: Option<u64>,
}

/// The boundary steps, each ending with a commit. `Ok(false)` once they are all
/// done. `expect_full` (metadata that may not grow): step 0 must meet a refused
/// write, and that write must fit after the delete and discard.
fn boundary_step(
    p: &mut Pool,
    i: usize,
    last_snap: u32,
    expect_full: bool,
    b: &mut Boundary,
) -> Result<bool, PoolError> {
    let n = 10_000;
    match i {
        // The allocation that fails (or, with growing metadata, grows the metadata):
        // scattered writes into device 0 until one is refused, at most 64.
        0 => {
            for k in 0..64 {
                let vb = scattered(n + k);
                match p.write(0, vb * BS, &record(0, vb, n + k)) {
                    Err(e) if is_meta_full(&e) => {
                        b.refused = Some(vb);
                        break;
                    }
                    Err(e) => return Err(e),
                    Ok(()) => {}
                }
            }
            if expect_full {
                assert!(b.refused.is_some(), "no write at the boundary was refused");
                assert_eq!(p.meta().status().mode, thinpool::thin::PoolMode::OutOfMetadataSpace);
            }
        }
        // A delete that frees space while out of metadata space.
        1 => p.delete(last_snap.into())?,
        // A discard too (half of the previous snapshot's blocks).
        2 => {
            let maps = p.mappings(last_snap - 1, 0, u64::MAX)?;
            for m in maps.iter().step_by(2) {
                p.discard(last_snap - 1, m.vblock * BS, BS)?;
            }
        }
        // The refused write again: it fits now.
        3 => {
            let vb = b.refused.unwrap_or(scattered(n + 64));
            p.write(0, vb * BS, &record(0, vb, n + 100))?;
        }
        // And a new snapshot with a write into it.
        4 => {
            p.create_snap(1000, 0)?;
            let vb = scattered(n + 101);
            p.write(1000, vb * BS, &record(1000, vb, n + 101))?;
        }
        _ => return Ok(false),
    }
    p.commit()?;
    Ok(true)
}

/// Which file a crash run fails a sync of.
#[derive(Debug, Clone, Copy)]
enum Fail {
    None,
    Meta(u64),
    Data(u64),
}

struct Run {
    /// States after the fill and after each completed boundary step.
    completed: Vec<State>,
    /// The step that failed (a crash run), if one did.
    failed_at: Option<usize>,
    meta: CrashStorage,
    data: CrashStorage,
    /// Syncs of (data, metadata) during the boundary steps.
    syncs: (u64, u64),
}

/// The filled pool, made once: the metadata and data images and the last snapshot.
struct Filled {
    meta: Vec<Box<thinpool::format::Block>>,
    data: Vec<Box<thinpool::format::Block>>,
    last_snap: u32,
}

fn filled() -> &'static Filled {
    static FILLED: std::sync::OnceLock<Filled> = std::sync::OnceLock::new();
    FILLED.get_or_init(|| {
        let meta = CrashStorage::new(META_BLOCKS);
        let data = CrashStorage::with_len(DATA_BLOCKS * BS);
        let mut p = Pool::create_with(meta.clone(), data.clone(), (BS / 512) as u32).expect("create");
        p.set_metadata_max_bytes(0);
        let last_snap = fill(&mut p).0;
        drop(p);
        let (meta, data) = (meta.lock().durable.clone(), data.lock().durable.clone());
        Filled { meta, data, last_snap }
    })
}

fn run(fail: Fail, grow: bool) -> Run {
    let f = filled();
    let (meta, data) = (CrashStorage::from_blocks(f.meta.clone()), CrashStorage::from_blocks(f.data.clone()));
    let mut p = Pool::open_with(meta.clone(), data.clone(), PoolOpen::default()).expect("open the filled pool");
    let last_snap = f.last_snap;
    // With `grow`, the metadata may grow from here: the boundary steps grow it
    // instead of failing.
    p.set_metadata_max_bytes(if grow { 4 * META_BLOCKS * 4096 } else { 0 });
    let mut completed = vec![state(&mut p)];
    let (d0, m0) = (data.lock().faults.syncs, meta.lock().faults.syncs);
    match fail {
        Fail::None => {}
        Fail::Meta(n) => meta.lock().faults.fail_at_sync = Some(m0 + n),
        Fail::Data(n) => data.lock().faults.fail_at_sync = Some(d0 + n),
    }
    let mut failed_at = None;
    let mut b = Boundary::default();
    for i in 0.. {
        match boundary_step(&mut p, i, last_snap, !grow, &mut b) {
            Ok(true) => completed.push(state(&mut p)),
            Ok(false) => break,
            Err(e) => {
                assert!(!matches!(fail, Fail::None), "boundary step {i} failed without a fault: {e}");
                failed_at = Some(i);
                break;
            }
        }
    }
    let syncs = (data.lock().faults.syncs - d0, meta.lock().faults.syncs - m0);
    drop(p);
    Run { completed, failed_at, meta, data, syncs }
}

/// Crash: the data file loses what was not synced; each kept prefix of the
/// metadata's pending writes must check clean with both checkers, reopen, and hold
/// one of `candidates`.
fn check_crash(dir: &Path, meta: &CrashImage, data: &CrashStorage, candidates: &[&State], what: &str) {
    data.lock().crash();
    let n = meta.pending.len();
    let mut keeps = vec![0, n / 2, n];
    keeps.dedup();
    for keep in keeps {
        let blocks = meta.crashed(keep);
        let path = dir.join("crashed-metadata");
        std::fs::write(&path, blocks.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>()).expect("image");
        common::checks(&path).unwrap_or_else(|e| panic!("{what}, keep {keep} of {n}: {e}"));
        let mut p = Pool::open_with(CrashStorage::from_blocks(blocks), data.clone(), PoolOpen { read_only: true })
            .unwrap_or_else(|e| panic!("{what}, keep {keep} of {n}: the crashed image does not open: {e}"));
        let got = state(&mut p);
        assert!(
            candidates.contains(&&got),
            "{what}, keep {keep} of {n}: the pool holds neither the last commit nor the one being made"
        );
    }
}

fn crash_at_every_sync(grow: bool) {
    let dir = tempfile::tempdir().expect("tmp");
    let full = run(Fail::None, grow);
    let (data_syncs, meta_syncs) = full.syncs;
    assert!(
        meta_syncs >= 8 && data_syncs >= 4,
        "the boundary steps commit ({data_syncs} data, {meta_syncs} metadata syncs)"
    );
    assert_eq!(full.completed.len(), 6, "every boundary step completed");
    let grown = full.meta.lock().len();
    if grow {
        assert!(grown > META_BLOCKS * 4096, "the metadata grew in the boundary steps");
    } else {
        assert_eq!(grown, META_BLOCKS * 4096, "the metadata may not grow");
    }
    // The run without faults ends clean too.
    let end = full.meta.lock().clone();
    check_crash(dir.path(), &end, &full.data, &[&full.completed[5]], "no crash");
    let mut crashes = 0;
    let points = (0..meta_syncs).map(Fail::Meta).chain((0..data_syncs).map(Fail::Data));
    for fail in points {
        let r = run(fail, grow);
        let at = r.failed_at.unwrap_or_else(|| panic!("{fail:?}: no step failed"));
        assert_eq!(r.completed, full.completed[..=at], "{fail:?}: the steps before the crash went as without it");
        let img = r.meta.lock().clone();
        let what = format!("grow {grow}, crash at {fail:?} in boundary step {at}");
        check_crash(dir.path(), &img, &r.data, &[&full.completed[at], &full.completed[at + 1]], &what);
        crashes += 1;
    }
    eprintln!("grow {grow}: {crashes} crash points ({meta_syncs} metadata and {data_syncs} data syncs)");
}

#[test]
fn a_crash_at_every_sync_around_metadata_exhaustion_leaves_a_clean_pool_with_its_data() {
    crash_at_every_sync(false);
}

#[test]
fn a_crash_at_every_sync_around_metadata_growth_leaves_a_clean_pool_with_its_data() {
    crash_at_every_sync(true);
}
