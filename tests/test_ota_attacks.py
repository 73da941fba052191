"""The attack suite (TUF's and Uptane's list), each against real agents over a real broker, with
python-tuf verifying over HTTP. Every attack is refused with a specific reason on the device's
status topic, the control plane records it, and the device keeps serving its current model.

What a mirror alone can do (bytes that are not the signed ones) is a transient refusal, retried
(here with short delays) and then reported; what correctly signed metadata says is definitive
(contracts/codes.py). Attacks on the signatures of targets metadata re-sign snapshot and
timestamp over the forged file (an attacker holding the online snapshot and timestamp keys),
so the targets signature itself is what is refused."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta

import numpy as np
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile
from tuf.api.serialization.json import JSONSerializer

from edgeloop.contracts.package import Manifest, read_package, write_package
from edgeloop.contracts.topics import assignment_path
from edgeloop.cloud.release.signing import RoleKeys
from conftest import TIER, assert_refused_and_still_serving, make_live, settled, wait_for

SERIALIZER = JSONSerializer(compact=False)


def latest(meta_dir, role):
    return max(meta_dir.glob(f"*.{role}.json"), key=lambda p: int(p.name.split(".")[0]))


@pytest.fixture
def live(broker, tmp_path):
    """conftest's live fleet, retrying transient refusals after 0.05 and 0.1 s (not 1 to 16 s)."""
    env = make_live(broker, tmp_path, agent_overrides={"retry_delays_s": (0.05, 0.1)})
    yield env
    env.close()


def repin(repo) -> None:  # noqa: ANN001
    """New snapshot and timestamp versions over the targets metadata as it is now on disk."""
    repo._resnapshot(repo._load("root").signed)


def resign(path, *signers, **changes):
    """Rewrite a metadata file, optionally changing signed fields, signed by ``signers``."""
    md = Metadata.from_file(str(path))
    for key, value in changes.items():
        setattr(md.signed, key, value)
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    path.write_bytes(md.to_bytes(SERIALIZER))


def test_arbitrary_package_tampered_on_the_mirror_is_refused(live):
    v2 = live.new_version()

    def tamper(target):   # flip one byte, same length
        path = live.repo.target_file(target)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    assert_refused_and_still_serving(live, live.sign_and_announce(v2, after_signing=tamper), "verify.hash")


def test_targets_signed_with_a_key_root_never_trusted_are_refused(live):
    v2 = live.new_version()
    forge = lambda target: (resign(latest(live.repo.meta_dir, "targets"), CryptoSigner.generate_ed25519()),  # noqa: E731
                            repin(live.repo))
    assert_refused_and_still_serving(live, live.sign_and_announce(v2, after_signing=forge), "verify.metadata")


def test_targets_metadata_forged_on_the_mirror_alone_is_refused_by_its_signed_hash(live):
    v2 = live.new_version()
    forge = lambda target: resign(latest(live.repo.meta_dir, "targets"), CryptoSigner.generate_ed25519())  # noqa: E731
    assert_refused_and_still_serving(live, live.sign_and_announce(v2, after_signing=forge), "metadata.corrupt")


def test_one_compromised_key_of_a_two_of_three_role_is_not_enough(live):
    live.repo.rotate("targets", RoleKeys(keys=3, threshold=2))     # devices follow root v2 on the next update
    v2 = live.new_version()
    live.sign_and_announce(v2)
    wait_for(lambda: all(a.model_version == v2 for a in live.agents), what="v2 under the 2-of-3 targets role")
    v3 = live.new_version()
    root = Metadata.from_file(str(latest(live.repo.meta_dir, "root"))).signed
    stolen = live.repo.keys.load("targets", root.roles["targets"].keyids[0])
    forge = lambda target: (resign(latest(live.repo.meta_dir, "targets"), stolen),  # noqa: E731 - 1 signature of 2
                            repin(live.repo))
    assert_refused_and_still_serving(live, live.sign_and_announce(v3, after_signing=forge), "verify.metadata",
                                     model_version=v2)


