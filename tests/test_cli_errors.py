"""The command line as an operator meets it: --help everywhere, --json for scripts, and one
clear line with a non-zero exit (never a traceback) for every mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeloop.fleet.cli import build_parser, main
from conftest import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def commands() -> list[list[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    found = []
    for name, p in sub.choices.items():
        found.append([name])
        for action in p._actions:
            if getattr(action, "choices", None) and action.dest == "action":
                found += [[name, child] for child in action.choices]
    return found


@pytest.mark.parametrize("argv", [[]] + commands(), ids=lambda a: " ".join(a) or "edgeloop")
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: edgeloop" in capsys.readouterr().out


run = run_cli


def assert_one_line_error(code, err, needle):
    assert code not in (0, None)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], err


def test_mistakes_get_one_clear_line(tmp_path, capsys):
    ws = tmp_path / "ws"
    code, _, err = run(["status", "-w", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, "no edgeloop workspace")
    assert run(["init", "-w", str(ws), "--json"], capsys)[0] == 0
    for argv, needle in [
        (["package", "digits-mlp:9", "-w", str(ws)], "no model version"),
        (["train", "-w", str(ws), "--data", str(tmp_path / "nope.csv")], "not found"),
        (["train", "-w", str(ws), "--epochs", "0"], "must be at least 1"),
        (["lineage", "ghost", "-w", str(ws)], "no device"),
        (["runs", "show", "run-nope", "-w", str(ws)], "no run"),
        (["reproduce", "run-nope", "-w", str(ws)], "no run"),
        (["keys", "init", "-w", str(ws)], "already has keys"),
        (["publish", "digits-mlp:1", "-w", str(ws)], "no control plane is serving"),
        (["init", "-w", str(tmp_path / "other"), "--mqtt", "notaport"], "HOST:PORT"),
        (["frobnicate"], "invalid choice"),
    ]:
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, needle)
    text = tmp_path / "text.csv"
    text.write_text("a,b,c\nd,e,f\n")
    code, _, err = run(["train", "-w", str(ws), "--data", str(text)], capsys)
    assert_one_line_error(code, err, "not a numeric CSV")
    (ws / "edgeloop.toml").write_text("[[[ not toml")
    code, _, err = run(["status", "-w", str(ws)], capsys)
    assert_one_line_error(code, err, "malformed workspace config")


def test_scripts_get_one_json_object_as_the_last_line(tmp_path, capsys):
    ws = str(tmp_path / "ws")
    for argv in (["init", "-w", ws], ["init", "-w", ws]):        # idempotent
        code, out, _ = run([*argv, "--json"], capsys)
        assert code == 0
    assert json.loads(out.splitlines()[-1])["created"] is False
    code, out, _ = run(["train", "-w", ws, "--epochs", "2", "--json"], capsys)
    trained = json.loads(out.splitlines()[-1])
    assert code == 0 and trained["model_version"] == "digits-mlp:1" and trained["run_id"].startswith("run-")
    code, out, _ = run(["package", "digits-mlp:1", "-w", ws, "--json"], capsys)
    assert json.loads(out.splitlines()[-1])["bytes"] > 0
    for argv in (["models", "--json"], ["models", "ls", "--json"], ["runs", "ls", "--json"], ["data", "--json"],
                 ["status", "--json"], ["keys", "list", "--json"], ["devices", "--json"]):
        code, out, _ = run([*argv, "-w", ws], capsys)
        assert code == 0, argv
        json.loads(out.splitlines()[-1])
    # options given before an action are not lost (`models -w X ls`)
    code, out, _ = run(["models", "-w", ws, "ls", "--json"], capsys)
    assert [m["model_version"] for m in json.loads(out)["model_versions"]] == ["digits-mlp:1"]


def test_the_installed_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "edgeloop.fleet.cli", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_version_prints_the_installed_version_and_exits_0():
    from importlib.metadata import version
    proc = subprocess.run([sys.executable, "-m", "edgeloop.fleet.cli", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"edgeloop {version('edgeloop')}"
