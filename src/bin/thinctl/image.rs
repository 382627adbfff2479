//! `import` and `export`: a device's content to and from a raw image.
//!
//! Import makes the device's content equal to the image followed by zeros: all-zero
//! blocks end up unmapped, blocks that already hold the image's bytes are left alone
//! (so a snapshot keeps sharing them), and everything past the image is discarded.
//! Before changing anything it checks that the pool has the data blocks the import
//! needs, so a full pool is an error that changes nothing.
//!
//! Export writes the device's bytes; to a regular file it writes only mapped,
//! non-zero blocks, leaving holes elsewhere.
//!
//! Both are bulk paths: import reads only the image's data extents (`SEEK_DATA` /
//! `SEEK_HOLE`; a block device or a file system without them is read whole), in
//! windows of 8 MiB, writes runs of whole blocks and commits once at the end; export
//! walks the device's mappings, reads runs that are contiguous in the data file with
//! one `pread` each (up to 8 MiB) and never reads unmapped blocks.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::mpsc;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use thinpool::error::PoolError;
use thinpool::pool::Pool;
use thinpool::thin::DevId;
use thinpool::volume::{discard_blocks, Access, PoolDir};

use crate::error::{msg, CliResult};
use crate::open::open_pool;
use crate::progress::{Progress, Unit};
use crate::units::format_size;

/// Bytes handled per step (rounded to whole blocks): large enough that system calls
/// cost little, small enough that a window read from one file is still in the CPU
/// cache when it is written to the other (8 MiB windows cost a third more CPU).
const WINDOW_BYTES: u64 = 1 << 20;

/// Bytes written between background syncs (of the data file during an import, of
/// the destination file during an export).
const SYNC_BEHIND_BYTES: u64 = 32 << 20;

fn window_blocks(bs: u64) -> u64 {
    (WINDOW_BYTES / bs).max(1)
}

/// Are all bytes zero? OR-folds 64-byte chunks (which the compiler vectorises)
/// and stops at the first chunk holding a non-zero byte.
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0) && chunks.remainder().iter().all(|&x| x == 0)
}

/// Length of a regular file or block device, and whether it is a regular file.
fn source_len(f: &mut File, path: &Path) -> CliResult<(u64, bool)> {
    let m = f.metadata().map_err(|e| msg(format!("cannot read {}: {e}", path.display())))?;
    if m.is_file() {
        return Ok((m.len(), true));
    }
    if m.file_type().is_block_device() {
        let len = f.seek(SeekFrom::End(0)).map_err(|e| msg(format!("cannot size {}: {e}", path.display())))?;
        return Ok((len, false));
    }
    Err(msg(format!("{} is not a regular file or a block device", path.display())))
}

/// The byte ranges of the first `len` bytes of the image that may hold data, in
/// order: a regular file's data extents (`SEEK_DATA`/`SEEK_HOLE`), everything for a
/// block device or when the file system cannot tell. Bytes outside them read as zeros.
fn data_extents(img: &File, len: u64, regular: bool) -> Vec<(u64, u64)> {
    let all = if len == 0 { Vec::new() } else { vec![(0, len)] };
    if !regular {
        return all;
    }
    let fd = img.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Ok(at) = i64::try_from(pos) else { return all };
        let start = match lseek(fd, at, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => break,
            Err(_) => return all,
        };
        if start >= len {
            break;
        }
        let end = match lseek(fd, start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(len),
            Err(_) => return all,
        };
        if end <= start {
            return all;
        }
        out.push((start, end));
        pos = end;
    }
    out
}

/// Byte extents as runs of whole blocks `[lo, hi)`, merged where they touch.
fn block_runs(extents: &[(u64, u64)], bs: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in extents {
        let (lo, hi) = (s / bs, e.div_ceil(bs));
        match runs.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => runs.push((lo, hi)),
        }
    }
    runs
}

/// The runs cut into windows of at most `w` blocks.
fn windows(runs: &[(u64, u64)], w: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    runs.iter().flat_map(move |&(lo, hi)| (lo..hi).step_by(w as usize).map(move |s| (s, s.saturating_add(w).min(hi))))
}

