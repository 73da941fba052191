"""Host build of a compiled model: the generated C plus a small harness, compiled with the
host ``gcc -std=c99 -O2 -Wall -Werror``. The harness reads whole input vectors (raw int8)
from stdin until EOF and writes one raw int8 output vector per input to stdout; ``--sizes``
prints the input and output element counts. Tests, the packager and simulated mcu devices
run models through it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from .compiler import CompiledModel
from .errors import UnsupportedByCompiler

__all__ = ["build_host", "run_host", "HARNESS"]

CC = os.environ.get("CC", "gcc")
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Werror")

HARNESS = """/* host harness: raw int8 input vectors on stdin -> raw int8 outputs on stdout */
#include <stdio.h>
#include <string.h>

#include "model.h"

int main(int argc, char **argv) {
  static int8_t input[{P}_INPUT_SIZE], output[{P}_OUTPUT_SIZE];
  if (argc > 1 && strcmp(argv[1], "--sizes") == 0) {
    printf("%d %d %d\\n", {P}_INPUT_SIZE, {P}_OUTPUT_SIZE, {P}_ARENA_BYTES);
    return 0;
  }
  while (fread(input, 1, sizeof input, stdin) == sizeof input) {
    if ({p}_invoke(input, output) != 0) return 2;
    if (fwrite(output, 1, sizeof output, stdout) != sizeof output) return 3;
  }
  return ferror(stdin) ? 1 : 0;
}
"""


def build_host(compiled: CompiledModel, workdir: str | os.PathLike[str]) -> Path:
    """Write the sources and the harness under ``workdir`` and compile them; returns the
    executable. Raises UnsupportedByCompiler with the compiler's first error line if gcc fails."""
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in compiled.files.items():
        (out / name).write_text(text)
    harness = HARNESS.replace("{P}", compiled.prefix.upper()).replace("{p}", compiled.prefix)
    (out / "main.c").write_text(harness)
    exe = out / f"{compiled.prefix}_host"
    cc = shutil.which(CC) or CC
    cmd = [cc, *CFLAGS, "-o", str(exe), "main.c", "model.c", "edgeloop_kernels.c"]
    done = subprocess.run(cmd, cwd=out, capture_output=True, text=True)
    if done.returncode != 0:
        first = next((ln for ln in done.stderr.splitlines() if "error" in ln), done.stderr.strip()[:300])
        raise UnsupportedByCompiler(f"the host C compiler rejected the generated code: {first}")
    return exe


def run_host(exe: str | os.PathLike[str], inputs: np.ndarray) -> np.ndarray:
    """Run the host executable on ``inputs`` (n vectors of the model's input size, any shape
    whose leading axis is n); returns int8 outputs of shape (n, output size)."""
    sizes = subprocess.run([str(exe), "--sizes"], capture_output=True, text=True, check=True).stdout.split()
    n_in, n_out = int(sizes[0]), int(sizes[1])
    x = np.ascontiguousarray(inputs, dtype=np.int8).reshape(-1, n_in)
    done = subprocess.run([str(exe)], input=x.tobytes(), capture_output=True, check=True)
    y = np.frombuffer(done.stdout, dtype=np.int8)
    if y.size != len(x) * n_out:
        raise RuntimeError(f"host model wrote {y.size} bytes for {len(x)} inputs of {n_out} outputs")
    return y.reshape(len(x), n_out)
