//! Watching a served pool fill up: low-water thresholds for data and metadata (a
//! log line and a user command once per crossing) and LVM-style autoextend of the
//! data file (`thin_pool_autoextend_threshold` / `_percent`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::server::service::Service;
use crate::thin::Status;

/// What to watch and what to do.
#[derive(Debug, Clone, Default)]
pub struct HealthPolicy {
    /// The pool directory (passed to the command).
    pub pool_dir: PathBuf,
    /// Data use (percent) that counts as crossing the data threshold.
    pub data_threshold: Option<u8>,
    /// Metadata use (percent) that counts as crossing the metadata threshold.
    pub metadata_threshold: Option<u8>,
    /// Run with `sh -c` at every crossing, with `THINPOOL_DIR`, `THINPOOL_KIND`
    /// (`data` or `metadata`) and `THINPOOL_PERCENT` in its environment.
    pub on_threshold: Option<String>,
    /// When the data threshold is crossed, grow the data file by this percent.
    pub autoextend_percent: Option<u8>,
    /// ... but not past this many bytes (and never past what the host has).
    pub autoextend_max: Option<u64>,
}

impl HealthPolicy {
    /// Is there anything to watch?
    pub fn is_active(&self) -> bool {
        self.data_threshold.is_some() || self.metadata_threshold.is_some()
    }
}

fn percent(used: u64, total: u64) -> u64 {
    (used * 100).checked_div(total).unwrap_or(0)
}

/// Which thresholds are crossed now, remembered between checks.
#[derive(Debug, Default, Clone, Copy)]
pub struct Crossings {
    data: bool,
    metadata: bool,
}

/// One check: log, run the command and autoextend for every threshold crossed
/// since the last check (a threshold is re-armed once use falls below it).
pub fn check(service: &Service, policy: &HealthPolicy, state: &mut Crossings) {
    let st: Status = service.status();
    let data_pct = percent(st.data_used_blocks, st.data_total_blocks);
    let meta_pct = percent(st.metadata_used_blocks, st.metadata_total_blocks);
    if let Some(t) = policy.metadata_threshold {
        let above = meta_pct >= u64::from(t);
        if above && !state.metadata {
            eprintln!(
                "thinpool: metadata use {meta_pct}% crossed the {t}% threshold ({} of {} blocks)",
                st.metadata_used_blocks, st.metadata_total_blocks
            );
            run_command(policy, "metadata", meta_pct);
        }
        state.metadata = above;
    }
    if let Some(t) = policy.data_threshold {
        let above = data_pct >= u64::from(t);
        if above && !state.data {
            eprintln!(
                "thinpool: data use {data_pct}% crossed the {t}% threshold ({} of {} blocks)",
                st.data_used_blocks, st.data_total_blocks
            );
            run_command(policy, "data", data_pct);
            if autoextend(service, policy, &st) {
                // Use is below the threshold again: the next crossing counts.
                state.data = false;
                return;
            }
        }
        state.data = above;
    }
}

fn run_command(policy: &HealthPolicy, kind: &str, pct: u64) {
    let Some(cmd) = &policy.on_threshold else { return };
    match Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("THINPOOL_DIR", &policy.pool_dir)
        .env("THINPOOL_KIND", kind)
        .env("THINPOOL_PERCENT", pct.to_string())
        .spawn()
    {
        // Reap it without waiting here.
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
        }
        Err(e) => eprintln!("thinpool: cannot run the threshold command: {e}"),
    }
}

/// Grow the data by the policy's percent (up to its maximum); true when it grew.
fn autoextend(service: &Service, policy: &HealthPolicy, st: &Status) -> bool {
    let Some(pct) = policy.autoextend_percent else { return false };
    let bs = u64::from(st.data_block_sectors) * 512;
    let cur = st.data_total_blocks * bs;
    let grow = (cur.saturating_mul(u64::from(pct)) / 100).div_ceil(bs).max(1) * bs;
    let mut new = cur.saturating_add(grow);
    if let Some(max) = policy.autoextend_max {
        new = new.min(max);
    }
    if new / bs <= st.data_total_blocks {
        eprintln!("thinpool: data autoextend is at its maximum ({cur} bytes)");
        return false;
    }
    match service.with_pool(|p| p.extend(Some(new), None).and_then(|()| p.commit())) {
        Ok(()) => {
            eprintln!("thinpool: data autoextended from {cur} to {} bytes", new / bs * bs);
            true
        }
        Err(e) => {
            eprintln!("thinpool: data autoextend to {new} bytes failed: {e}");
            false
        }
    }
}

/// Check every `period` until `stop` is set.
pub fn spawn_monitor(
    service: Arc<Service>,
    policy: HealthPolicy,
    period: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut state = Crossings::default();
        while !stop.load(Ordering::Relaxed) {
            check(&service, &policy, &mut state);
            let mut slept = Duration::ZERO;
            while slept < period && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                slept += Duration::from_millis(50);
            }
        }
    })
}
