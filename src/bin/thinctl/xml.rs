//! `dump` and `restore`: the metadata as thin_dump's XML (spec §7).
//!
//! The dump is byte for byte what Debian's `thin_dump` 0.9 prints: no XML
//! declaration, two spaces of indent per level, devices in ascending id order,
//! mappings in ascending virtual block order folded into `range_mapping` runs
//! (consecutive virtual and data blocks with the same time) and `single_mapping`s,
//! and `uuid=""` (thin_dump 0.9 prints an empty uuid whatever the superblock holds).
//!
//! Restore builds fresh metadata from such XML (from thin_dump 0.9, 1.x without
//! `def`/`ref` blocks, or our dump) into a temporary file, commits it, and only then
//! renames it over the pool's metadata: a bad document changes nothing. Everything in
//! the document is untrusted: numbers are range-checked, nesting is enforced, and a
//! mapping that points past the data space or maps a block twice is an error.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use thinpool::format::superblock::Superblock;
use thinpool::format::{MAX_DATA_BLOCKS, MAX_DEV_ID};
use thinpool::io::FileStorage;
use thinpool::pool::{OpenOptions as PoolOpenOptions, Pool, SECTOR};
use thinpool::thin::{DevId, Metadata};
use thinpool::volume::{
    default_metadata_bytes, lock_dir, Access, DirLock, PoolConfig, PoolDir, CONFIG_FILE, DATA_FILE, LOCK_FILE,
    METADATA_FILE, MIN_METADATA_BYTES,
};

use crate::cli::{default_dir, RestoreArgs};
use crate::commands::{open_pool, warn_all};
use crate::progress::{Progress, Unit};
use crate::{msg, CliError, CliResult};

/// Mappings fetched per step while dumping.
const WINDOW: u64 = 4096;

/// `thinctl dump`.
pub fn dump(dir: &Path) -> CliResult {
    let (_pd, mut pool) = open_pool(dir, Access::Read)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    write_dump(&mut pool, &mut out).map_err(|e| match e {
        DumpError::Io(e) => msg(format!("cannot write the dump: {e}")),
        DumpError::Cli(e) => e,
    })?;
    out.flush().map_err(|e| msg(format!("cannot write the dump: {e}")))
}

enum DumpError {
    Io(std::io::Error),
    Cli(CliError),
}

impl From<std::io::Error> for DumpError {
    fn from(e: std::io::Error) -> Self {
        DumpError::Io(e)
    }
}

impl From<thinpool::error::PoolError> for DumpError {
    fn from(e: thinpool::error::PoolError) -> Self {
        DumpError::Cli(e.into())
    }
}

/// A run of mappings being folded.
#[derive(Clone, Copy)]
struct Run {
    origin: u64,
    data: u64,
    len: u64,
    time: u32,
}

fn write_run(out: &mut dyn Write, r: &Run) -> std::io::Result<()> {
    if r.len == 1 {
        writeln!(
            out,
            "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"{}\"/>",
            r.origin, r.data, r.time
        )
    } else {
        writeln!(
            out,
            "    <range_mapping origin_begin=\"{}\" data_begin=\"{}\" length=\"{}\" time=\"{}\"/>",
            r.origin, r.data, r.len, r.time
        )
    }
}

