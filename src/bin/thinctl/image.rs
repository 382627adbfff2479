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

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;

use thinpool::error::PoolError;
use thinpool::pool::Pool;
use thinpool::thin::DevId;
use thinpool::volume::{discard_blocks, Access, PoolDir};

use crate::error::{msg, CliResult};
use crate::open::open_pool;
use crate::progress::{Progress, Unit};
use crate::units::format_size;

/// Bytes handled per step (rounded to whole blocks).
const WINDOW_BYTES: u64 = 8 << 20;

fn window_blocks(bs: u64) -> u64 {
    (WINDOW_BYTES / bs).max(1)
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Length of a regular file or block device.
fn source_len(f: &mut File, path: &Path) -> CliResult<u64> {
    let m = f.metadata().map_err(|e| msg(format!("cannot read {}: {e}", path.display())))?;
    if m.is_file() {
        return Ok(m.len());
    }
    if m.file_type().is_block_device() {
        return f.seek(SeekFrom::End(0)).map_err(|e| msg(format!("cannot size {}: {e}", path.display())));
    }
    Err(msg(format!("{} is not a regular file or a block device", path.display())))
}

/// The current mappings of `[lo, hi)`: per block, `Some(shared)` when mapped.
fn window_mappings(pool: &mut Pool, id: DevId, lo: u64, hi: u64, stime: u32) -> CliResult<Vec<Option<bool>>> {
    let mut out = vec![None; (hi - lo) as usize];
    for m in pool.metadata().mappings(id, lo, hi)? {
        if let Some(slot) = out.get_mut((m.vblock - lo) as usize) {
            *slot = Some(stime > m.time);
        }
    }
    Ok(out)
}

/// Read `[lo, hi)` blocks of the image into `buf` (zero-padded past its end).
fn read_window(img: &File, path: &Path, len: u64, bs: u64, lo: u64, hi: u64, buf: &mut Vec<u8>) -> CliResult {
    let bytes = ((hi - lo) * bs) as usize;
    buf.clear();
    buf.resize(bytes, 0);
    let start = lo * bs;
    let avail = len.saturating_sub(start).min(bytes as u64) as usize;
    img.read_exact_at(&mut buf[..avail], start)
        .map_err(|e| msg(format!("cannot read {} at byte {start}: {e}", path.display())))
}

/// Does block `vb` of the device already hold `want`?
fn same_content(pool: &mut Pool, id: DevId, vb: u64, want: &[u8], scratch: &mut Vec<u8>) -> CliResult<bool> {
    scratch.resize(want.len(), 0);
    pool.read(id, vb * want.len() as u64, scratch)?;
    Ok(scratch.as_slice() == want)
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
    stime: u32,
    free: u64,
) -> CliResult<u64> {
    let bs = pool.block_bytes();
    let nblk = len.div_ceil(bs);
    let w = window_blocks(bs);
    // Cheap upper bound first: every unmapped or shared block.
    let mut upper = 0;
    let mut lo = 0;
    while lo < nblk {
        let hi = (lo + w).min(nblk);
        upper +=
            window_mappings(pool, id, lo, hi, stime)?.iter().filter(|m| m.is_none_or(|shared| shared)).count() as u64;
        lo = hi;
    }
    if upper <= free {
        return Ok(upper);
    }
    let mut bar = Progress::new("checking space", len, Unit::Bytes);
    let (mut buf, mut scratch) = (Vec::new(), Vec::new());
    let mut need = 0;
    let mut lo = 0;
    while lo < nblk {
        let hi = (lo + w).min(nblk);
        read_window(img, path, len, bs, lo, hi, &mut buf)?;
        let maps = window_mappings(pool, id, lo, hi, stime)?;
        for (i, m) in maps.iter().enumerate() {
            let chunk = &buf[i * bs as usize..(i + 1) * bs as usize];
            if is_zero(chunk) {
                continue;
            }
            match m {
                None => need += 1,
                Some(true) if !same_content(pool, id, lo + i as u64, chunk, &mut scratch)? => need += 1,
                Some(_) => {}
            }
        }
        bar.set(hi * bs);
        lo = hi;
    }
    Ok(need)
}

/// `thinctl import`.
pub fn import(dir: &Path, name: &str, path: &Path, create: bool) -> CliResult {
    let (mut pd, mut pool) = open_pool(dir, Access::Write)?;
    let mut img = File::open(path).map_err(|e| msg(format!("cannot open {}: {e}", path.display())))?;
    let len = source_len(&mut img, path)?;
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
    let free = pool.meta().data_free_now();
    let need = blocks_needed(&mut pool, id, &img, path, len, stime, free)?;
    if need > free {
        return Err(msg(format!(
            "the pool is full: importing {} needs {need} more data blocks ({}) but only {free} are free ({}); nothing was changed; delete or discard devices, or grow the data file",
            path.display(),
            format_size(need * bs),
            format_size(free * bs)
        )));
    }

    let nblk = len.div_ceil(bs);
    let w = window_blocks(bs);
    let bsz = bs as usize;
    let (mut buf, mut scratch) = (Vec::new(), Vec::new());
    let (mut written, mut unmapped, mut kept) = (0u64, 0u64, 0u64);
    let mut bar = Progress::new("importing", len, Unit::Bytes);
    let mut lo = 0;
    while lo < nblk {
        let hi = (lo + w).min(nblk);
        read_window(&img, path, len, bs, lo, hi, &mut buf)?;
        let maps = window_mappings(&mut pool, id, lo, hi, stime)?;
        // Runs of blocks to write, as (first index, count) within the window.
        let mut run: Option<(usize, usize)> = None;
        let mut runs = Vec::new();
        for (i, m) in maps.iter().enumerate() {
            let chunk = &buf[i * bsz..(i + 1) * bsz];
            let write = if is_zero(chunk) {
                if m.is_some() {
                    unmapped += pool.discard(id, (lo + i as u64) * bs, bs)?;
                }
                false
            } else if m.is_some() && same_content(&mut pool, id, lo + i as u64, chunk, &mut scratch)? {
                kept += 1;
                false
            } else {
                true
            };
            run = match (run, write) {
                (Some((s, n)), true) if s + n == i => Some((s, n + 1)),
                (r, true) => {
                    runs.extend(r);
                    Some((i, 1))
                }
                (r, false) => {
                    runs.extend(r);
                    None
                }
            };
        }
        runs.extend(run);
        for (s, n) in runs {
            pool.write(id, (lo + s as u64) * bs, &buf[s * bsz..(s + n) * bsz])?;
            written += n as u64;
        }
        bar.set(hi * bs);
        lo = hi;
    }
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
    fn put(&mut self, off: u64, data: &[u8], what: &OsStr) -> CliResult {
        let err = |e: std::io::Error| msg(format!("cannot write {}: {e}", what.to_string_lossy()));
        match self {
            Sink::Sparse(f) => {
                if !is_zero(data) {
                    f.write_all_at(data, off).map_err(err)?;
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

    fn finish(self, size: u64, what: &OsStr) -> CliResult {
        let err = |e: std::io::Error| msg(format!("cannot write {}: {e}", what.to_string_lossy()));
        match self {
            Sink::Sparse(f) => f.sync_all().map_err(err),
            Sink::Stream(mut w, mut pos) => {
                zeros_until(&mut w, &mut pos, size).map_err(err)?;
                w.flush().map_err(err)
            }
        }
    }
}

fn zeros_until(w: &mut Box<dyn Write>, pos: &mut u64, off: u64) -> std::io::Result<()> {
    let zeros = [0u8; 64 << 10];
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
        f.set_len(0).map_err(err)?;
        f.set_len(size).map_err(err)?;
        Ok(Sink::Sparse(f))
    } else {
        Ok(Sink::Stream(Box::new(f), 0))
    }
}

/// `thinctl export`.
pub fn export(dir: &Path, name: &str, dest: &OsStr) -> CliResult {
    let (pd, mut pool) = open_pool(dir, Access::Read)?;
    let e = pd.device(name)?.clone();
    let (id, size) = (e.id, e.size_bytes);
    let mut sink = open_sink(&pd, dest, size)?;
    let bs = pool.block_bytes();
    let nblk = size.div_ceil(bs);
    let w = window_blocks(bs);
    let mut bar = Progress::new("exporting", size, Unit::Bytes);
    let mut buf = Vec::new();
    let mut vb = 0;
    while vb < nblk {
        let maps = pool.metadata().mapping_window(id, vb, nblk, w)?;
        let Some(hi) = maps.last().map(|m| m.vblock + 1) else { break };
        let mut i = 0;
        while i < maps.len() {
            let start = maps[i].vblock;
            let mut n = 1;
            while i + n < maps.len() && maps[i + n].vblock == start + n as u64 {
                n += 1;
            }
            let off = start * bs;
            let end = ((start + n as u64) * bs).min(size);
            buf.resize((end - off) as usize, 0);
            read_mapped(&mut pool, id, off, &mut buf)?;
            sink.put(off, &buf, dest)?;
            i += n;
        }
        bar.set(hi * bs);
        vb = hi;
    }
    drop(bar);
    sink.finish(size, dest)?;
    if dest != "-" {
        println!("exported \"{name}\" ({}) to {}", format_size(size), dest.to_string_lossy());
    }
    Ok(())
}

fn read_mapped(pool: &mut Pool, id: DevId, off: u64, buf: &mut [u8]) -> Result<(), PoolError> {
    pool.read(id, off, buf)
}