def test_rollback_to_older_metadata_is_refused(live):
    old_timestamp = (live.repo.meta_dir / "timestamp.json").read_bytes()
    v2 = live.new_version()
    live.sign_and_announce(v2)
    wait_for(lambda: all(a.model_version == v2 for a in live.agents), what="v2")
    v3 = live.new_version()
    replay = lambda target: (live.repo.meta_dir / "timestamp.json").write_bytes(old_timestamp)  # noqa: E731
    # a mirror can serve an old timestamp (a replay, or just lagging): transient, retried, reported
    assert_refused_and_still_serving(live, live.sign_and_announce(v3, after_signing=replay), "metadata.stale",
                                     model_version=v2)


def test_fast_forward_attack_is_survived_by_rotating_the_timestamp_key(live):
    meta = live.repo.meta_dir
    root = Metadata.from_file(str(latest(meta, "root"))).signed
    stolen = live.repo.keys.load("timestamp", root.roles["timestamp"].keyids[0])
    v2 = live.new_version()
    honest = {}

    def fast_forward(target):   # a mirror serves a timestamp pushed absurdly high with the stolen key
        honest["timestamp"] = (meta / "timestamp.json").read_bytes()
        resign(meta / "timestamp.json", stolen, version=10**9)

    msg = live.sign_and_announce(v2, after_signing=fast_forward)
    wait_for(lambda: all(a.model_version == v2 for a in live.agents), what="v2 under the fast-forwarded timestamp")
    (meta / "timestamp.json").write_bytes(honest["timestamp"])     # the mirror is cleaned up
    # the honest repository can no longer publish: devices refuse its lower timestamp version
    v3 = live.new_version()
    assert_refused_and_still_serving(live, live.sign_and_announce(v3), "metadata.stale", model_version=v2)
    # recovery: rotate the timestamp key; devices drop the timestamp signed by the old key
    live.repo.rotate("timestamp")
    v4 = live.new_version()
    live.sign_and_announce(v4)
    wait_for(lambda: all(a.model_version == v4 for a in live.agents), what="v4 after the key rotation")
    assert msg.update_id != live.agents[0].last_result.update_id


def test_freeze_on_expired_timestamp_is_refused(live):
    v2 = live.new_version()
    expire = lambda target: live.repo.refresh_timestamp(lifetime=timedelta(days=-1))  # noqa: E731
    msg = live.sign_and_announce(v2, after_signing=expire)
    assert_refused_and_still_serving(live, msg, "metadata.stale")
    # re-signed, the same update installs (expiry is cured by re-signing: never remembered)
    live.repo.refresh_timestamp()
    live.cp.announce(msg)
    wait_for(lambda: all(a.model_version == v2 for a in live.agents), what="v2 once the timestamp is re-signed")


def test_mix_and_match_snapshot_that_does_not_match_targets_is_refused(live):
    meta = live.repo.meta_dir
    v2 = live.new_version()

    def mismatch(target):
        # the attacker serves the previous targets metadata under the version the snapshot names
        current = latest(meta, "targets")
        version = int(current.name.split(".")[0])
        shutil.copy(meta / f"{version - 1}.targets.json", current)

    # the snapshot signs the targets file's length and sha256: the swapped file is not the signed one
    assert_refused_and_still_serving(live, live.sign_and_announce(v2, after_signing=mismatch), "metadata.corrupt")


def test_wrong_software_a_valid_package_for_another_tier_is_refused(live):
    from pathlib import Path
    v2 = live.new_version()
    pkg = live.registry.package_for(v2, TIER)
    path = Path(live.registry.artifact_path(pkg["sha256"]))
    bundle = read_package(path.read_bytes())
    other = write_package(Manifest(**{**bundle.manifest.__dict__, "tier": "mobile"}), dict(bundle.files))
    path.write_bytes(other)   # correctly signed by both repositories, but built for phones
    live.registry.set_package_length(pkg["sha256"], len(other))
    assert_refused_and_still_serving(live, live.sign_and_announce(v2), "verify.mismatch")


