//! `pool.toml` and the rules for what it holds: the description's types, its text
//! form, device names and sizes, and the defaults of a new pool.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{PoolDir, PoolDirError};
use crate::format::MAX_DEV_ID;
use crate::pool::SECTOR;
use crate::thin::DevId;

/// Name of the description file inside a pool directory.
pub const CONFIG_FILE: &str = "pool.toml";
/// Name of the lock file inside a pool directory.
pub const LOCK_FILE: &str = "pool.lock";
/// Default name of the metadata file inside a pool directory.
pub const METADATA_FILE: &str = "metadata";
/// Default name of the data file inside a pool directory.
pub const DATA_FILE: &str = "data";
/// The pool directory used when none is given.
pub const DEFAULT_DIR: &str = "thinpool";
/// Default data block size: 64 KiB.
pub const DEFAULT_BLOCK_BYTES: u64 = 64 << 10;
/// Default data size of a new pool: 1 GiB (a sparse file).
pub const DEFAULT_DATA_BYTES: u64 = 1 << 30;
/// Smallest metadata file the default rule gives.
pub const MIN_DEFAULT_METADATA_BYTES: u64 = 2 << 20;
/// Largest metadata file the default rule gives.
pub const MAX_DEFAULT_METADATA_BYTES: u64 = 16 << 30;
/// Smallest metadata file the engine formats (64 blocks of 4 KiB).
pub const MIN_METADATA_BYTES: u64 = 64 * 4096;
/// Longest device name.
pub const MAX_NAME_LEN: usize = 128;
/// Version of the `pool.toml` layout this code writes and reads.
pub const CONFIG_FORMAT: u32 = 1;

/// Pool options kept in `pool.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolOptions {
    /// Refuse every change (like a thin-pool loaded `read_only`).
    #[serde(default)]
    pub read_only: bool,
    /// Low-water marks, autoextend and the no-space policy (`thinctl pool set`); a
    /// `pool.toml` without them (written before they existed) leaves them unset.
    #[serde(flatten)]
    pub health: HealthOptions,
    /// Options this version does not know, kept as they are (for the server's use).
    #[serde(flatten)]
    pub other: BTreeMap<String, toml::Value>,
}

/// What a write that needs a new data block does when the pool has none (dm-thin's
/// `error_if_no_space`, or its default queueing bounded by `no_space_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoSpaceMode {
    /// Wait for space to appear (up to the no-space timeout), then fail with ENOSPC.
    Queue,
    /// Fail with ENOSPC at once.
    Error,
}

impl NoSpaceMode {
    /// `queue` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            NoSpaceMode::Queue => "queue",
            NoSpaceMode::Error => "error",
        }
    }
}

/// Default no-space mode: queue.
pub const DEFAULT_NO_SPACE: NoSpaceMode = NoSpaceMode::Queue;
/// Default time a queued write waits for space, in seconds (dm-thin's 60 s).
pub const DEFAULT_NO_SPACE_TIMEOUT_S: u64 = 60;
/// Longest no-space timeout accepted, in seconds (one day).
pub const MAX_NO_SPACE_TIMEOUT_S: u64 = 86_400;

/// How a pool watches itself fill up: low-water marks for data and metadata (percent
/// used), LVM-style autoextend of the data, and what a write does when data runs
/// out. Stored in `pool.toml`'s `[options]` (set with `thinctl pool set`); the flags
/// of `thinctl serve` override them for one run. Every field is optional: unset means
/// "no threshold", "no autoextend", and the default no-space policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthOptions {
    /// Data use (percent, 1..=100) that counts as crossing the data threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_threshold: Option<u8>,
    /// Metadata use (percent, 1..=100) that counts as crossing the metadata threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_threshold: Option<u8>,
    /// When the data threshold is crossed, grow the data by this percent (1..=100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoextend_percent: Option<u8>,
    /// ... but not past this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoextend_max_bytes: Option<u64>,
    /// Queue or error when data runs out (default queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_space: Option<NoSpaceMode>,
    /// How long a queued write waits, in seconds (default 60, at most one day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_space_timeout_s: Option<u64>,
}

