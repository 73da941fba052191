"""A fast start: ``edgeloop --help``, ``edgeloop status`` and building the parser import none of
the heavy modules (torch, numpy, ONNX, the API server's aiohttp, tuf, paho, Rich, sqlite-utils),
which only the commands that use them load. Checked on ``sys.modules`` in a fresh interpreter,
not by timing (bench/cli_startup.py measures the time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# what made `edgeloop --help` take seconds, and what must stay out of the start-up path
HEAVY = ("torch", "numpy", "onnx", "onnxruntime", "tuf", "securesystemslib", "cryptography", "paho", "aiohttp",
         "rich", "sqlite_utils", "asyncio", "urllib.request", "importlib.metadata",
         "edgeloop.cloud.api.server", "edgeloop.cloud.rollouts.controller", "edgeloop.cloud.release.signing",
         "edgeloop.cloud.loop.closed_loop", "edgeloop.cloud.train", "edgeloop.cloud.package")

PROBE = """
import contextlib, io, json, sys
argv = json.loads(sys.argv[1])
with contextlib.redirect_stdout(io.StringIO()) as out:
    if argv is None:
        from edgeloop.fleet.cli import build_parser
        build_parser()
        code = 0
    else:
        from edgeloop.fleet.cli import main
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
heavy = json.loads(sys.argv[2])
loaded = sorted(m for m in heavy if m in sys.modules)
print(json.dumps({"code": code, "loaded": loaded, "out": out.getvalue()}))
"""


def imported(argv: list[str] | None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("EDGELOOP_WORKSPACE", None)
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_building_the_parser_imports_no_heavy_module():
    assert imported(None)["loaded"] == []


def test_help_imports_no_heavy_module():
    r = imported(["--help"])
    assert r["code"] == 0 and "usage: edgeloop" in r["out"]
    assert r["loaded"] == []


@pytest.mark.parametrize("command", ["rollout", "tokens", "keys", "pipeline", "swarm", "package"])
def test_a_command_help_imports_no_heavy_module(command):
    r = imported([command, "--help"])
    assert r["code"] == 0 and f"usage: edgeloop {command}" in r["out"]
    assert r["loaded"] == []


def test_status_of_a_fresh_workspace_imports_no_heavy_module(tmp_path):
    ws = str(tmp_path / "ws")
    assert imported(["init", "-w", ws])["code"] == 0
    r = imported(["status", "-w", ws])
    assert r["code"] == 0 and "devices: 0" in r["out"]
    assert r["loaded"] == []


def test_a_command_that_needs_a_heavy_module_still_gets_it(tmp_path):
    """The probe can fail: a command that does use the API server's code loads it."""
    ws = str(tmp_path / "ws")
    assert imported(["init", "-w", ws])["code"] == 0
    r = imported(["tokens", "ls", "-w", ws])
    assert r["code"] == 0 and "edgeloop.cloud.api.server" in r["loaded"]


def test_the_version_is_read_only_when_asked_for():
    from importlib.metadata import version
    r = imported(["--version"])
    assert r["code"] == 0 and r["out"].strip() == f"edgeloop {version('edgeloop')}"
    assert r["loaded"] == ["importlib.metadata"]


def test_the_startup_benchmark_prints_its_json_line():
    env = {**os.environ}
    env.pop("EDGELOOP_WORKSPACE", None)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "cli_startup.py"), "--runs", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert {"help_s", "status_s", "python_s"} <= set(result)
    assert all(result[k] > 0 for k in ("help_s", "status_s", "python_s"))
