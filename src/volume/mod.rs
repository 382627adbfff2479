//! A pool directory: the dm-thin metadata file, the data file and `pool.toml`.
//!
//! dm-thin keeps only device ids, mappings and a few counters in its metadata; what a
//! person calls a device (its name and virtual size) lives outside it, as LVM keeps
//! it in its own metadata. Here it lives in `pool.toml`, a small human-readable file
//! beside the two pool files:
//!
//! ```toml
//! format = 1
//! # metadata = "/elsewhere/metadata"   # only when the file lives outside the directory
//! # data = "/elsewhere/data"
//!
//! [options]
//! read_only = false
//! # data_threshold = 80          # thinctl pool set: thresholds, autoextend, no-space
//! # metadata_threshold = 75      # policy (all optional; see HealthOptions)
//! # autoextend_percent = 20
//! # autoextend_max_bytes = 1099511627776
//! # no_space = "queue"           # or "error"
//! # no_space_timeout_s = 60
//!
//! [devices.web]
//! id = 0
//! size_bytes = 10737418240
//! created = 1732329720        # wall clock, unix seconds (UTC)
//!
//! [devices.web-snap]
//! id = 1
//! size_bytes = 10737418240
//! created = 1732329800
//! snapshot_of = "web"
//!
//! [identities.web-snap]      # replication (thinctl send/receive): see `replication`
//! uuid = "0f8a…"             # 32 hex digits
//! id = 1                     # the stamp under which the identity holds
//! root = 1234
//! mapped_blocks = 46
//! size_bytes = 10737418240
//! ```
//!
//! A top-level `hidden = [ids]` lists the hidden work devices of sends and receives
//! in progress (deleted at the next writable open when they have no name).
//!
//! Rules:
//! - `pool.toml` is only ever replaced atomically: written to a temporary file,
//!   fsynced, renamed over the old one, and the directory fsynced.
//! - A change is committed to the metadata first and written to `pool.toml` second.
//!   A crash in between never loses a device: on open, a device the metadata has but
//!   `pool.toml` lacks appears as `thin<ID>`, sized to its highest mapped block, and a
//!   name whose device the metadata no longer has is dropped; both with a warning
//!   ([`PoolDir::warnings`]).
//! - Commands that change the pool hold an exclusive `flock` on `pool.lock`, readers a
//!   shared one; both are non-blocking, so a second writer (or a server, which holds
//!   the exclusive lock for as long as it runs) gets [`PoolDirError::Busy`].
//! - `pool.toml` is untrusted input: a malformed file is an error naming the file and
//!   the problem, never a panic.
//!
//! Default metadata size (`pool create` without `--metadata-size`): the kernel
//! documentation's rule of thumb, 48 bytes per data block (48 × data size / block
//! size), at least 2 MiB and at most 16 GiB (the format cannot address more than
//! 255 × 16320 metadata blocks, about 15.9 GiB; the rest would be ignored), rounded up to
//! whole 4 KiB metadata blocks. It leaves room for roughly one full copy of every
//! mapping (a snapshot that diverges completely) on top of the mappings themselves.

mod changes;
mod config;
mod error;
mod files;
mod lock;
mod records;
mod replication;

pub use changes::{cut_after, discard_blocks, ChangeOutcome, Grow, PoolChange};
pub use config::{
    block_sectors, check_name, check_size, default_metadata_bytes, metadata_bytes_needed, CreateOptions, DeviceEntry,
    PoolConfig, PoolOptions, CONFIG_FILE, CONFIG_FORMAT, DATA_FILE, DEFAULT_BLOCK_BYTES, DEFAULT_DATA_BYTES,
    DEFAULT_DIR, LOCK_FILE, MAX_DEFAULT_METADATA_BYTES, MAX_DEVICE_BYTES, MAX_NAME_LEN, METADATA_FILE,
    MIN_DEFAULT_METADATA_BYTES, MIN_METADATA_BYTES,
};
pub use config::{
    HealthChange, HealthOptions, NoSpaceMode, Setting, DEFAULT_NO_SPACE, DEFAULT_NO_SPACE_TIMEOUT_S,
    MAX_NO_SPACE_TIMEOUT_S,
};
pub use error::PoolDirError;
pub use files::{create_private, make_dir_private, open_regular, DIR_MODE, FILE_MODE};
pub use lock::{lock_dir, Access, DirLock};
pub use records::NewRecord;
pub use replication::{IdentityEntry, IdentityState};

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use config::mapped_end;
use error::io_err;
use files::{loose_mode, stat_regular};

