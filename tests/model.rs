//! Model-based property test of the pool: random sequences of device management,
//! writes, discards, commits, reopens and crashes (drop without commit), compared
//! with a plain in-memory model of each device's bytes.
//!
//! After every step the touched device reads back as the model says and the engine's
//! reference counts equal an independent recount from the trees (`Metadata::audit`:
//! every data block's count is the number of distinct bottom-level leaves mapping
//! it; free + allocated = total). After every commit Debian's `thin_check` accepts
//! the metadata file, and every device reads back whole.
//!
//! A crash (drop without commit) brings back the committed devices. Writes since the
//! commit that landed on blocks mapped in place may or may not have reached the data
//! file (as on any block device without a flush), so after a crash every byte must
//! hold either its committed value or a value written to it since; the model then
//! takes what the device holds.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

mod common;

use proptest::prelude::*;
use thinpool::error::PoolError;
use thinpool::pool::Pool;

const BS: u64 = 64 * 1024;
const DEV_BLOCKS: u64 = 12;
const DEV_BYTES: u64 = DEV_BLOCKS * BS;
const DATA_BLOCKS: u64 = 40;

#[derive(Debug, Clone)]
enum Op {
    Create,
    Snapshot(usize),
    Delete(usize),
    Write { dev: usize, off: u64, len: u64, seed: u8 },
    Discard { dev: usize, off: u64, len: u64 },
    Commit,
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let off = 0..DEV_BYTES;
    prop_oneof![
        2 => Just(Op::Create),
        2 => any::<usize>().prop_map(Op::Snapshot),
        1 => any::<usize>().prop_map(Op::Delete),
        10 => (any::<usize>(), off.clone(), 1u64..(3 * BS), any::<u8>())
            .prop_map(|(dev, off, len, seed)| Op::Write { dev, off, len, seed }),
        3 => (any::<usize>(), off, 1u64..(4 * BS)).prop_map(|(dev, off, len)| Op::Discard { dev, off, len }),
        2 => Just(Op::Commit),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

/// Offset-dependent bytes, so data written at the wrong place shows up.
fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|o| {
            let x = o.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (seed as u64) << 56;
            (x >> 59) as u8 ^ (o as u8) ^ seed
        })
        .collect()
}

type Model = BTreeMap<u32, Vec<u8>>;

fn open(dir: &Path) -> Pool {
    let mut p = common::open_pool(dir, false);
    p.set_commit_when_full(false);
    p
}

fn read_dev(p: &mut Pool, id: u32) -> Vec<u8> {
    let mut buf = vec![0u8; DEV_BYTES as usize];
    p.read(id, 0, &mut buf).expect("read");
    buf
}

fn verify_all(p: &mut Pool, model: &Model) -> Result<(), TestCaseError> {
    let ids: Vec<u32> = p.meta().device_ids();
    prop_assert_eq!(ids, model.keys().copied().collect::<Vec<_>>());
    for (&id, want) in model {
        prop_assert!(read_dev(p, id) == *want, "device {} differs from the model", id);
    }
    thinpool::check::audit(p.metadata_mut()).map_err(TestCaseError::fail)?;
    Ok(())
}

