//! Watching a served pool fill up: low-water thresholds for data and metadata (a
//! log line and a user command once per crossing) and LVM-style autoextend of the
//! data file (`thin_pool_autoextend_threshold` / `_percent`).
//!
//! The settings are the pool's [`HealthOptions`] (`pool.toml`, set with `thinctl
//! pool set`) overridden by `thinctl serve`'s flags for the run; a `pool set` sent
//! to the server replaces what it sets at once ([`LiveSettings::apply`]), so the
//! monitor reads them at every check and the no-space policy is pushed to the
//! [`Service`].

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::server::service::{NoSpacePolicy, Service};
use crate::thin::Status;
use crate::volume::{HealthChange, HealthOptions, NoSpaceMode};

/// The health settings a served pool runs with now, shared by the monitor, the
/// control socket (which changes them and reports them in `status`) and `serve`.
#[derive(Debug, Default)]
pub struct LiveSettings(Mutex<HealthOptions>);

impl LiveSettings {
    /// Settings starting as `options`.
    pub fn new(options: HealthOptions) -> Arc<LiveSettings> {
        Arc::new(LiveSettings(Mutex::new(options)))
    }

    /// The settings in force.
    pub fn get(&self) -> HealthOptions {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply `change` (fields it leaves `None` stay as they are) and push the
    /// no-space policy to `service`; returns the settings now in force.
    pub fn apply(&self, change: &HealthChange, service: &Service) -> Result<HealthOptions, String> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let new = g.changed(change)?;
        *g = new;
        drop(g);
        service.set_no_space_policy(no_space_policy(&new));
        Ok(new)
    }
}

/// The service's no-space policy for `options`.
pub fn no_space_policy(options: &HealthOptions) -> NoSpacePolicy {
    match options.no_space_mode() {
        NoSpaceMode::Error => NoSpacePolicy::Error,
        NoSpaceMode::Queue => NoSpacePolicy::Queue(Duration::from_secs(options.no_space_timeout())),
    }
}

/// What to watch and what to do.
#[derive(Debug, Clone, Default)]
pub struct HealthPolicy {
    /// The pool directory (passed to the command).
    pub pool_dir: PathBuf,
    /// Run with `sh -c` at every crossing, with `THINPOOL_DIR`, `THINPOOL_KIND`
    /// (`data` or `metadata`) and `THINPOOL_PERCENT` in its environment.
    pub on_threshold: Option<String>,
    /// Thresholds and autoextend, read at every check.
    pub settings: Arc<LiveSettings>,
}

/// Percent of `total` that `used` is, rounded down (0 for an empty total).
pub fn percent(used: u64, total: u64) -> u64 {
    used.saturating_mul(100).checked_div(total).unwrap_or(0)
}

/// What a threshold watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Data blocks.
    Data,
    /// Metadata blocks.
    Metadata,
}

impl Kind {
    /// `data` or `metadata`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Data => "data",
            Kind::Metadata => "metadata",
        }
    }

    /// (used, total) blocks of this kind.
    fn counts(self, st: &Status) -> (u64, u64) {
        match self {
            Kind::Data => (st.data_used_blocks, st.data_total_blocks),
            Kind::Metadata => (st.metadata_used_blocks, st.metadata_total_blocks),
        }
    }

    fn threshold(self, o: &HealthOptions) -> Option<u8> {
        match self {
            Kind::Data => o.data_threshold,
            Kind::Metadata => o.metadata_threshold,
        }
    }
}

/// The thresholds of `o` that use crosses now (use at or above the percentage), as
/// `data` / `metadata`, from block counts.
pub fn thresholds_crossed(
    o: &HealthOptions,
    (data_used, data_total): (u64, u64),
    (meta_used, meta_total): (u64, u64),
) -> Vec<String> {
    [(Kind::Data, data_used, data_total), (Kind::Metadata, meta_used, meta_total)]
        .into_iter()
        .filter(|&(k, used, total)| k.threshold(o).is_some_and(|t| percent(used, total) >= u64::from(t)))
        .map(|(k, _, _)| k.as_str().to_string())
        .collect()
}

/// Which thresholds are crossed now, remembered between checks.
#[derive(Debug, Default, Clone, Copy)]
pub struct Crossings {
    data: bool,
    metadata: bool,
}

impl Crossings {
    fn of(&mut self, kind: Kind) -> &mut bool {
        match kind {
            Kind::Data => &mut self.data,
            Kind::Metadata => &mut self.metadata,
        }
    }
}

/// One check: log, run the command and autoextend for every threshold crossed
/// since the last check (a threshold is re-armed once use falls below it).
pub fn check(service: &Service, policy: &HealthPolicy, state: &mut Crossings) {
    let st: Status = service.status();
    let o = policy.settings.get();
    for kind in [Kind::Metadata, Kind::Data] {
        let was = state.of(kind);
        let Some(t) = kind.threshold(&o) else {
            *was = false;
            continue;
        };
        let (used, total) = kind.counts(&st);
        let pct = percent(used, total);
        let above = pct >= u64::from(t);
        if above && !*was {
            eprintln!("thinpool: {} use {pct}% crossed the {t}% threshold ({used} of {total} blocks)", kind.as_str());
            run_command(policy, kind.as_str(), pct);
            if kind == Kind::Data && autoextend(service, &o, &st) {
                // Use is below the threshold again: the next crossing counts.
                *was = false;
                continue;
            }
        }
        *was = above;
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

/// Grow the data by the settings' percent (up to their maximum); true when it grew.
fn autoextend(service: &Service, o: &HealthOptions, st: &Status) -> bool {
    let Some(pct) = o.autoextend_percent else { return false };
    let bs = u64::from(st.data_block_sectors) * 512;
    let cur = st.data_total_blocks * bs;
    let grow = (cur.saturating_mul(u64::from(pct)) / 100).div_ceil(bs).max(1) * bs;
    let mut new = cur.saturating_add(grow);
    if let Some(max) = o.autoextend_max_bytes {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossed_thresholds_are_those_at_or_above_their_percentage() {
        let o = HealthOptions { data_threshold: Some(80), metadata_threshold: Some(50), ..Default::default() };
        assert!(thresholds_crossed(&o, (79, 100), (49, 100)).is_empty());
        assert_eq!(thresholds_crossed(&o, (80, 100), (49, 100)), ["data"]);
        assert_eq!(thresholds_crossed(&o, (100, 100), (1, 2)), ["data", "metadata"]);
        assert!(thresholds_crossed(&HealthOptions::default(), (100, 100), (100, 100)).is_empty());
        assert!(thresholds_crossed(&o, (0, 0), (0, 0)).is_empty(), "an empty pool crosses nothing");
    }
}
