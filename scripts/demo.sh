#!/usr/bin/env bash
# End-to-end demo on the embedded default (a local directory repository): builds blockvault, makes a
# small disk image with a real ext4 file system, backs it up, changes it, backs it up again,
# restores both points and checks them byte for byte, then verifies the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh main
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/blockvault-target}"
# Only the binary: the demo needs no test tool, server or benchmark harness.
cargo build --locked -p blockvault-cli --bin blockvault
bv="$CARGO_TARGET_DIR/debug/blockvault"

work=$(mktemp -d /tmp/blockvault-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
export BLOCKVAULT_REPO="$work/repo" BLOCKVAULT_CACHE_DIR="$work/cache"
export BLOCKVAULT_PASSWORD="demo password $(date +%s)"

echo "== making a 512 MiB disk image with an ext4 file system of real files"
mkdir -p "$work/stage"
cp -r /usr/share/doc "$work/stage/" 2>/dev/null || true
cp -r /usr/lib/python3* "$work/stage/" 2>/dev/null || true
truncate -s 512M "$work/disk.raw"
mkfs.ext4 -q -F -d "$work/stage" "$work/disk.raw"
cp --sparse=always "$work/disk.raw" "$work/disk-v1.raw"

echo "== repo init"
"$bv" repo init
echo "== first backup (full)"
"$bv" backup --vm demo --disk disk0="$work/disk.raw" --tag first
echo "== change 20 MiB of the disk, back up again"
dd if=/dev/urandom of="$work/disk.raw" bs=1M count=20 seek=100 conv=notrunc status=none
"$bv" backup --vm demo --disk disk0="$work/disk.raw" --tag second
"$bv" points list

echo "== restore both points and compare"
mapfile -t points < <("$bv" points list --json | python3 -c 'import json,sys; [print(p["id"]) for p in json.load(sys.stdin)]')
"$bv" restore export "${points[0]}" --disk disk0 --out "$work/restored-v1.raw"
"$bv" restore export "${points[1]}" --disk disk0 --out "$work/restored-v2.raw"
cmp "$work/disk-v1.raw" "$work/restored-v1.raw"
cmp "$work/disk.raw" "$work/restored-v2.raw"
echo "both restore points are bit-exact"

echo "== verify --read-data"
"$bv" verify --read-data
"$bv" repo info
echo "demo passed"