/// The blocks of `[0, nblk)` outside the runs: the image's holes.
fn holes(runs: &[(u64, u64)], nblk: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(lo, hi) in runs {
        if lo > pos {
            out.push((pos, lo));
        }
        pos = hi;
    }
    if pos < nblk {
        out.push((pos, nblk));
    }
    out
}

/// The current mappings of `[lo, hi)`: per block, `Some(shared)` when mapped.
fn window_mappings(pool: &mut Pool, id: DevId, lo: u64, hi: u64, stime: u32) -> CliResult<Vec<Option<bool>>> {
    let mut out = vec![None; (hi - lo) as usize];
    for m in pool.mappings(id, lo, hi)? {
        if let Some(slot) = out.get_mut((m.vblock - lo) as usize) {
            *slot = Some(stime > m.time);
        }
    }
    Ok(out)
}

/// Read `[lo, hi)` blocks of the image into `buf` (zero-padded past its end).
fn read_window(img: &File, path: &Path, len: u64, bs: u64, lo: u64, hi: u64, buf: &mut Vec<u8>) -> CliResult {
    let bytes = ((hi - lo) * bs) as usize;
    buf.resize(bytes, 0);
    let start = lo * bs;
    let avail = len.saturating_sub(start).min(bytes as u64) as usize;
    img.read_exact_at(&mut buf[..avail], start)
        .map_err(|e| msg(format!("cannot read {} at byte {start}: {e}", path.display())))?;
    buf[avail..].fill(0);
    Ok(())
}

/// Read `buf.len()` bytes of the device at `off`: one `pread` of the data file per
/// run of blocks that are contiguous there, zeros for unmapped blocks.
fn read_device(pool: &mut Pool, id: DevId, off: u64, buf: &mut [u8]) -> CliResult {
    let plan = pool.read_plan(id, off, buf.len() as u64)?;
    let data = pool.data_storage();
    let mut done = 0usize;
    for p in plan {
        let out = &mut buf[done..done + p.len as usize];
        match p.at {
            Some(at) => data.read_at(out, at).map_err(PoolError::DataIo)?,
            None => out.fill(0),
        }
        done += p.len as usize;
    }
    Ok(())
}

/// What import does with each block of a window of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// All zeros and unmapped: nothing to do.
    Skip,
    /// All zeros and mapped: unmap it.
    Unmap,
    /// Mapped and already holding the image's bytes.
    Keep,
    /// Write it; `true` when that takes a new data block (unmapped, or shared).
    Write(bool),
}

/// A window of the image from block `lo`: its bytes and which blocks are all zeros.
struct Window {
    lo: u64,
    buf: Vec<u8>,
    zero: Vec<bool>,
}

impl Window {
    /// Read blocks `[lo, hi)` of the image into `buf` (reused) and look for zeros.
    #[allow(clippy::too_many_arguments)]
    fn read(img: &File, path: &Path, len: u64, bs: u64, lo: u64, hi: u64, mut buf: Vec<u8>) -> CliResult<Window> {
        read_window(img, path, len, bs, lo, hi, &mut buf)?;
        let zero = buf.chunks(bs as usize).map(is_zero).collect();
        Ok(Window { lo, buf, zero })
    }
}

/// Decide per block of the window `[lo, lo + maps.len())` held in `buf`; reads the
/// device's bytes (into `scratch`) only when some non-zero block is mapped.
fn classify(
    pool: &mut Pool,
    id: DevId,
    bs: u64,
    win: &Window,
    maps: &[Option<bool>],
    scratch: &mut Vec<u8>,
) -> CliResult<Vec<Action>> {
    let bsz = bs as usize;
    let (lo, buf, zero) = (win.lo, &win.buf, win.zero.as_slice());
    let compare = maps.iter().zip(zero).any(|(m, z)| m.is_some() && !z);
    if compare {
        scratch.resize(buf.len(), 0);
        read_device(pool, id, lo * bs, scratch)?;
    }
    Ok(maps
        .iter()
        .zip(zero)
        .enumerate()
        .map(|(i, (m, &z))| match (m, z) {
            (None, true) => Action::Skip,
            (Some(_), true) => Action::Unmap,
            (None, false) => Action::Write(true),
            (Some(shared), false) => {
                if scratch[i * bsz..(i + 1) * bsz] == buf[i * bsz..(i + 1) * bsz] {
                    Action::Keep
                } else {
                    Action::Write(*shared)
                }
            }
        })
        .collect())
}

