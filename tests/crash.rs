//! Crash consistency: the metadata device is simulated so that a crash can be
//! injected at every sync of every commit, with any prefix of the writes issued since
//! the previous sync reaching the disk. Every such image must open, pass Debian's
//! `thin_check`, and hold exactly the last committed state or the one being committed.
//! The data file is simulated too: a failing data write is an error that commits
//! nothing, and a crash that loses unsynced data writes leaves a pool that opens.

mod common;

use std::fs::OpenOptions;
use std::path::Path;

use thinpool::error::PoolError;
use thinpool::io::{CrashImage, CrashStorage, FileStorage, Storage};
use thinpool::pool::{OpenOptions as PoolOpen, Pool};

const BS: u64 = 64 * 1024;
const META_BLOCKS: u64 = 512;

/// Device contents after each completed step.
type State = Vec<(u32, Vec<u8>)>;

fn fill(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(seed) ^ seed).collect()
}

/// The scenario: each step changes the pool and commits. Writes only land on unmapped
/// or shared blocks, so every byte a step writes goes to a new data block.
fn step(p: &mut Pool, i: usize) -> Result<bool, PoolError> {
    (|| -> Result<bool, PoolError> {
        match i {
            0 => p.create_thin(0)?,
            1 => p.write(0, 0, &fill(1, (3 * BS) as usize))?,
            2 => p.create_snap(1, 0)?,
            3 => p.write(0, BS / 2, &fill(2, BS as usize))?,
            4 => p.create_snap(2, 1)?,
            5 => p.write(2, 0, &fill(3, (5 * BS) as usize))?,
            6 => {
                p.discard(1, 0, 2 * BS)?;
            }
            7 => p.delete(0)?,
            8 => p.set_transaction_id(0, 9)?,
            _ => return Ok(false),
        }
        p.commit()?;
        Ok(true)
    })()
}

fn snapshot_state(p: &mut Pool) -> State {
    p.meta()
        .device_ids()
        .into_iter()
        .map(|id| {
            let mut buf = vec![0u8; (6 * BS) as usize];
            p.read(id, 0, &mut buf).expect("read");
            (id, buf)
        })
        .collect()
}

