"""The shared contracts, checked on their own: messages, topics, the bundle format and the
feature spec. Every refusal is a SchemaError or PayloadTooLarge (a ContractError), never some
other exception, because both sides catch ContractError and nothing else."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile

import numpy as np
import pytest

from edgeloop.contracts import topics
from edgeloop.contracts.package import (
    MANIFEST,
    Package,
    Manifest,
    TensorSpec,
    read_package,
    sha256_hex,
    write_package,
)
from edgeloop.contracts.errors import ContractError, PayloadTooLarge, SchemaError
from edgeloop.contracts.features import FeatureSpec
from edgeloop.contracts.messages import (
    MAX_PAYLOAD_BYTES,
    MAX_TEXT,
    Announce,
    DeviceState,
    ErrorReport,
    Status,
    Telemetry,
    encode,
    parse,
)

SHA = "ab" * 32


# -- messages ----------------------------------------------------------------------------------
def announce(**kw) -> Announce:
    base = dict(update_id="upd-1", model="digits-mlp", model_version="digits-mlp:3", tier="edge-gateway",
                target="digits-mlp/3/edge-gateway.elpkg", length=61440, sha256=SHA,
                repository="http://127.0.0.1:8000", director="http://127.0.0.1:8000/director",
                issued_at=1700000000.5, delta=None)
    base.update(kw)
    return Announce(**base)


def status(**kw) -> Status:
    base = dict(device_id="dev-1", state=DeviceState.ROLLED_BACK, tier="edge-gateway",
                model_version="digits-mlp:2", update_id="upd-1", reason="health.golden", ts=12.25)
    base.update(kw)
    return Status(**base)


def telemetry(**kw) -> Telemetry:
    base = dict(device_id="dev-1", seq=7, model_version="digits-mlp:2", window_start=100.0, window_end=160.5,
                count=20, labelled=10, correct=8, predictions=[5, 5, 10], confidence_hist=[0] * 9 + [20],
                latency_ms_p50=0.4, latency_ms_max=2.5, errors=1, extra={"note": "x"}, features=None)
    base.update(kw)
    return Telemetry(**base)


def error_report(**kw) -> ErrorReport:
    base = dict(device_id="dev-1", code="verify.signature", message="bad signature", update_id="upd-1", ts=3.5)
    base.update(kw)
    return ErrorReport(**base)


FEATURE_SUMMARY = {"hist": [[3, 2], [1, 4]], "n": [5, 5], "missing": [0, 0], "sum": [1.5, 2.0],
                   "sumsq": [3.0, 4.5], "min": [0.0, -1.0], "max": [1.0, 2.0]}

ROUND_TRIP = {
    "announce": announce(),
    "announce-with-delta": announce(delta={"target": "d/3.delta", "base_sha256": SHA, "length": 99}),
    "status": status(),
    "status-minimal": Status("dev-2", DeviceState.ONLINE, "mcu"),
    "telemetry": telemetry(),
    "telemetry-with-features": telemetry(features=FEATURE_SUMMARY, count=5, labelled=0, correct=0,
                                         predictions=[5, 0, 0]),
    "telemetry-no-model": telemetry(model_version=None, errors=0, extra={}),
    "error": error_report(),
    "error-minimal": ErrorReport("dev-3", "health.load", "no runtime"),
}


@pytest.mark.parametrize("msg", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_encode_then_parse_gives_the_same_message(msg):
    raw = encode(msg)
    assert isinstance(raw, bytes) and raw.startswith(b'{"schema":"' + msg.SCHEMA.encode() + b'"')
    back = parse(raw)
    assert type(back) is type(msg)
    assert back == msg
    assert parse(raw.decode()) == msg            # a str payload is accepted too
    assert parse(raw, expect=type(msg)) == msg
    assert encode(back) == raw                   # and the wire form is stable


def test_status_state_travels_as_its_wire_name():
    raw = encode(status(state=DeviceState.COMMITTED))
    assert json.loads(raw)["state"] == "committed"
    assert parse(raw).state is DeviceState.COMMITTED


def test_extra_fields_from_a_newer_sender_are_tolerated():
    obj = json.loads(encode(telemetry()))
    obj["added_in_v2"] = {"anything": [1, 2]}
    assert parse(json.dumps(obj)) == telemetry()


def _obj(msg) -> dict:
    return json.loads(encode(msg))


def _with(msg, **changes) -> bytes:
    obj = _obj(msg)
    for key, value in changes.items():
        if value is _DELETE:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj).encode()


_DELETE = object()

REFUSED = {
    "not-json": b"{this is not json",
    "empty": b"",
    "non-utf8": b'{"schema": "edgeloop.status/1", "device_id": "\xff\xfe"}',
    "json-array": b'[{"schema": "edgeloop.status/1"}]',
    "json-string": b'"edgeloop.status/1"',
    "json-number": b"42",
    "json-null": b"null",
    "unknown-schema": _with(status(), schema="edgeloop.status/2"),
    "no-schema": _with(status(), schema=_DELETE),
    "schema-not-a-string": _with(status(), schema=["edgeloop.status/1"]),
    "status-missing-device-id": _with(status(), device_id=_DELETE),
    "status-missing-state": _with(status(), state=_DELETE),
    "status-unknown-state": _with(status(), state="exploded"),
    "status-state-wrong-type": _with(status(), state=3),
    "status-device-id-wrong-type": _with(status(), device_id=17),
    "status-ts-is-a-string": _with(status(), ts="yesterday"),
    "status-reason-too-long": _with(status(), reason="x" * (MAX_TEXT + 1)),
    "telemetry-missing-count": _with(telemetry(), count=_DELETE),
    "telemetry-missing-predictions": _with(telemetry(), predictions=_DELETE),
    "telemetry-seq-is-a-string": _with(telemetry(), seq="7"),
    "telemetry-count-is-a-float": _with(telemetry(), count=20.0),
    "telemetry-count-is-true": _with(telemetry(), count=True),
    "telemetry-seq-is-true": _with(telemetry(), seq=True),
    "telemetry-errors-is-true": _with(telemetry(), errors=True),
    "telemetry-prediction-is-true": _with(telemetry(), predictions=[True, 5, 10]),
    "telemetry-negative-count": _with(telemetry(), count=-1, labelled=0, correct=0, predictions=[0, 0, 0]),
    "telemetry-negative-seq": _with(telemetry(), seq=-1),
    "telemetry-negative-errors": _with(telemetry(), errors=-3),
    "telemetry-negative-labelled": _with(telemetry(), labelled=-1, correct=-2),
    "telemetry-negative-prediction": _with(telemetry(), predictions=[-1, 5, 10]),
    "telemetry-correct-over-labelled": _with(telemetry(), correct=11, labelled=10),
    "telemetry-labelled-over-count": _with(telemetry(), labelled=21, correct=0),
    "telemetry-predictions-over-count": _with(telemetry(), predictions=[10, 10, 10]),
    "telemetry-window-ends-before-start": _with(telemetry(), window_start=200.0, window_end=100.0),
    "telemetry-latency-nan": b'{"schema":"edgeloop.telemetry/1","device_id":"d","seq":1,"model_version":null,'
                             b'"window_start":0,"window_end":1,"count":0,"labelled":0,"correct":0,"predictions":[],'
                             b'"confidence_hist":[],"latency_ms_p50":NaN,"latency_ms_max":1}',
    "telemetry-latency-infinity": b'{"schema":"edgeloop.telemetry/1","device_id":"d","seq":1,"model_version":null,'
                                  b'"window_start":0,"window_end":1,"count":0,"labelled":0,"correct":0,'
                                  b'"predictions":[],"confidence_hist":[],"latency_ms_p50":1,'
                                  b'"latency_ms_max":Infinity}',
    "telemetry-predictions-not-a-list": _with(telemetry(), predictions={"0": 5}),
    "telemetry-feature-hist-does-not-add-up": _with(
        telemetry(), count=5, labelled=0, correct=0, predictions=[5, 0, 0],
        features={**FEATURE_SUMMARY, "n": [4, 5]}),
    "telemetry-feature-list-wrong-length": _with(
        telemetry(), count=5, labelled=0, correct=0, predictions=[5, 0, 0],
        features={**FEATURE_SUMMARY, "sum": [1.5]}),
    "announce-missing-sha256": _with(announce(), sha256=_DELETE),
    "announce-length-is-a-string": _with(announce(), length="61440"),
    "announce-length-is-true": _with(announce(), length=True),
    "announce-negative-length": _with(announce(), length=-1),
    "announce-sha256-not-hex": _with(announce(), sha256="g" * 64),
    "announce-sha256-uppercase": _with(announce(), sha256="AB" * 32),
    "announce-sha256-too-short": _with(announce(), sha256="ab" * 31),
    "announce-sha256-with-spaces": _with(announce(), sha256=" " + "a" * 63),
    "announce-delta-negative-length": _with(announce(), delta={"target": "t", "base_sha256": SHA, "length": -5}),
    "announce-delta-missing-target": _with(announce(), delta={"base_sha256": SHA, "length": 5}),
    "error-missing-code": _with(error_report(), code=_DELETE),
    "error-message-is-a-list": _with(error_report(), message=["bad"]),
}


@pytest.mark.parametrize("payload", REFUSED.values(), ids=REFUSED.keys())
def test_malformed_message_is_refused_with_schema_error(payload):
    with pytest.raises(SchemaError):
        parse(payload)


# A number too large for a float is valid JSON; the contract still owes a SchemaError, since
# the device agent and the control plane's ingest catch ContractError only.
HUGE_NUMBERS = {
    "telemetry-window-start-10e400": _with(telemetry(), window_start=10 ** 400, window_end=10 ** 400),
    "telemetry-latency-10e400": _with(telemetry(), latency_ms_max=10 ** 400),
    "announce-issued-at-10e400": _with(announce(), issued_at=10 ** 400),
    "status-ts-10e400": _with(status(), ts=10 ** 400),
    "telemetry-seq-with-5000-digits": b'{"schema":"edgeloop.telemetry/1","seq":' + b"1" * 5000 + b"}",
    "telemetry-feature-sum-10e400": _with(telemetry(), count=5, labelled=0, correct=0, predictions=[5, 0, 0],
                                          features={**FEATURE_SUMMARY, "sum": [10 ** 400, 2.0]}),
}


@pytest.mark.parametrize("payload", HUGE_NUMBERS.values(), ids=HUGE_NUMBERS.keys())
def test_number_too_large_for_a_float_is_refused_with_schema_error(payload):
    assert len(payload) <= MAX_PAYLOAD_BYTES
    with pytest.raises(SchemaError):
        parse(payload)


def test_payload_over_the_limit_is_refused_before_parsing():
    big = _with(telemetry(), extra={"pad": "x" * MAX_PAYLOAD_BYTES})
    assert len(big) > MAX_PAYLOAD_BYTES
    with pytest.raises(PayloadTooLarge):
        parse(big)
    # refused on size alone: even bytes that are not JSON at all
    with pytest.raises(PayloadTooLarge):
        parse(b"\xff" * (MAX_PAYLOAD_BYTES + 1))
    with pytest.raises(PayloadTooLarge):
        parse("x" * (MAX_PAYLOAD_BYTES + 1))


def test_payload_of_exactly_the_limit_is_accepted():
    raw = encode(telemetry())
    padded = raw + b" " * (MAX_PAYLOAD_BYTES - len(raw))
    assert len(padded) == MAX_PAYLOAD_BYTES
    assert parse(padded) == telemetry()


def test_encoding_a_message_over_the_limit_is_refused():
    with pytest.raises(PayloadTooLarge):
        encode(telemetry(extra={"pad": "x" * MAX_PAYLOAD_BYTES}))


def test_refusals_are_contract_errors_and_not_their_siblings():
    with pytest.raises(SchemaError) as e:
        parse(b"[]")
    assert isinstance(e.value, ContractError) and not isinstance(e.value, PayloadTooLarge)
    with pytest.raises(PayloadTooLarge) as e2:
        parse(b" " * (MAX_PAYLOAD_BYTES + 1))
    assert isinstance(e2.value, ContractError) and not isinstance(e2.value, SchemaError)


@pytest.mark.parametrize("msg,expect", [(telemetry(), Status), (status(), Telemetry), (announce(), ErrorReport),
                                        (error_report(), Announce)], ids=["telemetry-as-status",
                                                                          "status-as-telemetry",
                                                                          "announce-as-error",
                                                                          "error-as-announce"])
def test_message_of_another_kind_than_expected_is_refused(msg, expect):
    with pytest.raises(SchemaError, match="expected"):
        parse(encode(msg), expect=expect)


# -- topics ------------------------------------------------------------------------------------
ACME = topics.Fleet("acme")


@pytest.mark.parametrize("device_id", ["a", "7", "dev-1", "Dev_01.rack-3", "x" * 64, "A" + "-" * 63])
def test_valid_device_id_is_accepted(device_id):
    assert topics.valid_device_id(device_id)
    assert ACME.status(device_id) == f"edgeloop/v2/acme/devices/{device_id}/status"
    assert ACME.device_from_topic(ACME.telemetry(device_id)) == device_id


@pytest.mark.parametrize("device_id", ["", "-dev", ".dev", "_dev", "x" * 65, "dev/1", "dev+", "dev#", "+", "#",
                                       "dev 1", "dév", "dev\x00", "dev1\n", "\ndev1", "dev1\r\n"],
                         ids=repr)
def test_invalid_device_id_is_refused(device_id):
    assert not topics.valid_device_id(device_id)
    for make in (ACME.status, ACME.telemetry, ACME.errors, ACME.command, ACME.block_requests,
                 ACME.blocks, ACME.telemetry_ack):
        with pytest.raises(ValueError):
            make(device_id)


@pytest.mark.parametrize("tier", ["", "Edge", "-mcu", "mcu/x", "mcu+", "a" * 33, "mcu\n"], ids=repr)
def test_invalid_tier_gets_no_announce_topic(tier):
    assert not topics.valid_tier(tier)
    with pytest.raises(ValueError):
        ACME.announce(tier)


@pytest.mark.parametrize("fleet", ["", "Acme", "-acme", "acme/x", "acme+", "#", "a" * 33, "acme\n", "ac me"],
                         ids=repr)
def test_invalid_fleet_id_gets_no_topics(fleet):
    assert not topics.valid_fleet(fleet)
    with pytest.raises(ValueError):
        topics.Fleet(fleet)
    with pytest.raises(ValueError):
        topics.for_fleet(fleet)


def test_topics_for_a_device_are_under_its_own_prefix():
    assert ACME.announce("edge-gateway") == "edgeloop/v2/acme/updates/edge-gateway"
    for make, suffix in [(ACME.status, "status"), (ACME.telemetry, "telemetry"), (ACME.errors, "errors"),
                         (ACME.command, "cmd"), (ACME.block_requests, "blocks/req"), (ACME.blocks, "blocks"),
                         (ACME.telemetry_ack, "telemetry/ack")]:
        assert make("dev-9") == f"edgeloop/v2/acme/devices/dev-9/{suffix}"


def test_every_topic_of_a_fleet_is_under_its_own_prefix_and_no_other_fleets():
    other = topics.for_fleet("acme-2")            # a fleet whose id extends this one's
    made = [ACME.announce("mcu"), ACME.announce_all(), ACME.status_all(), ACME.telemetry_all(), ACME.errors_all(),
            ACME.block_requests_all(), *(f("d-1") for f in (ACME.status, ACME.telemetry, ACME.errors, ACME.command,
                                                           ACME.block_requests, ACME.blocks, ACME.telemetry_ack))]
    assert all(t.startswith("edgeloop/v2/acme/") for t in made)
    assert not any(t.startswith(other.prefix + "/") for t in made)
    assert other.device_from_topic(ACME.status("d-1")) is None
    assert ACME.device_from_topic(other.status("d-1")) is None
    assert ACME.everything() == "edgeloop/v2/acme/#"


@pytest.mark.parametrize("topic,device", [
    ("edgeloop/v2/acme/devices/dev-1/status", "dev-1"),
    ("edgeloop/v2/acme/devices/dev-1/telemetry", "dev-1"),
    ("edgeloop/v2/acme/devices/dev-1/blocks/req", "dev-1"),
    ("edgeloop/v2/acme/devices/+/status", None),            # a wildcard is no device
    ("edgeloop/v2/acme/devices/-bad/status", None),
    ("edgeloop/v2/acme/devices/dev-1", None),               # too short
    ("edgeloop/v2/acme/devices/dev-1/a/b/c", None),         # too long
    ("edgeloop/v1/devices/dev-1/status", None),             # another version
    ("edgeloop/v2/other/devices/dev-1/status", None),       # another fleet
    ("edgeloop/v2/devices/dev-1/status", None),             # no fleet
    ("other/v2/acme/devices/dev-1/status", None),
    ("edgeloop/v2/acme/updates/edge-gateway", None),
    ("edgeloop/v2/acme/device/dev-1/status", None),
    ("", None),
])
def test_device_from_topic(topic, device):
    assert ACME.device_from_topic(topic) == device


# -- bundle ------------------------------------------------------------------------------------
SPEC = FeatureSpec(2, ["a", "b"], [{"op": "scale", "factor": 0.5}, {"op": "clip", "min": 0.0, "max": 8.0}],
                   raw_min=0.0, raw_max=16.0)
FILES = {"model.onnx": b"\x08\x07fake-onnx-model-bytes" * 8, "golden.json": b'{"inputs":[[1,2]],"outputs":[[0.5]]}'}


def manifest(**kw) -> Manifest:
    base = dict(model="tiny", version=3, tier="edge-gateway", runtime="onnxruntime", numeric_format="fp32",
                entrypoint="model.onnx", inputs=[TensorSpec("x", [-1, 2], "float32")],
                outputs=[TensorSpec("y", [-1, 3], "float32")], features=SPEC, labels=["0", "1", "2"],
                golden="golden.json", golden_atol=1e-4, max_latency_ms=50.0,
                lineage={"run_id": "run-1"}, measured={"accuracy": 0.9})
    base.update(kw)
    return Manifest(**base)


def members_of(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def make_tar(entries: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """A tar by hand: (name, data or None, type) entries, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "model.onnx"
                tar.addfile(info)
            elif kind == tarfile.DIRTYPE:
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def good_members() -> list[tuple[str, bytes, bytes]]:
    data = write_package(manifest(), FILES)
    return [(name, blob, tarfile.REGTYPE) for name, blob in members_of(data).items()]