/// One setting of a [`HealthChange`]: switched off (back to its default), or set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Setting<T> {
    /// Unset: no threshold, no autoextend, or the default policy.
    Off,
    /// This value.
    To(T),
}

impl<T> Setting<T> {
    fn apply(self, slot: &mut Option<T>) {
        *slot = match self {
            Setting::Off => None,
            Setting::To(v) => Some(v),
        };
    }
}

/// A change to [`HealthOptions`]: fields left `None` stay as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthChange {
    /// The data threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_threshold: Option<Setting<u8>>,
    /// The metadata threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_threshold: Option<Setting<u8>>,
    /// The autoextend percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoextend_percent: Option<Setting<u8>>,
    /// The autoextend maximum in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoextend_max_bytes: Option<Setting<u64>>,
    /// The no-space mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_space: Option<Setting<NoSpaceMode>>,
    /// The no-space timeout in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_space_timeout_s: Option<Setting<u64>>,
}

impl HealthChange {
    /// Does it change nothing?
    pub fn is_empty(&self) -> bool {
        *self == HealthChange::default()
    }
}

impl HealthOptions {
    /// These options with every field `over` sets replacing ours (serve flags over
    /// `pool.toml`).
    pub fn overridden_by(self, over: HealthOptions) -> HealthOptions {
        HealthOptions {
            data_threshold: over.data_threshold.or(self.data_threshold),
            metadata_threshold: over.metadata_threshold.or(self.metadata_threshold),
            autoextend_percent: over.autoextend_percent.or(self.autoextend_percent),
            autoextend_max_bytes: over.autoextend_max_bytes.or(self.autoextend_max_bytes),
            no_space: over.no_space.or(self.no_space),
            no_space_timeout_s: over.no_space_timeout_s.or(self.no_space_timeout_s),
        }
    }

    /// These options with `change` applied, checked.
    pub fn changed(self, change: &HealthChange) -> Result<HealthOptions, String> {
        let mut o = self;
        if let Some(s) = change.data_threshold {
            s.apply(&mut o.data_threshold);
        }
        if let Some(s) = change.metadata_threshold {
            s.apply(&mut o.metadata_threshold);
        }
        if let Some(s) = change.autoextend_percent {
            s.apply(&mut o.autoextend_percent);
        }
        if let Some(s) = change.autoextend_max_bytes {
            s.apply(&mut o.autoextend_max_bytes);
        }
        if let Some(s) = change.no_space {
            s.apply(&mut o.no_space);
        }
        if let Some(s) = change.no_space_timeout_s {
            s.apply(&mut o.no_space_timeout_s);
        }
        o.validate()?;
        Ok(o)
    }

    /// Check every field's range; the message names the field and its limits.
    pub fn validate(&self) -> Result<(), String> {
        let pct = [
            ("data_threshold", self.data_threshold),
            ("metadata_threshold", self.metadata_threshold),
            ("autoextend_percent", self.autoextend_percent),
        ];
        for (name, v) in pct {
            if let Some(v) = v {
                if !(1..=100).contains(&v) {
                    return Err(format!("{name} = {v} is out of range: a percentage from 1 to 100"));
                }
            }
        }
        if let Some(t) = self.no_space_timeout_s {
            if t > MAX_NO_SPACE_TIMEOUT_S {
                return Err(format!(
                    "no_space_timeout_s = {t} is out of range: at most {MAX_NO_SPACE_TIMEOUT_S} seconds (one day)"
                ));
            }
        }
        if let Some(m) = self.autoextend_max_bytes {
            if m > i64::MAX as u64 {
                return Err(format!("autoextend_max_bytes = {m} is out of range: at most {} bytes", i64::MAX));
            }
        }
        Ok(())
    }

    /// The no-space mode in force (the default when unset).
    pub fn no_space_mode(&self) -> NoSpaceMode {
        self.no_space.unwrap_or(DEFAULT_NO_SPACE)
    }

    /// The no-space timeout in force, in seconds (the default when unset).
    pub fn no_space_timeout(&self) -> u64 {
        self.no_space_timeout_s.unwrap_or(DEFAULT_NO_SPACE_TIMEOUT_S)
    }
}

