//! The diff of two thin devices against a naive per-block comparison and a model.
//!
//! Random sequences of creates, snapshots, deletes, writes (scattered over enough
//! blocks that mapping trees grow several levels and share nodes at every level),
//! whole-block discards and commits. After every step, for every pair of devices:
//! - `Pool::diff` equals a naive comparison of both devices' full mapping lists
//!   (same data block, different, left only, right only; adjacent runs merged), with
//!   and without `Same` runs, and over a random range of blocks;
//! - against the model: every block whose bytes differ between the two devices is
//!   in a run that is not `Same`, and no block whose state both devices still share
//!   (neither written nor discarded since one was a snapshot of the other) is.
//!
//! At the end of each sequence the model's bytes are compared with what the pool
//! reads, so the model's "bytes differ" is the pool's.

use std::collections::BTreeMap;

mod common;

use proptest::prelude::*;
use thinpool::error::PoolError;
use thinpool::pool::Pool;
use thinpool::thin::{DeltaKind, DeltaRun, DiffOptions};
use thinpool::units::VirtBlock;

const BS: u64 = 64 * 1024;
/// Virtual blocks per device: over 252 (a leaf's capacity) so trees have levels.
const DEV_BLOCKS: u64 = 1500;
/// Bytes written at the start of a block.
const STAMP: usize = 16;

#[derive(Debug, Clone)]
enum Op {
    Create,
    Snapshot(usize),
    Delete(usize),
    /// One stamp into each of `count` blocks from `start`, `stride` apart.
    Write {
        dev: usize,
        start: u64,
        count: u64,
        stride: u64,
        seed: u8,
    },
    /// Whole blocks `[start, start + count)` unmapped.
    Discard {
        dev: usize,
        start: u64,
        count: u64,
    },
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Create),
        3 => any::<usize>().prop_map(Op::Snapshot),
        1 => any::<usize>().prop_map(Op::Delete),
        8 => (any::<usize>(), 0..DEV_BLOCKS, 1u64..400, 1u64..4, any::<u8>())
            .prop_map(|(dev, start, count, stride, seed)| Op::Write { dev, start, count, stride, seed }),
        3 => (any::<usize>(), 0..DEV_BLOCKS, 1u64..300).prop_map(|(dev, start, count)| Op::Discard { dev, start, count }),
        2 => Just(Op::Commit),
    ]
}

/// One block of a device in the model: the bytes at its start, and a token naming
/// the write or discard that last set it (0: never touched), copied by snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct BlockState {
    stamp: [u8; STAMP],
    token: u64,
}

type Model = BTreeMap<u32, Vec<BlockState>>;

fn pick(model: &Model, i: usize) -> Option<u32> {
    (!model.is_empty()).then(|| *model.keys().nth(i % model.len()).expect("key"))
}

fn stamp(seed: u8, block: u64) -> [u8; STAMP] {
    let mut s = [seed; STAMP];
    s[..8].copy_from_slice(&block.to_le_bytes());
    s[8] ^= 0x5a;
    s
}

