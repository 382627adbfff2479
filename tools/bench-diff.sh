#!/usr/bin/env bash
# Changed-blocks benchmark: `thinctl diff` against Debian's `thin_delta` on the same
# metadata. Prints the median time and the peak RSS of each, and the ratios.
#
#   tools/bench-diff.sh                          # 10^6 mapped blocks, 1,000 changed, ROUNDS=5
#   BLOCKS=200000 CHANGED=100 ROUNDS=3 tools/bench-diff.sh
#   THINCTL=/tmp/thinctl-old tools/bench-diff.sh # an earlier build, not rebuilt
#
# Method: `thinctl restore` builds a pool whose device thin0 maps BLOCKS blocks of
# 64 KiB (one range in thin_dump XML: the data file is sparse, nothing is written).
# `thinctl serve` serves it; `thinctl snapshot` takes snap1 (through the control
# socket), qemu-io writes 4 KiB into CHANGED blocks spread evenly over the device
# (each write copies its block: a new mapping), and snap2 is taken; the server
# stops (SIGTERM: commit, exit). Then, interleaved for ROUNDS rounds, on the same
# metadata file: `thinctl diff POOL snap1 snap2` and `thin_delta --snap1 1 --snap2 2
# METADATA` (thin_delta reads the committed superblock; no metadata snapshot is
# needed for a pool nothing else changes), each timed (wall clock) with its peak RSS
# (the child's own rusage, from wait4); the medians are reported. Both tools' outputs are checked to
# name the same changed runs first. Page cache stays warm (one untimed run each).
# Figures depend on the machine; they belong in notes, never in assertions.
set -euo pipefail
cd "$(dirname "$0")/.."
BLOCKS=${BLOCKS:-1000000}
CHANGED=${CHANGED:-1000}
ROUNDS=${ROUNDS:-5}
for t in thin_delta:thin-provisioning-tools qemu-io:qemu-utils python3:python3; do
  command -v "${t%%:*}" >/dev/null || { echo "${t%%:*} is missing: apt-get install ${t#*:}" >&2; exit 1; }
done
if [ -z "${THINCTL:-}" ]; then
  cargo build --release --bin thinctl -q
  THINCTL=${CARGO_TARGET_DIR:-$PWD/target}/release/thinctl
fi
WORK=$(mktemp -d /var/tmp/thinpool-bench-diff.XXXXXX)
SERVER=
cleanup() {
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
  [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

# The pool: thin0 maps BLOCKS blocks (data blocks 0..BLOCKS-1).
NR_DATA=$((BLOCKS + 2 * CHANGED + 1024))
cat > "$WORK/pool.xml" <<EOF
<superblock uuid="" time="0" transaction="1" version="2" data_block_size="128" nr_data_blocks="$NR_DATA">
  <device dev_id="0" mapped_blocks="$BLOCKS" transaction="0" creation_time="0" snap_time="0">
    <range_mapping origin_begin="0" data_begin="0" length="$BLOCKS" time="0"/>
  </device>
</superblock>
EOF
"$THINCTL" restore "$WORK/p" -i "$WORK/pool.xml" >/dev/null

# Serve it, snapshot, change CHANGED blocks, snapshot again.
"$THINCTL" serve "$WORK/p" --listen 127.0.0.1:0 > "$WORK/serve.out" 2>"$WORK/serve.err" &
SERVER=$!
for _ in $(seq 100); do grep -q 'nbd://' "$WORK/serve.out" 2>/dev/null && break; sleep 0.1; done
ADDR=$(sed -n 's|.*nbd://\([^/]*\)/.*|\1|p' "$WORK/serve.out" | head -1)
[ -n "$ADDR" ] || { echo "thinctl serve did not start:" >&2; cat "$WORK/serve.err" >&2; exit 1; }
"$THINCTL" snapshot "$WORK/p" thin0 snap1 >/dev/null
python3 - "$BLOCKS" "$CHANGED" > "$WORK/writes" <<'PY'
import sys
blocks, changed = int(sys.argv[1]), int(sys.argv[2])
step = blocks // changed
for i in range(changed):
    print(f"write -P {i % 255 + 1} {(i * step + step // 2) * 65536} 4k")
PY
mapfile -t CMDS < "$WORK/writes"
ARGS=()
for c in "${CMDS[@]}"; do ARGS+=(-c "$c"); done
qemu-io -f raw "${ARGS[@]}" -c flush "nbd://$ADDR/thin0" >/dev/null
"$THINCTL" snapshot "$WORK/p" thin0 snap2 >/dev/null
kill -TERM "$SERVER"; wait "$SERVER" || true; SERVER=

META="$WORK/p/metadata"
echo "pool: $BLOCKS mapped blocks of 64 KiB, snap1 and snap2 differ in $CHANGED; metadata $(du -h --apparent-size "$META" | cut -f1); $(nproc) cores"

# Both name the same changed runs (thin_delta also prints same runs).
"$THINCTL" diff "$WORK/p" snap1 snap2 --json |
  python3 -c '
import json, sys
for r in json.load(sys.stdin)["runs"]:
    print(r["kind"], r["begin_block"], r["length_blocks"])' > "$WORK/ours"
thin_delta --snap1 1 --snap2 2 "$META" |
  sed -n 's#.*<\(different\|left_only\|right_only\) begin="\([0-9]*\)" length="\([0-9]*\)".*#\1 \2 \3#p' > "$WORK/theirs"
cmp -s "$WORK/ours" "$WORK/theirs" || { echo "thinctl diff and thin_delta disagree:" >&2; diff "$WORK/ours" "$WORK/theirs" | head >&2; exit 1; }
echo "both report $(wc -l < "$WORK/ours") changed runs ($(awk '{n += $3} END {print n}' "$WORK/ours") blocks)"

measure() { # label command... ; appends "seconds kib" (wall time, the child's peak RSS) to $WORK/label
  local label=$1; shift
  python3 -c '
import os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, ru = os.wait4(p.pid, 0)
if status != 0:
    sys.exit(f"{sys.argv[1:]} failed")
print(f"{time.perf_counter() - t:.4f} {ru.ru_maxrss}")' "$@" >> "$WORK/$label"
}
"$THINCTL" diff "$WORK/p" snap1 snap2 >/dev/null
thin_delta --snap1 1 --snap2 2 "$META" >/dev/null
: > "$WORK/thinctl"; : > "$WORK/thin_delta"
for _ in $(seq "$ROUNDS"); do
  measure thinctl "$THINCTL" diff "$WORK/p" snap1 snap2
  measure thin_delta thin_delta --snap1 1 --snap2 2 "$META"
done
median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
T_OURS=$(cut -d' ' -f1 "$WORK/thinctl" | median)
T_THEIRS=$(cut -d' ' -f1 "$WORK/thin_delta" | median)
M_OURS=$(cut -d' ' -f2 "$WORK/thinctl" | median)
M_THEIRS=$(cut -d' ' -f2 "$WORK/thin_delta" | median)
printf '%-12s %10s %14s\n' tool "time (s)" "peak RSS (KiB)"
printf '%-12s %10s %14s\n' "thinctl diff" "$T_OURS" "$M_OURS" thin_delta "$T_THEIRS" "$M_THEIRS"
python3 - "$T_OURS" "$T_THEIRS" "$M_OURS" "$M_THEIRS" "$ROUNDS" <<'PY'
import sys
t1, t2, m1, m2 = map(float, sys.argv[1:5])
print(f"thin_delta / thinctl diff: {t2 / t1:.1f}x the time, {m2 / m1:.1f}x the peak RSS (medians of {sys.argv[5]} rounds)")
PY
