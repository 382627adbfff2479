//! The snapshots, kept as thin devices of one pool with their facts in the
//! devices' labels in `pool.toml` — there is no other database, so the snapshot
//! list and the pool cannot disagree.
//!
//! Every snapshot is a device named `ctr-<ID>` whose labels hold its containerd
//! key (or name, once committed), kind, parent key, times, and containerd's labels;
//! the snapshotter's own labels start with [`PREFIX`], which containerd's labels may
//! not use. The base file system is the device `ctr-base-<ID>`, formatted once
//! ([`crate::base`]); a snapshot with no parent is a thin snapshot of it, one with a
//! parent is a thin snapshot of the parent's device. Both are O(1).
//!
//! Crash safety: a new device's entry and labels are saved *before* the engine
//! creates it ([`PoolDir::create_recorded_with`]), a removed device is deleted in the
//! engine before its entry goes, and label changes are one atomic replace of
//! `pool.toml`; so after a crash every entry the pool opens with names a device that
//! exists, and no snapshot device exists without its labels. The one thing a crash
//! can leave half-made is a base whose formatting did not finish (kind
//! `base-building`): [`Store::cleanup`] deletes it (containerd calls Cleanup after
//! its garbage collection), and the next snapshot without a parent formats a new
//! base beside it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Kind, Usage};
use thinpool::server::exports::{ExportedDevice, PoolCatalog};
use thinpool::server::service::Service;
use thinpool::thin::DevId;
use thinpool::volume::{NewRecord, PoolDir, PoolDirError};

use crate::attach::Attacher;
use crate::error::SnapError;

/// Prefix of the labels the snapshotter keeps for itself.
pub const PREFIX: &str = "thinpool.snapshotter/";
const L_KEY: &str = "thinpool.snapshotter/key";
const L_KIND: &str = "thinpool.snapshotter/kind";
const L_PARENT: &str = "thinpool.snapshotter/parent";
const L_CREATED: &str = "thinpool.snapshotter/created";
const L_UPDATED: &str = "thinpool.snapshotter/updated";

/// Prefix of the base device's name (`ctr-base-<ID>`).
pub const BASE_PREFIX: &str = "ctr-base-";
const KIND_BASE: &str = "base";
const KIND_BUILDING: &str = "base-building";

/// Longest key or name accepted.
pub const MAX_KEY_BYTES: usize = 4096;
/// Longest label (key and value together), as containerd's own rule.
pub const MAX_LABEL_BYTES: usize = 4096;
/// Virtual blocks compared per hold of the pool by [`Store::usage`].
pub const USAGE_WINDOW: u64 = 1 << 16;
/// Most labels of one snapshot, all together.
pub const MAX_LABELS_BYTES: usize = 64 << 10;
/// How long Remove waits for the NBD connection of a device it just detached to
/// close before deleting the device.
pub const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapKind {
    /// Writable, may be committed.
    Active,
    /// Read-only view of a committed snapshot.
    View,
    /// Frozen; may be a parent.
    Committed,
}

impl SnapKind {
    fn as_str(self) -> &'static str {
        match self {
            SnapKind::Active => "active",
            SnapKind::View => "view",
            SnapKind::Committed => "committed",
        }
    }
    fn parse(s: &str) -> Option<SnapKind> {
        Some(match s {
            "active" => SnapKind::Active,
            "view" => SnapKind::View,
            "committed" => SnapKind::Committed,
            _ => return None,
        })
    }
    fn to_kind(self) -> Kind {
        match self {
            SnapKind::Active => Kind::Active,
            SnapKind::View => Kind::View,
            SnapKind::Committed => Kind::Committed,
        }
    }
}

