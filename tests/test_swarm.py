"""The fleet-scale simulator (simulators/swarm.py) under the real rollout controller.

Real components: a private Mosquitto over TCP, the control plane ingesting into SQLite, the
repository served over HTTP, python-tuf verifying signed director and image metadata, and
cloud/rollouts/controller.py's controller sending commands. Only the devices' hardware is simulated.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import json

import pytest
from edgeloop.cloud.store.readonly import query as raw_rows

from conftest import wait_for
from edgeloop.contracts.messages import Announce, Command, DeviceState
from edgeloop.simulators.swarm import NetworkProfile, SwarmConfig, SwarmThread, _tiers, parse_tier_mix

from conftest import own_broker  # noqa: E402

# this module's own broker: rollouts select devices from the statuses a broker retains
broker = pytest.fixture(scope="module", name="broker")(own_broker)

TIER = "edge-gateway"


@pytest.fixture(scope="module")
def env(broker, tmp_path_factory):
    from edgeloop.cloud.ingest.control_plane import ControlPlane
    from edgeloop.cloud.loop.pipeline import package_model, train_model
    from edgeloop.cloud.registry import Registry
    from edgeloop.cloud.release.repo_server import RepositoryServer
    from edgeloop.cloud.train.training import TrainParams
    from edgeloop.cloud.workspace import Workspace

    ws = Workspace.init(tmp_path_factory.mktemp("swarm") / "ws", mqtt=broker.address)
    registry = Registry(ws.registry_path)
    ws.image_repository().init()
    ws.director_repository().init()
    server = RepositoryServer(ws.repository_dir, director_dir=ws.director_dir).start()
    cp = ControlPlane(registry, broker.host, broker.port).start()
    versions = []
    for seed in (1, 2):
        mv = train_model(ws, registry, TrainParams(seed=seed, epochs=2))["model_version"]
        package_model(ws, registry, mv, TIER)
        versions.append(mv)
    e = SimpleNamespace(ws=ws, registry=registry, server=server, cp=cp, broker=broker, v1=versions[0],
                        v2=versions[1])
    yield e
    cp.stop()
    server.stop()
    registry.close()


def start_swarm(env, devices: int, **overrides) -> SwarmThread:
    """A swarm on v1, every device registered by the control plane from its ``online`` status."""
    prefix = f"s{uuid.uuid4().hex[:6]}"
    v1_package = Path(env.registry.artifact_path(env.registry.package_for(env.v1, TIER)["sha256"])).read_bytes()
    config = SwarmConfig(devices=devices, mqtt_host=env.broker.host, mqtt_port=env.broker.port,
                         image_root=env.ws.image_repository().trusted_root(),
                         director_root=env.ws.director_repository().trusted_root(),
                         state_dir=env.ws.root / f"swarm-{prefix}", prefix=prefix, initial_version=env.v1,
                         initial_packages={TIER: v1_package}, install_s=0.01, health_s=0.01, heartbeat_s=0, **overrides)
    swarm = SwarmThread(config).start(timeout=60)
    ids = set(swarm.read(lambda s: s.device_ids()))

    def registered() -> bool:
        env.cp.drain()
        return len([d for d in env.registry.devices(tier=TIER) if d["device_id"] in ids]) == devices
    wait_for(registered, timeout=60, what="the control plane to register every simulated device")
    swarm.ids = ids
    return swarm


def forget(env, swarm: SwarmThread) -> None:
    """Stop the swarm and drop its devices from the registry, so the next test selects only its own."""
    swarm.stop()
    env.cp.drain()
    for device_id in swarm.ids:
        env.registry.forget_device(device_id)


def run_rollout(env, spec, timeout: float = 50.0) -> tuple[str, dict]:
    from edgeloop.cloud.rollouts.controller import RolloutController

    ctl = RolloutController(env.ws, env.registry, send=env.cp.send_command, repository_url=env.server.url)
    rid = ctl.create(spec)

    def finished() -> bool:
        ctl.step()
        return ctl.status(rid)["state"] in ("completed", "aborted")
    wait_for(finished, timeout=timeout, what=f"rollout {rid} to finish", interval=0.05)
    return rid, ctl.status(rid)


def test_500_devices_canary_then_waves_all_commit_with_one_command_each(env):
    from edgeloop.cloud.rollouts.controller import RolloutSpec

    swarm = start_swarm(env, 500)
    try:
        began = time.time()
        rid, status = run_rollout(env, RolloutSpec(model_version=env.v2, target=f"tier={TIER}", strategy="canary",
                                                   canary="5%", bake_s=0.2, growth=2.0, max_failure_pct=5,
                                                   min_devices=10))
        seconds = time.time() - began
        report = swarm.read(lambda s: s.report(per_device=True))
    finally:
        forget(env, swarm)
    assert status["state"] == "completed", status
    assert status["counts"]["committed"] == 500 and status["counts"]["failed"] == 0
    assert report["states"] == {"committed": 500}
    assert {d["model_version"] for d in report["per_device"]} == {env.v2}
    assert report["commands"] == 500, "a device was sent its command more than once"
    assert report["tuf_verifications"] == 1 and report["downloads"] == 500
    waves = raw_rows(env.registry.path, "select wave, count(*) as n, min(sent_at) as first_sent, "
                                        "max(finished_at) as last_done from rollout_devices where rollout_id = ? "
                                        "group by wave order by wave", [rid])
    assert waves[0]["n"] == 25, "the canary is 5% of 500"
    assert len(waves) >= 3 and waves[2]["n"] > waves[1]["n"], "waves grow"
    done = raw_rows(env.registry.path, "select wave, finished_at from rollout_devices where rollout_id = ?", [rid])
    for before, after in zip(waves, waves[1:]):
        # a wave ends at its success share (90% by default), not at its slowest device
        finished = sum(1 for d in done if d["wave"] == before["wave"] and d["finished_at"] is not None
                       and d["finished_at"] <= after["first_sent"])
        assert finished >= 0.9 * before["n"], f"wave {after['wave']} started with {finished}/{before['n']} of the last done"
    print(f"500 devices: {seconds:.1f} s, {500 / seconds * 60:.0f} updates/min, p50 "
          f"{report['command_to_commit_p50_s']} s")


def test_20pct_failing_health_checks_abort_the_rollout_and_roll_back_updated_devices(env):
    from edgeloop.cloud.rollouts.controller import RolloutSpec

    swarm = start_swarm(env, 100, fail_pct=20)
    try:
        rid, status = run_rollout(env, RolloutSpec(model_version=env.v2, target=f"tier={TIER}", strategy="canary",
                                                   canary="10", growth=2.0, max_failure_pct=10, min_devices=10))
        wait_for(lambda: swarm.read(lambda s: not any(d.agent.installing for d in s.devices)), what="installs to settle")
        report = swarm.read(lambda s: s.report(per_device=True))
    finally:
        forget(env, swarm)
    assert status["state"] == "aborted" and "install failures" in status["reason"], status
    counts = status["counts"]
    assert counts["committed"] == 0 and counts["rollback_failed"] == 0, counts
    assert counts["rolled_back"] >= 1 and counts["failed"] >= 1, counts
    assert counts["cancelled"] + counts["failed"] + counts["rolled_back"] + counts["timed_out"] == 100
    # nothing is left on the new version: the updated devices went back, the faulty ones never left
    assert {d["model_version"] for d in report["per_device"]} == {env.v1}
    faulty = [d for d in report["per_device"] if d["faulty"] and d["state"] == "rolled_back"]
    assert faulty and all(d["reason"].startswith("health.golden") for d in faulty)


def test_devices_that_lose_their_connection_or_downloads_mid_rollout_still_commit(env):
    from edgeloop.cloud.rollouts.controller import RolloutSpec

    swarm = start_swarm(env, 40, network=NetworkProfile(latency_ms=20, drop_pct=30, reconnect_s=0.3),
                        download_retries=6)
    try:
        from edgeloop.cloud.rollouts.controller import RolloutController

        ctl = RolloutController(env.ws, env.registry, send=env.cp.send_command, repository_url=env.server.url)
        rid = ctl.create(RolloutSpec(model_version=env.v2, target=f"tier={TIER}", strategy="all"))
        swarm.read(lambda s: [d.link.disconnect_abruptly() for d in s.devices[:10]])   # the links drop now
        ctl.step()

        def finished() -> bool:
            ctl.step()
            return ctl.status(rid)["state"] in ("completed", "aborted")
        wait_for(finished, timeout=50, what="the rollout to finish", interval=0.05)
        status = ctl.status(rid)
        report = swarm.read(lambda s: s.report())
    finally:
        forget(env, swarm)
    assert status["state"] == "completed" and status["counts"]["committed"] == 40, status
    assert report["states"] == {"committed": 40}
    assert report["disconnects"] == 10 and report["reconnects"] >= 10
    assert report["download_retries"] >= 1


def test_forged_command_for_an_unassigned_update_is_refused_by_every_device(env):
    """The announcement names a real, image-signed package, but the director never assigned this
    update to the group: every device refuses it (verify.director) and stays on v1."""
    pkg = env.registry.package_for(env.v2, TIER)
    data = Path(env.registry.artifact_path(pkg["sha256"])).read_bytes()
    env.ws.image_repository().add_target(pkg["target"], data)
    forged = Announce(update_id="upd-forged0001", model="digits-mlp", model_version=env.v2, tier=TIER,
                      target=pkg["target"], length=pkg["length"], sha256=pkg["sha256"],
                      repository=env.server.url, director=env.server.director_url, issued_at=time.time(),
                      group="nobody-assigned-this")
    swarm = start_swarm(env, 20)
    try:
        for device_id in swarm.ids:
            env.cp.send_command(device_id, Command("install", "ro-forged", forged, time.time()))
        wait_for(lambda: swarm.read(lambda s: s.counts()) == {"failed": 20}, what="every device to refuse")
        report = swarm.read(lambda s: s.report(per_device=True))
    finally:
        forget(env, swarm)
    assert {d["model_version"] for d in report["per_device"]} == {env.v1}
    assert all("does not assign" in d["reason"] for d in report["per_device"])


def test_tier_mix_is_split_exactly_and_bad_mixes_are_refused():
    mix = parse_tier_mix("edge-gateway:0.7,mcu:0.3")
    tiers = _tiers(10, mix)
    assert tiers.count("edge-gateway") == 7 and tiers.count("mcu") == 3
    assert len(_tiers(7, parse_tier_mix("a:1,b:1,c:1"))) == 7
    for bad in ("", "Edge:1", "mcu:-1", "mcu:x", "mcu:nan"):
        with pytest.raises(ValueError):
            parse_tier_mix(bad)


def test_simulators_define_no_second_device_or_install_state_machine():
    """The one install state machine is device_sdk/ota.py's: nothing in simulators/ has a
    transition table, an install-state enum or a class with the install's states."""
    import ast

    from edgeloop.contracts.messages import DeviceState
    from edgeloop.device_sdk.ota import InstallState

    states = {str(s) for s in InstallState} | {str(s) for s in DeviceState}
    for path in sorted(Path("simulators").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                assert not names & {"TRANSITIONS", "_TRANSITIONS"}, f"{path} defines a transition table"
            if isinstance(node, ast.ClassDef):
                values = {n.value.value for n in node.body if isinstance(n, ast.Assign)
                          and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
                assert len(values & states) < 3, f"{path}: class {node.name} spells out install states"
    assert "SimDevice" not in Path("simulators/swarm.py").read_text()


def test_swarm_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    from edgeloop.fleet.cli import main

    ws = str(tmp_path / "ws")
    assert main(["init", "-w", ws, "--mqtt", "127.0.0.1:1"]) == 0
    for args, needle in ((["--tier-mix", "edge-gateway:0"], "must be positive"),
                         (["--fail-pct", "120"], "not a percentage"),
                         (["--devices", "0"], "at least 1")):
        capsys.readouterr()
        try:
            code = main(["swarm", "-w", ws, *args])
        except SystemExit as e:          # argparse's own refusals
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert main(["swarm", "-w", ws, "--devices", "2"]) == 3
    assert "cannot reach MQTT broker" in capsys.readouterr().err


def test_bad_model_telemetry_aborts_the_canary_on_model_health_and_rolls_it_back(env):
    """Every device installs the new model fine but then reports a high error rate in its
    telemetry windows: the controller compares them with the same devices' windows under v1
    and aborts during the bake, before any wave."""
    from edgeloop.cloud.rollouts.controller import RolloutSpec

    swarm = start_swarm(env, 30, bad_model_pct=100, telemetry_s=1)
    try:
        def v1_windows() -> bool:
            env.cp.drain()
            return env.registry.telemetry_summary(env.v1)["records"] >= 30
        wait_for(v1_windows, timeout=30, what="telemetry under v1")
        rid, status = run_rollout(env, RolloutSpec(
            model_version=env.v2, target=f"tier={TIER}", strategy="canary", canary="5", bake_s=120,
            max_error_rate=0.1, health_interval_s=0.5, health_min_inferences=40))
        wait_for(lambda: swarm.read(lambda s: not any(d.agent.installing for d in s.devices)), what="installs to settle")
        report = swarm.read(lambda s: s.report(per_device=True))
    finally:
        forget(env, swarm)
    assert status["state"] == "aborted" and status["reason"].startswith("model health"), status
    assert status["counts"]["rolled_back"] == 5 and status["counts"]["cancelled"] == 25, status["counts"]
    assert {d["model_version"] for d in report["per_device"]} == {env.v1}
    assert report["telemetry"] >= 30


def test_swarm_over_mutual_tls_connects_each_device_as_its_own_enrolled_identity(tmp_path, monkeypatch, capsys):
    import json

    from edgeloop.cloud.fleet_registry import FleetRegistry
    from edgeloop.cloud.registry import Registry
    from edgeloop.cloud.workspace import Workspace
    from conftest import free_port
    from edgeloop.fleet import broker
    from edgeloop.fleet.cli import main

    monkeypatch.setenv("EDGELOOP_KEY_PASSPHRASE", "swarm-tests")
    ws = Workspace.init(tmp_path / "ws")
    ws.image_repository().init()
    ws.director_repository().init()
    registry = Registry(ws.registry_path)
    broker.start(ws, FleetRegistry(registry), port=free_port())
    try:
        code = main(["swarm", "-w", str(ws.root), "--devices", "3", "--duration", "1", "--prefix", "tlsw", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        result = json.loads(out.splitlines()[-1])
        assert result["devices"] == 3 and result["states"] == {"online": 3}
        fleet = FleetRegistry(registry)
        log = (ws.root / "broker" / "mosquitto.log").read_text()
        for i in range(3):
            device_id = f"tlsw-{TIER}-0000{i}"
            assert fleet.device(device_id)["tags"] == {"simulated": "true"}
            assert f"as {device_id} " in log and f"u'{device_id}'" in log   # its certificate's CN is its username
    finally:
        broker.stop(ws)
        registry.close()


def test_batched_status_ingest_stores_exactly_what_one_status_at_a_time_stores(tmp_path):
    """The control plane stores a batch's statuses in one transaction (Registry.record_statuses);
    the rows must be those record_status leaves, including a last will that keeps the model."""
    from edgeloop.cloud.registry import Registry

    def status(device: str, state: str, mv: str | None, update: str | None = None, reason: str | None = None):
        return {"device_id": device, "tier": TIER, "state": state, "model_version": mv, "update_id": update,
                "reason": reason}
    sequence = [status("a", "online", "m:1"), status("b", "online", None), status("a", "downloading", "m:1", "u1"),
                status("a", "offline", None), status("b", "failed", None, "u1", "verify.hash"),
                status("a", "committed", "m:2", "u1"), status("c", "offline", None), status("b", "offline", None, "u2"),
                status("d", "online", "m:1", "u0"), status("d", "offline", None)]
    one, many = Registry(tmp_path / "one.db"), Registry(tmp_path / "many.db")
    for row in sequence:
        one.record_status(dict(row))
    many.record_statuses([dict(row) for row in sequence], [("u1", "a")])

    def rows(registry: Registry) -> list[dict]:
        return [{k: v for k, v in d.items() if k not in ("first_seen", "last_seen")} for d in registry.devices()]
    assert rows(one) == rows(many)
    assert [(d["model_version"], d["update_id"]) for d in rows(many)] == \
        [("m:2", "u1"), (None, "u2"), (None, None), ("m:1", "u0")]   # d's last will kept its model
    assert all(d["first_seen"] and d["last_seen"] >= d["first_seen"] for d in many.devices())
    assert many.parents("device:a") and many.parents("device:a")[0]["src"] == "update:u1"


def test_simulate_beyond_the_full_agent_limit_runs_the_swarm(broker, tmp_path, capsys):
    from edgeloop.fleet.cli import FULL_AGENTS_MAX, main

    ws = tmp_path / "ws"
    assert main(["init", "-w", str(ws), "--mqtt", broker.address]) == 0
    capsys.readouterr()
    n = FULL_AGENTS_MAX + 1
    assert main(["simulate", "-w", str(ws), "--devices", str(n), "--duration", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["devices"] == n and result["connected"] == n and result["internal_errors"] == 0


def test_swarm_runs_the_real_agent_and_says_what_it_shares(env):
    from edgeloop.device_sdk.agent import Agent

    swarm = start_swarm(env, 3)
    try:
        classes = swarm.read(lambda s: {type(d.agent) for d in s.devices})
        report = swarm.read(lambda s: s.report())
    finally:
        forget(env, swarm)
    assert classes == {Agent}
    assert report["device_code"] == "edgeloop.device_sdk.agent.Agent" and report["device_classes"] == ["edgeloop.device_sdk.agent.Agent"]
    assert any(w.startswith("tuf_verdict") for w in report["shared_work"])
    assert any(w.startswith("runtime") for w in report["shared_work"]) and len(report["shared_work"]) == 2


def test_dropped_download_is_retried_by_the_agent_and_its_error_report_goes_through_its_outbox(env):
    """Every transfer drops: each device retries (the agent's back-off), then gives up with
    transport.download, and that report reaches the cloud through the device's own outbox."""
    from edgeloop.cloud.rollouts.controller import RolloutSpec  # noqa: F401 - the same cloud as the other tests

    msg = None
    swarm = start_swarm(env, 4, network=NetworkProfile(drop_pct=100), download_retries=2)
    try:
        pkg = env.registry.package_for(env.v2, TIER)
        data = Path(env.registry.artifact_path(pkg["sha256"])).read_bytes()
        from release_primitives import assign

        env.ws.image_repository().add_target(pkg["target"], data)
        msg = Announce(update_id=f"upd-drop{uuid.uuid4().hex[:6]}", model="digits-mlp", model_version=env.v2,
                       tier=TIER, target=pkg["target"], length=pkg["length"], sha256=pkg["sha256"],
                       repository=env.server.url, director=env.server.director_url, issued_at=time.time())
        assign(env.ws, TIER, msg, data)
        for device_id in swarm.ids:
            env.cp.send_command(device_id, Command("install", "ro-drop", msg, time.time()))
        wait_for(lambda: swarm.read(lambda s: s.counts()) == {"failed": 4}, timeout=40, what="every device to give up")

        def reported() -> bool:
            env.cp.drain()
            return all(any(e["code"] == "transport.download" and e["update_id"] == msg.update_id
                           for e in env.registry.device_errors(d)) for d in swarm.ids)
        wait_for(reported, timeout=30, what="the error reports in the cloud")
        wait_for(lambda: swarm.read(lambda s: all(len(d.agent.outbox) == 0 for d in s.devices)), timeout=30,
                 what="the outboxes to empty on the ingest's confirmation")
        report = swarm.read(lambda s: s.report(per_device=True))
    finally:
        forget(env, swarm)
    assert report["download_retries"] == 4 * 2 and report["downloads"] == 0 and report["dropped_downloads"] == 12
    for d in report["per_device"]:
        assert d["retries"] == 2 and d["model_version"] == env.v1
        assert d["reason"].startswith("transport.download: download failed 3 times")   # reported with its code
