//! The serving core under concurrency: many threads writing, reading, discarding,
//! snapshotting and flushing on overlapping blocks, checked against a model and by
//! both checkers; and the commit/data ordering rule under crashes at every sync with
//! concurrent writers.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thinpool::io::{CrashImage, CrashStorage};
use thinpool::pool::{OpenOptions, Pool};
use thinpool::server::service::Service;

const BS: u64 = 64 * 1024;
const SUB: u64 = 4096;

/// The bytes thread `t` writes in its sub-range of block `vb` for its write `seq`:
/// every 8 bytes say who and when, so a misplaced or torn piece shows.
fn pattern(dev: u32, t: u64, vb: u64, seq: u64, len: usize) -> Vec<u8> {
    let word = (u64::from(dev) << 56) | (t << 48) | (vb << 24) | seq;
    word.to_le_bytes().iter().copied().cycle().take(len).collect()
}

/// Decode a sub-range: `None` for zeros, `Some(seq)` for a whole, consistent pattern
/// of (dev, t, vb); a panic for anything else.
fn decode(bytes: &[u8], dev: u32, t: u64, vb: u64, what: &str) -> Option<u64> {
    if bytes.iter().all(|&b| b == 0) {
        return None;
    }
    let word = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let seq = word & 0xFF_FFFF;
    assert_eq!(bytes, &pattern(dev, t, vb, seq, bytes.len())[..], "{what}: torn or foreign bytes in block {vb}");
    Some(seq)
}

fn files(dir: &std::path::Path, data_blocks: u64) -> (std::fs::File, std::fs::File) {
    common::pool_files(dir, 4 << 20, data_blocks * BS)
}

