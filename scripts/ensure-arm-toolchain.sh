#!/usr/bin/env bash
# Make sure the bare-metal Arm toolchain and QEMU are installed: arm-none-eabi-gcc with newlib
# builds the Cortex-M4 firmware of kernels/firmware, qemu-system-arm runs it on the emulated
# mps2-an386 board. Installs the Debian packages gcc-arm-none-eabi, libnewlib-arm-none-eabi and
# qemu-system-arm when something is missing; says nothing when everything is already there.
set -euo pipefail

have_newlib() {  # newlib-nano's specs file ships in libnewlib-arm-none-eabi
  local specs
  specs="$(arm-none-eabi-gcc -print-file-name=nano.specs 2>/dev/null)" || return 1
  case "$specs" in /*) [ -f "$specs" ] ;; *) return 1 ;; esac
}

have_all() {
  command -v arm-none-eabi-gcc >/dev/null 2>&1 &&
    command -v arm-none-eabi-size >/dev/null 2>&1 &&
    command -v qemu-system-arm >/dev/null 2>&1 &&
    have_newlib
}

if ! have_all; then
  bash "$(dirname "$0")/apt-install.sh" "the Arm toolchain" gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm
fi
have_all || { echo "edgeloop: arm-none-eabi-gcc, newlib or qemu-system-arm still missing after the install" >&2; exit 1; }
