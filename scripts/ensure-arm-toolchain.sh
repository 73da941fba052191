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
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "edgeloop: no apt-get here: install arm-none-eabi-gcc, newlib for it and qemu-system-arm by hand" >&2
    exit 1
  fi
  echo "edgeloop: installing the Arm toolchain (Debian packages gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm >/dev/null
fi
have_all || { echo "edgeloop: arm-none-eabi-gcc, newlib or qemu-system-arm still missing after the install" >&2; exit 1; }
