"""Two workspaces on one broker (docs/contracts/mqtt.md, topics v2): every topic carries the
workspace's fleet id, so neither fleet sees the other's devices, retained announcements,
telemetry, statuses or rollouts, in either direction. Real Mosquitto, real agents, real
control planes and rollout controllers, real SQLite.

Also: the workspace's fleet id (generated once at init, settable, "default" for a workspace
written before fleet ids) and refusing a malformed one with one line."""

from __future__ import annotations

import queue
import sqlite3
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.cloud.rollouts.controller import RolloutController, RolloutSpec
from edgeloop.cloud.workspace import Workspace
from conftest import TIER, make_live, own_broker, run_cli, wait_for
from edgeloop.contracts.messages import Announce, parse
from edgeloop.contracts.topics import Fleet
from edgeloop.device_sdk.agent import Agent, AgentConfig
from edgeloop.device_sdk.tuf_fetch import provision

pytestmark = pytest.mark.e2e

broker = pytest.fixture(scope="module", name="broker")(own_broker)
DEVICES = 3


@pytest.fixture(scope="module")
def fleets(broker, tmp_path_factory):
    """Fleets A and B: two workspaces, each with its control plane, repository server and three
    real agents of the same tier, on one broker; each has installed its own v1."""
    a = make_live(broker, tmp_path_factory.mktemp("fleet-a"), devices=DEVICES)
    b = make_live(broker, tmp_path_factory.mktemp("fleet-b"), devices=DEVICES)
    for env in (a, b):
        env.ids = {agent.device_id for agent in env.agents}
    yield a, b
    b.close()
    a.close()


def _both_ways(fleets):
    a, b = fleets
    return [(a, b), (b, a)]


def _tables(env) -> dict[str, set[str]]:
    env.cp.drain()
    with sqlite3.connect(env.ws.registry_path) as db:
        return {table: {d for (d,) in db.execute(f"select distinct device_id from {table}")}
                for table in ("devices", "telemetry", "device_errors")}


def test_two_workspaces_get_different_fleet_ids_and_topics(fleets):
    a, b = fleets
    assert a.ws.fleet != b.ws.fleet
    assert a.cp.topics == Fleet(a.ws.fleet) and b.cp.topics == Fleet(b.ws.fleet)
    assert all(agent.topics == Fleet(a.ws.fleet) for agent in a.agents)
    assert a.cp.group != b.cp.group                         # the shared-subscription groups differ too


def test_neither_control_plane_stores_the_other_fleets_devices_statuses_or_telemetry(fleets):
    for mine, theirs in _both_ways(fleets):
        wait_for(lambda: _tables(mine)["telemetry"] == mine.ids, what="every device's telemetry")
        tables = _tables(mine)
        assert tables["devices"] == mine.ids, tables            # only its own devices' statuses
        assert tables["telemetry"] == mine.ids
        assert not (tables["device_errors"] & theirs.ids)
        assert mine.cp.stats.malformed == 0                     # nothing of the other fleet even arrived


def test_an_announcement_reaches_only_its_own_fleet_even_when_retained(fleets, tmp_path):
    a, b = fleets
    updates = {}
    for env in (a, b):            # each fleet's agents installed only their own fleet's v1
        (update,) = {agent.last_result.update_id for agent in env.agents}
        updates[env.ws.fleet] = update
    assert len(set(updates.values())) == 2
    for env in (a, b):
        assert all(agent.installer.model_version == env.v1 and not agent.malformed for agent in env.agents)
    # a raw subscriber of each fleet's announcements gets exactly that fleet's retained one
    for env in (a, b):
        got = _retained(env, f"{Fleet(env.ws.fleet).prefix}/updates/#")
        assert [(t, m.update_id) for t, m in got] == [(Fleet(env.ws.fleet).announce(TIER), updates[env.ws.fleet])]
    # a device of B that connects late gets B's retained announcement, never A's
    state = tmp_path / "late-b"
    provision(state / "tuf", b.repo.trusted_root(), b.director.trusted_root())
    late = Agent(AgentConfig(device_id=f"late-{uuid.uuid4().hex[:6]}", tier=TIER, state_dir=state,
                             mqtt_host=b.ws.mqtt_host, mqtt_port=b.ws.mqtt_port, fleet=b.ws.fleet))
    late.start()
    try:
        def installed() -> bool:
            late.step(0.05)
            return late.last_result is not None
        wait_for(installed, what="the late device to install its fleet's announcement")
        assert late.last_result.update_id == updates[b.ws.fleet] and late.model_version == b.v1
    finally:
        late.stop()


