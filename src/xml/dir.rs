//! Restore into a pool directory.
//!
//! The metadata is built in `metadata.restore-tmp` beside the pool's metadata,
//! committed, given the document's uuid, version and flags, and only then renamed
//! over the old file: a bad document changes nothing, and what a failed restore
//! created (the directory, the data file, the temporary file) is removed again.
//! `pool.toml` keeps the names of the devices that survive; new devices are named
//! `thin<ID>`.
//!
//! Files a restore creates (the directory, the data file, the temporary metadata) get
//! the pool's private modes (0700, 0600) whatever the umask, and an existing
//! directory that becomes a pool is made 0700; an existing data file is used only
//! when it is a regular file.

use std::fs::{File, OpenOptions};
use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::restore::{MetadataBuilder, RestoreSink};
use super::XmlError;
use crate::format::superblock::Superblock;
use crate::io::{FileStorage, MetaStorage};
use crate::pool::{OpenOptions as PoolOpenOptions, Pool};
use crate::volume::{
    create_private, default_metadata_bytes, lock_dir, make_dir_private, open_regular, Access, DirLock, PoolConfig,
    PoolDir, CONFIG_FILE, DATA_FILE, LOCK_FILE, METADATA_FILE, MIN_METADATA_BYTES,
};

/// How to restore into a directory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Replace the metadata of an existing pool (its data file and names are kept).
    pub force: bool,
    /// Size of the new metadata file; default: the old file's size, or the default
    /// for the data size.
    pub metadata_bytes: Option<u64>,
}

/// What a restore into a directory did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSummary {
    /// Devices restored.
    pub devices: usize,
    /// Mappings restored.
    pub mappings: u64,
    /// Data blocks of the pool.
    pub nr_data_blocks: u64,
    /// Bytes per data block.
    pub block_bytes: u64,
}

/// What a restore tells its caller while it runs.
pub trait RestoreEvents {
    /// Bytes of the document read so far.
    fn progress(&mut self, bytes_read: u64);
    /// Things that were not restored as the document has them (sent once the
    /// metadata is committed), and names dropped or added in `pool.toml`.
    fn warnings(&mut self, warnings: Vec<String>);
}

/// A pool directory being restored into, and what to undo if the restore fails.
#[derive(Debug)]
pub struct DirTarget {
    dir: PathBuf,
    metadata: PathBuf,
    tmp: PathBuf,
    data: PathBuf,
    data_file: Option<File>,
    metadata_bytes: Option<u64>,
    existing: Option<PoolDir>,
    lock: Option<DirLock>,
    created_dir: bool,
    created_data: bool,
    done: bool,
}

impl Drop for DirTarget {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let _ = std::fs::remove_file(&self.tmp);
        if self.created_data {
            let _ = std::fs::remove_file(&self.data);
        }
        if self.created_dir {
            let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

fn tmp_path(metadata: &Path) -> PathBuf {
    let mut name = metadata.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".restore-tmp");
    metadata.with_file_name(name)
}

/// Create `path`, which must not exist, for reading and writing, with mode 0600.
fn create_new(path: &Path) -> Result<File, XmlError> {
    create_private(path).map_err(XmlError::io(format!("cannot create {}", path.display())))
}

impl DirTarget {
    /// Check that `dir` can take a restore, and lock it: a new directory, one holding
    /// only a `data` file (or, with `force`, a `metadata` file), or with `force` an
    /// existing writable pool.
    pub fn prepare(dir: &Path, opts: RestoreOptions) -> Result<DirTarget, XmlError> {
        let dir = dir.to_path_buf();
        if dir.join(CONFIG_FILE).exists() {
            return Self::existing(dir, opts);
        }
        let created_dir = !dir.exists();
        if created_dir {
            std::fs::create_dir_all(&dir).map_err(XmlError::io(format!("cannot create {}", dir.display())))?;
            if let Err(e) = make_dir_private(&dir) {
                let _ = std::fs::remove_dir(&dir);
                return Err(XmlError::Io { context: format!("cannot set the mode of {}", dir.display()), source: e });
            }
        }
        let mut t = DirTarget {
            metadata: dir.join(METADATA_FILE),
            tmp: tmp_path(&dir.join(METADATA_FILE)),
            data: dir.join(DATA_FILE),
            data_file: None,
            metadata_bytes: opts.metadata_bytes,
            existing: None,
            lock: None,
            dir: dir.clone(),
            created_dir,
            created_data: false,
            done: false,
        };
        t.lock = Some(lock_dir(&dir, Access::Write)?);
        let entries = std::fs::read_dir(&dir).map_err(XmlError::io(format!("cannot read {}", dir.display())))?;
        for e in entries.flatten() {
            let name = e.file_name();
            if name == LOCK_FILE || name == DATA_FILE {
                continue;
            }
            if name == METADATA_FILE && opts.force {
                if t.metadata_bytes.is_none() {
                    t.metadata_bytes = e.metadata().ok().map(|m| m.len());
                }
                continue;
            }
            return Err(XmlError::Invalid(format!(
                "{} holds {} (a restore goes into a new directory, or one holding only a `data` file; --force replaces an existing `metadata`)",
                dir.display(),
                name.to_string_lossy()
            )));
        }
        if !created_dir {
            make_dir_private(&dir).map_err(XmlError::io(format!("cannot set the mode of {}", dir.display())))?;
        }
        Ok(t)
    }

