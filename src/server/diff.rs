//! `thinctl diff`: the runs where two devices differ, from a pool opened here
//! ([`diff_offline`]) or from a served pool ([`diff_served`]), as a typed
//! [`DiffReport`] that the control socket carries and `thinctl` prints.
//!
//! A served diff is taken at one instant without pausing clients for the walk: it
//! commits (a group commit, as for a client's FLUSH), then holds every device's
//! mapping trees as they are in one short quiesced step (a held metadata snapshot,
//! dm-thin's `reserve_metadata_snap`, marked as a diff's: see
//! [`crate::thin::HeldMappings`]), and walks the held trees in steps of at most
//! [`STEP_NODES`] B-tree nodes, each under the metadata lock only, so I/O runs
//! between steps and writes made meanwhile copy what they touch instead of changing
//! the held trees. Then it lets go of them. Diffs run one at a time.
//!
//! When the pool cannot hold a snapshot (served read-only, or a metadata snapshot
//! someone else holds), the diff runs in one step under the metadata lock: still one
//! instant, with clients waiting for the walk (whose cost follows the changes).

use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::error::PoolError;
use crate::pool::Pool;
use crate::server::service::Service;
use crate::thin::{DeltaKind, DeltaRun, DevId, DiffOptions};
use crate::volume::{PoolDir, PoolDirError};

/// B-tree nodes a served diff reads in one step under the metadata lock.
pub const STEP_NODES: u64 = 128;

/// How a run compares, in `thin_delta`'s words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// Both map the blocks to the same data blocks.
    Same,
    /// Both map them, to different data blocks.
    Different,
    /// Only the left (FROM) device maps them.
    LeftOnly,
    /// Only the right (TO) device maps them.
    RightOnly,
}

impl From<DeltaKind> for RunKind {
    fn from(k: DeltaKind) -> Self {
        match k {
            DeltaKind::Same => RunKind::Same,
            DeltaKind::Different => RunKind::Different,
            DeltaKind::LeftOnly => RunKind::LeftOnly,
            DeltaKind::RightOnly => RunKind::RightOnly,
        }
    }
}

impl From<RunKind> for DeltaKind {
    fn from(k: RunKind) -> Self {
        match k {
            RunKind::Same => DeltaKind::Same,
            RunKind::Different => DeltaKind::Different,
            RunKind::LeftOnly => DeltaKind::LeftOnly,
            RunKind::RightOnly => DeltaKind::RightOnly,
        }
    }
}

impl RunKind {
    /// `same`, `different`, `left_only`, `right_only`.
    pub fn as_str(self) -> &'static str {
        DeltaKind::from(self).as_str()
    }
}

/// One run, in blocks and in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffRun {
    /// How the blocks compare.
    pub kind: RunKind,
    /// First virtual block.
    pub begin_block: u64,
    /// Number of blocks.
    pub length_blocks: u64,
    /// First byte (`begin_block` x block size).
    pub offset_bytes: u64,
    /// Length in bytes (`length_blocks` x block size).
    pub length_bytes: u64,
}

/// The diff of two devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReport {
    /// The left device's name (FROM).
    pub left: String,
    /// The right device's name (TO).
    pub right: String,
    /// Their thin device ids.
    pub left_id: DevId,
    /// See `left_id`.
    pub right_id: DevId,
    /// Data block size in bytes.
    pub block_bytes: u64,
    /// Whether `same` runs are listed.
    pub include_same: bool,
    /// The runs, ascending.
    pub runs: Vec<DiffRun>,
}

impl DiffReport {
    /// Blocks in runs other than `same`.
    pub fn changed_blocks(&self) -> u64 {
        self.runs.iter().filter(|r| r.kind != RunKind::Same).map(|r| r.length_blocks).sum()
    }

    /// The runs as the library types.
    pub fn delta_runs(&self) -> Vec<DeltaRun> {
        self.runs
            .iter()
            .map(|r| DeltaRun { kind: r.kind.into(), begin: r.begin_block.into(), len: r.length_blocks })
            .collect()
    }
}

