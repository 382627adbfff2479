//! The real Linux kernel as the peer, in a small qemu guest (tools/guest/):
//!
//! 1. `thinctl serve` serves a pool; the kernel's nbd client attaches a device, makes
//!    an ext4 file system, writes files; `thinctl snapshot` (through the server's
//!    control socket) snapshots the device while it is mounted (the guest freezes the
//!    file system around it); the snapshot, attached as a second NBD device, holds
//!    exactly the files from before; fstrim on the origin gives blocks back (`thinctl
//!    ls` shows mapped bytes fall); SIGTERM stops the server cleanly and both
//!    checkers accept the pool.
//! 2. The kernel's dm-thin-pool activates a pool thinpool wrote and reads every
//!    device with the bytes thinpool reads; then it writes and snapshots, and
//!    thinpool reads what the kernel committed.
//! 3. ext4 on a served device: 4 KiB files deleted in a random order, in rounds, with
//!    online discards and fstrim; partial discards add up and the blocks come back.
//!
//! The guest boots under TCG (no KVM needed); tools/guest/build.sh installs qemu and
//! fetches Debian's cloud kernel when missing, and these tests fail if it cannot.

mod common;

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::guest::run_guest;
use sha2::{Digest, Sha256};
use thinpool::pool::{OpenOptions as PoolOpen, Pool};

const MIB: u64 = 1 << 20;
const BS: u64 = 64 * 1024;

fn files(dir: &Path, meta: u64, data: u64) -> (PathBuf, PathBuf) {
    let (m, d) = (dir.join("metadata"), dir.join("data"));
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&m).expect("m");
    f.set_len(meta).expect("len");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&d).expect("d");
    f.set_len(data).expect("len");
    (m, d)
}

fn open(m: &Path, d: &Path, read_only: bool) -> Pool {
    let mf = OpenOptions::new().read(true).write(!read_only).open(m).expect("m");
    let df = OpenOptions::new().read(true).write(!read_only).open(d).expect("d");
    Pool::open(mf, df, PoolOpen { read_only }).expect("open pool")
}

fn checks_pass(m: &Path) {
    common::assert_checks_pass(m);
}

