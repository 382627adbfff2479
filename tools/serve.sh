#!/usr/bin/env bash
# The main job on a fresh machine: build thinctl (release) and serve a pool over NBD.
#   tools/serve.sh                 # serve ./thinpool on 127.0.0.1:10809 (created on first run)
#   tools/serve.sh DIR [FLAGS...]  # anything after is passed to `thinctl serve`
# The one build dependency a fresh Debian machine may lack is libclang: libublk (the
# ublk devices of `thinctl attach`) makes its kernel bindings with bindgen at build
# time. It is installed here when missing (apt-get, as root or through sudo); the rest
# is `cargo run --release --bin thinctl -- serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1; then
  as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  echo "== installing libclang-dev (libublk's bindgen needs it to build thinctl)" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
fi
exec cargo run --release --bin thinctl -- serve "$@"
