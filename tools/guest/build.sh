#!/usr/bin/env bash
# Build a small Linux guest for the kernel tests: Debian's cloud kernel and an
# initramfs with busybox, nbd-client, mkfs.ext4, e2fsck, dmsetup and fsfreeze, and
# the modules virtio, nbd and dm-thin-pool need. Installs the host packages it uses
# when missing. Idempotent: reuses the cache when the kernel and this script are
# unchanged.
#
#   tools/guest/build.sh [CACHE_DIR]     (default $THINPOOL_VM_CACHE or /var/tmp/thinpool-vm)
# Prints the cache dir, which holds vmlinuz and initramfs.cpio.gz.
#
# GUEST_KERNEL picks the kernel: 6.1 (default: Debian 12's linux-image-cloud-amd64)
# or 6.12 (linux-image-6.12-cloud-amd64 from bookworm-security, which has ublk:
# ublk_drv is loaded as a module, io_uring is built in). The 6.12 guest has its own
# cache dir, the default one with "-6.12" appended.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
GUEST_KERNEL=${GUEST_KERNEL:-6.1}
case "$GUEST_KERNEL" in
  6.1) kmeta=linux-image-cloud-amd64; suffix=""; extra_mods="" ;;
  6.12) kmeta=linux-image-6.12-cloud-amd64; suffix="-6.12"; extra_mods="block/ublk_drv" ;;
  *) echo "GUEST_KERNEL=$GUEST_KERNEL: use 6.1 (the default) or 6.12" >&2; exit 2 ;;
esac
CACHE=${1:-${THINPOOL_VM_CACHE:-/var/tmp/thinpool-vm}$suffix}
mkdir -p "$CACHE"
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx nc || need+=(busybox-static)
command -v nbd-client >/dev/null || [ -x /usr/sbin/nbd-client ] || need+=(nbd-client)
command -v mkfs.ext4 >/dev/null || [ -x /usr/sbin/mkfs.ext4 ] || need+=(e2fsprogs)
command -v dmsetup >/dev/null || [ -x /usr/sbin/dmsetup ] || need+=(dmsetup)
command -v fsfreeze >/dev/null || [ -x /usr/sbin/fsfreeze ] || need+=(util-linux)
command -v cpio >/dev/null || need+=(cpio)
if [ "${#need[@]}" -gt 0 ]; then
  echo "== installing ${need[*]}" >&2
  as_root apt-get update -qq
  pkgs=("${need[@]}")
  # Debian's qemu-system-x86 needs the matching (older) qemu-utils: install both.
  if printf '%s\n' "${need[@]}" | grep -qx qemu-system-x86; then
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
    pkgs+=("qemu-utils=$v")
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "${pkgs[@]}" >&2
fi
[ -x /bin/busybox ] || { echo "busybox-static is missing (/bin/busybox)" >&2; exit 1; }

# The versioned kernel package behind $kmeta.
kpkg=$(apt-cache depends "$kmeta" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$kpkg" ]; then
  as_root apt-get update -qq
  kpkg=$(apt-cache depends "$kmeta" | awk '/Depends: linux-image-/{print $2; exit}')
fi
[ -n "$kpkg" ] || { echo "cannot find the kernel package behind $kmeta (6.12 needs bookworm-security in the apt sources)" >&2; exit 1; }
stamp="$kpkg $(sha256sum "$0" | cut -c1-16)"
if [ -f "$CACHE/stamp" ] && [ "$(cat "$CACHE/stamp")" = "$stamp" ] && [ -f "$CACHE/vmlinuz" ] && [ -f "$CACHE/initramfs.cpio.gz" ]; then
  echo "$CACHE"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "$kpkg" >/dev/null 2>&1) || { echo "apt-get download $kpkg failed" >&2; exit 1; }
dpkg -x "$work"/*.deb "$work/k"
kver=${kpkg#linux-image-}
cp "$work/k/boot/vmlinuz-$kver" "$CACHE/vmlinuz.new"
moddir="$work/k/lib/modules/$kver/kernel"

root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,mnt,lib/modules,run}
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"; done
copy_bin() { # copy a dynamically linked program and the libraries ldd lists
  local p; p=$(command -v "$1" || echo "/usr/sbin/$1"); [ -x "$p" ] || p="/sbin/$1"
  [ -x "$p" ] || { echo "missing program $1" >&2; exit 1; }
  cp "$p" "$root/sbin/$1"; rm -f "$root/bin/$1"
  ldd "$p" | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
  done
}
for p in nbd-client mkfs.ext4 e2fsck dmsetup fsfreeze; do copy_bin "$p"; done
mods="virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev virtio/virtio_pci"
mods="$mods ../net/core/failover net/net_failover net/virtio_net block/nbd block/virtio_blk ../lib/libcrc32c"
mods="$mods md/dm-mod md/dm-bufio md/dm-bio-prison md/persistent-data/dm-persistent-data md/dm-thin-pool"
mods="$mods $extra_mods"
: > "$root/lib/modules/order"
for m in $mods; do
  f="$moddir/drivers/$m.ko"; [ -f "$f" ] || f="$moddir/drivers/$m.ko.xz"
  # Newer kernels build some of them in (6.12: the virtio core).
  [ -f "$f" ] || ! grep -qx "kernel/drivers/$m.ko" "$work/k/lib/modules/$kver/modules.builtin" 2>/dev/null || continue
  [ -f "$f" ] || { echo "module $m not found in $kpkg" >&2; exit 1; }
  case "$f" in *.xz) xz -dc "$f" > "$root/lib/modules/$(basename "${f%.xz}")";; *) cp "$f" "$root/lib/modules/";; esac
  echo "$(basename "${f%.xz}")" >> "$root/lib/modules/order"
done
cp "$HERE/init" "$root/init"; chmod +x "$root/init"
# Replaced by renames, so a guest booting from this cache meanwhile reads whole files.
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$CACHE/initramfs.cpio.gz.new"
mv "$CACHE/vmlinuz.new" "$CACHE/vmlinuz"
mv "$CACHE/initramfs.cpio.gz.new" "$CACHE/initramfs.cpio.gz"
echo "$stamp" > "$CACHE/stamp"
echo "$CACHE"
