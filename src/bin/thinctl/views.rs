//! What `ls`, `status` and the changes print, as text or JSON: the same whether the
//! command runs here or in a server that holds the pool.

use std::path::Path;

use serde::Serialize;
use thinpool::server::protocol::{Listing, PoolStatus};
use thinpool::volume::{ChangeOutcome, PoolChange};

use crate::error::{msg, CliResult};
use crate::units::{format_size, format_time};

/// What a change did, in one line.
pub fn outcome_line(change: &PoolChange, outcome: ChangeOutcome, bs: u64) -> String {
    use ChangeOutcome as O;
    match (change, outcome) {
        (PoolChange::Create { name, size_bytes, .. }, O::Created { id }) => {
            format!("created \"{name}\" (id {id}, {})", format_size(*size_bytes))
        }
        (PoolChange::Snapshot { origin, name, .. }, O::Created { id }) => {
            format!("created \"{name}\" (id {id}), a snapshot of \"{origin}\"")
        }
        (PoolChange::Delete { name }, O::Deleted { id }) => format!("deleted \"{name}\" (id {id})"),
        (PoolChange::Extend { .. }, O::Extended { data_bytes, metadata_bytes }) => format!(
            "extended the pool: data {} ({} blocks of {}), metadata {}",
            format_size(data_bytes),
            data_bytes / bs,
            format_size(bs),
            format_size(metadata_bytes)
        ),
        (PoolChange::Resize { name, .. }, O::Resized { old_bytes, new_bytes, blocks_discarded }) => {
            let cut = if new_bytes < old_bytes {
                format!("; {blocks_discarded} blocks past the new end discarded")
            } else {
                String::new()
            };
            format!("resized \"{name}\": {} -> {}{cut}", format_size(old_bytes), format_size(new_bytes))
        }
        (PoolChange::Discard { name, offset, length }, O::Discarded { blocks }) => {
            let partial = match (offset, length) {
                (None, None) => false,
                (o, l) => {
                    let o = o.unwrap_or(0);
                    o % bs != 0 || l.is_some_and(|l| (o.saturating_add(l)) % bs != 0)
                }
            };
            let note = if partial {
                format!(
                    "; discard unmaps whole {} blocks only, partial blocks at the ends were left as they were",
                    format_size(bs)
                )
            } else {
                String::new()
            };
            format!("discarded {blocks} blocks ({}) of \"{name}\"{note}", format_size(blocks * bs))
        }
        (PoolChange::SetHealth { .. }, O::HealthSet { options }) => {
            format!("pool settings saved: {}", crate::health::settings_line(&options))
        }
        (_, o) => format!("{o:?}"),
    }
}

#[derive(Serialize)]
struct DeviceJson {
    name: String,
    id: u32,
    size_bytes: u64,
    mapped_bytes: u64,
    exclusive_bytes: u64,
    creation_time: Option<u64>,
    snapshot_of: Option<String>,
    mapped_blocks: u64,
    exclusive_blocks: u64,
    thin_creation_time: u32,
    thin_snapshot_time: u32,
    thin_transaction_id: u64,
}

#[derive(Serialize)]
struct LsJson {
    devices: Vec<DeviceJson>,
}

