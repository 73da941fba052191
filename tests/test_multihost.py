"""Two hosts, one fleet (issue 16, docs/multihost.md): two `edgeloop serve` processes, each in its
own workspace folder (host 2 made with ``edgeloop init --join``) with its own ingest workers,
rollout controller, repository server and API, against one PostgreSQL store and one broker. A
small load balancer (``Balancer``, what the workspace's ``http.public_url`` names) fronts both
repository servers. Real agents update through a staged rollout; mid-rollout one serve is
killed with SIGKILL. The rollout must complete with every device updated, each sent exactly one
command for it (counted on the broker), every telemetry record the devices numbered stored exactly
once, and both hosts' APIs must answer the same status while both run.

Real components: a private Mosquitto, a private PostgreSQL, `edgeloop serve` subprocesses, real
agents (simulators/fleet.py) with their outboxes and TUF clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.cloud.registry import Registry
from edgeloop.cloud.rollouts.controller import RolloutController, RolloutSpec
from edgeloop.cloud.workspace import Workspace
from edgeloop.contracts.messages import Command, parse
from edgeloop.contracts.topics import Fleet
from conftest import cli_json, free_port, own_broker, run_cli, wait_for
from tests.pg_server import pg_server  # noqa: F401 - fixture

broker = pytest.fixture(scope="module", name="broker")(own_broker)

ROOT = Path(__file__).resolve().parent.parent
TIER = "edge-gateway"
DEVICES = 12
VERSION = "digits-mlp:1"


class Balancer:
    """A TCP load balancer: each connection goes to the first backend that accepts it (what an
    operator puts in front of every host's repository server)."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        for backend in self.backends:
            try:
                upstream = socket.create_connection(backend, timeout=2)
                break
            except OSError:
                continue
        else:
            client.close()
            return
        upstream.settimeout(None)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.sock.close()


class Serve:
    """`edgeloop serve` of one host, in its own process."""

    def __init__(self, ws: Path, api_port: int) -> None:
        self.api = f"http://127.0.0.1:{api_port}"
        self.log = open(ws / "serve.log", "w")  # noqa: SIM115 - closed in stop
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeloop.fleet.cli", "serve", "-w", str(ws),
                                      "--api", f"127.0.0.1:{api_port}"], stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.ws = ws

    def up(self) -> bool:
        return (self.ws / "serve.json").exists() and self.proc.poll() is None

    def get(self, path: str, token: str) -> dict:
        req = urllib.request.Request(self.api + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


class Commands:
    """Every command the broker delivers on the fleet's command topics: (device, update id) counts."""

    def __init__(self, broker, fleet: str) -> None:  # noqa: ANN001
        self.seen: Counter[tuple[str, str]] = Counter()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="multihost-observer")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"{Fleet(fleet).prefix}/devices/+/cmd", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        cmd = parse(message.payload, expect=Command)
        self.seen[(message.topic, cmd.announce.update_id)] += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _with_store(ws: Path, url: str, public_url: str) -> None:
    """What the operator edits into the first host's edgeloop.toml (docs/multihost.md)."""
    text = (ws / "edgeloop.toml").read_text()
    text = text.replace("\n[mqtt]", f"store = \"{url}\"\n\n[mqtt]", 1)
    (ws / "edgeloop.toml").write_text(text.rstrip("\n") + f"\npublic_url = \"{public_url}\"\n")


