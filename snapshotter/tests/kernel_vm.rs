//! The snapshotter's mounts with the real Linux kernel (the qemu guest of
//! `tools/guest`, TCG): containerd on the host prepares, commits and views through
//! the snapshotter (`--attach none`, serving NBD on 127.0.0.1); the guest attaches
//! the exports the mounts name with its `nbd-client` (at 10.0.2.2, the host's
//! loopback) and mounts them as ext4. Shows that the base file system (formatted once
//! on a sparse file, copied into a thin device) is one the kernel mounts and checks
//! clean, that a committed layer's files are in its view and in a child, and that a
//! child's changes stay its own. (The snapshotter's own `--attach nbd` path, which
//! runs `nbd-client` itself where the snapshotter runs, is tested inside the guest by
//! `kernel_vm_containerd.rs`.)

mod common;

use common::guest::run_guest;
use common::*;

/// The export a snapshot's mount names, and the mount's options.
fn mount_of(c: &Containerd, key: &str) -> (String, String) {
    let out = c.snap(&["mounts", "/mnt", key]);
    // mount -t ext4 nbd://127.0.0.1:PORT/ctr-N /mnt -o OPTIONS
    let f: Vec<&str> = out.split_whitespace().collect();
    let src = f.iter().find(|w| w.starts_with("nbd://")).unwrap_or_else(|| panic!("no nbd source: {out}"));
    let export = src.rsplit('/').next().expect("export").to_string();
    let opts = f.iter().position(|w| *w == "-o").map(|i| f[i + 1].to_string()).unwrap_or_default();
    (export, opts)
}

#[test]
fn the_kernel_mounts_prepared_committed_and_viewed_snapshots_as_ext4() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let sock = tmp.path().join("snapshotter.sock");
    let snap = Snapshotter::start(&dir, &sock, &tmp.path().join("snapshotter.log"));
    let c = Containerd::start(tmp.path(), &sock);
    let port = snap.nbd.rsplit(':').next().expect("port").to_string();

    c.snap(&["prepare", "a1"]);
    let (a1, a1_opts) = mount_of(&c, "a1");
    assert_eq!(a1_opts, "rw,noinit_itable");
    let out = run_guest(
        &format!(
            r#"
H=10.0.2.2
/sbin/nbd-client $H {port} /dev/nbd0 -N {a1}
/sbin/e2fsck -fn /dev/nbd0
mkdir -p /mnt/a
mount -t ext4 -o {a1_opts} /dev/nbd0 /mnt/a
echo layer-one > /mnt/a/one
mkdir /mnt/a/etc && echo v1 > /mnt/a/etc/version
umount /mnt/a
/sbin/e2fsck -fn /dev/nbd0
/sbin/nbd-client -d /dev/nbd0
echo "first boot done"
"#
        ),
        &[],
        &[],
    );
    assert!(out.contains("first boot done"));

    c.snap(&["commit", "c1", "a1"]);
    c.snap(&["label", "c1", "containerd.io/gc.ref.snapshot.thinpool=v1"]);
    c.snap(&["view", "v1", "c1"]);
    c.snap(&["prepare", "a2", "c1"]);
    let (v1, v1_opts) = mount_of(&c, "v1");
    let (a2, a2_opts) = mount_of(&c, "a2");
    assert_eq!(v1_opts, "ro");
    let out = run_guest(
        &format!(
            r#"
H=10.0.2.2
mkdir -p /mnt/v /mnt/a
/sbin/nbd-client $H {port} /dev/nbd0 -N {v1} -readonly
mount -t ext4 -o {v1_opts} /dev/nbd0 /mnt/v
[ "$(cat /mnt/v/one)" = layer-one ] && echo "view has the committed file"
if touch /mnt/v/nope 2>/dev/null; then echo "view is WRITABLE"; exit 1; fi
/sbin/nbd-client $H {port} /dev/nbd1 -N {a2}
mount -t ext4 -o {a2_opts} /dev/nbd1 /mnt/a
[ "$(cat /mnt/a/etc/version)" = v1 ] && echo "child has the parent's files"
echo v2 > /mnt/a/etc/version
echo layer-two > /mnt/a/two
umount /mnt/a
/sbin/e2fsck -fn /dev/nbd1
mount -t ext4 -o ro /dev/nbd1 /mnt/a
[ "$(cat /mnt/a/etc/version)" = v2 ] && [ -e /mnt/a/two ] && echo "child keeps its changes"
[ "$(cat /mnt/v/etc/version)" = v1 ] && [ ! -e /mnt/v/two ] && echo "the view is unchanged"
umount /mnt/a
umount /mnt/v
/sbin/nbd-client -d /dev/nbd1
/sbin/nbd-client -d /dev/nbd0
"#
        ),
        &[],
        &[],
    );
    for want in [
        "view has the committed file",
        "child has the parent's files",
        "child keeps its changes",
        "the view is unchanged",
    ] {
        assert!(out.contains(want), "missing \"{want}\"");
    }
    assert!(!out.contains("view is WRITABLE"));
    // The layers' usage: c1 holds what the first boot wrote, a2 its own changes.
    assert!(!c.snap(&["usage", "c1"]).contains(" 0.0 B"), "c1 holds data");
    assert!(!c.snap(&["usage", "a2"]).contains(" 0.0 B"), "a2 holds its own changes");
    for k in ["a2", "v1", "c1"] {
        c.snap(&["rm", k]);
    }
    wait_for("the snapshots to be removed", 30, || records(&dir).is_empty());
    snap.stop();
    check_pool(&dir);
}