def test_package_round_trip():
    data = write_package(manifest(), FILES)
    bundle = read_package(data)
    assert isinstance(bundle, Package)
    assert bundle.files == FILES
    assert bundle.model_bytes == FILES["model.onnx"]
    m = bundle.manifest
    assert m.model_version == "tiny:3"
    assert m.features == SPEC
    assert m.inputs == [TensorSpec("x", [-1, 2], "float32")]
    assert m.lineage == {"run_id": "run-1"} and m.measured == {"accuracy": 0.9}
    assert m.files == {name: {"sha256": hashlib.sha256(blob).hexdigest(), "length": len(blob)}
                       for name, blob in FILES.items()}
    # what was written is what the caller gave, with the file list filled in
    assert Manifest(**{**m.__dict__, "files": {}}) == manifest()


def test_package_layout_is_manifest_first_then_sorted_plain_files():
    data = write_package(manifest(), FILES)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == [MANIFEST, "golden.json", "model.onnx"]
    assert all(i.isfile() and i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.mode == 0o644 for i in infos)


def test_same_inputs_make_the_same_bytes():
    a = write_package(manifest(), FILES)
    b = write_package(manifest(), dict(reversed(list(FILES.items()))))    # insertion order does not matter
    assert a == b and sha256_hex(a) == sha256_hex(b)
    changed = write_package(manifest(), {**FILES, "model.onnx": FILES["model.onnx"] + b"!"})
    assert sha256_hex(changed) != sha256_hex(a)
    assert sha256_hex(write_package(manifest(version=4), FILES)) != sha256_hex(a)