fn write_dump(pool: &mut Pool, out: &mut dyn Write) -> Result<(), DumpError> {
    let sb = pool.meta().superblock().clone();
    let ids = pool.meta().device_ids();
    let mut total = 0u64;
    for &id in &ids {
        total += pool.meta().device_info(id)?.mapped_blocks;
    }
    let mut bar = Progress::new("dumping", total.max(1), Unit::Items);
    writeln!(
        out,
        "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\">",
        sb.time, sb.trans_id, sb.flags, sb.version, sb.data_block_size, sb.data_sm_root.nr_blocks
    )?;
    let mut done = 0u64;
    for id in ids {
        let info = pool.meta().device_info(id)?;
        writeln!(
            out,
            "  <device dev_id=\"{id}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"{}\">",
            info.mapped_blocks, info.transaction_id, info.creation_time, info.snapshotted_time
        )?;
        let mut run: Option<Run> = None;
        let mut vb = 0u64;
        loop {
            let batch = pool.metadata().mapping_window(id, vb, u64::MAX, WINDOW)?;
            let Some(last) = batch.last().map(|m| m.vblock) else { break };
            for m in batch {
                let (v, d, t) = (m.vblock, m.data_block, m.time);
                run = match run {
                    Some(r) if r.origin + r.len == v && r.data + r.len == d && r.time == t => {
                        Some(Run { len: r.len + 1, ..r })
                    }
                    Some(r) => {
                        write_run(out, &r)?;
                        Some(Run { origin: v, data: d, len: 1, time: t })
                    }
                    None => Some(Run { origin: v, data: d, len: 1, time: t }),
                };
                done += 1;
            }
            bar.set(done);
            match last.checked_add(1) {
                Some(n) => vb = n,
                None => break,
            }
        }
        if let Some(r) = run {
            write_run(out, &r)?;
        }
        writeln!(out, "  </device>")?;
    }
    writeln!(out, "</superblock>")?;
    Ok(())
}

/// Where a restore writes, and what to undo if it fails.
struct Target {
    dir: PathBuf,
    metadata: PathBuf,
    tmp: PathBuf,
    data: PathBuf,
    metadata_bytes: Option<u64>,
    existing: Option<PoolDir>,
    lock: Option<DirLock>,
    created_dir: bool,
    created_data: bool,
    done: bool,
}

impl Drop for Target {
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

fn prepare_target(args: &RestoreArgs) -> CliResult<Target> {
    let dir = args.dir.clone().unwrap_or_else(default_dir);
    if dir.join(CONFIG_FILE).exists() {
        if !args.force {
            return Err(msg(format!(
                "{} already holds a pool; `thinctl restore --force` replaces its metadata (the data file is kept)",
                dir.display()
            )));
        }
        let pd = PoolDir::open(&dir, Access::Write)?;
        if pd.config().options.read_only {
            return Err(msg(format!("pool {} is read-only: options.read_only is set in pool.toml", dir.display())));
        }
        let metadata = pd.metadata_path();
        let existing_len = std::fs::metadata(&metadata).ok().filter(|m| m.is_file()).map(|m| m.len());
        if std::fs::metadata(&metadata).is_ok_and(|m| !m.is_file()) {
            return Err(msg(format!(
                "{} is not a regular file: restore writes a new file and renames it over the old one",
                metadata.display()
            )));
        }
        return Ok(Target {
            tmp: tmp_path(&metadata),
            data: pd.data_path(),
            metadata,
            metadata_bytes: args.metadata_size.or(existing_len),
            existing: Some(pd),
            lock: None,
            dir,
            created_dir: false,
            created_data: false,
            done: false,
        });
    }
    let created_dir = !dir.exists();
    if created_dir {
        std::fs::create_dir_all(&dir).map_err(|e| msg(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut t = Target {
        metadata: dir.join(METADATA_FILE),
        tmp: tmp_path(&dir.join(METADATA_FILE)),
        data: dir.join(DATA_FILE),
        metadata_bytes: args.metadata_size,
        existing: None,
        lock: None,
        dir: dir.clone(),
        created_dir,
        created_data: false,
        done: false,
    };
    t.lock = Some(lock_dir(&dir, Access::Write)?);
    let entries = std::fs::read_dir(&dir).map_err(|e| msg(format!("cannot read {}: {e}", dir.display())))?;
    for e in entries.flatten() {
        let name = e.file_name();
        if name == LOCK_FILE || name == DATA_FILE {
            continue;
        }
        if name == METADATA_FILE && args.force {
            if t.metadata_bytes.is_none() {
                t.metadata_bytes = e.metadata().ok().map(|m| m.len());
            }
            continue;
        }
        return Err(msg(format!(
            "{} holds {} (a restore goes into a new directory, or one holding only a `data` file; --force replaces an existing `metadata`)",
            dir.display(),
            name.to_string_lossy()
        )));
    }
    Ok(t)
}

fn tmp_path(metadata: &Path) -> PathBuf {
    let mut name = metadata.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".restore-tmp");
    metadata.with_file_name(name)
}

/// The superblock fields restore needs.
struct SbAttrs {
    uuid: Vec<u8>,
    time: u32,
    transaction: u64,
    flags: u32,
    version: u32,
    data_block_size: u32,
    nr_data_blocks: u64,
}

/// Restore state while the document is read.
struct Builder<'t> {
    target: &'t mut Target,
    md: Option<Metadata>,
    data: Option<File>,
    sb: Option<SbAttrs>,
    /// Current device and the highest virtual block mapped in it so far.
    device: Option<(DevId, Option<u64>)>,
    devices: Vec<DevId>,
    mapped_attr: HashMap<DevId, u64>,
    mappings: u64,
    warnings: Vec<String>,
}

fn attributes(e: &BytesStart<'_>) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for a in e.attributes() {
        let a = a.map_err(|e| format!("bad attribute: {e}"))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a.unescape_value().map_err(|e| format!("bad value of {key}: {e}"))?.into_owned();
        out.insert(key, value);
    }
    Ok(out)
}

fn num<T: FromStr>(attrs: &HashMap<String, String>, elem: &str, name: &str) -> Result<T, String> {
    let v = attrs.get(name).ok_or_else(|| format!("<{elem}> lacks the {name} attribute"))?;
    v.trim().parse().map_err(|_| format!("<{elem} {name}=\"{v}\">: not a number in range"))
}

fn num_or<T: FromStr>(attrs: &HashMap<String, String>, elem: &str, name: &str, default: T) -> Result<T, String> {
    if attrs.contains_key(name) {
        num(attrs, elem, name)
    } else {
        Ok(default)
    }
}

impl Builder<'_> {
    fn md(&mut self) -> Result<&mut Metadata, String> {
        self.md.as_mut().ok_or_else(|| "no <superblock> before the devices".to_string())
    }

