#!/usr/bin/env bash
# containerd snapshotter benchmark: time of the first Prepare (formats the base ext4
# once), of N Prepares from a committed parent, of N Removes, through containerd and
# `ctr` as a user would, with the pool's data use before and after; the same Prepare /
# Remove loop on containerd's overlayfs snapshotter for comparison (snapshots only,
# nothing mounted). Needs root for containerd.
#
#   tools/bench-snapshotter.sh                # N=50, SIZE=1T
#   N=200 SIZE=100G tools/bench-snapshotter.sh
#   SNAPSHOTTER=/path/to/thinpool-snapshotter tools/bench-snapshotter.sh   # not rebuilt
#
# Each `ctr` call is a process start plus two gRPC hops (ctr -> containerd ->
# snapshotter), so the per-operation times include that; the overlayfs loop pays the
# same. Figures depend on the machine; they belong in notes, never in assertions.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-50}
SIZE=${SIZE:-1T}
command -v containerd >/dev/null || { echo "containerd is missing: apt-get install containerd" >&2; exit 1; }
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
run() { # SNAPSHOTTER-NAME
  local c="ctr --address $work/containerd.sock snapshots --snapshotter $1" t0 t1 t2 t3
  t0=$(now); $c prepare base-a >/dev/null; t1=$(now)
  $c commit base base-a
  echo "$1: first prepare $(echo "$t1 - $t0" | bc) s"
  [ "$1" = thinpool ] && echo "$1: pool data in use with the base layer: $(used)"
  t2=$(now)
  for i in $(seq "$N"); do $c prepare "c$i" base >/dev/null; done
  t3=$(now)
  echo "$1: $N prepares from a committed parent: $(echo "($t3 - $t2) / $N * 1000" | bc -l | cut -c1-6) ms each"
  [ "$1" = thinpool ] && echo "$1: pool data in use with $N snapshots: $(used)"
  t2=$(now)
  for i in $(seq "$N"); do $c rm "c$i"; done
  $c rm base
  t3=$(now)
  echo "$1: $N removes: $(echo "($t3 - $t2) / $N * 1000" | bc -l | cut -c1-6) ms each"
}
run thinpool
grep -h "formatted the base" "$work/snap.err" || true
sleep 2   # containerd removes backend snapshots in its garbage collection
echo "thinpool: pool data in use after removing everything: $(used) (the base stays)"
run overlayfs

