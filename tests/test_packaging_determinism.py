"""Packaging is deterministic: the same model version packaged again for the same tier gives
the same bytes (same sha256), in this process and in another one with another hash seed and
thread count; what is timed on the packaging host is reported, never written into the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeloop.contracts.package import read_package
from edgeloop.cloud.package.packaging import TIMING_KEYS
from edgeloop.cloud.loop.pipeline import package_model, train_model
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.train.training import TrainParams
from edgeloop.cloud.workspace import Workspace

TIERS = ("gpu-server", "edge-gateway", "mobile", "mcu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ws = Workspace.init(tmp_path_factory.mktemp("determinism") / "ws")
    registry = Registry(ws.registry_path)
    mv = train_model(ws, registry, TrainParams(epochs=1))["model_version"]
    yield ws, registry, mv
    registry.close()


@pytest.mark.parametrize("tier", TIERS)
def test_packaging_a_version_twice_gives_the_same_bytes(trained, tier):
    ws, registry, mv = trained
    first = package_model(ws, registry, mv, tier)
    second = package_model(ws, registry, mv, tier)
    assert second.sha256 == first.sha256 and second.data == first.data
    assert second.target_path == first.target_path == f"{mv.replace(':', '/')}/{tier}.elpkg"
    measured = read_package(first.data).manifest.measured
    assert not set(TIMING_KEYS) & set(measured)                 # host timings stay out of the bytes
    assert set(TIMING_KEYS) <= set(first.timings)               # and are still reported
    assert [p["sha256"] for p in registry.packages_of(mv) if p["tier"] == tier] == [first.sha256]


def test_another_process_with_another_hash_seed_and_one_thread_packages_the_same_bytes(trained):
    ws, registry, mv = trained
    here = {tier: package_model(ws, registry, mv, tier).sha256 for tier in TIERS}
    script = ("import json, sys\nfrom edgeloop.cloud.loop.pipeline import package_model\nfrom edgeloop.cloud.registry import Registry\n"
              "from edgeloop.cloud.workspace import Workspace\nws = Workspace.open(sys.argv[1])\nr = Registry(ws.registry_path)\n"
              "print(json.dumps({t: package_model(ws, r, sys.argv[2], t).sha256 for t in sys.argv[3:]}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(ws.root), mv, *TIERS], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == here


def test_cli_package_still_reports_the_host_timings(trained, capsys):
    from edgeloop.fleet.cli import main

    ws, _, mv = trained
    assert main(["package", mv, "--tier", "edge-gateway", "--report", "--json", "-w", str(ws.root)]) == 0
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["packages"]
    assert row["host_p50_ms"] > 0 and row["device_latency_ms"] > 0
