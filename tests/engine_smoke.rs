//! End-to-end engine checks over real files, judged by Debian's thin_check and the
//! strict checker.

mod common;

use std::path::Path;

use thinpool::pool::Pool;

fn files(dir: &Path, meta_mib: u64, data_mib: u64) -> (std::fs::File, std::fs::File) {
    common::pool_files(dir, meta_mib << 20, data_mib << 20)
}

fn reopen(dir: &Path) -> Pool {
    common::open_pool(dir, false)
}

fn thin_check(path: &Path) {
    common::assert_checks_pass(path);
}

fn pattern(dev: u32, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((off + i) as u8) ^ (dev as u8).wrapping_mul(31) ^ (((off + i) >> 9) as u8)).collect()
}

#[test]
fn written_snapshotted_and_reopened_pool_reads_back_and_passes_thin_check() {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = files(dir.path(), 8, 256);
    let mut p = Pool::create(m, d, 128).expect("create");
    p.create_thin(0).expect("thin");
    let a = pattern(0, 0, 3 << 20);
    p.write(0, 4096, &a).expect("write");
    p.commit().expect("commit");
    p.create_snap(1, 0).expect("snap");
    let b = pattern(1, 0, 100_000);
    p.write(0, 70_000, &b).expect("write over shared");
    p.create_snap(2, 1).expect("snap of snap");
    p.discard(1, 0, 1 << 20).expect("discard");
    p.commit().expect("commit");
    drop(p);
    thin_check(&dir.path().join("metadata"));

    let mut p = reopen(dir.path());
    let mut got = vec![0u8; 4096 + a.len()];
    p.read(0, 0, &mut got).expect("read");
    let mut want = vec![0u8; 4096];
    want.extend_from_slice(&a);
    want[70_000..70_000 + b.len()].copy_from_slice(&b);
    assert!(got == want, "device 0 content differs");
    // Device 1 is the snapshot of the old device 0 with its first MiB discarded.
    let mut got1 = vec![0u8; 4096 + a.len()];
    p.read(1, 0, &mut got1).expect("read");
    let mut want1 = vec![0u8; 4096];
    want1.extend_from_slice(&a);
    want1[..1 << 20].fill(0);
    assert!(got1 == want1, "device 1 content differs");
    let mut got2 = vec![0u8; 4096 + a.len()];
    p.read(2, 0, &mut got2).expect("read");
    let mut want2 = vec![0u8; 4096];
    want2.extend_from_slice(&a);
    assert!(got2 == want2, "device 2 content differs");
    p.delete(0).expect("delete");
    p.delete(2).expect("delete");
    p.commit().expect("commit");
    drop(p);
    thin_check(&dir.path().join("metadata"));
}

#[test]
fn write_zeroes_unmaps_whole_blocks_and_extents_report_the_mapping() {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = files(dir.path(), 4, 64);
    let mut p = Pool::create(m, d, 128).expect("create");
    let bs = 65536u64;
    p.create_thin(0).expect("thin");
    p.write(0, 0, &vec![7u8; (4 * bs) as usize]).expect("write");
    assert_eq!(runs(p.extents(0, 0, 6 * bs).expect("extents")), vec![(4 * bs, true), (2 * bs, false)]);
    // Zero from the middle of block 0 to the middle of block 2: block 1 is unmapped,
    // blocks 0 and 2 stay mapped with zeros written.
    p.write_zeroes(0, bs / 2, 2 * bs, true).expect("zero");
    assert_eq!(runs(p.extents(0, 0, 4 * bs).expect("extents")), vec![(bs, true), (bs, false), (2 * bs, true)]);
    let mut buf = vec![1u8; (4 * bs) as usize];
    p.read(0, 0, &mut buf).expect("read");
    assert!(buf[..(bs / 2) as usize].iter().all(|&b| b == 7));
    assert!(buf[(bs / 2) as usize..(5 * bs / 2) as usize].iter().all(|&b| b == 0));
    assert!(buf[(5 * bs / 2) as usize..].iter().all(|&b| b == 7));
    // Without unmap, zeros are written and the range becomes mapped.
    p.write_zeroes(0, 4 * bs, bs, false).expect("zero");
    assert_eq!(runs(p.extents(0, 3 * bs, 3 * bs).expect("extents")), vec![(2 * bs, true), (bs, false)]);
    // Extents of a range inside one block.
    assert_eq!(runs(p.extents(0, bs + 10, 100).expect("extents")), vec![(100, false)]);
    p.commit().expect("commit");
    drop(p);
    thin_check(&dir.path().join("metadata"));
}

#[test]
fn longer_data_and_metadata_files_grow_the_pool_at_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = files(dir.path(), 1, 16);
    let mut p = Pool::create(m, d, 128).expect("create");
    p.create_thin(0).expect("thin");
    p.write(0, 0, &[5u8; 100_000]).expect("write");
    p.commit().expect("commit");
    let before = p.meta().status();
    assert_eq!((before.metadata_total_blocks, before.data_total_blocks), (256, 256));
    drop(p);
    // Grow the metadata file past one bitmap's worth (16320 blocks) and the data file.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("metadata"))
        .expect("m")
        .set_len(80 << 20)
        .expect("len");
    std::fs::OpenOptions::new().write(true).open(dir.path().join("data")).expect("d").set_len(64 << 20).expect("len");
    let mut p = reopen(dir.path());
    let after = p.meta().status();
    assert_eq!((after.metadata_total_blocks, after.data_total_blocks), (20480, 1024));
    let mut buf = vec![0u8; 100_000];
    p.read(0, 0, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 5));
    // The new space is usable.
    p.write(0, 40 << 20, &vec![6u8; 8 << 20]).expect("write into the new data blocks");
    p.commit().expect("commit");
    drop(p);
    thin_check(&dir.path().join("metadata"));
}

/// Allocation runs as (length, mapped) pairs.
fn runs(r: Vec<thinpool::pool::AllocRun>) -> Vec<(u64, bool)> {
    r.into_iter().map(|r| (r.len, r.mapped)).collect()
}