def test_writer_refuses_a_manifest_that_names_a_file_it_does_not_carry():
    with pytest.raises(SchemaError):
        write_package(manifest(), {"model.onnx": FILES["model.onnx"]})    # no golden.json
    with pytest.raises(SchemaError):
        write_package(manifest(runtime="tensorflow"), FILES)


def test_member_changed_after_writing_is_refused():
    members = good_members()
    tampered = [(n, (b[:-1] + bytes([b[-1] ^ 1])) if n == "model.onnx" else b, k) for n, b, k in members]
    assert [len(b) for _, b, _ in tampered] == [len(b) for _, b, _ in members]   # same length, other bytes
    with pytest.raises(SchemaError, match="does not match its manifest hash"):
        read_package(make_tar(tampered))
    assert read_package(make_tar(members)).files == FILES     # the hand-built tar itself is fine


def test_member_of_another_length_is_refused():
    members = [(n, b + b"extra" if n == "golden.json" else b, k) for n, b, k in good_members()]
    with pytest.raises(SchemaError, match="does not match"):
        read_package(make_tar(members))


def test_manifest_edited_to_match_nothing_is_refused():
    members = good_members()
    obj = json.loads(members[0][1])
    obj["files"]["model.onnx"]["sha256"] = "0" * 64
    with pytest.raises(SchemaError):
        read_package(make_tar([(MANIFEST, json.dumps(obj).encode(), tarfile.REGTYPE), *members[1:]]))