/// Data blocks the import must allocate: non-zero image blocks that are unmapped, or
/// shared and different.
#[allow(clippy::too_many_arguments)]
fn blocks_needed(
    pool: &mut Pool,
    id: DevId,
    img: &File,
    path: &Path,
    len: u64,
    runs: &[(u64, u64)],
    stime: u32,
    free: u64,
) -> CliResult<u64> {
    let bs = pool.block_bytes();
    let w = window_blocks(bs);
    // Cheap upper bound first: every unmapped or shared block where the image may
    // hold data.
    let mut upper = 0;
    for (lo, hi) in windows(runs, w) {
        upper +=
            window_mappings(pool, id, lo, hi, stime)?.iter().filter(|m| m.is_none_or(|shared| shared)).count() as u64;
    }
    if upper <= free {
        return Ok(upper);
    }
    let mut bar = Progress::new("checking space", len, Unit::Bytes);
    let mut scratch = Vec::new();
    let mut need = 0;
    for (lo, hi) in windows(runs, w) {
        let win = Window::read(img, path, len, bs, lo, hi, Vec::new())?;
        let maps = window_mappings(pool, id, lo, hi, stime)?;
        let actions = classify(pool, id, bs, &win, &maps, &mut scratch)?;
        need += actions.iter().filter(|a| **a == Action::Write(true)).count() as u64;
        bar.set(hi * bs);
    }
    Ok(need)
}

/// `thinctl import`.
pub fn import(dir: &Path, name: &str, path: &Path, create: bool) -> CliResult {
    let (mut pd, mut pool) = open_pool(dir, Access::Write)?;
    let mut img = File::open(path).map_err(|e| msg(format!("cannot open {}: {e}", path.display())))?;
    let (len, regular) = source_len(&mut img, path)?;
    let bs = pool.block_bytes();
    let (id, old_size, new_device) = match pd.device(name) {
        Ok(e) => (e.id, e.size_bytes, false),
        Err(e) if !create => return Err(e.into()),
        Err(_) => {
            if len == 0 {
                return Err(msg(format!("{} is empty: cannot create a device of 0 bytes from it", path.display())));
            }
            let id = pd.new_device_id(&pool, name, None)?;
            // Not committed until the import is complete.
            pool.create_thin(id.into())?;
            (id, 0, true)
        }
    };
    let stime = pool.meta().device_info(id)?.snapshotted_time;
    let nblk = len.div_ceil(bs);
    let runs = block_runs(&data_extents(&img, len, regular), bs);
    let free = pool.meta().data_free_now();
    let need = blocks_needed(&mut pool, id, &img, path, len, &runs, stime, free)?;
    if need > free {
        return Err(msg(format!(
            "the pool is full: importing {} needs {need} more data blocks ({}) but only {free} are free ({}); nothing was changed; delete or discard devices, or grow the data file",
            path.display(),
            format_size(need * bs),
            format_size(free * bs)
        )));
    }

    let w = window_blocks(bs);
    let bsz = bs as usize;
    let mut scratch = Vec::new();
    let (mut written, mut unmapped, mut kept) = (0u64, 0u64, 0u64);
    let mut bar = Progress::new("importing", len, Unit::Bytes);
    // The image's holes read as zeros: whatever the device maps there goes.
    for (lo, hi) in holes(&runs, nblk) {
        unmapped += pool.discard(id, lo * bs, (hi - lo) * bs)?;
    }
    // Each window is read and written by this thread while it is still in the CPU
    // cache (a reader thread handing windows over cost more CPU than it saved); a
    // syncer thread flushes the data file behind the writes, so the commit's sync
    // finds little left to do.
    let data = pool.data_storage();
    std::thread::scope(|s| -> CliResult {
        let (kick, kicked) = mpsc::sync_channel::<()>(1);
        s.spawn(move || {
            for () in kicked {
                // Best effort: the commit's own sync reports errors.
                let _ = data.sync();
            }
        });
        let mut spare = Vec::new();
        let mut unsynced = 0u64;
        for (lo, hi) in windows(&runs, w) {
            let win = Window::read(&img, path, len, bs, lo, hi, std::mem::take(&mut spare))?;
            let maps = window_mappings(&mut pool, id, lo, hi, stime)?;
            let actions = classify(&mut pool, id, bs, &win, &maps, &mut scratch)?;
            let mut i = 0;
            while i < actions.len() {
                let vb = lo + i as u64;
                match actions[i] {
                    Action::Skip => {}
                    Action::Unmap => unmapped += pool.discard(id, vb * bs, bs)?,
                    Action::Keep => kept += 1,
                    Action::Write(_) => {
                        // One write for the whole run of blocks to write.
                        let n = actions[i..].iter().take_while(|a| matches!(a, Action::Write(_))).count();
                        pool.write(id, vb * bs, &win.buf[i * bsz..(i + n) * bsz])?;
                        written += n as u64;
                        unsynced += n as u64 * bs;
                        i += n;
                        continue;
                    }
                }
                i += 1;
            }
            if unsynced >= SYNC_BEHIND_BYTES && kick.try_send(()).is_ok() {
                unsynced = 0;
            }
            bar.set(hi * bs);
            spare = win.buf;
        }
        Ok(())
    })?;
    // Past the image the device reads as zeros.
    let end = nblk.saturating_mul(bs);
    unmapped += discard_blocks(&mut pool, id, end, u64::MAX - end, &mut |_, _| {})?;
    drop(bar);
    pool.commit()?;
    let size = old_size.max(len);
    if new_device {
        pd.record_new_device(name, id, size)?;
    } else if size != old_size {
        pd.set_size(name, size)?;
    }
    println!(
        "imported {} into \"{name}\" ({}{}): {written} blocks written, {kept} unchanged, {unmapped} unmapped",
        path.display(),
        format_size(size),
        if size > old_size && !new_device { format!(", grown from {}", format_size(old_size)) } else { String::new() },
    );
    Ok(())
}

