#!/usr/bin/env bash
# Builds a small bootable BIOS disk image without root privileges or mounts:
#   MBR (syslinux's mbr.bin) | partition 1: FAT16 with syslinux, a Debian kernel and an initramfs
#                            | partition 2: ext4 root (busybox-static and an /sbin/init script)
# The initramfs loads the virtio modules from the same kernel package, mounts /dev/vda2 and
# switches to it. The root's init prints BV-BOOT-MARKER on the serial console, then either writes
# /guest-note (first boot: prints BV-WROTE) or prints its content (BV-FOUND <text>), and powers off.
#
# Usage: make-boot-disk.sh OUT.img [CACHE_DIR]
# The kernel package is fetched once with `apt-get download` into CACHE_DIR (default
# ~/.cache/blockvault-vm) and reused. Needs: apt-get, dpkg-deb, busybox (busybox-static), cpio,
# gzip, mkfs.vfat (dosfstools), mtools, syslinux, sfdisk (fdisk), mkfs.ext4 (e2fsprogs).
set -euo pipefail
out="$1"
cache="${2:-$HOME/.cache/blockvault-vm}"
for tool in apt-get dpkg-deb busybox cpio gzip mkfs.vfat mcopy syslinux sfdisk mkfs.ext4; do
  command -v "$tool" >/dev/null || { echo "make-boot-disk: '$tool' is missing; run scripts/install-deps.sh" >&2; exit 2; }
done
mbr=/usr/lib/syslinux/mbr/mbr.bin
[ -f "$mbr" ] || { echo "make-boot-disk: $mbr is missing (package syslinux-common)" >&2; exit 2; }
bb="$(command -v busybox)"
if ! file -L "$bb" 2>/dev/null | grep -q 'statically linked'; then
  [ -x /bin/busybox ] && bb=/bin/busybox
fi

mkdir -p "$cache"
# The kernel: the newest Debian cloud kernel package this machine's apt knows, kept in the cache.
kdir="$cache/kernel"
if [ ! -f "$kdir/vmlinuz" ]; then
  pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')"
  [ -n "$pkg" ] || { echo "make-boot-disk: apt knows no linux-image-cloud-amd64 (run apt-get update)" >&2; exit 2; }
  tmp="$(mktemp -d "$cache/fetch.XXXXXX")"
  (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || { echo "make-boot-disk: apt-get download $pkg failed" >&2; exit 2; }
  dpkg-deb -x "$tmp"/*.deb "$tmp/x"
  mkdir -p "$tmp/kernel/modules"
  cp "$tmp"/x/boot/vmlinuz-* "$tmp/kernel/vmlinuz"
  for m in virtio/virtio.ko virtio/virtio_ring.ko virtio/virtio_pci_legacy_dev.ko \
           virtio/virtio_pci_modern_dev.ko virtio/virtio_pci.ko block/virtio_blk.ko; do
    f="$(find "$tmp/x/lib/modules" -path "*/drivers/$m*" | head -n1)"
    [ -n "$f" ] || { echo "make-boot-disk: $m not in $pkg" >&2; exit 2; }
    case "$f" in
      *.xz) xz -dc "$f" > "$tmp/kernel/modules/$(basename "$m")" ;;
      *.zst) zstd -qdc "$f" > "$tmp/kernel/modules/$(basename "$m")" ;;
      *) cp "$f" "$tmp/kernel/modules/" ;;
    esac
  done
  echo "$pkg" > "$tmp/kernel/package"
  rm -rf "$kdir"
  mv "$tmp/kernel" "$kdir"
  rm -rf "$tmp"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# initramfs: busybox, the modules, an init that finds the root and switches to it.
ir="$work/initramfs"
mkdir -p "$ir"/{bin,dev,proc,sys,mnt,lib/modules}
cp "$bb" "$ir/bin/busybox"
cp "$kdir"/modules/*.ko "$ir/lib/modules/"
cat > "$ir/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for pass in 1 2; do
  for m in virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod /lib/modules/$m.ko 2>/dev/null
  done
done
i=0
while [ ! -b /dev/vda2 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/vda2 /mnt || { echo BV-NO-ROOT; poweroff -f; }
umount /proc /sys
mount --move /dev /mnt/dev
exec switch_root /mnt /sbin/init
INIT
chmod +x "$ir/init"
(cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.gz"

# Root file system.
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc}
cp "$bb" "$root/bin/busybox"
cat > "$root/sbin/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
echo BV-BOOT-MARKER
if [ -f /guest-note ]; then
  echo "BV-FOUND $(cat /guest-note)"
else
  echo "written by the guest" > /guest-note
  sync
  echo BV-WROTE
fi
mount -o remount,ro /
sync
echo BV-POWEROFF
poweroff -f
INIT
chmod +x "$root/sbin/init"
echo "blockvault boot test root" > "$root/etc/issue"

# Partitions: FAT16 at 1 MiB (32 MiB, bootable), ext4 after it (32 MiB); 66 MiB in all.
mib=$((1024 * 1024))
fat="$work/fat.img"
truncate -s $((32 * mib)) "$fat"
mkfs.vfat -F 16 -n BVBOOT "$fat" >/dev/null
cat > "$work/syslinux.cfg" <<'CFG'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init
CFG
MTOOLS_SKIP_CHECK=1 mcopy -i "$fat" "$kdir/vmlinuz" ::/vmlinuz
MTOOLS_SKIP_CHECK=1 mcopy -i "$fat" "$work/initrd.gz" ::/initrd.gz
MTOOLS_SKIP_CHECK=1 mcopy -i "$fat" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$fat"

ext="$work/root.img"
mkfs.ext4 -q -F -L bvroot -d "$root" "$ext" 32M

rm -f "$out"
truncate -s $((66 * mib)) "$out"
printf 'label: dos\nstart=2048, size=65536, type=6, bootable\nstart=67584, size=65536, type=83\n' \
  | sfdisk -q "$out"
dd if="$mbr" of="$out" bs=440 count=1 conv=notrunc status=none
dd if="$fat" of="$out" bs=1M seek=1 conv=notrunc status=none
dd if="$ext" of="$out" bs=1M seek=33 conv=notrunc status=none
