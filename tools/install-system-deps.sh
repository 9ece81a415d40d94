#!/usr/bin/env bash
# System packages hwc's tests and cross-compilation need (Debian/Ubuntu): the aarch64 cross compiler
# that links libraries for the arm-a72 target, and qemu-user, which runs those libraries on this
# machine to check their outputs where no board is at hand. Installs only what is missing.
set -euo pipefail
missing=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || missing+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
aarch64-linux-gnu-g++ --version | head -1
qemu-aarch64 --version | head -1
