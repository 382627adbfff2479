//! Containers on thin snapshots, all inside the qemu guest of `tools/guest` (the
//! Linux 6.1 kernel under TCG, one boot): Debian's containerd, runc and the
//! snapshotter with `--attach nbd` — it serves NBD on the guest's loopback and
//! attaches `/dev/nbdN` itself with `nbd-client` — as containerd's proxy plugin.
//! The programs (and the shared libraries `ldd` lists) reach the guest as a cpio
//! archive on a virtio disk, with an OCI image the test builds from busybox.
//!
//! 1. `ctr images import` unpacks the image into the pool (containerd mounts our
//!    ext4 mount of `/dev/nbdN`), `ctr run --snapshotter thinpool` runs a container
//!    that writes a file, its snapshot is committed as a new layer, a second
//!    container runs on a snapshot prepared from that layer and reads the file;
//!    after everything is removed the pool's used data blocks are back at the
//!    baseline (the base file system alone) and no `/dev/nbdN` is attached.
//! 2. Commit is refused while the snapshot is mounted; Remove of a mounted snapshot
//!    waits, then disconnects the device lazily and says so; the device is free
//!    once unmounted.
//! 3. `kill -9` of the snapshotter with a device attached leaves `/dev/nbdN`
//!    connected to a dead server; the restarted snapshotter disconnects it (from its
//!    attachments file), attaches the snapshot afresh, and the data is intact.
//!    `thinctl check` accepts the pool at the end.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use common::guest::{self, run_guest};
use common::need;

const IMAGE: &str = "docker.io/thinpool/busybox:test";

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

fn tar_file(t: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    t.append_data(&mut h, path, data).expect("tar file");
}

/// An OCI image archive (`oci-layout`, `index.json`, blobs) whose one layer holds
/// `/bin/busybox` from busybox-static and a few applet links.
fn busybox_image(out: &Path) {
    need("busybox", "busybox-static");
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian package busybox-static)");
    // The image holds no libraries: busybox must be the static one.
    let ldd = Command::new("ldd").arg("/bin/busybox").output().expect("ldd");
    let said = format!("{}{}", String::from_utf8_lossy(&ldd.stdout), String::from_utf8_lossy(&ldd.stderr));
    assert!(
        said.contains("not a dynamic executable") || said.contains("statically linked"),
        "/bin/busybox is linked dynamically: install the Debian package busybox-static ({said})"
    );
    let mut layer = tar::Builder::new(Vec::new());
    for dir in ["bin", "dev", "etc", "proc", "sys", "tmp"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(0);
        layer.append_data(&mut h, format!("{dir}/"), std::io::empty()).expect("dir");
    }
    tar_file(&mut layer, "bin/busybox", 0o755, &busybox);
    for applet in ["sh", "cat", "echo", "ls", "sync"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        layer.append_link(&mut h, format!("bin/{applet}"), "busybox").expect("link");
    }
    let layer = layer.into_inner().expect("layer");
    let layer_digest = sha256_hex(&layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_digest}","size":{}}}]}}"#,
        sha256_hex(config.as_bytes()),
        config.len(),
        layer.len()
    );
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{},"annotations":{{"io.containerd.image.name":"{IMAGE}","org.opencontainers.image.ref.name":"test"}}}}]}}"#,
        sha256_hex(manifest.as_bytes()),
        manifest.len()
    );
    let mut archive = tar::Builder::new(Vec::new());
    tar_file(&mut archive, "oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    tar_file(&mut archive, "index.json", 0o644, index.as_bytes());
    for blob in [&layer[..], config.as_bytes(), manifest.as_bytes()] {
        tar_file(&mut archive, &format!("blobs/sha256/{}", sha256_hex(blob)), 0o644, blob);
    }
    std::fs::write(out, archive.into_inner().expect("archive")).expect("write image");
}

/// `exe` stripped of debug info, as `dir/NAME`.
fn stripped(dir: &Path, exe: &Path) -> PathBuf {
    need("strip", "binutils");
    std::fs::create_dir_all(dir).expect("mkdir");
    let to = dir.join(exe.file_name().expect("name"));
    let st = Command::new("strip").arg("-o").arg(&to).arg(exe).status().expect("strip");
    assert!(st.success(), "strip {}", exe.display());
    to
}