use crate::format::MAX_DATA_BLOCKS;
use crate::pool::{OpenOptions as PoolOpenOptions, Pool};
use crate::thin::DevId;

/// An open pool directory: its description, lock and file locations.
#[derive(Debug)]
pub struct PoolDir {
    dir: PathBuf,
    config: PoolConfig,
    access: Access,
    _lock: DirLock,
    warnings: Vec<String>,
}

/// Make `dir` ready for a new pool: create it, or accept it when it is empty; either
/// way it gets mode 0700. Returns whether it was created.
fn prepare_new_dir(dir: &Path) -> Result<bool, PoolDirError> {
    let created = check_new_dir(dir)?;
    if let Err(e) = make_dir_private(dir) {
        if created {
            let _ = std::fs::remove_dir(dir);
        }
        return Err(io_err("cannot set the mode of", dir)(e));
    }
    Ok(created)
}

fn check_new_dir(dir: &Path) -> Result<bool, PoolDirError> {
    match std::fs::read_dir(dir) {
        Ok(mut it) => {
            if dir.join(CONFIG_FILE).exists() {
                return Err(PoolDirError::Exists { dir: dir.to_path_buf(), why: "it already holds a pool".into() });
            }
            if it.any(|e| e.map_or(true, |e| e.file_name() != LOCK_FILE)) {
                return Err(PoolDirError::Exists {
                    dir: dir.to_path_buf(),
                    why: "the directory is not empty; choose a new or empty directory".into(),
                });
            }
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io_err("cannot create directory", dir))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            Err(PoolDirError::Exists { dir: dir.to_path_buf(), why: "it exists and is not a directory".into() })
        }
        Err(e) => Err(io_err("cannot read directory", dir)(e)),
    }
}

/// Files created while making a pool, removed again when making it fails.
struct Undo {
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
    armed: bool,
}