fn pick(model: &Model, i: usize) -> Option<u32> {
    if model.is_empty() {
        return None;
    }
    model.keys().nth(i % model.len()).copied()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tmp");
    let (m, d) = common::pool_files(dir.path(), 2 << 20, DATA_BLOCKS * BS);
    let mut pool = Pool::create(m, d, (BS / 512) as u32).expect("create");
    // The model knows of commits only where it asks for them.
    pool.set_commit_when_full(false);
    let mut model: Model = BTreeMap::new();
    let mut committed: Model = BTreeMap::new();
    let mut since_commit: Vec<(u32, u64, Vec<u8>)> = Vec::new();
    let mut next_id = 0u64;
    // Discarded bytes of mapped blocks, as the pool tracks them (in memory only).
    let mut discarded: HashMap<(u32, u64), Vec<bool>> = HashMap::new();
    for op in ops {
        match op {
            Op::Create => {
                pool.create_thin(next_id).expect("create");
                model.insert(next_id as u32, vec![0; DEV_BYTES as usize]);
                next_id += 1;
            }
            Op::Snapshot(i) => {
                let Some(origin) = pick(&model, i) else {
                    continue;
                };
                pool.create_snap(next_id, origin as u64).expect("snapshot");
                let content = model[&origin].clone();
                model.insert(next_id as u32, content);
                next_id += 1;
            }
            Op::Delete(i) => {
                let Some(id) = pick(&model, i) else { continue };
                pool.delete(id as u64).expect("delete");
                model.remove(&id);
                discarded.retain(|&(d, _), _| d != id);
            }
            Op::Write { dev, off, len, seed } => {
                let Some(id) = pick(&model, dev) else {
                    continue;
                };
                let len = len.min(DEV_BYTES - off);
                let data = pattern(seed, off, len);
                // Written bytes are no longer discarded (even when the write fails for space).
                for (vb, bytes) in discarded.iter_mut().filter(|((d, _), _)| *d == id).map(|((_, vb), b)| (*vb, b)) {
                    let (s, e) = ((vb * BS).max(off), ((vb + 1) * BS).min(off + len));
                    if s < e {
                        bytes[(s - vb * BS) as usize..(e - vb * BS) as usize].fill(false);
                    }
                }
                match pool.write(id, off, &data) {
                    Ok(()) => {
                        model.get_mut(&id).expect("dev")[off as usize..(off + len) as usize].copy_from_slice(&data);
                        since_commit.push((id, off, data));
                    }
                    Err(PoolError::NoSpace { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("write: {e}"))),
                }
                prop_assert!(read_dev(&mut pool, id) == model[&id], "device {} differs after a write", id);
            }
            Op::Discard { dev, off, len } => {
                let Some(id) = pick(&model, dev) else {
                    continue;
                };
                let len = len.min(DEV_BYTES - off);
                // Which partial blocks at the ends are mapped (only those are tracked).
                let first = off.div_ceil(BS);
                let end = (off + len) / BS;
                let mut partial = Vec::new();
                if first > end {
                    partial.push((off / BS, off % BS, len));
                } else {
                    if off % BS != 0 {
                        partial.push((off / BS, off % BS, first * BS - off));
                    }
                    if (off + len) % BS != 0 {
                        partial.push((end, 0, (off + len) % BS));
                    }
                }
                let mapped: Vec<bool> = partial
                    .iter()
                    .map(|&(vb, _, _)| pool.metadata_mut().lookup(id, vb).expect("lookup").is_some())
                    .collect();
                pool.discard(id, off, len).expect("discard");
                // Whole blocks inside the range read as zeros; a partial block keeps its
                // bytes until every byte of it has been discarded.
                let dev = model.get_mut(&id).expect("dev");
                if first < end {
                    dev[(first * BS) as usize..(end * BS) as usize].fill(0);
                    discarded.retain(|&(d, vb), _| d != id || !(first..end).contains(&vb));
                }
                for (&(vb, within, l), m) in partial.iter().zip(mapped) {
                    if !m || l == 0 {
                        continue;
                    }
                    let bytes = discarded.entry((id, vb)).or_insert_with(|| vec![false; BS as usize]);
                    bytes[within as usize..(within + l) as usize].fill(true);
                    if bytes.iter().all(|&b| b) {
                        discarded.remove(&(id, vb));
                        dev[(vb * BS) as usize..((vb + 1) * BS) as usize].fill(0);
                    }
                }
                prop_assert!(read_dev(&mut pool, id) == model[&id], "device {} differs after a discard", id);
            }
            Op::Commit => {
                pool.commit().expect("commit");
                committed = model.clone();
                since_commit.clear();
                common::checks(&dir.path().join("metadata")).map_err(TestCaseError::fail)?;
                verify_all(&mut pool, &model)?;
            }
            Op::Reopen => {
                pool.commit().expect("commit");
                committed = model.clone();
                since_commit.clear();
                drop(pool);
                pool = open(dir.path());
                discarded.clear();
                verify_all(&mut pool, &model)?;
            }
            Op::Crash => {
                drop(pool);
                discarded.clear();
                common::checks(&dir.path().join("metadata")).map_err(TestCaseError::fail)?;
                pool = open(dir.path());
                model = committed.clone();
                let ids: Vec<u32> = pool.meta().device_ids();
                prop_assert_eq!(ids, model.keys().copied().collect::<Vec<_>>());
                for (&id, want) in model.iter_mut() {
                    let got = read_dev(&mut pool, id);
                    for (i, (&g, &w)) in got.iter().zip(want.iter()).enumerate() {
                        let i = i as u64;
                        let written_since = since_commit.iter().any(|(d, off, data)| {
                            *d == id && (*off..*off + data.len() as u64).contains(&i) && data[(i - off) as usize] == g
                        });
                        prop_assert!(
                            g == w || written_since,
                            "device {} byte {} after a crash: {} is neither committed nor written since",
                            id,
                            i,
                            g
                        );
                    }
                    *want = got;
                }
                since_commit.clear();
                committed = model.clone();
                thinpool::check::audit(pool.metadata_mut()).map_err(TestCaseError::fail)?;
                next_id = next_id.max(model.keys().next_back().map_or(0, |&k| k as u64 + 1));
            }
        }
        thinpool::check::audit(pool.metadata_mut()).map_err(TestCaseError::fail)?;
    }
    pool.commit().expect("commit");
    common::checks(&dir.path().join("metadata")).map_err(TestCaseError::fail)?;
    verify_all(&mut pool, &model)?;
    // Leak check: deleting every device returns the pool to its empty baseline.
    for id in model.keys() {
        pool.delete(*id as u64).expect("delete");
    }
    pool.commit().expect("commit");
    prop_assert_eq!(pool.meta().status().data_used_blocks, 0);
    thinpool::check::audit(pool.metadata_mut()).map_err(TestCaseError::fail)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn pool_matches_an_in_memory_model(ops in proptest::collection::vec(op(), 1..48)) {
        run(ops)?;
    }
}
