"""Every MQTT message edgeloop sends, version 1 (docs/contracts/mqtt.md).

Messages are UTF-8 JSON objects whose ``schema`` field names the message and its version,
for example ``"edgeloop.status/1"``. Parsing is strict about what a reader needs (required
fields, types, ranges) and tolerant of extra fields, so a newer sender can add fields
without breaking older readers. A payload over :data:`MAX_PAYLOAD_BYTES` is refused before
it is parsed.

``parse(payload)`` turns bytes into one of the dataclasses below or raises
:class:`~contracts.errors.SchemaError` / :class:`~contracts.errors.PayloadTooLarge`;
``encode(msg)`` is its inverse.
"""

from __future__ import annotations

import json
import math
from itertools import chain
from operator import add
import re
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, Callable, ClassVar, TypeVar, Union, overload

from edgeloop.contracts.errors import PayloadTooLarge, SchemaError

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_CLASSES = 1024
MAX_TEXT = 1024
MAX_FAULTS = 16
_GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "Announce",
    "Command",
    "DeviceState",
    "ErrorReport",
    "Message",
    "Status",
    "SignedTime",
    "Telemetry",
    "TelemetryAck",
    "TimeRequest",
    "encode",
    "parse",
    "time_signing_bytes",
]


class DeviceState(StrEnum):
    """The states a device reports on its status topic (stable wire names)."""

    ONLINE = "online"            # connected, running its current model
    OFFLINE = "offline"          # set by the broker from the device's last will
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    TESTING = "testing"
    COMMITTED = "committed"      # the new model is installed and serving
    FAILED = "failed"            # the update was refused; the previous model still serves
    ROLLED_BACK = "rolled_back"  # the new model failed its health check; previous restored


