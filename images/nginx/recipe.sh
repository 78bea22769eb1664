#!/usr/bin/env bash
# Builds the nginx application layer: the files that installing Debian's nginx adds to or changes in
# debian-12-minimal, as a root file system tree in $1 (overlaid on the OS image at provisioning).
#   recipe.sh LAYER_DIR            (BASE_ROOTFS_TAR: the debian-12-minimal tar this layer is built on)
set -euo pipefail
out=${1:?usage: recipe.sh LAYER_DIR}
base_tar=${BASE_ROOTFS_TAR:?set BASE_ROOTFS_TAR to the debian-12-minimal rootfs tar}
mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
  sed -n 's/^URIs: *//p; s/^deb \(http[^ ]*\) bookworm .*/\1/p' | grep -v security | head -n1 || true)}
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
DEBIAN_FRONTEND=noninteractive chroot "$work/root" apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
chroot "$work/root" systemctl enable nginx.service >/dev/null 2>&1
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
