"""README.md's walkthrough, run as written.

The block after the ``<!-- walkthrough ... -->`` marker in README.md is read from the README
itself and every command in it runs, in order, through bash, in a fresh folder, against a
private broker: the one substitution is the broker address of ``edgeloop init``. The test plays
a patient operator: after a command that starts something (serve, simulate, publish) it waits
until what the README says is true is true, then runs the next command. ``STEPS`` says what each
command must print; a README command without a step (or a step without its command) fails the
test, so the README and this test cannot drift apart.

A second test parses every ``edgeloop`` line anywhere in the README with the real parser, so
the commands outside the walkthrough are at least spelled right.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- walkthrough:"


def readme_blocks() -> list[tuple[bool, list[str]]]:
    """Every ```bash block of the README as (is the walkthrough, commands); comments dropped,
    backslash continuations joined."""
    blocks, lines, walkthrough, i = [], README.read_text().splitlines(), False, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(MARKER):
            walkthrough = True
        elif line.strip() == "```bash":
            cmds, cur = [], ""
            i += 1
            while lines[i].strip() != "```":
                text = _strip_comment(lines[i])
                piece = text.rstrip(" \\")
                cur = f"{cur} {piece}" if cur else piece
                if not text.endswith("\\"):
                    if cur.strip():
                        cmds.append(cur.strip())
                    cur = ""
                i += 1
            blocks.append((walkthrough, cmds))
            walkthrough = False
        i += 1
    return blocks


def _strip_comment(line: str) -> str:
    """``line`` without its trailing ``# comment`` (a # outside quotes, after a space)."""
    quote = None
    for j, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (j == 0 or line[j - 1] == " "):
            return line[:j].rstrip()
    return line.rstrip()


def walkthrough() -> list[str]:
    found = [cmds for is_walk, cmds in readme_blocks() if is_walk]
    assert len(found) == 1, "README.md must have exactly one walkthrough block after its marker"
    return found[0]


# -- what each command must print, in README order -------------------------------------------------
@dataclass(frozen=True)
class Step:
    starts: str                     # the command as the README writes it starts with this
    prints: str = ""                # a regular expression its stdout must match
    then: Callable[["Walk"], None] | None = None   # the patient operator: wait until this holds


class Walk:
    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.background: list[tuple[str, subprocess.Popen]] = []

    def ws(self) -> Path:
        return self.folder / "ws"

    def rows(self, sql: str) -> list[dict]:
        from edgeloop.cloud.store.readonly import query
        return query(self.ws() / "registry.db", sql)

    def devices_on(self, version: str) -> int:
        return sum(1 for d in self.rows("select model_version, state from devices")
                   if d["model_version"] == version)

    def online(self) -> int:
        return sum(1 for d in self.rows("select state from devices") if d["state"] != "offline")


DEVICES = 20


def _serving(w: Walk) -> None:
    wait_for(lambda: (w.ws() / "serve.json").exists(), 60, "serve.json")


def _fleet_online(w: Walk) -> None:
    wait_for(lambda: w.online() >= DEVICES, 90, f"{DEVICES} simulated devices online")


def _fleet_on(version: str) -> Callable[[Walk], None]:
    def wait(w: Walk) -> None:
        wait_for(lambda: w.devices_on(version) >= DEVICES, 120, f"{DEVICES} devices on {version}")
    return wait


STEPS = [
    Step("edgeloop init", r"created workspace .*ws \(broker 127\.0\.0\.1:\d+, fleet fleet-[0-9a-f]{12}\)"),
    Step("edgeloop train -w ws --epochs 30", r"registered digits-mlp:1 \(run run-[0-9a-f]+.*test accuracy 0\.9"),
    Step("edgeloop package -w ws digits-mlp:1 --tier edge-gateway", r"packaged digits-mlp:1 for edge-gateway"),
    Step("edgeloop package -w ws digits-mlp:1 --tier all", r"(?s)gpu-server.*edge-gateway.*mobile.*mcu"),
    Step("edgeloop package -w ws digits-mlp:1 --tier mcu --export-c", r"packaged digits-mlp:1 for mcu"),
    Step("edgeloop models promote digits-mlp:1", r"digits-mlp:1: candidate -> production"),
    Step("edgeloop serve", then=_serving),
    Step("edgeloop simulate", then=_fleet_online),
    Step("edgeloop publish", r"published digits-mlp:1 to edge-gateway devices as update upd-",
         then=_fleet_on("digits-mlp:1")),
    Step("edgeloop devices -w ws", r"(?s)sim-edge-gateway-00000.*digits-mlp:1"),
    Step("edgeloop devices -w ws sim-edge-gateway-00003", r"sim-edge-gateway-00003"),
    Step("edgeloop models", r"(?s)digits-mlp:1.*production"),
    Step("edgeloop status", rf"devices: {DEVICES} .*\nlatest model version: digits-mlp:1"),
    Step("edgeloop runs ls", r"(?s)run-[0-9a-f]+.*run-[0-9a-f]+"),
    Step("edgeloop reproduce latest", r"identical: weights sha256 [0-9a-f]{16} match run run-"),
    Step("edgeloop lineage sim-edge-gateway-00003", r"(?s)device +sim-edge-gateway-00003.*data set +digits:1 sha256"),
    Step("edgeloop keys list", r"(?s)root.*targets.*timestamp"),
    Step("edgeloop drift report -w ws --cohort tier", r"edge-gateway"),
    Step("edgeloop train -w ws --epochs 40 --hidden 64", r"registered digits-mlp:2"),
    Step("edgeloop package -w ws digits-mlp:2", r"packaged digits-mlp:2 for edge-gateway"),
    Step("edgeloop models promote digits-mlp:2", r"digits-mlp:2: candidate -> production .*digits-mlp:1"),
    Step("edgeloop rollout start digits-mlp:2", rf"rollout ro-[0-9a-f]+: digits-mlp:2 to {DEVICES} devices"),
    Step("edgeloop rollout status -w ws --watch", r"completed", then=_fleet_on("digits-mlp:2")),
    Step("edgeloop pipeline run digits-retrain", r"succeeded"),
    Step("edgeloop drift report -w ws --cohort model_version", r"digits-mlp:2"),
    Step("edgeloop train -w ws --nproc-per-node 2", r"registered digits-mlp:\d+ .*2 process\(es\)"),
    Step("edgeloop completion bash", ""),
]


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELOOP_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["COLUMNS"] = "200"
    env["HOME"] = str(tmp)        # nothing from the developer's own settings
    return env