    fn superblock(&mut self, a: &HashMap<String, String>) -> Result<(), String> {
        let e = "superblock";
        let uuid = a.get("uuid").cloned().unwrap_or_default().into_bytes();
        let sb = SbAttrs {
            uuid,
            time: num(a, e, "time")?,
            transaction: num(a, e, "transaction")?,
            flags: num_or(a, e, "flags", 0)?,
            version: num_or(a, e, "version", 1)?,
            data_block_size: num(a, e, "data_block_size")?,
            nr_data_blocks: num(a, e, "nr_data_blocks")?,
        };
        if sb.uuid.len() > 16 {
            self.warnings.push(format!("the uuid is {} bytes long: only its first 16 are kept", sb.uuid.len()));
        }
        if num_or::<u64>(a, e, "metadata_snap", 0)? != 0 {
            self.warnings.push("the held metadata snapshot (metadata_snap) is not restored".into());
        }
        if !thinpool::format::valid_data_block_sectors(sb.data_block_size) {
            return Err(format!(
                "data_block_size {} sectors: it must be a multiple of 128 from 128 to 2097152",
                sb.data_block_size
            ));
        }
        if sb.nr_data_blocks > MAX_DATA_BLOCKS {
            return Err(format!("nr_data_blocks {} is more than 2^40", sb.nr_data_blocks));
        }
        let bs = u64::from(sb.data_block_size) * SECTOR;
        let data_bytes = sb
            .nr_data_blocks
            .checked_mul(bs)
            .ok_or_else(|| format!("nr_data_blocks {} x {bs} bytes overflows", sb.nr_data_blocks))?;
        let t = &mut *self.target;
        // The data file: big enough already, or created sparse.
        let data = match OpenOptions::new().read(true).write(true).open(&t.data) {
            Ok(f) => {
                let len = f.metadata().map_err(|e| format!("cannot read {}: {e}", t.data.display()))?.len();
                if len < data_bytes {
                    return Err(format!(
                        "the data file {} holds {len} bytes but the XML has {} data blocks of {bs} bytes ({data_bytes} bytes); grow it first (truncate -s {data_bytes} {})",
                        t.data.display(),
                        sb.nr_data_blocks,
                        t.data.display()
                    ));
                }
                f
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&t.data)
                    .map_err(|e| format!("cannot create {}: {e}", t.data.display()))?;
                t.created_data = true;
                f.set_len(data_bytes).map_err(|e| format!("cannot size {}: {e}", t.data.display()))?;
                f
            }
            Err(e) => return Err(format!("cannot open {}: {e}", t.data.display())),
        };
        let meta_bytes = t.metadata_bytes.unwrap_or_else(|| default_metadata_bytes(data_bytes, bs));
        let meta_bytes = meta_bytes.div_ceil(4096).saturating_mul(4096);
        if meta_bytes < MIN_METADATA_BYTES {
            return Err(format!("metadata size {meta_bytes} bytes is too small: at least {MIN_METADATA_BYTES} bytes"));
        }
        let _ = std::fs::remove_file(&t.tmp);
        let m = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&t.tmp)
            .map_err(|e| format!("cannot create {}: {e}", t.tmp.display()))?;
        m.set_len(meta_bytes).map_err(|e| format!("cannot size {}: {e}", t.tmp.display()))?;
        let storage = FileStorage::new(m).map_err(|e| format!("cannot open {}: {e}", t.tmp.display()))?;
        let mut md = Metadata::format(Box::new(storage), sb.data_block_size, sb.nr_data_blocks)
            .map_err(|e| format!("cannot format the metadata: {e}"))?;
        md.set_time(sb.time).map_err(|e| e.to_string())?;
        md.set_transaction_id(0, sb.transaction).map_err(|e| e.to_string())?;
        self.md = Some(md);
        self.data = Some(data);
        self.sb = Some(sb);
        Ok(())
    }

    fn device(&mut self, a: &HashMap<String, String>) -> Result<(), String> {
        let e = "device";
        let id: u64 = num(a, e, "dev_id")?;
        if id > MAX_DEV_ID {
            return Err(format!("<device dev_id=\"{id}\">: ids go up to {MAX_DEV_ID}"));
        }
        let trans: u64 = num_or(a, e, "transaction", 0)?;
        let ctime: u32 = num_or(a, e, "creation_time", 0)?;
        let stime: u32 = num_or(a, e, "snap_time", 0)?;
        if let Ok(m) = num::<u64>(a, e, "mapped_blocks") {
            self.mapped_attr.insert(id as DevId, m);
        }
        self.md()?.restore_device(id, trans, ctime, stime).map_err(|err| format!("device {id}: {err}"))?;
        self.device = Some((id as DevId, None));
        self.devices.push(id as DevId);
        Ok(())
    }

    fn mapping(&mut self, vblock: u64, data_block: u64, len: u64, time: u32) -> Result<(), String> {
        let (id, mut highest) = self.device.ok_or("a mapping outside a <device>")?;
        let nr = self.sb.as_ref().map_or(0, |s| s.nr_data_blocks);
        if len == 0 {
            return Err(format!("device {id}: a range_mapping of length 0"));
        }
        let (Some(_), Some(dend)) = (vblock.checked_add(len - 1), data_block.checked_add(len)) else {
            return Err(format!("device {id}: the mapping at virtual block {vblock} overflows"));
        };
        if dend > nr {
            return Err(format!(
                "device {id}: virtual block {vblock} maps to data block {}, past the end of the pool ({nr} data blocks)",
                dend - 1
            ));
        }
        let md = self.md()?;
        for i in 0..len {
            let v = vblock + i;
            if highest.is_some_and(|h| v <= h) && md.lookup(id, v).map_err(|e| e.to_string())?.is_some() {
                return Err(format!("device {id} maps virtual block {v} twice"));
            }
            md.restore_mapping(id, v, data_block + i, time).map_err(|e| format!("device {id}: {e}"))?;
            highest = Some(highest.map_or(v, |h| h.max(v)));
        }
        self.mappings += len;
        self.device = Some((id, highest));
        Ok(())
    }

    fn open(&mut self, name: &[u8], a: &HashMap<String, String>, stack: &[Vec<u8>]) -> Result<(), String> {
        let parent = stack.last().map(Vec::as_slice);
        match (name, parent) {
            (b"superblock", None) if self.md.is_none() => self.superblock(a),
            (b"superblock", _) => Err("a second <superblock>".into()),
            (b"device", Some(b"superblock")) => self.device(a),
            (b"single_mapping", Some(b"device")) => {
                let e = "single_mapping";
                self.mapping(num(a, e, "origin_block")?, num(a, e, "data_block")?, 1, num(a, e, "time")?)
            }
            (b"range_mapping", Some(b"device")) => {
                let e = "range_mapping";
                self.mapping(
                    num(a, e, "origin_begin")?,
                    num(a, e, "data_begin")?,
                    num(a, e, "length")?,
                    num(a, e, "time")?,
                )
            }
            (b"def" | b"ref", _) => Err(format!(
                "<{}> (shared mapping blocks of thin_dump 1.x) is not supported: dump with thin_dump 0.9 or thinctl",
                String::from_utf8_lossy(name)
            )),
            (n, p) => Err(format!(
                "unexpected <{}>{}",
                String::from_utf8_lossy(n),
                p.map_or_else(
                    || " at the top level".to_string(),
                    |p| format!(" inside <{}>", String::from_utf8_lossy(p))
                )
            )),
        }
    }

    fn close(&mut self, name: &[u8]) {
        if name == b"device" {
            self.device = None;
        }
    }
}

