//! ublk with the real kernel: the 6.12 guest of tools/guest (`GUEST_KERNEL=6.12`,
//! Debian's bookworm-security cloud kernel with `ublk_drv`), one boot.
//!
//! thinctl and its libraries arrive on a disk as a cpio archive and run in the
//! guest (ublk devices are local by nature; the host has no ublk driver):
//! `thinctl serve --ublk thin0` makes /dev/ublkbN; ext4 on it, files written, a live
//! snapshot taken while mounted (fsfreeze), the snapshot attached read-only through
//! the control socket (`thinctl attach --read-only`), checked with `e2fsck -fn`
//! and its files read back, a write to it refused; `thinctl delete` refused while
//! a device is attached; fstrim on the mounted origin gives blocks back (status);
//! a pool that fills gives the writer ENOSPC and keeps serving; the kernel's NBD
//! client reads the snapshot over the Unix socket; detach; SIGTERM removes the
//! remaining devices; `thinctl check` passes on the pool afterwards. Then user
//! recovery: a server killed with SIGKILL under a mounted file system leaves the
//! device in place, a write waits, and the next `thinctl serve` takes the device
//! over (same /dev/ublkbN): the write completes, the files read back, fsck is clean.
//!
//! The guest boots under TCG; tools/guest/build.sh installs qemu and fetches the
//! kernel when missing, and the test fails if it cannot.

mod common;

use std::path::Path;

use common::guest::{payload_disk, run_guest};

const SCRIPT: &str = r#"
cd / && cpio -idm < /dev/vda 2>/dev/null
T=/sbin/thinctl
used() { $T status /tmp/p --json | grep '"data_used_blocks"' | tr -dc 0-9; }
$T pool create /tmp/p --data-size 48M >/dev/null
$T create /tmp/p thin0 --size 32M >/dev/null
$T create /tmp/p big0 --size 64M >/dev/null
$T serve /tmp/p --socket /tmp/nbd.sock --ublk thin0 --no-space error > /tmp/serve.log 2>&1 &
spid=$!
i=0; while ! grep -q 'attached "thin0"' /tmp/serve.log; do i=$((i+1)); [ $i -lt 300 ] || { cat /tmp/serve.log; exit 1; }; sleep 0.2; done
cat /tmp/serve.log
O=$(sed -n 's/^attached "thin0" as \(\/dev\/ublkb[0-9]*\).*/\1/p' /tmp/serve.log)
echo "origin $O"
[ -b "$O" ]
echo "== ext4 on $O"
/sbin/mkfs.ext4 -q -F "$O" || { cat /tmp/serve.log; exit 1; }
mkdir -p /mnt/o /mnt/s
mount -t ext4 "$O" /mnt/o
dd if=/dev/urandom of=/mnt/o/f1 bs=1M count=2 2>/dev/null
dd if=/dev/urandom of=/mnt/o/f2 bs=1M count=2 2>/dev/null
(cd /mnt/o && sha256sum f1 f2) > /tmp/sums
echo "== live snapshot while mounted"
/sbin/fsfreeze -f /mnt/o
$T snapshot /tmp/p thin0 snap
/sbin/fsfreeze -u /mnt/o
dd if=/dev/urandom of=/mnt/o/f3 bs=1M count=4 2>/dev/null
sync
S=$($T attach /tmp/p snap --read-only)
echo "snapshot $S"
[ -b "$S" ]
echo "attached: $($T attach /tmp/p --json)"
echo "ro=$(blockdev --getro "$S")"
/sbin/e2fsck -fn "$S" && echo "snapshot fsck clean"
mount -t ext4 -o ro "$S" /mnt/s
(cd /mnt/s && sha256sum -c /tmp/sums)
[ ! -e /mnt/s/f3 ] && echo "f3 is not in the snapshot"
umount /mnt/s
if dd if=/dev/zero of="$S" bs=4k count=1 oflag=direct 2>/dev/null; then echo "WRITE-TO-RO-ACCEPTED"; else echo "write to the read-only device refused"; fi
if $T delete /tmp/p snap 2>/tmp/del.err; then echo "DELETE-OF-ATTACHED-ACCEPTED"; else echo "delete refused: $(cat /tmp/del.err)"; fi
$T detach /tmp/p snap
[ ! -e "$S" ] && echo "snapshot device removed"
echo "== the kernel's NBD client over the Unix socket reads the snapshot"
/sbin/nbd-client -u /tmp/nbd.sock /dev/nbd0 -N snap -readonly
/sbin/e2fsck -fn /dev/nbd0 && echo "nbd snapshot fsck clean"
/sbin/nbd-client -d /dev/nbd0
echo "== fstrim gives blocks back"
sync
b1=$(used)
rm /mnt/o/f3
sync
fstrim -v /mnt/o
sync
b2=$(used)
echo "data blocks before $b1 after $b2"
[ "$b2" -lt "$b1" ] && echo "fstrim reclaimed $((b1 - b2)) blocks"
(cd /mnt/o && sha256sum -c /tmp/sums)
umount /mnt/o
echo "== a full pool gives ENOSPC"
B=$($T attach /tmp/p big0)
if dd if=/dev/urandom of="$B" bs=1M count=60 oflag=direct 2>/tmp/dd.err; then echo "FULL-POOL-WRITE-ACCEPTED"; else echo "full pool: $(tr '\n' ' ' < /tmp/dd.err)"; fi
grep -c 'errno 28' /tmp/serve.log | sed 's/^/ENOSPC completions logged: /' 
$T status /tmp/p | grep mode
kill -0 $spid && echo "server alive after ENOSPC"
$T detach /tmp/p big0
$T delete /tmp/p big0
echo "== SIGTERM removes the devices"
ls /dev/ublkb*
kill -TERM $spid
wait $spid && echo "server exit 0"
ls /dev/ublkb* 2>/dev/null || echo "no ublk devices left"
$T check /tmp/p
$T ls /tmp/p
echo "== a server killed with SIGKILL: the next one takes its device over"
$T serve /tmp/p --socket /tmp/nbd.sock --ublk thin0 > /tmp/serve2.log 2>&1 &
spid=$!
i=0; while ! grep -q 'attached "thin0"' /tmp/serve2.log; do i=$((i+1)); [ $i -lt 300 ] || { cat /tmp/serve2.log; exit 1; }; sleep 0.2; done
O=$(sed -n 's/^attached "thin0" as \(\/dev\/ublkb[0-9]*\).*/\1/p' /tmp/serve2.log)
mount -t ext4 "$O" /mnt/o
dd if=/dev/urandom of=/mnt/o/g1 bs=1M count=1 2>/dev/null
(cd /mnt/o && sha256sum g1) > /tmp/g.sha
sync
kill -9 $spid
wait $spid || echo "server killed"
ls /dev/ublkb* && echo "the device stays"
(dd if=/dev/urandom of=/mnt/o/g2 bs=64k count=4 conv=fsync 2>/dev/null && echo "a write made during the outage completed") &
wpid=$!
sleep 2
kill -0 $wpid && echo "the write waits for a server"
$T serve /tmp/p --socket /tmp/nbd.sock > /tmp/serve3.log 2>&1 &
spid=$!
i=0; while ! grep -q 'recovered "thin0"' /tmp/serve3.log; do i=$((i+1)); [ $i -lt 300 ] || { cat /tmp/serve3.log; exit 1; }; sleep 0.2; done
cat /tmp/serve3.log
wait $wpid
(cd /mnt/o && sha256sum -c /tmp/g.sha)
umount /mnt/o
/sbin/e2fsck -fn "$O" && echo "recovered device fsck clean"
kill -TERM $spid
wait $spid && echo "second server exit 0"
ls /dev/ublkb* 2>/dev/null || echo "no ublk devices at the end"
$T check /tmp/p
echo GUEST-OK
"#;

