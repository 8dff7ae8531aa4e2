#!/usr/bin/env bash
# Installs what the build and the tests need, if anything is missing.
#   bash scripts/install-deps.sh main   only what building blockvault and its demo need
#   bash scripts/install-deps.sh test   everything the test suite needs (the default)
set -euo pipefail
what="${1:-test}"
case "$what" in main|test) ;; *) echo "usage: $0 [main|test]" >&2; exit 2 ;; esac

# Building: the rocksdb crate generates its bindings with libclang; the NBD server's TLS links
# OpenSSL (libssl-dev, found through pkg-config). The demo makes its disk image with mkfs.ext4
# (e2fsprogs).
main_packages=(libclang-dev libssl-dev pkg-config e2fsprogs)
# Testing, each an outside oracle or a real peer:
#   qemu-utils            qemu-img / qemu-io / qemu-nbd: VHDX and NBD oracles
#   libnbd-bin, python3-libnbd, nbdkit: real NBD clients and a reference server
#   libvhdi-utils         a second, independent VHDX reader (vhdimount)
#   ntfs-3g, fdisk, gdisk mkntfs/ntfscp/ntfscat and partition tables for file-level restore images
#   gnutls-bin            certtool / psktool: credentials for NBD over TLS
#   busybox-static        the guest's userland in the VM boot test
#   syslinux, syslinux-common, mtools, dosfstools, cpio: the VM boot test's disk (a FAT boot
#                         partition made without mounts, syslinux installed on it, an initramfs)
#   openssl               an independent HMAC-SHA256 to check the agent's webhook signatures
test_packages=(qemu-utils libnbd-bin python3-libnbd nbdkit libvhdi-utils ntfs-3g fdisk gdisk
  gnutls-bin busybox-static syslinux syslinux-common mtools dosfstools cpio openssl)
# From bookworm-backports, to match qemu-utils 10.0 there (bookworm's own qemu-system is 7.2 and
# conflicts): a real VM boots from `restore mount` in the tests.
backports_packages=(qemu-system-x86)

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

missing_of() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

updated=""
apt_install() {
  local target=("$@")
  [ ${#target[@]} -gt 0 ] || return 0
  if [ -z "$updated" ]; then
    $SUDO apt-get update -qq
    updated=1
  fi
  $SUDO apt-get install -y -qq "${target[@]}" >/dev/null
}

mapfile -t missing < <(missing_of "${main_packages[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  apt_install "${missing[@]}"
fi
[ "$what" = main ] && exit 0

mapfile -t missing < <(missing_of "${test_packages[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  apt_install "${missing[@]}"
fi

mapfile -t missing < <(missing_of "${backports_packages[@]}")
if [ ${#missing[@]} -gt 0 ]; then
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "adding the bookworm-backports suite to the apt sources" >&2
    printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' |
      $SUDO tee /etc/apt/sources.list.d/blockvault-backports.sources >/dev/null
    updated=""
  fi
  echo "installing from bookworm-backports: ${missing[*]}" >&2
  if [ -z "$updated" ]; then $SUDO apt-get update -qq; updated=1; fi
  $SUDO apt-get install -y -qq -t bookworm-backports "${missing[@]}" >/dev/null
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