fn parse_into(input: &mut dyn BufRead, b: &mut Builder<'_>, bar: &mut Progress) -> Result<(), String> {
    let mut reader = Reader::from_reader(input);
    reader.config_mut().trim_text(true);
    reader.config_mut().check_end_names = false;
    let mut buf = Vec::new();
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut events = 0u64;
    loop {
        let pos = reader.buffer_position();
        let ev = reader.read_event_into(&mut buf).map_err(|e| format!("XML error at byte {pos}: {e}"))?;
        let at = |m: String| format!("XML at byte {pos}: {m}");
        match ev {
            Event::Start(e) => {
                let a = attributes(&e).map_err(at)?;
                b.open(e.name().as_ref(), &a, &stack).map_err(at)?;
                stack.push(e.name().as_ref().to_vec());
            }
            Event::Empty(e) => {
                let a = attributes(&e).map_err(at)?;
                b.open(e.name().as_ref(), &a, &stack).map_err(at)?;
                b.close(e.name().as_ref());
            }
            Event::End(e) => {
                if stack.pop().as_deref() != Some(e.name().as_ref()) {
                    return Err(at(format!("unexpected </{}>", String::from_utf8_lossy(e.name().as_ref()))));
                }
                b.close(e.name().as_ref());
            }
            Event::Text(t) => {
                if !t.iter().all(u8::is_ascii_whitespace) {
                    return Err(at("unexpected text".into()));
                }
            }
            Event::CData(_) | Event::GeneralRef(_) => return Err(at("unexpected text".into())),
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
        buf.clear();
        events += 1;
        if events % 4096 == 0 {
            bar.set(reader.buffer_position());
        }
    }
    if !stack.is_empty() {
        return Err(format!("the XML ends inside <{}>", String::from_utf8_lossy(stack.last().map_or(&[][..], |v| v))));
    }
    if b.md.is_none() {
        return Err("the XML has no <superblock>".into());
    }
    Ok(())
}

/// Set what [`Metadata::format`] does not: uuid, version and flags.
fn patch_superblock(path: &Path, sb: &SbAttrs) -> Result<(), String> {
    let f = OpenOptions::new().read(true).write(true).open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut raw = thinpool::format::zeroed_block();
    f.read_exact_at(&mut raw[..], 0).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut s = Superblock::decode(&raw, 0).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut uuid = [0u8; 16];
    let n = sb.uuid.len().min(16);
    uuid[..n].copy_from_slice(&sb.uuid[..n]);
    if s.uuid == uuid && s.version == sb.version && s.flags == sb.flags {
        return Ok(());
    }
    s.uuid = uuid;
    s.version = sb.version;
    s.flags = sb.flags;
    f.write_all_at(&s.encode(0)[..], 0).map_err(|e| format!("{}: {e}", path.display()))?;
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

/// `thinctl restore`.
pub fn restore(args: &RestoreArgs) -> CliResult {
    let mut target = prepare_target(args)?;
    let (mut input, len): (Box<dyn BufRead>, u64) = match &args.input {
        Some(p) => {
            let f = File::open(p).map_err(|e| msg(format!("cannot open {}: {e}", p.display())))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            (Box::new(BufReader::with_capacity(1 << 20, f)), len)
        }
        None => (Box::new(BufReader::with_capacity(1 << 20, std::io::stdin())), 0),
    };
    let mut bar = Progress::new("restoring", len, Unit::Bytes);
    let mut b = Builder {
        target: &mut target,
        md: None,
        data: None,
        sb: None,
        device: None,
        devices: Vec::new(),
        mapped_attr: HashMap::new(),
        mappings: 0,
        warnings: Vec::new(),
    };
    parse_into(&mut input, &mut b, &mut bar).map_err(msg)?;
    let mut md = b.md.take().ok_or_else(|| msg("the XML has no <superblock>"))?;
    let data = b.data.take().ok_or_else(|| msg("the XML has no <superblock>"))?;
    for (&id, &want) in &b.mapped_attr {
        let got = md.device_info(id)?.mapped_blocks;
        if got != want {
            b.warnings
                .push(format!("device {id}: mapped_blocks says {want} but {got} mappings were found; using {got}"));
        }
    }
    md.commit(&mut || data.sync_data())?;
    drop(md);
    let sb = b.sb.take().ok_or_else(|| msg("the XML has no <superblock>"))?;
    let (devices, mappings) = (b.devices.len(), b.mappings);
    warn_all(std::mem::take(&mut b.warnings));
    drop(bar);
    patch_superblock(&target.tmp, &sb).map_err(msg)?;
    std::fs::rename(&target.tmp, &target.metadata)
        .map_err(|e| msg(format!("cannot rename {} to {}: {e}", target.tmp.display(), target.metadata.display())))?;
    if let Some(parent) = target.metadata.parent() {
        let _ = File::open(parent).and_then(|d| d.sync_all());
    }
    target.done = true;
    // Name the devices: pool.toml keeps the names of ids that survived.
    let m = File::open(&target.metadata).map_err(|e| msg(format!("cannot open {}: {e}", target.metadata.display())))?;
    let d = File::open(&target.data).map_err(|e| msg(format!("cannot open {}: {e}", target.data.display())))?;
    let mut pool = Pool::open(m, d, PoolOpenOptions { read_only: true })?;
    match target.existing.take() {
        Some(mut pd) => {
            let before: Vec<String> = pd.devices().map(|(n, _)| n.to_string()).collect();
            pd.reconcile(&mut pool)?;
            let _ = pd.take_warnings();
            pd.save()?;
            let after: Vec<String> = pd.devices().map(|(n, _)| n.to_string()).collect();
            let dropped: Vec<&String> = before.iter().filter(|n| !after.contains(n)).collect();
            let added: Vec<&String> = after.iter().filter(|n| !before.contains(n)).collect();
            if !dropped.is_empty() {
                eprintln!("warning: the restored metadata lacks these devices, their names were dropped: {dropped:?}");
            }
            if !added.is_empty() {
                eprintln!("warning: new devices from the XML were named {added:?}");
            }
        }
        None => {
            let lock = target.lock.take().ok_or_else(|| msg("the pool directory is not locked"))?;
            PoolDir::from_parts(&target.dir, PoolConfig::default(), &mut pool, lock)?;
        }
    }
    println!(
        "restored {devices} devices and {mappings} mappings into {} ({} data blocks of {} bytes)",
        target.dir.display(),
        sb.nr_data_blocks,
        u64::from(sb.data_block_size) * SECTOR
    );
    Ok(())
}