/// Build the report of `runs` between the named devices.
pub fn report(
    (left, left_id): (&str, DevId),
    (right, right_id): (&str, DevId),
    block_bytes: u64,
    include_same: bool,
    runs: &[DeltaRun],
) -> DiffReport {
    DiffReport {
        left: left.to_string(),
        right: right.to_string(),
        left_id,
        right_id,
        block_bytes,
        include_same,
        runs: runs
            .iter()
            .map(|r| DiffRun {
                kind: r.kind.into(),
                begin_block: r.begin.0,
                length_blocks: r.len,
                offset_bytes: r.begin.0.saturating_mul(block_bytes),
                length_bytes: r.len.saturating_mul(block_bytes),
            })
            .collect(),
    }
}

/// The diff of devices `from` and `to` of a pool opened here.
pub fn diff_offline(
    pd: &PoolDir,
    pool: &mut Pool,
    from: &str,
    to: &str,
    include_same: bool,
) -> Result<DiffReport, PoolDirError> {
    let (l, r) = (pd.device(from)?.id, pd.device(to)?.id);
    let runs = pool.diff_with(l, r, &DiffOptions { include_same, ..Default::default() })?;
    Ok(report((from, l), (to, r), pool.block_bytes(), include_same, &runs))
}

/// Served diffs run one at a time (each holds the pool's one metadata snapshot).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The diff of devices `from` and `to` of a served pool, taken at one instant (see
/// the module docs). `pd` is locked only to resolve the names.
pub fn diff_served(
    service: &Service,
    pd: &Mutex<PoolDir>,
    from: &str,
    to: &str,
    include_same: bool,
) -> Result<DiffReport, PoolDirError> {
    let (l, r) = {
        let pd = pd.lock().unwrap_or_else(PoisonError::into_inner);
        (pd.device(from)?.id, pd.device(to)?.id)
    };
    let opts = DiffOptions { include_same, ..Default::default() };
    let runs = diff_ids_served(service, l, r, &opts)?;
    Ok(report((from, l), (to, r), service.block_bytes(), include_same, &runs))
}

/// The diff of devices `left` and `right` of a served pool, at one instant (see the
/// module docs).
pub fn diff_ids_served(
    service: &Service,
    left: DevId,
    right: DevId,
    opts: &DiffOptions,
) -> Result<Vec<DeltaRun>, PoolError> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    // Commit what is pending first, outside the quiesced step, so the commit
    // inside it has little left to sync.
    service.flush()?;
    let held = service.with_pool(|pool| -> Result<_, PoolError> {
        // Unknown devices are refused before anything is held.
        pool.meta().device_info(left)?;
        pool.meta().device_info(right)?;
        // No diff of ours runs (one at a time): a held snapshot marked as a
        // diff's was left by a server that stopped half way.
        pool.metadata_mut().release_stale_hold()?;
        match pool.hold_mappings() {
            Ok(h) => Ok(Some(h)),
            Err(PoolError::MetadataSnapshot(_) | PoolError::ReadOnly) => Ok(None),
            Err(e) => Err(e),
        }
    })?;
    let Some(held) = held else {
        return service.with_pool_locked(|pool| pool.diff_with(left, right, opts));
    };
    let walked = walk_held(service, &held, left, right, opts);
    let released = service.with_pool(|pool| pool.release_held_mappings(&held));
    let runs = walked?;
    released?;
    Ok(runs)
}

