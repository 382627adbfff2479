#!/usr/bin/env bash
# ublk against NBD with the same thin device, the same server and the same kernel: fio inside
# the 6.12 guest of tools/guest (GUEST_KERNEL=6.12) against
#   ublk      /dev/ublkbN              (thinctl serve --ublk)
#   nbd-tcp   /dev/nbd0                (the kernel's NBD client over TCP to 127.0.0.1 in the guest)
#   nbd-unix  /dev/nbd1                (the kernel's NBD client over the Unix socket, nbd-client -u)
# one `thinctl serve` process (release build) serving one thin device all three ways at once.
#
#   tools/bench-ublk.sh                      # RUNTIME=10 s per job, SIZE=64M device
#   RUNTIME=5 tools/bench-ublk.sh
#
# Jobs (fio, libaio, direct I/O, 4 KiB, one job each, in this order for each path):
#   randread QD1, randread QD32, randwrite QD1, randwrite QD32
# on a device written whole first (so reads find data and writes overwrite mapped blocks).
# It prints IOPS per path and job and the ublk/NBD ratios. The guest runs under TCG (emulated
# CPU, one vCPU): the figures only show direction, not what the same code does on real
# hardware. Not a test: it asserts nothing. Figures belong in notes.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-64M}
export GUEST_KERNEL=6.12
tools/guest/build.sh >/dev/null
command -v fio >/dev/null || { echo "fio is missing: apt-get install fio" >&2; exit 1; }
echo "== building thinctl (release)" >&2
cargo build --release --bin thinctl >&2
target=${CARGO_TARGET_DIR:-target}
exe=$(cd "$target/release" && pwd)/thinctl
work=$(mktemp -d /var/tmp/bench-ublk.XXXXXX)
trap 'rm -rf "$work"' EXIT
stage=$work/stage
mkdir -p "$stage/sbin"
cp "$exe" "$stage/sbin/thinctl"
cp "$(command -v fio)" "$stage/sbin/fio"
list=$work/files
printf 'sbin/thinctl\nsbin/fio\n' > "$list"
for p in "$exe" "$(command -v fio)"; do
  for lib in $(ldd "$p" | grep -o '/[^ ]*'); do
    rel=${lib#/}
    [ -e "$stage/$rel" ] && continue
    mkdir -p "$stage/$(dirname "$rel")"
    cp -L "$lib" "$stage/$rel"
    echo "$rel" >> "$list"
  done
done
(cd "$stage" && cpio -o -H newc --quiet < "$list") > "$work/payload.img"
truncate -s "$(( ($(stat -c %s "$work/payload.img") / 1048576 + 1) * 1048576 ))" "$work/payload.img"
cat > "$work/guest.sh" <<EOF
cd / && cpio -idm < /dev/vda 2>/dev/null
T=/sbin/thinctl
\$T pool create /tmp/p --data-size 256M >/dev/null
\$T create /tmp/p thin0 --size $SIZE >/dev/null
\$T serve /tmp/p --listen 127.0.0.1:10809 --socket /tmp/nbd.sock --ublk thin0 > /tmp/serve.log 2>&1 &
spid=\$!
i=0; while ! grep -q 'attached "thin0"' /tmp/serve.log; do i=\$((i+1)); [ \$i -lt 300 ] || { cat /tmp/serve.log; exit 1; }; sleep 0.2; done
U=\$(sed -n 's/^attached "thin0" as \(\/dev\/ublkb[0-9]*\).*/\1/p' /tmp/serve.log)
/sbin/nbd-client 127.0.0.1 10809 /dev/nbd0 -N thin0 >/dev/null
/sbin/nbd-client -u /tmp/nbd.sock /dev/nbd1 -N thin0 >/dev/null
dd if=/dev/urandom of=\$U bs=1M oflag=direct 2>/dev/null || true
sync
for path in ublk:\$U nbd-tcp:/dev/nbd0 nbd-unix:/dev/nbd1; do
  name=\${path%%:*}; dev=\${path#*:}
  for job in randread:1 randread:32 randwrite:1 randwrite:32; do
    rw=\${job%%:*}; qd=\${job#*:}
    /sbin/fio --name=b --filename=\$dev --rw=\$rw --bs=4k --iodepth=\$qd --ioengine=libaio --direct=1 \
      --time_based --runtime=$RUNTIME --ramp_time=1 --output-format=terse --terse-version=3 > /tmp/fio.out 2>/tmp/fio.err \
      || { cat /tmp/fio.err; exit 1; }
    if [ \$rw = randread ]; then f=8; else f=49; fi
    echo "RESULT \$name \$rw-qd\$qd \$(cut -d';' -f\$f /tmp/fio.out)"
  done
done
/sbin/nbd-client -d /dev/nbd0 >/dev/null
/sbin/nbd-client -d /dev/nbd1 >/dev/null
kill -TERM \$spid
wait \$spid
echo BENCH-DONE
EOF
echo "== fio in the 6.12 guest (TCG), ${RUNTIME}s per job" >&2
VM_MEM=1024 VM_TIMEOUT=1800 tools/guest/run.sh "$work/guest.sh" "$work/payload.img" > "$work/console.log" 2>&1 || {
  cat "$work/console.log" >&2
  exit 1
}
grep -q BENCH-DONE "$work/console.log" || { cat "$work/console.log" >&2; exit 1; }
tr -d '\r' < "$work/console.log" | awk '
  $1 == "RESULT" { iops[$2 " " $3] = $4; jobs[$3] = 1 }
  END {
    printf "%-14s %10s %10s %10s %12s %12s\n", "job (4 KiB)", "ublk", "nbd-tcp", "nbd-unix", "ublk/tcp", "ublk/unix"
    n = split("randread-qd1 randread-qd32 randwrite-qd1 randwrite-qd32", order, " ")
    for (i = 1; i <= n; i++) {
      j = order[i]; u = iops["ublk " j]; t = iops["nbd-tcp " j]; x = iops["nbd-unix " j]
      printf "%-14s %10d %10d %10d %12.2f %12.2f\n", j, u, t, x, (t > 0 ? u / t : 0), (x > 0 ? u / x : 0)
    }
    print "IOPS from fio inside a TCG guest (one emulated vCPU): the ratios show direction only."
  }'
