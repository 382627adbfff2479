//! `pool.toml` and the rules for what it holds: the description's types, its text
//! form, device names and sizes, and the defaults of a new pool.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::PoolDirError;
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
    /// Options this version does not know, kept as they are (for the server's use).
    #[serde(flatten)]
    pub other: BTreeMap<String, toml::Value>,
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
        cfg.devices
            .insert("web".into(), DeviceEntry { id: 0, size_bytes: 1 << 30, created: Some(5), snapshot_of: None });
        cfg.devices.insert(
            "web.snap".into(),
            DeviceEntry { id: 1, size_bytes: 1 << 30, created: None, snapshot_of: Some("web".into()) },
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
    fn unknown_options_are_kept() {
        let text = "format = 1\n[options]\nread_only = true\ncommit_interval_ms = 500\n";
        let cfg = PoolConfig::parse(text, Path::new("pool.toml")).expect("parse");
        assert!(cfg.options.read_only);
        let again = PoolConfig::parse(&cfg.to_text().expect("text"), Path::new("pool.toml")).expect("parse");
        assert_eq!(again.options.other.get("commit_interval_ms").and_then(|v| v.as_integer()), Some(500));
    }
}