def _req(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise SchemaError(f"missing field {name!r}")
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:  # JSON true is not an integer here
        raise SchemaError(f"field {name!r} must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise SchemaError(f"field {name!r} must be {_kind_name(kind)}")
    if isinstance(value, str) and len(value) > MAX_TEXT:
        raise SchemaError(f"field {name!r} is longer than {MAX_TEXT} characters")
    if isinstance(value, float) and not math.isfinite(value):
        raise SchemaError(f"field {name!r} must be finite")
    if isinstance(value, int) and float in kinds and abs(value) > 2**53:
        raise SchemaError(f"field {name!r} is too large")   # 1e400 written as an integer, say
    return value


def _opt(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    if obj.get(name) is None:
        return default
    return _req(obj, name, kind)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", list: "a list",
                        dict: "an object", bool: "a boolean"}.get(k, k.__name__) for k in kinds)


def _non_negative(name: str, value: int | float) -> None:
    if value < 0:
        raise SchemaError(f"field {name!r} must not be negative")


def _int_list(obj: dict[str, Any], name: str, max_len: int = MAX_CLASSES) -> list[int]:
    values = _req(obj, name, list)
    if len(values) > max_len:
        raise SchemaError(f"field {name!r} has more than {max_len} entries")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SchemaError(f"field {name!r} must be a list of non-negative integers")
    return list(values)


@dataclass(frozen=True)
class Announce:
    """Cloud -> devices of a tier: an update is available (retained)."""

    SCHEMA: ClassVar[str] = "edgeloop.announce/1"
    update_id: str
    model: str
    model_version: str
    tier: str
    target: str          # TUF target path, e.g. "digits-mlp/3/edge-gateway.elpkg"
    length: int
    sha256: str
    repository: str      # base URL of the image repository (metadata/ and targets/ under it)
    director: str        # base URL of the director repository (metadata/ under it)
    issued_at: float
    delta: dict[str, Any] | None = None   # {"target", "base_sha256", "length"}: a delta from that base
    group: str | None = None   # director assignment group to check (None: the device's own group)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Announce:
        msg = cls(
            update_id=_req(obj, "update_id", str), model=_req(obj, "model", str),
            model_version=_req(obj, "model_version", str), tier=_req(obj, "tier", str),
            target=_req(obj, "target", str), length=_req(obj, "length", int),
            sha256=_req(obj, "sha256", str), repository=_req(obj, "repository", str),
            director=_req(obj, "director", str), issued_at=float(_req(obj, "issued_at", (int, float))),
            delta=_opt(obj, "delta", dict), group=_opt(obj, "group", str),
        )
        if msg.delta is not None:
            _req(msg.delta, "target", str)
            _req(msg.delta, "base_sha256", str)
            _non_negative("delta.length", _req(msg.delta, "length", int))
        _non_negative("length", msg.length)
        if msg.group is not None and not _GROUP.fullmatch(msg.group):
            raise SchemaError("field 'group' must be 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
        if len(msg.sha256) != 64 or any(c not in "0123456789abcdef" for c in msg.sha256):
            raise SchemaError("field 'sha256' must be 64 lowercase hex digits")
        return msg


@dataclass(frozen=True)
class Status:
    """Device -> cloud: the device's state (retained; the last will says ``offline``)."""

    SCHEMA: ClassVar[str] = "edgeloop.status/1"
    device_id: str
    state: DeviceState
    tier: str
    model_version: str | None = None   # the version now serving inference
    update_id: str | None = None       # the update this state is about, if any
    reason: str | None = None          # why, for failed / rolled_back
    ts: float = 0.0
    # faults the device has now, by code (contracts/codes.py: storage.full, storage.readonly,
    # clock.skewed, ...) with a line of detail each; empty when all is well
    faults: dict[str, str] = field(default_factory=dict)
    clock_offset_s: float | None = None   # the control plane's signed time minus the device's clock

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Status:
        state = _req(obj, "state", str)
        try:
            parsed_state = DeviceState(state)
        except ValueError:
            raise SchemaError(f"unknown device state {state!r}") from None
        faults = _opt(obj, "faults", dict, {})
        if len(faults) > MAX_FAULTS or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                                               and len(v) <= MAX_TEXT for k, v in faults.items()):
            raise SchemaError(f"field 'faults' must map at most {MAX_FAULTS} codes to lines of text")
        offset = _opt_finite(obj, "clock_offset_s")
        return cls(
            device_id=_req(obj, "device_id", str), state=parsed_state, tier=_req(obj, "tier", str),
            model_version=_opt(obj, "model_version", str), update_id=_opt(obj, "update_id", str),
            reason=_opt(obj, "reason", str), ts=float(_opt(obj, "ts", (int, float), 0.0)),
            faults=dict(faults), clock_offset_s=offset,
        )


@dataclass(frozen=True)
class Telemetry:
    """Device -> cloud: one window of inference, summarised (docs/contracts/telemetry.md).

    ``seq`` increases by one per record per device; (device_id, seq) identifies a record, so
    a record delivered twice is stored once.
    """

    SCHEMA: ClassVar[str] = "edgeloop.telemetry/1"
    device_id: str
    seq: int
    model_version: str | None
    window_start: float
    window_end: float
    count: int                       # inferences in the window
    labelled: int                    # of which had ground truth
    correct: int                     # of the labelled, predicted right
    predictions: list[int]           # count per class index
    confidence_hist: list[int]       # 10 equal bins over [0, 1]
    latency_ms_p50: float
    latency_ms_max: float
    errors: int = 0                  # inference errors in the window
    extra: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] | None = None   # per-feature summary on the package baseline's bin edges
    samples: dict[str, Any] | None = None    # sampled raw inputs {"x": [[num]*f], "y": [int|None]} (opt-in)
    abs_err_sum: float | None = None         # regression: sum of |prediction - label| over the labelled

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Telemetry:
        msg = cls(
            device_id=_req(obj, "device_id", str), seq=_req(obj, "seq", int),
            model_version=_opt(obj, "model_version", str),
            window_start=float(_req(obj, "window_start", (int, float))),
            window_end=float(_req(obj, "window_end", (int, float))),
            count=_req(obj, "count", int), labelled=_req(obj, "labelled", int),
            correct=_req(obj, "correct", int), predictions=_int_list(obj, "predictions"),
            confidence_hist=_int_list(obj, "confidence_hist", 100),
            latency_ms_p50=float(_req(obj, "latency_ms_p50", (int, float))),
            latency_ms_max=float(_req(obj, "latency_ms_max", (int, float))),
            errors=_opt(obj, "errors", int, 0), extra=_opt(obj, "extra", dict, {}),
            features=_opt(obj, "features", dict), samples=_opt(obj, "samples", dict),
            abs_err_sum=_opt_finite(obj, "abs_err_sum"),
        )
        if msg.features is not None:
            _check_feature_summary(msg.features, msg.count)
        if msg.samples is not None:
            _check_samples(msg.samples, msg.count)
        for name in ("seq", "count", "labelled", "correct", "errors"):
            _non_negative(name, getattr(msg, name))
        if not msg.correct <= msg.labelled <= msg.count:
            raise SchemaError("telemetry counts must satisfy correct <= labelled <= count")
        if sum(msg.predictions) > msg.count:
            raise SchemaError("telemetry predictions add up to more than count")
        if msg.window_end < msg.window_start:
            raise SchemaError("telemetry window ends before it starts")
        if msg.abs_err_sum is not None and msg.abs_err_sum < 0:
            raise SchemaError("telemetry abs_err_sum must not be negative")
        return msg


