//! The base file system: formatted once per pool, then every snapshot without a
//! parent is an O(1) thin snapshot of it, so no `Prepare` runs `mkfs`.
//!
//! `mkfs.ext4` formats a sparse file of the devices' virtual size with lazy inode
//! table and journal initialisation (it writes a few MiB even for a TiB: group
//! descriptors, bitmaps of the first groups, the root directory); the file's data
//! ranges (found with `SEEK_DATA`/`SEEK_HOLE`) are written into the base thin
//! device, so the holes stay unmapped and cost nothing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;

use nix::unistd::{lseek, Whence};
use thinpool::server::service::Service;
use thinpool::thin::DevId;

use crate::error::SnapError;

/// Name prefix of the scratch file `mkfs.ext4` formats (in the pool directory).
pub const SCRATCH_PREFIX: &str = ".base-mkfs-";

/// Bytes copied per write into the device.
const CHUNK: usize = 1 << 20;

/// What formatting the base did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseStats {
    /// Bytes of the formatted image that held data (written to the device).
    pub data_bytes: u64,
    /// Bytes of those that were all zeros (left unmapped).
    pub zero_bytes: u64,
}

/// Format a sparse file of `size` bytes in `scratch_dir` with ext4 and write its
/// data into device `dev` of `service` (flushed). The scratch file is removed.
pub fn format_into(service: &Service, dev: DevId, size: u64, scratch_dir: &Path) -> Result<BaseStats, SnapError> {
    let img = tempfile::Builder::new()
        .prefix(SCRATCH_PREFIX)
        .suffix(".img")
        .tempfile_in(scratch_dir)
        .map_err(|e| SnapError::Mkfs(format!("cannot create a scratch file in {}: {e}", scratch_dir.display())))?;
    img.as_file().set_len(size).map_err(|e| SnapError::Mkfs(format!("cannot size the scratch file: {e}")))?;
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-L", "thinpool-base"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg(img.path())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                SnapError::Mkfs("mkfs.ext4 is not installed (Debian package e2fsprogs)".into())
            }
            _ => SnapError::Mkfs(format!("cannot run mkfs.ext4: {e}")),
        })?;
    if !out.status.success() {
        return Err(SnapError::Mkfs(format!(
            "mkfs.ext4 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let f = File::open(img.path()).map_err(|e| SnapError::Mkfs(format!("cannot reopen the scratch file: {e}")))?;
    let stats = copy_data(&f, size, |off, buf| service.write(dev, off, buf).map_err(SnapError::from))?;
    service.flush()?;
    Ok(stats)
}

/// Copy the data ranges of `f` (first `size` bytes) through `write`, skipping holes
/// and chunks of zeros.
fn copy_data(
    f: &File,
    size: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), SnapError>,
) -> Result<BaseStats, SnapError> {
    let fd = f.as_raw_fd();
    let mut stats = BaseStats { data_bytes: 0, zero_bytes: 0 };
    let mut buf = vec![0u8; CHUNK];
    let mut pos: u64 = 0;
    while pos < size {
        let start = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(nix::errno::Errno::ENXIO) => break, // no data after pos
            Err(e) => return Err(SnapError::Mkfs(format!("cannot find data in the scratch file: {e}"))),
        };
        let end = match lseek(fd, start as i64, Whence::SeekHole) {
            Ok(e) => (e as u64).min(size),
            Err(e) => return Err(SnapError::Mkfs(format!("cannot find holes in the scratch file: {e}"))),
        };
        let mut off = start;
        while off < end {
            let n = ((end - off) as usize).min(CHUNK);
            f.read_exact_at(&mut buf[..n], off)
                .map_err(|e| SnapError::Mkfs(format!("cannot read the scratch file: {e}")))?;
            if buf[..n].iter().all(|&b| b == 0) {
                stats.zero_bytes += n as u64;
            } else {
                write(off, &buf[..n])?;
                stats.data_bytes += n as u64;
            }
            off += n as u64;
        }
        pos = end.max(start + 1);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn only_the_data_ranges_are_copied_and_zero_chunks_are_skipped() {
        let mut f = tempfile::tempfile().expect("tmp");
        f.set_len(64 << 20).expect("len");
        f.write_all_at(b"hello", 5 << 20).expect("write");
        f.write_all_at(&vec![0u8; 1 << 20], 20 << 20).expect("zeros");
        f.write_all_at(b"end", (64 << 20) - 3).expect("end");
        f.flush().expect("flush");
        let mut seen = Vec::new();
        let stats = copy_data(&f, 64 << 20, |off, buf| {
            seen.push((off, buf.iter().filter(|&&b| b != 0).count()));
            Ok(())
        })
        .expect("copy");
        assert_eq!(seen.iter().map(|s| s.1).sum::<usize>(), 8, "{seen:?}");
        assert!(stats.data_bytes <= 2 << 20, "{stats:?}");
        assert!(stats.zero_bytes >= 1 << 20, "{stats:?}");
    }
}