/// One snapshot as the pool describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its device's name.
    pub device: String,
    /// Its device's id.
    pub id: DevId,
    /// containerd's key (active, view) or name (committed).
    pub key: String,
    /// Its kind.
    pub kind: SnapKind,
    /// The parent's key, when it has one.
    pub parent: Option<String>,
    /// containerd's labels.
    pub labels: BTreeMap<String, String>,
    /// Created, nanoseconds since the epoch.
    pub created_ns: u128,
    /// Last changed, nanoseconds since the epoch.
    pub updated_ns: u128,
}

impl Record {
    fn from_entry(device: &str, id: DevId, labels: &BTreeMap<String, String>) -> Option<Record> {
        let kind = SnapKind::parse(labels.get(L_KIND)?)?;
        let ns = |k: &str| labels.get(k).and_then(|v| v.parse::<u128>().ok()).unwrap_or(0);
        Some(Record {
            device: device.to_string(),
            id,
            key: labels.get(L_KEY)?.clone(),
            kind,
            parent: labels.get(L_PARENT).cloned(),
            labels: labels
                .iter()
                .filter(|(k, _)| !k.starts_with(PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            created_ns: ns(L_CREATED),
            updated_ns: ns(L_UPDATED),
        })
    }

    fn to_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.labels.clone();
        l.insert(L_KEY.into(), self.key.clone());
        l.insert(L_KIND.into(), self.kind.as_str().into());
        if let Some(p) = &self.parent {
            l.insert(L_PARENT.into(), p.clone());
        }
        l.insert(L_CREATED.into(), self.created_ns.to_string());
        l.insert(L_UPDATED.into(), self.updated_ns.to_string());
        l
    }

    /// The containerd view of this record.
    pub fn info(&self) -> Info {
        let t = |ns: u128| UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
        Info {
            kind: self.kind.to_kind(),
            name: self.key.clone(),
            parent: self.parent.clone().unwrap_or_default(),
            labels: self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            created_at: t(self.created_ns),
            updated_at: t(self.updated_ns),
        }
    }
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// What [`Store::cleanup`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Devices deleted.
    pub removed: Vec<String>,
    /// Attachments found disconnected (or of devices that are gone) and forgotten:
    /// `/dev/nbdN (export)`.
    pub forgotten: Vec<String>,
}

/// The snapshotter's state: the shared pool, its directory, and how mounts are made.
pub struct Store {
    service: Arc<Service>,
    pd: Arc<Mutex<PoolDir>>,
    size: u64,
    attacher: Attacher,
    nbd_addr: OnceLock<SocketAddr>,
    catalog: OnceLock<Arc<PoolCatalog>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("size", &self.size).finish_non_exhaustive()
    }
}