impl Undo {
    fn new(dir: &Path, created_dir: bool) -> Undo {
        Undo { files: vec![dir.join(LOCK_FILE)], dir: created_dir.then(|| dir.to_path_buf()), armed: true }
    }
    fn done(mut self) {
        self.armed = false;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

fn create_file(path: &Path, len: u64, undo: &mut Undo) -> Result<File, PoolDirError> {
    let f = create_private(path).map_err(io_err("cannot create", path))?;
    undo.files.push(path.to_path_buf());
    f.set_len(len).map_err(io_err("cannot size", path))?;
    Ok(f)
}

impl PoolDir {
    /// Open the pool in `dir`: lock it and read `pool.toml`. The engine's files are
    /// opened by [`PoolDir::open_pool`].
    ///
    /// `pool.toml`, and the metadata and data files when they exist, must be regular
    /// files ([`PoolDirError::NotRegular`]); a directory or file the user may not read
    /// is [`PoolDirError::PermissionDenied`]. A pool directory, `pool.toml` or own
    /// metadata or data file that other users may access gives a warning
    /// ([`PoolDir::take_warnings`]).
    pub fn open(dir: &Path, access: Access) -> Result<PoolDir, PoolDirError> {
        let cfg_path = dir.join(CONFIG_FILE);
        let dir_meta = match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => m,
            Ok(_) => return Err(PoolDirError::NotAPool { dir: dir.into(), why: "it is not a directory".into() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PoolDirError::NotAPool { dir: dir.into(), why: "the directory does not exist".into() })
            }
            Err(e) => return Err(io_err("cannot read", dir)(e)),
        };
        match std::fs::metadata(&cfg_path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PoolDirError::NotAPool { dir: dir.into(), why: format!("it has no {CONFIG_FILE}") })
            }
            // Looking into a directory one may not search fails on its entries.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(PoolDirError::PermissionDenied { what: "cannot read the pool directory", path: dir.into() })
            }
            Err(e) => return Err(io_err("cannot read", &cfg_path)(e)),
        }
        let cfg_file = open_regular(&cfg_path, false)?;
        let lock = lock_dir(dir, access)?;
        let mut text = String::new();
        (&cfg_file).read_to_string(&mut text).map_err(io_err("cannot read", &cfg_path))?;
        let config = PoolConfig::parse(&text, &cfg_path)?;
        let mut pd = PoolDir { dir: dir.to_path_buf(), config, access, _lock: lock, warnings: Vec::new() };
        pd.warnings.extend(loose_mode(dir, &dir_meta, true));
        let cfg_meta = cfg_file.metadata().map_err(io_err("cannot read", &cfg_path))?;
        pd.warnings.extend(loose_mode(&cfg_path, &cfg_meta, false));
        // The engine's files: refused now when they are not regular files (commands
        // that read them without opening the pool, such as `check`, rely on this);
        // their modes are only ours to judge when they live in the directory.
        let own = [(pd.metadata_path(), pd.config.metadata.is_none()), (pd.data_path(), pd.config.data.is_none())];
        for (path, own) in own {
            if let Some(m) = stat_regular(&path)? {
                if own {
                    pd.warnings.extend(loose_mode(&path, &m, false));
                }
            }
        }
        Ok(pd)
    }

    /// Create a new pool in `dir` (which must not exist or be empty): a sparse data
    /// file, formatted metadata and `pool.toml`. Nothing is left behind on failure.
    pub fn create(dir: &Path, opts: &CreateOptions) -> Result<(PoolDir, Pool), PoolDirError> {
        let sectors = block_sectors(opts.block_bytes)?;
        let nr_blocks = opts.data_bytes / opts.block_bytes;
        if nr_blocks == 0 {
            return Err(PoolDirError::Invalid(format!(
                "data size {} bytes is less than one block ({} bytes)",
                opts.data_bytes, opts.block_bytes
            )));
        }
        if nr_blocks > MAX_DATA_BLOCKS {
            return Err(PoolDirError::Invalid(format!("{nr_blocks} data blocks: dm-thin allows at most 2^40")));
        }
        let meta_bytes = match opts.metadata_bytes {
            Some(m) => {
                let m = m.div_ceil(4096).saturating_mul(4096);
                if m < MIN_METADATA_BYTES {
                    return Err(PoolDirError::Invalid(format!(
                        "metadata size {m} bytes is too small: at least {MIN_METADATA_BYTES} bytes (64 blocks of 4 KiB)"
                    )));
                }
                m
            }
            None => default_metadata_bytes(nr_blocks * opts.block_bytes, opts.block_bytes),
        };
        let created_dir = prepare_new_dir(dir)?;
        let mut undo = Undo::new(dir, created_dir);
        let lock = lock_dir(dir, Access::Write)?;
        let mpath = dir.join(METADATA_FILE);
        let dpath = dir.join(DATA_FILE);
        let m = create_file(&mpath, meta_bytes, &mut undo)?;
        let d = create_file(&dpath, nr_blocks * opts.block_bytes, &mut undo)?;
        let mut pool = Pool::create(m, d, sectors)?;
        pool.commit()?;
        let pd = PoolDir {
            dir: dir.to_path_buf(),
            config: PoolConfig::default(),
            access: Access::Write,
            _lock: lock,
            warnings: Vec::new(),
        };
        undo.files.push(dir.join(CONFIG_FILE));
        pd.save()?;
        undo.done();
        Ok((pd, pool))
    }

    /// Adopt an existing dm-thin metadata/data pair (written by the kernel or LVM):
    /// `dir` (new or empty) gets a `pool.toml` pointing at the two files, which are
    /// opened read-only here and not changed by a byte. Devices are named `thin<ID>`;
    /// `sizes` gives virtual sizes by id, the others get the size of their highest
    /// mapped block.
    pub fn adopt(
        dir: &Path,
        metadata: &Path,
        data: &Path,
        sizes: &BTreeMap<DevId, u64>,
    ) -> Result<(PoolDir, Pool), PoolDirError> {
        let abs = |p: &Path| -> Result<String, PoolDirError> {
            let c = std::fs::canonicalize(p).map_err(io_err("cannot find", p))?;
            c.to_str().map(str::to_string).ok_or_else(|| {
                PoolDirError::Invalid(format!("{}: the path is not UTF-8, which pool.toml cannot hold", c.display()))
            })
        };
        for &size in sizes.values() {
            check_size(size)?;
        }
        let mabs = abs(metadata)?;
        let dabs = abs(data)?;
        if mabs == dabs {
            return Err(PoolDirError::Invalid("the metadata and data files are the same file".into()));
        }
        let m = open_regular(Path::new(&mabs), false)?;
        let d = open_regular(Path::new(&dabs), false)?;
        let mut pool = Pool::open(m, d, PoolOpenOptions { read_only: true })?;
        let ids = pool.meta().device_ids();
        if let Some(bad) = sizes.keys().find(|id| !ids.contains(id)) {
            return Err(PoolDirError::Invalid(format!(
                "--size {bad}=...: the metadata has no device {bad} (devices: {})",
                ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
        let created_dir = prepare_new_dir(dir)?;
        let mut undo = Undo::new(dir, created_dir);
        let lock = lock_dir(dir, Access::Write)?;
        let mut config = PoolConfig { metadata: Some(mabs), data: Some(dabs), ..PoolConfig::default() };
        let bs = pool.block_bytes();
        let mut warnings = Vec::new();
        for id in ids {
            let highest = pool.highest_mapped(id)?;
            let mapped_end = mapped_end(highest, bs);
            let size = match sizes.get(&id) {
                Some(&s) => {
                    if s < mapped_end {
                        warnings.push(format!(
                            "device {id} maps blocks up to byte {mapped_end}, past the size given ({s} bytes); they stay mapped but unreachable"
                        ));
                    }
                    s
                }
                None => {
                    warnings.push(format!(
                        "device {id}: no --size {id}=SIZE given; using {mapped_end} bytes (its highest mapped block)"
                    ));
                    mapped_end
                }
            };
            config.devices.insert(
                format!("thin{id}"),
                DeviceEntry { id, size_bytes: size, created: None, snapshot_of: None, labels: Default::default() },
            );
        }
        let pd = PoolDir { dir: dir.to_path_buf(), config, access: Access::Read, _lock: lock, warnings };
        undo.files.push(dir.join(CONFIG_FILE));
        pd.save()?;
        undo.done();
        Ok((pd, pool))
    }

    /// A pool directory around a prepared (restored) metadata file in `dir`, which the
    /// caller has locked with [`lock_dir`]: `pool.toml` is written from `config` after
    /// naming every device of `pool` it lacks `thin<ID>` (quietly: they are new).
    pub fn from_parts(dir: &Path, config: PoolConfig, pool: &mut Pool, lock: DirLock) -> Result<PoolDir, PoolDirError> {
        let mut pd =
            PoolDir { dir: dir.to_path_buf(), config, access: Access::Write, _lock: lock, warnings: Vec::new() };
        pd.reconcile(pool)?;
        pd.warnings.clear();
        pd.save()?;
        Ok(pd)
    }

    /// The pool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The description as read (and reconciled).
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// How the directory was opened.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Warnings gathered so far (recovered or dropped names, adopt sizes); taking them
    /// empties the list.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    /// Warnings gathered so far.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    fn resolve(&self, p: &Option<String>, default: &str) -> PathBuf {
        match p {
            Some(p) => self.dir.join(p),
            None => self.dir.join(default),
        }
    }

    /// Path of the metadata file.
    pub fn metadata_path(&self) -> PathBuf {
        self.resolve(&self.config.metadata, METADATA_FILE)
    }

    /// Path of the data file.
    pub fn data_path(&self) -> PathBuf {
        self.resolve(&self.config.data, DATA_FILE)
    }

    /// Open the engine's pool (read-only for [`Access::Read`]) and reconcile
    /// `pool.toml` with the metadata; with [`Access::Write`] a reconciled description
    /// is saved at once.
    pub fn open_pool(&mut self) -> Result<Pool, PoolDirError> {
        let write = self.access == Access::Write;
        if write && self.config.options.read_only {
            return Err(PoolDirError::ReadOnly { dir: self.dir.clone(), why: "options.read_only is set in pool.toml" });
        }
        let (mpath, dpath) = (self.metadata_path(), self.data_path());
        let m = open_regular(&mpath, write)?;
        let d = open_regular(&dpath, write)?;
        let mut pool = Pool::open(m, d, PoolOpenOptions { read_only: !write })?;
        if write {
            self.clean_hidden(&mut pool)?;
        }
        if self.reconcile(&mut pool)? && write {
            self.save()?;
        }
        Ok(pool)
    }

    /// Make the names agree with the metadata (see the module documentation).
    /// Returns whether anything changed.
    pub fn reconcile(&mut self, pool: &mut Pool) -> Result<bool, PoolDirError> {
        let ids: BTreeSet<DevId> = pool.meta().device_ids().into_iter().collect();
        let mut changed = false;
        let gone: Vec<(String, DevId)> =
            self.config.devices.iter().filter(|(_, e)| !ids.contains(&e.id)).map(|(n, e)| (n.clone(), e.id)).collect();
        for (name, id) in gone {
            self.forget(&name);
            self.warnings.push(format!(
                "device \"{name}\" (id {id}) is not in the metadata any more (a change was committed but pool.toml was not updated): dropped its name"
            ));
            changed = true;
        }
        let known: BTreeSet<DevId> =
            self.config.devices.values().map(|e| e.id).chain(self.config.hidden.iter().copied()).collect();
        let bs = pool.block_bytes();
        for id in ids.difference(&known).copied().collect::<Vec<_>>() {
            let highest = pool.highest_mapped(id)?;
            let size = mapped_end(highest, bs);
            let name = self.free_name(&format!("thin{id}"));
            self.warnings.push(format!(
                "device {id} is in the metadata but not in pool.toml (a change was committed but pool.toml was not updated): added as \"{name}\" with size {size} bytes (its highest mapped block)"
            ));
            self.config.devices.insert(
                name,
                DeviceEntry { id, size_bytes: size, created: None, snapshot_of: None, labels: Default::default() },
            );
            changed = true;
        }
        Ok(changed)
    }

    fn free_name(&self, base: &str) -> String {
        if !self.config.devices.contains_key(base) {
            return base.to_string();
        }
        (1u64..).map(|i| format!("{base}-{i}")).find(|n| !self.config.devices.contains_key(n)).unwrap_or_default()
    }

    /// Remove a name and every `snapshot_of` pointing at it.
    fn forget(&mut self, name: &str) {
        self.config.devices.remove(name);
        self.config.identities.remove(name);
        for e in self.config.devices.values_mut() {
            if e.snapshot_of.as_deref() == Some(name) {
                e.snapshot_of = None;
            }
        }
    }

    /// Every device, by name.
    pub fn devices(&self) -> impl Iterator<Item = (&str, &DeviceEntry)> {
        self.config.devices.iter().map(|(n, e)| (n.as_str(), e))
    }

    /// The device called `name`.
    pub fn device(&self, name: &str) -> Result<&DeviceEntry, PoolDirError> {
        self.config.devices.get(name).ok_or_else(|| {
            let mut known: Vec<(&DevId, &String)> = self.config.devices.iter().map(|(n, e)| (&e.id, n)).collect();
            known.sort();
            PoolDirError::NoSuchDevice {
                name: name.to_string(),
                known: known.into_iter().map(|(_, n)| n.clone()).collect(),
            }
        })
    }

    /// The name of device `id`.
    pub fn name_of(&self, id: DevId) -> Option<&str> {
        self.config.devices.iter().find(|(_, e)| e.id == id).map(|(n, _)| n.as_str())
    }

    fn writable(&self) -> Result<(), PoolDirError> {
        if self.access != Access::Write {
            return Err(PoolDirError::ReadOnly { dir: self.dir.clone(), why: "it was opened for reading only" });
        }
        if self.config.options.read_only {
            return Err(PoolDirError::ReadOnly { dir: self.dir.clone(), why: "options.read_only is set in pool.toml" });
        }
        Ok(())
    }

    /// Write `pool.toml` atomically: temporary file (mode 0600), fsync, rename, fsync
    /// directory.
    pub fn save(&self) -> Result<(), PoolDirError> {
        let text = self.config.to_text()?;
        let path = self.dir.join(CONFIG_FILE);
        let tmp = self.dir.join(format!(".{CONFIG_FILE}.tmp"));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(FILE_MODE)
                .open(&tmp)
                .map_err(io_err("cannot create", &tmp))?;
            f.set_permissions(Permissions::from_mode(FILE_MODE)).map_err(io_err("cannot set the mode of", &tmp))?;
            f.write_all(text.as_bytes()).map_err(io_err("cannot write", &tmp))?;
            f.sync_all().map_err(io_err("cannot sync", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err("cannot replace", &path))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err("cannot sync directory", &self.dir))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}
