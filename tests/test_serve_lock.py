"""One control plane per workspace: a second ``edgeloop serve`` is refused with one line naming
the first, the first's serve.json stays (and ``publish`` still finds it), and a serve.json left
by a serve killed with kill -9 is recognised as stale and replaced by the next serve."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli, wait_for
from edgeloop.cloud.errors import AlreadyServing, ServiceUnavailable, UserError
from edgeloop.fleet._serve_lock import LOCK_FILE, SERVE_FILE, ServeLock, serving, serving_url

REPO = Path(__file__).resolve().parent.parent


# -- the lock itself ---------------------------------------------------------------------------------
def test_a_second_lock_is_refused_naming_the_first_and_leaves_its_file(tmp_path):
    first = ServeLock(tmp_path).acquire()
    first.publish("http://127.0.0.1:1/repository", "http://127.0.0.1:2", "fleet-a")
    before = (tmp_path / SERVE_FILE).read_bytes()
    with pytest.raises(AlreadyServing) as refused:
        with ServeLock(tmp_path).acquire(wait_s=0.1):
            pass
    message = str(refused.value)
    assert refused.value.exit_code == 2
    for needle in (f"pid {os.getpid()}", "API http://127.0.0.1:2", "repository http://127.0.0.1:1/repository",
                   "started 20"):
        assert needle in message, message
    assert (tmp_path / SERVE_FILE).read_bytes() == before        # the refused one removed nothing
    assert serving_url(tmp_path) == "http://127.0.0.1:1/repository"
    first.release()
    assert not (tmp_path / SERVE_FILE).exists()                   # the owner removes its own file
    with pytest.raises(UserError, match="no control plane is serving"):
        serving(tmp_path)
    ServeLock(tmp_path).acquire().release()                       # free again


def test_a_lock_taken_but_not_yet_published_reads_as_starting(tmp_path):
    with ServeLock(tmp_path):
        with pytest.raises(ServiceUnavailable, match="starting"):
            serving(tmp_path)
        with pytest.raises(AlreadyServing, match="still starting"):
            ServeLock(tmp_path).acquire(wait_s=0.1)


HOLDER = """
import sys, time
from pathlib import Path
from edgeloop.fleet._serve_lock import ServeLock
lock = ServeLock(Path(sys.argv[1])).acquire()
lock.publish("http://127.0.0.1:9/repository", "http://127.0.0.1:8", "fleet-x")
print("published", flush=True)
time.sleep(600)
"""


def test_a_serve_json_left_by_kill_9_is_stale_and_replaced(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "published"
        assert serving(tmp_path).pid == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert json.loads((tmp_path / SERVE_FILE).read_text())["pid"] == proc.pid     # left behind
    with pytest.raises(UserError, match=rf"stale \(pid {proc.pid}; that serve is gone\).*edgeloop serve"):
        serving(tmp_path)
    with ServeLock(tmp_path) as lock:
        assert lock.replaced is not None and lock.replaced.pid == proc.pid
        assert not (tmp_path / SERVE_FILE).exists()               # no stale URL while this one starts
        lock.publish("http://127.0.0.1:7/repository", None, None)
        assert serving(tmp_path).pid == os.getpid()


# -- two real `edgeloop serve` processes -------------------------------------------------------------------
def _serve(ws: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeloop.fleet.cli", "serve", "-w", str(ws), "--duration", "120"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _started(ws: Path, proc: subprocess.Popen, log: Path) -> dict:
    def up() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return json.loads((ws / SERVE_FILE).read_text())["pid"] == proc.pid
        except (OSError, ValueError, KeyError):
            return False
    wait_for(up, 60, "serve to start", interval=0.1)
    return json.loads((ws / SERVE_FILE).read_text())


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_two_serves_on_one_workspace_the_second_is_refused_and_the_first_stays_visible(broker, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert run_cli(["init", "-w", str(ws), "--mqtt", broker.address], capsys)[0] == 0
    first = _serve(ws, tmp_path / "first.log")
    try:
        info = _started(ws, first, tmp_path / "first.log")
        digest = hashlib.sha256((ws / SERVE_FILE).read_bytes()).hexdigest()
        second = subprocess.run([sys.executable, "-m", "edgeloop.fleet.cli", "serve", "-w", str(ws), "--duration", "60"],
                                capture_output=True, text=True, cwd=REPO, timeout=60,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        for needle in ("another edgeloop serve", f"pid {first.pid}", f"API {info['api_url']}",
                       f"repository {info['repository_url']}", "started "):
            assert needle in lines[0], lines[0]
        assert first.poll() is None
        assert hashlib.sha256((ws / SERVE_FILE).read_bytes()).hexdigest() == digest     # the first's file, intact
        # publish still finds the first (it fails later, on the model version no one trained)
        code, _, err = run_cli(["publish", "digits-mlp:1", "-w", str(ws)], capsys)
        assert code == 2 and "no edge-gateway package for digits-mlp:1" in err and "no control plane" not in err, err
        with urllib.request.urlopen(info["repository_url"].rstrip("/") + "/metadata/1.root.json", timeout=10) as r:
            assert r.status == 200                             # and it still serves
    finally:
        _stop(first)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert not (ws / SERVE_FILE).exists()                    # removed by its owner on the way out
    assert (ws / LOCK_FILE).exists()                         # the lock file stays: never removed


def test_serve_killed_with_kill_9_leaves_a_stale_file_the_next_serve_replaces(broker, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert run_cli(["init", "-w", str(ws), "--mqtt", broker.address], capsys)[0] == 0
    killed = _serve(ws, tmp_path / "killed.log")
    try:
        _started(ws, killed, tmp_path / "killed.log")
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    finally:
        killed.kill()
    assert json.loads((ws / SERVE_FILE).read_text())["pid"] == killed.pid
    code, _, err = run_cli(["publish", "digits-mlp:1", "-w", str(ws)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "no control plane is serving" in lines[0] and "stale" in lines[0] \
        and f"pid {killed.pid}" in lines[0], err
    code, _, err = run_cli(["rollout", "start", "digits-mlp:1", "--target", "tier=edge-gateway", "-w", str(ws)], capsys)
    assert code == 2 and "stale" in err, err                 # every reader of serve.json says the same
    log = tmp_path / "next.log"
    after = _serve(ws, log)
    try:
        info = _started(ws, after, log)
        assert info["pid"] == after.pid
        wait_for(lambda: "replaced a stale serve.json" in log.read_text(), 10, "serve to say it replaced the file")
        assert f"pid {killed.pid}" in log.read_text()
    finally:
        _stop(after)
    assert after.returncode == 0, log.read_text()[-2000:]


@pytest.mark.parametrize("extra", [[], ["--loop"]])
def test_a_demo_on_a_workspace_another_control_plane_serves_is_refused(tmp_path, capsys, extra):
    """demo and demo --loop run a control plane too: the same lock, refused before anything runs."""
    ws = tmp_path / "ws"
    assert run_cli(["init", "-w", str(ws)], capsys)[0] == 0
    held = ServeLock(ws).acquire()
    held.publish("http://127.0.0.1:1/repository", "http://127.0.0.1:2", "fleet-a")
    try:
        before = sorted(p.name for p in ws.iterdir())
        code, _, err = run_cli(["demo", "-w", str(ws), "--devices", "1", *extra], capsys)
        assert code == 2 and "another edgeloop serve is serving" in err and len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in ws.iterdir()) == before          # nothing trained, nothing written
    finally:
        held.release()
