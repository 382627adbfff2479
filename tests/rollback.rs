//! Rollback under a model: random creates, snapshots, deletes, writes, discards,
//! commits, reopens and rollbacks; after every step each device reads back as the
//! model says and every reference count equals a recount from the trees (no leak,
//! no double count); after every commit Debian's `thin_check` and the strict checker
//! accept the metadata. And: the blocks only the rolled-back device held are free
//! after the commit.

use std::collections::BTreeMap;

mod common;

use proptest::prelude::*;
use thinpool::pool::Pool;

const BS: u64 = 64 * 1024;
const DEV_BLOCKS: u64 = 600;
const STAMP: usize = 16;

#[derive(Debug, Clone)]
enum Op {
    Create,
    Snapshot(usize),
    Delete(usize),
    Write { dev: usize, start: u64, count: u64, stride: u64, seed: u8 },
    Discard { dev: usize, start: u64, count: u64 },
    Rollback { dev: usize, snap: usize },
    Commit,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Create),
        3 => any::<usize>().prop_map(Op::Snapshot),
        1 => any::<usize>().prop_map(Op::Delete),
        6 => (any::<usize>(), 0..DEV_BLOCKS, 1u64..300, 1u64..4, any::<u8>())
            .prop_map(|(dev, start, count, stride, seed)| Op::Write { dev, start, count, stride, seed }),
        2 => (any::<usize>(), 0..DEV_BLOCKS, 1u64..200).prop_map(|(dev, start, count)| Op::Discard { dev, start, count }),
        4 => (any::<usize>(), any::<usize>()).prop_map(|(dev, snap)| Op::Rollback { dev, snap }),
        2 => Just(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

type Model = BTreeMap<u32, Vec<[u8; STAMP]>>;

fn pick(model: &Model, i: usize) -> Option<u32> {
    (!model.is_empty()).then(|| *model.keys().nth(i % model.len()).expect("key"))
}

fn stamp(seed: u8, block: u64) -> [u8; STAMP] {
    let mut s = [seed | 1; STAMP];
    s[..8].copy_from_slice(&block.to_le_bytes());
    s
}

fn verify(pool: &mut Pool, model: &Model, id: u32) -> Result<(), TestCaseError> {
    for (b, want) in model[&id].iter().enumerate() {
        let mut got = [0u8; STAMP];
        pool.read(id, b as u64 * BS, &mut got).expect("read");
        prop_assert_eq!(&got, want, "device {} block {}", id, b);
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 8 << 20, 8000 * BS);
    let mut pool = Pool::create(m, d, (BS / 512) as u32).expect("create");
    let mut model: Model = BTreeMap::new();
    let mut next_id = 0u64;
    for op in ops {
        let mut touched = Vec::new();
        match op {
            Op::Create => {
                if model.len() >= 5 {
                    continue;
                }
                pool.create_thin(next_id).expect("create");
                model.insert(next_id as u32, vec![[0; STAMP]; DEV_BLOCKS as usize]);
                next_id += 1;
            }
            Op::Snapshot(i) => {
                let Some(origin) = pick(&model, i) else { continue };
                if model.len() >= 5 {
                    continue;
                }
                pool.create_snap(next_id, origin as u64).expect("snapshot");
                let copy = model[&origin].clone();
                model.insert(next_id as u32, copy);
                next_id += 1;
            }
            Op::Delete(i) => {
                let Some(id) = pick(&model, i) else { continue };
                pool.delete(id as u64).expect("delete");
                model.remove(&id);
            }
            Op::Write { dev, start, count, stride, seed } => {
                let Some(id) = pick(&model, dev) else { continue };
                for b in (start..DEV_BLOCKS).step_by(stride as usize).take(count as usize) {
                    let s = stamp(seed, b);
                    pool.write(id, b * BS, &s).map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
                    model.get_mut(&id).expect("dev")[b as usize] = s;
                }
                touched.push(id);
            }
            Op::Discard { dev, start, count } => {
                let Some(id) = pick(&model, dev) else { continue };
                let end = (start + count).min(DEV_BLOCKS);
                pool.discard(id, start * BS, (end - start) * BS).expect("discard");
                for b in start..end {
                    model.get_mut(&id).expect("dev")[b as usize] = [0; STAMP];
                }
                touched.push(id);
            }
            Op::Rollback { dev, snap } => {
                let (Some(id), Some(s)) = (pick(&model, dev), pick(&model, snap)) else { continue };
                if id == s {
                    prop_assert!(pool.rollback(id, s).is_err(), "a rollback to itself is refused");
                    continue;
                }
                pool.rollback(id, s).map_err(|e| TestCaseError::fail(format!("rollback: {e}")))?;
                let copy = model[&s].clone();
                model.insert(id, copy);
                prop_assert_eq!(
                    pool.meta().device_info(id).expect("info").mapped_blocks,
                    pool.meta().device_info(s).expect("info").mapped_blocks
                );
                prop_assert!(pool.diff(s, id).expect("diff").is_empty(), "the device maps what the snapshot maps");
                touched.extend([id, s]);
            }
            Op::Commit => {
                pool.commit().expect("commit");
                common::checks(&dir.path().join("metadata")).map_err(TestCaseError::fail)?;
            }
            Op::Reopen => {
                pool.commit().expect("commit");
                drop(pool);
                pool = common::open_pool(dir.path(), false);
                touched.extend(model.keys().copied());
            }
        }
        for id in touched {
            if model.contains_key(&id) {
                verify(&mut pool, &model, id)?;
            }
        }
        thinpool::check::audit(pool.metadata_mut()).map_err(TestCaseError::fail)?;
    }
    // Writes after the last rollbacks did not leak into the devices sharing blocks.
    let ids: Vec<u32> = model.keys().copied().collect();
    for id in ids {
        verify(&mut pool, &model, id)?;
    }
    pool.commit().expect("commit");
    common::checks(&dir.path().join("metadata")).map_err(TestCaseError::fail)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn rollback_matches_the_model_and_keeps_exact_reference_counts(ops in proptest::collection::vec(op(), 1..28)) {
        run(ops)?;
    }
}

#[test]
fn the_blocks_only_the_device_held_are_free_after_the_commit() {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 8 << 20, 4096 * BS);
    let mut pool = Pool::create(m, d, (BS / 512) as u32).expect("create");
    pool.create_thin(0).expect("create");
    for b in 0..500u64 {
        pool.write(0, b * BS, &stamp(1, b)).expect("write");
    }
    pool.create_snap(1, 0).expect("snap");
    // 167 blocks rewritten (copied) and 33 new ones: 200 blocks only device 0 holds.
    for b in (0..600u64).step_by(3) {
        pool.write(0, b * BS, &stamp(2, b)).expect("write");
    }
    pool.commit().expect("commit");
    let used = pool.meta().status().data_used_blocks;
    assert_eq!(used, 700);
    let exclusive: Vec<u64> = pool
        .mappings(0, 0, u64::MAX)
        .expect("mappings")
        .iter()
        .filter(|m| pool.meta().data_ref_count(m.data_block) == 1)
        .map(|m| m.data_block)
        .collect();
    assert_eq!(exclusive.len(), 200);
    pool.rollback(0, 1).expect("rollback");
    // Not reusable before the commit that freed them, free after it.
    pool.commit().expect("commit");
    assert_eq!(pool.meta().status().data_used_blocks, 500);
    assert!(exclusive.iter().all(|&b| pool.meta().data_ref_count(b) == 0));
    thinpool::check::audit(pool.metadata_mut()).expect("exact counts");
    common::checks(&dir.path().join("metadata")).expect("checks");
    // Both now share every block; a write to either copies it first.
    pool.write(0, 0, &stamp(3, 0)).expect("write");
    let mut got = [0u8; STAMP];
    pool.read(1, 0, &mut got).expect("read");
    assert_eq!(got, stamp(1, 0), "the snapshot kept its block");
    assert_eq!(pool.diff(1, 0).expect("diff").len(), 1);
    assert!(pool.rollback(0, 0).is_err());
    assert!(pool.rollback(0, 9).is_err());
}
