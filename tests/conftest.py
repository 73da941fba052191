"""Shared fixtures. Integration tests get a private Mosquitto on a free port, started once
per test session, so they never collide with a broker already running on the machine."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

# every Python process a test starts dumps its threads' tracebacks on SIGABRT (and on a crash), so
# a command that hangs instead of exiting can say where (exited_within)
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def exited_within(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """``proc.communicate(timeout=...)``; past the timeout, the process is sent SIGABRT and the
    test fails with where each of its threads was (faulthandler), not a bare TimeoutExpired."""
    import signal

    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, proc.args))!r} had not exited {timeout:g} s after it was told to; "
                    f"its threads then:\n{(err or '')[-6000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        raise RuntimeError("mosquitto is not installed: run `make test`, which installs it")
    return found


class Broker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = "127.0.0.1"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.persistent = False      # keep sessions and queued messages across a restart

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        conf = self.root / "mosquitto.conf"
        persistence = (f"persistence true\npersistence_location {self.root}/\n" if self.persistent
                       else "persistence false\n")
        if self.persistent and hasattr(os, "geteuid") and os.geteuid() == 0:
            # started as root, Mosquitto drops to the `mosquitto` user, which cannot write its
            # persistence file into root's pytest folders: persistence would silently be off
            persistence += "user root\n"
        conf.write_text(f"listener {self.port} {self.host}\nallow_anonymous true\n{persistence}"
                        f"log_dest file {self.root / 'mosquitto.log'}\nmax_queued_messages 10000\n")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


def own_broker(tmp_path_factory: pytest.TempPathFactory):
    """A module's own broker, for tests that select devices from what the broker retains
    (rollouts): on the session broker, other modules' devices' retained statuses would be
    ingested too, and selected. Use: ``broker = pytest.fixture(scope="module")(own_broker)``."""
    b = Broker(tmp_path_factory.mktemp("own-broker"))
    b.start()
    yield b
    b.stop()


# -- a live control plane and fleet, for over-the-air tests ------------------------------------
import uuid  # noqa: E402
from types import SimpleNamespace  # noqa: E402

TIER = "edge-gateway"


def wait_for(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def make_live(broker, tmp_path, devices: int = 2, agent_overrides: dict | None = None, server_dirs=None):
    """Workspace + image and director repositories served over HTTP + control plane + a simulated
    fleet of real agents, with version 1 of the model installed everywhere."""
    from pathlib import Path as _P

    from edgeloop.contracts.messages import Announce
    from edgeloop.cloud.ingest.control_plane import ControlPlane
    from edgeloop.cloud.train.datasets import load_dataset
    from edgeloop.cloud.loop.pipeline import package_model, train_model
    from release_primitives import assign, delta_from_current   # tests forge states the release path refuses
    from edgeloop.cloud.registry import Registry
    from edgeloop.cloud.release.repo_server import RepositoryServer
    from edgeloop.cloud.train.training import TrainParams
    from edgeloop.cloud.workspace import Workspace
    from edgeloop.simulators.datastream import DataStream
    from edgeloop.simulators.fleet import FleetSpec, SimulatedFleet

    ws = Workspace.init(tmp_path / "ws", mqtt=broker.address)
    registry = Registry(ws.registry_path)
    repo, director = ws.image_repository(), ws.director_repository()
    repo.init()
    director.init()
    server = RepositoryServer(ws.repository_dir, director_dir=ws.director_dir).start()
    from edgeloop.cloud.ingest.time_server import TimeServer
    cp = ControlPlane(registry, broker.host, broker.port, fleet=ws.fleet,
                      repositories={"image": ws.repository_dir, "director": ws.director_dir},
                      time_server=TimeServer.for_director(director)).start()
    _, _, test = load_dataset().split()
    env = SimpleNamespace(ws=ws, registry=registry, repo=repo, director=director, server=server, cp=cp,
                          test=test, seed=0, repository_url=server.url, director_url=server.director_url)

    def new_version() -> str:
        env.seed += 1
        mv = train_model(ws, registry, TrainParams(seed=env.seed, epochs=3))["model_version"]
        package_model(ws, registry, mv, TIER)
        return mv

    def announce_for(mv: str, delta: dict | None = None) -> Announce:
        pkg = registry.package_for(mv, TIER)
        return Announce(update_id=f"upd-{uuid.uuid4().hex[:8]}", model="digits-mlp", model_version=mv, tier=TIER,
                        target=pkg["target"], length=pkg["length"], sha256=pkg["sha256"],
                        repository=env.repository_url, director=env.director_url, issued_at=time.time(),
                        delta=delta)

    def sign_and_announce(mv: str, after_signing=None, sign_image: bool = True, send: bool = True,
                          with_delta: bool = False):
        pkg = registry.package_for(mv, TIER)
        data = _P(registry.artifact_path(pkg["sha256"])).read_bytes()
        delta = None
        if sign_image:
            repo.add_target(pkg["target"], data)
            if with_delta:
                delta = delta_from_current(ws, registry, repo, TIER, pkg["target"], data)
        msg = announce_for(mv, delta)
        assign(ws, TIER, msg, data)
        if after_signing:
            after_signing(pkg["target"])
        if send:
            cp.announce(msg)
        return msg

    env.new_version, env.sign_and_announce, env.announce_for = new_version, sign_and_announce, announce_for
    spec = FleetSpec(devices=devices, tier=TIER, state_root=ws.fleet_dir, mqtt_host=broker.host,
                     mqtt_port=broker.port, image_root=repo.trusted_root(), director_root=director.trusted_root(),
                     fleet=ws.fleet, samples=5, prefix=f"t{uuid.uuid4().hex[:6]}", agent_overrides=agent_overrides or {})
    env.fleet = SimulatedFleet(spec, DataStream(test.x, test.y)).start()
    env.agents = [run.agent for run in env.fleet.runs]
    env.v1 = new_version()
    sign_and_announce(env.v1)
    wait_for(lambda: all(a.model_version == env.v1 for a in env.agents), what="v1 on every device")

    def close() -> None:
        env.fleet.stop()
        cp.clear_announce(TIER)
        cp.stop()
        server.stop()
        registry.close()

    env.close = close
    return env


@pytest.fixture
def live(broker, tmp_path):
    env = make_live(broker, tmp_path)
    yield env
    env.close()


def settled(env, update_id: str) -> bool:
    return all(a.last_result is not None and a.last_result.update_id == update_id for a in env.agents)


def assert_refused_and_still_serving(env, msg, code: str, model_version: str | None = None) -> None:
    """Every device refused ``msg`` with ``code``, still runs and serves its model, said why on its
    status topic, and the control plane recorded the error."""
    keep = model_version or env.v1
    wait_for(lambda: settled(env, msg.update_id), what=f"every device to refuse {msg.update_id}")
    for agent in env.agents:
        assert agent.last_result.code == code, agent.last_result
        assert agent.model_version == keep
        assert agent.installer.active_package().manifest.model_version == keep
        prediction = agent.infer(env.test.x[:1])
        assert prediction is not None and 0 <= prediction[0] < 10
    ids = {a.device_id for a in env.agents}

    def reported() -> bool:
        env.cp.drain()
        rows = {d["device_id"]: d for d in env.registry.devices() if d["device_id"] in ids}
        errors = {e["device_id"] for e in env.registry.device_errors()
                  if e["update_id"] == msg.update_id and e["code"] == code}
        return errors == ids and len(rows) == len(ids) and all(
            r["state"] in ("failed", "rolled_back") and r["model_version"] == keep and
            r["update_id"] == msg.update_id and r["reason"] for r in rows.values())
    wait_for(reported, what="the refusals to reach the control plane")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:  # noqa: ANN001
    """``edgeloop ARGV`` in this process: (exit code, stdout, stderr)."""
    from edgeloop.fleet.cli import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(*argv: str) -> dict:
    """``edgeloop ARGV --json`` in this process, outside capsys (module fixtures): its JSON result;
    fails the test on a non-zero exit, with the command's stderr."""
    import contextlib
    import io
    import json

    from edgeloop.fleet.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*argv, "--json"])
    assert code == 0, (argv, err.getvalue())
    return json.loads(out.getvalue().splitlines()[-1])


def edge_gateway_package(epochs: int = 1):
    """A small digits model packaged for the edge-gateway tier (fp32 ONNX, no signing), with the
    held-out test split: (PackageResult, test split). For tests that install it directly."""
    from edgeloop.cloud.train.datasets import load_dataset
    from edgeloop.cloud.package.export import export_onnx
    from edgeloop.cloud.package.packaging import build_package
    from edgeloop.cloud.train.training import TrainParams, train
    ds = load_dataset()
    _, _, test = ds.split()
    r = train(ds, TrainParams(epochs=epochs))
    return build_package("m", 1, "edge-gateway", export_onnx(r.model, 64), r.features, [str(i) for i in range(10)],
                         test.x[:8], {}), test
