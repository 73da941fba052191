"""The smallest arena TensorFlow Lite Micro runs a model in, found by search in a child process.

TFLM's own report (``print_allocations``) can be up to 30% below the arena it needs, and just
below the true minimum its interpreter can crash the process instead of raising. So the search
runs in a child (``python -m edgeloop.cloud.package.tflm_arena MODEL LO HI``), which bisects the arena size and
prints a line per probe::

    try N      before building an interpreter in an arena of N bytes
    ok N       it allocated, and one invoke on a zero input ran
    fail N     TFLM raised (too small)

The parent (:func:`min_arena_bytes`) reads those lines; a child that dies after ``try N`` marks
N as too small, and a new child carries on with the narrowed range. The result is the smallest
N for which ``ok N`` was printed, with N - 1 failed or crashed: every figure reported was run,
never estimated. Success is taken to be monotone in the arena size (a larger arena only adds
free space), which the bisection assumes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["min_arena_bytes", "ArenaSearchError"]

MAX_RESTARTS = 40


class ArenaSearchError(RuntimeError):
    """The search could not run the model in any arena up to the upper bound."""


Runner = Callable[[Path, int, int, bool, float], tuple[list[str], bool]]


def min_arena_bytes(model: bytes, hi: int, lo: int = 0, timeout_s: float = 120.0,
                    runner: Runner | None = None) -> int:
    """The smallest arena (bytes) in ``(lo, hi]`` that TFLM allocates and invokes ``model`` in.
    ``lo`` must be a size known to fail (0 is). Raises ArenaSearchError if even ``hi`` fails.
    ``runner`` runs one child (default: :func:`_run_child`); it returns the child's protocol
    lines and whether it died."""
    runner = runner or _run_child
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(bytes(model))
        good: int | None = None
        for _ in range(MAX_RESTARTS):
            top = good if good is not None else hi
            if top - lo <= 1 and good is not None:
                return good
            lines, crashed = runner(path, lo, top, good is None, timeout_s)
            pending = None
            for line in lines:
                word, _, value = line.partition(" ")
                if word not in ("try", "ok", "fail") or not value.isdigit():
                    continue
                n = int(value)
                if word == "try":
                    pending = n
                elif word == "ok":
                    good = n if good is None else min(good, n)
                    pending = None
                else:
                    lo = max(lo, n)
                    pending = None
            if pending is not None and crashed:
                lo = max(lo, pending)          # it died inside the probe: too small
            if good is None and lo >= hi:
                raise ArenaSearchError(f"TFLite Micro cannot run this model in an arena of {hi} bytes")
            if not crashed and good is not None and good - lo <= 1:
                return good
        raise ArenaSearchError("the arena search did not settle (the TFLM child kept crashing)")


def _run_child(path: Path, lo: int, hi: int, probe_top: bool, timeout_s: float) -> tuple[list[str], bool]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                         os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-m", "edgeloop.cloud.package.tflm_arena", str(path), str(lo), str(hi),
                               "1" if probe_top else "0"], capture_output=True, text=True, timeout=timeout_s,
                              env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return out.splitlines(), True
    return proc.stdout.splitlines(), proc.returncode != 0


def _probe(model: bytes, n: int) -> bool:
    import numpy as np
    from tflite_micro.python.tflite_micro import runtime as tflm

    try:
        interpreter = tflm.Interpreter.from_bytes(model, arena_size=n)
        details = interpreter.get_input_details(0)
        interpreter.set_input(np.zeros(details["shape"], dtype=details["dtype"]), 0)
        interpreter.invoke()
        return True
    except (RuntimeError, ValueError):
        return False


def _child(path: str, lo: int, hi: int, probe_top: bool) -> int:
    """Bisect (lo, hi]: lo fails, hi runs (probed first when ``probe_top``)."""
    model = Path(path).read_bytes()
    devnull = os.open(os.devnull, os.O_WRONLY)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(devnull, 1)                 # TFLM's own messages go nowhere; the protocol goes to `out`
    os.dup2(devnull, 2)

    def probe(n: int) -> bool:
        out.write(f"try {n}\n")
        out.flush()
        ok = _probe(model, n)
        out.write(f"{'ok' if ok else 'fail'} {n}\n")
        out.flush()
        return ok

    if probe_top and not probe(hi):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            hi = mid
        else:
            lo = mid
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"))
