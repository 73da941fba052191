"""Power loss during an update: 200+ trials that SIGKILL an installing agent process at every
state transition, at byte offsets during the download, and at random moments, then restart it.
Every trial must end with a verified, working model: the old version or the new one, never none."""

from __future__ import annotations

import multiprocessing as mp
import random
import shutil
import time

import pytest

from edgeloop.contracts.package import read_package
from edgeloop.contracts.messages import Announce, as_dict
from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.package.export import export_onnx
from edgeloop.cloud.package.packaging import build_package
from edgeloop.cloud.train.training import TrainParams, train
from edgeloop.device_sdk.ota import Installer, InstallState
from edgeloop.device_sdk.runtime import health_check, load_runtime

TIER = "edge-gateway"
TRANSITIONS_PER_INSTALL = 5        # downloading, verifying, installing, testing, committed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("powerloss")
    ds = load_dataset()
    _, _, test = ds.split()
    packages = {}
    for version in (1, 2):
        result = train(ds, TrainParams(seed=version, epochs=1))
        pkg = build_package("m", version, TIER, export_onnx(result.model, 64), result.features,
                            [str(i) for i in range(10)], test.x[:8], {})
        path = root / f"v{version}.elpkg"
        path.write_bytes(pkg.data)
        packages[version] = (pkg, path)
    template = root / "template"
    Installer(template, TIER, 1 << 22).install(_announce(packages[1][0], "u1"), lambda a: packages[1][0].data)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["powerloss_child", "edgeloop.device_sdk.runtime", "onnxruntime", "numpy"])
    return root, packages, template, ctx


def _announce(pkg, uid: str) -> Announce:
    m = pkg.manifest
    return Announce(update_id=uid, model=m.model, model_version=m.model_version, tier=TIER, target=pkg.target_path,
                    length=len(pkg.data), sha256=pkg.sha256, repository="http://unused", director="http://unused",
                    issued_at=time.time())


def _check_working(device, allowed: set[str]) -> str:
    """The device has an active, verified, healthy model of an allowed version; returns it."""
    installer = Installer(device, TIER, 1 << 22)
    bundle = installer.active_package()           # read_package verifies every file's hash
    assert bundle is not None, "the device was left without a model"
    health_check(load_runtime(bundle), bundle)   # loads and passes its golden vectors
    assert bundle.manifest.model_version in allowed
    assert installer.model_version == bundle.manifest.model_version
    return bundle.manifest.model_version


def _trial(setup, n: int, kill_at_transition=None, kill_at_chunk=None, kill_after_s=None) -> tuple[str, str]:
    root, packages, template, ctx = setup
    device = root / f"device-{n}"
    shutil.copytree(template, device)
    pkg2, path2 = packages[2]
    announce = as_dict(_announce(pkg2, "u2"))

    def launch(kt, kc, delay):
        import powerloss_child
        p = ctx.Process(target=powerloss_child.run,
                        args=(str(device), TIER, announce, str(path2), kt, kc, time.time()))
        p.start()
        if delay is not None:
            p.join(delay)
            if p.is_alive():
                p.kill()
        p.join(30)
        return p.exitcode

    code = launch(kill_at_transition, kill_at_chunk, kill_after_s)
    after_crash = _check_working(device, {"m:1", "m:2"})
    # power comes back: the agent restarts (resuming or rolling back) and runs to the end
    launch(None, None, None)
    final = _check_working(device, {"m:1", "m:2"})
    state = Installer(device, TIER, 1 << 22).state
    assert state in (InstallState.COMMITTED, InstallState.FAILED, InstallState.ROLLED_BACK), state
    assert code in (-9, 0)
    shutil.rmtree(device)
    return after_crash, final


def test_power_loss_at_every_transition_byte_offset_and_random_moment_leaves_a_working_model(setup):
    rng = random.Random(1234)
    chunks = len(setup[1][2][0].data) // 2048 + 1
    plan = [dict(kill_at_transition=k) for k in range(TRANSITIONS_PER_INSTALL) for _ in range(8)]   # 40
    plan += [dict(kill_at_chunk=rng.randrange(chunks)) for _ in range(80)]                          # 80
    plan += [dict(kill_after_s=rng.uniform(0.0, 0.08)) for _ in range(90)]                          # 90
    outcomes = {"m:1": 0, "m:2": 0}
    finals = {"m:1": 0, "m:2": 0}
    for n, kill in enumerate(plan):
        after_crash, final = _trial(setup, n, **kill)
        outcomes[after_crash] += 1
        finals[final] += 1
    assert len(plan) >= 200
    # both sides of the switch were hit, and a restart always finished the update
    assert outcomes["m:1"] > 0 and outcomes["m:2"] > 0, outcomes
    assert finals == {"m:1": 0, "m:2": len(plan)}, finals
