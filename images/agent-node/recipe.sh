#!/usr/bin/env bash
# Builds the agent-node layer: what gridforge-agent needs at run time on a disk-only node (e.g. a utility VM
# that provisions and wipes its attached drives) on top of debian-12-minimal: mke2fs/e2fsck/resize2fs,
# mkfs.vfat and fsck.vfat, sgdisk and fdisk for inspection, losetup, and cryptsetup for checking LUKS2
# volumes, systemd-boot-efi for the boot loader of guests whose image carries none, and libvirt0, the client
# library the agent binary links (a disk-only node never connects). The agent binary itself, its unit,
# configuration and certificates are installed per node.
#   recipe.sh LAYER_DIR            (BASE_ROOTFS_TAR: the debian-12-minimal tar this layer is built on)
set -euo pipefail
exec bash "$(dirname "$0")/../apt-layer.sh" "${1:?usage: recipe.sh LAYER_DIR}" \
  e2fsprogs dosfstools gdisk fdisk util-linux cryptsetup-bin systemd-boot-efi libvirt0