/// Where exported bytes go.
enum Sink {
    /// A regular file: write mapped data at its offset, leave holes.
    Sparse(File),
    /// A pipe, terminal or device: every byte in order.
    Stream(Box<dyn Write>, u64),
}

impl Sink {
    /// Write `data`, the device's bytes at `off` (a block boundary). A sparse sink
    /// writes each run of non-zero blocks with one `pwrite` and leaves the rest as holes.
    fn put(&mut self, off: u64, data: &[u8], bs: u64, what: &OsStr) -> CliResult {
        let err = |e: std::io::Error| msg(format!("cannot write {}: {e}", what.to_string_lossy()));
        match self {
            Sink::Sparse(f) => {
                let bsz = bs as usize;
                let zero: Vec<bool> = data.chunks(bsz).map(is_zero).collect();
                let mut i = 0;
                while i < zero.len() {
                    let n = zero[i..].iter().take_while(|z| !**z).count();
                    if n == 0 {
                        i += 1;
                        continue;
                    }
                    let end = ((i + n) * bsz).min(data.len());
                    f.write_all_at(&data[i * bsz..end], off + (i * bsz) as u64).map_err(err)?;
                    i += n;
                }
            }
            Sink::Stream(w, pos) => {
                zeros_until(w, pos, off).map_err(err)?;
                w.write_all(data).map_err(err)?;
                *pos += data.len() as u64;
            }
        }
        Ok(())
    }

    /// Finish the file: fsync it when `sync`; a stream gets its trailing zeros.
    fn finish(self, size: u64, what: &OsStr, sync: bool) -> CliResult {
        let err = |e: std::io::Error| msg(format!("cannot write {}: {e}", what.to_string_lossy()));
        match self {
            Sink::Sparse(f) if sync => f.sync_all().map_err(err),
            Sink::Sparse(_) => Ok(()),
            Sink::Stream(mut w, mut pos) => {
                zeros_until(&mut w, &mut pos, size).map_err(err)?;
                w.flush().map_err(err)
            }
        }
    }
}

/// Zeros for the holes of a streamed export.
static ZEROS: [u8; 256 << 10] = [0; 256 << 10];

fn zeros_until(w: &mut Box<dyn Write>, pos: &mut u64, off: u64) -> std::io::Result<()> {
    let zeros = &ZEROS;
    while *pos < off {
        let n = (off - *pos).min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..n])?;
        *pos += n as u64;
    }
    Ok(())
}

fn same_file(a: &std::fs::Metadata, b: &Path) -> bool {
    std::fs::metadata(b).is_ok_and(|m| m.dev() == a.dev() && m.ino() == a.ino())
}