/// Writers share every block (each owns one 4 KiB sub-range of it, so the final
/// bytes are known), a discarder works on blocks of its own, a snapshotter takes
/// live snapshots that must each hold a state between what was acknowledged before
/// it and what was started after it, and flushers commit all along.
#[test]
fn many_threads_on_overlapping_blocks_agree_with_the_model_and_both_checkers() {
    const WRITERS: u64 = 4;
    const BLOCKS: u64 = 24;
    const ROUNDS: u64 = 300;
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = files(dir.path(), 1024);
    let mut pool = Pool::create(m, d, (BS / 512) as u32).expect("pool");
    pool.create_thin(0).expect("thin");
    pool.create_thin(1).expect("thin");
    pool.commit().expect("commit");
    let svc = Service::new(pool);
    let started: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    // Per writer, per write: which block it went to.
    let logs: Arc<Mutex<Vec<Vec<u64>>>> = Arc::new(Mutex::new(vec![Vec::new(); WRITERS as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for t in 0..WRITERS {
        let (svc, started, acked, logs) =
            (Arc::clone(&svc), Arc::clone(&started), Arc::clone(&acked), Arc::clone(&logs));
        handles.push(std::thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
            for seq in 1..=ROUNDS {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let vb = x % BLOCKS;
                logs.lock().expect("log")[t as usize].push(vb);
                started[t as usize].store(seq, Ordering::SeqCst);
                svc.write(0, vb * BS + t * SUB, &pattern(0, t, vb, seq, SUB as usize)).expect("write");
                acked[t as usize].store(seq, Ordering::SeqCst);
                if seq % 37 == 0 {
                    svc.flush().expect("flush");
                }
                let mut buf = vec![0u8; SUB as usize];
                svc.read(0, vb * BS + t * SUB, &mut buf).expect("read");
                assert_eq!(decode(&buf, 0, t, vb, "read back"), Some(seq), "a thread reads its own write");
            }
        }));
    }
    // Device 1: whole-block writes and discards by one thread, on its own blocks.
    let discarder = {
        let (svc, stop) = (Arc::clone(&svc), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut model: HashMap<u64, u64> = HashMap::new();
            let mut seq = 0;
            while !stop.load(Ordering::SeqCst) || seq < 200 {
                seq += 1;
                let vb = (seq * 7) % 16;
                if seq % 3 == 0 {
                    svc.discard(1, vb * BS, BS).expect("discard");
                    model.remove(&vb);
                } else {
                    svc.write(1, vb * BS, &pattern(1, 9, vb, seq, BS as usize)).expect("write 1");
                    model.insert(vb, seq);
                }
            }
            model
        })
    };
    // Live snapshots of device 0, each checked against the acknowledgement counters.
    let mut snaps = Vec::new();
    for i in 0..6u64 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        let id = 10 + i;
        svc.with_pool(|p| p.create_snap(id, 0)).expect("snapshot");
        let after: Vec<u64> = started.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        snaps.push((id, before, after));
    }
    for h in handles {
        h.join().expect("writer");
    }
    stop.store(true, Ordering::SeqCst);
    let dev1 = discarder.join().expect("discarder");
    svc.flush().expect("final flush");

    let logs = logs.lock().expect("logs").clone();
    // The last write of each writer to each block, and the block of every write.
    let last = |t: usize, upto: u64| -> HashMap<u64, u64> {
        let mut m = HashMap::new();
        for (i, &vb) in logs[t].iter().enumerate().take(upto as usize) {
            m.insert(vb, i as u64 + 1);
        }
        m
    };
    let check_dev0 = |read: &dyn Fn(u64, &mut [u8]), what: &str| {
        for t in 0..WRITERS {
            let want = last(t as usize, ROUNDS);
            for vb in 0..BLOCKS {
                let mut buf = vec![0u8; SUB as usize];
                read(vb * BS + t * SUB, &mut buf);
                assert_eq!(decode(&buf, 0, t, vb, what), want.get(&vb).copied(), "{what}: writer {t} block {vb}");
            }
        }
    };
    check_dev0(&|off, buf| svc.read(0, off, buf).expect("read"), "live");
    for (id, before, after) in &snaps {
        for t in 0..WRITERS as usize {
            for vb in 0..BLOCKS {
                let mut buf = vec![0u8; SUB as usize];
                svc.read(*id as u32, vb * BS + t as u64 * SUB, &mut buf).expect("read snapshot");
                let got = decode(&buf, 0, t as u64, vb, "snapshot");
                let lo = last(t, before[t]).get(&vb).copied();
                let hi = last(t, after[t]).get(&vb).copied();
                match (got, lo, hi) {
                    (g, l, _) if g == l => {}
                    (Some(g), l, Some(h)) if g > l.unwrap_or(0) && g <= h && logs[t][g as usize - 1] == vb => {}
                    _ => panic!(
                        "snapshot {id}, writer {t}, block {vb}: holds {got:?}, acknowledged {lo:?}, started {hi:?}"
                    ),
                }
            }
        }
    }
    let check_dev1 = |read: &dyn Fn(u64, &mut [u8])| {
        for vb in 0..16 {
            let mut buf = vec![0u8; BS as usize];
            read(vb * BS, &mut buf);
            assert_eq!(decode(&buf, 1, 9, vb, "device 1"), dev1.get(&vb).copied(), "device 1 block {vb}");
        }
    };
    check_dev1(&|off, buf| svc.read(1, off, buf).expect("read 1"));
    drop(svc);

    let mpath = dir.path().join("metadata");
    common::assert_checks_pass(&mpath);
    let reopened = Service::new(common::open_pool(dir.path(), true));
    check_dev0(&|off, buf| reopened.read(0, off, buf).expect("read"), "reopened");
    check_dev1(&|off, buf| reopened.read(1, off, buf).expect("read"));
}

