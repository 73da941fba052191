"""edgeloop.kernels.firmware: C libraries built for a Cortex-M4 and run on QEMU's mps2-an386, with measured
flash, RAM, stack and instructions. Stand-in libraries follow the AOT compiler's entry point,
``int edgeloop_model_invoke(const int8_t *input, int8_t *output)``.

Needs arm-none-eabi-gcc, newlib and qemu-system-arm: `make test` installs them through
scripts/ensure-arm-toolchain.sh; without them these tests fail (they are never skipped)."""

from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest

from edgeloop.kernels.firmware import FirmwareError, build_firmware, run_on_qemu

TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "arm-none-eabi-nm", "qemu-system-arm")


@pytest.fixture(autouse=True)
def _toolchain() -> None:
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `bash scripts/ensure-arm-toolchain.sh` "
                    "(or `make test`, which runs it)", pytrace=False)


N = 32
HEADER = f"""#ifndef MODEL_H
#define MODEL_H
#include <stdint.h>
#define EDGELOOP_INPUT_SIZE {N}
#define EDGELOOP_OUTPUT_SIZE {N}
int edgeloop_model_invoke(const int8_t *input, int8_t *output);
#endif
"""

CLAMP = """#include "model.h"
static int8_t clamp8(int32_t v) { return (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v); }
int edgeloop_model_invoke(const int8_t *input, int8_t *output)
{
    for (int i = 0; i < EDGELOOP_INPUT_SIZE; i++) output[i] = clamp8(input[i] * 3 - 7);
    return 0;
}
"""

# Float arithmetic, so the hard-float build must have the FPU enabled by the reset handler.
FLOAT = """#include "model.h"
int edgeloop_model_invoke(const int8_t *input, int8_t *output)
{
    for (int i = 0; i < EDGELOOP_INPUT_SIZE; i++) {
        float v = (float)input[i] * 1.5f - 0.25f;
        int32_t q = (int32_t)v;
        output[i] = (int8_t)(q < -128 ? -128 : q > 127 ? 127 : q);
    }
    return 0;
}
"""

# 2 KiB of scratch on the stack, every byte written and read back, so it cannot be optimised away.
BIG_STACK = """#include "model.h"
#define SCRATCH 2048
int edgeloop_model_invoke(const int8_t *input, int8_t *output)
{
    volatile int8_t scratch[SCRATCH];
    for (int i = 0; i < SCRATCH; i++) scratch[i] = (int8_t)(input[i % EDGELOOP_INPUT_SIZE] + i);
    for (int i = 0; i < EDGELOOP_OUTPUT_SIZE; i++) {
        int32_t acc = 0;
        for (int k = i; k < SCRATCH; k += EDGELOOP_OUTPUT_SIZE) acc += scratch[k];
        output[i] = (int8_t)(acc & 0x7f);
    }
    return 0;
}
"""


def vectors(n: int = 6) -> np.ndarray:
    x = np.random.default_rng(7).integers(-128, 128, size=(max(n, 4), N)).astype(np.int8)
    x[0] = 0
    x[1] = np.int8(-128)
    x[2] = np.int8(127)
    x[3, :8] = np.array([-1, 1, 2, 3, 44, 45, -40, -41], dtype=np.int8)   # around the clamp edges
    return x[:n]


def clamp_ref(x: np.ndarray) -> np.ndarray:
    return np.clip(x.astype(np.int32) * 3 - 7, -128, 127).astype(np.int8)


def float_ref(x: np.ndarray) -> np.ndarray:
    v = x.astype(np.float32) * np.float32(1.5) - np.float32(0.25)
    return np.clip(np.trunc(v).astype(np.int32), -128, 127).astype(np.int8)


