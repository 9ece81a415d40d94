#!/usr/bin/env bash
# System packages hwc's tests and cross-compilation need (Debian/Ubuntu): the aarch64 cross compiler
# that links libraries for the arm-a72 target. Installs only what is missing.
set -euo pipefail
if command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null
aarch64-linux-gnu-g++ --version | head -1