impl PoolDir {
    /// Change the pool's health options in `pool.toml` (checked, then saved);
    /// returns them as saved.
    pub fn set_health(&mut self, change: &HealthChange) -> Result<HealthOptions, PoolDirError> {
        self.writable()?;
        let new = self.config.options.health.changed(change).map_err(PoolDirError::Invalid)?;
        if new != self.config.options.health {
            self.config.options.health = new;
            self.save()?;
        }
        Ok(new)
    }
}

/// What `pool.toml` says about one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// The dm-thin device id.
    pub id: DevId,
    /// Virtual size in bytes.
    pub size_bytes: u64,
    /// Wall-clock creation time, unix seconds; unknown for adopted or recovered devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<u64>,
    /// Name of the device this one is a snapshot of, while that device exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<String>,
    /// Free-form labels kept with the device (key → value), saved in the same atomic
    /// replace of `pool.toml` as the rest of its entry. Programs that manage devices
    /// keep their own facts here (the containerd snapshotter keeps each snapshot's
    /// key, kind, parent and containerd's labels), so there is no second database.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// The contents of `pool.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Layout version ([`CONFIG_FORMAT`]).
    pub format: u32,
    /// Metadata file, when not `DIR/metadata` (relative paths are relative to DIR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<String>,
    /// Data file, when not `DIR/data` (relative paths are relative to DIR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Pool options.
    #[serde(default)]
    pub options: PoolOptions,
    /// Devices by name.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceEntry>,
    /// Replication identities by device name (see `volume::replication`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identities: BTreeMap<String, super::replication::IdentityEntry>,
    /// Hidden work devices of sends and receives in progress (deleted at the next
    /// writable open when they have no name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hidden: Vec<DevId>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            format: CONFIG_FORMAT,
            metadata: None,
            data: None,
            options: PoolOptions::default(),
            devices: BTreeMap::new(),
            identities: BTreeMap::new(),
            hidden: Vec::new(),
        }
    }
}

impl PoolConfig {
    /// Parse and validate `pool.toml` text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<PoolConfig, PoolDirError> {
        let bad = |msg: String| PoolDirError::Config { path: path.to_path_buf(), msg };
        let cfg: PoolConfig = toml::from_str(text).map_err(|e| bad(one_line(&e.to_string())))?;
        if cfg.format != CONFIG_FORMAT {
            return Err(bad(format!(
                "format {} is not supported (this thinctl reads format {CONFIG_FORMAT})",
                cfg.format
            )));
        }
        let mut ids: BTreeMap<DevId, &str> = BTreeMap::new();
        for (name, e) in &cfg.devices {
            check_name(name).map_err(|e| bad(e.to_string()))?;
            if u64::from(e.id) > MAX_DEV_ID {
                return Err(bad(format!("device \"{name}\": id {} is out of range (0..={MAX_DEV_ID})", e.id)));
            }
            // 0 is allowed here: a recovered or adopted device with nothing mapped.
            if e.size_bytes > MAX_DEVICE_BYTES {
                return Err(bad(format!(
                    "device \"{name}\": size_bytes = {} is too large: a device is at most {MAX_DEVICE_BYTES} bytes ({MAX_DEVICE_WHY})",
                    e.size_bytes
                )));
            }
            if let Some(other) = ids.insert(e.id, name) {
                return Err(bad(format!("devices \"{other}\" and \"{name}\" both have id {}", e.id)));
            }
        }
        cfg.options.health.validate().map_err(|e| bad(format!("[options] {e}")))?;
        for p in [&cfg.metadata, &cfg.data].into_iter().flatten() {
            if p.is_empty() {
                return Err(bad("an empty file path".into()));
            }
        }
        Ok(cfg)
    }

    /// The text written to `pool.toml`.
    pub fn to_text(&self) -> Result<String, PoolDirError> {
        let body = toml::to_string(self).map_err(|e| PoolDirError::Invalid(format!("cannot write pool.toml: {e}")))?;
        Ok(format!(
            "# thinpool pool description: device names and sizes, file locations, options.\n\
             # Written by thinctl (replaced atomically); `created` is unix seconds (UTC).\n{body}"
        ))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Is `name` acceptable as a device name? 1 to 128 characters from `A-Z a-z 0-9 . _ + -`,
/// not starting with `-` or `.`.
pub fn check_name(name: &str) -> Result<(), PoolDirError> {
    let bad = |why| Err(PoolDirError::BadName { name: name.to_string(), why });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 128 characters");
    }
    if name.starts_with('-') || name.starts_with('.') {
        return bad("it must not start with '-' or '.'");
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')) {
        return bad("use only letters, digits and . _ + -");
    }
    Ok(())
}