def test_two_hosts_one_killed_mid_rollout_every_device_updated_once_every_record_stored_once(
        broker, pg_server, tmp_path):  # noqa: F811 - the fixture
    from edgeloop.cloud.train.datasets import load_dataset
    from edgeloop.simulators.datastream import DataStream
    from edgeloop.simulators.fleet import FleetSpec, SimulatedFleet

    url = pg_server.fresh_database()
    ws1, ws2 = tmp_path / "host1", tmp_path / "host2"
    http1, http2 = free_port(), free_port()
    balancer = Balancer([("127.0.0.1", http1), ("127.0.0.1", http2)])
    public = f"http://127.0.0.1:{balancer.port}/repository"
    Workspace.init(ws1, mqtt=broker.address, http=f"127.0.0.1:{http1}")
    _with_store(ws1, url, public)
    cli_json("init", "-w", str(ws1))
    cli_json("train", "-w", str(ws1), "--epochs", "1")
    cli_json("package", "-w", str(ws1), VERSION, "--tier", TIER)
    joined = cli_json("init", "-w", str(ws2), "--join", str(ws1), "--host", "h2", "--http", f"127.0.0.1:{http2}")
    assert joined["host"] == "h2"
    from edgeloop.fleet.broker import share_group
    assert share_group(Workspace.open(ws2)) == share_group(Workspace.open(ws1))    # one group, made by the join
    token = cli_json("tokens", "create", "-w", str(ws1), "--name", "multihost", "--role", "viewer")["token"]
    host = Workspace.open(ws1)
    serves = [Serve(ws1, free_port()), Serve(ws2, free_port())]
    commands = Commands(broker, host.fleet)
    _, _, test = load_dataset().split()
    spec = FleetSpec(devices=DEVICES, tier=TIER, state_root=tmp_path / "devices", mqtt_host=broker.host,
                     mqtt_port=broker.port, fleet=host.fleet, image_root=host.image_repository().trusted_root(),
                     director_root=host.director_repository().trusted_root(), samples=60, prefix="mh",
                     per_version=True, agent_overrides={"confirm_timeout_s": 3.0})
    fleet = SimulatedFleet(spec, DataStream(test.x, test.y))
    registry = Registry(url)
    try:
        wait_for(lambda: all(s.up() for s in serves), 60, "both serves up")
        second = subprocess.run([sys.executable, "-m", "edgeloop.fleet.cli", "serve", "-w", str(ws2)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 2 and "another edgeloop serve is serving" in second.stderr  # one per folder
        ws3 = tmp_path / "host3"                         # another folder under a name a running host has
        cli_json("init", "-w", str(ws3), "--join", str(ws1), "--host", "h2")
        third = subprocess.run([sys.executable, "-m", "edgeloop.fleet.cli", "serve", "-w", str(ws3)], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
        assert third.returncode == 2 and "another host's edgeloop serve runs as 'h2'" in third.stderr, third.stderr
        assert len(third.stderr.strip().splitlines()) == 1
        # each host its own persistent ingest session (and MQTT client id): neither takes the other's over
        assert f"as session edgeloop-ingest-{host.fleet} " in (ws1 / "serve.log").read_text()
        assert f"as session edgeloop-ingest-{host.fleet}-h2 " in (ws2 / "serve.log").read_text()
        assert f"(devices download through {public})" in (ws2 / "serve.log").read_text()
        fleet.start()
        wait_for(lambda: len(registry.devices(tier=TIER)) == DEVICES, 60, "every device's status stored")
        ctl = RolloutController(host, registry, lambda d, c: None, repository_url=public)
        rid = ctl.create(RolloutSpec(VERSION, f"tier={TIER}", strategy="waves", wave_size=2, growth=2.0, resend_s=3.0))
        wait_for(lambda: ctl.status(rid)["counts"]["committed"] >= 2, 60, "the first wave committed")

        def same_status() -> bool:            # both hosts' APIs answer for the one store
            one, two = (s.get(f"/api/v1/rollouts/{rid}", token) for s in serves)
            return one["rollout_id"] == rid and (one["state"], one["counts"]) == (two["state"], two["counts"])
        wait_for(same_status, 20, "both APIs to answer the same status")
        killed_at = time.monotonic()
        serves[0].proc.send_signal(signal.SIGKILL)          # host 1 dies mid-rollout: no drain, no goodbye
        serves[0].proc.wait(10)
        assert ctl.status(rid)["state"] == "waves"
        wait_for(lambda: ctl.status(rid)["state"] == "completed", 90, "host 2 to complete the rollout")
        took = time.monotonic() - killed_at
        status = serves[1].get(f"/api/v1/rollouts/{rid}", token)
        assert status["state"] == "completed" and status["counts"]["committed"] == DEVICES, status
        wait_for(lambda: fleet.updated_count() == DEVICES, 30, "every agent running the update")
        # each device got exactly one command for the update, as the broker delivered them
        update_ids = registry.rollout_update_ids(rid)
        per_device = Counter(topic for (topic, u), n in commands.seen.items() if u in update_ids for _ in range(n))
        assert len(per_device) == DEVICES and set(per_device.values()) == {1}, per_device
        # every telemetry record each device numbered is stored exactly once (none lost, none twice)
        wait_for(lambda: all(len(r.agent.outbox) == 0 for r in fleet.runs), 60, "every record confirmed")
        issued = {r.agent.config.device_id: r.agent.seq.issued for r in fleet.runs}
        assert all(n >= 3 for n in issued.values()), issued
        stored: dict[str, list[int]] = {}
        for row in registry.telemetry_records():
            stored.setdefault(row["device_id"], []).append(row["seq"])
        assert {d: sorted(s) for d, s in stored.items()} == {d: list(range(n)) for d, n in issued.items()}
        print(json.dumps({"devices": DEVICES, "takeover_to_complete_s": round(took, 1)}))
    finally:
        fleet.stop(drain_s=1.0)
        commands.close()
        for s in serves:
            s.stop()
        registry.close()
        balancer.close()


# -- making a host: bad input is one line, exit 2, nothing made ---------------------------------------
@pytest.fixture
def shared(tmp_path):
    ws = tmp_path / "ws"
    Workspace.init(ws, mqtt="127.0.0.1:1")
    return ws


def _one_line(code: int, err: str, *parts: str) -> None:
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


def test_joining_a_workspace_whose_store_is_its_sqlite_file_is_refused(shared, tmp_path, capsys):
    code, _, err = run_cli(["init", "-w", str(tmp_path / "h2"), "--join", str(shared)], capsys)
    _one_line(code, err, "one host serves", "store = ")
    assert not (tmp_path / "h2").exists()


@pytest.mark.parametrize("extra, parts", [
    (["--host", "Bad_Name"], ("invalid host name",)),
    (["--fleet", "other"], ("--join takes the fleet",)),
])
def test_a_bad_host_name_or_a_second_fleet_is_refused(shared, tmp_path, capsys, extra, parts):
    _with_store(shared, "postgresql://edgeloop@127.0.0.1:1/edgeloop", "http://127.0.0.1:1/repository")
    code, _, err = run_cli(["init", "-w", str(tmp_path / "h2"), "--join", str(shared), *extra], capsys)
    _one_line(code, err, *parts)
    assert not (tmp_path / "h2").exists()


def test_a_host_folder_that_exists_is_refused_and_host_needs_join(shared, tmp_path, capsys):
    _with_store(shared, "postgresql://edgeloop@127.0.0.1:1/edgeloop", "http://127.0.0.1:1/repository")
    (tmp_path / "h2").mkdir()
    code, _, err = run_cli(["init", "-w", str(tmp_path / "h2"), "--join", str(shared)], capsys)
    _one_line(code, err, "exists")
    assert list((tmp_path / "h2").iterdir()) == []
    code, _, err = run_cli(["init", "-w", str(tmp_path / "h3"), "--host", "h3"], capsys)
    _one_line(code, err, "--join")


def test_a_malformed_host_or_public_url_in_the_config_is_refused_when_opened(shared, capsys):
    text = (shared / "edgeloop.toml").read_text()
    (shared / "edgeloop.toml").write_text(text.rstrip("\n") + '\npublic_url = "ftp://x"\n')
    code, _, err = run_cli(["status", "-w", str(shared)], capsys)
    _one_line(code, err, "public_url")


def test_joining_while_the_store_is_unreachable_makes_nothing(shared, tmp_path, capsys):
    _with_store(shared, f"postgresql://edgeloop@127.0.0.1:{free_port()}/edgeloop", "http://127.0.0.1:1/repository")
    code, _, err = run_cli(["init", "-w", str(tmp_path / "h2"), "--join", str(shared)], capsys)
    assert code == 3 and "cannot reach the store" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "h2").exists()


def test_hosts_starting_at_once_make_one_share_group(shared):
    """Every serve of a fleet must subscribe in one group, or each would take the whole stream."""
    start = time.time() + 1.5
    code = ("import sys, time; from pathlib import Path; from edgeloop.cloud.workspace import Workspace; "
            "from edgeloop.fleet.broker import share_group; ws = Workspace.open(Path(sys.argv[1])); "
            "time.sleep(max(0, float(sys.argv[2]) - time.time())); print(share_group(ws))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(shared), str(start)], stdout=subprocess.PIPE, text=True,
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(4)]
    names = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(names) == 1 and next(iter(names)).startswith("edgeloop-ingest-"), names
    assert sorted(p.name for p in (shared / "broker").iterdir()) == ["share-group"]     # no temporary left
