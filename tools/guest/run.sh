#!/usr/bin/env bash
# Boot the test guest (qemu, TCG) with DISK images as /dev/vda, /dev/vdb, ... and run
# GUEST_SCRIPT in it as root (busybox sh -e). The guest reaches the host's loopback at
# 10.0.2.2. Streams the console; exits with the guest script's status.
#
#   tools/guest/run.sh GUEST_SCRIPT [DISK ...]      VM_TIMEOUT (default 600 s), VM_MEM (MiB, default 512)
# GUEST_KERNEL=6.12 boots the 6.12 guest (with ublk), see build.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
script=$1; shift
cache=$("$HERE/build.sh" | tail -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/extra"
cp "$script" "$work/extra/test.sh"
(cd "$work/extra" && echo test.sh | cpio -o -H newc --quiet | gzip -1) > "$work/extra.cpio.gz"
cat "$cache/initramfs.cpio.gz" "$work/extra.cpio.gz" > "$work/initrd.gz"
drives=()
for d in "$@"; do drives+=(-drive "file=$d,format=raw,if=virtio,cache=unsafe"); done
log="$work/console.log"
set +e
timeout "${VM_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg -m "${VM_MEM:-512}" -smp 1 -nographic -no-reboot \
  -kernel "$cache/vmlinuz" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 "${drives[@]}" </dev/null | tee "$log"
qrc=${PIPESTATUS[0]}
set -e
rc=$(sed -n 's/.*== guest script rc=\([0-9]*\).*/\1/p' "$log" | tail -1)
if [ -z "$rc" ]; then
  echo "guest did not finish (qemu exit $qrc; timeout is ${VM_TIMEOUT:-600} s)" >&2
  exit 1
fi
exit "$rc"
