//! Files no one else can read, and input that cannot hang us (issue 9, item 7):
//! private modes whatever the umask, loose modes warned about, FIFOs and devices in
//! place of pool files refused at once, huge sizes in pool.toml refused naming the
//! limit, and permission errors that say so.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Longest a refused command may take; a command that blocks on a FIFO is killed
/// then and the test fails.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Run `program args` in the scratch directory with no input, killing it (and
/// failing the test) when it takes longer than [`TIMEOUT`].
#[track_caller]
fn run_guarded(sc: &Scratch, program: &Path, args: &[&str]) -> Run {
    let what = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .current_dir(sc.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{what}` still runs after {TIMEOUT:?}: it blocked");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        raw_stdout: out.stdout,
        what,
    }
}

/// thinctl with a time limit.
#[track_caller]
fn thinctl(sc: &Scratch, args: &[&str]) -> Run {
    run_guarded(sc, Path::new(env!("CARGO_BIN_EXE_thinctl")), args)
}

/// thinctl under `umask` (through `sh -c 'umask U; exec thinctl ...'`).
#[track_caller]
fn thinctl_umask(sc: &Scratch, umask: &str, args: &[&str]) -> Run {
    let script = format!("umask {umask}; exec \"$0\" \"$@\"");
    let mut all = vec!["-c", &script, env!("CARGO_BIN_EXE_thinctl")];
    all.extend_from_slice(args);
    run_guarded(sc, Path::new("/bin/sh"), &all)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).permissions().mode() & 0o7777
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
}

/// Every file thinpool made in `dir` is 0600, the directory 0700.
#[track_caller]
fn assert_private(dir: &Path, files: &[&str], after: &str) {
    assert_eq!(mode(dir), 0o700, "{} after `{after}`", dir.display());
    for f in files {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f} after `{after}`");
    }
}

#[test]
fn pool_files_are_private_whatever_the_umask() {
    for umask in ["022", "000"] {
        let sc = Scratch::new();
        thinctl_umask(&sc, umask, &["pool", "create", "p", "--data-size", "64M"]).ok();
        let p = sc.path("p");
        assert_private(&p, &["metadata", "data", "pool.toml", "pool.lock"], "pool create");
        // pool.toml is replaced through a temporary file: the new one is private too.
        thinctl_umask(&sc, umask, &["create", "p", "web", "--size", "4M"]).ok();
        assert_private(&p, &["metadata", "data", "pool.toml", "pool.lock"], "create");
        let leftovers: Vec<_> = std::fs::read_dir(&p).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(leftovers.len(), 4, "no temporary file is left behind: {leftovers:?}");

        // restore: into a new directory, and into an existing loose one holding nothing.
        let xml = thinctl(&sc, &["dump", "p"]).ok().to_string();
        sc.file("x.xml", xml.as_bytes());
        thinctl_umask(&sc, umask, &["restore", "q", "-i", "x.xml"]).ok();
        assert_private(&sc.path("q"), &["metadata", "data", "pool.toml", "pool.lock"], "restore into a new directory");
        std::fs::create_dir(sc.path("r")).expect("mkdir");
        chmod(&sc.path("r"), 0o755);
        thinctl_umask(&sc, umask, &["restore", "r", "-i", "x.xml"]).ok();
        assert_private(
            &sc.path("r"),
            &["metadata", "data", "pool.toml", "pool.lock"],
            "restore into an empty directory",
        );
        // restore --force builds its metadata in a temporary file renamed into place.
        thinctl_umask(&sc, umask, &["restore", "r", "-i", "x.xml", "--force"]).ok();
        assert_private(&sc.path("r"), &["metadata", "data", "pool.toml", "pool.lock"], "restore --force");

        // pool create into an existing (loose) empty directory makes it private.
        std::fs::create_dir(sc.path("e")).expect("mkdir");
        chmod(&sc.path("e"), 0o777);
        thinctl_umask(&sc, umask, &["pool", "create", "e", "--data-size", "64M"]).ok();
        assert_private(
            &sc.path("e"),
            &["metadata", "data", "pool.toml", "pool.lock"],
            "pool create in an existing directory",
        );

        // adopt: the pool directory and pool.toml are private (the adopted files are the user's).
        let r = thinctl_umask(
            &sc,
            umask,
            &["pool", "adopt", "a", "--metadata", "p/metadata", "--data", "p/data", "--size", "0=4M"],
        );
        r.ok();
        assert_private(&sc.path("a"), &["pool.toml", "pool.lock"], "pool adopt");
    }
}

#[test]
fn a_pool_with_loose_modes_opens_with_a_warning_naming_each_file() {
    let sc = Scratch::new();
    let p = sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "4M"]);
    let r = thinctl(&sc, &["ls", "p"]);
    r.ok();
    assert!(r.stderr.is_empty(), "a private pool opens quietly: {}", r.stderr);

    let rel = Path::new("p");
    chmod(&p.join("data"), 0o644);
    chmod(&p.join("pool.toml"), 0o640);
    chmod(&p, 0o755);
    let r = thinctl(&sc, &["ls", "p"]);
    assert!(r.ok().contains("web"), "the pool still opens: {}", r.stdout);
    let data =
        format!("warning: pool file {} is readable by others (mode 0644); chmod 600 it", rel.join("data").display());
    assert!(r.stderr.contains(&data), "{}", r.stderr);
    let toml = format!("pool file {} is readable by others (mode 0640); chmod 600 it", rel.join("pool.toml").display());
    assert!(r.stderr.contains(&toml), "{}", r.stderr);
    let dir = format!("pool directory {} is readable by others (mode 0755); chmod 700 it", rel.display());
    assert!(r.stderr.contains(&dir), "{}", r.stderr);
    assert!(!r.stderr.contains("metadata"), "the metadata file is still private: {}", r.stderr);

    chmod(&p.join("metadata"), 0o606);
    let r = thinctl(&sc, &["export", "p", "web", "out"]);
    r.ok();
    let meta = format!("pool file {} is readable and writable by others (mode 0606)", rel.join("metadata").display());
    assert!(r.stderr.contains(&meta), "{}", r.stderr);

    // A change rewrites pool.toml private again; the other modes are the user's to fix.
    sc.ok(&["create", "p", "db", "--size", "4M"]);
    assert_eq!(mode(&p.join("pool.toml")), 0o600);
    for (f, m) in [("data", 0o600), ("metadata", 0o600)] {
        chmod(&p.join(f), m);
    }
    chmod(&p, 0o700);
    let r = thinctl(&sc, &["ls", "p"]);
    r.ok();
    assert!(r.stderr.is_empty(), "no warning once fixed: {}", r.stderr);
}

#[test]
fn a_fifo_in_place_of_a_pool_file_is_refused_at_once() {
    for file in ["metadata", "data", "pool.toml"] {
        let sc = Scratch::new();
        sc.pool("p", "64M");
        sc.ok(&["create", "p", "web", "--size", "4M"]);
        // Messages name the path as the command was given it: relative here.
        let path = Path::new("p").join(file);
        std::fs::remove_file(sc.path("p").join(file)).expect("rm");
        mkfifo(&sc.path("p").join(file));
        let want = format!("{} is a FIFO, not a regular file", path.display());
        // Readers and writers, with and without the engine, and the server.
        let commands: &[&[&str]] = &[
            &["ls", "p"],
            &["status", "p"],
            &["export", "p", "web", "out"],
            &["check", "p"],
            &["dump", "p"],
            &["create", "p", "db", "--size", "1M"],
            &["serve", "p", "--listen", "127.0.0.1:0"],
        ];
        for args in commands {
            let r = thinctl(&sc, args);
            let err = r.fails(1);
            assert!(err.contains(&want), "`{}` with a FIFO for {file}: {err}", args.join(" "));
        }
        assert!(
            std::fs::symlink_metadata(sc.path("p").join(file)).expect("stat").file_type().is_fifo(),
            "the FIFO is left alone"
        );
    }
}

#[test]
fn adopt_and_restore_refuse_files_that_are_not_regular() {
    let sc = Scratch::new();
    sc.pool("p", "64M");
    let fifo = sc.path("fifo");
    mkfifo(&fifo);
    let r = thinctl(&sc, &["pool", "adopt", "a", "--metadata", "fifo", "--data", "p/data"]);
    let err = r.fails(1);
    assert!(err.contains("is a FIFO, not a regular file"), "{err}");
    let r = thinctl(&sc, &["pool", "adopt", "a", "--metadata", "p/metadata", "--data", "/dev/zero"]);
    let err = r.fails(1);
    assert!(err.contains("/dev/zero is a character device, not a regular file"), "{err}");
    assert!(!sc.path("a").exists(), "nothing is left behind");

    // restore into a directory whose `data` is a FIFO.
    let xml = thinctl(&sc, &["dump", "p"]).ok().to_string();
    sc.file("x.xml", xml.as_bytes());
    std::fs::create_dir(sc.path("r")).expect("mkdir");
    mkfifo(&sc.path("r/data"));
    let err = thinctl(&sc, &["restore", "r", "-i", "x.xml"]).fails(1).to_string();
    assert!(err.contains("is a FIFO, not a regular file"), "{err}");
}

/// The largest size NBD clients accept (`INT64_MAX`), in every message about it.
const LIMIT: &str = "at most 9223372036854775807 bytes";

#[test]
fn a_huge_size_in_pool_toml_is_refused_naming_the_limit() {
    for huge in ["18446744073709551615", "9223372036854775808"] {
        let sc = Scratch::new();
        let p = sc.pool("p", "64M");
        sc.ok(&["create", "p", "web", "--size", "4M"]);
        let toml = std::fs::read_to_string(p.join("pool.toml")).expect("toml");
        let edited = toml.replace("size_bytes = 4194304", &format!("size_bytes = {huge}"));
        assert_ne!(edited, toml, "{toml}");
        std::fs::write(p.join("pool.toml"), edited).expect("write");
        let toml_path = Path::new("p/pool.toml");
        for args in [&["ls", "p"][..], &["export", "p", "web", "out"], &["serve", "p", "--listen", "127.0.0.1:0"]] {
            let err = thinctl(&sc, args).fails(1).to_string();
            assert!(err.contains(&toml_path.display().to_string()), "names the file: {err}");
            assert!(err.contains(&format!("size_bytes = {huge} is too large")) && err.contains(LIMIT), "{err}");
        }
    }
    // The limit itself is accepted, by create and in pool.toml alike.
    let sc = Scratch::new();
    sc.pool("p", "64M");
    sc.ok(&["create", "p", "big", "--size", "9223372036854775807"]);
    assert_eq!(device_json(&sc, "p", "big")["size_bytes"], 9223372036854775807u64);
    let err = sc.run(&["resize", "p", "big", "--size", "9223372036854775808"]).fails(1).to_string();
    assert!(err.contains(LIMIT), "{err}");
}

/// `setpriv`, failing loudly when it is missing (the tests run as root, which file
/// modes do not stop).
fn setpriv() -> PathBuf {
    for p in ["/usr/bin/setpriv", "/bin/setpriv"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("setpriv not found: install util-linux (the permission tests drop to uid 65534 with it)");
}

/// thinctl as user and group 65534 (nobody), from a copy of the binary that user may run.
#[track_caller]
fn thinctl_as_nobody(sc: &Scratch, args: &[&str]) -> Run {
    let bin = sc.path("thinctl-nobody");
    if !bin.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_thinctl"), &bin).expect("copy thinctl");
        chmod(&bin, 0o755);
    }
    let mut all = vec!["--reuid=65534", "--regid=65534", "--clear-groups", bin.to_str().expect("utf8")];
    all.extend_from_slice(args);
    run_guarded(sc, &setpriv(), &all)
}

#[test]
fn permission_errors_say_permission_denied_and_name_the_path() {
    let sc = Scratch::new();
    // Others may pass through the scratch directory but not list it.
    chmod(sc.dir.path(), 0o711);
    let p = sc.pool("p", "64M");
    sc.ok(&["create", "p", "web", "--size", "4M"]);

    let rel = Path::new("p");
    let who = thinctl_as_nobody(&sc, &["--version"]);
    assert_eq!(who.code, 0, "thinctl runs as nobody: {}{}", who.stdout, who.stderr);

    // The directory itself (0700, root's): not "it has no pool.toml".
    let err = thinctl_as_nobody(&sc, &["ls", "p"]).fails(1).to_string();
    assert!(err.contains(&format!("cannot read the pool directory {}: permission denied", rel.display())), "{err}");
    assert!(!err.contains("no pool.toml"), "{err}");

    // pool.toml, then the metadata file.
    chmod(&p, 0o755);
    let err = thinctl_as_nobody(&sc, &["ls", "p"]).fails(1).to_string();
    assert!(err.contains(&format!("{}: permission denied", rel.join("pool.toml").display())), "{err}");
    chmod(&p.join("pool.toml"), 0o644);
    let err = thinctl_as_nobody(&sc, &["ls", "p"]).fails(1).to_string();
    assert!(err.contains(&format!("cannot open {}: permission denied", rel.join("metadata").display())), "{err}");
    chmod(&p.join("metadata"), 0o644);
    let err = thinctl_as_nobody(&sc, &["export", "p", "web", "-"]).fails(1).to_string();
    assert!(err.contains(&format!("cannot open {}: permission denied", rel.join("data").display())), "{err}");
    // A change needs the lock, which nobody may take in root's directory.
    let err = thinctl_as_nobody(&sc, &["create", "p", "db", "--size", "1M"]).fails(1).to_string();
    assert!(err.contains("permission denied"), "{err}");
}