def test_missing_manifest_is_refused():
    members = [m for m in good_members() if m[0] != MANIFEST]
    with pytest.raises(SchemaError, match="no manifest.json"):
        read_package(make_tar(members))


@pytest.mark.parametrize("name", ["../evil", "dir/x", "/etc/passwd", "./model.onnx", ".hidden", "model.onnx\n"],
                         ids=repr)
def test_member_outside_the_top_level_is_refused(name):
    with pytest.raises(SchemaError):
        read_package(make_tar([*good_members(), (name, b"payload", tarfile.REGTYPE)]))


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE],
                         ids=["symlink", "hardlink", "directory", "fifo"])
def test_member_that_is_not_a_plain_file_is_refused(kind):
    with pytest.raises(SchemaError, match="not a plain top-level file"):
        read_package(make_tar([*good_members(), ("link", None if kind != tarfile.FIFOTYPE else b"", kind)]))


def test_symlink_in_place_of_a_listed_file_is_refused():
    members = [(n, b, k) if n != "golden.json" else ("golden.json", None, tarfile.SYMTYPE)
               for n, b, k in good_members()]
    with pytest.raises(SchemaError):
        read_package(make_tar(members))


def test_extra_member_not_in_the_manifest_is_refused():
    with pytest.raises(SchemaError, match="do not match the manifest"):
        read_package(make_tar([*good_members(), ("extra.bin", b"smuggled", tarfile.REGTYPE)]))


