//! A real file as [`Storage`]: positioned reads and writes, `fdatasync`, and hole
//! punching through `fallocate`.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{copy_file_range, fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

use super::{check_range, copy_through_memory, Storage};

/// A file. Its length is taken when it is wrapped and is the storage's length from
/// then on (accesses past it fail rather than grow the file).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    len: AtomicU64,
}

impl FileStorage {
    /// Use an open file; its current length is the storage's length. Only a regular
    /// file is accepted (an [`io::ErrorKind::InvalidInput`] error otherwise): a FIFO
    /// or a character device could block every read, and a block device's metadata
    /// gives no length.
    pub fn new(file: File) -> io::Result<FileStorage> {
        let m = file.metadata()?;
        if !m.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not a regular file ({}); pool storage must be a regular file", describe(m.file_type())),
            ));
        }
        Ok(FileStorage { file, len: AtomicU64::new(m.len()) })
    }

    /// The file underneath.
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn describe(t: std::fs::FileType) -> &'static str {
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

impl Storage for FileStorage {
    fn len(&self) -> u64 {
        self.len.load(Ordering::SeqCst)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len())?;
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len())?;
        self.file.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(
            self.file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        ) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                Err(io::Error::new(io::ErrorKind::Unsupported, "the file system cannot punch holes"))
            }
            Err(e) => Err(e.into()),
        }
    }
    /// `lseek(SEEK_DATA)`: a hole when the next data starts at or past the end of
    /// the range. File systems without hole tracking report data everywhere, so the
    /// answer is never a hole that is not one. (The file offset it moves is used by
    /// nothing: every read and write here is positional.)
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        check_range(offset, len as usize, self.len())?;
        match lseek(self.file.as_raw_fd(), offset as i64, Whence::SeekData) {
            Ok(next) => Ok(next as u64 >= offset + len),
            Err(nix::errno::Errno::ENXIO) => Ok(true),
            Err(nix::errno::Errno::EINVAL) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
    fn shrink(&self, new_len: u64) -> io::Result<()> {
        if new_len < self.len() {
            self.len.store(new_len, Ordering::SeqCst);
            self.file.set_len(new_len)?;
        }
        Ok(())
    }
    fn grow(&self, new_len: u64) -> io::Result<()> {
        let old = self.len();
        if new_len > old {
            self.file.set_len(new_len)?;
            self.len.store(new_len, Ordering::SeqCst);
        }
        Ok(())
    }
    fn allocate(&self) -> io::Result<()> {
        match fallocate(self.file.as_raw_fd(), FallocateFlags::empty(), 0, self.len() as i64) {
            Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn copy_range(&self, from: u64, to: u64, len: u64) -> io::Result<()> {
        check_range(from, len as usize, self.len())?;
        check_range(to, len as usize, self.len())?;
        let (mut src, mut dst) = (from as i64, to as i64);
        let mut left = len as usize;
        while left > 0 {
            match copy_file_range(&self.file, Some(&mut src), &self.file, Some(&mut dst), left) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "copy_file_range copied nothing")),
                Ok(n) => left -= n,
                Err(nix::errno::Errno::EINTR) => {}
                // Kernels or file systems without it: copy through memory.
                Err(nix::errno::Errno::ENOSYS | nix::errno::Errno::EXDEV | nix::errno::Errno::EOPNOTSUPP)
                    if left == len as usize =>
                {
                    return copy_through_memory(self, from, to, len);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_reads_back_what_was_written_and_punched_ranges_read_as_zeros() {
        let f = tempfile::tempfile().expect("tmp");
        f.set_len(1 << 16).expect("len");
        let s = FileStorage::new(f).expect("storage");
        assert_eq!(s.len(), 1 << 16);
        s.write_at(&[0xab; 8192], 4096).expect("write");
        s.sync().expect("sync");
        let mut buf = [0u8; 8192];
        s.read_at(&mut buf, 4096).expect("read");
        assert!(buf.iter().all(|&b| b == 0xab));
        match s.punch_hole(4096, 4096) {
            Ok(()) => {
                s.read_at(&mut buf, 4096).expect("read");
                assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0xab));
            }
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported),
        }
        assert!(s.write_at(&[1], 1 << 16).is_err(), "a write past the end does not grow the file");
    }

    #[test]
    fn holes_are_reported_only_where_nothing_was_written() {
        let f = tempfile::tempfile().expect("tmp");
        f.set_len(4 << 16).expect("len");
        let s = FileStorage::new(f).expect("storage");
        // Written but not yet synced (delayed allocation) is data, never a hole.
        s.write_at(&[7; 100], (1 << 16) + 5).expect("write");
        assert!(!s.is_hole(1 << 16, 1 << 16).expect("ask"));
        assert!(!s.is_hole(0, 2 << 16).expect("ask"), "a range that holds data is not a hole");
        if s.punch_hole(1 << 16, 1 << 16).is_ok() {
            // A file system that punches holes also reports them.
            assert!(s.is_hole(0, 1 << 16).expect("ask"), "never written");
            assert!(s.is_hole(1 << 16, 1 << 16).expect("ask"), "punched");
            assert!(s.is_hole(3 << 16, 1 << 16).expect("ask"), "the end of the file");
        }
        assert!(s.is_hole(3 << 16, 2 << 16).is_err(), "past the end");
    }

    #[test]
    fn only_regular_files_are_storage() {
        let t = tempfile::tempdir().expect("tmp");
        let fifo = t.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        // O_RDWR opens a FIFO without waiting for a writer.
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&fifo).expect("open fifo");
        let e = FileStorage::new(f).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = FileStorage::new(File::open("/dev/null").expect("null")).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let e = FileStorage::new(File::open(t.path()).expect("dir")).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
    }
}