def _retained(env, topic_filter: str) -> list[tuple[str, Announce]]:
    got: queue.Queue = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peek-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    c.on_message = lambda c_, u, m: got.put((m.topic, bytes(m.payload)))
    c.connect(env.ws.mqtt_host, env.ws.mqtt_port)
    c.loop_start()
    try:
        c.subscribe(topic_filter, qos=1)
        out = []
        while True:
            try:
                topic, payload = got.get(timeout=1.0)
            except queue.Empty:
                return out
            if payload:
                out.append((topic, parse(payload, expect=Announce)))
    finally:
        c.disconnect()
        c.loop_stop()


def test_a_tier_rollout_selects_and_updates_only_its_own_fleets_devices(fleets):
    for mine, theirs in _both_ways(fleets):
        before = {agent.device_id: (agent.model_version, agent.last_result.update_id) for agent in theirs.agents}
        v2 = mine.new_version()
        ctl = RolloutController(mine.ws, mine.registry, mine.cp.send_command, repository_url=mine.repository_url,
                                director_url=mine.director_url)
        rid = ctl.create(RolloutSpec(v2, f"tier={TIER}"))
        with sqlite3.connect(mine.ws.registry_path) as db:
            selected = {d for (d,) in db.execute("select device_id from rollout_devices where rollout_id = ?", [rid])}
        assert selected == mine.ids                              # same tier, other fleet: not selected

        def done() -> bool:
            mine.cp.drain(1.0)
            ctl.step()
            return ctl.status(rid)["state"] in ("completed", "aborted")
        wait_for(done, timeout=60, what="the rollout to finish", interval=0.1)
        assert ctl.status(rid)["state"] == "completed"
        assert all(agent.model_version == v2 for agent in mine.agents)
        for agent in theirs.agents:                              # untouched: no command reached them
            agent.step(0.05)
            assert (agent.model_version, agent.last_result.update_id) == before[agent.device_id]
        assert not (set().union(*_tables(theirs).values()) & mine.ids)     # nothing of this fleet stored there


# -- the workspace's fleet id -------------------------------------------------------------------------
def test_fleet_id_is_generated_once_at_init_and_kept(tmp_path, capsys):
    import json

    code, out, err = run_cli(["init", "-w", str(tmp_path / "ws"), "--json"], capsys)
    assert code == 0, err
    fleet = json.loads(out.splitlines()[-1])["fleet"]
    assert Workspace.open(tmp_path / "ws").fleet == fleet
    code, out, _ = run_cli(["init", "-w", str(tmp_path / "ws"), "--json", "--fleet", "other"], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["fleet"] == fleet      # an existing one is kept
    assert Workspace.init(tmp_path / "ws2").fleet != fleet


def test_fleet_id_is_settable_at_init(tmp_path, capsys):
    code, _, err = run_cli(["init", "-w", str(tmp_path / "ws"), "--fleet", "acme-prod"], capsys)
    assert code == 0, err
    assert Workspace.open(tmp_path / "ws").fleet == "acme-prod"
    assert Workspace.open(tmp_path / "ws").topics.status("gw-1") == "edgeloop/v2/acme-prod/devices/gw-1/status"


@pytest.mark.parametrize("bad", ["Acme", "acme/x", "#", "+", "a" * 33, "-acme", "ac me"])
def test_malformed_fleet_id_at_init_is_one_line_and_creates_nothing(tmp_path, capsys, bad):
    code, out, err = run_cli(["init", "-w", str(tmp_path / "ws"), f"--fleet={bad}"], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "invalid fleet id" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "ws").exists()


def test_workspace_written_before_fleet_ids_is_fleet_default(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    config = ws.root / "edgeloop.toml"
    config.write_text("\n".join(ln for ln in config.read_text().splitlines() if not ln.startswith("fleet")))
    assert Workspace.open(ws.root).fleet == "default"
    assert Workspace.open(ws.root).topics.announce(TIER) == f"edgeloop/v2/default/updates/{TIER}"


def test_malformed_fleet_id_in_the_config_is_one_line(tmp_path, capsys):
    ws = Workspace.init(tmp_path / "ws")
    config = ws.root / "edgeloop.toml"
    config.write_text(config.read_text().replace(f'fleet = "{ws.fleet}"', 'fleet = "a/#"'))
    code, out, err = run_cli(["status", "-w", str(ws.root)], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "invalid fleet id" in lines[0], err