fn which(cmd: &str, package: &str) -> PathBuf {
    need(cmd, package);
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{cmd} not found"))
}

/// The disk image the guest extracts: containerd, its runc shim, ctr, runc, the
/// snapshotter, thinctl (all at /sbin/NAME), their libraries, and the image archive
/// at /img/image.tar.
fn payload_disk(dir: &Path) -> PathBuf {
    let snapshotter = PathBuf::from(env!("CARGO_BIN_EXE_thinpool-snapshotter"));
    // thinctl (the root package's binary) is built into the same directory by
    // `cargo test` at the workspace root, which tools/test.sh runs first.
    let thinctl = snapshotter.with_file_name("thinctl");
    assert!(
        thinctl.is_file(),
        "{} is not built: run `cargo build --bin thinctl` (tools/test.sh builds it before the snapshotter's tests)",
        thinctl.display()
    );
    let mut programs = Vec::new();
    for (cmd, package) in [
        ("containerd", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
    ] {
        programs.push(which(cmd, package));
    }
    let strip_dir = dir.join("stripped");
    programs.push(stripped(&strip_dir, &snapshotter));
    programs.push(stripped(&strip_dir, &thinctl));
    let names: Vec<String> =
        programs.iter().map(|p| format!("sbin/{}", p.file_name().expect("name").to_string_lossy())).collect();
    let image = dir.join("image.tar");
    busybox_image(&image);
    guest::payload_disk(
        dir,
        &programs.iter().zip(&names).map(|(p, n)| (p.as_path(), n.as_str())).collect::<Vec<_>>(),
        &[(&image, "img/image.tar")],
    )
}

/// The number after `tag` on its line of the guest's output.
fn figure(out: &str, tag: &str) -> u64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(tag).map(|s| s.trim().to_string()))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no \"{tag} N\" line in the guest's output"))
}

/// The rest of the line after `tag`.
fn line_after<'a>(out: &'a str, tag: &str) -> &'a str {
    out.lines().find_map(|l| l.trim().strip_prefix(tag)).map(str::trim).unwrap_or_else(|| panic!("no \"{tag}\" line"))
}

