"""The habits operators bring from kubectl, mender-cli and the AWS CLI: one duration syntax for
every time option, an error as one JSON object with --json, readable key/value views with human
times, shell completion from the real parser, labels that cannot be misread, and user or model
text printed literally (no Rich markup, no emoji codes)."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeloop.fleet import cli
from edgeloop.fleet._args import duration, duration_or_zero
from edgeloop.fleet._output import Output, kv_lines
from edgeloop.fleet._workspace import ago, iso, when
from edgeloop.fleet.cli import build_parser
from conftest import run_cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGELOOP_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- one duration syntax -------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800), ("90", 90),
                                           ("1.5", 1.5), (".5", 0.5), ("12H", 43200), (" 2m ", 120)])
def test_a_duration_reads_units_and_plain_seconds(text, seconds):
    assert duration(text) == pytest.approx(seconds)
    assert duration_or_zero(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["0", "0s", "-3", "-1h", "abc", "2 weeks", "inf", "nan", "1e3", "", "5x", "h"])
def test_a_duration_refuses_zero_negative_and_garbage(text):
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_zero_is_a_duration_only_where_it_means_none():
    assert duration_or_zero("0") == 0 and duration_or_zero("0s") == 0
    for text in ("-1", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            duration_or_zero(text)


# every time option of every command, with the attribute it lands in
TIME_OPTIONS = [
    (["serve", "--duration"], "duration"),
    (["simulate", "--duration"], "duration"),
    (["swarm", "--duration"], "duration"),
    (["swarm", "--telemetry-s"], "telemetry_s"),
    (["swarm", "--heartbeat-s"], "heartbeat_s"),
    (["swarm", "--install-s"], "install_s"),
    (["demo", "--timeout"], "timeout"),
    (["rollout", "start", "digits-mlp:1", "--target", "tier=mcu", "--bake-s"], "bake_s"),
    (["rollout", "start", "digits-mlp:1", "--target", "tier=mcu", "--timeout-s"], "timeout_s"),
    (["tokens", "create", "--name", "ci", "--role", "viewer", "--expires-in"], "expires_in"),
]


@pytest.mark.parametrize("argv, dest", TIME_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_time_option_takes_the_one_syntax(argv, dest):
    parser = build_parser()
    for text, seconds in (("1h", 3600.0), ("90", 90.0), ("2.5m", 150.0)):
        assert getattr(parser.parse_args([*argv, text]), dest) == pytest.approx(seconds), (argv, text)


@pytest.mark.parametrize("argv, dest", [t for t in TIME_OPTIONS if t[1] not in ("bake_s", "telemetry_s",
                                                                                  "heartbeat_s", "install_s")],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
@pytest.mark.parametrize("bad", ["0", "-3", "soon"])
def test_a_bad_duration_is_one_usage_line(argv, dest, bad, capsys):
    code, out, err = run_cli([*argv, bad, "-w", "nowhere"], capsys)
    line = one_line(err)
    assert code == 2 and "duration" in line and "--help" in line and out == ""


# -- --json errors -------------------------------------------------------------------------------
def json_error(out: str) -> dict:
    obj = json.loads(out.splitlines()[-1])
    assert set(obj) == {"error", "code", "kind"}, obj
    return obj


def test_with_json_an_error_is_also_one_json_object(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert run_cli(["init", "-w", str(ws), "--json"], capsys)[0] == 0
    cases = [
        (["status", "-w", str(tmp_path / "missing"), "--json"], 2, "no edgeloop workspace"),
        (["runs", "show", "run-nope", "-w", str(ws), "--json"], 2, "no run"),
        (["models", "show", "digits-mlp:9", "-w", str(ws), "--json"], 2, "digits-mlp:9"),
        (["keys", "init", "-w", str(ws), "--json"], 2, "already has keys"),
        (["publish", "digits-mlp:1", "-w", str(ws), "--json"], 2, "no control plane is serving"),
        (["serve", "--duration", "-3", "-w", str(ws), "--json"], 2, "duration"),     # argparse's refusal
        (["tokens", "create", "--name", "x", "--role", "king", "-w", str(ws), "--json"], 2, "invalid choice"),
    ]
    for argv, code_, needle in cases:
        code, out, err = run_cli(argv, capsys)
        line = one_line(err)
        obj = json_error(out)
        assert code == code_ == obj["code"], (argv, code, obj)
        assert needle in obj["error"] and needle in line, (argv, obj, line)
        assert len([ln for ln in out.splitlines() if ln.strip()]) == 1, out
    code, out, _ = run_cli(["serve", "--duration", "-3", "--json"], capsys)
    assert json_error(out)["kind"] == "UsageError"
    code, out, _ = run_cli(["runs", "show", "run-nope", "-w", str(ws), "--json"], capsys)
    assert json_error(out)["kind"] in ("NotFound", "UserError")


def test_without_json_an_error_leaves_stdout_empty(tmp_path, capsys):
    for argv in (["status", "-w", str(tmp_path / "missing")], ["serve", "--duration", "0"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and out == "" and one_line(err)


@pytest.mark.parametrize("raised, code, kind", [(RuntimeError("boom"), 70, "RuntimeError"),
                                                (KeyboardInterrupt(), 130, "Interrupted")])
def test_an_internal_error_or_ctrl_c_is_a_json_object_too(tmp_path, capsys, monkeypatch, raised, code, kind):
    def fails(args, out):  # noqa: ANN001, ANN202
        raise raised
    monkeypatch.setattr(cli, "_status", fails)
    handler = signal.getsignal(signal.SIGINT)
    got, out, err = run_cli(["status", "-w", str(tmp_path), "--json"], capsys)
    obj = json_error(out)
    assert got == code == obj["code"] and obj["kind"] == kind
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # main() called in-process hands SIGINT back: left ignored, every process this one started
    # afterwards would inherit an ignored Ctrl-C (what hung serve and the watcher in CI)
    assert signal.getsignal(signal.SIGINT) is handler


def test_the_edgeloop_process_ignores_a_second_ctrl_c_while_it_exits_on_the_first(tmp_path):
    code = ("import signal, sys; from edgeloop.fleet import cli\n"
            "def fails(args, out): raise KeyboardInterrupt\n"
            "cli._status = fails\n"
            "sys.argv = ['edgeloop', 'status', '-w', sys.argv[1]]\n"
            "try:\n    cli.run()\nfinally:\n"
            "    print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and r.stdout.strip() == "True", (r.stdout, r.stderr)


# -- times and key/value views -------------------------------------------------------------------
def test_times_read_as_iso_utc_and_how_long_ago():
    now = 1_796_000_000.0
    assert iso(now) == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)) and iso(now).endswith("Z")
    assert [ago(now - s, now) for s in (5, 180, 3 * 3600, 3 * 86400)] == ["5 s ago", "3 min ago", "3 h ago",
                                                                          "3 d ago"]
    assert ago(now + 600, now) == "in 10 min" and ago(None) == "-" and when(None) == "-"
    assert when(now - 180, now) == f"{iso(now - 180)} (3 min ago)"


def test_a_view_is_aligned_key_value_lines_not_a_repr():
    now = time.time()
    record = {"device_id": "gw-1", "last_seen": now - 200, "enrolled_at": now - 7200, "cert_not_after": now + 86400,
              "revoked": False, "tags": {"site": "paris", "rack": "3"}, "groups": ["canary", "lab"],
              "model_version": None, "errors": [{"code": "verify.hash", "received_at": now - 60}],
              "accuracy": 0.9442896935933147}
    lines = kv_lines(record)
    text = "\n".join(lines)
    assert "{" not in text and "'" not in text and "[" not in text
    assert f"last_seen       {iso(now - 200)} (3 min ago)" in lines
    assert any(ln.startswith("enrolled_at") and "(2 h ago)" in ln for ln in lines)
    assert any(ln.startswith("cert_not_after") and "(in 24 h)" in ln for ln in lines)
    assert "tags" in lines and "  site  paris" in lines and "  rack  3" in lines
    assert "groups          canary, lab" in lines and "model_version   -" in lines and "revoked         no" in lines
    assert any(ln.startswith("  - code verify.hash  received_at ") for ln in lines)
    assert "accuracy        0.94429" in lines
    assert str(int(now)) not in text                     # no epoch seconds left


def test_devices_show_is_a_readable_view_and_json_keeps_epoch_seconds(tmp_path, capsys):
    ws = str(tmp_path / "ws")
    assert run_cli(["init", "-w", ws, "--json"], capsys)[0] == 0
    assert run_cli(["devices", "enroll", "gw-1", "--tier", "edge-gateway", "--tag", "site=lab", "-w", ws,
                    "--json"], capsys)[0] == 0
    code, out, _ = run_cli(["devices", "gw-1", "-w", ws], capsys)
    assert code == 0 and "{" not in out and "None" not in out and "True" not in out
    lines = out.splitlines()
    assert lines[0].split() == ["device_id", "gw-1"]
    enrolled = next(ln for ln in lines if ln.startswith("enrolled_at"))
    assert enrolled.rstrip().endswith("s ago)") and "Z (" in enrolled
    assert "tags" in lines and "  site  lab" in lines
    code, out, _ = run_cli(["devices", "gw-1", "-w", ws, "--json"], capsys)
    shown = json.loads(out.splitlines()[-1])
    assert isinstance(shown["enrolled_at"], float) and shown["tags"] == {"site": "lab"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ws = tmp_path_factory.mktemp("habits") / "ws"
    out = io.StringIO()
    from contextlib import redirect_stdout
    with redirect_stdout(out):
        assert cli.main(["init", "-w", str(ws), "--json"]) == 0
        assert cli.main(["train", "-w", str(ws), "--epochs", "1", "--json"]) == 0
    return ws, json.loads(out.getvalue().splitlines()[-1])


def test_runs_show_and_models_show_are_readable_views(trained, capsys):
    ws, result = trained
    code, out, _ = run_cli(["runs", "show", result["run_id"], "-w", str(ws)], capsys)
    assert code == 0 and not out.lstrip().startswith("{") and '"' not in out
    lines = out.splitlines()
    assert f"run_id          {result['run_id']}" in lines[0] or lines[0].split() == ["run_id", result["run_id"]]
    started = next(ln for ln in lines if ln.startswith("started_at"))
    assert "Z (" in started and "ago)" in started
    assert "params" in lines and any(ln.split()[:2] == ["epochs", "1"] for ln in lines if ln.startswith("  "))
    assert any(ln.startswith("  - epoch 1  loss ") for ln in lines)
    code, out, _ = run_cli(["models", "show", result["model_version"], "-w", str(ws)], capsys)
    assert code == 0 and '"' not in out and out.splitlines()[0].split() == ["model_version", result["model_version"]]
    assert any(ln.startswith("created_at") and "ago)" in ln for ln in out.splitlines())
    code, out, _ = run_cli(["runs", "show", result["run_id"], "-w", str(ws), "--json"], capsys)
    assert isinstance(json.loads(out.splitlines()[-1])["started_at"], float)
    # `latest` names the newest run, for runs show and reproduce alike
    code, out, _ = run_cli(["runs", "show", "latest", "-w", str(ws), "--json"], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["run_id"] == result["run_id"]


def test_latest_run_of_a_workspace_without_runs_is_one_line(tmp_path, capsys):
    ws = tmp_path / "empty"
    assert run_cli(["init", "-w", str(ws)], capsys)[0] == 0
    for argv in (["runs", "show", "latest"], ["reproduce", "latest"]):
        code, _, err = run_cli([*argv, "-w", str(ws)], capsys)
        assert code == 2 and "no training runs yet" in err and len(err.strip().splitlines()) == 1


# -- labels that cannot be misread ---------------------------------------------------------------
def test_drifted_features_read_as_ids_not_a_count():
    assert cli._feature_ids([36]) == "f36"
    assert cli._feature_ids([3, 36]) == "f3,f36"
    assert cli._feature_ids(list(range(10))) == "f0,f1,f2,f3,f4,f5,f6,f7 +2 more"
    assert cli._feature_ids([]) is None


def test_an_accuracy_change_is_signed_never_a_negative_drop():
    from edgeloop.fleet.cli_package import _change
    assert _change(-0.28) == "+0.28"          # scored 0.28 points above fp32
    assert _change(0.42) == "-0.42"           # lost 0.42 points
    assert _change(0.0) == "0.00" and _change(-0.001) == "0.00" and _change(None) == "-"


# -- text comes out literally --------------------------------------------------------------------
LITERAL = ["pipeline:train:", "[bold]x[/bold]", ":smile: [red]no[/]", "a\\[b]"]


def test_output_prints_user_text_literally(capsys):
    out = Output(as_json=False)
    for text in LITERAL:
        out.info(text)
        out.result({}, text)
    out.table("t [b]x[/b]", ["col"], [[t] for t in LITERAL], {})
    out.view({"name": LITERAL[0], "note": LITERAL[1]})
    printed = capsys.readouterr().out
    for text in LITERAL:
        assert printed.count(text) >= 3, (text, printed)
    assert "t [b]x[/b]" in printed and "\U0001f604" not in printed and "\u2705" not in printed


def test_control_characters_do_not_reach_the_terminal(capsys):
    Output(as_json=False).info("dev\x1b[2J-1\r\x07")
    assert capsys.readouterr().out == "dev[2J-1\n"


def test_progress_descriptions_are_literal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with Output(as_json=False).progress() as progress:
        progress("[bold]x[/bold]", 1, 2)
        progress("pipeline:train:", 2, 2)
    drawn = err.getvalue()
    assert "[bold]x[/bold]" in drawn and "pipeline:train:" in drawn


# -- shell completion ----------------------------------------------------------------------------
def completion(shell: str, capsys) -> str:
    code, out, err = run_cli(["completion", shell], capsys)
    assert code == 0, err
    return out


def commands() -> list[str]:
    parser = build_parser()
    return list(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


BASH_PROBE = """
source "$1"
complete -p edgeloop
t() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); _edgeloop; echo "${COMPREPLY[*]}"; }
t edgeloop ""
t edgeloop rol
t edgeloop rollout ""
t edgeloop rollout start --strategy ""
t edgeloop models -w somewhere ""
t edgeloop package --report --ti
t edgeloop keys rotate ""
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_sources_and_completes_real_commands(tmp_path, capsys):
    script = tmp_path / "edgeloop.bash"
    script.write_text(completion("bash", capsys))
    proc = subprocess.run(["bash", "-c", BASH_PROBE, "probe", str(script)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "complete -F _edgeloop edgeloop"
    top = lines[1].split()
    assert [w for w in top if not w.startswith("-")] == commands() and "--version" in top
    assert "completion" in top and "rollout" in top and "status" in top
    assert lines[2] == "rollout"
    assert {"start", "status", "abort", "--workspace"} <= set(lines[3].split())
    from edgeloop.cloud.rollouts.controller import STRATEGIES
    assert lines[4].split() == list(STRATEGIES)
    assert {"ls", "show", "promote", "import"} <= set(lines[5].split())     # -w's value skipped
    assert set(lines[6].split()) == {"--tier"}                                # --report is a flag here
    assert lines[7].split()[:4] == ["root", "targets", "snapshot", "timestamp"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="no zsh")
def test_zsh_completion_loads_and_registers(tmp_path, capsys):
    script = tmp_path / "_edgeloop"
    script.write_text(completion("zsh", capsys))
    assert subprocess.run(["zsh", "-n", str(script)], capture_output=True, timeout=60).returncode == 0
    probe = (f"autoload -U compinit; compinit -u -d {tmp_path}/zcompdump; source {script}; "
             "print -r -- $_comps[edgeloop]; "
             "_describe() { print -r -- ${(P)4} }; words=(edgeloop ''); CURRENT=2; _edgeloop")
    proc = subprocess.run(["zsh", "-f", "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, listed = proc.stdout.splitlines()[:2]
    assert first == "_edgeloop"
    assert "rollout:staged rollouts" in listed and "completion:print a shell completion script" in listed


def test_completion_of_an_unknown_shell_is_a_usage_error(capsys):
    code, out, err = run_cli(["completion", "fish"], capsys)
    assert code == 2 and "invalid choice" in one_line(err)
