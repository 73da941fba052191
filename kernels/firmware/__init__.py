"""Bare-metal Cortex-M4 firmware for C model libraries, run on QEMU's mps2-an386 board.

See README.md: ``build_firmware`` compiles a library that exports
``int edgeloop_model_invoke(const int8_t *input, int8_t *output)`` with the harness into an ELF
and measures its flash and static RAM; ``run_on_qemu`` runs it and returns the outputs, the
stack peak measured by painting and the instructions of each invocation.
"""

from edgeloop.kernels.firmware.build import Firmware, FirmwareError, QemuRun, build_firmware, run_on_qemu

__all__ = ["Firmware", "FirmwareError", "QemuRun", "build_firmware", "run_on_qemu"]
