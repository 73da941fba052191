"""The ``edgeloop`` command line, run in-process (``edgeloop.fleet.cli.main``) with no broker: help for
every command, one clear error line (never a traceback) with a non-zero exit for each mistake,
and the --json contract (one JSON object as the last stdout line) through init, train, package,
models and status."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sqlite3
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from edgeloop.contracts.package import read_package
from edgeloop.fleet.cli import main
from conftest import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SUBCOMMANDS = ["init", "train", "package", "publish", "serve", "devices", "models", "status", "simulate", "demo"]
USER_ERROR = 2   # cloud.errors.UserError / NotFound, and argparse usage errors


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No command may fall back on a workspace in the developer's environment or working directory."""
    monkeypatch.delenv("EDGELOOP_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)


run = run_cli


def last_json(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert lines, "no output"
    obj = json.loads(lines[-1])
    assert isinstance(obj, dict)
    return obj


def assert_one_line_error(code, out: str, err: str, needle: str, exit_code: int = USER_ERROR) -> None:
    assert code == exit_code, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "error" in lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256, and the registry's rows (to show a refused command
    changed nothing). The SQLite files are compared by content: their bytes, and the WAL files beside
    them, change on a mere open."""
    state = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("registry.db")}
    db = root / "registry.db"
    if db.exists():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            state["registry.db"] = "\n".join(conn.iterdump())
        finally:
            conn.close()
    return state


def init_ws(path: Path, capsys) -> Path:
    code, out, err = run(["init", "-w", str(path), "--json"], capsys)
    assert code == 0, err
    return path


# -- help ----------------------------------------------------------------------------------------
def test_top_level_help_lists_every_command(capsys):
    code, out, err = run(["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: edgeloop")
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s", out, re.M), f"{name} missing from --help"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_exits_zero(command, capsys):
    code, out, err = run([command, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: edgeloop {command}")
    for option in ("--workspace", "--json"):      # every command takes both
        assert option in out
    assert err == ""


def test_help_from_a_separate_process():
    proc = subprocess.run([sys.executable, "-m", "edgeloop.fleet.cli", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: edgeloop")
    assert "Traceback" not in proc.stderr


# -- mistakes: one line, non-zero exit, nothing changed ----------------------------------------------
def test_workspace_that_does_not_exist_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    code, out, err = run(["status", "-w", str(missing)], capsys)
    assert_one_line_error(code, out, err, "no edgeloop workspace")
    assert not missing.exists()                          # status created nothing
    code, out, err = run(["status", "-w", "/nonexistent", "--json"], capsys)
    assert_one_line_error(code, out, err, "no edgeloop workspace")
    # a script gets no half answer on stdout: only the error, as one JSON object
    assert json.loads(out) == {"error": err.strip().removeprefix("edgeloop: error: "), "code": code,
                               "kind": "NotFound"}


def test_malformed_workspace_config_is_one_line(tmp_path, capsys):
    ws = init_ws(tmp_path / "ws", capsys)
    garbage = "this is = = not [toml\n\x01"
    (ws / "edgeloop.toml").write_text(garbage)
    before = snapshot(ws)
    for argv in (["status"], ["models", "--json"], ["train", "--epochs", "1"], ["init"]):
        code, out, err = run([*argv, "-w", str(ws)], capsys)
        assert_one_line_error(code, out, err, "malformed workspace config")
    assert (ws / "edgeloop.toml").read_text() == garbage   # `init` did not paper over it
    assert snapshot(ws) == before


def test_config_missing_a_section_is_one_line(tmp_path, capsys):
    ws = init_ws(tmp_path / "ws", capsys)
    (ws / "edgeloop.toml").write_text('version = 1\nfleet = "x"\n')     # valid TOML, no [mqtt]
    code, out, err = run(["status", "-w", str(ws)], capsys)
    assert_one_line_error(code, out, err, "malformed workspace config")


def test_unknown_model_version_for_package_is_one_line(tmp_path, capsys):
    ws = init_ws(tmp_path / "ws", capsys)
    before = snapshot(ws)
    code, out, err = run(["package", "digits-mlp:9", "-w", str(ws), "--json"], capsys)
    assert_one_line_error(code, out, err, "no model version 'digits-mlp:9'")
    assert json.loads(out)["code"] == code and len(out.splitlines()) == 1     # only the error object
    assert snapshot(ws) == before


def test_missing_data_file_for_train_is_one_line(tmp_path, capsys):
    ws = init_ws(tmp_path / "ws", capsys)
    before = snapshot(ws)
    code, out, err = run(["train", "-w", str(ws), "--epochs", "1", "--data", str(tmp_path / "missing.csv")],
                         capsys)
    assert_one_line_error(code, out, err, "not found")
    assert "missing.csv" in err
    assert snapshot(ws) == before
    assert last_json(run(["runs", "--json", "-w", str(ws)], capsys)[1]) == {"runs": []}


@pytest.mark.parametrize("content", ["a,b,c\nx,y,z\n" * 12, "1,2,3\n4,five,6\n" * 12, "\x00\xff\xfe binary\n"],
                         ids=["text", "one-bad-cell", "binary"])
def test_data_file_that_is_not_numeric_csv_is_one_line(tmp_path, capsys, content):
    ws = init_ws(tmp_path / "ws", capsys)
    data = tmp_path / "bad.csv"
    data.write_bytes(content.encode("latin-1"))
    before = snapshot(ws)
    code, out, err = run(["train", "-w", str(ws), "--epochs", "1", "--data", str(data)], capsys)
    assert_one_line_error(code, out, err, "not a numeric CSV")
    assert snapshot(ws) == before                     # no run, no data set, no model version
    assert last_json(run(["models", "--json", "-w", str(ws)], capsys)[1]) == {"model_versions": []}


@pytest.mark.parametrize("address", ["notaport", "host:", ":1883", "host:99999", "host:-1", "host:port"])
def test_init_with_a_bad_broker_address_is_one_line(tmp_path, capsys, address):
    ws = tmp_path / "ws"
    code, out, err = run(["init", "-w", str(ws), "--mqtt", address], capsys)
    assert_one_line_error(code, out, err, "HOST:PORT")
    assert address in err
    assert not ws.exists()                            # nothing half-created


@pytest.mark.parametrize("command", ["simulate", "demo"])
@pytest.mark.parametrize("devices", ["0", "-3", "many"])
def test_fleet_of_no_devices_is_a_usage_error(tmp_path, capsys, command, devices):
    ws = tmp_path / "ws"
    code, out, err = run([command, "-w", str(ws), "--devices", devices], capsys)
    assert_one_line_error(code, out, err, "--devices")
    assert not ws.exists()
    assert list(tmp_path.iterdir()) == []             # not even a default workspace in the working dir


def test_unknown_subcommand_is_a_usage_error(tmp_path, capsys):
    code, out, err = run(["frobnicate"], capsys)
    assert_one_line_error(code, out, err, "invalid choice")
    assert "frobnicate" in err
    assert list(tmp_path.iterdir()) == []


def test_no_subcommand_is_a_usage_error(capsys):
    code, out, err = run([], capsys)
    assert_one_line_error(code, out, err, "COMMAND")


# -- init ----------------------------------------------------------------------------------------
def test_init_twice_changes_nothing(tmp_path, capsys):
    ws = tmp_path / "ws"
    code, out, err = run(["init", "-w", str(ws), "--json", "--mqtt", "10.0.0.5:1884"], capsys)
    assert code == 0, err
    first = last_json(out)
    assert first == {"workspace": str(ws.resolve()), "created": True, "mqtt": "10.0.0.5:1884",
                     "fleet": first["fleet"]}
    assert re.fullmatch(r"fleet-[0-9a-f]{12}", first["fleet"])     # generated once, kept below
    assert len([ln for ln in out.splitlines() if ln.strip()]) == 1
    before = snapshot(ws)
    assert "edgeloop.toml" in before and any(k.startswith("keys/") for k in before)
    code, out, err = run(["init", "-w", str(ws), "--json"], capsys)
    assert code == 0, err
    second = last_json(out)
    assert second == {**first, "created": False}       # the existing broker address is kept
    assert snapshot(ws) == before                      # same keys, same repository metadata, same config


def test_init_without_json_is_human_text(tmp_path, capsys):
    code, out, err = run(["init", "-w", str(tmp_path / "ws")], capsys)
    assert code == 0
    assert "created workspace" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[-1])


def test_status_on_an_empty_fleet(tmp_path, capsys):
    ws = init_ws(tmp_path / "ws", capsys)
    code, out, err = run(["status", "-w", str(ws), "--json"], capsys)
    assert code == 0, err
    assert last_json(out) == {"devices": 0, "states": {}, "latest_model_version": None, "latest_update": None,
                              "telemetry_records": 0, "inferences": 0, "accuracy": None}
    code, out, err = run(["status", "-w", str(ws)], capsys)
    assert code == 0 and "devices: 0" in out


# -- train, package, models: one trained workspace for the module ------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """init, train --epochs 2, package digits-mlp:1; each command's last JSON line."""
    ws = tmp_path_factory.mktemp("trained") / "ws"
    results = {}
    for name, argv in [("init", ["init"]), ("train", ["train", "--epochs", "2"]),
                       ("package", ["package", "digits-mlp:1"])]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main([*argv, "-w", str(ws), "--json"])
        assert code == 0, f"{name}: {err.getvalue()}"
        assert "Traceback" not in err.getvalue()
        results[name] = last_json(out.getvalue())
    results["ws"] = ws
    return results


def test_train_json_names_the_run_and_version(trained):
    t = trained["train"]
    assert t["model_version"] == "digits-mlp:1"
    assert re.fullmatch(r"run-[0-9a-f]{12}", t["run_id"])
    assert re.fullmatch(r"[0-9a-f]{64}", t["weights_sha256"])
    assert 0.0 <= t["metrics"]["test_accuracy"] <= 1.0
    from edgeloop.cloud.train.datasets import default_dataset_path
    assert t["dataset_sha256"] == hashlib.sha256(default_dataset_path().read_bytes()).hexdigest()


def test_package_json_gives_the_stored_package(trained):
    p = trained["package"]
    assert p["model_version"] == "digits-mlp:1" and p["tier"] == "edge-gateway"
    assert re.fullmatch(r"[0-9a-f]{64}", p["sha256"])
    assert isinstance(p["bytes"], int) and p["bytes"] > 0
    blob = trained["ws"] / "artifacts" / p["sha256"][:2] / p["sha256"]
    data = blob.read_bytes()
    assert len(data) == p["bytes"] and hashlib.sha256(data).hexdigest() == p["sha256"]
    manifest = read_package(data).manifest
    assert manifest.model_version == "digits-mlp:1" and manifest.tier == "edge-gateway"
    assert manifest.lineage["run_id"] == trained["train"]["run_id"]


def test_models_json_lists_the_trained_version(trained, capsys):
    ws = str(trained["ws"])
    for argv in (["models", "-w", ws, "--json"], ["models", "ls", "-w", ws, "--json"],
                 ["models", "-w", ws, "ls", "--json"]):
        code, out, err = run(argv, capsys)
        assert code == 0, (argv, err)
        rows = last_json(out)["model_versions"]
        assert [(r["model_version"], r["run_id"]) for r in rows] == [("digits-mlp:1", trained["train"]["run_id"])]


def test_status_json_after_training(trained, capsys):
    code, out, err = run(["status", "-w", str(trained["ws"]), "--json"], capsys)
    assert code == 0, err
    s = last_json(out)
    assert s["latest_model_version"] == "digits-mlp:1"
    assert s["devices"] == 0 and s["states"] == {} and s["latest_update"] is None


def test_package_of_a_version_that_does_not_exist_leaves_the_trained_one_alone(trained, capsys):
    ws = trained["ws"]
    before = snapshot(ws / "artifacts")
    code, out, err = run(["package", "digits-mlp:2", "-w", str(ws)], capsys)
    assert_one_line_error(code, out, err, "no model version 'digits-mlp:2'")
    assert snapshot(ws / "artifacts") == before
