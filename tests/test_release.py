"""One release path (cloud/release/releaser.py): publish, rollouts and the pipeline sign, assign and
record through it, and the image repository always signs what the director assigns.

Integration tests run real agents against a real Mosquitto and the real repository server
(conftest.make_live); the refusal tests drive the real controller on a real registry and real
TUF signing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TIER, make_live, own_broker, wait_for
from edgeloop.cloud.errors import IntegrityError
from edgeloop.cloud.package.packaging import store_blob
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.rollouts.controller import RolloutController, RolloutSpec
from edgeloop.cloud.workspace import Workspace

# this module's own broker: rollouts select devices from the statuses a broker retains
broker = pytest.fixture(scope="module", name="broker")(own_broker)

DEVICES = 5


@pytest.fixture(scope="module")
def rig(broker, tmp_path_factory):
    env = make_live(broker, tmp_path_factory.mktemp("release"), devices=DEVICES)
    env.ids = [a.device_id for a in env.agents]
    yield env
    env.close()


def _registered(env, version: str) -> bool:
    env.cp.drain()
    rows = {d["device_id"]: d for d in env.registry.devices()}
    return all(rows.get(i, {}).get("model_version") == version for i in env.ids)


def _roll_out(env, model_version: str) -> dict:
    wait_for(lambda: _registered(env, env.agents[0].model_version), what="every device in the registry")
    ctl = RolloutController(env.ws, env.registry, env.cp.send_command, repository_url=env.repository_url,
                            director_url=env.director_url)
    rid = ctl.create(RolloutSpec(model_version, f"tier={TIER}", max_failure_pct=0))

    def done() -> bool:
        env.cp.drain(0.5)
        ctl.step()
        return ctl.status(rid)["state"] in ("completed", "aborted")
    wait_for(done, timeout=60, what=f"rollout {rid} to finish", interval=0.1)
    return ctl.status(rid)


def _image_agrees(env, model_version: str) -> None:
    """The image repository signs, and holds, exactly the package the registry would release."""
    pkg = env.registry.package_for(model_version, TIER)
    signed = env.repo.targets()[pkg["target"]]
    assert (signed.length, signed.hashes["sha256"]) == (pkg["length"], pkg["sha256"])
    assert env.repo.target_file(pkg["target"]).read_bytes() == Path(env.registry.artifact_path(pkg["sha256"])).read_bytes()


def test_repackaging_a_published_version_then_rolling_it_out_updates_every_device(rig):
    from edgeloop.cloud.loop.pipeline import package_model, publish_update

    v2 = rig.new_version()
    first = rig.registry.package_for(v2, TIER)
    publish_update(rig.ws, rig.registry, rig.repository_url, v2, TIER, announce=lambda msg: None)  # told no one
    again = package_model(rig.ws, rig.registry, v2, TIER)                                         # packaged again
    assert again.sha256 == first["sha256"]           # deterministic: the same bytes, the same target
    status = _roll_out(rig, v2)
    assert status["state"] == "completed", status
    assert status["counts"]["committed"] == DEVICES and status["counts"]["failed"] == 0
    assert all(a.model_version == v2 for a in rig.agents)
    _image_agrees(rig, v2)


def test_a_repackage_with_other_bytes_becomes_a_new_signed_target_and_every_device_updates(rig, monkeypatch):
    import edgeloop.cloud.loop.pipeline as pipeline
    from edgeloop.cloud.loop.pipeline import package_model, publish_update

    v3 = rig.new_version()
    first = rig.registry.package_for(v3, TIER)
    publish_update(rig.ws, rig.registry, rig.repository_url, v3, TIER, announce=lambda msg: None)
    monkeypatch.setattr(pipeline, "GOLDEN_COUNT", pipeline.GOLDEN_COUNT // 2)   # other inputs, other bytes
    other = package_model(rig.ws, rig.registry, v3, TIER)
    assert other.sha256 != first["sha256"]
    pkg = rig.registry.package_for(v3, TIER)
    assert pkg["sha256"] == other.sha256 and pkg["target"] != first["target"]      # a new target name
    status = _roll_out(rig, v3)
    assert status["state"] == "completed", status
    assert status["counts"]["committed"] == DEVICES
    assert all(a.model_version == v3 and a.installer.active_package().manifest.golden for a in rig.agents)
    _image_agrees(rig, v3)
    # the first package is still signed as it was: anything assigned with it still verifies
    assert rig.repo.targets()[first["target"]].hashes["sha256"] == first["sha256"]


# -- refusals ------------------------------------------------------------------------------------
@pytest.fixture
def unit(tmp_path):
    ws = Workspace.init(tmp_path / "ws", mqtt="127.0.0.1:1")
    registry = Registry(ws.registry_path)
    ws.image_repository().init()
    ws.director_repository().init()
    registry.add_model_version({"model_version": "m:1", "model": "m", "version": 1, "run_id": "r",
                                "stage": "candidate"})
    for d in ("d0", "d1"):
        registry.record_status({"device_id": d, "tier": TIER, "state": "online", "model_version": None,
                                "update_id": None, "reason": None})
    yield ws, registry
    registry.close()


def _register(ws, registry, data: bytes, target: str = f"m/1/{TIER}.elpkg") -> str:
    sha, path = store_blob(ws.artifacts_dir, data)
    registry.add_artifact(sha, f"package:{TIER}", len(data), str(path))
    registry.add_package({"sha256": sha, "model_version": "m:1", "tier": TIER, "target": target,
                          "length": len(data)})
    return sha


def _nothing_assigned(ws, registry) -> bool:
    return (not [p for p in ws.director_repository().targets() if p.startswith("assignments/")]
            and not registry.updates()
            and not RolloutController(ws, registry, lambda *a: None, repository_url="http://x/repository").list())


def _cli_start(ws, capsys) -> tuple[int, str]:
    from edgeloop.fleet.cli import main

    code = main(["rollout", "start", "m:1", "--target", f"tier={TIER}", "-w", str(ws.root),
                 "--repository-url", "http://127.0.0.1:9/repository"])
    return code, capsys.readouterr().err


def test_rollout_start_refuses_a_package_the_image_repository_signs_with_other_bytes(unit, capsys):
    ws, registry = unit
    ws.image_repository().add_target(f"m/1/{TIER}.elpkg", b"the bytes signed first")
    _register(ws, registry, b"other bytes registered under the same name later")   # the old bug's state
    code, err = _cli_start(ws, capsys)
    assert code == IntegrityError.exit_code and len(err.strip().splitlines()) == 1, err
    assert "disagree" in err and "Traceback" not in err
    assert _nothing_assigned(ws, registry)


def test_rollout_start_refuses_a_signed_package_whose_file_is_gone_from_the_image_repository(unit, capsys):
    ws, registry = unit
    data = b"a package"
    _register(ws, registry, data)
    image = ws.image_repository()
    image.add_target(f"m/1/{TIER}.elpkg", data)
    image.target_file(f"m/1/{TIER}.elpkg").unlink()
    code, err = _cli_start(ws, capsys)
    assert code == IntegrityError.exit_code and len(err.strip().splitlines()) == 1, err
    assert "not present" in err
    assert _nothing_assigned(ws, registry)


def test_rollout_start_refuses_a_package_whose_stored_bytes_are_corrupt(unit, capsys):
    ws, registry = unit
    sha = _register(ws, registry, b"a package")
    Path(registry.artifact_path(sha)).write_bytes(b"a packagE")
    code, err = _cli_start(ws, capsys)
    assert code == IntegrityError.exit_code and len(err.strip().splitlines()) == 1, err
    assert "corrupt" in err
    assert _nothing_assigned(ws, registry)
    assert f"m/1/{TIER}.elpkg" not in ws.image_repository().targets()     # nothing signed either


def test_publish_and_rollouts_record_updates_the_same_way(unit):
    from edgeloop.cloud.release.releaser import Assignment, Releaser

    ws, registry = unit
    sha = _register(ws, registry, b"a package")
    rel = Releaser(ws, registry, "http://127.0.0.1:9/repository")
    a = rel.release([Assignment(TIER, "m:1", TIER, "publish/x", named=False)], now=5.0)[0]
    b = rel.release([Assignment("ro-1-u1-edge", "m:1", TIER, "ro-1/update", named=True)], now=6.0)[0]
    rows = {u["update_id"]: u for u in registry.updates()}
    for msg in (a.announce, b.announce):
        assert rows[msg.update_id] == {"update_id": msg.update_id, "model_version": "m:1", "tier": TIER,
                                       "target": msg.target, "sha256": sha, "length": 9, "issued_at": msg.issued_at}
        assert {"src": f"package:{sha}", "relation": "published"} in registry.parents(f"update:{msg.update_id}")
    assert a.announce.director == b.announce.director == "http://127.0.0.1:9/director"
    assert a.announce.group is None and b.announce.group == "ro-1-u1-edge"
    # the same key releases the same update (two control-plane workers sign the same thing)
    again = rel.release([Assignment("ro-1-u1-edge", "m:1", TIER, "ro-1/update", named=True)], now=6.0)[0]
    assert again.announce.update_id == b.announce.update_id
    director = ws.director_repository().targets()
    assert {p for p in director} == {f"assignments/{TIER}/m/1/{TIER}.elpkg",
                                     f"assignments/ro-1-u1-edge/m/1/{TIER}.elpkg"}
    assert json.dumps(director[f"assignments/{TIER}/m/1/{TIER}.elpkg"].custom, sort_keys=True) == json.dumps(
        {"model_version": "m:1", "update_id": a.announce.update_id}, sort_keys=True)


def test_publish_refuses_a_package_the_image_repository_signs_with_other_bytes(unit):
    from edgeloop.cloud.loop.pipeline import publish_update

    ws, registry = unit
    ws.image_repository().add_target(f"m/1/{TIER}.elpkg", b"the bytes signed first")
    _register(ws, registry, b"other bytes registered under the same name later")
    announced = []
    with pytest.raises(IntegrityError, match="would disagree"):
        publish_update(ws, registry, "http://127.0.0.1:9/repository", "m:1", TIER, announced.append)
    assert announced == [] and _nothing_assigned(ws, registry)


def test_a_new_package_gets_the_plain_name_and_other_bytes_get_their_own(unit):
    from edgeloop.cloud.release.releaser import target_name

    ws, registry = unit
    plain = f"m/1/{TIER}.elpkg"
    first = _register(ws, registry, b"first bytes")
    assert target_name(ws, registry, "m", 1, TIER, first) == plain              # packaged again: the same name
    other = "ab" * 32
    assert target_name(ws, registry, "m", 1, TIER, other) == f"m/1/{TIER}.{other[:12]}.elpkg"
    ws.image_repository().add_target(plain, b"signed bytes")                      # the image repository decides
    assert target_name(ws, registry, "m", 1, TIER, first) == f"m/1/{TIER}.{first[:12]}.elpkg"


def test_two_releases_at_once_each_land_in_one_consistent_director(unit):
    """Two control-plane workers release at the same moment (serve and a CLI rollout start): the
    release lock orders them, so neither assignment is lost and the image repository signs the
    package once."""
    import threading

    from edgeloop.cloud.release.releaser import Assignment, Releaser

    ws, registry = unit
    sha = _register(ws, registry, b"a package")
    groups = [f"ro-{i}-u1-edge" for i in range(6)]
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def release(group: str) -> None:
        try:
            rel = Releaser(ws, registry, "http://127.0.0.1:9/repository")
            results[group] = rel.release([Assignment(group, "m:1", TIER, f"{group}/update", named=True)])[0] \
                .announce.update_id
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=release, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and set(results) == set(groups)
    director = ws.director_repository().targets()
    assert {p for p in director} == {f"assignments/{g}/m/1/{TIER}.elpkg" for g in groups}
    assert all(director[f"assignments/{g}/m/1/{TIER}.elpkg"].custom["update_id"] == results[g] for g in groups)
    assert list(ws.image_repository().targets()) == [f"m/1/{TIER}.elpkg"]
    assert ws.image_repository().targets()[f"m/1/{TIER}.elpkg"].hashes["sha256"] == sha
    assert {u["update_id"] for u in registry.updates()} == set(results.values())