#[test]
fn ublk_devices_in_the_6_12_guest_carry_ext4_live_snapshots_fstrim_enospc_and_recovery() {
    let tmp = tempfile::tempdir().expect("tmp");
    // thinctl at /sbin/thinctl, with the shared libraries it loads at their own paths.
    let disk = payload_disk(tmp.path(), &[(Path::new(env!("CARGO_BIN_EXE_thinctl")), "sbin/thinctl")], &[]);
    let out = run_guest(SCRIPT, &[&disk], &[("GUEST_KERNEL", "6.12"), ("VM_MEM", "768")]);
    let has = |s: &str| assert!(out.contains(s), "no {s:?} in the guest's output:\n{out}");
    has("GUEST-OK");
    has("f1: OK");
    has("f2: OK");
    has("snapshot fsck clean");
    has("f3 is not in the snapshot");
    has("ro=1");
    has("write to the read-only device refused");
    has("delete refused: error: device \"snap\" is attached as /dev/ublkb");
    has("snapshot device removed");
    has("nbd snapshot fsck clean");
    has("fstrim reclaimed");
    has("full pool: ");
    has("No space left on device");
    has("server alive after ENOSPC");
    has("server exit 0");
    has("no ublk devices left");
    has("metadata is consistent");
    has("the device stays");
    has("recovered \"thin0\" as /dev/ublkb");
    has("the write waits for a server");
    has("a write made during the outage completed");
    has("g1: OK");
    has("recovered device fsck clean");
    has("second server exit 0");
    has("no ublk devices at the end");
    assert!(!out.contains("ACCEPTED"), "{out}");
}