def _opt_finite(obj: dict[str, Any], key: str) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SchemaError(f"field {key!r} must be a finite number")
    return float(v)


MAX_FEATURES = 1024
MAX_BINS = 64
MAX_SAMPLES = 32     # sampled raw inputs per telemetry record


def _check_samples(samples: dict[str, Any], count: int) -> None:
    """``{"x": [[num]*f]*k, "y": [num|None]*k}``: k <= MAX_SAMPLES and <= the window's count,
    f <= MAX_FEATURES (devices do not sample larger inputs)."""
    xs, ys = samples.get("x"), samples.get("y")
    if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys):
        raise SchemaError("samples needs lists x and y of the same length")
    if len(xs) > min(MAX_SAMPLES, count):
        raise SchemaError(f"samples holds {len(xs)} rows: at most {MAX_SAMPLES} and not more than the window's count")
    width = None
    for row in xs:
        if not isinstance(row, list) or not 0 < len(row) <= MAX_FEATURES or (width is not None and len(row) != width):
            raise SchemaError("samples.x rows must be equal-length lists of 1-1024 numbers")
        width = len(row)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in row):
            raise SchemaError("samples.x must hold finite numbers")
    # a class index or normal/anomaly flag, a regression target (any finite number), or unknown
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v))
           for v in ys):
        raise SchemaError("samples.y must hold finite numbers (class labels or regression targets) or null")


_INT, _NUMBER = {int}, {int, float}      # exact types: a JSON true/false is not a count


def _check_feature_summary(summary: dict[str, Any], count: int) -> None:
    """``{"hist": [[int]*bins]*f, "n", "missing": [int]*f, "sum", "sumsq", "min", "max": [num]*f}``
    and optionally ``"rn": int, "rsum", "rsumsq": [num]*f`` (residual sums): every list one entry
    per feature, histograms on the baseline's bins; counts add up."""
    hist = summary.get("hist")
    if not isinstance(hist, list) or not 0 < len(hist) <= MAX_FEATURES:
        raise SchemaError(f"features.hist must list 1-{MAX_FEATURES} histograms")
    f = len(hist)
    # C-level passes (map over built-ins) instead of a Python loop per row: ingest checks about
    # 1,100 values per record, and this is most of the ingest path's cost
    lengths = list(map(len, hist)) if set(map(type, hist)) <= {list} else None
    if lengths is None or min(lengths) < 1 or max(lengths) > MAX_BINS or \
            not set(map(type, chain.from_iterable(hist))) <= _INT or min(map(min, hist)) < 0:
        raise SchemaError(f"features.hist rows must be 1-{MAX_BINS} non-negative integers")
    for key in ("n", "missing", "sum", "sumsq", "min", "max"):
        values = summary.get(key)
        if not isinstance(values, list) or len(values) != f or not set(map(type, values)) <= _NUMBER or \
                max(map(abs, values)) > 2**53 or not all(map(math.isfinite, values)):
            raise SchemaError(f"features.{key} must list {f} finite numbers")
    if "rn" in summary or "rsum" in summary or "rsumsq" in summary:      # residual sums (optional)
        rn = summary.get("rn")
        if type(rn) is not int or not 0 <= rn <= count:
            raise SchemaError("features.rn must be an integer between 0 and count")
        for key in ("rsum", "rsumsq"):
            values = summary.get(key)
            if not isinstance(values, list) or len(values) != f or not set(map(type, values)) <= _NUMBER or \
                    not all(map(math.isfinite, values)):
                raise SchemaError(f"features.{key} must list {f} finite numbers")
    n, missing = summary["n"], summary["missing"]
    sums = list(map(sum, hist))
    if sums != n or min(n) < 0 or max(map(add, n, missing)) > count:
        bad = next((i for i in range(f) if sums[i] != n[i] or n[i] < 0 or n[i] + missing[i] > count), 0)
        raise SchemaError(f"features: feature {bad} counts do not add up")


