#!/usr/bin/env bash
# containerd snapshotter benchmark, the issue's seed workload: through containerd and
# `ctr` as a user would, an image layer of IMAGE_MB written and committed, then N
# containers prepared from it, WRITE_MB written into each, all removed; time per
# operation and space in use after each phase. The same on containerd's overlayfs
# snapshotter on the same machine. Needs root (containerd; overlay mounts).
#
#   tools/bench-snapshotter.sh                # N=200, IMAGE_MB=300, WRITE_MB=1, SIZE=1T
#   N=50 IMAGE_MB=100 tools/bench-snapshotter.sh
#   SNAPSHOTTER=/path/to/thinpool-snapshotter tools/bench-snapshotter.sh   # not rebuilt
#
# How data is written: overlayfs snapshots are mounted (the mount `ctr snapshots
# mounts` prints) and a file is written and fsynced in each. The thinpool snapshotter
# runs with --attach none here (the host may have no `nbd` module), so its mounts name
# the NBD export; the same bytes are written to the device at block level over NBD with
# qemu-io (at 1 GiB into the device, past the base file system's first block groups),
# flushed. A kernel ext4 mount would add the file system's own metadata writes on both.
# Each `ctr` call is a process start plus two gRPC hops (ctr -> containerd ->
# snapshotter); the overlayfs loop pays the same. Space: the pool's data blocks in use
# (thinpool), `du` of the snapshotter's directory (overlayfs). Figures depend on the
# machine; they belong in notes, never in assertions.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
SIZE=${SIZE:-1T}
IMAGE_MB=${IMAGE_MB:-300}
WRITE_MB=${WRITE_MB:-1}
command -v containerd >/dev/null || { echo "containerd is missing: apt-get install containerd" >&2; exit 1; }
command -v qemu-io >/dev/null || { echo "qemu-io is missing: apt-get install qemu-utils" >&2; exit 1; }
command -v bc >/dev/null || { echo "bc is missing: apt-get install bc" >&2; exit 1; }
if [ -z "${SNAPSHOTTER:-}" ]; then
  cargo build --release -p thinpool-snapshotter -q
  SNAPSHOTTER=${CARGO_TARGET_DIR:-$PWD/target}/release/thinpool-snapshotter

fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$SNAPSHOTTER" "$work/pool" --socket "$work/snap.sock" --attach none --size "$SIZE" --data-size 16G \
  >"$work/snap.out" 2>"$work/snap.err" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/snap.sock" ] && break; sleep 0.1; done
cat >"$work/config.toml" <<CONF
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[ttrpc]
  address = "$work/containerd.sock.ttrpc"
[proxy_plugins]
  [proxy_plugins.thinpool]
    type = "snapshot"
    address = "$work/snap.sock"
CONF
containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do ctr --address "$work/containerd.sock" version >/dev/null 2>&1 && break; sleep 0.1; done
now() { date +%s.%N; }
used() { python3 - "$work/pool" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1] + "/control.sock")
s.sendall(b'{"version":1,"request":{"op":"status"}}\n')
buf = b""
while not buf.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk: break
    buf += chunk
st = json.loads(buf)["response"]["status"]
print(st["data_used_blocks"] * st["data_block_size_bytes"] // 1024, "KiB")
PY
}
ms_each() { echo "($2 - $1) / $3 * 1000" | bc -l | cut -c1-7; }
# Write MB MiB into snapshot KEY of snapshotter NAME: NAME KEY MB
write_into() {
  local c="ctr --address $work/containerd.sock snapshots --snapshotter $1" m
  if [ "$1" = thinpool ]; then
    local src; src=$($c mounts /mnt "$2" | grep -o 'nbd://[^ ]*')
    qemu-io -f raw -c "write -P 0x5a 1G ${3}M" -c flush "$src" >/dev/null
  else
    m="$work/mnt/$2"; mkdir -p "$m"
    eval "$($c mounts "$m" "$2")"
    dd if=/dev/zero of="$m/data" bs=1M count="$3" conv=fsync status=none
    umount "$m"
  fi
}
space() { # NAME
  if [ "$1" = thinpool ]; then used; else du -sk "$work/root/io.containerd.snapshotter.v1.overlayfs" | awk '{print $1, "KiB"}'; fi
}
run() { # SNAPSHOTTER-NAME
  local c="ctr --address $work/containerd.sock snapshots --snapshotter $1" t0 t1 t2 t3
  echo "== $1"
  t0=$(now); $c prepare base-a >/dev/null; t1=$(now)
  echo "$1: first prepare $(echo "$t1 - $t0" | bc) s"
  t0=$(now); write_into "$1" base-a "$IMAGE_MB"; t1=$(now)
  echo "$1: image layer of $IMAGE_MB MiB written in $(echo "$t1 - $t0" | bc) s"
  $c commit base base-a
  echo "$1: space with the image layer: $(space "$1")"
  t2=$(now)
  for i in $(seq "$N"); do $c prepare "c$i" base >/dev/null; done
  t3=$(now)
  echo "$1: $N prepares from the image: $(ms_each "$t2" "$t3" "$N") ms each"
  echo "$1: space with $N containers: $(space "$1")"
  t2=$(now)
  for i in $(seq "$N"); do write_into "$1" "c$i" "$WRITE_MB"; done
  t3=$(now)
  echo "$1: $WRITE_MB MiB written into each: $(ms_each "$t2" "$t3" "$N") ms each (mounts/attach included)"
  echo "$1: space after the writes: $(space "$1")"
  t2=$(now)
  for i in $(seq "$N"); do $c rm "c$i"; done
  t3=$(now)
  echo "$1: $N removes: $(ms_each "$t2" "$t3" "$N") ms each"
  $c rm base
  sleep 2   # containerd removes backend snapshots in its garbage collection
  echo "$1: space after removing everything: $(space "$1")$([ "$1" = thinpool ] && echo " (the formatted base stays, for the next image)")"
}
run thinpool
grep -h "formatted the base" "$work/snap.err" || true
run overlayfs
