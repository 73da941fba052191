"""Contracts refuse what they must: every malformed message, package or feature spec."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from edgeloop.contracts import topics
from edgeloop.contracts.package import Manifest, TensorSpec, read_package, write_package
from edgeloop.contracts.delta import DeltaError, apply_delta, encode_delta
from edgeloop.contracts.errors import PayloadTooLarge, SchemaError
from edgeloop.contracts.features import FeatureSpec
from edgeloop.contracts.messages import (MAX_PAYLOAD_BYTES, Announce, DeviceState, ErrorReport, Status, Telemetry,
                                encode, parse)

TELEMETRY = Telemetry("d1", 3, "m:1", 1.0, 2.0, 5, 4, 3, [2, 3], [0] * 9 + [5], 0.5, 1.5)
MESSAGES = [
    Announce("u1", "m", "m:1", "edge-gateway", "m/1/edge-gateway.elpkg", 10, "a" * 64, "http://r", "http://d", 1.0),
    Status("d1", DeviceState.ROLLED_BACK, "edge-gateway", "m:1", "u1", "golden outputs differ", 2.0),
    TELEMETRY,
    ErrorReport("d1", "verify.hash", "bad hash", "u1", 3.0),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.SCHEMA)
def test_every_message_round_trips(msg):
    assert parse(encode(msg)) == msg


def _tele(**changes) -> bytes:
    obj = json.loads(encode(TELEMETRY))
    obj.update(changes)
    return json.dumps(obj).encode()


@pytest.mark.parametrize("payload, error", [
    (b"not json", SchemaError), (b"\xff\xfe", SchemaError), (b"[1, 2]", SchemaError),
    (b'{"schema": "edgeloop.nope/1"}', SchemaError), (b'{"x": 1}', SchemaError),
    (_tele(seq=True), SchemaError), (_tele(count=-1), SchemaError), (_tele(correct=5), SchemaError),
    (_tele(predictions=[9, 9]), SchemaError), (_tele(window_end=0.5), SchemaError),
    (_tele(device_id=None), SchemaError), (_tele(latency_ms_p50="fast"), SchemaError),
    (b"{" + b" " * MAX_PAYLOAD_BYTES + b"}", PayloadTooLarge),
], ids=["not-json", "not-utf8", "array", "unknown-schema", "no-schema", "bool-as-int", "negative",
        "correct-over-labelled", "predictions-over-count", "window-backwards", "missing-field", "wrong-type",
        "oversized"])
def test_malformed_messages_are_refused(payload, error):
    with pytest.raises(error):
        parse(payload)


def test_announce_with_a_bad_hash_or_the_wrong_kind_is_refused():
    obj = json.loads(encode(MESSAGES[0]))
    obj["sha256"] = "Z" * 64
    with pytest.raises(SchemaError, match="sha256"):
        parse(json.dumps(obj))
    with pytest.raises(SchemaError, match="expected"):
        parse(encode(TELEMETRY), expect=Status)


def test_unknown_fields_are_ignored_for_forward_compatibility():
    assert parse(_tele(new_field={"a": 1})) == TELEMETRY


def test_topic_scheme_names_devices_safely():
    fleet = topics.Fleet("acme")
    assert fleet.telemetry("gw-1") == "edgeloop/v2/acme/devices/gw-1/telemetry"
    assert fleet.device_from_topic("edgeloop/v2/acme/devices/gw-1/status") == "gw-1"
    assert fleet.device_from_topic("edgeloop/v2/acme/devices/+/status") is None
    for bad in ("", "a/b", "+", "#", "x" * 65, "-lead"):
        assert not topics.valid_device_id(bad)
        with pytest.raises(ValueError):
            fleet.status(bad)


SPEC = FeatureSpec(2, ["a", "b"], [{"op": "scale", "factor": 0.5}, {"op": "clip", "min": 0, "max": 2},
                                   {"op": "standardize", "mean": [1.0, 0.0], "std": [0.5, 2.0]}])


def test_feature_spec_applies_its_steps_in_order():
    out = SPEC.apply(np.array([[2.0, 8.0], [-4.0, 1.0]]))
    np.testing.assert_allclose(out, [[0.0, 1.0], [-2.0, 0.25]])
    assert out.dtype == np.float32
    assert FeatureSpec.from_obj(SPEC.to_obj()) == SPEC


@pytest.mark.parametrize("change", [{"version": 3}, {"n_features": 0}, {"names": ["only-one"]},
                                    {"steps": [{"op": "standardize", "mean": [0, 0], "std": [1, 0]}]},
                                    {"steps": [{"op": "standardize", "mean": [0], "std": [1]}]},
                                    {"steps": [{"op": "log"}]}, {"steps": [{"op": "scale"}]}])
def test_malformed_feature_specs_are_refused(change):
    with pytest.raises(SchemaError):
        FeatureSpec.from_obj({**SPEC.to_obj(), **change})


def _manifest() -> Manifest:
    return Manifest("m", 1, "edge-gateway", "onnxruntime", "fp32", "model.onnx",
                    [TensorSpec("input", [-1, 2], "float32")], [TensorSpec("p", [-1, 2], "float32")], SPEC,
                    ["a", "b"], "golden.json", 1e-4, 50.0)


FILES = {"model.onnx": b"\x08\x07model", "golden.json": b'{"inputs": [], "outputs": []}'}


def test_packages_are_deterministic_and_round_trip():
    a, b = write_package(_manifest(), FILES), write_package(_manifest(), dict(reversed(FILES.items())))
    assert a == b
    bundle = read_package(a)
    assert bundle.files == FILES and bundle.manifest.model_version == "m:1"


def _tar(members: list[tuple[str, bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            if kind == tarfile.SYMTYPE:
                info.linkname, info.size = "/etc/passwd", 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(**override) -> list[tuple[str, bytes, bytes]]:
    good = read_package(write_package(_manifest(), FILES))
    manifest = json.dumps(good.manifest.to_obj()).encode()
    files = {**FILES, **override}
    return [("manifest.json", tarfile.REGTYPE, manifest)] + [(n, tarfile.REGTYPE, d) for n, d in files.items()]


@pytest.mark.parametrize("members", [
    _members(**{"model.onnx": b"\x08\x07MODEL"}),                               # changed after signing
    _members()[1:],                                                             # no manifest
    _members() + [("../evil", tarfile.REGTYPE, b"x")],                          # path traversal
    _members() + [("dir/x", tarfile.REGTYPE, b"x")],                            # not top level
    _members() + [("link", tarfile.SYMTYPE, b"")],                              # a link
    _members() + [("extra.bin", tarfile.REGTYPE, b"x")],                        # not in the manifest
    _members() + [("model.onnx", tarfile.REGTYPE, b"again")],                   # twice
], ids=["tampered", "no-manifest", "traversal", "nested", "symlink", "extra", "duplicate"])
def test_malformed_packages_are_refused(members):
    with pytest.raises(SchemaError):
        read_package(_tar(members))


def test_garbage_is_not_a_package():
    with pytest.raises(SchemaError):
        read_package(b"definitely not a tar archive" * 10)


def test_deltas_only_rebuild_their_own_target_from_their_own_base():
    base, target = b"A" * 1000, b"A" * 500 + b"B" * 10 + b"A" * 490
    delta = encode_delta(__import__("hashlib").sha256(base).hexdigest(), target,
                         [["copy", 0, 500], ["data", 0, 10], ["copy", 510, 490]], b"B" * 10)
    assert apply_delta(base, delta) == target
    with pytest.raises(DeltaError, match="another base"):
        apply_delta(b"C" * 1000, delta)
    wrong = encode_delta(__import__("hashlib").sha256(base).hexdigest(), target, [["copy", 0, 1000]], b"")
    with pytest.raises(DeltaError):
        apply_delta(base, wrong)
    with pytest.raises(SchemaError):
        apply_delta(base, encode_delta(__import__("hashlib").sha256(base).hexdigest(), target,
                                       [["copy", 900, 500]], b""))
    with pytest.raises(SchemaError):
        apply_delta(base, b"not a delta")
