//! What `ls` and `status` report, computed from a pool opened here ([`listing`],
//! [`status`]) or from a served pool without stopping its I/O for the walk
//! ([`listing_served`]).
//!
//! Usage (mapped and exclusive blocks per device) needs every mapping of every
//! device. A served pool is walked in slices: the device list is read in one short
//! step, then each device's mappings [`SLICE_BLOCKS`] virtual blocks at a time, each
//! slice in its own short [`Service::with_pool`] step, so I/O runs between slices
//! and no step is longer than one slice.
//!
//! Consistency of a served listing: each slice is read at one instant, and a device
//! whose mappings fit in one slice (up to [`SLICE_BLOCKS`] blocks, 1 GiB at 64 KiB
//! blocks) is read at one instant. A device written while its slices are walked
//! may be counted partly before and partly after those writes, and "exclusive" is
//! worked out across devices read at different instants. With no I/O during the walk
//! the numbers are exact, and the same as for the pool opened offline. A device
//! deleted during the walk is left out; one created during it is not listed.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use crate::error::PoolError;
use crate::pool::Pool;
use crate::server::health::thresholds_crossed;
use crate::server::protocol::{DeviceUsage, Listing, PoolMode, PoolStatus};
use crate::server::service::Service;
use crate::thin::DevId;
use crate::volume::{HealthOptions, PoolDir};

/// Virtual blocks of one device read in one step of a served walk.
pub const SLICE_BLOCKS: u64 = 16 * 1024;

/// The devices of `pd` without their usage (zero counts): the names, sizes and
/// dm-thin details, read at one instant.
fn rows(pd: &PoolDir, pool: &Pool) -> Result<Vec<DeviceUsage>, PoolError> {
    let mut out = Vec::new();
    for (name, e) in pd.devices() {
        let info = pool.meta().device_info(e.id)?;
        out.push(DeviceUsage {
            name: name.to_string(),
            id: e.id,
            size_bytes: e.size_bytes,
            creation_time: e.created,
            snapshot_of: e.snapshot_of.clone(),
            mapped_blocks: 0,
            exclusive_blocks: 0,
            thin_creation_time: info.creation_time,
            thin_snapshot_time: info.snapshotted_time,
            thin_transaction_id: info.transaction_id,
        });
    }
    out.sort_by_key(|d| d.id);
    Ok(out)
}

/// Fill in mapped and exclusive counts from each device's data blocks: a block is
/// exclusive when no other device maps it.
fn count(devices: &mut [DeviceUsage], blocks: &HashMap<DevId, Vec<u64>>) {
    let mut owners: HashMap<u64, u32> = HashMap::new();
    for list in blocks.values() {
        for &b in list {
            *owners.entry(b).or_default() += 1;
        }
    }
    for d in devices {
        let list = blocks.get(&d.id).map(Vec::as_slice).unwrap_or_default();
        d.mapped_blocks = list.len() as u64;
        d.exclusive_blocks = list.iter().filter(|b| owners.get(b) == Some(&1)).count() as u64;
    }
}

/// The listing of a pool opened here (nothing else uses it).
pub fn listing(pd: &PoolDir, pool: &mut Pool) -> Result<Listing, PoolError> {
    let mut devices = rows(pd, pool)?;
    let usage = pool.usage()?;
    for d in &mut devices {
        let (mapped, excl) = usage.get(&d.id).copied().unwrap_or((0, 0));
        d.mapped_blocks = mapped;
        d.exclusive_blocks = excl;
    }
    Ok(Listing { block_bytes: pool.block_bytes(), devices })
}

/// The listing of a served pool, walked in slices (see the module docs for what is
/// consistent with what). `pd` is locked only to read the device list at the
/// start; the walk holds neither it nor the pool between slices.
pub fn listing_served(service: &Service, pd: &Mutex<PoolDir>) -> Result<Listing, PoolError> {
    let devices = {
        let pd = pd.lock().unwrap_or_else(PoisonError::into_inner);
        service.with_pool(|pool| rows(&pd, pool))?
    };
    listing_walk(service, devices)
}

/// The walk behind [`listing_served`], for rows read earlier.
pub fn listing_walk(service: &Service, mut devices: Vec<DeviceUsage>) -> Result<Listing, PoolError> {
    let mut blocks: HashMap<DevId, Vec<u64>> = HashMap::new();
    let mut gone = Vec::new();
    'devices: for d in &devices {
        let mut list = Vec::new();
        let mut from = 0u64;
        loop {
            let slice = service.with_pool(|pool| pool.mapping_window(d.id, from, u64::MAX, SLICE_BLOCKS));
            let slice = match slice {
                Ok(s) => s,
                Err(PoolError::NoSuchDevice(_)) => {
                    gone.push(d.id);
                    continue 'devices;
                }
                Err(e) => return Err(e),
            };
            let Some(last) = slice.last().map(|m| m.vblock) else { break };
            list.extend(slice.iter().map(|m| m.data_block));
            match last.checked_add(1) {
                Some(next) => from = next,
                None => break,
            }
        }
        blocks.insert(d.id, list);
    }
    devices.retain(|d| !gone.contains(&d.id));
    count(&mut devices, &blocks);
    Ok(Listing { block_bytes: service.block_bytes(), devices })
}