def big_stack_ref(x: np.ndarray) -> np.ndarray:
    i = np.arange(2048)
    scratch = (x[:, i % N].astype(np.int32) + i).astype(np.int8).astype(np.int32)
    acc = scratch.reshape(x.shape[0], 2048 // N, N).sum(axis=1)
    return (acc & 0x7F).astype(np.int8)


def berkeley_size(elf) -> tuple[int, int, int]:
    out = subprocess.run(["arm-none-eabi-size", str(elf)], capture_output=True, text=True, check=True).stdout
    text, data, bss = (int(v) for v in out.splitlines()[1].split()[:3])
    return text, data, bss


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


@pytest.mark.parametrize("float_abi", ["soft", "hard"])
def test_clamp_library_runs_and_is_measured(tmp_path, float_abi):
    x = vectors()
    fw = build_firmware({"model.c": CLAMP, "model.h": HEADER}, x, N, tmp_path, float_abi=float_abi)
    run = run_on_qemu(fw, timeout_s=30)
    np.testing.assert_array_equal(run.outputs, clamp_ref(x))
    assert run.return_codes == (0,) * len(x)

    # Sizes: positive, and the same figures arm-none-eabi-size gives (Berkeley format: text holds
    # .text + .rodata, bss holds .bss + the reserved .stack).
    assert fw.text > 0 and fw.rodata > 0 and fw.bss > 0 and fw.data >= 0
    b_text, b_data, b_bss = berkeley_size(fw.elf)
    assert fw.text + fw.rodata == b_text
    assert fw.data == b_data
    assert fw.bss + fw.stack_reserved == b_bss and fw.stack_reserved == 64 * 1024
    assert fw.flash == b_text + b_data
    assert fw.static_ram == fw.data + fw.bss
    # The library's share, from the linker map: its code is there, it has no static RAM, and the
    # parts add up to the whole but for alignment fill.
    lib = fw.by_origin["library"]
    assert 0 < lib["text"] < 400 and lib["static_ram"] == 0
    assert fw.by_origin["runtime"]["flash"] == 0       # the harness pulls nothing from newlib
    parts = sum(o["flash"] for o in fw.by_origin.values())
    assert fw.flash - 64 <= parts <= fw.flash
    assert fw.by_origin["harness"]["rodata"] >= x.size         # the input vectors live in flash

    # Stack: a leaf loop needs a few words; RAM peak is static RAM plus the measured stack.
    assert 0 < run.stack_library_bytes <= 128
    assert run.stack_library_bytes <= run.stack_bytes <= 512
    assert run.ram_peak == fw.data + fw.bss + run.stack_bytes
    assert run.wall_s > 0

    if shutil.which("cc") or shutil.which("gcc"):
        assert run.instructions_per_invocation is not None, run.instructions_note
        # ~32 elements at a handful of instructions each
        assert all(4 * N <= n <= 40 * N for n in run.instructions_per_invocation)
        assert run.instructions == round(np.mean(run.instructions_per_invocation))
        again = run_on_qemu(fw, timeout_s=30)                    # deterministic from run to run
        assert again.instructions_per_invocation == run.instructions_per_invocation
    else:
        assert run.instructions is None and run.instructions_note


@pytest.mark.parametrize("float_abi", ["soft", "hard"])
def test_float_library_matches_under_both_abis(tmp_path, float_abi):
    x = vectors(4)
    fw = build_firmware({"model.c": FLOAT, "model.h": HEADER}, x, N, tmp_path, float_abi=float_abi)
    run = run_on_qemu(fw, timeout_s=30)
    np.testing.assert_array_equal(run.outputs, float_ref(x))
    if float_abi == "soft":   # soft float links the libgcc float routines; hard float needs none
        assert fw.by_origin["runtime"]["text"] > 0


def test_big_stack_is_measured(tmp_path):
    x = vectors(3)
    small = run_on_qemu(build_firmware({"model.c": CLAMP, "model.h": HEADER}, x, N, tmp_path / "small"))
    fw = build_firmware({"model.c": BIG_STACK, "model.h": HEADER}, x, N, tmp_path / "big")
    run = run_on_qemu(fw, timeout_s=30)
    np.testing.assert_array_equal(run.outputs, big_stack_ref(x))
    assert 2048 <= run.stack_library_bytes <= 2048 + 256
    assert run.stack_bytes >= run.stack_library_bytes
    assert run.ram_peak == fw.static_ram + run.stack_bytes >= fw.static_ram + 2048
    assert small.stack_library_bytes < 256 < 2048 <= run.stack_library_bytes


def test_stack_overflow_is_reported(tmp_path):
    x = vectors(1)
    fw = build_firmware({"model.c": BIG_STACK, "model.h": HEADER}, x, N, tmp_path, stack_size=1024)
    with pytest.raises(FirmwareError) as err:
        run_on_qemu(fw, timeout_s=30)
    assert "stack" in one_line(err)


def test_compile_error_is_one_line(tmp_path):
    bad = CLAMP.replace("return 0;", "return undeclared_thing;")
    with pytest.raises(FirmwareError) as err:
        build_firmware({"model.c": bad, "model.h": HEADER}, vectors(1), N, tmp_path)
    msg = one_line(err)
    assert "compile failed (model.c)" in msg and "undeclared_thing" in msg


def test_missing_entry_point_is_a_link_error(tmp_path):
    with pytest.raises(FirmwareError) as err:
        build_firmware({"model.c": "int not_the_entry_point(void) { return 0; }\n"}, vectors(1), N, tmp_path)
    msg = one_line(err)
    assert "link failed" in msg and "edgeloop_model_invoke" in msg


def test_library_that_never_returns_times_out(tmp_path):
    forever = """#include "model.h"
int edgeloop_model_invoke(const int8_t *input, int8_t *output)
{
    volatile int spin = 1;
    while (spin) { }
    output[0] = input[0];
    return 0;
}
"""
    fw = build_firmware({"model.c": forever, "model.h": HEADER}, vectors(1), N, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(FirmwareError) as err:
        run_on_qemu(fw, timeout_s=2)
    assert time.monotonic() - t0 < 15
    assert "timed out after 2 s" in one_line(err)


def test_fault_names_the_function(tmp_path):
    crash = """#include "model.h"
int edgeloop_model_invoke(const int8_t *input, int8_t *output)
{
    output[0] = input[0];
    __asm__ volatile("udf #0");
    return 0;
}
"""
    fw = build_firmware({"model.c": crash, "model.h": HEADER}, vectors(1), N, tmp_path)
    with pytest.raises(FirmwareError) as err:
        run_on_qemu(fw, timeout_s=30)
    msg = one_line(err)
    assert "HardFault" in msg and "edgeloop_model_invoke" in msg


def test_nonzero_return_code_is_an_error(tmp_path):
    fails = CLAMP.replace("return 0;", "return input[0] == 0 ? 0 : 3;")
    fw = build_firmware({"model.c": fails, "model.h": HEADER}, vectors(2), N, tmp_path)
    with pytest.raises(FirmwareError) as err:
        run_on_qemu(fw, timeout_s=30)
    assert "returned 3 on vector 1" in one_line(err)


def test_missing_toolchain_names_the_install_script(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FirmwareError) as err:
        build_firmware({"model.c": CLAMP, "model.h": HEADER}, vectors(1), N, tmp_path)
    assert "bash scripts/ensure-arm-toolchain.sh" in one_line(err)


def test_a_plugin_qemu_refuses_leaves_instructions_none(tmp_path, monkeypatch):
    import edgeloop.kernels.firmware.build as build

    bogus = tmp_path / "not-a-plugin.so"
    bogus.write_text("not an ELF")
    monkeypatch.setattr(build, "_plugin_path", lambda: (bogus, ""))
    x = vectors(2)
    fw = build_firmware({"model.c": CLAMP, "model.h": HEADER}, x, N, tmp_path / "fw")
    run = run_on_qemu(fw, timeout_s=30)
    np.testing.assert_array_equal(run.outputs, clamp_ref(x))
    assert run.instructions is None and "refused" in run.instructions_note
