//! Devices whose entry is written *before* the engine creates them, and device labels.
//!
//! [`PoolDir::create_device`] and [`PoolDir::snapshot`] commit the metadata first and
//! save `pool.toml` second, so a crash in between leaves a device named `thin<ID>`
//! with nothing said about it. A program that keeps its own facts about a device in
//! its [`DeviceEntry::labels`] (the containerd snapshotter) needs the opposite order:
//! the entry and its labels are saved first, then the engine creates the device and
//! commits. A crash in between leaves an entry whose device does not exist, which
//! the next open drops ([`PoolDir::reconcile`]), so a device of such a program
//! never exists without its labels.

use std::collections::BTreeMap;

use super::{check_name, check_size, DeviceEntry, PoolDir, PoolDirError};
use crate::thin::DevId;

/// What [`PoolDir::create_recorded_with`] creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// The device's name.
    pub name: String,
    /// Its id (picked by the caller, for instance with [`PoolDir::new_device_id`]).
    pub id: DevId,
    /// Its virtual size in bytes (a snapshot's is its origin's).
    pub size_bytes: u64,
    /// The device to snapshot; `None` creates an empty thin device.
    pub origin: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl PoolDir {
    /// Save the entry of a new device first, then run `create_and_commit(id,
    /// origin_id)`, which must create the device in the engine (a thin device when
    /// `origin_id` is `None`, else a snapshot of it) and commit, or fail changing
    /// nothing. When it fails the entry is removed again (and saved); a crash in
    /// between leaves an entry the next open drops.
    pub fn create_recorded_with<E: From<PoolDirError>>(
        &mut self,
        new: NewRecord,
        create_and_commit: impl FnOnce(DevId, Option<DevId>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.writable()?;
        check_name(&new.name)?;
        check_size(new.size_bytes)?;
        if self.config.devices.contains_key(&new.name) {
            return Err(PoolDirError::NameTaken(new.name).into());
        }
        if let Some(other) = self.name_of(new.id) {
            return Err(PoolDirError::IdTaken { id: new.id, name: other.to_string() }.into());
        }
        let origin_id = match &new.origin {
            Some(o) => Some(self.device(o)?.id),
            None => None,
        };
        let entry = DeviceEntry {
            id: new.id,
            size_bytes: new.size_bytes,
            created: Some(now_unix()),
            snapshot_of: new.origin.clone(),
            labels: new.labels,
        };
        self.config.devices.insert(new.name.clone(), entry);
        if let Err(e) = self.save() {
            self.config.devices.remove(&new.name);
            return Err(e.into());
        }
        if let Err(e) = create_and_commit(new.id, origin_id) {
            self.config.devices.remove(&new.name);
            let _ = self.save();
            return Err(e);
        }
        Ok(())
    }

    /// Replace the labels of device `name` and save `pool.toml`.
    pub fn set_labels(&mut self, name: &str, labels: BTreeMap<String, String>) -> Result<(), PoolDirError> {
        self.writable()?;
        self.device(name)?;
        let old = match self.config.devices.get_mut(name) {
            Some(e) => std::mem::replace(&mut e.labels, labels),
            None => return Err(PoolDirError::NoSuchDevice { name: name.to_string(), known: Vec::new() }),
        };
        if let Err(e) = self.save() {
            if let Some(entry) = self.config.devices.get_mut(name) {
                entry.labels = old;
            }
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{Access, CreateOptions};

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_recorded_device_is_saved_with_its_labels_and_a_failed_creation_leaves_nothing() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("p");
        let opts = CreateOptions { data_bytes: 16 << 20, ..Default::default() };
        let (mut pd, mut pool) = PoolDir::create(&dir, &opts).expect("create");
        let new = NewRecord {
            name: "base".into(),
            id: 3,
            size_bytes: 1 << 30,
            origin: None,
            labels: labels(&[("kind", "base")]),
        };
        pd.create_recorded_with(new, |id, origin| -> Result<(), PoolDirError> {
            assert_eq!(origin, None);
            pool.create_thin(id.into())?;
            pool.commit()?;
            Ok(())
        })
        .expect("base");
        let snap = NewRecord {
            name: "s".into(),
            id: 4,
            size_bytes: 1 << 30,
            origin: Some("base".into()),
            labels: labels(&[("kind", "active"), ("key", "a/b:c")]),
        };
        pd.create_recorded_with(snap, |id, origin| -> Result<(), PoolDirError> {
            pool.create_snap(id.into(), origin.expect("origin").into())?;
            pool.commit()?;
            Ok(())
        })
        .expect("snapshot");
        let failed = NewRecord { name: "f".into(), id: 5, size_bytes: 1 << 30, origin: None, labels: labels(&[]) };
        let r = pd.create_recorded_with(failed, |_, _| Err(PoolDirError::Invalid("refused".into())));
        assert!(matches!(r, Err(PoolDirError::Invalid(_))));
        pd.set_labels("base", labels(&[("kind", "base"), ("ready", "yes")])).expect("labels");
        drop((pd, pool));
        let mut pd = PoolDir::open(&dir, Access::Write).expect("open");
        let _pool = pd.open_pool().expect("pool");
        assert!(pd.warnings().is_empty(), "{:?}", pd.warnings());
        assert_eq!(pd.device("base").expect("base").labels, labels(&[("kind", "base"), ("ready", "yes")]));
        let s = pd.device("s").expect("s");
        assert_eq!((s.id, s.snapshot_of.as_deref()), (4, Some("base")));
        assert_eq!(s.labels.get("key").map(String::as_str), Some("a/b:c"));
        assert!(pd.device("f").is_err());
    }

    #[test]
    fn an_entry_saved_before_a_crash_that_kept_the_device_from_being_made_is_dropped_at_open() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("p");
        let opts = CreateOptions { data_bytes: 16 << 20, ..Default::default() };
        let (mut pd, pool) = PoolDir::create(&dir, &opts).expect("create");
        let new = NewRecord { name: "half".into(), id: 0, size_bytes: 1 << 20, origin: None, labels: labels(&[]) };
        // The "crash": the entry is saved, the engine never creates the device.
        let r = pd.create_recorded_with(new, |_, _| -> Result<(), PoolDirError> {
            let text = std::fs::read_to_string(dir.join("pool.toml")).expect("read");
            assert!(text.contains("[devices.half]"), "saved before the engine runs: {text}");
            std::fs::copy(dir.join("pool.toml"), dir.join("crashed.toml")).expect("copy");
            Err(PoolDirError::Invalid("crash".into()))
        });
        assert!(r.is_err());
        drop((pd, pool));
        std::fs::rename(dir.join("crashed.toml"), dir.join("pool.toml")).expect("restore");
        let mut pd = PoolDir::open(&dir, Access::Write).expect("open");
        let _pool = pd.open_pool().expect("pool");
        assert!(pd.device("half").is_err());
        assert_eq!(pd.warnings().len(), 1, "{:?}", pd.warnings());
    }
}
