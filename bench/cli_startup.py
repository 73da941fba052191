"""How fast the command line starts: ``edgeloop --help`` and ``edgeloop status -w WS``.

Each is run ``--runs`` times (default 10) as a fresh process, the ``edgeloop`` console script
beside this interpreter (``python -m edgeloop.fleet.cli`` where there is none), on a workspace
made with ``edgeloop init`` in a temporary folder; the figure is the median wall time. For
reference, ``python_s`` is the median of a bare ``python -c pass`` with the same interpreter:
the part of the start no edgeloop change can remove. The checkout this script is in is what gets
measured (it goes first on PYTHONPATH). Issue 14 asks for at most 0.3 s for both commands.

Prints one JSON object as its last line: ``{"help_s": ..., "status_s": ..., "python_s": ...}``,
with beside them the median CPU seconds of each (``help_cpu_s``, ...: on a shared machine the
wall times grow with the load, the CPU times much less), the 1-minute load average and the run
count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def edgeloop_command() -> list[str]:
    script = Path(sys.executable).with_name("edgeloop")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "edgeloop.fleet.cli"]


def median_s(argv: list[str], runs: int, env: dict[str, str]) -> tuple[float, float]:
    """Median wall time and median CPU time (user + system) of ``runs`` fresh runs of ``argv``;
    the CPU time hardly moves with the machine's load, the wall time does."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        began = time.perf_counter()
        proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        walls.append(time.perf_counter() - began)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return round(statistics.median(walls), 3), round(statistics.median(cpus), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="runs of each command (default 10)")
    opts = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("EDGELOOP_WORKSPACE", None)
    cli = edgeloop_command()
    with tempfile.TemporaryDirectory(prefix="cli-startup-") as tmp:
        ws = str(Path(tmp) / "ws")
        subprocess.run([*cli, "init", "-w", ws], env=env, check=True, stdout=subprocess.DEVNULL, timeout=120)
        median_s([*cli, "--help"], 1, env)          # a first run warms the disk cache, not measured
        result: dict[str, float] = {}
        for name, argv in (("help", [*cli, "--help"]), ("status", [*cli, "status", "-w", ws]),
                           ("python", [sys.executable, "-c", "pass"])):
            result[f"{name}_s"], result[f"{name}_cpu_s"] = median_s(argv, opts.runs, env)
    print(f"{' '.join(cli)}: --help {result['help_s']} s, status {result['status_s']} s "
          f"(bare python {result['python_s']} s), median of {opts.runs}", file=sys.stderr)
    print(json.dumps({**result, "runs": opts.runs, "load_avg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