def test_member_listed_in_the_manifest_but_absent_is_refused():
    members = [m for m in good_members() if m[0] != "golden.json"]
    with pytest.raises(SchemaError):
        read_package(make_tar(members))


def test_member_that_appears_twice_is_refused():
    members = good_members()
    with pytest.raises(SchemaError, match="twice"):
        read_package(make_tar([*members, members[-1]]))


@pytest.mark.parametrize("data", [b"", b"not a tar at all", b"\x00" * 10, b"\x1f\x8b\x08\x00gzip-ish" * 100,
                                  json.dumps({"format": "edgeloop.bundle/1"}).encode() * 50],
                         ids=["empty", "text", "zeros", "gzip-header", "json"])
def test_bytes_that_are_not_a_tar_are_refused(data):
    with pytest.raises(SchemaError):
        read_package(data)


def test_truncated_package_is_refused():
    data = write_package(manifest(), FILES)
    with pytest.raises(SchemaError):
        read_package(data[:700])


@pytest.mark.parametrize("raw", [b"[1, 2]", b"{not json", b'{"format": "edgeloop.bundle/2"}',
                                 b'{"format": "edgeloop.bundle/1"}'], ids=["array", "not-json", "v2", "empty"])
def test_manifest_that_is_not_a_valid_manifest_is_refused(raw):
    members = good_members()
    with pytest.raises(SchemaError):
        read_package(make_tar([(MANIFEST, raw, tarfile.REGTYPE), *members[1:]]))