const SCRIPT: &str = r#"
cd / && cpio -idm < /dev/vda 2>/dev/null
export PATH=/sbin:/bin
mkdir -p /sys/fs/cgroup /run /tmp/c && mount -t cgroup2 none /sys/fs/cgroup
# The pool's parent belongs to the ordinary user the snapshotter becomes.
mkdir -p /tmp/u && chown 65534:65534 /tmp/u
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
used() { thinctl status --json /tmp/u/pool | sed -n 's/.*"data_used_blocks": *\([0-9]*\).*/\1/p'; }
attached() { for d in /sys/block/nbd*; do [ -e $d/pid ] && printf '%s ' ${d##*/}; done; true; }
start_snap() {
  : > /tmp/snap.out
  thinpool-snapshotter /tmp/u/pool --socket /tmp/u/tp.sock --attach nbd --size 2G --data-size 1G --json "$@" > /tmp/snap.out 2>>/tmp/snap.log &
  SPID=$!
  i=0; while [ ! -s /tmp/snap.out ]; do i=$((i+1)); [ $i -lt 300 ] || { cat /tmp/snap.log; exit 1; }; sleep 0.2; done
}
retry() { i=0; until "$@"; do i=$((i+1)); [ $i -lt 40 ] || return 1; sleep 0.5; done; }
cat > /tmp/c/config.toml <<EOC
version = 2
root = "/tmp/c/root"
state = "/tmp/c/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "/tmp/c/c.sock"
[ttrpc]
  address = "/tmp/c/c.sock.ttrpc"
[proxy_plugins]
  [proxy_plugins.thinpool]
    type = "snapshot"
    address = "/tmp/u/tp.sock"
EOC
C="ctr --address /tmp/c/c.sock"
S="$C snapshots --snapshotter thinpool"
# Until containerd's garbage collection has removed every snapshot from the pool
# (the base file system stays).
wait_clean() {
  i=0
  while [ "$($S ls | wc -l)" -gt 1 ] || [ "$(thinctl ls /tmp/u/pool | grep -c '^ctr-[0-9]')" -gt 0 ]; do
    i=$((i+1)); [ $i -lt 150 ] || { $S ls; thinctl ls /tmp/u/pool; cat /tmp/snap.log; exit 1; }; sleep 0.2
  done
}
fail() { echo "FAILED: $*"; tail -20 /tmp/c/log; cat /tmp/snap.log; exit 1; }

uid_of() { sed -n 's/^Uid:[[:space:]]*\([0-9]*\).*/\1/p' /proc/$1/status; }
helpers() { for p in /proc/[0-9]*; do grep -q __attach-helper $p/cmdline 2>/dev/null && printf '%s ' "$(uid_of ${p#/proc/})"; done; true; }

say "== the snapshotter (--attach nbd --user 65534) and containerd in the guest"
start_snap --user 65534
echo "snapshotter-uid: $(uid_of $SPID)"
echo "helper-uids: [$(helpers)]"
echo "pool-owner: $(stat -c %u /tmp/u/pool/metadata) $(stat -c %u /tmp/u/tp.sock)"
containerd --config /tmp/c/config.toml > /tmp/c/log 2>&1 &
i=0; while ! $C version >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 300 ] || fail containerd; sleep 0.5; done
$S prepare warm
$S rm warm
wait_clean
echo "baseline-used $(used)"

say "== ctr images import into the pool"
$C images import --snapshotter thinpool /img/image.tar || fail import
echo "attached-after-import: [$(attached)]"
say "== ctr run: a container writes a file"
$C run --snapshotter thinpool --no-pivot IMAGE c1 sh -c 'echo written-by-c1 > /layer-file; echo c1-ran' || fail run c1
echo "attached-while-c1-exists: [$(attached)]"
# ctr 1.6 cannot commit a container into an image; the container's rootfs is the
# active snapshot keyed by its id, which `ctr snapshots commit` freezes as a layer.
$S commit layer2 c1 || fail commit
echo "attached-after-commit: [$(attached)]"
$C containers rm c1
say "== a second container on a snapshot of the new layer"
$S prepare c2 layer2
mkdir -p /tmp/r2
M=$($S mounts /tmp/r2 c2)
echo "c2-mount: $M"
eval "$M"
$C run --rootfs --no-pivot /tmp/r2 c2 /bin/cat /layer-file || fail run c2
echo "peak-used $(used)"
$S usage layer2
$C containers rm c2
umount /tmp/r2
say "== remove everything"
$S rm c2
$S rm layer2
$C images rm --sync IMAGE
wait_clean
echo "attached-after-remove: [$(attached)]"
echo "after-containers-used $(used)"

say "== a mounted snapshot: Commit refused, Remove detaches lazily"
$S prepare b1
mkdir -p /tmp/b
eval "$($S mounts /tmp/b b1)"
echo data > /tmp/b/f; sync
echo "b1-device: [$(attached)]"
if $S commit bc b1 2>/tmp/err; then echo "COMMITTED-WHILE-MOUNTED"; fi
echo "commit-while-mounted: $(cat /tmp/err)"
$S rm b1
wait_clean
grep -c "disconnected lazily" /tmp/snap.log | sed 's/^/lazy-warnings /'
echo "attached-while-still-mounted: [$(attached)]"
umount /tmp/b 2>/dev/null || umount -l /tmp/b
sleep 1
echo "attached-after-umount: [$(attached)]"

say "== kill -9 with a device attached"
$S prepare k1
mkdir -p /tmp/k
eval "$($S mounts /tmp/k k1)"
echo before-the-kill > /tmp/k/f
umount /tmp/k
K=$(attached)
echo "k1-device: [$K] pid $(cat /sys/block/${K% }/pid)"
kill -9 $SPID; wait $SPID || true
# The helper sees its pipe close and exits (bounded wait: TCG is slow).
i=0; while [ -n "$(helpers)" ] && [ $i -lt 50 ]; do i=$((i+1)); sleep 0.2; done
echo "attached-after-kill: [$(attached)]"
echo "helpers-after-kill: [$(helpers)]"
# Restarted as root this time (no --user): nbd-client runs in the process itself.
start_snap
echo "attached-after-restart: [$(attached)]"
grep "left attached" /tmp/snap.log || true
retry $S mounts /tmp/k k1 > /tmp/k.mount
eval "$(cat /tmp/k.mount)"
echo "k1-file: $(cat /tmp/k/f)"
umount /tmp/k
$S rm k1
wait_clean
echo "final-attached: [$(attached)]"
echo "final-used $(used)"
kill -TERM $SPID; wait $SPID && echo "snapshotter exit 0"
thinctl check /tmp/u/pool && echo "pool checks clean"
say "== snapshotter log"
cat /tmp/snap.log
echo GUEST-OK
"#;

#[test]
fn containers_run_on_thin_snapshots_the_snapshotter_attaches_itself() {
    need("runc", "runc");
    let tmp = tempfile::tempdir().expect("tmp");
    let disk = payload_disk(tmp.path());
    let out = run_guest(&SCRIPT.replace("IMAGE", IMAGE), &[&disk], &[("VM_MEM", "1024")]);
    assert!(out.contains("GUEST-OK"), "the guest script finished");

    // Privilege separation: the snapshotter runs as the ordinary user, its helper as root.
    assert_eq!(line_after(&out, "snapshotter-uid:"), "65534");
    assert_eq!(line_after(&out, "helper-uids:"), "[0 ]", "one helper, root");
    assert_eq!(line_after(&out, "pool-owner:"), "65534 65534", "the pool and the socket are the user's");
    assert_eq!(line_after(&out, "helpers-after-kill:"), "[]", "the helper ends with the snapshotter");

    // 1. Containers: import, run, commit, a second container reads the layer's file.
    assert!(out.contains("c1-ran"), "the first container ran");
    assert_eq!(line_after(&out, "attached-after-import:"), "[]", "unpacking commits, which detaches");
    assert_ne!(line_after(&out, "attached-while-c1-exists:"), "[]", "c1's snapshot was attached by the snapshotter");
    assert_eq!(line_after(&out, "attached-after-commit:"), "[]", "commit detaches");
    let m = line_after(&out, "c2-mount:");
    assert!(m.starts_with("mount -t ext4 /dev/nbd") && m.ends_with("-o rw,noinit_itable"), "{m}");
    assert!(out.lines().any(|l| l.trim() == "written-by-c1"), "the second container read the first one's file");
    let (baseline, peak) = (figure(&out, "baseline-used"), figure(&out, "peak-used"));
    assert!(baseline > 0, "the base file system holds data");
    assert!(peak > baseline, "the image and the layer hold data: {peak} vs {baseline}");
    assert_eq!(figure(&out, "after-containers-used"), baseline, "every block of the layers and containers is free");
    assert_eq!(line_after(&out, "attached-after-remove:"), "[]");

    // 2. A mounted snapshot.
    assert!(!out.contains("COMMITTED-WHILE-MOUNTED"));
    let refused = line_after(&out, "commit-while-mounted:");
    assert!(refused.contains("still open, mounted somewhere: unmount it first"), "{refused}");
    assert_eq!(figure(&out, "lazy-warnings"), 1, "Remove of a mounted snapshot says it detached lazily");
    let b1 = line_after(&out, "b1-device:").to_string();
    assert_ne!(b1, "[]");
    assert_eq!(line_after(&out, "attached-while-still-mounted:"), b1, "the kernel keeps the node while it is open");
    assert_eq!(line_after(&out, "attached-after-umount:"), "[]", "and frees it when unmounted");

    // 3. kill -9 and restart.
    let k1 = line_after(&out, "k1-device:");
    let k1 = &k1[..k1.find(']').expect("]") + 1];
    assert_ne!(k1, "[]");
    assert_eq!(line_after(&out, "attached-after-kill:"), k1, "the dead server's device stays connected");
    assert_eq!(line_after(&out, "attached-after-restart:"), "[]", "the restarted snapshotter disconnected it");
    let dev = k1.trim_matches(['[', ']', ' ']);
    assert!(out.contains(&format!("disconnected /dev/{dev}, which a snapshotter that died left attached")), "{out}");
    assert_eq!(line_after(&out, "k1-file:"), "before-the-kill", "attached afresh, the data is intact");
    assert_eq!(line_after(&out, "final-attached:"), "[]");
    assert_eq!(figure(&out, "final-used"), baseline);
    assert!(out.contains("snapshotter exit 0"));
    assert!(out.contains("pool checks clean"));
}
