#!/usr/bin/env bash
# Builds the nginx application layer: the files that installing Debian's nginx adds to or changes in
# debian-12-minimal, as a root file system tree in $1 (overlaid on the OS image at provisioning).
#   recipe.sh LAYER_DIR            (BASE_ROOTFS_TAR: the debian-12-minimal tar this layer is built on)
set -euo pipefail
exec bash "$(dirname "$0")/../apt-layer.sh" "${1:?usage: recipe.sh LAYER_DIR}" nginx-light --enable nginx.service