/// Largest virtual device size: 2^63 − 1 bytes (8 EiB − 1).
///
/// Two limits apply and this is the smaller. dm-thin addresses a device's blocks with
/// 64-bit virtual block numbers (the mapping tree's keys), so with blocks of at least
/// 64 KiB its block addresses reach 2^80 bytes, far past any 64-bit byte count. NBD
/// sends an export's size as a u64, but clients take offsets as signed 64-bit numbers
/// (qemu and nbdkit refuse exports past `INT64_MAX`, and the kernel's block devices
/// are limited by the signed `loff_t`), and a TOML integer is a signed 64-bit number
/// too: so 2^63 − 1 bytes.
pub const MAX_DEVICE_BYTES: u64 = i64::MAX as u64;

/// Why [`MAX_DEVICE_BYTES`] is the limit, for messages.
const MAX_DEVICE_WHY: &str = "8 EiB - 1: NBD clients take offsets as signed 64-bit numbers";

/// Is `size` acceptable as a virtual device size (1 ..= [`MAX_DEVICE_BYTES`])?
pub fn check_size(size: u64) -> Result<(), PoolDirError> {
    if size == 0 {
        return Err(PoolDirError::Invalid("a device size must be more than 0 bytes".into()));
    }
    if size > MAX_DEVICE_BYTES {
        return Err(PoolDirError::Invalid(format!(
            "device size {size} bytes is too large: a device is at most {MAX_DEVICE_BYTES} bytes ({MAX_DEVICE_WHY})"
        )));
    }
    Ok(())
}

/// Bytes up to the end of the highest mapped block, capped at [`MAX_DEVICE_BYTES`].
pub(super) fn mapped_end(highest: Option<u64>, block_bytes: u64) -> u64 {
    highest.map_or(0, |h| h.saturating_add(1).saturating_mul(block_bytes)).min(MAX_DEVICE_BYTES)
}

/// The default metadata size for a pool (see the module documentation).
pub fn default_metadata_bytes(data_bytes: u64, block_bytes: u64) -> u64 {
    let blocks = data_bytes.checked_div(block_bytes).unwrap_or(0);
    let want = blocks.saturating_mul(48).clamp(MIN_DEFAULT_METADATA_BYTES, MAX_DEFAULT_METADATA_BYTES);
    want.div_ceil(4096) * 4096
}

/// Metadata a pool needs (`thinctl pool metadata-size`, like `thin_metadata_size`):
/// every data block mapped once, in leaves as empty as the B-tree allows after
/// splits (a third full: 84 mappings per 4 KiB leaf), plus the interior nodes, a
/// copy of that for snapshots diverging from their origins, 16 blocks of tree
/// roots, details and their copies per thin device, the space maps' bitmaps, and
/// 1 MiB for commits in flight. An estimate on the generous side, in whole 4 KiB
/// blocks, at most dm-thin's limit.
pub fn metadata_bytes_needed(data_bytes: u64, block_bytes: u64, max_thins: u64) -> u64 {
    let blocks = data_bytes.checked_div(block_bytes.max(1)).unwrap_or(0);
    let leaves = blocks.div_ceil(84);
    let interior = leaves.div_ceil(84) * 2;
    let mapping = (leaves + interior).saturating_mul(2);
    let thins = max_thins.saturating_mul(16);
    let bitmaps = blocks.div_ceil(16_320) + 2;
    let total = mapping.saturating_add(thins).saturating_add(bitmaps).saturating_add(256);
    total.saturating_mul(4096).min(crate::format::MAX_METADATA_BLOCKS * 4096)
}

