#!/usr/bin/env bash
# Builds an application layer from Debian packages: the files that installing PACKAGEs adds to or changes in
# the base image, as a root file system tree in LAYER_DIR (overlaid on the OS image at provisioning). Units
# after --enable are enabled in the layer. Layer recipes call this with their package list.
#   apt-layer.sh LAYER_DIR PACKAGE... [--enable UNIT...]   (BASE_ROOTFS_TAR: the base image's rootfs tar)
set -euo pipefail
out=${1:?usage: apt-layer.sh LAYER_DIR PACKAGE... [--enable UNIT...]}
shift
packages=()
units=()
while [ $# -gt 0 ]; do
  case "$1" in
    --enable) shift; units=("$@"); break ;;
    *) packages+=("$1"); shift ;;
  esac
done
[ ${#packages[@]} -gt 0 ] || { echo "apt-layer.sh: no packages given" >&2; exit 1; }
base_tar=${BASE_ROOTFS_TAR:?set BASE_ROOTFS_TAR to the rootfs tar this layer is built on}
mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
  sed -n 's/^URIs: *//p; s/^deb \(http[^ ]*\) bookworm .*/\1/p' | grep -v security | head -n1 || true)}
[ -n "$mirror" ] || { echo "apt-layer.sh: no Debian mirror found in apt's sources; set DEBIAN_MIRROR" >&2; exit 1; }
work=$(mktemp -d)
trap 'umount "$work/root/proc" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/root"
tar --numeric-owner -xpf "$base_tar" -C "$work/root"
touch "$work/stamp"
sleep 1
echo "deb $mirror bookworm main" > "$work/root/etc/apt/sources.list"
cp /etc/resolv.conf "$work/root/etc/resolv.conf" 2>/dev/null || true
# Packages must not start services inside the build chroot.
printf '#!/bin/sh\nexit 101\n' > "$work/root/usr/sbin/policy-rc.d"; chmod 755 "$work/root/usr/sbin/policy-rc.d"
mount -t proc proc "$work/root/proc"
chroot "$work/root" apt-get update -qq
DEBIAN_FRONTEND=noninteractive chroot "$work/root" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
for unit in "${units[@]}"; do
  chroot "$work/root" systemctl enable "$unit" >/dev/null 2>&1
done
umount "$work/root/proc"
rm -f "$work/root/usr/sbin/policy-rc.d"
rm -rf "$work/root/var/lib/apt/lists"/* "$work/root/var/cache/apt"/*.bin "$work/root/var/cache/apt/archives"/*.deb
rm -f "$work/root/etc/apt/sources.list" "$work/root/etc/resolv.conf"
# The layer: everything created or changed after the stamp (directories included so that modes and owners
# carry over), without the volatile parts of the build.
mkdir -p "$out"
( cd "$work/root" && find . \( -path ./proc -o -path ./dev -o -path ./run -o -path ./tmp -o -path ./var/log \
    -o -path ./var/cache -o -path ./var/lib/apt \) -prune -o -cnewer "$work/stamp" -print0 |
  tar --numeric-owner --no-recursion --null -T - -cf - ) | tar --numeric-owner -xpf - -C "$out"
rm -rf "$out/etc/resolv.conf" "$out/etc/apt/sources.list" "$out/etc/machine-id"
