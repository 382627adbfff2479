#!/usr/bin/env bash
# The one test command, for developers and CI alike:
#   installs the Debian packages the tests need (when missing), then runs
#   cargo fmt --check, cargo clippy (all targets, warnings are errors) and
#   cargo test (all targets: unit, integration, property, fuzz-seed, bench smoke).
# A missing tool makes the tests that need it fail loudly; they never skip.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
need() { # need COMMAND PACKAGE...
  local cmd=$1; shift
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$@")
}
need thin_check thin-provisioning-tools
need nbdinfo libnbd-bin
need nbd-client nbd-client
need fio fio
need qemu-img qemu-utils
need xz xz-utils
need openssl openssl
need containerd containerd            # the snapshotter's tests drive containerd and ctr
need protoc protobuf-compiler         # containerd-snapshots generates its gRPC code with protoc
need mkfs.ext4 e2fsprogs              # the snapshotter formats its base file system
need runc runc                        # the snapshotter's VM test runs containers in the guest
need busybox busybox-static           # ... from an image built of the static /bin/busybox
need strip binutils                   # ... and ships the snapshotter and thinctl stripped
# libublk (ublk devices) makes its kernel bindings with bindgen at build time: libclang.
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || missing+=(libclang-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The kernel tests boot a qemu guest: install qemu-system and fetch the guest kernel
# now, before any test runs (installing qemu-system swaps the qemu-utils version).
echo "== guest for the kernel tests"
tools/guest/build.sh >/dev/null
GUEST_KERNEL=6.12 tools/guest/build.sh >/dev/null   # the ublk tests' guest (bookworm-security's 6.12)

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== cargo test --all-targets"
cargo test --all-targets
echo "== the containerd snapshotter (snapshotter/): clippy and tests"
cargo clippy -p thinpool-snapshotter --all-targets -- -D warnings
cargo test -p thinpool-snapshotter --all-targets
