#!/usr/bin/env bash
# Installs the Debian packages the build and the tests need, if any is missing.
#   libclang-dev   the rocksdb crate generates its bindings with libclang
#   qemu-utils     qemu-img / qemu-io / qemu-nbd: outside oracles for VHDX and NBD
#   libnbd-bin, python3-libnbd, nbdkit: real NBD clients and a reference server
#   e2fsprogs      mkfs.ext4 builds the demo and benchmark disks
#   libvhdi-utils  a second, independent VHDX reader (vhdimount) for the oracle tests
set -euo pipefail
packages=(libclang-dev qemu-utils libnbd-bin python3-libnbd nbdkit e2fsprogs libvhdi-utils)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# moto's standalone S3 server (moto_server): the S3-protocol server the S3 repository tests run against.
if ! command -v moto_server >/dev/null 2>&1; then
  echo "installing: moto[server] (pip)" >&2
  python3 -m pip install --quiet 'moto[server]>=5.0.20' || pip3 install --quiet 'moto[server]>=5.0.20'
fi
# s3s-fs: an S3-protocol server that keeps objects on disk, so a test can kill it and start it
# again on the same data. Pinned: later releases need a newer Rust than this toolchain. Built
# in a throwaway target dir (about 6 minutes on 2 cores) and kept in ~/.cargo/bin for later runs.
S3S_FS_VERSION=0.14.1
cargo_bin="${CARGO_HOME:-$HOME/.cargo}/bin"
s3s_fs="$(command -v s3s-fs || echo "$cargo_bin/s3s-fs")"
if ! { [ -x "$s3s_fs" ] && [ "$("$s3s_fs" --version 2>/dev/null)" = "s3s-fs $S3S_FS_VERSION" ]; }; then
  echo "installing: s3s-fs $S3S_FS_VERSION (cargo install)" >&2
  build_dir="$(mktemp -d)"
  trap 'rm -rf "$build_dir"' EXIT
  env -u CARGO_TARGET_DIR cargo install --quiet --locked --force "s3s-fs@$S3S_FS_VERSION" \
    --features binary --target-dir "$build_dir"
fi