@dataclass(frozen=True)
class ErrorReport:
    """Device -> cloud: one failure, with a stable machine-readable code."""

    SCHEMA: ClassVar[str] = "edgeloop.error/1"
    device_id: str
    code: str            # e.g. "verify.signature", "verify.hash", "health.golden"
    message: str
    update_id: str | None = None
    ts: float = 0.0
    report_id: str | None = None   # the device's name for this report: stored once, confirmed by it

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> ErrorReport:
        report_id = _opt(obj, "report_id", str)
        if report_id is not None and not _GROUP.fullmatch(report_id):
            raise SchemaError("report_id must be 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
        return cls(
            device_id=_req(obj, "device_id", str), code=_req(obj, "code", str),
            message=_req(obj, "message", str), update_id=_opt(obj, "update_id", str),
            ts=float(_opt(obj, "ts", (int, float), 0.0)), report_id=report_id,
        )


@dataclass(frozen=True)
class Command:
    """Cloud -> one device, on ``devices/<id>/cmd`` (QoS 1, not retained): what a rollout asks.

    ``install``: install ``announce`` (an update this device's rollout wave reached; a rollback
    is an install of the previous package). The device still checks everything it checks for
    a tier-wide announcement, and the director assignment under ``announce.group``.
    """

    SCHEMA: ClassVar[str] = "edgeloop.command/1"
    command: str                       # "install"
    rollout_id: str
    announce: Announce
    issued_at: float = 0.0

    COMMANDS: ClassVar[tuple[str, ...]] = ("install",)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Command:
        command = _req(obj, "command", str)
        if command not in cls.COMMANDS:
            raise SchemaError(f"unknown command {command!r}; known: {', '.join(cls.COMMANDS)}")
        inner = _req(obj, "announce", dict)
        return cls(command=command, rollout_id=_req(obj, "rollout_id", str), announce=Announce.from_obj(inner),
                   issued_at=float(_opt(obj, "issued_at", (int, float), 0.0)))


MAX_ACK_SEQS = 4096


@dataclass(frozen=True)
class TelemetryAck:
    """Cloud -> one device, on ``devices/<id>/telemetry/ack`` (QoS 0): the ingest has finished
    with these telemetry records (and error reports, by ``report_id``), so the device may delete
    them from its outbox.

    Sent only after the records' batch is committed to the store. ``seqs`` lists every record
    the ingest is done with: stored now, stored before (a duplicate), or ``refused`` (not good
    data, kept in the cloud's ``telemetry_rejects``; sending it again would not change that).
    A lost acknowledgement costs one resend, which the store deduplicates on (device, seq).
    """

    SCHEMA: ClassVar[str] = "edgeloop.telemetry_ack/1"
    device_id: str
    seqs: list[int]
    refused: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)    # report_ids of error reports now stored

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> TelemetryAck:
        seqs = _int_list(obj, "seqs", MAX_ACK_SEQS)
        refused = _int_list(obj, "refused", MAX_ACK_SEQS) if obj.get("refused") is not None else []
        if not set(refused) <= set(seqs):
            raise SchemaError("telemetry ack lists refused records that are not among its seqs")
        errors = _opt(obj, "errors", list, [])
        if len(errors) > MAX_ACK_SEQS or not all(isinstance(e, str) and _GROUP.fullmatch(e) for e in errors):
            raise SchemaError("telemetry ack errors must list report ids")
        return cls(device_id=_req(obj, "device_id", str), seqs=seqs, refused=refused, errors=list(errors))


_NONCE = re.compile(r"^[0-9a-f]{16,64}$")
_HEX = re.compile(r"^[0-9a-f]{1,256}$")
MAX_TIME_SIGNATURES = 16


@dataclass(frozen=True)
class TimeRequest:
    """Device -> cloud, on ``devices/<id>/time/req`` (QoS 0): "sign the time for this nonce"
    (the Uptane time server's request; a fresh random nonce each time)."""

    SCHEMA: ClassVar[str] = "edgeloop.time_request/1"
    device_id: str
    nonce: str

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> TimeRequest:
        nonce = _req(obj, "nonce", str)
        if not _NONCE.fullmatch(nonce):
            raise SchemaError("field 'nonce' must be 16-64 lowercase hex digits")
        return cls(device_id=_req(obj, "device_id", str), nonce=nonce)


