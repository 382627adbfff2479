//! A full metadata area is a clear error for what needs new metadata, never a
//! poisoned pool: reads, writes to mapped blocks, flushes, discards and deletes keep
//! working, and allocation resumes once space is freed.

mod common;

use thinpool::error::{MetaError, PoolError};
use thinpool::pool::Pool;
use thinpool::server::service::Service;
use thinpool::thin::PoolMode;

const BS: u64 = 64 * 1024;

#[test]
fn metadata_exhaustion_refuses_only_what_needs_new_metadata_and_recovers() {
    let dir = tempfile::tempdir().expect("tmp");
    // 64 metadata blocks (256 KiB), plenty of data.
    let (m, d) = common::pool_files(dir.path(), 64 * 4096, 4096 * BS);
    let mut p = Pool::create(m, d, (BS / 512) as u32).expect("pool");
    // The metadata file may not grow by itself here.
    p.set_metadata_max_bytes(0);
    p.create_thin(0).expect("thin");
    // A device never snapshotted: its mapped blocks stay unshared.
    p.create_thin(1000).expect("thin");
    p.write(1000, 0, &[1u8; 4096]).expect("first write");
    p.commit().expect("commit");
    let svc = Service::new(p);
    // Scattered writes and snapshots until metadata runs out.
    let mut full = None;
    let mut next_id = 1u64; // snapshots 1, 2, ... of device 0
    'fill: for round in 0..400u64 {
        for i in 0..16u64 {
            let vb = 1 + (round * 7919 + i * 104_729) % 3998;
            match svc.write(0, vb * BS, &[2u8; 512]) {
                Ok(()) => {}
                Err(e) => {
                    full = Some(e);
                    break 'fill;
                }
            }
        }
        if round % 3 == 0 {
            match svc.with_pool(|p| p.create_snap(next_id, 0)) {
                Ok(()) => next_id += 1,
                Err(e) => {
                    full = Some(e);
                    break 'fill;
                }
            }
        }
        svc.flush().expect("flush while filling");
    }
    let e = full.expect("metadata filled up");
    assert!(matches!(e, PoolError::Meta(MetaError::NoMetadataSpace { .. })), "the refusal names metadata space: {e}");
    assert!(e.is_no_space(), "clients get ENOSPC");
    assert_eq!(svc.with_pool(|p| p.meta().status().mode), PoolMode::OutOfMetadataSpace);

    // What needs no new metadata keeps working.
    let mut buf = vec![0u8; 4096];
    svc.read(1000, 0, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 1));
    svc.write(1000, 0, &[3u8; 4096]).expect("write to a mapped unshared block");
    svc.flush().expect("flush when full");
    svc.read(1000, 0, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 3));
    // Deletes free space; the snapshots go, then allocation resumes.
    for id in 1..next_id {
        svc.delete(id as u32).expect("delete when full");
    }
    svc.flush().expect("flush");
    assert_eq!(svc.with_pool(|p| p.meta().status().mode), PoolMode::ReadWrite);
    svc.write(0, 3999 * BS, &[4u8; 4096]).expect("allocation resumes");
    svc.discard(0, 3999 * BS, BS).expect("discard");
    svc.flush().expect("flush");
    drop(svc);
    common::assert_checks_pass(&dir.path().join("metadata"));
}

fn full_service(blocks: u64) -> (tempfile::TempDir, std::sync::Arc<Service>) {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 1 << 20, blocks * BS);
    let mut p = Pool::create(m, d, (BS / 512) as u32).expect("pool");
    p.create_thin(0).expect("thin");
    for b in 0..blocks {
        p.write(0, b * BS, &[5u8; 512]).expect("fill");
    }
    p.commit().expect("commit");
    (dir, Service::new(p))
}