fn check_key(what: &str, key: &str) -> Result<(), SnapError> {
    if key.is_empty() {
        return Err(SnapError::InvalidArgument(format!("the {what} is empty")));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(SnapError::InvalidArgument(format!(
            "the {what} is {} bytes long; at most {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// Check containerd's labels: none of ours, each at most [`MAX_LABEL_BYTES`], all
/// at most [`MAX_LABELS_BYTES`].
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), SnapError> {
    let mut total = 0usize;
    for (k, v) in labels {
        if k.is_empty() {
            return Err(SnapError::InvalidArgument("a label has an empty key".into()));
        }
        if k.starts_with(PREFIX) {
            return Err(SnapError::InvalidArgument(format!(
                "label \"{k}\": keys starting with \"{PREFIX}\" are the snapshotter's own"
            )));
        }
        let n = k.len() + v.len();
        if n > MAX_LABEL_BYTES {
            return Err(SnapError::InvalidArgument(format!(
                "label \"{}\" is {n} bytes long (key and value); at most {MAX_LABEL_BYTES}",
                k.chars().take(64).collect::<String>()
            )));
        }
        total += n;
    }
    if total > MAX_LABELS_BYTES {
        return Err(SnapError::InvalidArgument(format!(
            "the labels are {total} bytes long together; at most {MAX_LABELS_BYTES}"
        )));
    }
    Ok(())
}

impl Store {
    /// A store over a served pool; every snapshot device gets `size` virtual bytes
    /// (only the base's size counts: snapshots have their origin's).
    pub fn new(service: Arc<Service>, pd: Arc<Mutex<PoolDir>>, size: u64, attacher: Attacher) -> Store {
        Store { service, pd, size, attacher, nbd_addr: OnceLock::new(), catalog: OnceLock::new() }
    }

    /// The NBD server's address, once it is bound.
    pub fn set_nbd_addr(&self, addr: SocketAddr) {
        let _ = self.nbd_addr.set(addr);
    }

    /// The export catalog to refresh after changes.
    pub fn set_catalog(&self, catalog: Arc<PoolCatalog>) {
        let _ = self.catalog.set(catalog);
        self.refresh(&self.dir());
    }

    /// The devices to export: every device of the pool.
    pub fn export_list(pd: &PoolDir) -> (Vec<ExportedDevice>, Option<String>) {
        (
            pd.devices().map(|(n, e)| ExportedDevice { name: n.to_string(), id: e.id, size: e.size_bytes }).collect(),
            None,
        )
    }

    fn refresh(&self, pd: &PoolDir) {
        if let Some(c) = self.catalog.get() {
            let (list, default) = Self::export_list(pd);
            c.set_devices(list, default);
        }
    }

    fn dir(&self) -> MutexGuard<'_, PoolDir> {
        self.pd.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every snapshot record of the pool.
    pub fn records(pd: &PoolDir) -> Vec<Record> {
        pd.devices().filter_map(|(n, e)| Record::from_entry(n, e.id, &e.labels)).collect()
    }

    fn find(pd: &PoolDir, key: &str) -> Result<Record, SnapError> {
        Self::records(pd).into_iter().find(|r| r.key == key).ok_or_else(|| SnapError::NotFound(key.to_string()))
    }

    fn mounts_of(&self, r: &Record) -> Result<Vec<Mount>, SnapError> {
        let addr = *self
            .nbd_addr
            .get()
            .ok_or_else(|| SnapError::FailedPrecondition("the NBD server is not listening yet".into()))?;
        self.attacher.mounts(&r.device, addr, r.kind == SnapKind::View)
    }

    /// Prepare (`view` false) or View (`view` true) `key` from committed `parent`
    /// (empty: the base file system).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        view: bool,
    ) -> Result<Vec<Mount>, SnapError> {
        check_key("key", key)?;
        check_labels(&labels)?;
        let mut pd = self.dir();
        if Self::find(&pd, key).is_ok() {
            return Err(SnapError::AlreadyExists(key.to_string()));
        }
        let origin = if parent.is_empty() {
            self.ensure_base(&mut pd)?
        } else {
            let p = Self::find(&pd, parent).map_err(|_| SnapError::NotFound(parent.to_string()))?;
            if p.kind != SnapKind::Committed {
                return Err(SnapError::FailedPrecondition(format!(
                    "parent \"{parent}\" is {} snapshot, not a committed one",
                    if p.kind == SnapKind::View { "a view" } else { "an active" }
                )));
            }
            p.device
        };
        let size = pd.device(&origin)?.size_bytes;
        let id = self.free_id()?;
        let now = now_ns();
        let rec = Record {
            device: format!("ctr-{id}"),
            id,
            key: key.to_string(),
            kind: if view { SnapKind::View } else { SnapKind::Active },
            parent: (!parent.is_empty()).then(|| parent.to_string()),
            labels,
            created_ns: now,
            updated_ns: now,
        };
        let new =
            NewRecord { name: rec.device.clone(), id, size_bytes: size, origin: Some(origin), labels: rec.to_labels() };
        pd.create_recorded_with(new, |id, origin| -> Result<(), SnapError> {
            let origin = origin.ok_or_else(|| SnapError::FailedPrecondition("the origin vanished".into()))?;
            self.service.with_pool(|pool| {
                pool.create_snap(id.into(), origin.into())?;
                pool.commit()
            })?;
            Ok(())
        })?;
        self.refresh(&pd);
        match self.mounts_of(&rec) {
            Ok(m) => Ok(m),
            Err(e) => {
                // Leave nothing behind that containerd was not told about.
                let _ = pd.delete_with(&rec.device, |id| self.service.delete(id).map_err(PoolDirError::from));
                self.refresh(&pd);
                Err(e)
            }
        }
    }

    fn free_id(&self) -> Result<DevId, SnapError> {
        let used: std::collections::BTreeSet<DevId> =
            self.service.with_pool(|pool| pool.meta().device_ids().into_iter().collect());
        (0..=thinpool::format::MAX_DEV_ID as DevId)
            .find(|i| !used.contains(i))
            .ok_or_else(|| SnapError::FailedPrecondition("every device id of the pool is in use".into()))
    }

    /// The base device's name, formatting it first when the pool has none. A base
    /// whose formatting a crash interrupted is left for [`Store::cleanup`].
    fn ensure_base(&self, pd: &mut PoolDir) -> Result<String, SnapError> {
        let found = pd
            .devices()
            .find(|(n, e)| n.starts_with(BASE_PREFIX) && e.labels.get(L_KIND).map(String::as_str) == Some(KIND_BASE))
            .map(|(n, _)| n.to_string());
        if let Some(name) = found {
            return Ok(name);
        }
        let id = self.free_id()?;
        let name = format!("{BASE_PREFIX}{id}");
        let started = Instant::now();
        let mut labels = BTreeMap::new();
        labels.insert(L_KIND.to_string(), KIND_BUILDING.to_string());
        let new = NewRecord { name: name.clone(), id, size_bytes: self.size, origin: None, labels };
        pd.create_recorded_with(new, |id, _| -> Result<(), SnapError> {
            self.service.with_pool(|pool| {
                pool.create_thin(id.into())?;
                pool.commit()
            })?;
            Ok(())
        })?;
        let stats = match crate::base::format_into(&self.service, id, self.size, pd.dir()) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.delete_device(pd, &name);
                return Err(e);
            }
        };
        let mut labels = BTreeMap::new();
        labels.insert(L_KIND.to_string(), KIND_BASE.to_string());
        pd.set_labels(&name, labels)?;
        eprintln!(
            "thinpool-snapshotter: formatted the base ext4 file system ({} bytes virtual; {} bytes written) in {:.2} s",
            self.size,
            stats.data_bytes,
            started.elapsed().as_secs_f64()
        );
        Ok(name)
    }

    fn delete_device(&self, pd: &mut PoolDir, name: &str) -> Result<(), SnapError> {
        if let crate::attach::Detached::Lazily(dev) = self.attacher.detach(name, true)? {
            eprintln!(
                "thinpool-snapshotter: warning: {dev} (snapshot device \"{name}\") was still open (mounted somewhere?) \
                 when it was removed: disconnected lazily; the kernel frees {dev} when its last user closes it, \
                 and I/O on it fails until then"
            );
        }
        // The kernel closes its connection after the disconnect: give our server a
        // moment to see it go before the engine is asked to delete the device.
        let id = pd.device(name)?.id;
        let until = Instant::now() + DISCONNECT_GRACE;
        while self.service.attached(id) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        pd.delete_with(name, |id| -> Result<(), SnapError> {
            self.service.delete(id).map_err(|e| match self.service.attached(id) {
                0 => SnapError::from(e),
                n => SnapError::FailedPrecondition(format!(
                    "device \"{name}\" is attached by {n} NBD client(s); detach them before removing it"
                )),
            })
        })?;
        self.refresh(pd);
        Ok(())
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapError> {
        let pd = self.dir();
        let r = Self::find(&pd, key)?;
        if r.kind == SnapKind::Committed {
            return Err(SnapError::FailedPrecondition(format!("snapshot \"{key}\" is committed: it has no mounts")));
        }
        self.mounts_of(&r)
    }

    /// Commit active snapshot `key` as `name` (its device is detached first and
    /// is read-only from then on).
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), SnapError> {
        check_key("name", name)?;
        check_labels(&labels)?;
        let mut pd = self.dir();
        let mut r = Self::find(&pd, key)?;
        if r.kind != SnapKind::Active {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot \"{key}\" is {}: only an active snapshot can be committed",
                if r.kind == SnapKind::View { "a view" } else { "committed" }
            )));
        }
        if Self::find(&pd, name).is_ok() {
            return Err(SnapError::AlreadyExists(name.to_string()));
        }
        self.attacher.detach(&r.device, false)?;
        self.service.flush()?;
        r.key = name.to_string();
        r.kind = SnapKind::Committed;
        r.labels = labels;
        r.updated_ns = now_ns();
        pd.set_labels(&r.device, r.to_labels())?;
        Ok(())
    }

    /// Remove a snapshot: detach, delete its device (its blocks are free after the
    /// commit that this is), forget it. Refused while it has children.
    pub fn remove(&self, key: &str) -> Result<(), SnapError> {
        let mut pd = self.dir();
        let r = Self::find(&pd, key)?;
        let children: Vec<String> =
            Self::records(&pd).into_iter().filter(|c| c.parent.as_deref() == Some(key)).map(|c| c.key).collect();
        if !children.is_empty() {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot \"{key}\" has {} child snapshot(s) ({}); remove them first",
                children.len(),
                children.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        self.delete_device(&mut pd, &r.device)
    }

    /// The info of a snapshot.
    pub fn stat(&self, key: &str) -> Result<Info, SnapError> {
        Ok(Self::find(&self.dir(), key)?.info())
    }

    /// Update the labels of `info.name`: with no field paths (or `labels`) they
    /// are replaced; `labels.KEY` sets or (when absent from `info`) removes one.
    pub fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info, SnapError> {
        let mut pd = self.dir();
        let mut r = Self::find(&pd, &info.name)?;
        let given: BTreeMap<String, String> = info.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut labels = r.labels.clone();
        if fieldpaths.is_empty() {
            labels = given.clone();
        }
        for path in fieldpaths {
            if path == "labels" {
                labels = given.clone();
            } else if let Some(k) = path.strip_prefix("labels.") {
                match given.get(k) {
                    Some(v) => labels.insert(k.to_string(), v.clone()),
                    None => labels.remove(k),
                };
            } else {
                return Err(SnapError::InvalidArgument(format!(
                    "cannot update field \"{path}\": only labels and labels.KEY can change"
                )));
            }
        }
        check_labels(&labels)?;
        r.labels = labels;
        r.updated_ns = now_ns();
        pd.set_labels(&r.device, r.to_labels())?;
        Ok(r.info())
    }

    /// Every snapshot that matches one of `filters` (all when there are none).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapError> {
        let filters: Vec<crate::filter::Filter> =
            filters.iter().map(|f| crate::filter::Filter::parse(f)).collect::<Result<_, _>>()?;
        let pd = self.dir();
        Ok(Self::records(&pd)
            .into_iter()
            .map(|r| r.info())
            .filter(|i| filters.is_empty() || filters.iter().any(|f| f.matches(i)))
            .collect())
    }

    /// The snapshot's own bytes, excluding its parent's: the blocks its device maps
    /// that its origin (the parent's device, or the base) does not map to the same
    /// data block — what the layer added or changed, from the two mapping trees,
    /// whatever children share since. Walked in windows of [`USAGE_WINDOW`] virtual
    /// blocks, each under its own short hold of the pool.
    pub fn usage(&self, key: &str) -> Result<Usage, SnapError> {
        let (r, origin) = {
            let pd = self.dir();
            let r = Self::find(&pd, key)?;
            let origin = pd.device(&r.device)?.snapshot_of.as_ref().and_then(|o| pd.device(o).ok()).map(|e| e.id);
            (r, origin)
        };
        let bs = self.service.block_bytes();
        let Some(highest) = self.service.with_pool(|pool| pool.highest_mapped(r.id))? else {
            return Ok(Usage { inodes: 0, size: 0 });
        };
        let mut own: u64 = 0;
        let mut lo = 0u64;
        while lo <= highest {
            let hi = lo.saturating_add(USAGE_WINDOW).min(highest.saturating_add(1));
            own += self.service.with_pool(|pool| -> Result<u64, SnapError> {
                let mine = pool.mappings(r.id, lo, hi)?;
                let theirs: HashMap<u64, u64> = match origin {
                    Some(o) if pool.meta().has_device(o) => {
                        pool.mappings(o, lo, hi)?.into_iter().map(|m| (m.vblock, m.data_block)).collect()
                    }
                    _ => HashMap::new(),
                };
                Ok(mine.iter().filter(|m| theirs.get(&m.vblock) != Some(&m.data_block)).count() as u64)
            })?;
            if hi == u64::MAX {
                break;
            }
            lo = hi;
        }
        Ok(Usage { inodes: 0, size: i64::try_from(own.saturating_mul(bs)).unwrap_or(i64::MAX) })
    }

    /// Devices a crash left half-made: a base whose formatting did not finish (its
    /// scratch file is removed by [`Store::cleanup`] too).
    pub fn leftovers(pd: &PoolDir) -> Vec<String> {
        pd.devices()
            .filter(|(_, e)| e.labels.get(L_KIND).map(String::as_str) == Some(KIND_BUILDING))
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// Remove what a crash left half-made ([`Store::leftovers`]).
    pub fn cleanup(&self) -> Result<CleanupReport, SnapError> {
        let mut pd = self.dir();
        let mut report = CleanupReport::default();
        // Attachments somebody else disconnected: forgotten, Mounts attaches anew;
        // attachments of devices that are gone: detached.
        for (name, dev) in self.attacher.forget_lost()? {
            report.forgotten.push(format!("{dev} ({name})"));
        }
        for (name, a) in self.attacher.attached() {
            if pd.device(&name).is_err() {
                self.attacher.detach(&name, true)?;
                report.forgotten.push(format!("{} ({name})", a.device));
            }
        }
        for name in Self::leftovers(&pd) {
            self.delete_device(&mut pd, &name)?;
            report.removed.push(name);
        }
        // Scratch files of interrupted formatting (none is in use: formatting holds
        // the pool directory's lock, as this does).
        if let Ok(entries) = std::fs::read_dir(pd.dir()) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(crate::base::SCRATCH_PREFIX) && std::fs::remove_file(e.path()).is_ok() {
                    report.removed.push(n);
                }
            }
        }
        Ok(report)
    }

    /// Detach every attached device (on shutdown; one still mounted is disconnected
    /// lazily, with a warning).
    pub fn detach_all(&self) {
        for (name, a) in self.attacher.attached() {
            match self.attacher.detach(&name, true) {
                Ok(crate::attach::Detached::Lazily(dev)) => eprintln!(
                    "thinpool-snapshotter: warning: {dev} (snapshot device \"{name}\") was still mounted at shutdown: \
                     disconnected lazily, I/O on it fails until it is unmounted"
                ),
                Ok(_) => {}
                Err(e) => eprintln!("thinpool-snapshotter: cannot detach {}: {e}", a.device),
            }
        }
    }

    /// The attacher (its attachments, and recovery at start-up).
    pub fn attacher(&self) -> &Attacher {
        &self.attacher
    }

    /// containerd's labels of `info` as a map (helper for the gRPC side).
    pub fn labels_of(labels: HashMap<String, String>) -> BTreeMap<String, String> {
        labels.into_iter().collect()
    }
}