    fn existing(dir: PathBuf, opts: RestoreOptions) -> Result<DirTarget, XmlError> {
        if !opts.force {
            return Err(XmlError::Invalid(format!(
                "{} already holds a pool; `thinctl restore --force` replaces its metadata (the data file is kept)",
                dir.display()
            )));
        }
        let pd = PoolDir::open(&dir, Access::Write)?;
        if pd.config().options.read_only {
            return Err(XmlError::Invalid(format!(
                "pool {} is read-only: options.read_only is set in pool.toml",
                dir.display()
            )));
        }
        let metadata = pd.metadata_path();
        let existing_len = std::fs::metadata(&metadata).ok().filter(|m| m.is_file()).map(|m| m.len());
        if std::fs::metadata(&metadata).is_ok_and(|m| !m.is_file()) {
            return Err(XmlError::Invalid(format!(
                "{} is not a regular file: restore writes a new file and renames it over the old one",
                metadata.display()
            )));
        }
        Ok(DirTarget {
            tmp: tmp_path(&metadata),
            data: pd.data_path(),
            data_file: None,
            metadata,
            metadata_bytes: opts.metadata_bytes.or(existing_len),
            existing: Some(pd),
            lock: None,
            dir,
            created_dir: false,
            created_data: false,
            done: false,
        })
    }

    /// The data file, big enough already, or created sparse.
    fn open_data(&mut self, nr_data_blocks: u64, bs: u64, data_bytes: u64) -> Result<File, XmlError> {
        let path = &self.data;
        match std::fs::metadata(path) {
            Ok(_) => {
                let f = open_regular(path, true)?;
                let len = f.metadata().map_err(XmlError::io(format!("cannot read {}", path.display())))?.len();
                if len < data_bytes {
                    return Err(XmlError::Invalid(format!(
                        "the data file {} holds {len} bytes but the XML has {nr_data_blocks} data blocks of {bs} bytes ({data_bytes} bytes); grow it first (truncate -s {data_bytes} {})",
                        path.display(),
                        path.display()
                    )));
                }
                Ok(f)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = create_new(path)?;
                self.created_data = true;
                f.set_len(data_bytes).map_err(XmlError::io(format!("cannot size {}", path.display())))?;
                Ok(f)
            }
            Err(e) => Err(XmlError::Io { context: format!("cannot open {}", path.display()), source: e }),
        }
    }

