#!/usr/bin/env bash
# NBD benchmark: the same fio jobs against `thinctl serve`, `qemu-nbd` serving a qcow2 image with
# 64 KiB clusters, and `nbdkit file` on a raw file, in one run, interleaved, with medians.
#
#   tools/bench-nbd.sh                       # RUNTIME=5 s per job, ROUNDS=3, SIZE=2G exports
#   RUNTIME=10 ROUNDS=5 tools/bench-nbd.sh
#   RUNTIME=3 SIZE=512M ROUNDS=1 ONLY='alloc|storm' tools/bench-nbd.sh   # a quick subset
#   JSON=out.json tools/bench-nbd.sh         # (or --json out.json) also dump every figure as JSON
#
# Figures depend on the machine; they belong in notes, never in assertions. The script asserts
# nothing; it prints one table.
#
# Method
# - Every server listens on 127.0.0.1 only; fio uses its nbd engine (libnbd), one NBD connection
#   per fio job. Everything lives in a temporary directory under /var/tmp, removed on exit along
#   with every server this script started.
# - Servers. thinpool: ONE `thinctl serve` process for the whole run, serving every device of one
#   pool (bench, alloc, d0..d3, storm). qemu: `qemu-nbd` (cache=writeback, aio=threads: its
#   defaults) on bench.qcow2 and another on alloc.qcow2; for the jobs that need several devices of
#   one server (4conn-4dev, flush-storm) ONE `qemu-storage-daemon` process exporting d0..d3 and
#   storm (the same block layer and NBD server code as qemu-nbd, with the same defaults; one
#   process, like thinpool, is the fair comparison: four qemu-nbd processes would get four event
#   loops on two cores while thinpool and nbdkit serve all four from one process; the daemon comes
#   from Debian's qemu-system-common, installed when missing). nbdkit: `nbdkit file bench.raw`,
#   `nbdkit file alloc.raw`, and for several devices ONE `nbdkit file dir=DIR` (each file in DIR
#   is an export named after it; the same plugin, parallel thread model). All images are sparse, created empty: qcow2 with
#   cluster_size=64k, raw with truncate.
# - Prefill: bench gets its first 1 GiB written (1 MiB sequential), d0..d3 their first 256 MiB.
# - Jobs, each at queue depth 1 and 32 (one connection):
#     randread-4k     4 KiB random read of bench's first 256 MiB (page-cached everywhere)
#     overwrite-4k    4 KiB random write to the same (mapped/allocated) 256 MiB
#     mixed70-4k      4 KiB random, 70% read / 30% write, same 256 MiB
#     alloc-4k        4 KiB writes, each the first write into its own 64 KiB block (thinpool's
#                     block = the qcow2 cluster), in a random order: a fio replay log (bench.py
#                     iolog) of ALLOC_IOS writes, ended by RUNTIME (or by the end of the log
#                     for a server faster than ALLOC_IOS/RUNTIME = 12000 IOPS by default).
#                     Every round and depth uses its own never-written region of the `alloc`
#                     export; after the job the region is trimmed (untimed) so the run does not
#                     fill the disk (peak: about ALLOC_IOS x 64 KiB per server, 3.7 GiB).
#                     (The old randwrite-new job wrote 4 KiB at random over a fresh 2 GiB export;
#                     after its first second nearly every write hit an already allocated block.)
#     seqread-1m      1 MiB sequential read of bench's first 1 GiB
#     seqwrite-1m     1 MiB sequential write of the same, prefilled, 1 GiB (overwrites)
#   Multi-connection (MC_DEPTH=8 per connection, so 32 in flight in all):
#     4conn-1exp-*    fio numjobs=4: 4 connections to bench; randread-4k or overwrite-4k as above
#     4conn-4dev-*    4 connections, one to each of d0..d3 (one server process, see above)
#   flush-storm       two fio jobs in one fio run: the writer does 4 KiB writes into new 64 KiB
#                     blocks of `storm` (a fresh region per round), QD1, a FLUSH after each
#                     (replay log with a sync after every write); the reader does 4 KiB random
#                     reads at QD32 on d0. Reported: reader IOPS and clat p99, writer IOPS.
#   storm-reader-alone the same reader without the writer, run just before the storm, to give
#                     the reader's loss (storm/alone) per server.
# - Interleaving: for each round, for each job, the job runs against each server in turn (the
#   order of the servers rotates every round); the table gives the median of the rounds per cell
#   and thinpool's ratio to each peer.
# - Server CPU per I/O: utime+stime of the server process that served the job (from
#   /proc/PID/stat, all threads) before and after fio, divided by the reads+writes fio completed
#   (FLUSHes not counted), in µs. fio runs on the same 2 cores, so IOPS are also bounded by fio.
# - Peak RSS: VmHWM of every server process at the end of the run (thinpool's one process served
#   every job, so its VmHWM is the peak over the whole run).
set -euo pipefail
ORIG_PWD=$PWD
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
SIZE=${SIZE:-2G}
MC_DEPTH=${MC_DEPTH:-8}
ALLOC_IOS=${ALLOC_IOS:-$((RUNTIME * 12000))} # writes per alloc-4k region (64 KiB of space each)
STORM_IOS=${STORM_IOS:-$((RUNTIME * 6000))} # writer's log: longer than RUNTIME at any rate seen
ONLY=${ONLY:-.}                            # regex: run only the jobs whose name matches
JSON=${JSON:-}
if [ "${1:-}" = "--json" ]; then JSON=${2:-bench-nbd.json}; fi
[ "$JSON" = 1 ] && JSON=bench-nbd.json
LIB=$PWD/tools/bench-lib/bench.py
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v fio >/dev/null || missing+=(fio)
command -v qemu-nbd >/dev/null || missing+=(qemu-utils)
command -v qemu-storage-daemon >/dev/null || missing+=(qemu-system-common)
command -v nbdkit >/dev/null || missing+=(nbdkit)
command -v nbdinfo >/dev/null || missing+=(libnbd-bin)
if [ "${#missing[@]}" -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
build_log=$(mktemp)
cargo build --release --bin thinctl -q 2>"$build_log" || { cat "$build_log" >&2; rm -f "$build_log"; exit 1; }
rm -f "$build_log"
THINCTL=${CARGO_TARGET_DIR:-$PWD/target}/release/thinctl
WORK=$(mktemp -d /var/tmp/thinpool-bench.XXXXXX)
RESULTS=$WORK/results.jsonl
START=$(date +%s)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

declare -A URI PID
ALLPIDS=()
cleanup() {
  for p in "${ALLPIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${ALLPIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

bytes() { numfmt --from=iec "$1"; }
SIZE_B=$(bytes "$SIZE")
BLOCK=65536
ALLOC_REGION=$((ALLOC_IOS * BLOCK))
ALLOC_B=$((2 * ROUNDS * ALLOC_REGION))   # one region per round and depth
STORM_REGION=$((STORM_IOS * BLOCK))
STORM_B=$((ROUNDS * STORM_REGION))

wait_uri() { for _ in $(seq 100); do nbdinfo "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "no server at $1" >&2; exit 1; }
started() { # server role pid uri
  PID[$1,$2]=$3; URI[$1,$2]=$4; ALLPIDS+=("$3"); wait_uri "$4"
}

# --- thinpool: one server, one pool, every device
"$THINCTL" pool create "$WORK/pool" --data-size 64G >/dev/null
for d in bench:$SIZE_B alloc:$ALLOC_B d0:$SIZE_B d1:$SIZE_B d2:$SIZE_B d3:$SIZE_B storm:$STORM_B; do
  "$THINCTL" create "$WORK/pool" "${d%%:*}" --size "${d##*:}" >/dev/null
done
"$THINCTL" serve "$WORK/pool" --listen 127.0.0.1:11001 >"$WORK/thinpool.log" 2>&1 &
p=$!
for r in bench alloc d0 d1 d2 d3 storm; do started thinpool $r $p "nbd://127.0.0.1:11001/$r"; done

# --- qemu: qemu-nbd per single export, one qemu-storage-daemon for the multi-device jobs
qimg() { qemu-img create -q -f qcow2 -o cluster_size=65536 "$WORK/$1.qcow2" "$2"; }
qnbd() { # name size port
  qimg "$1" "$2"
  qemu-nbd -f qcow2 -x "$1" -b 127.0.0.1 -p "$3" --persistent --shared=8 --discard=unmap "$WORK/$1.qcow2" 2>>"$WORK/qemu-nbd.log" &
  started qemu "$1" $! "nbd://127.0.0.1:$3/$1"
}
qnbd bench "$SIZE_B" 11011
qnbd alloc "$ALLOC_B" 11012
qsd=(qemu-storage-daemon --nbd-server addr.type=inet,addr.host=127.0.0.1,addr.port=11013)
for d in d0:$SIZE_B d1:$SIZE_B d2:$SIZE_B d3:$SIZE_B storm:$STORM_B; do
  n=${d%%:*}; qimg "$n" "${d##*:}"
  qsd+=(--blockdev "driver=file,node-name=f-$n,filename=$WORK/$n.qcow2,discard=unmap"
        --blockdev "driver=qcow2,node-name=$n,file=f-$n,discard=unmap"
        --export "type=nbd,id=e-$n,node-name=$n,name=$n,writable=on")
done
"${qsd[@]}" >"$WORK/qsd.log" 2>&1 &
p=$!
for r in d0 d1 d2 d3 storm; do started qemu $r $p "nbd://127.0.0.1:11013/$r"; done

# --- nbdkit: nbdkit file per single export, one nbdkit file dir= for the multi-device jobs
mkdir "$WORK/kdir"
truncate -s "$SIZE_B" "$WORK/bench.raw"; truncate -s "$ALLOC_B" "$WORK/alloc.raw"
knbd() { # name port: nbdkit file on one raw file (also to restart one that died)
  nbdkit -f -i 127.0.0.1 -p "$2" -e "$1" file "$WORK/$1.raw" 2>>"$WORK/nbdkit.log" & started nbdkit "$1" $! "nbd://127.0.0.1:$2/$1"
}
declare -A KPORT=([bench]=11021 [alloc]=11022)
DIED=()
knbd bench 11021
knbd alloc 11022
for d in d0:$SIZE_B d1:$SIZE_B d2:$SIZE_B d3:$SIZE_B storm:$STORM_B; do truncate -s "${d##*:}" "$WORK/kdir/${d%%:*}"; done
nbdkit -f -i 127.0.0.1 -p 11023 file dir="$WORK/kdir" 2>>"$WORK/nbdkit.log" &
p=$!
for r in d0 d1 d2 d3 storm; do started nbdkit $r $p "nbd://127.0.0.1:11023/$r"; done

SERVERS=(thinpool qemu nbdkit)
FIO=(fio --ioengine=nbd --output-format=json)
# Prefill outside the timed jobs.
for s in "${SERVERS[@]}"; do
  "${FIO[@]}" --name=prefill --uri="${URI[$s,bench]}" --rw=write --bs=1m --size=1g --iodepth=8 >/dev/null 2>&1
  for d in d0 d1 d2 d3; do
    "${FIO[@]}" --name=prefill --uri="${URI[$s,$d]}" --rw=write --bs=1m --size=256m --iodepth=8 >/dev/null 2>&1
  done
done
# Replay logs, the same for every server.
for r in $(seq "$ROUNDS"); do
  for qd in 1 32; do
    i=$(( (r - 1) * 2 + (qd == 32) ))
    python3 "$LIB" iolog "$WORK/alloc-$r-$qd.iolog" $((i * ALLOC_REGION)) "$ALLOC_IOS"
  done
  python3 "$LIB" iolog "$WORK/storm-$r.iolog" $(( (r - 1) * STORM_REGION )) "$STORM_IOS" sync
done

cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# run JOB SERVER ROUND ROLE fio-args... : runs fio, records IOPS, p99 and server CPU.
run() {
  local job=$1 s=$2 r=$3 role=$4; shift 4
  local pid=${PID[$s,$role]} out="$WORK/fio-$s-$r.json" t0 t1
  t0=$(cpu_ticks "$pid")
  "${FIO[@]}" "$@" >"$out" 2>"$WORK/fio.err" || { echo "fio failed: $job on $s" >&2; cat "$WORK/fio.err" >&2; exit 1; }
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "$s server ($role) died during $job (round $r); its log ends:" >&2
    tail -n 5 "$WORK/$s.log" "$WORK/nbdkit.log" 2>/dev/null | sed 's/^/  /' >&2
    # A peer's single-export nbdkit that died (nbdkit 1.32 aborted in alloc-4k here) is
    # restarted on the same file; its fio figures stand (fio finished), its CPU is unknown.
    if [ "$s" = nbdkit ] && { [ "$role" = bench ] || [ "$role" = alloc ]; }; then
      wait "$pid" 2>/dev/null || true
      knbd "$role" "${KPORT[$role]}"
      python3 "$LIB" record "$RESULTS" "$out" "$job" "$s" "$r" -
      DIED+=("$s/$role in $job round $r")
      return
    fi
    exit 1
  fi
  t1=$(cpu_ticks "$pid")
  python3 "$LIB" record "$RESULTS" "$out" "$job" "$s" "$r" $((t1 - t0))
}

trim() { # server role offset length (untimed: returns never-written space to the disk)
  "${FIO[@]}" --name=trim --uri="${URI[$1,$2]}" --rw=trim --bs=64m --offset="$3" --size="$4" >/dev/null 2>&1 || true
}

job() { # JOB SERVER ROUND
  local j=$1 s=$2 r=$3 qd rw
  local T=(--time_based --runtime="$RUNTIME")
  case $j in
    *@*) qd=${j##*@} ;;
  esac
  case $j in
    randread-4k@*) run "$j" "$s" "$r" bench --name=j --uri="${URI[$s,bench]}" --rw=randread --bs=4k --iodepth="$qd" --size=256m "${T[@]}" ;;
    overwrite-4k@*) run "$j" "$s" "$r" bench --name=j --uri="${URI[$s,bench]}" --rw=randwrite --bs=4k --iodepth="$qd" --size=256m "${T[@]}" ;;
    mixed70-4k@*) run "$j" "$s" "$r" bench --name=j --uri="${URI[$s,bench]}" --rw=randrw --rwmixread=70 --bs=4k --iodepth="$qd" --size=256m "${T[@]}" ;;
    seqread-1m@*) run "$j" "$s" "$r" bench --name=j --uri="${URI[$s,bench]}" --rw=read --bs=1m --iodepth="$qd" --size=1g "${T[@]}" ;;
    seqwrite-1m@*) run "$j" "$s" "$r" bench --name=j --uri="${URI[$s,bench]}" --rw=write --bs=1m --iodepth="$qd" --size=1g "${T[@]}" ;;
    alloc-4k@*)
      local i=$(( (r - 1) * 2 + (qd == 32) ))
      run "$j" "$s" "$r" alloc --name=j --uri="${URI[$s,alloc]}" --read_iolog="$WORK/alloc-$r-$qd.iolog" \
          --replay_no_stall=1 --iodepth="$qd" --runtime="$RUNTIME"
      trim "$s" alloc $((i * ALLOC_REGION)) "$ALLOC_REGION" ;;
    4conn-1exp-*|4conn-4dev-*)
      case $j in *randread) rw=randread ;; *) rw=randwrite ;; esac
      local G=(--rw=$rw --bs=4k --iodepth="$MC_DEPTH" --size=256m --group_reporting "${T[@]}")
      if [[ $j == 4conn-1exp-* ]]; then
        run "$j" "$s" "$r" bench "${G[@]}" --name=j --uri="${URI[$s,bench]}" --numjobs=4
      else
        run "$j" "$s" "$r" d0 "${G[@]}" --name=c0 --uri="${URI[$s,d0]}" --name=c1 --uri="${URI[$s,d1]}" \
            --name=c2 --uri="${URI[$s,d2]}" --name=c3 --uri="${URI[$s,d3]}"
      fi ;;
    storm-reader-alone)
      run "$j" "$s" "$r" d0 --name=reader --uri="${URI[$s,d0]}" --rw=randread --bs=4k --iodepth=32 --size=256m "${T[@]}" ;;
    flush-storm)
      run "$j" "$s" "$r" d0 --name=reader --uri="${URI[$s,d0]}" --rw=randread --bs=4k --iodepth=32 --size=256m "${T[@]}" \
          --name=writer --uri="${URI[$s,storm]}" --read_iolog="$WORK/storm-$r.iolog" --replay_no_stall=1 --iodepth=1 --runtime="$RUNTIME"
      trim "$s" storm $(( (r - 1) * STORM_REGION )) "$STORM_REGION" ;;
    *) echo "unknown job $j" >&2; exit 1 ;;
  esac
}