fn sha(p: &mut Pool, id: u32, size: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        p.read(id, off, &mut buf[..n]).expect("read");
        h.update(&buf[..n]);
        off += n as u64;
    }
    format!("{:x}", h.finalize())
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x = 0x1234_5678u32 ^ seed as u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn thinctl(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_thinctl")).args(args).output().expect("run thinctl");
    assert!(
        out.status.success(),
        "thinctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mapped_bytes(dir: &str, name: &str) -> u64 {
    let ls: serde_json::Value = serde_json::from_str(&thinctl(&["ls", dir, "--json"])).expect("ls json");
    ls["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["name"] == name)
        .and_then(|d| d["mapped_bytes"].as_u64())
        .expect("mapped_bytes")
}

#[test]
fn the_kernel_mounts_a_served_device_and_a_live_snapshot_holds_the_files_from_before() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let d = dir.to_str().expect("utf8 path").to_string();
    thinctl(&["pool", "create", &d, "--data-size", "1G"]);
    thinctl(&["create", &d, "thin0", "--size", "256M"]);
    let nbd_port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_thinctl"))
        .args(["serve", &d, "--listen", &format!("127.0.0.1:{nbd_port}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("thinctl serve");
    let mut first = String::new();
    BufReader::new(server.stdout.as_mut().expect("stdout")).read_line(&mut first).expect("serve prints its address");
    assert!(first.contains("serving pool"), "{first}");

    // The guest asks the host to act with one line over TCP; the host uses thinctl,
    // which reaches the running server through its control socket.
    let ctl = TcpListener::bind("127.0.0.1:0").expect("bind control");
    let ctl_port = ctl.local_addr().expect("addr").port();
    let d2 = d.clone();
    let ctl_thread = std::thread::spawn(move || {
        let mut snapshots = 0;
        for conn in ctl.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_err() {
                continue;
            }
            let reply = match line.trim() {
                "snapshot" => {
                    thinctl(&["snapshot", &d2, "thin0", "snap"]);
                    snapshots += 1;
                    "ok".to_string()
                }
                "mapped" => mapped_bytes(&d2, "thin0").to_string(),
                "done" => {
                    let _ = conn.write_all(b"bye\n");
                    return snapshots;
                }
                other => format!("unknown {other}"),
            };
            let _ = conn.write_all(format!("{reply}\n").as_bytes());
        }
        snapshots
    });

    let script = format!(
        r#"
H=10.0.2.2
ask() {{ echo "$1" | nc $H {ctl_port}; }}
/sbin/nbd-client $H {nbd_port} /dev/nbd0 -N thin0
/sbin/mkfs.ext4 -q -F /dev/nbd0
mkdir -p /mnt/o /mnt/s
mount -t ext4 /dev/nbd0 /mnt/o
dd if=/dev/urandom of=/mnt/o/a bs=1M count=6 2>/dev/null
dd if=/dev/urandom of=/mnt/o/b bs=64k count=7 2>/dev/null
echo hello > /mnt/o/small
(cd /mnt/o && sha256sum a b small) > /tmp/before.sha
sync
/sbin/fsfreeze -f /mnt/o
r=$(ask snapshot); echo "host: $r"; [ "$r" = ok ]
/sbin/fsfreeze -u /mnt/o
dd if=/dev/urandom of=/mnt/o/c bs=1M count=3 2>/dev/null
echo changed > /mnt/o/small
sync
/sbin/nbd-client $H {nbd_port} /dev/nbd1 -N snap
/sbin/e2fsck -fn /dev/nbd1
mount -t ext4 -o ro /dev/nbd1 /mnt/s
(cd /mnt/s && sha256sum -c /tmp/before.sha)
[ ! -e /mnt/s/c ] && echo "snapshot has no c"
[ -e /mnt/o/c ] && echo "origin has c"
grep -q changed /mnt/o/small && grep -q hello /mnt/s/small && echo "small differs as expected"
umount /mnt/s
/sbin/nbd-client -d /dev/nbd1
before=$(ask mapped)
rm /mnt/o/a /mnt/o/c
sync
fstrim -v /mnt/o
sync
after=$(ask mapped)
echo "mapped before $before after $after"
[ "$after" -lt "$before" ]
umount /mnt/o
/sbin/nbd-client -d /dev/nbd0
ask done
echo GUEST-OK
"#
    );
    let out = run_guest(&script, &[], &[]);
    assert!(out.contains("GUEST-OK"), "{out}");
    assert!(out.contains("a: OK") && out.contains("b: OK") && out.contains("small: OK"), "{out}");
    assert!(out.contains("snapshot has no c") && out.contains("small differs as expected"), "{out}");
    assert_eq!(ctl_thread.join().expect("control"), 1);
    // SIGTERM: the server finishes, commits and exits 0.
    let killed = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let status = server.wait().expect("wait");
    assert!(status.success(), "thinctl serve exited with {status}");
    checks_pass(&dir.join("metadata"));
    let ls = thinctl(&["ls", &d]);
    assert!(ls.contains("snap") && ls.contains("thin0"), "{ls}");
}

#[test]
fn the_kernel_reads_our_pools_and_we_read_what_the_kernel_wrote() {
    let dir = tempfile::tempdir().expect("tmp");
    let data_size = 96 * MIB;
    let (m, d) = files(dir.path(), 8 * MIB, data_size);
    let sizes: [(u32, u64); 5] = [(0, 80 * MIB), (1, 80 * MIB), (2, 80 * MIB), (3, 8 * MIB), (5, 4 * MIB)];
    let mut shas = Vec::new();
    {
        let mf = OpenOptions::new().read(true).write(true).open(&m).expect("m");
        let df = OpenOptions::new().read(true).write(true).open(&d).expect("d");
        let mut p = Pool::create(mf, df, 128).expect("create");
        p.create_thin(0).expect("thin");
        // More than a thousand mapped blocks, written out of order.
        let data = pattern(1, (1100 * BS) as usize);
        for i in 0..1100u64 {
            let b = (i * 7) % 1100;
            p.write(0, b * BS, &data[(b * BS) as usize..((b + 1) * BS) as usize]).expect("write");
        }
        p.commit().expect("commit");
        p.create_snap(1, 0).expect("snap");
        p.write(1, 3 * BS + 100, &pattern(2, 200_000)).expect("cow");
        p.create_snap(2, 1).expect("snapshot of a snapshot");
        p.discard(2, 10 * BS, 50 * BS).expect("discard");
        p.write(0, 500 * BS - 7, &pattern(3, 70_000)).expect("write");
        p.create_thin(3).expect("thin");
        p.write(3, 12345, &pattern(4, 300_000)).expect("write");
        p.create_thin(4).expect("thin");
        p.write(4, 0, &pattern(5, 100_000)).expect("write");
        p.delete(4).expect("delete");
        p.create_thin(5).expect("thin");
        p.set_transaction_id(0, 17).expect("txid");
        p.commit().expect("commit");
        for (id, size) in sizes {
            shas.push((id, sha(&mut p, id, size)));
        }
        assert!(p.meta().device_info(0).expect("info").mapped_blocks > 1000);
    }
    checks_pass(&m);
    let pool_sectors = data_size / 512;
    let payload_path = dir.path().join("payload");
    let payload = pattern(9, (2 * MIB) as usize);
    std::fs::write(&payload_path, &payload).expect("payload");
    let mut script = format!(
        "/sbin/dmsetup create pool --table \"0 {pool_sectors} thin-pool /dev/vda /dev/vdb 128 0\"\n/sbin/dmsetup mknodes\n"
    );
    for (id, size) in sizes {
        script += &format!("/sbin/dmsetup create thin{id} --table \"0 {} thin /dev/mapper/pool {id}\"\n", size / 512);
    }
    script += "/sbin/dmsetup mknodes\n";
    for (id, _) in sizes {
        script += &format!("echo \"SHA {id} $(sha256sum /dev/mapper/thin{id} | cut -d' ' -f1)\"\n");
    }
    // The kernel writes 2 MiB into device 3 at 1 MiB, then snapshots it as device 9.
    script += "dd if=/dev/vdc of=/dev/mapper/thin3 bs=64k seek=16 count=32 oflag=direct 2>/dev/null\n";
    script +=
        "/sbin/dmsetup suspend thin3\n/sbin/dmsetup message pool 0 \"create_snap 9 3\"\n/sbin/dmsetup resume thin3\n";
    script += "dd if=/dev/zero of=/dev/mapper/thin3 bs=64k seek=16 count=1 oflag=direct 2>/dev/null\n";
    script += "/sbin/dmsetup message pool 0 \"set_transaction_id 17 18\"\n";
    for (id, _) in sizes {
        script += &format!("/sbin/dmsetup remove thin{id}\n");
    }
    script += "/sbin/dmsetup remove pool\necho KERNEL-DONE\n";
    let out = run_guest(&script, &[&m, &d, &payload_path], &[]);
    assert!(out.contains("KERNEL-DONE"), "{out}");
    for (id, want) in &shas {
        let line = format!("SHA {id} {want}");
        assert!(out.contains(&line), "the kernel read device {id} differently; wanted {line}\n{out}");
    }
    // Back on the host: the kernel's commit opens and passes both checkers.
    checks_pass(&m);
    let mut p = open(&m, &d, true);
    assert_eq!(p.meta().transaction_id(), 18);
    assert_eq!(p.meta().device_ids(), vec![0, 1, 2, 3, 5, 9]);
    let mut want3 = vec![0u8; (8 * MIB) as usize];
    want3[12345..12345 + 300_000].copy_from_slice(&pattern(4, 300_000));
    want3[MIB as usize..(3 * MIB) as usize].copy_from_slice(&payload);
    let mut snap = vec![0u8; (8 * MIB) as usize];
    p.read(9, 0, &mut snap).expect("read snapshot");
    assert!(snap == want3, "device 9 (the kernel's snapshot) differs");
    want3[MIB as usize..(MIB + BS) as usize].fill(0);
    let mut got3 = vec![0u8; (8 * MIB) as usize];
    p.read(3, 0, &mut got3).expect("read");
    assert!(got3 == want3, "device 3 (written by the kernel) differs");
    for (id, want) in &shas {
        if *id != 3 {
            let size = sizes.iter().find(|s| s.0 == *id).expect("size").1;
            assert_eq!(&sha(&mut p, *id, size), want, "device {id} changed");
        }
    }
}

/// Issue 9, item 6: partial discards give space back. ext4 (4 KiB blocks) packs
/// 4 KiB files sixteen to a 64 KiB pool block; the guest deletes them in a random
/// order in three rounds, mounted with `-o discard` so each round's deletes reach
/// the pool as their own small discards (ext4 sends them from a work queue after
/// the commit), and runs `fstrim` after each round. Mapped bytes must fall back
/// close to the empty file system's: all that stays is the inode table the files
/// used (2,048 inodes of 256 bytes).
///
/// Whole-block-only discards (dm-thin's rule, and ours before) would free almost
/// nothing from the online discards: a block is freed only when one discard covers
/// all of it, and ext4 merges online discards only among extents freed in the same
/// transaction, so a block's sixteen files would all have to go in the last round,
/// adjacent in the free list: about (1/3)^16 of the blocks. The earlier rounds'
/// discards are forgotten by then; with partial tracking they add up, and the
/// blocks come back as their last file goes. `fstrim` is different: this kernel
/// re-trims all of a group's free space after any free (about 100 MB each round),
/// so once every file is gone its large extents would free whole blocks under
/// either rule. The assertion that tells the two apart is therefore the figure read
/// after the last round's online discards, before its `fstrim`.
#[test]
fn fstrim_and_online_discards_of_random_4k_file_deletes_give_the_space_back() {
    const FILES: usize = 2048;
    const ROUNDS: usize = 3;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("pool");
    let d = dir.to_str().expect("utf8 path").to_string();
    thinctl(&["pool", "create", &d, "--data-size", "512M", "--block-size", "64K"]);
    thinctl(&["create", &d, "thin0", "--size", "128M"]);
    let nbd_port = TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut server = Command::new(env!("CARGO_BIN_EXE_thinctl"))
        .args(["serve", &d, "--listen", &format!("127.0.0.1:{nbd_port}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("thinctl serve");
    let mut first = String::new();
    BufReader::new(server.stdout.as_mut().expect("stdout")).read_line(&mut first).expect("serve prints its address");
    assert!(first.contains("serving pool"), "{first}");

    // The guest asks "mapped LABEL"; the host answers with thin0's mapped bytes
    // (thinctl ls through the server's control socket) and keeps (LABEL, bytes).
    let ctl = TcpListener::bind("127.0.0.1:0").expect("bind control");
    let ctl_port = ctl.local_addr().expect("addr").port();
    let d2 = d.clone();
    let ctl_thread = std::thread::spawn(move || {
        let mut seen: Vec<(String, u64)> = Vec::new();
        for conn in ctl.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_err() {
                continue;
            }
            let mut words = line.split_whitespace();
            let reply = match (words.next(), words.next()) {
                (Some("mapped"), Some(label)) => {
                    let b = mapped_bytes(&d2, "thin0");
                    seen.push((label.to_string(), b));
                    b.to_string()
                }
                (Some("done"), _) => {
                    let _ = conn.write_all(b"bye\n");
                    return seen;
                }
                _ => format!("unknown {}", line.trim()),
            };
            let _ = conn.write_all(format!("{reply}\n").as_bytes());
        }
        seen
    });

    // A fixed random order of deletes, split into rounds.
    let mut order: Vec<usize> = (0..FILES).collect();
    let mut x = 0x9e37_79b9u32;
    for i in (1..FILES).rev() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        order.swap(i, x as usize % (i + 1));
    }
    let mut rounds = String::new();
    for (r, chunk) in order.chunks(FILES.div_ceil(ROUNDS)).enumerate() {
        let names: Vec<String> = chunk.iter().map(|i| format!("f{i}")).collect();
        rounds += &format!(
            "(cd /mnt/t/d && rm {})\nsync\nsettle\ndstat round{r}-online\nask \"mapped round{r}-online\"\nfstrim -v /mnt/t\nsync\nsettle\ndstat round{r}-fstrim\nask \"mapped round{r}-fstrim\"\n",
            names.join(" ")
        );
    }
    // Files are written with shell builtins only (a fork per file is slow under
    // TCG): a 5-digit number and 4091 more bytes, 4 KiB each.
    let script = format!(
        r#"
H=10.0.2.2
ask() {{ echo "$1" | nc $H {ctl_port}; }}
# Discard requests the device has completed so far (field 12 of its stat).
dstat() {{ echo "DISCARDS $1 $(awk '{{print $12}}' /sys/block/nbd0/stat)"; }}
# ext4 sends online discards from a work queue after the commit: wait until the
# device's discard count stops moving before asking the host.
settle() {{ a=x; b=$(awk '{{print $12}}' /sys/block/nbd0/stat); while [ "$a" != "$b" ]; do a=$b; sleep 1; b=$(awk '{{print $12}}' /sys/block/nbd0/stat); done; }}
/sbin/nbd-client $H {nbd_port} /dev/nbd0 -N thin0
/sbin/mkfs.ext4 -q -F -b 4096 -E nodiscard /dev/nbd0
mkdir -p /mnt/t
mount -t ext4 -o discard,noinit_itable /dev/nbd0 /mnt/t
mkdir /mnt/t/d
sync
ask "mapped empty"
blk=$(head -c 4091 /dev/zero | tr '\0' x)
i=0
while [ $i -lt {FILES} ]; do printf '%05d%s' $i "$blk" > /mnt/t/d/f$i; i=$((i+1)); done
sync
dstat files
ask "mapped files"
{rounds}
ls /mnt/t/d | wc -l
umount /mnt/t
/sbin/e2fsck -fn /dev/nbd0
/sbin/nbd-client -d /dev/nbd0
ask done
echo GUEST-OK
"#
    );
    let out = run_guest(&script, &[], &[]);
    assert!(out.contains("GUEST-OK"), "{out}");
    let seen = ctl_thread.join().expect("control");
    let at = |label: &str| seen.iter().find(|(l, _)| l == label).unwrap_or_else(|| panic!("no {label}: {seen:?}")).1;
    let (empty, files) = (at("empty"), at("files"));
    let added = files - empty;
    eprintln!("mapped bytes: empty {empty}, with {FILES} files {files} (+{added})");
    for (label, b) in &seen {
        let freed = files.saturating_sub(*b);
        eprintln!(
            "  {label:>16}: {b:>10}  freed {freed:>9} ({:.0}% of what the files added)",
            100.0 * freed as f64 / added as f64
        );
    }
    for line in out.lines().filter(|l| l.contains("DISCARDS ")) {
        eprintln!("  {}", line.trim());
    }
    assert!(added >= (FILES as u64 * 4096) * 9 / 10, "the files did not map their bytes: {seen:?}");
    let last = ROUNDS - 1;
    for label in [format!("round{last}-online"), format!("round{last}-fstrim")] {
        let freed = files - at(&label);
        assert!(freed >= added * 7 / 10, "after {label} only {freed} of {added} bytes came back: {seen:?}");
    }
    // SIGTERM: the server finishes, commits and exits 0; both checkers accept the pool.
    let killed = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().expect("kill");
    assert!(killed.success());
    let status = server.wait().expect("wait");
    assert!(status.success(), "thinctl serve exited with {status}");
    checks_pass(&dir.join("metadata"));
    thinctl(&["check", &d]);
}
