//! The files of a pool directory, handled so that no one else can read them and no
//! input can hang us.
//!
//! - Every file a pool directory gets (`metadata`, `data`, `pool.toml` and its
//!   temporary file, `pool.lock`, restore's temporary metadata) is created with mode
//!   [`FILE_MODE`] (0600) and then given that mode explicitly, because the umask can
//!   only remove bits; a directory that becomes a pool gets [`DIR_MODE`] (0700).
//! - `metadata`, `data` and `pool.toml` are opened only when they are regular files:
//!   their type is checked before they are opened, they are opened with `O_NONBLOCK`
//!   (so a FIFO swapped in meanwhile cannot block the open), and the opened file is
//!   checked again. A FIFO, a device, a socket or a directory is refused with
//!   [`PoolDirError::NotRegular`].
//! - Opening a pool whose directory or own files are accessible by other users gives
//!   a warning naming the file and its mode ([`loose_mode`]).

use std::fs::{File, Metadata, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::error::io_err;
use super::PoolDirError;

/// Mode of every file thinpool creates in a pool directory.
pub const FILE_MODE: u32 = 0o600;
/// Mode of a pool directory thinpool creates or makes a pool of.
pub const DIR_MODE: u32 = 0o700;

/// Create `path`, which must not exist, for reading and writing, with mode 0600
/// whatever the umask.
pub fn create_private(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new().read(true).write(true).create_new(true).mode(FILE_MODE).open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Give the directory `dir` mode 0700.
pub fn make_dir_private(dir: &Path) -> io::Result<()> {
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// What a file of this type is, when it is not a regular file.
fn not_regular(m: &Metadata) -> Option<&'static str> {
    let t = m.file_type();
    if t.is_file() {
        None
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_dir() {
        Some("a directory")
    } else {
        Some("not a regular file")
    }
}

/// Refuse `m` (the metadata of `path`) unless it is a regular file.
pub(super) fn check_regular(path: &Path, m: &Metadata) -> Result<(), PoolDirError> {
    match not_regular(m) {
        None => Ok(()),
        Some(kind) => Err(PoolDirError::NotRegular { path: path.to_path_buf(), kind }),
    }
}

/// The metadata of the pool file `path` (symbolic links followed), `None` when it
/// does not exist; refused unless it is a regular file.
pub(super) fn stat_regular(path: &Path) -> Result<Option<Metadata>, PoolDirError> {
    match std::fs::metadata(path) {
        Ok(m) => {
            check_regular(path, &m)?;
            Ok(Some(m))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("cannot read", path)(e)),
    }
}

/// Open the pool file `path` for reading (and writing with `write`), only if it is a
/// regular file: checked before opening, opened without blocking, and checked again
/// on the opened file. Permission errors say so and name the path.
pub fn open_regular(path: &Path, write: bool) -> Result<File, PoolDirError> {
    let m = std::fs::metadata(path).map_err(io_err("cannot open", path))?;
    check_regular(path, &m)?;
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(io_err("cannot open", path))?;
    let m = f.metadata().map_err(io_err("cannot read", path))?;
    check_regular(path, &m)?;
    // A regular file ignores O_NONBLOCK; clear it all the same so the descriptor is
    // an ordinary one.
    let fd = f.as_raw_fd();
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| io_err("cannot read", path)(e.into()))?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(|e| io_err("cannot read", path)(e.into()))?;
    Ok(f)
}

/// A warning when `m` (of `path`, a pool file, or the pool directory when `dir`)
/// lets users other than its owner in: "pool file DIR/data is readable by others
/// (mode 0644); chmod 600 it".
pub(super) fn loose_mode(path: &Path, m: &Metadata, dir: bool) -> Option<String> {
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return None;
    }
    let how = match (mode & 0o044 != 0, mode & 0o022 != 0) {
        (true, true) => "readable and writable by others",
        (true, false) => "readable by others",
        (false, true) => "writable by others",
        (false, false) => "accessible by others",
    };
    let (what, want) = if dir { ("pool directory", "700") } else { ("pool file", "600") };
    Some(format!("{what} {} is {how} (mode {mode:04o}); chmod {want} it", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_files_and_directories_are_private_whatever_the_umask() {
        let t = tempfile::tempdir().expect("tmp");
        let p = t.path().join("f");
        create_private(&p).expect("create");
        assert_eq!(std::fs::metadata(&p).expect("stat").permissions().mode() & 0o7777, 0o600);
        assert!(create_private(&p).is_err(), "an existing file is not reused");
        let d = t.path().join("d");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).expect("chmod");
        make_dir_private(&d).expect("private");
        assert_eq!(std::fs::metadata(&d).expect("stat").permissions().mode() & 0o7777, 0o700);
    }

    #[test]
    fn only_regular_files_are_opened() {
        let t = tempfile::tempdir().expect("tmp");
        let fifo = t.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
        for write in [false, true] {
            let e = open_regular(&fifo, write).unwrap_err();
            assert!(matches!(e, PoolDirError::NotRegular { kind: "a FIFO", .. }), "{e}");
            assert!(e.to_string().contains("is a FIFO, not a regular file"), "{e}");
        }
        let e = open_regular(t.path(), false).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let e = open_regular(Path::new("/dev/null"), false).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let f = t.path().join("f");
        std::fs::write(&f, b"x").expect("write");
        let file = open_regular(&f, true).expect("a regular file opens");
        let flags = OFlag::from_bits_truncate(fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).expect("flags"));
        assert!(!flags.contains(OFlag::O_NONBLOCK));
        assert!(stat_regular(&t.path().join("missing")).expect("missing is no error").is_none());
    }

    #[test]
    fn loose_modes_are_described() {
        let t = tempfile::tempdir().expect("tmp");
        let f = t.path().join("data");
        std::fs::write(&f, b"x").expect("write");
        let check = |mode: u32| {
            std::fs::set_permissions(&f, Permissions::from_mode(mode)).expect("chmod");
            loose_mode(&f, &std::fs::metadata(&f).expect("stat"), false)
        };
        assert_eq!(check(0o600), None);
        assert_eq!(check(0o400), None);
        let w = check(0o644).expect("warned");
        assert!(w.contains("is readable by others (mode 0644); chmod 600 it"), "{w}");
        assert!(check(0o620).expect("warned").contains("writable by others (mode 0620)"));
        assert!(check(0o666).expect("warned").contains("readable and writable by others"));
        make_dir_private(t.path()).expect("chmod");
        assert_eq!(loose_mode(t.path(), &std::fs::metadata(t.path()).expect("stat"), true), None);
        std::fs::set_permissions(t.path(), Permissions::from_mode(0o755)).expect("chmod");
        let d = loose_mode(t.path(), &std::fs::metadata(t.path()).expect("stat"), true).expect("warned");
        assert!(d.starts_with("pool directory ") && d.ends_with("(mode 0755); chmod 700 it"), "{d}");
    }
}
