#!/bin/sh
# The seed workload of issue 9 through the real server: a 16 GiB pool created with
# default options (12 MiB of metadata), a 1 GiB base device holding 256 MiB, N
# snapshots of it as containers (default 100), and 1 MiB of random 4 KiB writes into
# each with qemu-io over NBD (one qemu-io per container, which flushes as it exits).
# Prints metadata use as it goes and a summary; fails on the first failed write.
#
#   tools/seed-workload.sh            # 100 containers
#   N=1000 tools/seed-workload.sh     # more
#   KEEP=1 tools/seed-workload.sh     # keep the pool directory (printed)
#
# Needs qemu-io (qemu-utils), thin_check (thin-provisioning-tools) and shuf
# (coreutils); builds target/release/thinctl when THINCTL is not set.
set -eu

N=${N:-100}
cd "$(dirname "$0")/.."
for tool in qemu-io:qemu-utils thin_check:thin-provisioning-tools shuf:coreutils; do
    command -v "${tool%%:*}" >/dev/null || { echo "seed-workload: ${tool%%:*} not found: install ${tool#*:}" >&2; exit 1; }
done
if [ -z "${THINCTL:-}" ]; then
    cargo build --release --quiet --bin thinctl
    THINCTL=${CARGO_TARGET_DIR:-target}/release/thinctl
fi

work=$(mktemp -d)
dir=$work/pool
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    if [ -n "${KEEP:-}" ]; then echo "pool kept in $dir"; else rm -rf "$work"; fi
}
trap cleanup EXIT INT TERM

meta_use() {
    "$THINCTL" status "$dir" --json | sed -n 's/.*"metadata_used_blocks": \([0-9]*\).*/\1/p;s/.*"metadata_total_blocks": \([0-9]*\).*/\1/p' | paste -sd/ -
}

"$THINCTL" pool create "$dir" --data-size 16G
"$THINCTL" create "$dir" base --size 1G >/dev/null
"$THINCTL" serve "$dir" --listen 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.err" &
server=$!
i=0
until grep -q "serving pool" "$work/serve.out" 2>/dev/null; do
    i=$((i + 1)); [ $i -lt 200 ] || { cat "$work/serve.err" >&2; exit 1; }
    sleep 0.05
done
port=$(sed -n 's|.*nbd://127.0.0.1:\([0-9]*\)/.*|\1|p' "$work/serve.out" | head -n 1)
uri=nbd://127.0.0.1:$port
start=$(date +%s)
qemu-io -f raw -t writeback -c "write -P 0xb5 0 256M" "$uri/base" >/dev/null
echo "base: 256 MiB written; metadata $(meta_use) blocks used/total"

c=1
while [ $c -le "$N" ]; do
    "$THINCTL" snapshot "$dir" base "c$c" >/dev/null
    pattern=$(( c % 251 + 1 ))
    # 256 random 4 KiB-aligned offsets in 1 GiB.
    set --
    for page in $(shuf -i 0-262143 -n 256 -r); do
        set -- "$@" -c "write -P $pattern $((page * 4096)) 4k"
    done
    if ! out=$(qemu-io -f raw -t writeback "$@" "$uri/c$c" 2>&1) || echo "$out" | grep -qi "error\|failed"; then
        echo "container $c: a write failed: $(echo "$out" | grep -i 'error\|failed' | head -n 3)" >&2
        echo "metadata $(meta_use) blocks used/total" >&2
        exit 1
    fi
    if [ $((c % 10)) -eq 0 ] || [ $c -eq "$N" ]; then
        echo "container $c: metadata $(meta_use) blocks used/total"
    fi
    c=$((c + 1))
done
elapsed=$(( $(date +%s) - start ))

"$THINCTL" status "$dir"
kill "$server"; wait "$server" || true; server=
"$THINCTL" check "$dir"
thin_check "$dir/metadata" >/dev/null 2>&1 && echo "thin_check: clean" || { echo "thin_check failed" >&2; exit 1; }
echo "metadata file: $(stat -c %s "$dir/metadata") bytes (created with 12 MiB); data file holds $(du -k "$dir/data" | cut -f1) KiB"
grep -i "metadata\|autoextend\|exhausted" "$work/serve.err" || true
echo "$N containers in ${elapsed}s, no write failed"