    /// Read the document from `input`, build the metadata, and put it in place of
    /// the directory's; then name the devices in `pool.toml`.
    pub fn restore(
        mut self,
        input: &mut dyn BufRead,
        events: &mut dyn RestoreEvents,
    ) -> Result<RestoreSummary, XmlError> {
        let restored = {
            let mut b = MetadataBuilder::new(&mut self);
            super::read_xml(input, &mut b, &mut |n| events.progress(n))?;
            b.finish()?
        };
        let sb = restored.superblock;
        events.warnings(restored.warnings);
        patch_superblock(&self.tmp, &sb)?;
        std::fs::rename(&self.tmp, &self.metadata).map_err(XmlError::io(format!(
            "cannot rename {} to {}",
            self.tmp.display(),
            self.metadata.display()
        )))?;
        if let Some(parent) = self.metadata.parent() {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        self.done = true;
        self.name_devices(events)?;
        Ok(RestoreSummary {
            devices: restored.devices,
            mappings: restored.mappings,
            nr_data_blocks: sb.nr_data_blocks,
            block_bytes: u64::from(sb.data_block_size) * crate::pool::SECTOR,
        })
    }

    /// `pool.toml` keeps the names of ids that survived.
    fn name_devices(&mut self, events: &mut dyn RestoreEvents) -> Result<(), XmlError> {
        let (m, d) = (open_regular(&self.metadata, false)?, open_regular(&self.data, false)?);
        let mut pool = Pool::open(m, d, PoolOpenOptions { read_only: true })?;
        match self.existing.take() {
            Some(mut pd) => {
                let before: Vec<String> = pd.devices().map(|(n, _)| n.to_string()).collect();
                pd.reconcile(&mut pool)?;
                let _ = pd.take_warnings();
                pd.save()?;
                let after: Vec<String> = pd.devices().map(|(n, _)| n.to_string()).collect();
                let dropped: Vec<&String> = before.iter().filter(|n| !after.contains(n)).collect();
                let added: Vec<&String> = after.iter().filter(|n| !before.contains(n)).collect();
                let mut w = Vec::new();
                if !dropped.is_empty() {
                    w.push(format!("the restored metadata lacks these devices, their names were dropped: {dropped:?}"));
                }
                if !added.is_empty() {
                    w.push(format!("new devices from the XML were named {added:?}"));
                }
                events.warnings(w);
            }
            None => {
                let lock =
                    self.lock.take().ok_or_else(|| XmlError::Invalid("the pool directory is not locked".into()))?;
                PoolDir::from_parts(&self.dir, PoolConfig::default(), &mut pool, lock)?;
            }
        }
        Ok(())
    }
}

impl RestoreSink for DirTarget {
    fn open(&mut self, nr_data_blocks: u64, bs: u64, data_bytes: u64) -> Result<Box<dyn MetaStorage>, XmlError> {
        let data = self.open_data(nr_data_blocks, bs, data_bytes)?;
        let meta_bytes = self.metadata_bytes.unwrap_or_else(|| default_metadata_bytes(data_bytes, bs));
        let meta_bytes = meta_bytes.div_ceil(4096).saturating_mul(4096);
        if meta_bytes < MIN_METADATA_BYTES {
            return Err(XmlError::Invalid(format!(
                "metadata size {meta_bytes} bytes is too small: at least {MIN_METADATA_BYTES} bytes"
            )));
        }
        let tmp = &self.tmp;
        let _ = std::fs::remove_file(tmp);
        let m = create_new(tmp)?;
        m.set_len(meta_bytes).map_err(XmlError::io(format!("cannot size {}", tmp.display())))?;
        let storage = FileStorage::new(m).map_err(XmlError::io(format!("cannot open {}", tmp.display())))?;
        self.data_file = Some(data);
        Ok(Box::new(storage))
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        self.data_file.as_ref().map_or(Ok(()), File::sync_data)
    }
}

/// Set what [`crate::thin::Metadata::format`] does not: uuid, version and flags.
fn patch_superblock(path: &Path, sb: &super::ir::Superblock) -> Result<(), XmlError> {
    let ctx = || path.display().to_string();
    let f = OpenOptions::new().read(true).write(true).open(path).map_err(XmlError::io(ctx()))?;
    let mut raw = crate::format::zeroed_block();
    f.read_exact_at(&mut raw[..], 0).map_err(XmlError::io(ctx()))?;
    let mut s = Superblock::decode(&raw, 0).map_err(|e| XmlError::Invalid(format!("{}: {e}", ctx())))?;
    let mut uuid = [0u8; 16];
    let n = sb.uuid.len().min(16);
    uuid[..n].copy_from_slice(&sb.uuid[..n]);
    if s.uuid == uuid && s.version == sb.version && s.flags == sb.flags {
        return Ok(());
    }
    s.uuid = uuid;
    s.version = sb.version;
    s.flags = sb.flags;
    f.write_all_at(&s.encode(0)[..], 0).map_err(XmlError::io(ctx()))?;
    f.sync_all().map_err(XmlError::io(ctx()))
}

/// Restore the document read from `input` into the pool directory `dir`.
pub fn restore_dir(
    dir: &Path,
    opts: RestoreOptions,
    input: &mut dyn BufRead,
    events: &mut dyn RestoreEvents,
) -> Result<RestoreSummary, XmlError> {
    DirTarget::prepare(dir, opts)?.restore(input, events)
}
