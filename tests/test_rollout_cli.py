"""``edgeloop rollout status --watch`` and the promotion gate on ``rollout start``
(fleet/cli_rollout.py), on a real workspace and registry (tests/test_rollouts.py's harness)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from edgeloop.cloud.rollouts.controller import RolloutSpec
from edgeloop.fleet.cli import main
from conftest import exited_within, wait_for
from test_rollouts import TIER, answer, fleet, make_unit

URL = "http://127.0.0.1:9/repository"


@pytest.fixture
def unit(tmp_path):
    with make_unit(tmp_path) as u:
        yield u


def _start(u, version: str, *extra: str) -> list[str]:
    return ["rollout", "start", version, "--target", f"tier={TIER}", "--repository-url", URL,
            "-w", str(u.ws.root), *extra]


@pytest.mark.parametrize("record, verdict", [
    (("evaluate", {"candidate": "m:2", "passed": False, "reason": "m:2 scores 0.8100, below production"}), "failed"),
    (("train", {"model_version": "m:2", "run_id": "r"}), "skipped"),
])
def test_rollout_start_refuses_a_version_that_failed_or_skipped_its_gate_unless_forced(unit, capsys, record, verdict):
    fleet(unit, 2)
    step, output = record
    unit.registry.remember_pipeline_step(f"k-{step}", step, output)     # what a pipeline run records
    assert main(_start(unit, "m:2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"m:2 {verdict} its promotion gate" in err and "--force" in err, err
    assert unit.controller().list() == []                              # nothing started
    assert main(_start(unit, "m:2", "--force", "--json")) == 0
    started = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert started["spec"]["force"] is True and started["total"] == 2   # the override is on record


def test_rollout_start_takes_a_version_that_passed_or_was_never_gated(unit, capsys):
    fleet(unit, 2)
    unit.registry.remember_pipeline_step("k-1", "evaluate", {"candidate": "m:2", "passed": False, "reason": "x"})
    unit.registry.remember_pipeline_step("k-2", "evaluate", {"candidate": "m:2", "passed": True, "reason": None})
    assert main(_start(unit, "m:2", "--json")) == 0                     # its last evaluation passed
    rid = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rollout_id"]
    unit.controller().abort(rid)
    unit.controller().step()
    assert main(_start(unit, "m:1", "--json")) == 0                     # trained by hand: no gate to fail
    capsys.readouterr()


def test_watch_prints_each_change_until_the_rollout_ends(unit, capsys):
    ids = fleet(unit, 3)
    ctl = unit.controller()
    rid = ctl.create(RolloutSpec("m:2", f"tier={TIER}", strategy="waves", wave_size=1, growth=1.0))
    stop = threading.Event()

    def serve() -> None:              # the control plane: step, and the devices answer, one by one
        c = unit.controller()
        while not stop.is_set():
            c.step()
            for d in ids:
                if unit.sent.to(d) and unit.registry.rollout_devices(rid) and \
                        {r["device_id"]: r["state"] for r in unit.registry.rollout_devices(rid)}[d] == "sent":
                    answer(unit, d)
                    break
            stop.wait(0.1)
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        code = main(["rollout", "status", rid, "--watch", "--interval", "0.05", "--json", "-w", str(unit.ws.root)])
    finally:
        stop.set()
        thread.join(10)
    assert code == 0
    lines = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    assert lines[-1]["state"] == "completed" and lines[-1]["counts"]["committed"] == 3
    committed = [ln["counts"]["committed"] for ln in lines]
    assert committed == sorted(committed) and {0, 1, 2, 3} <= set(committed)   # each step seen, in order
    assert all(a != b for a, b in zip(lines, lines[1:]))               # one object per change, no repeats
    # a human watcher gets one line per change; an ended rollout ends the watch at once
    assert main(["rollout", "status", rid, "--watch", "-w", str(unit.ws.root)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and f"rollout {rid}: completed, 3/3 devices done (committed 3" in out[0]


def test_ctrl_c_stops_watching_and_leaves_the_rollout_running(unit):
    fleet(unit, 2)
    rid = unit.controller().create(RolloutSpec("m:2", f"tier={TIER}"))
    proc = subprocess.Popen([sys.executable, "-m", "edgeloop.fleet.cli", "rollout", "status", rid, "--watch",
                             "--interval", "0.1", "-w", str(unit.ws.root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()                 # it is watching
        assert f"rollout {rid}: pending" in first, first + proc.stderr.read()
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = exited_within(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.strip().splitlines() == [f"edgeloop: stopped watching; rollout {rid} is still pending and carries on "
                                        f"(stop it with: edgeloop rollout abort {rid})"]
    assert unit.controller().status(rid)["state"] == "pending"       # untouched
    wait_for(lambda: proc.poll() is not None, 5, "the watcher to exit")