fn writable(path: &std::path::Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// The status of an open pool with the thresholds of its `pool.toml` (see
/// [`status_with`]).
pub fn status(pd: &PoolDir, pool: &Pool) -> PoolStatus {
    status_with(pd, pool, &pd.config().options.health, false)
}

/// The status of an open pool, with the health settings in force (`health`) and
/// whether a server serves it read-only. The mode and its reason: `ro` when served
/// read-only, read-only by option, the metadata needs a check, or the files are not
/// writable by this process; `fail` when a metadata write failed;
/// `out-of-metadata-space` when free metadata is at or below the reserve (for a pool
/// opened read-only here too); `out-of-data-space` when every data block is in use;
/// else `rw`.
pub fn status_with(pd: &PoolDir, pool: &Pool, health: &HealthOptions, served_read_only: bool) -> PoolStatus {
    use crate::thin::PoolMode as E;
    let st = pool.meta().status();
    let (meta_free, meta_total, reserve) = pool.meta().metadata_room();
    let unwritable = [pd.metadata_path(), pd.data_path()].into_iter().find(|p| !writable(p));
    let (mode, reason) = if served_read_only {
        (PoolMode::Ro, Some("served with --read-only".to_string()))
    } else if pd.config().options.read_only {
        (PoolMode::Ro, Some("options.read_only is set in pool.toml".to_string()))
    } else if st.needs_check {
        (PoolMode::Ro, Some("the metadata's needs_check flag is set: run thinctl check".to_string()))
    } else if let Some(p) = unwritable {
        (PoolMode::Ro, Some(format!("{} is not writable by this user", p.display())))
    } else if st.mode == E::Fail {
        (
            PoolMode::Fail,
            Some(
                "a metadata write failed: changes are refused until the pool is reopened (the last commit is intact)"
                    .into(),
            ),
        )
    } else if st.mode == E::OutOfMetadataSpace || meta_free <= reserve {
        let why = format!(
            "free metadata ({meta_free} of {meta_total} blocks) is down to the reserve ({reserve} blocks): what needs new metadata gets ENOSPC; delete devices or grow it with `thinctl pool extend DIR --metadata-size +SIZE`"
        );
        (PoolMode::OutOfMetadataSpace, Some(why))
    } else if st.data_used_blocks >= st.data_total_blocks {
        let wait = match health.no_space_mode() {
            crate::volume::NoSpaceMode::Queue => {
                format!("wait up to {} s for space, then get ENOSPC", health.no_space_timeout())
            }
            crate::volume::NoSpaceMode::Error => "get ENOSPC".to_string(),
        };
        let why = format!(
            "every data block is in use ({} of {}): writes that need a new block {wait}; discard, delete devices or grow it with `thinctl pool extend DIR --data-size +SIZE`",
            st.data_used_blocks, st.data_total_blocks
        );
        (PoolMode::OutOfDataSpace, Some(why))
    } else {
        (PoolMode::Rw, None)
    };
    PoolStatus {
        mode,
        transaction_id: st.transaction_id,
        metadata_used_blocks: st.metadata_used_blocks,
        metadata_total_blocks: st.metadata_total_blocks,
        data_used_blocks: st.data_used_blocks,
        data_total_blocks: st.data_total_blocks,
        data_block_size_bytes: pool.block_bytes(),
        held_root: (st.held_root != 0).then_some(st.held_root),
        needs_check: st.needs_check,
        time: st.time,
        devices: pool.meta().device_ids().len(),
        reason,
        metadata_reserve_blocks: reserve,
        health: *health,
        thresholds_crossed: thresholds_crossed(
            health,
            (st.data_used_blocks, st.data_total_blocks),
            (st.metadata_used_blocks, st.metadata_total_blocks),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::CreateOptions;

    #[test]
    fn a_served_walk_in_slices_counts_what_the_offline_walk_counts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("p");
        let opts = CreateOptions { data_bytes: 64 << 20, ..Default::default() };
        let (mut pd, mut pool) = PoolDir::create(&dir, &opts).expect("create");
        pd.create_device(&mut pool, "a", 4 << 30, None).expect("a");
        let bs = pool.block_bytes();
        // Mappings spread over more than one slice, some shared with a snapshot.
        for i in 0..20u64 {
            pool.write(0, i * (SLICE_BLOCKS / 7) * bs, &[1u8; 4096]).expect("write");
        }
        pool.commit().expect("commit");
        pd.snapshot(&mut pool, "a", "b", None).expect("snap");
        for i in 0..5u64 {
            pool.write(0, i * (SLICE_BLOCKS / 7) * bs, &[2u8; 4096]).expect("cow");
            pool.write(1, (3 * SLICE_BLOCKS + i) * bs, &[3u8; 4096]).expect("new");
        }
        pool.commit().expect("commit");
        let offline = listing(&pd, &mut pool).expect("offline");
        let by_id: Vec<(u64, u64)> = offline.devices.iter().map(|d| (d.mapped_blocks, d.exclusive_blocks)).collect();
        assert_eq!(by_id, vec![(20, 5), (25, 10)]);
        let svc = Service::new(pool);
        assert_eq!(listing_served(&svc, &Mutex::new(pd)).expect("served"), offline);
    }

    #[test]
    fn a_device_deleted_during_a_walk_is_left_out() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("p");
        let (mut pd, mut pool) =
            PoolDir::create(&dir, &CreateOptions { data_bytes: 16 << 20, ..Default::default() }).expect("create");
        pd.create_device(&mut pool, "a", 1 << 20, None).expect("a");
        pd.create_device(&mut pool, "b", 1 << 20, None).expect("b");
        pool.write(1, 0, &[1u8; 4096]).expect("write");
        let rows = rows(&pd, &pool).expect("rows");
        let svc = Service::new(pool);
        svc.delete(0).expect("delete");
        let l = listing_walk(&svc, rows).expect("walk");
        assert_eq!(l.devices.len(), 1);
        assert_eq!((l.devices[0].name.as_str(), l.devices[0].mapped_blocks), ("b", 1));
    }
}