/// Parameters of a new pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// Data size in bytes (rounded down to whole blocks).
    pub data_bytes: u64,
    /// Data block size in bytes: a multiple of 64 KiB from 64 KiB to 1 GiB.
    pub block_bytes: u64,
    /// Metadata file size in bytes; `None` for [`default_metadata_bytes`].
    pub metadata_bytes: Option<u64>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions { data_bytes: DEFAULT_DATA_BYTES, block_bytes: DEFAULT_BLOCK_BYTES, metadata_bytes: None }
    }
}

/// Check a data block size in bytes; returns it in sectors.
pub fn block_sectors(block_bytes: u64) -> Result<u32, PoolDirError> {
    let sectors = block_bytes / SECTOR;
    if block_bytes % SECTOR != 0 || !crate::format::valid_data_block_sectors(sectors.try_into().unwrap_or(0)) {
        return Err(PoolDirError::Invalid(format!(
            "block size {block_bytes} bytes: it must be a multiple of 64 KiB from 64 KiB to 1 GiB"
        )));
    }
    Ok(sectors as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_metadata_size_follows_the_48_bytes_per_block_rule_within_bounds() {
        assert_eq!(default_metadata_bytes(1 << 30, 64 << 10), 2 << 20, "16384 blocks need 768 KiB: the floor wins");
        assert_eq!(default_metadata_bytes(100 << 30, 64 << 10), 75 << 20);
        assert_eq!(default_metadata_bytes(1 << 50, 64 << 10), 16 << 30, "the ceiling wins");
        assert_eq!(default_metadata_bytes(10_000 * 4096 * 16, 64 << 10) % 4096, 0);
    }

    #[test]
    fn device_names_are_checked() {
        for good in ["web", "a.b", "x_1", "v+2", "A-b"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "é", &"a".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pool_toml_round_trips_and_rejects_inconsistent_files() {
        let mut cfg = PoolConfig::default();
        cfg.devices.insert(
            "web".into(),
            DeviceEntry { id: 0, size_bytes: 1 << 30, created: Some(5), snapshot_of: None, labels: BTreeMap::new() },
        );
        cfg.devices.insert(
            "web.snap".into(),
            DeviceEntry {
                id: 1,
                size_bytes: 1 << 30,
                created: None,
                snapshot_of: Some("web".into()),
                labels: BTreeMap::new(),
            },
        );
        let text = cfg.to_text().expect("text");
        let p = Path::new("pool.toml");
        assert_eq!(PoolConfig::parse(&text, p).expect("parse"), cfg);

        let dup = "format = 1\n[devices.a]\nid = 1\nsize_bytes = 1\n[devices.b]\nid = 1\nsize_bytes = 1\n";
        assert!(PoolConfig::parse(dup, p).unwrap_err().to_string().contains("both have id 1"));
        let typo = "format = 1\n[devices.a]\nid = 1\nsize = 1\n";
        assert!(PoolConfig::parse(typo, p).is_err());
        let big = "format = 1\n[devices.a]\nid = 16777216\nsize_bytes = 1\n";
        assert!(PoolConfig::parse(big, p).unwrap_err().to_string().contains("out of range"));
        let huge = "format = 1\n[devices.a]\nid = 1\nsize_bytes = 18446744073709551615\n";
        let e = PoolConfig::parse(huge, p).unwrap_err().to_string();
        assert!(e.contains("too large") && e.contains("at most 9223372036854775807 bytes"), "{e}");
        let max = format!("format = 1\n[devices.a]\nid = 1\nsize_bytes = {MAX_DEVICE_BYTES}\n");
        assert_eq!(PoolConfig::parse(&max, p).expect("the limit itself").devices["a"].size_bytes, MAX_DEVICE_BYTES);
        let empty = "format = 1\n[devices.a]\nid = 1\nsize_bytes = 0\n";
        assert!(PoolConfig::parse(empty, p).is_ok(), "a recovered device with nothing mapped has size 0");
        assert!(check_size(MAX_DEVICE_BYTES).is_ok());
        assert!(check_size(MAX_DEVICE_BYTES + 1).unwrap_err().to_string().contains("at most 9223372036854775807"));
        assert!(check_size(0).is_err());
        assert!(PoolConfig::parse("format = 2\n", p).unwrap_err().to_string().contains("format 2"));
        assert!(PoolConfig::parse("[[[", p).is_err());
    }

    #[test]
    fn health_options_are_optional_checked_and_round_trip() {
        let p = Path::new("pool.toml");
        // A pool.toml written before the health options existed.
        let old = "format = 1\n[options]\nread_only = false\n[devices.a]\nid = 1\nsize_bytes = 4096\n";
        let cfg = PoolConfig::parse(old, p).expect("old pool.toml");
        assert_eq!(cfg.options.health, HealthOptions::default());
        assert_eq!(cfg.options.health.no_space_mode(), NoSpaceMode::Queue);
        assert_eq!(cfg.options.health.no_space_timeout(), 60);
        assert!(!cfg.to_text().expect("text").contains("threshold"), "unset options are not written");
        let no_options = PoolConfig::parse("format = 1\n", p).expect("no [options] at all");
        assert_eq!(no_options.options.health, HealthOptions::default());

        let mut cfg = PoolConfig::default();
        cfg.options.health = HealthOptions {
            data_threshold: Some(80),
            metadata_threshold: Some(70),
            autoextend_percent: Some(20),
            autoextend_max_bytes: Some(1 << 40),
            no_space: Some(NoSpaceMode::Error),
            no_space_timeout_s: Some(5),
        };
        cfg.options.other.insert("commit_interval_ms".into(), toml::Value::Integer(500));
        let text = cfg.to_text().expect("text");
        assert!(text.contains("data_threshold = 80") && text.contains("no_space = \"error\""), "{text}");
        assert_eq!(PoolConfig::parse(&text, p).expect("parse"), cfg);

        for (bad, what) in [
            ("data_threshold = 0", "data_threshold = 0 is out of range"),
            ("metadata_threshold = 101", "metadata_threshold = 101 is out of range"),
            ("autoextend_percent = 300", "300"),
            ("no_space_timeout_s = 86401", "at most 86400 seconds"),
            ("no_space = \"later\"", "later"),
            ("data_threshold = -1", "integer `-1`, expected u8"),
        ] {
            let e = PoolConfig::parse(&format!("format = 1\n[options]\n{bad}\n"), p).expect_err(bad).to_string();
            assert!(e.contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn a_health_change_sets_and_unsets_fields_and_flags_override() {
        let o = HealthOptions { data_threshold: Some(80), autoextend_percent: Some(10), ..Default::default() };
        let c = HealthChange {
            data_threshold: Some(Setting::Off),
            metadata_threshold: Some(Setting::To(90)),
            no_space: Some(Setting::To(NoSpaceMode::Error)),
            ..Default::default()
        };
        let n = o.changed(&c).expect("change");
        assert_eq!(
            n,
            HealthOptions {
                metadata_threshold: Some(90),
                autoextend_percent: Some(10),
                no_space: Some(NoSpaceMode::Error),
                ..Default::default()
            }
        );
        assert!(o.changed(&HealthChange { data_threshold: Some(Setting::To(0)), ..Default::default() }).is_err());
        assert!(HealthChange::default().is_empty() && !c.is_empty());
        let flags = HealthOptions { data_threshold: Some(50), no_space_timeout_s: Some(3), ..Default::default() };
        let eff = n.overridden_by(flags);
        assert_eq!((eff.data_threshold, eff.metadata_threshold, eff.no_space_timeout()), (Some(50), Some(90), 3));
        // The wire form a server receives.
        let j = serde_json::to_string(&c).expect("json");
        assert_eq!(j, r#"{"data_threshold":"off","metadata_threshold":{"to":90},"no_space":{"to":"error"}}"#);
        assert_eq!(serde_json::from_str::<HealthChange>(&j).expect("back"), c);
    }

    #[test]
    fn unknown_options_are_kept() {
        let text = "format = 1\n[options]\nread_only = true\ncommit_interval_ms = 500\n";
        let cfg = PoolConfig::parse(text, Path::new("pool.toml")).expect("parse");
        assert!(cfg.options.read_only);
        let again = PoolConfig::parse(&cfg.to_text().expect("text"), Path::new("pool.toml")).expect("parse");
        assert_eq!(again.options.other.get("commit_interval_ms").and_then(|v| v.as_integer()), Some(500));
    }
}