@dataclass(frozen=True)
class SignedTime:
    """Cloud -> one device, on ``devices/<id>/time`` (QoS 0): the control plane's time, signed
    over :func:`time_signing_bytes` by keys of the director's ``timestamp`` role (whose public
    halves are in the director root the device trusts). ``signatures``: ``{"keyid", "sig"}``
    objects, lowercase hex."""

    SCHEMA: ClassVar[str] = "edgeloop.time/1"
    device_id: str
    nonce: str
    time: float
    signatures: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> SignedTime:
        nonce = _req(obj, "nonce", str)
        if not _NONCE.fullmatch(nonce):
            raise SchemaError("field 'nonce' must be 16-64 lowercase hex digits")
        t = _opt_finite(obj, "time")
        if t is None or t < 0:
            raise SchemaError("field 'time' must be a non-negative number")
        sigs = _req(obj, "signatures", list)
        if len(sigs) > MAX_TIME_SIGNATURES or not all(
                isinstance(g, dict) and set(g) == {"keyid", "sig"} and all(isinstance(v, str) and _HEX.fullmatch(v)
                                                                          for v in g.values()) for g in sigs):
            raise SchemaError(f"field 'signatures' must hold at most {MAX_TIME_SIGNATURES} {{keyid, sig}} hex pairs")
        return cls(device_id=_req(obj, "device_id", str), nonce=nonce, time=t, signatures=[dict(g) for g in sigs])


def time_signing_bytes(device_id: str, nonce: str, t: float) -> bytes:
    """What a :class:`SignedTime` signature covers (canonical JSON, with its schema name so it
    can never be mistaken for TUF metadata or another message)."""
    return json.dumps({"schema": SignedTime.SCHEMA, "device_id": device_id, "nonce": nonce, "time": t},
                      sort_keys=True, separators=(",", ":")).encode()


Message = Union[Announce, Status, Telemetry, ErrorReport, Command, TelemetryAck, TimeRequest, SignedTime]
_BY_SCHEMA: dict[str, Any] = {c.SCHEMA: c for c in (Announce, Status, Telemetry, ErrorReport, Command, TelemetryAck,
                                                    TimeRequest, SignedTime)}


M = TypeVar("M", Announce, Status, Telemetry, ErrorReport, Command, TelemetryAck, TimeRequest, SignedTime)


@overload
def parse(payload: bytes | str, expect: None = None, loads: Callable[[bytes], Any] | None = None) -> Message: ...
@overload
def parse(payload: bytes | str, expect: type[M], loads: Callable[[bytes], Any] | None = None) -> M: ...


def parse(payload: bytes | str, expect: type[Any] | None = None,
          loads: Callable[[bytes], Any] | None = None) -> Message:
    """Parse and validate one message; with ``expect`` (a message class) the result is of that
    class (and typed so: ``parse(raw, TelemetryAck)`` is a TelemetryAck).

    Raises PayloadTooLarge if the payload is over MAX_PAYLOAD_BYTES, SchemaError for anything
    else wrong (not UTF-8 JSON, not an object, unknown schema, not the ``expect``ed kind,
    missing or mistyped fields).
    """
    raw = payload.encode() if isinstance(payload, str) else bytes(payload)
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"payload of {len(raw)} bytes is over the {MAX_PAYLOAD_BYTES} byte limit")
    try:
        obj = loads(raw) if loads is not None else json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:   # ValueError: JSONDecodeError, huge ints
        raise SchemaError(f"payload is not UTF-8 JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise SchemaError("payload is not a JSON object")
    schema = obj.get("schema")
    cls = _BY_SCHEMA.get(schema) if isinstance(schema, str) else None
    if cls is None:
        raise SchemaError(f"unknown message schema {schema!r}")
    if expect is not None and cls is not expect:
        raise SchemaError(f"expected {expect.SCHEMA}, got {schema}")
    return cls.from_obj(obj)


def encode(msg: Message) -> bytes:
    """The wire form of a message: compact JSON with its ``schema`` field first."""
    body: dict[str, Any] = {"schema": msg.SCHEMA}
    body.update({f.name: getattr(msg, f.name) for f in fields(msg)})
    if isinstance(msg, Status):
        body["state"] = str(msg.state)
    if isinstance(msg, Command):
        body["announce"] = {"schema": Announce.SCHEMA, **asdict(msg.announce)}
    raw = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"message of {len(raw)} bytes is over the {MAX_PAYLOAD_BYTES} byte limit")
    return raw


def as_dict(msg: Message) -> dict[str, Any]:
    """A plain dict of the message's fields (for storage and printing)."""
    d = asdict(msg)
    if isinstance(msg, Status):
        d["state"] = str(msg.state)
    return d
