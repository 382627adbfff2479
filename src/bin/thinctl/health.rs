//! `thinctl pool set`: the pool's thresholds, autoextend and no-space policy
//! (`thinpool::volume::HealthOptions`, kept in `pool.toml`), offline or through a
//! server's control socket, where they are in force at once; and how they are worded.

use std::path::PathBuf;

use clap::Args;
use thinpool::volume::{HealthChange, HealthOptions, NoSpaceMode, PoolChange, Setting, MAX_NO_SPACE_TIMEOUT_S};

use crate::cli::default_dir;
use crate::error::{msg, CliResult};
use crate::units::{format_size, parse_size};

/// Options of `thinctl pool set`.
#[derive(Debug, Clone, Args)]
pub struct SetArgs {
    /// The pool directory.
    pub dir: Option<PathBuf>,
    /// Data use (percent) at which to log, run serve's --on-threshold and autoextend; `off` removes it.
    #[arg(long, value_name = "PCT|off", value_parser = parse_percent)]
    pub data_threshold: Option<Setting<u8>>,
    /// Metadata use (percent) at which to log and run serve's --on-threshold; `off` removes it.
    #[arg(long, value_name = "PCT|off", value_parser = parse_percent)]
    pub metadata_threshold: Option<Setting<u8>>,
    /// When the data threshold is crossed, grow the data by this percent; `off`: never.
    #[arg(long, value_name = "PCT|off", value_parser = parse_percent)]
    pub autoextend_percent: Option<Setting<u8>>,
    /// Largest size autoextend grows the data to; `off`: no limit but the host's.
    #[arg(long, value_name = "SIZE|off", value_parser = parse_size_setting)]
    pub autoextend_max: Option<Setting<u64>>,
    /// When data runs out: queue writes (up to the timeout) or fail them at once.
    #[arg(long, value_enum)]
    pub no_space: Option<crate::cli::NoSpaceMode>,
    /// How long a queued write waits for space, in seconds (at most 86400).
    #[arg(long, value_name = "SECONDS")]
    pub no_space_timeout: Option<u64>,
}

fn parse_percent(s: &str) -> Result<Setting<u8>, String> {
    if s == "off" {
        return Ok(Setting::Off);
    }
    match s.trim_end_matches('%').parse::<u8>() {
        Ok(n) if (1..=100).contains(&n) => Ok(Setting::To(n)),
        _ => Err(format!("{s:?} is not a percentage from 1 to 100 (or off)")),
    }
}

fn parse_size_setting(s: &str) -> Result<Setting<u64>, String> {
    if s == "off" {
        return Ok(Setting::Off);
    }
    parse_size(s).map(Setting::To)
}

/// `thinctl pool set`.
pub fn pool_set(args: SetArgs) -> CliResult {
    if let Some(t) = args.no_space_timeout {
        if t > MAX_NO_SPACE_TIMEOUT_S {
            return Err(msg(format!("--no-space-timeout {t}: at most {MAX_NO_SPACE_TIMEOUT_S} seconds (one day)")));
        }
    }
    let change = HealthChange {
        data_threshold: args.data_threshold,
        metadata_threshold: args.metadata_threshold,
        autoextend_percent: args.autoextend_percent,
        autoextend_max_bytes: args.autoextend_max,
        no_space: args.no_space.map(|m| Setting::To(no_space_mode(m))),
        no_space_timeout_s: args.no_space_timeout.map(Setting::To),
    };
    if change.is_empty() {
        return Err(msg(
            "pool set: give at least one of --data-threshold, --metadata-threshold, --autoextend-percent, --autoextend-max, --no-space, --no-space-timeout (`thinctl status` shows the settings)",
        ));
    }
    crate::commands::change(&args.dir.unwrap_or_else(default_dir), PoolChange::SetHealth { change })
}

/// The library's mode for the command line's.
pub fn no_space_mode(m: crate::cli::NoSpaceMode) -> NoSpaceMode {
    match m {
        crate::cli::NoSpaceMode::Queue => NoSpaceMode::Queue,
        crate::cli::NoSpaceMode::Error => NoSpaceMode::Error,
    }
}

/// `data threshold 80%, metadata threshold off, autoextend 20% up to 16 GiB, no space: queue (60 s)`.
pub fn settings_line(o: &HealthOptions) -> String {
    let pct = |p: Option<u8>| p.map_or_else(|| "off".to_string(), |p| format!("{p}%"));
    let autoextend = match (o.autoextend_percent, o.autoextend_max_bytes) {
        (None, _) => "off".to_string(),
        (Some(p), None) => format!("{p}%"),
        (Some(p), Some(m)) => format!("{p}% up to {}", format_size(m)),
    };
    let no_space = match o.no_space_mode() {
        NoSpaceMode::Queue => format!("queue ({} s)", o.no_space_timeout()),
        NoSpaceMode::Error => "error".to_string(),
    };
    format!(
        "data threshold {}, metadata threshold {}, autoextend {autoextend}, no space: {no_space}",
        pct(o.data_threshold),
        pct(o.metadata_threshold)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_read_back() {
        assert_eq!(parse_percent("80"), Ok(Setting::To(80)));
        assert_eq!(parse_percent("80%"), Ok(Setting::To(80)));
        assert_eq!(parse_percent("off"), Ok(Setting::Off));
        for bad in ["0", "101", "-1", "x", ""] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size_setting("1G"), Ok(Setting::To(1 << 30)));
        let o = HealthOptions {
            data_threshold: Some(80),
            autoextend_percent: Some(20),
            autoextend_max_bytes: Some(16 << 30),
            ..Default::default()
        };
        assert_eq!(
            settings_line(&o),
            "data threshold 80%, metadata threshold off, autoextend 20% up to 16 GiB, no space: queue (60 s)"
        );
    }
}