def test_manifest_that_is_not_utf8_is_refused():
    members = good_members()
    raw = members[0][1].replace(b'"tiny"', b'"t\xffny"')
    assert raw != members[0][1]
    with pytest.raises(SchemaError):
        read_package(make_tar([(MANIFEST, raw, tarfile.REGTYPE), *members[1:]]))


# -- features ----------------------------------------------------------------------------------
def test_feature_steps_apply_in_order_in_float32():
    spec = FeatureSpec(3, ["a", "b", "c"], [
        {"op": "scale", "factor": 2.0},
        {"op": "clip", "min": 0.0, "max": 5.0},
        {"op": "standardize", "mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 0.5]},
    ])
    raw = np.array([[1.0, 2.0, 4.0], [-1.0, 10.0, 0.25]])
    # by hand: scale -> [[2, 4, 8], [-2, 20, 0.5]]; clip -> [[2, 4, 5], [0, 5, 0.5]]
    expected = np.array([[(2 - 1) / 2, (4 - 2) / 4, (5 - 3) / 0.5],
                         [(0 - 1) / 2, (5 - 2) / 4, (0.5 - 3) / 0.5]])
    got = spec.apply(raw)
    assert got.dtype == np.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    one = spec.apply(raw[1])                                   # a single sample, shape (n_features,)
    assert one.shape == (3,) and one.dtype == np.float32
    np.testing.assert_allclose(one, expected[1], atol=1e-6)
    np.testing.assert_array_equal(raw, [[1.0, 2.0, 4.0], [-1.0, 10.0, 0.25]])    # input untouched


def test_feature_spec_with_no_steps_only_casts():
    got = FeatureSpec(2).apply([[1, 2]])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[1.0, 2.0]])