JOBS=()
for j in randread-4k overwrite-4k mixed70-4k alloc-4k seqread-1m seqwrite-1m; do JOBS+=("$j@1" "$j@32"); done
JOBS+=(4conn-1exp-randread 4conn-1exp-overwrite 4conn-4dev-randread 4conn-4dev-overwrite storm-reader-alone flush-storm)
SEL=()
for j in "${JOBS[@]}"; do [[ $j =~ $ONLY ]] && SEL+=("$j"); done

for r in $(seq "$ROUNDS"); do
  order=("${SERVERS[@]:$(( (r - 1) % 3 ))}" "${SERVERS[@]:0:$(( (r - 1) % 3 ))}")
  echo "round $r/$ROUNDS (servers in the order ${order[*]})" >&2
  for j in "${SEL[@]}"; do
    for s in "${order[@]}"; do job "$j" "$s" "$r"; done
  done
done

printf '\nfio over NBD: %s s per job, %s rounds, exports of %s, %s cores, MC_DEPTH=%s, ALLOC_IOS=%s; thinpool %s\n' \
  "$RUNTIME" "$ROUNDS" "$SIZE" "$(nproc)" "$MC_DEPTH" "$ALLOC_IOS" "$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
RSS=$WORK/rss.txt
: >"$RSS"
for k in "${!PID[@]}"; do echo "${k%%,*} ${PID[$k]}"; done | sort -u | while read -r s p; do
  roles=$(for k in "${!PID[@]}"; do if [ "${PID[$k]}" = "$p" ]; then echo "${k#*,}"; fi; done | sort | paste -sd,)
  echo "$s $p $roles $(awk '/VmHWM/ {print $2}' "/proc/$p/status") $(tr '\0' ' ' <"/proc/$p/cmdline" | awk '{print $1}' | xargs basename)" >>"$RSS"
done
RSS_FILE=$RSS python3 "$LIB" report "$RESULTS" "${JSON:+$(cd "$ORIG_PWD" && realpath -m "$JSON")}"
for d in "${DIED[@]}"; do echo "note: the $d died and was restarted (its IOPS stand; no CPU figure for it)"; done
printf '(run took %s s; load average at the start %s, at the end %s)\n' $(( $(date +%s) - START )) "$LOAD0" "$(cut -d' ' -f1-3 /proc/loadavg)"
