//! `thinctl diff`: the runs where two devices differ, in `thin_delta`'s words, from
//! the server when the pool is served (taken at one instant, clients keep running),
//! else from the pool opened here read-only.

use std::path::Path;

use serde::Serialize;
use thinpool::server::diff::{diff_offline, DiffReport, DiffRun};
use thinpool::server::protocol::{Request, Response};
use thinpool::volume::Access;

use crate::error::{msg, CliResult};
use crate::open::open_pool;
use crate::remote;
use crate::units::format_size;

/// `thinctl diff DIR FROM TO [--same] [--json]`.
pub fn diff(dir: &Path, from: &str, to: &str, include_same: bool, json: bool) -> CliResult {
    let request = Request::Diff { from: from.to_string(), to: to.to_string(), include_same };
    let report = match remote::forward(dir, request)? {
        Some(Response::Diff { diff }) => diff,
        Some(other) => return Err(remote::unexpected(dir, &other)),
        None => {
            let (pd, mut pool) = open_pool(dir, Access::Read)?;
            diff_offline(&pd, &mut pool, from, to, include_same)?
        }
    };
    print!("{}", output(&report, json)?);
    Ok(())
}

#[derive(Serialize)]
struct DiffJson<'a> {
    left: &'a str,
    right: &'a str,
    left_id: u32,
    right_id: u32,
    block_bytes: u64,
    include_same: bool,
    changed_blocks: u64,
    changed_bytes: u64,
    runs: &'a [DiffRun],
}

/// What `thinctl diff` prints: a table and a summary line, or JSON.
pub fn output(r: &DiffReport, json: bool) -> CliResult<String> {
    let changed = r.changed_blocks();
    if json {
        let j = DiffJson {
            left: &r.left,
            right: &r.right,
            left_id: r.left_id,
            right_id: r.right_id,
            block_bytes: r.block_bytes,
            include_same: r.include_same,
            changed_blocks: changed,
            changed_bytes: changed.saturating_mul(r.block_bytes),
            runs: &r.runs,
        };
        let mut s = serde_json::to_string_pretty(&j).map_err(|e| msg(format!("cannot encode JSON: {e}")))?;
        s.push('\n');
        return Ok(s);
    }
    let mut rows: Vec<[String; 5]> = vec![["KIND", "BEGIN", "LENGTH", "OFFSET", "BYTES"].map(String::from)];
    for run in &r.runs {
        rows.push([
            run.kind.as_str().to_string(),
            run.begin_block.to_string(),
            run.length_blocks.to_string(),
            run.offset_bytes.to_string(),
            run.length_bytes.to_string(),
        ]);
    }
    let mut out = String::new();
    if !r.runs.is_empty() {
        let widths: Vec<usize> = (0..5).map(|c| rows.iter().map(|row| row[c].len()).max().unwrap_or(0)).collect();
        for row in &rows {
            let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
    }
    let unit =
        format!("blocks of {}; BEGIN and LENGTH in blocks, OFFSET and BYTES in bytes", format_size(r.block_bytes));
    if changed == 0 {
        out.push_str(&format!("\"{}\" and \"{}\" map the same blocks ({unit})\n", r.left, r.right));
    } else {
        out.push_str(&format!(
            "{changed} blocks ({}) differ between \"{}\" and \"{}\" ({unit})\n",
            format_size(changed.saturating_mul(r.block_bytes)),
            r.left,
            r.right
        ));
    }
    Ok(out)
}
