//! Pools the Linux kernel wrote (tests/data/kernel, Debian 6.1 dm-thin) open in
//! thinpool and read back the bytes the kernel read; the strict checker accepts them
//! and agrees with the kernel's numbers; changes thinpool makes to them keep both
//! Debian's thin_check and the strict checker happy, and the untouched devices read
//! back unchanged.

mod common;

use std::fs::OpenOptions;

use sha2::{Digest, Sha256};
use thinpool::check;
use thinpool::io::FileStorage;
use thinpool::pool::{OpenOptions as PoolOpen, Pool};

fn device_sha256(p: &mut Pool, id: u32, size: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        p.read(id, off, &mut buf[..n]).expect("read");
        h.update(&buf[..n]);
        off += n as u64;
    }
    format!("{:x}", h.finalize())
}

fn open(fx: &common::Fixture, read_only: bool) -> Pool {
    let m = OpenOptions::new().read(true).write(!read_only).open(&fx.metadata).expect("metadata");
    let d = OpenOptions::new().read(true).write(!read_only).open(&fx.data).expect("data");
    Pool::open(m, d, PoolOpen { read_only }).expect("kernel pool opens")
}

fn strict_check(path: &std::path::Path) -> check::CheckReport {
    let s = FileStorage::new(std::fs::File::open(path).expect("open")).expect("storage");
    check::check(&s).expect("check runs")
}

#[test]
fn every_kernel_pool_reads_back_the_bytes_the_kernel_read() {
    for name in common::fixture_names() {
        let fx = common::unpack_fixture(&name);
        let mut p = open(&fx, true);
        let devices = fx.manifest["devices"].as_array().expect("devices");
        assert_eq!(p.meta().device_ids().len(), devices.len(), "{name}");
        for dev in devices {
            let id = dev["dev_id"].as_u64().expect("id") as u32;
            let size = dev["size_bytes"].as_u64().expect("size");
            assert_eq!(device_sha256(&mut p, id, size), dev["sha256"].as_str().expect("sha"), "{name} device {id}");
            for r in dev["ranges"].as_array().into_iter().flatten() {
                let (off, len) = (r["offset"].as_u64().expect("off"), r["length"].as_u64().expect("len"));
                let mut buf = vec![0u8; len as usize];
                p.read(id, off, &mut buf).expect("read range");
                assert_eq!(
                    format!("{:x}", Sha256::digest(&buf)),
                    r["sha256"].as_str().expect("sha"),
                    "{name} device {id} range {off}+{len}"
                );
            }
        }
    }
}

#[test]
fn the_strict_checker_accepts_kernel_pools_and_agrees_with_the_kernel() {
    for name in common::fixture_names() {
        let fx = common::unpack_fixture(&name);
        let r = strict_check(&fx.metadata);
        assert!(r.is_clean(), "{name}: {:?}", r.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>());
        let m = &fx.manifest;
        assert_eq!(r.stats.transaction_id, m["pool"]["transaction_id"].as_u64().expect("txid"), "{name}");
        assert_eq!(r.stats.time as u64, m["pool"]["time"].as_u64().expect("time"), "{name}");
        assert_eq!(r.stats.data_blocks_in_use, m["pool"]["used_data_blocks"].as_u64().expect("used"), "{name}");
        let msm = &m["metadata_stats"]["metadata_space_map"];
        assert_eq!(r.stats.metadata_blocks_in_use, msm["blocks_in_use"].as_u64().expect("in use"), "{name}");
        for dev in m["devices"].as_array().expect("devices") {
            let id = dev["dev_id"].as_u64().expect("id");
            let s = r
                .stats
                .devices
                .iter()
                .find(|d| d.dev_id == id)
                .unwrap_or_else(|| panic!("{name}: device {id} missing"));
            assert_eq!(s.mapped_blocks, dev["mapped_blocks"].as_u64().expect("mapped"), "{name} device {id}");
            assert_eq!(
                s.details.creation_time as u64,
                dev["creation_time"].as_u64().expect("ctime"),
                "{name} device {id}"
            );
            assert_eq!(
                s.details.snapshotted_time as u64,
                dev["snap_time"].as_u64().expect("stime"),
                "{name} device {id}"
            );
            assert_eq!(s.highest_mapped, dev["highest_mapped_block"].as_u64(), "{name} device {id}");
        }
    }
}

#[test]
fn thinpool_changes_to_kernel_pools_pass_both_checkers_and_spare_other_devices() {
    for name in common::fixture_names() {
        let fx = common::unpack_fixture(&name);
        let devices = fx.manifest["devices"].as_array().expect("devices").clone();
        let mut p = open(&fx, false);
        let ids = p.meta().device_ids();
        let (first, last) = (ids[0], *ids.last().expect("a device"));
        let bs = p.block_bytes();
        p.write(first, 12_345, &vec![0x5a; 300_000]).expect("write");
        p.create_snap(last as u64 + 1, first as u64).expect("snapshot");
        p.write(first, 0, &vec![0xc3; (bs + 7) as usize]).expect("write over shared");
        p.discard(last + 1, 0, 4 * bs).expect("discard");
        p.metadata_mut().reserve_metadata_snap(&mut || Ok(())).expect("hold");
        p.write(first, 8 * bs, &vec![1; bs as usize]).expect("write under a held snapshot");
        p.commit().expect("commit");
        let (ok, out) = common::thin_check(&fx.metadata);
        assert!(ok, "{name}: thin_check: {out}");
        let r = strict_check(&fx.metadata);
        assert!(r.is_clean(), "{name}: {:?}", r.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>());
        p.metadata_mut().release_metadata_snap(&mut || Ok(())).expect("release");
        drop(p);
        let r = strict_check(&fx.metadata);
        assert!(
            r.is_clean(),
            "{name} after release: {:?}",
            r.problems.iter().map(|p| p.to_string()).collect::<Vec<_>>()
        );
        let mut p = open(&fx, true);
        for dev in &devices {
            let id = dev["dev_id"].as_u64().expect("id") as u32;
            if id == first {
                continue;
            }
            let size = dev["size_bytes"].as_u64().expect("size");
            assert_eq!(
                device_sha256(&mut p, id, size),
                dev["sha256"].as_str().expect("sha"),
                "{name} device {id} changed"
            );
        }
    }
}