fn open_sink(pd: &PoolDir, dest: &OsStr, size: u64) -> CliResult<Sink> {
    if dest == "-" {
        let out = std::io::stdout();
        if out.is_terminal() {
            return Err(msg(
                "refusing to write a device's raw bytes to a terminal: redirect standard output or give a FILE",
            ));
        }
        return Ok(Sink::Stream(Box::new(std::io::BufWriter::with_capacity(1 << 20, out.lock())), 0));
    }
    let path = Path::new(dest);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| msg(format!("cannot open {}: {e}", path.display())))?;
    let m = f.metadata().map_err(|e| msg(format!("cannot read {}: {e}", path.display())))?;
    if same_file(&m, &pd.metadata_path()) || same_file(&m, &pd.data_path()) {
        return Err(msg(format!("{} is one of the pool's own files: choose another FILE", path.display())));
    }
    if m.is_file() {
        let err = |e: std::io::Error| msg(format!("cannot size {}: {e}", path.display()));
        // Truncating to zero makes ext4 (auto_da_alloc) start write-back of the file
        // when it is closed, which costs a new file a tenth of a second for nothing:
        // only an existing file's old bytes need dropping.
        if m.len() > 0 {
            f.set_len(0).map_err(err)?;
        }
        f.set_len(size).map_err(err)?;
        Ok(Sink::Sparse(f))
    } else {
        Ok(Sink::Stream(Box::new(f), 0))
    }
}

/// `thinctl export`. The output file is fsynced only with `sync` (`--sync`): like `cp`,
/// `dd` and `qemu-img convert` (whose default cache mode for the target does not flush),
/// the command otherwise returns once the bytes are in the page cache.
pub fn export(dir: &Path, name: &str, dest: &OsStr, sync: bool) -> CliResult {
    let (pd, mut pool) = open_pool(dir, Access::Read)?;
    let e = pd.device(name)?.clone();
    let (id, size) = (e.id, e.size_bytes);
    let mut sink = open_sink(&pd, dest, size)?;
    let bs = pool.block_bytes();
    let nblk = size.div_ceil(bs);
    let w = window_blocks(bs);
    let data = pool.data_storage();
    let mut bar = Progress::new("exporting", size, Unit::Bytes);
    // With --sync, to a regular file, a syncer thread flushes behind the writes so
    // the final sync finds little left to do.
    let behind = match &sink {
        Sink::Sparse(f) if sync => f.try_clone().ok(),
        _ => None,
    };
    std::thread::scope(|s| -> CliResult {
        let (kick, kicked) = mpsc::sync_channel::<()>(1);
        if let Some(f) = behind {
            s.spawn(move || {
                for () in kicked {
                    // Best effort: the final sync reports errors.
                    let _ = f.sync_data();
                }
            });
        }
        let mut unsynced = 0u64;
        let mut buf = Vec::new();
        let mut vb = 0;
        while vb < nblk {
            let maps = pool.mapping_window(id, vb, nblk, w)?;
            let Some(hi) = maps.last().map(|m| m.vblock + 1) else { break };
            let mut i = 0;
            while i < maps.len() {
                // A run of blocks contiguous on the device and in the data file: one read.
                let first = maps[i];
                let n = maps[i..]
                    .iter()
                    .enumerate()
                    .take_while(|(k, m)| {
                        m.vblock == first.vblock + *k as u64 && m.data_block == first.data_block + *k as u64
                    })
                    .count();
                let off = first.vblock * bs;
                let end = ((first.vblock + n as u64) * bs).min(size);
                buf.resize((end - off) as usize, 0);
                data.read_at(&mut buf, first.data_block * bs).map_err(PoolError::DataIo)?;
                sink.put(off, &buf, bs, dest)?;
                unsynced += buf.len() as u64;
                i += n;
            }
            if unsynced >= SYNC_BEHIND_BYTES && kick.try_send(()).is_ok() {
                unsynced = 0;
            }
            bar.set(hi * bs);
            vb = hi;
        }
        Ok(())
    })?;
    drop(bar);
    sink.finish(size, dest, sync)?;
    if dest != "-" {
        println!("exported \"{name}\" ({}) to {}", format_size(size), dest.to_string_lossy());
    }
    Ok(())
}