def test_inputs_with_the_wrong_number_of_features_are_refused():
    with pytest.raises(SchemaError, match="expected 3 features"):
        FeatureSpec(3).apply(np.zeros((4, 2)))


def spec_obj(**kw) -> dict:
    base = {"version": 1, "n_features": 2, "names": ["a", "b"],
            "steps": [{"op": "scale", "factor": 0.25}, {"op": "clip", "min": -1, "max": 1},
                      {"op": "standardize", "mean": [0.5, -0.5], "std": [1.5, 2]}],
            "raw_min": 0.0, "raw_max": 16.0}
    base.update(kw)
    return base


def test_feature_spec_round_trip():
    spec = FeatureSpec.from_obj(spec_obj())
    assert spec.n_features == 2 and spec.names == ["a", "b"] and len(spec.steps) == 3
    assert spec.to_obj() == spec_obj()
    again = FeatureSpec.from_obj(json.loads(json.dumps(spec.to_obj())))
    assert again == spec
    x = np.array([[3.0, -7.0], [0.0, 100.0]])
    np.testing.assert_array_equal(again.apply(x), spec.apply(x))


def _std(values) -> dict:
    return spec_obj(steps=[{"op": "standardize", "mean": [0, 0], "std": values}])


FEATURE_REFUSED = {
    "not-an-object": [1, 2],
    "version-3": spec_obj(version=3),
    "shape-product": spec_obj(version=2, input_shape=[3, 1], layout="flat"),
    "shape-layout": spec_obj(version=2, input_shape=[1, 2], layout="NCHW"),
    "version-missing": {k: v for k, v in spec_obj().items() if k != "version"},
    "version-string": spec_obj(version="1"),
    "n-features-zero": spec_obj(n_features=0, names=[], steps=[]),
    "n-features-true": spec_obj(n_features=True, names=[], steps=[]),
    "n-features-string": spec_obj(n_features="2"),
    "std-zero": _std([1.0, 0.0]),
    "std-negative": _std([1.0, -2.0]),
    "std-nan": _std([1.0, float("nan")]),
    "std-too-short": _std([1.0]),
    "std-too-long": _std([1.0, 1.0, 1.0]),
    "mean-too-short": spec_obj(steps=[{"op": "standardize", "mean": [0], "std": [1, 1]}]),
    "mean-not-numbers": spec_obj(steps=[{"op": "standardize", "mean": ["0", "1"], "std": [1, 1]}]),
    "mean-bools": spec_obj(steps=[{"op": "standardize", "mean": [True, False], "std": [1, 1]}]),
    "names-wrong-length": spec_obj(names=["a", "b", "c"]),
    "unknown-op": spec_obj(steps=[{"op": "log"}]),
    "op-missing": spec_obj(steps=[{"factor": 2}]),
    "step-not-an-object": spec_obj(steps=["scale"]),
    "steps-not-a-list": spec_obj(steps={"op": "scale", "factor": 2}),
    "scale-without-factor": spec_obj(steps=[{"op": "scale"}]),
    "scale-factor-string": spec_obj(steps=[{"op": "scale", "factor": "2"}]),
    "scale-factor-nan": spec_obj(steps=[{"op": "scale", "factor": float("nan")}]),
    "clip-without-max": spec_obj(steps=[{"op": "clip", "min": 0}]),
}


