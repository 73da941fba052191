"""The agent's install state machine, with a fake fetch behind the real interface and real
packages on the real onnxruntime. Each test names the fault it tries and checks that the
device's working model is untouched afterwards."""

from __future__ import annotations

import json
import time

import pytest

from edgeloop.contracts.package import Manifest, read_package, write_package
from edgeloop.contracts.messages import Announce
from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.package.export import export_onnx
from edgeloop.cloud.package.packaging import build_package
from edgeloop.cloud.train.training import TrainParams, train
from edgeloop.device_sdk.errors import TransientError
from edgeloop.contracts.messages import as_dict
from edgeloop.device_sdk.ota import MAX_RESUMES, TRANSITIONS, Event, Installer, InstallState
from edgeloop.device_sdk.storage import write_json

TIER = "edge-gateway"


@pytest.fixture(scope="module")
def packages():
    ds = load_dataset()
    _, _, test = ds.split()
    made = {}
    for version in (1, 2):
        result = train(ds, TrainParams(seed=version, epochs=2))
        onnx = export_onnx(result.model, ds.x.shape[1])
        made[version] = build_package("m", version, TIER, onnx, result.features, [str(i) for i in range(10)],
                                      test.x[:8], {"run_id": f"r{version}"})
    return made


def announce(pkg, update_id="u") -> Announce:
    m = pkg.manifest
    return Announce(update_id=update_id, model=m.model, model_version=m.model_version, tier=m.tier,
                    target=pkg.target_path, length=len(pkg.data), sha256=pkg.sha256,
                    repository="http://unused", director="http://unused", issued_at=time.time())


def rebuilt(pkg, **changes) -> bytes:
    """The same package with manifest fields or files changed, re-hashed (a well-formed but bad package)."""
    bundle = read_package(pkg.data)
    files = dict(bundle.files)
    if "golden" in changes:
        files["golden.json"] = changes.pop("golden")
    manifest = Manifest(**{**bundle.manifest.__dict__, **changes})
    return write_package(manifest, files)


def test_good_update_commits_into_the_inactive_slot(tmp_path, packages):
    inst = Installer(tmp_path, TIER, 1 << 20)
    result, runtime = inst.install(announce(packages[1], "u1"), lambda a: packages[1].data)
    assert result.state == InstallState.COMMITTED and runtime is not None
    assert inst.model_version == "m:1"
    result, _ = inst.install(announce(packages[2], "u2"), lambda a: packages[2].data)
    assert result.state == InstallState.COMMITTED
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["active_slot"] == "b" and state["model_version"] == "m:2"
    assert read_package((tmp_path / "slots" / "a" / "package.elpkg").read_bytes()).manifest.model_version == "m:1"
    # a restarted agent finds the same model
    assert Installer(tmp_path, TIER, 1 << 20).active_package().manifest.model_version == "m:2"


FAILED, ROLLED_BACK = InstallState.FAILED, InstallState.ROLLED_BACK


@pytest.mark.parametrize("fault, make, code, end", [
    ("corrupted bytes", lambda p: p.data[:100] + b"\0" * 50 + p.data[150:], "verify.package", FAILED),
    ("not a package", lambda p: b"MZ\x90\x00 definitely not a tar", "verify.package", FAILED),
    ("wrong golden outputs", lambda p: rebuilt(p, golden=json.dumps(
        {"inputs": json.loads(read_package(p.data).files["golden.json"])["inputs"],
         "outputs": [[0.1] * 10] * 8}).encode()), "health.golden", ROLLED_BACK),
    ("over the latency budget", lambda p: rebuilt(p, max_latency_ms=1e-9), "health.latency", ROLLED_BACK),
    ("package for another tier", lambda p: rebuilt(p, tier="mcu"), "verify.mismatch", FAILED),
    ("model that does not load", lambda p: write_package(read_package(p.data).manifest,
                                                        {**read_package(p.data).files, "model.onnx": b"garbage"}),
     "health.load", ROLLED_BACK),
])
def test_bad_update_is_refused_and_the_working_model_stays(tmp_path, packages, fault, make, code, end):
    inst = Installer(tmp_path, TIER, 1 << 20)
    inst.install(announce(packages[1], "u1"), lambda a: packages[1].data)
    before = (tmp_path / "state.json").read_text()
    bad = make(packages[2])
    result, runtime = inst.install(announce(packages[2], "u2"), lambda a: bad)
    assert (result.state, result.code, runtime) == (end, code, None), fault
    assert inst.model_version == "m:1"
    after = json.loads((tmp_path / "state.json").read_text())
    assert after["active_slot"] == json.loads(before)["active_slot"]
    assert Installer(tmp_path, TIER, 1 << 20).active_package().manifest.model_version == "m:1"
    assert inst.already_handled("u2")  # not retried