/// The per-block comparison `diff` must equal: every mapping of both devices.
fn naive(pool: &mut Pool, l: u32, r: u32, opts: &DiffOptions) -> Vec<DeltaRun> {
    let to = opts.to.map_or(u64::MAX, |t| t.0);
    let map = |pool: &mut Pool, d| -> BTreeMap<u64, u64> {
        pool.mappings(d, opts.from.0, to).expect("mappings").iter().map(|m| (m.vblock, m.data_block)).collect()
    };
    let (lm, rm) = (map(pool, l), map(pool, r));
    let mut keys: Vec<u64> = lm.keys().chain(rm.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out: Vec<DeltaRun> = Vec::new();
    for k in keys {
        let kind = match (lm.get(&k), rm.get(&k)) {
            (Some(a), Some(b)) if a == b => DeltaKind::Same,
            (Some(_), Some(_)) => DeltaKind::Different,
            (Some(_), None) => DeltaKind::LeftOnly,
            _ => DeltaKind::RightOnly,
        };
        if kind == DeltaKind::Same && !opts.include_same {
            continue;
        }
        match out.last_mut() {
            Some(run) if run.kind == kind && run.end().0 == k => run.len += 1,
            _ => out.push(DeltaRun { kind, begin: VirtBlock(k), len: 1 }),
        }
    }
    out
}

fn check_pair(pool: &mut Pool, model: &Model, l: u32, r: u32, range: (u64, u64)) -> Result<(), TestCaseError> {
    let changes = pool.diff(l, r).map_err(|e| TestCaseError::fail(format!("diff {l} {r}: {e}")))?;
    prop_assert_eq!(&changes, &naive(pool, l, r, &DiffOptions::default()), "diff {} {}", l, r);
    let all = DiffOptions { include_same: true, ..Default::default() };
    prop_assert_eq!(pool.diff_with(l, r, &all).expect("same"), naive(pool, l, r, &all), "diff {} {} with same", l, r);
    let (a, b) = (range.0.min(range.1), range.0.max(range.1));
    let ranged = DiffOptions { include_same: range.0 & 1 == 1, ..DiffOptions::range(VirtBlock(a), VirtBlock(b)) };
    prop_assert_eq!(
        pool.diff_with(l, r, &ranged).expect("range"),
        naive(pool, l, r, &ranged),
        "diff {} {} over {}..{}",
        l,
        r,
        a,
        b
    );
    // Runs ascend, do not overlap, and are merged.
    for w in changes.windows(2) {
        prop_assert!(w[0].end() <= w[1].begin && !(w[0].end() == w[1].begin && w[0].kind == w[1].kind));
    }
    let mut changed = vec![false; DEV_BLOCKS as usize];
    for run in &changes {
        prop_assert!(run.kind.is_change() && run.len > 0);
        for b in run.begin.0..run.end().0 {
            changed[b as usize] = true;
        }
    }
    let (lm, rm) = (&model[&l], &model[&r]);
    for b in 0..DEV_BLOCKS as usize {
        if lm[b].stamp != rm[b].stamp {
            prop_assert!(changed[b], "block {} differs between {} and {} but is not reported", b, l, r);
        }
        if lm[b].token == rm[b].token {
            prop_assert!(!changed[b], "block {} is shared by {} and {} but is reported", b, l, r);
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>, range: (u64, u64)) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 8 << 20, 16_000 * BS);
    let mut pool = Pool::create(m, d, (BS / 512) as u32).expect("create");
    let mut model: Model = BTreeMap::new();
    let mut next_id = 0u64;
    let mut token = 0u64;
    for op in ops {
        match op {
            Op::Create => {
                if model.len() >= 5 {
                    continue;
                }
                pool.create_thin(next_id).expect("create");
                model.insert(next_id as u32, vec![BlockState::default(); DEV_BLOCKS as usize]);
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
                    match pool.write(id, b * BS, &s) {
                        Ok(()) => {
                            token += 1;
                            model.get_mut(&id).expect("dev")[b as usize] = BlockState { stamp: s, token };
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("write: {e}"))),
                    }
                }
            }
            Op::Discard { dev, start, count } => {
                let Some(id) = pick(&model, dev) else { continue };
                let end = (start + count).min(DEV_BLOCKS);
                pool.discard(id, start * BS, (end - start) * BS).expect("discard");
                for b in start..end {
                    token += 1;
                    model.get_mut(&id).expect("dev")[b as usize] = BlockState { stamp: [0; STAMP], token };
                }
            }
            Op::Commit => pool.commit().expect("commit"),
        }
        let ids: Vec<u32> = model.keys().copied().collect();
        for &l in &ids {
            for &r in &ids {
                if l != r {
                    check_pair(&mut pool, &model, l, r, range)?;
                }
            }
        }
    }
    // The model's bytes are the pool's.
    for (&id, blocks) in &model {
        for (b, st) in blocks.iter().enumerate() {
            let mut got = [0u8; STAMP];
            pool.read(id, b as u64 * BS, &mut got).expect("read");
            prop_assert_eq!(got, st.stamp, "device {} block {}", id, b);
        }
    }
    pool.commit().expect("commit");
    common::checks(&dir.path().join("metadata")).map_err(TestCaseError::fail)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn diff_equals_a_naive_comparison_and_reports_exactly_what_changed(
        ops in proptest::collection::vec(op(), 1..24),
        range in (0..DEV_BLOCKS + 10, 0..DEV_BLOCKS + 10),
    ) {
        run(ops, range)?;
    }
}

#[test]
fn unknown_devices_are_a_typed_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 4 << 20, 64 * BS);
    let mut pool = Pool::create(m, d, (BS / 512) as u32).expect("create");
    pool.create_thin(0).expect("create");
    assert!(matches!(pool.diff(0, 3), Err(PoolError::NoSuchDevice(3))));
    assert!(matches!(pool.diff(9, 0), Err(PoolError::NoSuchDevice(9))));
}

