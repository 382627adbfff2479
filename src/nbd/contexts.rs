//! Metadata contexts besides `base:allocation`, which a [`Catalog`] offers per export
//! (for a pool: `thinpool:changed:<device>`): matching LIST/SET_META_CONTEXT queries
//! against them, and the BLOCK_STATUS chunk of a selected one.
//!
//! Context ids: `base:allocation` is 1; the others a SET selects get 2, 3, ... in
//! the order of the queries. LIST replies carry id 0 for them (the protocol says a
//! LIST reply's id is zero). At most [`MAX_SELECTED`] are selected at once.

use std::collections::HashSet;

use super::export::{errno, Catalog, Export};
use super::handshake::CTX_BASE_ALLOCATION;
use super::wire;

/// Most extra contexts one SET selects.
pub(super) const MAX_SELECTED: usize = 64;
/// Most contexts one LIST answers with.
const MAX_LISTED: usize = 4096;

/// A context selected by SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Selected {
    /// Its context id on this connection.
    pub(super) id: u32,
    /// Its name.
    pub(super) name: String,
    /// The key the export's catalog gave it.
    pub(super) key: u64,
}

/// The catalog's contexts of `export` that `queries` match: for LIST, full names
/// or namespaces (no query: all); for SET, full names only. Each once, in order.
pub(super) fn matching(catalog: &dyn Catalog, export: &str, queries: &[String], set: bool) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut asked: HashSet<&str> = HashSet::new();
    let all = [String::new()];
    let queries = if queries.is_empty() && !set { &all[..] } else { queries };
    for q in queries {
        if q.starts_with("base:") || (set && (q.is_empty() || q.ends_with(':'))) || !asked.insert(q.as_str()) {
            continue;
        }
        for (name, key) in catalog.meta_contexts(export, q) {
            let wanted = if set {
                name == *q
            } else {
                q.is_empty() || name == *q || (q.ends_with(':') && name.starts_with(q.as_str()))
            };
            if wanted && seen.insert(name.clone()) {
                out.push((name, key));
            }
        }
        if out.len() >= MAX_LISTED {
            out.truncate(MAX_LISTED);
            break;
        }
    }
    if set {
        out.truncate(MAX_SELECTED);
    }
    out
}

/// Ids for the contexts a SET selected.
pub(super) fn select(found: Vec<(String, u64)>) -> Vec<Selected> {
    found
        .into_iter()
        .enumerate()
        .map(|(i, (name, key))| Selected { id: CTX_BASE_ALLOCATION + 1 + i as u32, name, key })
        .collect()
}

/// The BLOCK_STATUS payload of one extra context for `[offset, offset + total)`:
/// its id, then at most `max_extents` (length, flags) pairs; `Err(errno)` when the
/// export fails. Lengths are kept below 4 GiB and the payload never covers more
/// than `total`.
pub(super) fn payload(
    export: &dyn Export,
    ctx: &Selected,
    offset: u64,
    total: u64,
    one: bool,
    max_extents: usize,
) -> Result<Vec<u8>, u32> {
    let extents = export.context_extents(ctx.key, offset, total).map_err(|e| errno(&e))?;
    let pairs = extents.into_iter().map(|e| (e.length, e.flags));
    wire::block_status_payload(ctx.id, pairs, total, max_extents, one).ok_or(wire::EIO)
}