/// Run concurrent writers of whole blocks (fresh, copy-on-write after snapshots,
/// and in place) with flushes until the storage fails at one sync; then crash
/// (everything not synced is lost) and check the image.
fn crash_run(fail_data_sync: Option<u64>, fail_meta_sync: Option<u64>, presync: bool) -> (u64, u64) {
    let data = CrashStorage::with_len(96 * BS);
    let meta = CrashStorage::new(512);
    let mut pool = Pool::create_with(meta.clone(), data.clone(), (BS / 512) as u32).expect("pool");
    pool.create_thin(0).expect("thin");
    pool.create_thin(1).expect("thin");
    pool.commit().expect("commit");
    data.lock().faults.fail_at_sync = fail_data_sync.map(|n| n + data.lock().faults.syncs);
    meta.lock().faults.fail_at_sync = fail_meta_sync.map(|n| n + meta.lock().faults.syncs);
    let (d0, m0) = (data.lock().faults.syncs, meta.lock().faults.syncs);
    let svc = Service::new(pool);
    if presync {
        svc.set_presync_bytes(0);
    }
    let mut handles = Vec::new();
    for dev in 0..2u32 {
        let svc = Arc::clone(&svc);
        handles.push(std::thread::spawn(move || {
            for seq in 1..=40u64 {
                let vb = (seq * 5 + u64::from(dev)) % 20;
                if svc.write(dev, vb * BS, &pattern(dev, 0, vb, seq, BS as usize)).is_err() {
                    return;
                }
                if seq % 4 == 0 && svc.flush().is_err() {
                    return;
                }
            }
        }));
    }
    for i in 0..3u64 {
        std::thread::sleep(std::time::Duration::from_millis(2));
        let _ = svc.with_pool(|p| p.create_snap(10 + i, 0));
    }
    for h in handles {
        h.join().expect("writer");
    }
    let _ = svc.flush();
    drop(svc);
    let syncs = (data.lock().faults.syncs - d0, meta.lock().faults.syncs - m0);
    // Power off: what was not synced is gone.
    let crash = |img: &mut CrashImage| img.crash();
    crash(&mut data.lock());
    crash(&mut meta.lock());
    let mut p = Pool::open_with(meta.clone(), data.clone(), OpenOptions { read_only: true }).expect("open after crash");
    let report = thinpool::check::check(&meta).expect("check runs");
    assert!(report.is_clean(), "strict checker after a crash: {report:?}");
    for dev in p.meta().device_ids() {
        for m in p.mappings(dev, 0, u64::MAX).expect("mappings") {
            let mut buf = vec![0u8; BS as usize];
            p.read(dev, m.vblock * BS, &mut buf).expect("read");
            let owner = if dev >= 10 { 0 } else { dev };
            let got = decode(&buf, owner, 0, m.vblock, "after crash");
            assert!(got.is_some(), "device {dev} maps block {} but its data never reached the disk", m.vblock);
        }
    }
    syncs
}

#[test]
fn a_commit_never_records_a_mapping_whose_data_is_not_durable_at_any_crash() {
    // A run without failures counts the syncs; then fail at each one in turn. Then
    // the same with every commit pre-syncing the data while writes still provision
    // blocks, and syncing again behind its barrier.
    for presync in [false, true] {
        let (data_syncs, meta_syncs) = crash_run(None, None, presync);
        assert!(
            data_syncs > 3 && meta_syncs > 3,
            "the scenario commits ({data_syncs} data, {meta_syncs} metadata syncs)"
        );
        if presync {
            assert!(data_syncs > meta_syncs, "commits pre-sync ({data_syncs} data, {meta_syncs} metadata syncs)");
        }
        for n in 0..data_syncs + 1 {
            crash_run(Some(n), None, presync);
        }
        for n in 0..meta_syncs {
            crash_run(None, Some(n), presync);
        }
    }
}

#[test]
fn concurrent_writers_sharing_blocks_leave_files_both_checkers_accept() {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = files(dir.path(), 256);
    let mut pool = Pool::create(m, d, (BS / 512) as u32).expect("pool");
    pool.create_thin(0).expect("thin");
    let svc = Service::new(pool);
    let hs: Vec<_> = (0..4u64)
        .map(|t| {
            let svc = Arc::clone(&svc);
            std::thread::spawn(move || {
                for seq in 1..=64u64 {
                    let vb = (seq * 3 + t) % 48;
                    svc.write(0, vb * BS + t * SUB, &pattern(0, t, vb, seq, SUB as usize)).expect("write");
                    if seq % 16 == 0 {
                        svc.flush().expect("flush");
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().expect("writer");
    }
    svc.flush().expect("flush");
    drop(svc);
    common::assert_checks_pass(&dir.path().join("metadata"));
}