#[test]
fn a_crash_at_any_sync_leaves_the_previous_or_the_new_commit() {
    let dir = tempfile::tempdir().expect("tmp");
    let data_path = dir.path().join("data");
    // The states the scenario goes through, from a run without failures.
    let mut states: Vec<State> = Vec::new();
    let mut crashes = 0;
    for fail_at in 0u64.. {
        let data =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&data_path).expect("data");
        data.set_len(64 * BS).expect("len");
        let storage = CrashStorage::new(META_BLOCKS);
        let image = storage.image.clone();
        image.lock().expect("lock").faults.fail_at_sync = Some(fail_at);
        let mut pool = match Pool::create_with(storage, FileStorage::new(data).expect("data"), (BS / 512) as u32) {
            Ok(p) => p,
            Err(_) => {
                check_crash(dir.path(), &image.lock().expect("lock"), &[Vec::new()]);
                crashes += 1;
                continue;
            }
        };
        let mut completed = vec![snapshot_state(&mut pool)];
        let mut failed = false;
        for i in 0.. {
            match step(&mut pool, i) {
                Ok(true) => completed.push(snapshot_state(&mut pool)),
                Ok(false) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if !failed {
            assert_eq!(crashes, fail_at as usize);
            assert!(crashes > 10, "only {crashes} sync points were exercised");
            return;
        }
        if states.is_empty() || states.len() < completed.len() + 1 {
            // Learn the full sequence of states once, from a run with no failure.
            states = full_run(&data_path);
        }
        let ok = completed.len();
        drop(pool);
        let candidates = [states[ok - 1].clone(), states.get(ok).cloned().unwrap_or_default()];
        check_crash(dir.path(), &image.lock().expect("lock"), &candidates);
        crashes += 1;
    }
}

fn full_run(data_path: &Path) -> Vec<State> {
    let data = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(data_path).expect("data");
    data.set_len(64 * BS).expect("len");
    let data = FileStorage::new(data).expect("data");
    let mut pool = Pool::create_with(CrashStorage::new(META_BLOCKS), data, (BS / 512) as u32).expect("create");
    let mut states = vec![snapshot_state(&mut pool)];
    let mut i = 0;
    while step(&mut pool, i).expect("step") {
        states.push(snapshot_state(&mut pool));
        i += 1;
    }
    states
}

/// Every crash image (durable writes plus a prefix of the pending ones) opens, passes
/// thin_check and equals one of `candidates`; an image whose block 0 was never written
/// is an unformatted device, acceptable only while the pool was being created.
fn check_crash(dir: &Path, image: &CrashImage, candidates: &[State]) {
    let n = image.pending.len();
    let mut keeps = vec![0, n / 2, n];
    keeps.dedup();
    for keep in keeps {
        let bytes = image.crashed_bytes(keep);
        let meta_path = dir.join("crashed-metadata");
        std::fs::write(&meta_path, &bytes).expect("write image");
        if bytes[..4096].iter().all(|&b| b == 0) {
            assert!(candidates == [Vec::new()], "a formatted pool lost its superblock");
            continue;
        }
        common::checks(&meta_path).unwrap_or_else(|e| panic!("after a crash (keep {keep} of {n}): {e}"));
        let m = OpenOptions::new().read(true).open(&meta_path).expect("m");
        let d = OpenOptions::new().read(true).open(dir.join("data")).expect("d");
        let (m, d) = (FileStorage::new(m).expect("m"), FileStorage::new(d).expect("d"));
        let mut p = Pool::open_with(m, d, PoolOpen { read_only: true }).expect("crashed image opens");
        let got = snapshot_state(&mut p);
        assert!(candidates.contains(&got), "crash image (keep {keep} of {n}) holds neither the old nor the new commit");
    }
}

/// A pool over two crash storages with device 0 whose block 0 holds `fill(1, BS)`,
/// committed: (pool, metadata, data).
fn crash_pool() -> (Pool, CrashStorage, CrashStorage) {
    let (meta, data) = (CrashStorage::new(META_BLOCKS), CrashStorage::with_len(16 * BS));
    let mut pool = Pool::create_with(meta.clone(), data.clone(), (BS / 512) as u32).expect("create");
    pool.create_thin(0).expect("thin");
    pool.write(0, 0, &fill(1, BS as usize)).expect("write");
    pool.commit().expect("commit");
    (pool, meta, data)
}

/// Crash both files, check what is left of the metadata and open the pool again.
fn reopen_after_crash(meta: &CrashStorage, data: &CrashStorage) -> Pool {
    meta.lock().crash();
    data.lock().crash();
    let report = thinpool::check::check(meta).expect("check runs");
    let problems: Vec<String> = report.problems.iter().map(|p| p.to_string()).collect();
    assert!(report.is_clean(), "after a crash: {problems:?}");
    Pool::open_with(meta.clone(), data.clone(), PoolOpen::default()).expect("reopens")
}

#[test]
fn a_failing_data_write_is_a_data_error_and_changes_nothing_committed() {
    for (what, offset) in [("in place", 0), ("into a new block", 3 * BS + 100)] {
        let (mut pool, meta, data) = crash_pool();
        let committed = meta.lock().durable.clone();
        {
            let mut d = data.lock();
            d.faults.fail_at_op = Some(d.faults.ops);
            d.faults.tear = 10;
        }
        let err = pool.write(0, offset, &fill(2, 200)).expect_err(what);
        assert!(matches!(err, PoolError::DataIo(_)), "{what}: {err}");
        assert!(pool.commit().is_err(), "{what}: the data file is failed, so a commit cannot sync it");
        assert!(meta.lock().durable == committed, "{what}: the committed metadata changed");
        drop(pool);
        let mut p = reopen_after_crash(&meta, &data);
        assert_eq!(runs(p.extents(0, 0, 4 * BS).expect("extents")), vec![(BS, true), (3 * BS, false)], "{what}");
        let mut buf = vec![0u8; BS as usize];
        p.read(0, 0, &mut buf).expect("read");
        assert!(buf == fill(1, BS as usize), "{what}: block 0 lost its committed content");
    }
}

#[test]
fn a_crash_loses_unsynced_data_writes_and_the_pool_still_opens_and_checks() {
    let (mut pool, meta, data) = crash_pool();
    pool.write(0, 0, &fill(3, BS as usize)).expect("overwrite in place");
    pool.write(0, 2 * BS, &fill(4, 100)).expect("allocate");
    assert!(!data.lock().pending.is_empty(), "the data writes are not synced yet");
    drop(pool);
    let mut p = reopen_after_crash(&meta, &data);
    let mut buf = vec![0u8; (3 * BS) as usize];
    p.read(0, 0, &mut buf).expect("read");
    let mut want = fill(1, BS as usize);
    want.resize((3 * BS) as usize, 0);
    assert!(buf == want, "the pool holds the last commit without the unsynced writes");
}

#[test]
fn a_read_only_pool_refuses_changes_and_writes_nothing() {
    let (pool, meta, data) = crash_pool();
    drop(pool);
    let mut p = Pool::open_with(meta.clone(), data.clone(), PoolOpen { read_only: true }).expect("open");
    assert!(matches!(p.write(0, 0, &[1; 10]), Err(PoolError::ReadOnly)));
    assert!(matches!(p.write(7, 0, &[]), Err(PoolError::ReadOnly)));
    assert!(matches!(p.discard(0, 0, BS), Err(PoolError::ReadOnly)));
    assert!(matches!(p.write_zeroes(0, 0, BS, true), Err(PoolError::ReadOnly)));
    let raw = p.data_storage();
    assert!(raw.write_at(&[1], 0).is_err(), "the data handle of a read-only pool is read-only too");
    p.commit().expect("a read-only commit does nothing");
    assert!(meta.lock().pending.is_empty() && data.lock().pending.is_empty());
}

/// Allocation runs as (length, mapped) pairs.
fn runs(r: Vec<thinpool::pool::AllocRun>) -> Vec<(u64, bool)> {
    r.into_iter().map(|r| (r.len, r.mapped)).collect()
}