def _cut_power_in(tmp_path, packages, state_name: str) -> None:
    inst = Installer(tmp_path, TIER, 1 << 20)
    inst.install(announce(packages[1], "u1"), lambda a: packages[1].data)
    state = json.loads((tmp_path / "state.json").read_text())
    state["update"] = {"id": "u2", "state": state_name, "reason": None,
                       "announce": as_dict(announce(packages[2], "u2"))}
    write_json(tmp_path / "state.json", state)
    (tmp_path / "slots" / "b").mkdir(parents=True)
    (tmp_path / "slots" / "b" / "package.elpkg").write_bytes(packages[2].data[:500])  # torn write


def test_restart_mid_install_resumes_the_update(tmp_path, packages):
    _cut_power_in(tmp_path, packages, "installing")
    restarted = Installer(tmp_path, TIER, 1 << 20)
    resume = restarted.recover()
    assert resume is not None and resume.update_id == "u2"
    assert restarted.active_package().manifest.model_version == "m:1"   # still serving the old model
    result, _ = restarted.install(resume, lambda a: packages[2].data)
    assert result.state == InstallState.COMMITTED and restarted.model_version == "m:2"


def test_restart_while_testing_rolls_back(tmp_path, packages):
    _cut_power_in(tmp_path, packages, "testing")
    restarted = Installer(tmp_path, TIER, 1 << 20)
    assert restarted.recover() is None
    assert restarted.state == InstallState.ROLLED_BACK
    assert restarted.active_package().manifest.model_version == "m:1"


def test_an_update_interrupted_again_and_again_is_given_up(tmp_path, packages):
    _cut_power_in(tmp_path, packages, "downloading")
    for _ in range(MAX_RESUMES):
        assert Installer(tmp_path, TIER, 1 << 20).recover() is not None   # each restart resumes...
    final = Installer(tmp_path, TIER, 1 << 20)
    assert final.recover() is None                                       # ...until it gives up
    assert final.state == InstallState.FAILED and final.already_handled("u2")
    assert final.active_package().manifest.model_version == "m:1"


def test_network_failure_postpones_without_refusing(tmp_path, packages):
    inst = Installer(tmp_path, TIER, 1 << 20)

    def unreachable(a):
        raise TransientError("connection refused")

    with pytest.raises(TransientError):
        inst.install(announce(packages[1], "u1"), unreachable)
    assert inst.state == InstallState.IDLE and not inst.already_handled("u1")
    result, _ = inst.install(announce(packages[1], "u1"), lambda a: packages[1].data)
    assert result.state == InstallState.COMMITTED


def test_transition_table_has_no_way_out_of_order():
    S = InstallState
    # a new update starts only from a finished state; a resumed one stays where it was cut off
    fresh = {s for (s, e), t in TRANSITIONS.items() if e == Event.START and t == S.DOWNLOADING}
    assert fresh == {S.IDLE, S.COMMITTED, S.FAILED, S.ROLLED_BACK, S.DOWNLOADING}
    assert all(t == s for (s, e), t in TRANSITIONS.items() if e == Event.START and s not in fresh)
    assert (S.TESTING, Event.START) not in TRANSITIONS
    # only a passed health check reaches committed; only a failed one rolls back
    assert [s for (s, e), t in TRANSITIONS.items() if t == S.COMMITTED] == [S.TESTING]
    assert [s for (s, e), t in TRANSITIONS.items() if t == S.ROLLED_BACK] == [S.TESTING]