def test_every_walkthrough_command_has_a_step_in_order():
    cmds = walkthrough()
    assert len(cmds) == len(STEPS), (
        f"README walkthrough has {len(cmds)} commands, the test {len(STEPS)} steps: "
        + "; ".join(c for c in cmds if not any(c.startswith(s.starts) for s in STEPS)))
    for cmd, step in zip(cmds, STEPS):
        assert cmd.startswith(step.starts), f"README says {cmd!r} where the test expects {step.starts!r}..."


def test_every_edgeloop_line_of_the_readme_parses():
    from edgeloop.fleet.cli import build_parser

    parser = build_parser()
    seen = 0
    for _, cmds in readme_blocks():
        for cmd in cmds:
            for part in re.split(r";|&&|\|", cmd.rstrip(" &")):
                words = shlex.split(part.split(">")[0])
                if not words or words[0] != "edgeloop":
                    continue
                seen += 1
                try:
                    parser.parse_args(words[1:])
                except SystemExit as e:
                    pytest.fail(f"README command does not parse: {part.strip()!r} (exit {e.code})")
    assert seen >= 30


def test_the_readme_walkthrough_runs_as_written(broker, tmp_path):
    assert STEPS, "no steps"
    folder = tmp_path / "fresh"
    folder.mkdir()
    env = _env(tmp_path)
    walk = Walk(folder, env)
    began = time.monotonic()
    try:
        for cmd, step in zip(walkthrough(), STEPS):
            cmd = cmd.replace("127.0.0.1:1883", broker.address)    # the one substitution: a private broker
            print(f"[{time.monotonic() - began:6.1f} s] {cmd}")     # where the time goes, with -s
            if cmd.endswith("&"):
                proc = subprocess.Popen(["bash", "-c", "exec " + cmd.rstrip(" &")], cwd=folder, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
                walk.background.append((cmd, proc))
                if step.then:
                    step.then(walk)
                assert proc.poll() is None, f"{cmd!r} ended early: {proc.communicate()}"
                continue
            r = subprocess.run(["bash", "-c", cmd], cwd=folder, env=env, capture_output=True, text=True,
                               timeout=400)
            assert r.returncode == 0, f"{cmd!r} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
            assert "Traceback" not in r.stderr, f"{cmd!r}:\n{r.stderr}"
            if step.prints:
                assert re.search(step.prints, r.stdout), f"{cmd!r} printed:\n{r.stdout[-3000:]}"
            if step.then:
                step.then(walk)
        assert (folder / "fw" / "model.c").exists() and (folder / "edgeloop.bash").stat().st_size > 0
        versions = {d["model_version"] for d in walk.rows("select model_version from devices")}
        assert len(versions) == 1 and versions != {"digits-mlp:1"}, versions
    finally:
        ended = _stop(walk)
    for cmd, (code, out, err) in ended.items():
        assert code in (0, 130), f"{cmd!r} ended {code}:\n{out[-1500:]}\n{err[-1500:]}"
        assert "Traceback" not in err and "Aborted" not in err and "terminate called" not in err, err


def _stop(walk: Walk) -> dict[str, tuple[int, str, str]]:
    """Ctrl-C to each background command, newest first, as the README says to stop them."""
    ended = {}
    for cmd, proc in reversed(walk.background):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=90)      # serve may be finishing a step of its loop
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGABRT)           # PYTHONFAULTHANDLER (conftest): where it hung
            try:
                out, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
        ended[cmd] = (proc.returncode, out, err)
    return ended
