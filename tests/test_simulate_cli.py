"""`edgeloop simulate` and `edgeloop swarm` as the operator runs them (issue 14 items 3 and 4):
a fleet that waits for updates until --duration or a signal, takes a publish while it runs,
stops promptly and cleanly (exit 130 on SIGINT, 143 on SIGTERM, a summary line, no abort), and
sends labelled samples (--sample-rate) that `edgeloop pipeline run` retrains on, closing the loop
from the command line. Real components: a private Mosquitto, `edgeloop serve`, real agents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeloop.cloud.registry import Registry

from conftest import own_broker, run_cli, wait_for  # noqa: E402

# this module's own broker: rollouts select devices from the statuses a broker retains
broker = pytest.fixture(scope="module", name="broker")(own_broker)

ROOT = Path(__file__).resolve().parent.parent
TIER = "edge-gateway"
ABORT_SIGNS = ("Traceback", "terminate called", "Aborted", "core dumped")


def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "edgeloop.fleet.cli", *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class Proc:
    """A CLI command running in the background, its output collected line by line as it comes."""

    def __init__(self, *argv: str) -> None:
        self.proc = subprocess.Popen(_cli(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT, env=_env())
        self.lines: list[str] = []
        self.err: list[str] = []
        self.came: list[float] = []      # when each stdout line came (time.monotonic())
        self._readers = [threading.Thread(target=self._read, args=(f, to), daemon=True)
                         for f, to in ((self.proc.stdout, self.lines), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    def _read(self, stream, into: list[str]) -> None:  # noqa: ANN001
        for line in stream:
            if into is self.lines:
                self.came.append(time.monotonic())
            into.append(line)

    def last_line_at(self) -> float:
        """When the last stdout line (the summary) came."""
        return self.came[-1]

    def wait_line(self, text: str, timeout: float = 60.0) -> float:
        """Until stdout has a line containing ``text``: when it came (time.monotonic())."""
        wait_for(lambda: any(text in line for line in self.lines) or self.proc.poll() is not None, timeout,
                 f"a line with {text!r}", interval=0.02)
        assert any(text in line for line in self.lines), (self.lines, self.err, self.proc.returncode)
        return time.monotonic()

    def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(10)
        return code, "".join(self.lines), "".join(self.err)

    def signal(self, sig: int, timeout: float = 30.0) -> tuple[int, str, str, float]:
        """Send ``sig``: (exit code, stdout, stderr, seconds until the summary line came). The
        process exits after it, once the interpreter has torn down (torch, onnxruntime)."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        result = self.finish()
        return (*result, self.last_line_at() - sent)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def served(broker, tmp_path_factory):
    """A workspace with digits-mlp:1 trained and packaged, and `edgeloop serve` running for it."""
    ws = tmp_path_factory.mktemp("simcli") / "ws"
    for argv in (["init", "-w", str(ws), "--mqtt", broker.address], ["train", "-w", str(ws), "--epochs", "3"],
                 ["package", "-w", str(ws), "digits-mlp:1", "--tier", TIER]):
        code = subprocess.run(_cli(*argv), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert code.returncode == 0, code.stderr
    serve = Proc("serve", "-w", str(ws))
    serve.wait_line("serving http")
    yield ws
    serve.signal(signal.SIGTERM)


def _devices(ws: Path, prefix: str) -> dict[str, dict]:
    registry = Registry(ws / "registry.db")
    try:
        return {d["device_id"]: d for d in registry.devices(tier=TIER) if d["device_id"].startswith(prefix + "-")}
    finally:
        registry.close()


def _no_abort(err: str) -> None:
    for sign in ABORT_SIGNS:
        assert sign not in err, err


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["simulate", "swarm"])
@pytest.mark.parametrize("option, value", [("--duration", "-3"), ("--duration", "0"), ("--duration", "inf"),
                                           ("--duration", "soon"), ("--sample-rate", "1.5"),
                                           ("--sample-rate", "-0.1")])
