#!/usr/bin/env bash
# NBD benchmark: the same fio jobs against `thinctl serve`, `qemu-nbd` serving a
# qcow2 image with 64 KiB clusters, and `nbdkit file` on a raw file, in one run.
# Prints IOPS and MB/s per job and the ratio of thinpool to each peer.
#
#   tools/bench-nbd.sh            # RUNTIME=10 seconds per job, SIZE=2G exports
#   RUNTIME=30 SIZE=4G tools/bench-nbd.sh
#
# Method: each server listens on 127.0.0.1; fio uses its nbd engine (libnbd).
# Jobs: 4 KiB random write to never-written blocks (a fresh export for each depth),
# 4 KiB random overwrite and 4 KiB random read of a 256 MiB region written first,
# 1 MiB sequential write and read; each at queue depth 1 and 32. Figures depend on
# the machine; they belong in notes, never in assertions.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-2G}
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v fio >/dev/null || missing+=(fio)
command -v qemu-nbd >/dev/null || missing+=(qemu-utils)
command -v nbdkit >/dev/null || missing+=(nbdkit)
command -v nbdinfo >/dev/null || missing+=(libnbd-bin)
if [ "${#missing[@]}" -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release --bin thinctl -q
THINCTL=$PWD/target/release/thinctl
WORK=$(mktemp -d /var/tmp/thinpool-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

wait_port() { for _ in $(seq 100); do nbdinfo "nbd://127.0.0.1:$1/$2" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "server on port $1 did not come up" >&2; exit 1; }

start_thinpool() { # port
  "$THINCTL" pool create "$WORK/pool-$1" --data-size 64G >/dev/null
  "$THINCTL" create "$WORK/pool-$1" bench --size "$SIZE" >/dev/null
  "$THINCTL" serve "$WORK/pool-$1" --listen "127.0.0.1:$1" >"$WORK/serve-$1.log" 2>&1 &
  PIDS+=($!); wait_port "$1" bench
}
start_qemu() { # port
  qemu-img create -q -f qcow2 -o cluster_size=65536 "$WORK/q-$1.qcow2" "$SIZE"
  qemu-nbd -f qcow2 -x bench -b 127.0.0.1 -p "$1" --persistent --shared=8 --discard=unmap "$WORK/q-$1.qcow2" &
  PIDS+=($!); wait_port "$1" bench
}
start_nbdkit() { # port
  truncate -s "$SIZE" "$WORK/k-$1.raw"
  nbdkit -f -i 127.0.0.1 -p "$1" -e bench file "$WORK/k-$1.raw" &
  PIDS+=($!); wait_port "$1" bench
}

# fio JOB_NAME PORT RW BS DEPTH [extra...] -> prints "iops bw_bytes"
run_fio() {
  local name=$1 port=$2 rw=$3 bs=$4 depth=$5; shift 5
  fio --name="$name" --ioengine=nbd --uri="nbd://127.0.0.1:$port/bench" --rw="$rw" --bs="$bs" \
      --iodepth="$depth" --time_based --runtime="$RUNTIME" --output-format=json "$@" >"$WORK/$name-$port.json" 2>/dev/null
  python3 - "$WORK/$name-$port.json" "$rw" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # fio's nbd engine prints a line first
side = "read" if "read" in sys.argv[2] else "write"
print(j[side]["iops"], j[side]["bw_bytes"])
PY
}

declare -A RESULT
port=11000
for server in thinpool qemu nbdkit; do
  for depth in 1 32; do
    # Fresh export: writes land on never-written blocks.
    port=$((port + 1)); "start_$server" $port
    RESULT[$server,randwrite-new,$depth]=$(run_fio randwrite-new $port randwrite 4k "$depth" --size="$SIZE" --norandommap --randrepeat=0)
    # Prefill 256 MiB, then overwrite and read it.
    fio --name=prefill --ioengine=nbd --uri="nbd://127.0.0.1:$port/bench" --rw=write --bs=1m --size=256m --iodepth=8 >/dev/null 2>&1
    RESULT[$server,randwrite-over,$depth]=$(run_fio randwrite-over $port randwrite 4k "$depth" --size=256m)
    RESULT[$server,randread,$depth]=$(run_fio randread $port randread 4k "$depth" --size=256m)
    RESULT[$server,seqwrite-1m,$depth]=$(run_fio seqwrite $port write 1m "$depth" --size=1g)
    RESULT[$server,seqread-1m,$depth]=$(run_fio seqread $port read 1m "$depth" --size=1g)
    kill "${PIDS[-1]}" 2>/dev/null || true; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'
  done
done

printf '\nfio over NBD, %ss per job, export size %s (%s)\n' "$RUNTIME" "$SIZE" "$(nproc) cores"
printf '%-16s %3s | %10s %8s | %10s %8s | %10s %8s | %7s %7s\n' job QD "thinpool" "MB/s" "qemu-nbd" "MB/s" "nbdkit" "MB/s" "/qemu" "/nbdkit"
for job in randwrite-new randwrite-over randread seqwrite-1m seqread-1m; do
  for depth in 1 32; do
    read -r ti tb <<<"${RESULT[thinpool,$job,$depth]}"
    read -r qi qb <<<"${RESULT[qemu,$job,$depth]}"
    read -r ki kb <<<"${RESULT[nbdkit,$job,$depth]}"
    python3 -c "
ti,tb,qi,qb,ki,kb=map(float,'$ti $tb $qi $qb $ki $kb'.split())
r=lambda a,b: f'{a/b:7.2f}' if b else '    n/a'
print(f'%-16s %3s | {ti:10.0f} {tb/1e6:8.1f} | {qi:10.0f} {qb/1e6:8.1f} | {ki:10.0f} {kb/1e6:8.1f} | {r(ti,qi)} {r(ti,ki)}' % ('$job', '$depth'))"
  done
done
