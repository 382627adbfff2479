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