/// What `ls` prints for a listing (made here or by a server).
pub fn ls_output(dir: &Path, listing: &Listing, json: bool) -> CliResult<String> {
    let bs = listing.block_bytes;
    let mut devices: Vec<DeviceJson> = listing
        .devices
        .iter()
        .map(|d| DeviceJson {
            name: d.name.clone(),
            id: d.id,
            size_bytes: d.size_bytes,
            mapped_bytes: d.mapped_blocks * bs,
            exclusive_bytes: d.exclusive_blocks * bs,
            creation_time: d.creation_time,
            snapshot_of: d.snapshot_of.clone(),
            mapped_blocks: d.mapped_blocks,
            exclusive_blocks: d.exclusive_blocks,
            thin_creation_time: d.thin_creation_time,
            thin_snapshot_time: d.thin_snapshot_time,
            thin_transaction_id: d.thin_transaction_id,
        })
        .collect();
    devices.sort_by_key(|d| d.id);
    if json {
        return Ok(format!("{}\n", to_json(&LsJson { devices })?));
    }
    if devices.is_empty() {
        return Ok(format!(
            "no devices in {}; create one with `thinctl create {} NAME --size SIZE`\n",
            dir.display(),
            dir.display()
        ));
    }
    let header = ["NAME", "ID", "SIZE", "MAPPED", "EXCLUSIVE", "CREATED", "SNAPSHOT-OF"];
    let rows: Vec<[String; 7]> = devices
        .iter()
        .map(|d| {
            [
                d.name.clone(),
                d.id.to_string(),
                format_size(d.size_bytes),
                format_size(d.mapped_bytes),
                format_size(d.exclusive_bytes),
                d.creation_time.map_or_else(|| "-".to_string(), format_time),
                d.snapshot_of.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    Ok(table(&header, &rows))
}

fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width = [0usize; N];
    for (i, h) in header.iter().enumerate() {
        width[i] = h.len();
    }
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn to_json<T: Serialize>(v: &T) -> CliResult<String> {
    serde_json::to_string_pretty(v).map_err(|e| msg(format!("cannot write JSON: {e}")))
}

#[derive(Serialize, Default)]
struct StatusJson {
    transaction_id: Option<u64>,
    metadata_used_blocks: Option<u64>,
    metadata_total_blocks: Option<u64>,
    data_used_blocks: Option<u64>,
    data_total_blocks: Option<u64>,
    data_block_size_bytes: Option<u64>,
    mode: &'static str,
    held_root: Option<u64>,
    metadata_block_size_bytes: u64,
    metadata_used_blocks_dmsetup: Option<u64>,
    needs_check: Option<bool>,
    time: Option<u32>,
    devices: Option<usize>,
    served: bool,
    error: Option<String>,
    reason: Option<String>,
    metadata_reserve_blocks: Option<u64>,
    data_used_percent: Option<u64>,
    metadata_used_percent: Option<u64>,
    data_threshold: Option<u8>,
    metadata_threshold: Option<u8>,
    thresholds_crossed: Vec<String>,
    autoextend_percent: Option<u8>,
    autoextend_max_bytes: Option<u64>,
    no_space: Option<&'static str>,
    no_space_timeout_s: Option<u64>,
}

/// What `status` prints for a pool's status (read here or by a server); `served`
/// when a server holds the pool.
pub fn status_output(dir: &Path, st: &PoolStatus, json: bool, served: bool) -> CliResult<String> {
    let total = st.metadata_total_blocks;
    // dmsetup counts the kernel's metadata reserve (min(4096, total / 10)) as used.
    let reserve = (total / 10).min(4096);
    let out = StatusJson {
        transaction_id: Some(st.transaction_id),
        metadata_used_blocks: Some(st.metadata_used_blocks),
        metadata_total_blocks: Some(total),
        data_used_blocks: Some(st.data_used_blocks),
        data_total_blocks: Some(st.data_total_blocks),
        data_block_size_bytes: Some(st.data_block_size_bytes),
        mode: st.mode.as_str(),
        held_root: st.held_root,
        metadata_block_size_bytes: 4096,
        metadata_used_blocks_dmsetup: Some((st.metadata_used_blocks + reserve).min(total)),
        needs_check: Some(st.needs_check),
        time: Some(st.time),
        devices: Some(st.devices),
        served,
        error: None,
        reason: st.reason.clone(),
        metadata_reserve_blocks: Some(st.metadata_reserve_blocks),
        data_used_percent: Some(percent(st.data_used_blocks, st.data_total_blocks)),
        metadata_used_percent: Some(percent(st.metadata_used_blocks, total)),
        data_threshold: st.health.data_threshold,
        metadata_threshold: st.health.metadata_threshold,
        thresholds_crossed: st.thresholds_crossed.clone(),
        autoextend_percent: st.health.autoextend_percent,
        autoextend_max_bytes: st.health.autoextend_max_bytes,
        no_space: Some(st.health.no_space_mode().as_str()),
        no_space_timeout_s: Some(st.health.no_space_timeout()),
    };
    status_text(dir, &out, json)
}

fn percent(used: u64, total: u64) -> u64 {
    thinpool::server::health::percent(used, total)
}

fn status_text(dir: &Path, s: &StatusJson, json: bool) -> CliResult<String> {
    if json {
        return Ok(format!("{}\n", to_json(s)?));
    }
    let mut o = String::new();
    o.push_str(&format!("pool            {}{}\n", dir.display(), if s.served { " (served)" } else { "" }));
    o.push_str(&format!("mode            {}\n", s.mode));
    if let Some(r) = &s.reason {
        o.push_str(&format!("reason          {r}\n"));
    }
    if let Some(e) = &s.error {
        o.push_str(&format!("error           {e}\n"));
        return Ok(o);
    }
    let pct = |u: u64, t: u64| u.saturating_mul(100).checked_div(t).unwrap_or(0);
    let (mu, mt) = (s.metadata_used_blocks.unwrap_or(0), s.metadata_total_blocks.unwrap_or(0));
    let (du, dt) = (s.data_used_blocks.unwrap_or(0), s.data_total_blocks.unwrap_or(0));
    let bs = s.data_block_size_bytes.unwrap_or(0);
    o.push_str(&format!("transaction id  {}\n", s.transaction_id.unwrap_or(0)));
    o.push_str(&format!("metadata        {mu}/{mt} blocks of 4 KiB used ({}%)\n", pct(mu, mt)));
    o.push_str(&format!(
        "data            {du}/{dt} blocks of {} used ({}%; {} of {})\n",
        format_size(bs),
        pct(du, dt),
        format_size(du * bs),
        format_size(dt * bs)
    ));
    o.push_str(&format!("held root       {}\n", s.held_root.map_or_else(|| "-".to_string(), |r| r.to_string())));
    o.push_str(&format!("needs check     {}\n", if s.needs_check == Some(true) { "yes" } else { "no" }));
    o.push_str(&format!("devices         {}\n", s.devices.unwrap_or(0)));
    let threshold = |t: Option<u8>, kind: &str| match t {
        None => "off".to_string(),
        Some(t) if s.thresholds_crossed.iter().any(|c| c == kind) => format!("{t}% (crossed)"),
        Some(t) => format!("{t}%"),
    };
    o.push_str(&format!(
        "thresholds      data {}, metadata {}\n",
        threshold(s.data_threshold, "data"),
        threshold(s.metadata_threshold, "metadata")
    ));
    let autoextend = match (s.autoextend_percent, s.autoextend_max_bytes) {
        (None, _) => "off".to_string(),
        (Some(p), None) => format!("{p}%"),
        (Some(p), Some(m)) => format!("{p}% up to {}", format_size(m)),
    };
    o.push_str(&format!("autoextend      {autoextend}\n"));
    let no_space = match (s.no_space, s.no_space_timeout_s) {
        (Some("queue"), Some(t)) => format!("queue (up to {t} s), then ENOSPC"),
        (Some(m), _) => m.to_string(),
        (None, _) => "-".to_string(),
    };
    o.push_str(&format!("no space        {no_space}\n"));
    Ok(o)
}

/// What `status` prints for a pool that does not open: mode `fail` and why.
pub fn failed_status_output(dir: &Path, error: &str, json: bool) -> CliResult<String> {
    let out = StatusJson {
        metadata_block_size_bytes: 4096,
        mode: "fail",
        error: Some(error.to_string()),
        ..Default::default()
    };
    status_text(dir, &out, json)
}
