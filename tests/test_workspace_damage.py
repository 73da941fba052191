"""A damaged workspace says so: one line on stderr, exit code 4 (2 for an unknown device), and
nothing recreated or changed in its place. Each test damages a workspace the way an operator's
mistake or a crash would (a deleted or truncated registry.db, deleted keys or roots, Ctrl-C or
kill -9 during training, a device whose update this workspace never recorded) and checks both
the refusal and that every file is as it was."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import exited_within, run_cli, wait_for
from edgeloop.cloud.errors import IntegrityError, KeysMissing, LineageBroken, NotFound, WorkspaceDamaged
from edgeloop.cloud.models import lineage
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.store.readonly import query
from edgeloop.cloud.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
READERS = (["status"], ["models"], ["runs", "ls"], ["devices"], ["data", "ls"])


@pytest.fixture
def ws(tmp_path, capsys, monkeypatch) -> Path:
    monkeypatch.delenv("EDGELOOP_KEY_PASSPHRASE", raising=False)     # the workspace's own passphrase files
    root = tmp_path / "ws"
    code, _, err = run_cli(["init", "-w", str(root)], capsys)
    assert code == 0, err
    return root


def files(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its sha256: the workspace as it is (SQLite's -wal and -shm
    files come and go with connections, and are left out)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def one_line(code: int, err: str, expected_code: int, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == expected_code and len(lines) == 1 and "Traceback" not in err, (code, err)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def refused_everywhere(root: Path, capsys, *needles: str, commands=READERS) -> None:
    before = files(root)
    for argv in commands:
        code, out, err = run_cli([*argv, "-w", str(root)], capsys)
        one_line(code, err, 4, *needles)
        assert files(root) == before, argv                  # nothing created, nothing changed


# -- the registry ------------------------------------------------------------------------------------
def test_deleted_registry_beside_keys_and_repositories_is_refused_not_recreated(ws, capsys):
    (ws / "registry.db").unlink()
    refused_everywhere(ws, capsys, "registry.db is missing", "keys/", "--recreate-registry",
                       commands=(*READERS, ["init"], ["train", "--epochs", "1"], ["lineage", "dev-1"]))
    assert not (ws / "registry.db").exists()


def test_an_empty_registry_file_is_refused_like_a_missing_one(ws, capsys):
    (ws / "registry.db").write_bytes(b"")          # SQLite would take it for a new database
    refused_everywhere(ws, capsys, "registry.db is empty")
    assert (ws / "registry.db").stat().st_size == 0


def test_recreate_registry_starts_an_empty_one_and_keeps_keys_and_repositories(ws, capsys):
    (ws / "registry.db").unlink()
    kept = {k: v for k, v in files(ws).items() if k.startswith(("keys/", "repository/", "director/"))}
    code, out, err = run_cli(["init", "-w", str(ws), "--recreate-registry", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["registry_recreated"] is True
    now = files(ws)
    assert {k: now[k] for k in kept} == kept           # the keys devices trust are the same keys
    assert run_cli(["status", "-w", str(ws)], capsys)[0] == 0
    # asked again, now that a registry exists: refused, nothing replaced
    before = files(ws)
    code, _, err = run_cli(["init", "-w", str(ws), "--recreate-registry"], capsys)
    one_line(code, err, 2, "only replaces a missing one")
    assert files(ws) == before


def test_a_new_workspace_without_data_still_gets_its_registry_on_first_use(tmp_path, capsys):
    ws = Workspace.init(tmp_path / "ws")               # config and empty folders: nothing to lose
    code, _, err = run_cli(["status", "-w", str(ws.root)], capsys)
    assert code == 0, err
    assert ws.registry_path.exists()


def test_garbage_registry_is_refused_with_exit_4(ws, capsys):
    (ws / "registry.db").write_bytes(os.urandom(8192))
    refused_everywhere(ws, capsys, "registry.db is not an SQLite database")


def test_truncated_registry_is_refused_with_exit_4(ws, capsys):
    data = (ws / "registry.db").read_bytes()
    (ws / "registry.db").write_bytes(data[:len(data) // 2])
    refused_everywhere(ws, capsys, "registry.db is truncated")


def test_registry_with_a_garbled_schema_page_is_refused_with_exit_4(ws, capsys):
    data = bytearray((ws / "registry.db").read_bytes())
    data[100:4096] = os.urandom(3996)               # the header is fine, the page after it is not
    (ws / "registry.db").write_bytes(bytes(data))
    refused_everywhere(ws, capsys, "registry.db is corrupt", "malformed")


# -- keys and trusted roots ------------------------------------------------------------------------
def test_missing_director_keys_are_named(ws, capsys):
    for pem in (ws / "keys" / "director").glob("*/*.pem"):
        pem.unlink()
    refused_everywhere(ws, capsys, "missing signing keys", "keys/director/timestamp/ (0 of 1)")
    assert not any((ws / "keys" / "director").glob("*/*.pem"))       # no new keys made up


def test_deleted_keys_folder_is_named(ws, capsys):
    import shutil

    shutil.rmtree(ws / "keys")
    refused_everywhere(ws, capsys, "missing signing keys", "keys/director/root/")
    assert not (ws / "keys").exists()


def test_missing_trusted_root_is_named(ws, capsys):
    (ws / "director" / "metadata" / "1.root.json").unlink()
    refused_everywhere(ws, capsys, "trusted root director/metadata/1.root.json is missing")


def test_missing_passphrase_file_is_named_not_replaced(ws, capsys):
    (ws / "keys" / "image" / ".passphrase").unlink()
    refused_everywhere(ws, capsys, "keys/image/.passphrase is missing", "EDGELOOP_KEY_PASSPHRASE")
    assert not (ws / "keys" / "image" / ".passphrase").exists()      # a new one would decrypt nothing


def test_missing_image_keys_refuse_signing_with_exit_4_and_sign_nothing(ws, capsys):
    for pem in (ws / "keys" / "image" / "targets").glob("*.pem"):
        pem.unlink()
    # image keys may live offline: commands that do not sign still work ...
    assert run_cli(["status", "-w", str(ws)], capsys)[0] == 0
    # ... and signing says which keys are missing, with the integrity exit code
    before = files(ws / "repository")
    repo = Workspace.open(ws).image_repository()
    with pytest.raises(KeysMissing, match="role targets needs 1 signature") as refused:
        repo.add_target("m/1/pkg.elpkg", b"package bytes")
    assert refused.value.exit_code == 4
    assert {k: v for k, v in files(ws / "repository").items() if k.startswith("metadata/")} == \
        {k: v for k, v in before.items() if k.startswith("metadata/")}


# -- training runs that did not end ---------------------------------------------------------------------
def _train_process(ws: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeloop.fleet.cli", "train", "-w", str(ws), "--epochs", "100000",
                             *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _raw_runs(ws: Path) -> list[dict]:
    return query(ws / "registry.db", "select run_id, status, reason, pid, host from runs")


def _wait_running(ws: Path, proc: subprocess.Popen) -> dict:
    def running() -> bool:
        assert proc.poll() is None, proc.communicate()
        return any(r["status"] == "running" for r in _raw_runs(ws))
    wait_for(running, 90, "the training run to be recorded", interval=0.1)
    time.sleep(0.3)                                     # into the epochs
    (run,) = _raw_runs(ws)
    return run


@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_during_train_marks_the_run_interrupted_at_once(ws, capsys, sig, name):
    proc = _train_process(ws)
    try:
        run = _wait_running(ws, proc)
        assert run["pid"] == proc.pid
        proc.send_signal(sig)
        _, err = exited_within(proc, 60)
    finally:
        proc.kill()
    one_line(proc.returncode, err, 130, "interrupted")
    (raw,) = _raw_runs(ws)                               # marked by the process itself, not by a later reap
    assert raw["status"] == "interrupted" and name in raw["reason"], raw
    code, out, err = run_cli(["runs", "ls", "-w", str(ws), "--json"], capsys)
    assert code == 0, err
    (listed,) = json.loads(out.strip().splitlines()[-1])["runs"]
    assert listed["status"] == "interrupted" and listed["ended_at"]
    assert run_cli(["models", "-w", str(ws), "--json"], capsys)[1].count("model_version\": \"") == 0


def _processes_naming(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def test_ctrl_c_during_distributed_train_stops_every_worker(ws):
    proc = _train_process(ws, "--nproc-per-node", "2")
    try:
        run = _wait_running(ws, proc)
        job = str((ws / "runs" / run["run_id"] / "job.json").resolve())
        wait_for(lambda: len(_processes_naming(job)) >= 2, 90, "the workers to start", interval=0.2)
        proc.send_signal(signal.SIGINT)
        _, err = exited_within(proc, 60)
    finally:
        proc.kill()
    one_line(proc.returncode, err, 130, "interrupted")
    assert _raw_runs(ws)[0]["status"] == "interrupted"
    try:
        wait_for(lambda: not _processes_naming(job), 30, "every worker to stop", interval=0.2)
    finally:
        for pid in _processes_naming(job):           # left training: this test's failure, not the next one's
            os.kill(pid, signal.SIGKILL)


def test_a_run_left_running_by_kill_9_is_marked_interrupted_at_the_next_command(ws, capsys):
    proc = _train_process(ws)
    try:
        run = _wait_running(ws, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert _raw_runs(ws)[0]["status"] == "running"      # nobody was there to say otherwise
    code, out, err = run_cli(["runs", "ls", "-w", str(ws), "--json"], capsys)
    assert code == 0, err
    (listed,) = json.loads(out.strip().splitlines()[-1])["runs"]
    assert listed["status"] == "interrupted", listed
    assert f"process {run['pid']}" in listed["reason"] and "is gone" in listed["reason"]
    # the next command finds it already marked and leaves it as it is
    ended = listed["ended_at"]
    code, out, _ = run_cli(["runs", "show", listed["run_id"], "-w", str(ws), "--json"], capsys)
    assert json.loads(out.strip().splitlines()[-1])["ended_at"] == ended


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_only_runs_of_gone_processes_on_this_host_are_marked(tmp_path):
    import socket

    path = tmp_path / "registry.db"
    registry = Registry(path)
    host = socket.gethostname()
    for run_id, pid, on in (("alive", os.getpid(), host), ("gone", _dead_pid(), host),
                            ("elsewhere", _dead_pid(), "another-host"), ("unknown", None, None)):
        registry.start_run({"run_id": run_id, "model": "m", "started_at": time.time(), "pid": pid, "host": on})
    registry.close()
    registry = Registry(path)                            # what every command does on open
    status = {r["run_id"]: r["status"] for r in registry.runs()}
    assert status == {"alive": "running", "gone": "interrupted", "elsewhere": "running", "unknown": "running"}
    # the run status table: an ended run does not move again, whoever asks
    assert registry.interrupt_run("gone", "again") is False
    with pytest.raises(IntegrityError, match="gone is interrupted: it cannot become succeeded"):
        registry.finish_run("gone", status="succeeded")
    with pytest.raises(NotFound):
        registry.finish_run("no-such-run", status="failed")
    registry.finish_run("alive", status="succeeded")
    assert registry.run("alive")["status"] == "succeeded"


# -- lineage ---------------------------------------------------------------------------------------------
def test_lineage_of_an_unknown_device_is_one_line(ws, capsys):
    before = files(ws)
    code, _, err = run_cli(["lineage", "ghost", "-w", str(ws)], capsys)
    one_line(code, err, 2, "no device 'ghost'")
    assert files(ws) == before


def test_lineage_of_a_device_whose_update_is_not_recorded_is_one_line(ws, capsys):
    registry = Registry(ws / "registry.db")
    registry.record_statuses([{"device_id": "dev-1", "tier": "edge-gateway", "state": "committed",
                               "model_version": "m:1", "update_id": "upd-ghost"}], installed=[("upd-ghost", "dev-1")])
    with pytest.raises(LineageBroken, match="update upd-ghost, but update upd-ghost is not recorded"):
        lineage(registry, "dev-1")
    registry.close()
    code, _, err = run_cli(["lineage", "dev-1", "-w", str(ws)], capsys)
    one_line(code, err, 4, "lineage of dev-1 is broken", "upd-ghost")


def test_lineage_of_a_device_whose_model_version_or_run_is_not_recorded_is_one_line(ws, capsys):
    registry = Registry(ws / "registry.db")
    registry.record_statuses([{"device_id": "dev-2", "tier": "edge-gateway", "state": "committed",
                               "model_version": "m:1", "update_id": "upd-1"}], installed=[("upd-1", "dev-2")])
    registry.upsert_update({"update_id": "upd-1", "model_version": "m:1", "tier": "edge-gateway",
                            "target": "m/1/x.elpkg", "sha256": "ab" * 32, "length": 3, "issued_at": time.time()})
    registry.add_package({"sha256": "ab" * 32, "model_version": "m:1", "tier": "edge-gateway",
                          "target": "m/1/x.elpkg", "length": 3})
    with pytest.raises(LineageBroken, match="its model version m:1 is not recorded"):
        lineage(registry, "dev-2")
    registry.add_model_version({"model_version": "m:1", "model": "m", "version": 1, "run_id": "run-lost",
                                "stage": "candidate", "onnx_sha256": "cd" * 32, "metrics": {}})
    registry.close()
    code, _, err = run_cli(["lineage", "dev-2", "-w", str(ws), "--json"], capsys)
    one_line(code, err, 4, "the run run-lost of m:1 is not recorded")


def test_workspace_damaged_is_an_integrity_error():
    assert issubclass(WorkspaceDamaged, IntegrityError) and WorkspaceDamaged.exit_code == 4


def test_opening_a_registry_twice_in_one_process_never_reads_it_behind_sqlites_back(tmp_path, monkeypatch):
    """A plain open()+close() of a database file this process has open drops SQLite's POSIX locks
    on it (sqlite.org/howtocorrupt.html 2.2): the header check must not read a file already open."""
    from pathlib import Path as _P

    from edgeloop.cloud.registry import Registry

    path = tmp_path / "registry.db"
    first = Registry(path)
    reads = []
    real_open = _P.open

    def counting_open(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        if self == path:
            reads.append(a)
        return real_open(self, *a, **k)

    monkeypatch.setattr(_P, "open", counting_open)
    second = Registry(path)          # the file is open here already: its header is not read again
    assert reads == []
    second.close()
    first.close()
    third = Registry(path)           # nobody has it open any more: checked as before
    assert len(reads) == 1
    third.close()
