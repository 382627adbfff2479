//! `thinctl rollback`: a device's contents become a snapshot's, in O(1); through the
//! server when the pool is served (refused while a client has the device attached).

use std::path::Path;

use thinpool::server::protocol::{Request, Response};
use thinpool::server::rollback::{rollback_offline, RollbackOutcome};
use thinpool::volume::Access;

use crate::error::CliResult;
use crate::open::open_pool;
use crate::remote;
use crate::units::format_size;

/// `thinctl rollback DIR DEVICE SNAPSHOT`.
pub fn rollback(dir: &Path, device: &str, snapshot: &str) -> CliResult {
    let request = Request::Rollback { device: device.to_string(), snapshot: snapshot.to_string() };
    let (outcome, bs) = match remote::forward(dir, request)? {
        Some(Response::RolledBack { outcome, block_bytes }) => (outcome, block_bytes),
        Some(other) => return Err(remote::unexpected(dir, &other)),
        None => {
            let (mut pd, mut pool) = open_pool(dir, Access::Write)?;
            (rollback_offline(&mut pd, &mut pool, device, snapshot)?, pool.block_bytes())
        }
    };
    println!("{}", line(&outcome, bs));
    Ok(())
}

fn line(o: &RollbackOutcome, bs: u64) -> String {
    let size = if o.old_size_bytes == o.size_bytes {
        String::new()
    } else {
        format!("; size {} -> {}", format_size(o.old_size_bytes), format_size(o.size_bytes))
    };
    format!(
        "rolled \"{}\" back to \"{}\": {} blocks ({}) mapped{size}",
        o.device,
        o.snapshot,
        o.mapped_blocks,
        format_size(o.mapped_blocks.saturating_mul(bs))
    )
}