#[test]
fn a_write_queued_on_a_full_pool_completes_when_a_discard_frees_a_block() {
    use std::time::{Duration, Instant};
    use thinpool::server::service::NoSpacePolicy;
    let (_dir, svc) = full_service(4);
    svc.set_no_space_policy(NoSpacePolicy::Queue(Duration::from_secs(20)));
    let writer = {
        let svc = std::sync::Arc::clone(&svc);
        std::thread::spawn(move || {
            let t = Instant::now();
            svc.write(0, 10 * BS, &[6u8; 512]).map(|()| t.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(!writer.is_finished(), "the write waits for space");
    svc.discard(0, 0, BS).expect("discard frees a block");
    let waited = writer.join().expect("writer").expect("the queued write completes");
    assert!(waited >= Duration::from_millis(250), "it waited ({waited:?})");
    let mut buf = vec![0u8; 512];
    svc.read(0, 10 * BS, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 6));
}

#[test]
fn a_queued_write_times_out_with_no_space_and_error_mode_fails_at_once() {
    use std::time::{Duration, Instant};
    use thinpool::server::service::NoSpacePolicy;
    let (_dir, svc) = full_service(4);
    svc.set_no_space_policy(NoSpacePolicy::Queue(Duration::from_millis(400)));
    let t = Instant::now();
    let e = svc.write(0, 10 * BS, &[6u8; 512]).expect_err("no space");
    assert!(matches!(e, PoolError::NoSpace { .. }), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(400), "it waited for the timeout");
    svc.set_no_space_policy(NoSpacePolicy::Error);
    let t = Instant::now();
    let e = svc.write(0, 11 * BS, &[6u8; 512]).expect_err("no space");
    assert!(matches!(e, PoolError::NoSpace { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_millis(400), "error mode does not wait");
    // Everything that needs no new block still works.
    svc.write(0, 0, &[7u8; 512]).expect("in-place write");
    svc.flush().expect("flush");
}

#[test]
fn metadata_grows_by_itself_before_it_runs_short() {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 64 * 4096, 4096 * BS);
    let mut p = Pool::create(m, d, (BS / 512) as u32).expect("pool");
    p.create_thin(0).expect("thin");
    p.commit().expect("commit");
    let svc = Service::new(p);
    for round in 0..60u64 {
        for i in 0..16u64 {
            let vb = (round * 7919 + i * 104_729) % 4000;
            svc.write(0, vb * BS, &[2u8; 512]).expect("write: metadata grows instead of running out");
        }
        if round % 3 == 0 {
            svc.with_pool(|p| p.create_snap(1 + round, 0)).expect("snapshot");
        }
        svc.flush().expect("flush");
    }
    let st = svc.with_pool(|p| p.meta().status());
    assert!(st.metadata_total_blocks > 64, "the metadata space map grew ({} blocks)", st.metadata_total_blocks);
    drop(svc);
    let len = std::fs::metadata(dir.path().join("metadata")).expect("stat").len();
    assert_eq!(len, st.metadata_total_blocks * 4096, "the file grew with it");
    common::assert_checks_pass(&dir.path().join("metadata"));
}

#[test]
fn a_served_pool_grows_online_and_the_next_write_uses_the_new_space() {
    use thinpool::server::service::NoSpacePolicy;
    let (dir, svc) = full_service(4);
    svc.set_no_space_policy(NoSpacePolicy::Error);
    assert!(svc.write(0, 10 * BS, &[6u8; 512]).expect_err("full").is_no_space());
    svc.with_pool(|p| p.extend(Some(8 * BS), Some(2 << 20))).expect("extend");
    svc.write(0, 10 * BS, &[6u8; 512]).expect("the new space is usable at once");
    let e = svc.with_pool(|p| p.extend(Some(2 * BS), None)).expect_err("no shrinking");
    assert!(e.to_string().contains("cannot shrink"), "{e}");
    svc.flush().expect("flush");
    let st = svc.with_pool(|p| p.meta().status());
    assert_eq!(st.data_total_blocks, 8);
    assert_eq!(st.metadata_total_blocks, 512);
    drop(svc);
    assert_eq!(std::fs::metadata(dir.path().join("data")).expect("stat").len(), 8 * BS);
    common::assert_checks_pass(&dir.path().join("metadata"));
}

#[test]
fn a_threshold_runs_its_command_once_per_crossing_and_autoextend_grows_the_data() {
    use thinpool::server::health::{check, Crossings, HealthPolicy, LiveSettings};
    use thinpool::volume::{HealthChange, HealthOptions, Setting};
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 1 << 20, 10 * BS);
    let mut p = Pool::create(m, d, (BS / 512) as u32).expect("pool");
    p.create_thin(0).expect("thin");
    let svc = Service::new(p);
    let log = dir.path().join("crossings");
    let policy = HealthPolicy {
        pool_dir: dir.path().to_path_buf(),
        on_threshold: Some(format!("echo \"$THINPOOL_KIND $THINPOOL_PERCENT\" >> {}", log.display())),
        settings: LiveSettings::new(HealthOptions { data_threshold: Some(50), ..Default::default() }),
    };
    let mut state = Crossings::default();
    let lines = || {
        // The command runs in the background: give it a moment.
        for _ in 0..100 {
            if let Ok(s) = std::fs::read_to_string(&log) {
                return s.lines().map(str::to_string).collect::<Vec<_>>();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Vec::new()
    };
    check(&svc, &policy, &mut state);
    assert!(!log.exists(), "below the threshold nothing runs");
    for b in 0..6 {
        svc.write(0, b * BS, &[1u8; 512]).expect("fill");
    }
    check(&svc, &policy, &mut state);
    check(&svc, &policy, &mut state);
    assert_eq!(lines(), ["data 60"], "once per crossing");
    svc.discard(0, 0, 6 * BS).expect("discard");
    svc.flush().expect("flush");
    check(&svc, &policy, &mut state);
    for b in 0..7 {
        svc.write(0, b * BS, &[1u8; 512]).expect("fill again");
    }
    check(&svc, &policy, &mut state);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(lines(), ["data 60", "data 70"], "a second crossing after falling below");

    // Autoextend, switched on while the monitor runs (as `thinctl pool set` does on a
    // served pool): crossing the threshold grows the data by half, up to 16 blocks.
    let policy = HealthPolicy { on_threshold: None, ..policy };
    let change = HealthChange {
        autoextend_percent: Some(Setting::To(50)),
        autoextend_max_bytes: Some(Setting::To(16 * BS)),
        ..Default::default()
    };
    policy.settings.apply(&change, &svc).expect("apply");
    let mut state = Crossings::default();
    check(&svc, &policy, &mut state);
    assert_eq!(svc.status().data_total_blocks, 15, "10 blocks grown by half");
    for b in 7..12 {
        svc.write(0, b * BS, &[1u8; 512]).expect("fill the new space");
    }
    check(&svc, &policy, &mut state);
    assert_eq!(svc.status().data_total_blocks, 16, "capped at the maximum");

    // A metadata threshold set later is watched too (the two kinds share one check).
    // First settle the data threshold: autoextend is at its maximum, so use stays
    // above it from here on and it does not fire again.
    check(&svc, &policy, &mut state);
    let log2 = dir.path().join("meta-crossings");
    let policy =
        HealthPolicy { on_threshold: Some(format!("echo \"$THINPOOL_KIND\" >> {}", log2.display())), ..policy };
    let change = HealthChange { metadata_threshold: Some(Setting::To(1)), ..Default::default() };
    policy.settings.apply(&change, &svc).expect("apply");
    check(&svc, &policy, &mut state);
    check(&svc, &policy, &mut state);
    for _ in 0..100 {
        if std::fs::read_to_string(&log2).is_ok_and(|s| !s.is_empty()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let got: Vec<String> = std::fs::read_to_string(&log2).expect("log").lines().map(str::to_string).collect();
    assert_eq!(got, ["metadata"], "the metadata threshold ran its command once");
    let bad = HealthChange { data_threshold: Some(Setting::To(0)), ..Default::default() };
    assert!(policy.settings.apply(&bad, &svc).is_err(), "0% is refused");
    assert_eq!(policy.settings.get().data_threshold, Some(50), "a refused change changes nothing");
    drop(svc);
    common::assert_checks_pass(&dir.path().join("metadata"));
}

#[test]
fn the_data_shrinks_when_the_tail_is_unused_and_is_refused_otherwise() {
    let dir = tempfile::tempdir().expect("tmp");
    // 40,000 blocks: three data bitmaps; the shrink drops two of them.
    let (m, d) = common::pool_files(dir.path(), 4 << 20, 40_000 * BS);
    let mut p = Pool::create(m, d, (BS / 512) as u32).expect("pool");
    p.create_thin(0).expect("thin");
    for vb in 0..20u64 {
        p.write(0, vb * BS, &[vb as u8 + 1; 4096]).expect("write");
    }
    p.create_snap(1, 0).expect("snap");
    p.commit().expect("commit");
    // A block in use past the new end refuses the shrink and changes nothing.
    let e = p.extend(Some(10 * BS), None).expect_err("blocks 10..20 are in use");
    assert!(e.to_string().contains("data block 10 past the new end is in use"), "{e}");
    assert_eq!(p.meta().status().data_total_blocks, 40_000);
    p.extend(Some(10_000 * BS), None).expect("shrink to one bitmap");
    assert_eq!(p.meta().status().data_total_blocks, 10_000);
    drop(p);
    assert_eq!(std::fs::metadata(dir.path().join("data")).expect("stat").len(), 10_000 * BS);
    common::assert_checks_pass(&dir.path().join("metadata"));
    // Reopened: the smaller size holds (the file is not taken up again), data intact,
    // and the pool grows again past the old end.
    let mut p = common::open_pool(dir.path(), false);
    assert_eq!(p.meta().status().data_total_blocks, 10_000);
    let mut buf = vec![0u8; 4096];
    for dev in [0u32, 1] {
        for vb in 0..20u64 {
            p.read(dev, vb * BS, &mut buf).expect("read");
            assert!(buf.iter().all(|&b| b == vb as u8 + 1), "device {dev} block {vb}");
        }
    }
    // Free the tail: delete the origin, the snapshot keeps the blocks; delete it too.
    p.delete(0).expect("delete");
    p.delete(1).expect("delete");
    p.extend(Some(3 * BS), None).expect("every block is free now: shrink uncommitted frees");
    assert_eq!(p.meta().status().data_total_blocks, 3);
    p.extend(Some(50_000 * BS), None).expect("grow again");
    p.create_thin(2).expect("thin");
    p.write(2, 0, &[9u8; 4096]).expect("write");
    p.commit().expect("commit");
    drop(p);
    common::assert_checks_pass(&dir.path().join("metadata"));
}
