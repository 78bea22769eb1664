#!/usr/bin/env bash
# Builds the debian-12-minimal root filesystem into the directory given as $1, from Debian packages.
# The mirror is the one apt on this machine uses, so the build works wherever apt does.
set -euo pipefail
root=${1:?usage: recipe.sh ROOTFS_DIR}
mirror=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
  sed -n 's/^URIs: *//p; s/^deb \(http[^ ]*\) bookworm .*/\1/p' | grep -v security | head -n1 || true)}
[ -n "$mirror" ] || { echo "recipe: no Debian mirror found in apt's sources; set DEBIAN_MIRROR" >&2; exit 1; }

debootstrap --variant=minbase \
  --include=linux-image-cloud-amd64,systemd-sysv,udev,openssh-server,iproute2,dbus,sudo,systemd-timesyncd,ca-certificates \
  bookworm "$root" "$mirror"

# systemd-networkd configures the network from .network files the agent writes; resolved is not in bookworm's
# systemd package, so DNS from .network files goes to resolv.conf through networkd's own handling.
chroot "$root" systemctl enable systemd-networkd.service ssh.service >/dev/null 2>&1
chroot "$root" systemctl enable serial-getty@ttyS0.service >/dev/null 2>&1 || true
# The image carries no identity: each VM gets its own machine-id and host keys at first boot.
: > "$root/etc/machine-id"
rm -f "$root"/etc/ssh/ssh_host_*
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
echo "debian" > "$root/etc/hostname"
echo "LANG=C.UTF-8" > "$root/etc/default/locale"