#[test]
fn held_mappings_stay_as_they_were_survive_commits_and_a_crash_and_are_released() {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 8 << 20, 4096 * BS);
    let mut pool = Pool::create(m, d, (BS / 512) as u32).expect("create");
    pool.create_thin(0).expect("create");
    for b in 0..1000u64 {
        pool.write(0, b * BS, &stamp(1, b)).expect("write");
    }
    pool.create_snap(1, 0).expect("snap");
    for b in (0..1000u64).step_by(50) {
        pool.write(0, b * BS, &stamp(2, b)).expect("cow");
    }
    let before = pool.diff(1, 0).expect("diff");
    assert_eq!(before.iter().map(|r| r.len).sum::<u64>(), 20);
    pool.commit().expect("commit");
    let used = pool.meta().status().metadata_used_blocks;
    let held = pool.hold_mappings().expect("hold");
    assert!(pool.hold_mappings().is_err(), "one held snapshot at a time");
    // Writes, a discard and a commit while held: the held trees do not change.
    for b in (0..1000u64).step_by(3) {
        pool.write(0, b * BS, &stamp(3, b)).expect("write");
    }
    pool.discard(1, 0, 100 * BS).expect("discard");
    pool.commit().expect("commit");
    common::checks(&dir.path().join("metadata")).expect("checks with a held snapshot");
    let md = pool.metadata_mut();
    let (l, r) = (md.held_device_root(&held, 1).expect("root"), md.held_device_root(&held, 0).expect("root"));
    assert_eq!(md.diff_roots(l, r, &DiffOptions::default()).expect("held diff").0, before);
    // Walked in steps of one node, the same runs.
    let mut walk = md.diff_walk(l, r, &DiffOptions::default()).expect("walk");
    let mut steps = 0;
    while !md.diff_step(&mut walk, 1).expect("step") {
        steps += 1;
    }
    assert!(steps > 3, "{steps} steps");
    assert_eq!(walk.finish().0, before);
    assert!(matches!(md.held_device_root(&held, 9), Err(PoolError::NoSuchDevice(9))));
    // A crash while held (the commit above recorded it): the next hold releases
    // the one a diff left behind, and releasing frees everything it kept.
    drop(pool);
    let mut pool = common::open_pool(dir.path(), false);
    assert_ne!(pool.meta().status().held_root, 0);
    assert!(pool.hold_mappings().is_err(), "still held");
    assert!(pool.metadata_mut().release_stale_hold().expect("stale"));
    assert!(!pool.metadata_mut().release_stale_hold().expect("none left"));
    let again = pool.hold_mappings().expect("hold after a crash");
    pool.release_held_mappings(&again).expect("release");
    assert!(pool.release_held_mappings(&again).is_err(), "released twice");
    pool.commit().expect("commit");
    assert_eq!(pool.meta().status().held_root, 0);
    thinpool::check::audit(pool.metadata_mut()).expect("exact reference counts");
    common::checks(&dir.path().join("metadata")).expect("checks after release");
    // What the held trees kept alone is free: the metadata in use is what the live
    // trees need (their size moved with the writes, so compare with a fresh count).
    let now = pool.meta().status().metadata_used_blocks;
    assert!(now < used + 40, "metadata in use {now}, {used} before holding");
}

#[test]
fn on_every_kernel_written_pool_diff_equals_the_naive_comparison_for_every_pair() {
    let mut pairs = 0;
    for name in common::fixture_names() {
        let fx = common::unpack_fixture(&name);
        let open = |p: &std::path::Path| std::fs::File::open(p).expect("fixture file");
        let mut pool = Pool::open(open(&fx.metadata), open(&fx.data), thinpool::pool::OpenOptions { read_only: true })
            .expect("open");
        let ids = pool.meta().device_ids();
        for &l in &ids {
            for &r in &ids {
                for opts in [DiffOptions::default(), DiffOptions { include_same: true, ..Default::default() }] {
                    assert_eq!(
                        pool.diff_with(l, r, &opts).expect("diff"),
                        naive(&mut pool, l, r, &opts),
                        "{name}: {l} {r}"
                    );
                }
                pairs += 1;
            }
        }
    }
    assert!(pairs > 10, "the fixtures hold devices to compare ({pairs} pairs)");
}