fn walk_held(
    service: &Service,
    held: &crate::thin::HeldMappings,
    left: DevId,
    right: DevId,
    opts: &DiffOptions,
) -> Result<Vec<DeltaRun>, PoolError> {
    let mut walk = service.with_pool_locked(|pool| {
        let md = pool.metadata_mut();
        let (l, r) = (md.held_device_root(held, left)?, md.held_device_root(held, right)?);
        md.diff_walk(l, r, opts)
    })?;
    while !service.with_pool_locked(|pool| pool.metadata_mut().diff_step(&mut walk, STEP_NODES))? {}
    Ok(walk.finish().0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::CreateOptions;

    #[test]
    fn a_served_diff_is_the_offline_diff_and_releases_what_it_held() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("p");
        let opts = CreateOptions { data_bytes: 256 << 20, ..Default::default() };
        let (mut pd, mut pool) = PoolDir::create(&dir, &opts).expect("create");
        pd.create_device(&mut pool, "a", 1 << 30, None).expect("a");
        let bs = pool.block_bytes();
        for i in 0..2000u64 {
            pool.write(0, i * bs, &[1u8; 512]).expect("write");
        }
        pd.snapshot(&mut pool, "a", "s", None).expect("snap");
        for i in (0..2000u64).step_by(97) {
            pool.write(0, i * bs, &[2u8; 512]).expect("cow");
        }
        pool.write(0, 5000 * bs, &[3u8; 512]).expect("new");
        pool.commit().expect("commit");
        let offline = diff_offline(&pd, &mut pool, "s", "a", false).expect("offline");
        assert_eq!(offline.changed_blocks(), 22);
        let used = pool.meta().status().metadata_used_blocks;
        let svc = Service::new(pool);
        let pd = Mutex::new(pd);
        assert_eq!(diff_served(&svc, &pd, "s", "a", false).expect("served"), offline);
        let with_same = diff_served(&svc, &pd, "s", "a", true).expect("served");
        assert_eq!(with_same.runs.iter().map(|r| r.length_blocks).sum::<u64>(), 2001);
        assert!(matches!(diff_served(&svc, &pd, "s", "nope", false), Err(PoolDirError::NoSuchDevice { .. })));
        svc.flush().expect("flush");
        let st = svc.status();
        assert_eq!(st.held_root, 0);
        assert_eq!(st.metadata_used_blocks, used, "the held snapshot's blocks are free again");
    }

    #[test]
    fn with_someone_elses_held_snapshot_the_diff_runs_in_one_step_and_leaves_it_held() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("p");
        let opts = CreateOptions { data_bytes: 64 << 20, ..Default::default() };
        let (mut pd, mut pool) = PoolDir::create(&dir, &opts).expect("create");
        pd.create_device(&mut pool, "a", 1 << 30, None).expect("a");
        pool.write(0, 0, &[1u8; 512]).expect("write");
        pd.snapshot(&mut pool, "a", "s", None).expect("snap");
        pool.write(0, 0, &[2u8; 512]).expect("cow");
        let data = pool.data_storage();
        let foreign = pool.metadata_mut().reserve_metadata_snap(&mut || data.sync()).expect("reserve");
        let offline = diff_offline(&pd, &mut pool, "s", "a", false).expect("offline");
        assert_eq!(offline.changed_blocks(), 1);
        let svc = Service::new(pool);
        assert_eq!(diff_served(&svc, &Mutex::new(pd), "s", "a", false).expect("served"), offline);
        assert_eq!(svc.status().held_root, foreign, "someone else's snapshot stays held");
    }

    #[test]
    fn the_request_and_the_report_round_trip_as_json() {
        use crate::server::protocol::{decode_request, encode, Request, RequestLine, Response};
        let req = Request::Diff { from: "s1".into(), to: "web".into(), include_same: true };
        let line = encode(&RequestLine { version: 1, request: req.clone() });
        assert_eq!(decode_request(line.trim_end().as_bytes()).expect("decode"), req);
        // include_same may be left out.
        let short = br#"{"version": 1, "request": {"op": "diff", "from": "a", "to": "b"}}"#;
        assert_eq!(
            decode_request(short).expect("decode"),
            Request::Diff { from: "a".into(), to: "b".into(), include_same: false }
        );
        let runs = [DeltaRun { kind: DeltaKind::LeftOnly, begin: 7.into(), len: 2 }];
        let resp = Response::Diff { diff: report(("s1", 1), ("web", 0), 65536, false, &runs) };
        assert_eq!(serde_json::from_str::<Response>(&encode(&resp)).expect("decode"), resp);
        let Response::Diff { diff } = resp else { unreachable!() };
        assert_eq!(diff.delta_runs(), runs);
        assert_eq!((diff.runs[0].offset_bytes, diff.runs[0].length_bytes), (7 * 65536, 2 * 65536));
    }
}
