//! The NBD metadata context `thinpool:changed:<device>`: BLOCK_STATUS of an export
//! in it flags the ranges where the export differs from the named device (typically
//! one of its snapshots): flag 1 (bit 0, [`STATE_CHANGED`]) = changed since, 0 =
//! the same data blocks, or unmapped in both. The ranges are exactly `thinctl diff
//! <device> <export>`'s runs (any kind but `same`, adjacent runs joined), in bytes,
//! cut to the request. This is the convention of qemu's `qemu:dirty-bitmap:` contexts
//! (flag 1 = dirty), so backup tools built for those read it too.
//!
//! Contexts offered: LIST_META_CONTEXT with the query `thinpool:` or
//! `thinpool:changed:` (or no query) lists `thinpool:changed:<name>` for every other
//! exported device of the pool; SET_META_CONTEXT selects one or more by full name,
//! next to `base:allocation`. Each BLOCK_STATUS is answered at one instant (one
//! short step under the metadata lock, a diff limited to the request's blocks).

use crate::error::PoolError;
use crate::nbd::ContextExtent;
use crate::server::exports::ExportedDevice;
use crate::server::service::Service;
use crate::thin::{DevId, DiffOptions};
use crate::units::VirtBlock;

/// The namespace of thinpool's contexts.
pub const NAMESPACE: &str = "thinpool:";
/// The prefix of the changed-blocks contexts; the device's name follows.
pub const CHANGED_PREFIX: &str = "thinpool:changed:";
/// Flag of a changed range.
pub const STATE_CHANGED: u32 = 1;

/// The contexts export `export` offers that match `query` (a full name, a
/// namespace, or `""` for all), with the device id as key.
pub fn contexts(devices: &[ExportedDevice], export: &ExportedDevice, query: &str) -> Vec<(String, u64)> {
    let all = query.is_empty() || query == NAMESPACE || query == CHANGED_PREFIX;
    devices
        .iter()
        .filter(|d| d.id != export.id)
        .map(|d| (format!("{CHANGED_PREFIX}{}", d.name), d.id as u64))
        .filter(|(name, _)| all || name == query)
        .collect()
}

/// The extents of `thinpool:changed:<base>` over `[offset, offset + len)` of
/// device `dev` (`block_bytes` per block): changed where `dev` differs from `base`.
pub fn extents(
    service: &Service,
    dev: DevId,
    base: DevId,
    offset: u64,
    len: u64,
) -> Result<Vec<ContextExtent>, PoolError> {
    let bs = service.block_bytes();
    let end = offset.saturating_add(len);
    let (first, last) = (offset / bs, end.div_ceil(bs));
    let runs = service
        .with_pool_locked(|pool| pool.diff_with(base, dev, &DiffOptions::range(VirtBlock(first), VirtBlock(last))))?;
    let mut out: Vec<ContextExtent> = Vec::new();
    let mut pos = offset;
    let push = |length: u64, flags: u32, out: &mut Vec<ContextExtent>| {
        if length == 0 {
            return;
        }
        match out.last_mut() {
            Some(e) if e.flags == flags => e.length += length,
            _ => out.push(ContextExtent { length, flags }),
        }
    };
    for r in runs.iter().filter(|r| r.kind.is_change()) {
        let s = r.begin.0.saturating_mul(bs).max(offset);
        let e = r.end().0.saturating_mul(bs).min(end);
        if e <= s {
            continue;
        }
        push(s - pos, 0, &mut out);
        push(e - s, STATE_CHANGED, &mut out);
        pos = e;
    }
    push(end - pos, 0, &mut out);
    Ok(out)
}