@pytest.mark.parametrize("obj", FEATURE_REFUSED.values(), ids=FEATURE_REFUSED.keys())
def test_invalid_feature_spec_is_refused(obj):
    with pytest.raises(SchemaError):
        FeatureSpec.from_obj(obj)


def test_nan_feature_spec_from_the_wire_is_refused():
    """JSON with NaN parses in Python; a spec that would turn every input into NaN must not load."""
    wire = '{"version": 1, "n_features": 1, "steps": [{"op": "standardize", "mean": [0], "std": [NaN]}]}'
    obj = json.loads(wire)
    assert math.isnan(obj["steps"][0]["std"][0])
    with pytest.raises(SchemaError):
        FeatureSpec.from_obj(obj)


def test_file_name_with_a_trailing_newline_is_refused_by_the_writer():
    """Names are 1-128 of [A-Za-z0-9_.-]; a regex anchored with '$' also lets 'name\\n' through."""
    with pytest.raises(SchemaError):
        write_package(manifest(), {**FILES, "notes.txt\n": b"x"})


@pytest.mark.parametrize("field", ["atol", "max_latency_ms"])
def test_manifest_number_too_large_for_a_float_is_refused(field):
    members = good_members()
    obj = json.loads(members[0][1])
    obj["health"][field] = 10 ** 400
    with pytest.raises(SchemaError):
        read_package(make_tar([(MANIFEST, json.dumps(obj).encode(), tarfile.REGTYPE), *members[1:]]))


def test_shaped_feature_spec_round_trips_and_reshapes():
    spec = FeatureSpec(6, [], [{"op": "scale", "factor": 2.0}], input_shape=(1, 2, 3), layout="NCHW")
    obj = json.loads(json.dumps(spec.to_obj()))
    assert obj["version"] == 2 and obj["input_shape"] == [1, 2, 3]
    again = FeatureSpec.from_obj(obj)
    assert again == spec and again.channels == 1
    x = again.model_input(np.arange(12).reshape(2, 6))
    assert x.shape == (2, 1, 2, 3) and x[1, 0, 1, 2] == 22.0
    # a flat spec is written as version 1 exactly as before, so earlier devices read it
    assert FeatureSpec(2).to_obj()["version"] == 1 and FeatureSpec(2).shape == (2,)


def test_task_specs_decide_and_refuse():
    from edgeloop.contracts.tasks import CLASSIFICATION, TaskKind, TaskSpec

    reg = TaskSpec(TaskKind.REGRESSION, tolerance=5.0, bins=[0.0, 10.0, 20.0, 30.0])
    assert TaskSpec.from_obj(json.loads(json.dumps(reg.to_obj()))) == reg
    d = reg.decide(np.array([25.0]))
    assert (d.prediction, d.bin) == (25.0, 2) and reg.correct(25.0, 21.0) and not reg.correct(25.0, 19.0)
    assert reg.decide(np.array([-99.0])).bin == 0 and reg.decide(np.array([1e9])).bin == 2
    assert reg.score(np.array([[1.0], [3.0]]), np.array([2.0, 2.0])) == 1.0
    ano = TaskSpec(TaskKind.ANOMALY, threshold=0.5)
    assert ano.decide(np.array([0.7])).bin == 1 and ano.decide(np.array([0.2])).prediction == 0.0
    assert ano.n_bins(1) == 2 and CLASSIFICATION.decide(np.array([0.1, 0.9])).bin == 1
    assert TaskSpec.from_obj(None) == CLASSIFICATION
    for bad in ({"kind": "ranking"}, {"kind": "anomaly"}, {"kind": "regression", "tolerance": 1.0},
                {"kind": "regression", "tolerance": 1.0, "bins": [2, 1]}, {"kind": "anomaly", "threshold": "x"}, []):
        with pytest.raises(SchemaError):
            TaskSpec.from_obj(bad)