def test_endless_data_longer_than_signed_is_refused(live):
    v2 = live.new_version()

    def extend(target):
        path = live.repo.target_file(target)
        path.write_bytes(path.read_bytes() + b"\0" * 1_000_000)

    assert_refused_and_still_serving(live, live.sign_and_announce(v2, after_signing=extend), "verify.hash")


def test_replayed_old_announcement_is_refused(live):
    v2 = live.new_version()
    live.sign_and_announce(v2)
    wait_for(lambda: all(a.model_version == v2 for a in live.agents), what="v2")
    old = live.announce_for(live.v1)   # a captured announcement for v1, replayed (as a fresh message)
    live.cp.announce(old)
    assert_refused_and_still_serving(live, old, "verify.director", model_version=v2)


def test_director_assignment_the_image_repository_does_not_back_is_refused(live):
    v2 = live.new_version()
    # the (online, more exposed) director assigns a package the image repository never signed
    msg = live.sign_and_announce(v2, sign_image=False)
    assert_refused_and_still_serving(live, msg, "verify.director")


def test_image_package_the_director_never_assigned_is_refused(live):
    v2 = live.new_version()
    msg = live.sign_and_announce(v2, send=False)
    live.director.set_targets({assignment_path(TIER, msg.target): None})   # assignment withdrawn
    live.cp.announce(msg)
    assert_refused_and_still_serving(live, msg, "verify.director")


def test_malformed_metadata_is_refused(live):
    v2 = live.new_version()
    garble = lambda target: (live.repo.meta_dir / "timestamp.json").write_bytes(b'{"signed": [1, 2')  # noqa: E731
    msg = live.sign_and_announce(v2, after_signing=garble)
    assert_refused_and_still_serving(live, msg, "metadata.corrupt")     # bytes garbled in transit: transient
    assert not any(a.installer.already_handled(msg.update_id) for a in live.agents)


def test_a_good_update_after_refused_ones_installs(live):
    bad = live.new_version()
    msg = live.sign_and_announce(bad, after_signing=lambda t: live.repo.target_file(t).write_bytes(b"junk"))
    wait_for(lambda: settled(live, msg.update_id), what="refusal")
    assert {a.last_result.code for a in live.agents} == {"verify.hash"}
    good = live.new_version()
    live.sign_and_announce(good)
    wait_for(lambda: all(a.model_version == good for a in live.agents), what="the good update")
    for agent in live.agents:
        probs = agent.runtime.predict(live.test.x[:4])
        assert probs.shape == (4, 10) and np.allclose(probs.sum(axis=1), 1, atol=0.02)   # int8 outputs
        assert json.loads((agent.installer.root / "state.json").read_text())["model_version"] == good


def test_devices_follow_a_root_key_rotation_and_refuse_the_old_root_key_afterwards(live):
    from edgeloop.cloud.release.signing import ROLES  # noqa: F401 - the roles rotated below are TUF's own
    old_root = Metadata.from_file(str(latest(live.repo.meta_dir, "root"))).signed
    stolen_old_targets = live.repo.keys.load("targets", old_root.roles["targets"].keyids[0])
    live.repo.rotate("root")
    live.repo.rotate("targets")
    v2 = live.new_version()
    live.sign_and_announce(v2)
    wait_for(lambda: all(a.model_version == v2 for a in live.agents), what="v2 under the rotated keys")
    for agent in live.agents:   # each device walked 1.root.json -> 3.root.json
        trusted = Metadata.from_file(str(agent.client.tuf_dir / "image" / "metadata" / "root.json")).signed
        assert trusted.version == 3
    # the retired targets key signs nothing any more
    v3 = live.new_version()
    forge = lambda target: (resign(latest(live.repo.meta_dir, "targets"), stolen_old_targets),  # noqa: E731
                            repin(live.repo))
    assert_refused_and_still_serving(live, live.sign_and_announce(v3, after_signing=forge), "verify.metadata",
                                     model_version=v2)
