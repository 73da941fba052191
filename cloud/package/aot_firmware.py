"""The mcu tier's ahead-of-time C library, proven where it will run.

:func:`prove_on_cortex_m4` compiles an int8 ``.tflite`` to C99 (``kernels/aot``), builds it
into bare-metal firmware for QEMU's Cortex-M4 board ``mps2-an386`` (``kernels/firmware``),
runs it on the given int8 input vectors and holds its outputs to TFLite Micro's, bit for bit.
Its memory figures come from that firmware, not from estimates:

- ``aot_flash_bytes``: the library's load image (text + rodata + data), with what it pulls from
  the C runtime (memcpy, ...); the test harness and the input vectors are not counted;
- ``aot_ram_bytes``: the library's static RAM (data + bss: the planned arena lives there) plus
  the stack it used below the call, measured by painting.

A model the compiler does not take, or whose firmware output differs from TFLM's, is refused
with one line (:class:`AotRefused`); the packager then ships the package for TFLM alone and
says why (``measured.aot_refused``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeloop.cloud.errors import UserError

__all__ = ["AotProof", "AotRefused", "prove_on_cortex_m4", "tflm_int8_outputs", "PACKAGE_PREFIX"]

PACKAGE_PREFIX = "aot-"     # bundle member names are flat: aot-model.c, aot-edgeloop_kernels.h, ...


class AotRefused(UserError):
    """The AOT library cannot stand in for TFLM on this model (the reason is the message)."""


@dataclass(frozen=True)
class AotProof:
    files: dict[str, bytes]                  # bundle members (aot-*.c/.h)
    layout: dict[str, str]                   # manifest.layout["aot"]: source name -> member
    measured: dict[str, Any] = field(default_factory=dict)


def tflm_int8_outputs(model: bytes, inputs: np.ndarray) -> np.ndarray:
    """TFLM's raw int8 outputs for raw int8 input vectors (n, input size)."""
    from tflite_micro.python.tflite_micro import runtime as tflm

    from edgeloop.cloud.package.tier_packagers import TFLM_MEASURE_ARENA

    interpreter = tflm.Interpreter.from_bytes(bytes(model), arena_size=max(len(model) * 10, TFLM_MEASURE_ARENA))
    shape = tuple(interpreter.get_input_details(0)["shape"])
    rows = []
    for x in np.asarray(inputs, dtype=np.int8):
        interpreter.set_input(x.reshape(shape), 0)
        interpreter.invoke()
        rows.append(np.asarray(interpreter.get_output(0)).reshape(-1).copy())
    return np.stack(rows)


def prove_on_cortex_m4(model: bytes, inputs: np.ndarray, timeout_s: float = 120.0) -> AotProof:
    """Compile, build, run on the emulated Cortex-M4 and compare with TFLM (module text).
    ``inputs``: raw int8 vectors (n, input size). Raises AotRefused."""
    from edgeloop.kernels.aot import UnsupportedByCompiler, compile_tflite
    from edgeloop.kernels.firmware import FirmwareError, build_firmware, run_on_qemu

    inputs = np.asarray(inputs, dtype=np.int8).reshape(len(inputs), -1)
    try:
        compiled = compile_tflite(bytes(model))
    except UnsupportedByCompiler as e:
        raise AotRefused(f"the AOT compiler does not take this model: {e}") from None
    want = tflm_int8_outputs(model, inputs)
    with tempfile.TemporaryDirectory(prefix="edgeloop-aot-") as tmp:
        try:
            fw = build_firmware(compiled.files, inputs, compiled.output_size, Path(tmp))
            run = run_on_qemu(fw, timeout_s=timeout_s)
        except FirmwareError as e:
            raise AotRefused(f"the AOT firmware did not run on the emulated Cortex-M4: {e}") from None
    got = np.asarray(run.outputs, dtype=np.int8).reshape(want.shape)
    if not np.array_equal(got, want):
        worst = int(np.max(np.abs(got.astype(np.int16) - want.astype(np.int16))))
        raise AotRefused(f"the AOT firmware's outputs differ from TFLM's by up to {worst} LSB on "
                         f"{int(np.any(got != want, axis=1).sum())} of {len(want)} vectors")
    lib, rt = fw.by_origin["library"], fw.by_origin["runtime"]
    measured = {
        "aot_flash_bytes": lib["flash"] + rt["flash"],
        "aot_ram_bytes": lib["static_ram"] + rt["static_ram"] + run.stack_library_bytes,
        "aot_arena_bytes": compiled.arena_bytes, "aot_arena_bytes_no_inplace": compiled.arena_bytes_no_inplace,
        "aot_stack_bytes": run.stack_library_bytes, "aot_const_bytes": compiled.const_bytes,
        "aot_instructions": run.instructions, "aot_bitexact_tflm": True, "aot_vectors_checked": int(len(want)),
        "aot_board": "qemu mps2-an386 (Cortex-M4)",
    }
    files = {PACKAGE_PREFIX + name: text.encode() for name, text in compiled.files.items()}
    layout = {name: PACKAGE_PREFIX + name for name in compiled.files}
    layout["prefix"] = compiled.prefix
    return AotProof(files, layout, measured)