def test_a_duration_or_sample_rate_out_of_range_is_refused_in_one_line(tmp_path, capsys, command, option, value):
    code, out, err = run_cli([command, "-w", str(tmp_path / "ws"), option, value], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert option in err and value in err
    assert list(tmp_path.iterdir()) == []              # nothing created on the way


def test_swarm_sample_rate_without_telemetry_period_names_the_fix(served, capsys):
    code, out, err = run_cli(["swarm", "-w", str(served), "--devices", "1", "--sample-rate", "0.5"], capsys)
    assert code == 2 and "--telemetry-s" in err and len(err.strip().splitlines()) == 1


# -- a fleet that waits --------------------------------------------------------------------------
def test_simulate_stays_online_past_its_samples_takes_a_publish_and_stops_cleanly_on_sigint(served):
    sim = Proc("simulate", "-w", str(served), "--devices", "3", "--samples", "20", "--prefix", "wait",
               "--tier", TIER)
    try:
        sim.wait_line("simulated devices online")
        wait_for(lambda: len(_devices(served, "wait")) == 3, 30, "the devices' statuses")
        code, out, err = run_cli_subprocess("publish", "-w", str(served), "digits-mlp:1", "--tier", TIER)
        assert code == 0, err

        def served_and_waiting() -> bool:
            rows = _devices(served, "wait").values()
            return all(d["model_version"] == "digits-mlp:1" and d["state"] != "offline" for d in rows)
        wait_for(served_and_waiting, 60, "the publish to reach every device")
        registry = Registry(served / "registry.db")
        try:
            wait_for(lambda: registry.telemetry_summary("digits-mlp:1")["inferences"] >= 60, 30, "their requests")
        finally:
            registry.close()
        time.sleep(1.5)                                 # past its samples: nobody went offline, nothing exited
        assert sim.proc.poll() is None
        assert all(d["state"] != "offline" for d in _devices(served, "wait").values())
        code, out, err, took = sim.signal(signal.SIGINT)
    finally:
        sim.kill()
    _no_abort(err)
    assert code == 130, err
    assert "devices online 3/3, updated 0/3, served 0" in err      # what the progress line counts
    assert took < 5.0        # generous for a loaded machine; stopping device by device took 5 s each
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("3 devices served 60 requests; updated 3/3; running: digits-mlp:1 on 3; "
                              "stopped by SIGINT"), out
    wait_for(lambda: all(d["state"] == "offline" for d in _devices(served, "wait").values()), 30,
             "each device to say it went offline")


def run_cli_subprocess(*argv: str) -> tuple[int, str, str]:
    proc = subprocess.run(_cli(*argv), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_sigint_while_every_device_is_inside_onnxruntime_ends_without_abort(served, capsys):
    """The "terminate called without an active exception / Aborted" of issue 14: the process
    exited while device threads were still running inferences. Each device now stops between two
    requests and is joined before the agents stop and the process exits."""
    code, _, err = run_cli(["publish", "-w", str(served), "digits-mlp:1", "--tier", TIER], capsys)
    assert code == 0, err
    sim = Proc("simulate", "-w", str(served), "--devices", "2", "--samples", "1000000", "--prefix", "busy")
    registry = Registry(served / "registry.db")
    try:
        both = [f"busy-{TIER}-00000", f"busy-{TIER}-00001"]
        wait_for(lambda: all(registry.telemetry_count([d]) >= 5 for d in both), 60, "both devices to be serving")
        code, out, err, took = sim.signal(signal.SIGINT)
    finally:
        registry.close()
        sim.kill()
    _no_abort(err)
    assert code == 130 and took < 5.0, err           # it stopped mid-request-stream, not after a million
    assert "stopped by SIGINT" in out.strip().splitlines()[-1]


def test_simulate_ends_on_its_duration_and_sigterm_exits_143(served):
    sim = Proc("simulate", "-w", str(served), "--devices", "2", "--duration", "2", "--prefix", "dur")
    try:
        online = sim.wait_line("simulated devices online")
        code, out, err = sim.finish()
    finally:
        sim.kill()
    _no_abort(err)
    assert code == 0, err
    ran = sim.last_line_at() - online                 # the duration counts from the start, before coming online
    assert ran < 2 + 3.0, f"its summary came {ran:.1f} s after coming online"
    after = float(out.strip().splitlines()[-1].rsplit("stopped by duration after ", 1)[1].split()[0])
    assert 2.0 <= after < 3.5, out                    # the whole duration, and not much more
    term = Proc("simulate", "-w", str(served), "--devices", "2", "--prefix", "term", "--json")
    try:
        wait_for(lambda: len(_devices(served, "term")) == 2, 60, "the devices to come online")
        code, out, err, took = term.signal(signal.SIGTERM)
    finally:
        term.kill()
    _no_abort(err)
    assert code == 143 and took < 5.0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped_by"] == "SIGTERM" and result["devices"] == 2 and result["online"] == 2


def test_on_a_terminal_the_progress_line_says_what_it_counts_and_is_redrawn_in_place(served):
    import fcntl
    import pty
    import termios

    def own_terminal() -> None:          # the child's controlling terminal, it in the foreground
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    master, slave = pty.openpty()
    proc = subprocess.Popen(_cli("simulate", "-w", str(served), "--devices", "2", "--duration", "2", "--prefix",
                                 "tty"), stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=_env(),
                            preexec_fn=own_terminal)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:                   # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert proc.wait(30) == 0
    text = shown.decode(errors="replace")
    _no_abort(text)
    redraws = text.count("\r\x1b[2Kdevices online 2/2, updated ")
    assert redraws >= 3, text             # one line, rewritten in place while it runs
    assert ", served " in text and "stopped by duration" in text


def test_swarm_stopped_by_sigint_in_the_middle_of_its_downloads_exits_130_without_a_traceback(served, capsys):
    code, _, err = run_cli(["publish", "-w", str(served), "digits-mlp:1", "--tier", TIER], capsys)
    assert code == 0, err                     # every device downloads it as soon as it connects
    swarm = Proc("swarm", "-w", str(served), "--devices", "3", "--prefix", "sw", "--install-s", "5")
    try:
        swarm.wait_line("devices connected")
        code, out, err, took = swarm.signal(signal.SIGINT)
    finally:
        swarm.kill()
    _no_abort(err)
    assert code == 130 and took < 5.0, err
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("3 devices (3 edge-gateway): 3 downloading") and "stopped by SIGINT" in summary


def test_swarm_sample_rate_sends_labelled_samples_every_telemetry_period(served, capsys):
    code, _, err = run_cli(["publish", "-w", str(served), "digits-mlp:1", "--tier", TIER], capsys)
    assert code == 0, err
    code, out, err = run_cli_subprocess("swarm", "-w", str(served), "--devices", "2", "--prefix", "sws",
                                        "--telemetry-s", "1", "--sample-rate", "1", "--duration", "4", "--json")
    _no_abort(err)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["stopped_by"] == "duration"
    registry = Registry(served / "registry.db")
    try:
        def samples() -> tuple[list, list]:
            xs, ys, ids = registry.device_samples()
            return [x for x, i in zip(xs, ids) if i.startswith("sws-")], [y for y, i in zip(ys, ids) if i.startswith("sws-")]
        wait_for(lambda: len(samples()[1]) >= 8, 30, "the swarm's samples to be ingested")
        xs, ys = samples()
    finally:
        registry.close()
    assert all(len(x) == 64 for x in xs) and set(ys) <= set(range(10))    # digits rows with their labels


# -- the closed loop from the command line -------------------------------------------------------
def test_the_readme_pipeline_retrains_on_what_simulate_sample_rate_sent_and_rolls_it_out(served, tmp_path, capsys):
    """README: serve &, simulate --sample-rate &, publish, pipeline run digits-retrain.toml. The
    shipped pipeline file with fewer epochs and samples, to keep the test short."""
    shipped = (ROOT / "cloud" / "loop" / "pipelines" / "digits-retrain.toml").read_text()
    assert "epochs = 30" in shipped and "min_samples = 200" in shipped
    pipe = tmp_path / "digits-retrain.toml"
    pipe.write_text(shipped.replace("epochs = 30", "epochs = 3").replace("min_samples = 200", "min_samples = 60"))
    code, out, err = run_cli(["pipeline", "run", str(pipe), "-w", str(served), "--no-rollout"], capsys)
    assert code == 2 and "edgeloop simulate --devices 20 --sample-rate 0.5" in err           # no samples yet: the CLI fix
    sim = Proc("simulate", "-w", str(served), "--devices", "4", "--samples", "60", "--sample-rate", "1",
               "--prefix", "loop")
    try:
        sim.wait_line("simulated devices online")
        code, _, err = run_cli(["publish", "-w", str(served), "digits-mlp:1", "--tier", TIER], capsys)
        assert code == 0, err

        def sampled() -> int:
            registry = Registry(served / "registry.db")
            try:
                _, ys, ids = registry.device_samples()
                return sum(i.startswith("loop-") for i in ids)
            finally:
                registry.close()
        wait_for(lambda: sampled() >= 4 * 3 * 8, 60, "every device's labelled samples (8 per window)")
        code, out, err = run_cli(["pipeline", "run", str(pipe), "-w", str(served)], capsys)
        assert code == 0, err + out
        assert "succeeded" in out and "promote: digits-mlp:2 is production" in out
        wait_for(lambda: all(d["model_version"] == "digits-mlp:2" for d in _devices(served, "loop").values()), 60,
                 "the rollout to reach every simulated device")
        code, out, err, _ = sim.signal(signal.SIGINT)
    finally:
        sim.kill()
    _no_abort(err)
    assert code == 130
    assert "updated 4/4; running: digits-mlp:2 on 4" in out.strip().splitlines()[-1], out
