#!/usr/bin/env bash
# Bulk-path benchmark: `thinctl import` / `thinctl export` against `qemu-img convert`
# on the same sparse raw image. Prints the median time of each and the ratios.
#
#   tools/bench-import.sh                 # ROUNDS=5, a 1 GiB image holding 256 MiB
#   ROUNDS=9 IMAGE_MIB=2048 DATA_MIB=512 tools/bench-import.sh
#   THINCTL=/tmp/thinctl-old tools/bench-import.sh   # an earlier build, not rebuilt
#
# Method: one image of IMAGE_MIB MiB, sparse, holding DATA_MIB MiB of random bytes in
# scattered 1 MiB extents (a fixed seed, so every run builds the same image). Each
# round runs, interleaved: thinctl import into a fresh pool (pool creation is not
# timed), qemu-img convert -O qcow2 of the image, thinctl export to a new file, and
# qemu-img convert -O raw from the qcow2. hyperfine is used when installed; otherwise
# wall-clock times of ROUNDS interleaved rounds, median reported. Page cache stays
# warm (the image is read once before timing). thinctl import ends with a commit,
# which fdatasyncs the data and metadata files (a pool never records a mapping whose
# data is not durable); qemu-img convert does not sync its output, so each round also
# times qemu-img convert followed by `sync FILE` (fsync of the output) for a
# like-for-like ratio. thinctl export, like qemu-img convert, does not sync its output
# unless asked (`--sync`): each round times both, against qemu-img without and with sync.
# BENCH_DIR=/dev/shm runs everything on tmpfs, where syncs cost nothing.
# Figures depend on the machine; they belong in notes, never in assertions.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
IMAGE_MIB=${IMAGE_MIB:-1024}
DATA_MIB=${DATA_MIB:-256}
command -v qemu-img >/dev/null || { echo "qemu-img is missing: apt-get install qemu-utils" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is missing" >&2; exit 1; }
if [ -z "${THINCTL:-}" ]; then   # THINCTL=/path/to/thinctl times another build
  cargo build --release --bin thinctl -q
  THINCTL=${CARGO_TARGET_DIR:-$PWD/target}/release/thinctl
fi
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/thinpool-bench-import.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The image: DATA_MIB random 1 MiB extents scattered over IMAGE_MIB MiB, holes elsewhere.
python3 - "$WORK/img.raw" "$IMAGE_MIB" "$DATA_MIB" <<'PY'
import os, random, sys
path, size_mib, data_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(8)
slots = sorted(rng.sample(range(size_mib), data_mib))
with open(path, "wb") as f:
    f.truncate(size_mib << 20)
    for s in slots:
        f.seek(s << 20)
        f.write(rng.randbytes(1 << 20))
PY
cat "$WORK/img.raw" >/dev/null
echo "image: $(du -h --apparent-size "$WORK/img.raw" | cut -f1) apparent, $(du -h "$WORK/img.raw" | cut -f1) allocated, $(nproc) cores"

fresh_pool() { # dir
  rm -rf "$1"
  "$THINCTL" pool create "$1" --data-size "$((IMAGE_MIB * 2))M" >/dev/null
}
now() { date +%s.%N; }

if command -v hyperfine >/dev/null; then
  fresh_pool "$WORK/pool"
  qemu-img convert -O qcow2 "$WORK/img.raw" "$WORK/img.qcow2"
  "$THINCTL" import "$WORK/pool" img "$WORK/img.raw" --create >/dev/null
  hyperfine --runs "$ROUNDS" \
    --prepare "rm -rf $WORK/p2 && $THINCTL pool create $WORK/p2 --data-size $((IMAGE_MIB * 2))M >/dev/null" \
    -n "thinctl import" "$THINCTL import $WORK/p2 img $WORK/img.raw --create" \
    --prepare "rm -f $WORK/q.qcow2" -n "qemu-img convert -O qcow2" "qemu-img convert -O qcow2 $WORK/img.raw $WORK/q.qcow2" \
    --prepare "rm -f $WORK/out.raw" -n "thinctl export" "$THINCTL export $WORK/pool img $WORK/out.raw" \
    --prepare "rm -f $WORK/out.raw" -n "thinctl export --sync" "$THINCTL export $WORK/pool img $WORK/out.raw --sync" \
    --prepare "rm -f $WORK/out2.raw" -n "qemu-img convert -O raw" "qemu-img convert -O raw $WORK/img.qcow2 $WORK/out2.raw"
  exit 0
fi

declare -a TI QI QIS TE TES QE QES
for r in $(seq "$ROUNDS"); do
  fresh_pool "$WORK/pool"
  rm -f "$WORK/img.qcow2" "$WORK/q2.qcow2" "$WORK/out.raw" "$WORK/out2.raw" "$WORK/out3.raw" "$WORK/out4.raw"
  sync
  t0=$(now); "$THINCTL" import "$WORK/pool" img "$WORK/img.raw" --create >/dev/null; t1=$(now)
  qemu-img convert -O qcow2 "$WORK/img.raw" "$WORK/img.qcow2"; t2=$(now)
  qemu-img convert -O qcow2 "$WORK/img.raw" "$WORK/q2.qcow2"; sync "$WORK/q2.qcow2"; t3=$(now)
  "$THINCTL" export "$WORK/pool" img "$WORK/out.raw" >/dev/null; t4=$(now)
  qemu-img convert -O raw "$WORK/img.qcow2" "$WORK/out2.raw"; t5=$(now)
  "$THINCTL" export "$WORK/pool" img "$WORK/out4.raw" --sync >/dev/null; t6=$(now)
  qemu-img convert -O raw "$WORK/img.qcow2" "$WORK/out3.raw"; sync "$WORK/out3.raw"; t7=$(now)
  read -r a b c d e g f < <(python3 -c "t=[float(x) for x in '$t0 $t1 $t2 $t3 $t4 $t5 $t6 $t7'.split()]; print(*('%.3f' % (t[i+1]-t[i]) for i in range(7)))")
  TI+=("$a"); QI+=("$b"); QIS+=("$c"); TE+=("$d"); QE+=("$e"); TES+=("$g"); QES+=("$f")
  if [ "$r" -eq 1 ]; then
    cmp "$WORK/img.raw" "$WORK/out.raw" || { echo "thinctl export differs from the image" >&2; exit 1; }
    cmp "$WORK/img.raw" "$WORK/out4.raw" || { echo "thinctl export --sync differs from the image" >&2; exit 1; }
  fi
  echo "round $r: import $a s, qemu-img qcow2 $b s (+sync $c s); export $d s (--sync $g s), qemu-img raw $e s (+sync $f s)"
done

python3 - "${TI[*]}" "${QI[*]}" "${QIS[*]}" "${TE[*]}" "${QE[*]}" "${QES[*]}" "${TES[*]}" <<'PY'
import statistics, sys
ti, qi, qis, te, qe, qes, tes = (statistics.median(map(float, a.split())) for a in sys.argv[1:8])
print(f"\nmedians over {len(sys.argv[1].split())} interleaved rounds")
print(f"import  thinctl {ti:6.3f}s  qemu-img convert -O qcow2 {qi:6.3f}s (ratio {ti / qi:5.2f})  + sync {qis:6.3f}s (ratio {ti / qis:5.2f})")
print(f"export  thinctl {te:6.3f}s  qemu-img convert -O raw   {qe:6.3f}s (ratio {te / qe:5.2f})")
print(f"export --sync  {tes:6.3f}s  qemu-img convert -O raw + sync {qes:6.3f}s (ratio {tes / qes:5.2f})")
PY
