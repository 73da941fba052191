"""Every parser of untrusted input, with the inputs an attacker or a broken peer can send.

Shared by tests/test_fuzz_parsers.py (1,000 examples each, in the suite) and bench/fuzz_parsers.py
(100,000 each). A target is a parser, a hypothesis strategy for its input, and the errors it is
allowed to raise: the project's own (``ContractError`` and subclasses, or the caller-facing error
of that module). Anything else escaping is a bug: a foreign exception is a crash path.

Control-plane targets: the API's JSON bodies (parsed by the real functions its handlers call,
and POSTed to a real ``ApiServer`` thread, where any 5xx answer is a crash path) and pipeline
files (TOML, ``cloud/loop/closed_loop.py``'s ``parse_pipeline``); their own error is
``UserError``.

Inputs: arbitrary bytes; arbitrary JSON (deeply nested, huge and negative numbers, NaN-like
floats, wrong types everywhere); valid messages with one field replaced by arbitrary JSON; tar
archives with arbitrary members; a valid package with bytes flipped; compressed garbage.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from edgeloop.cloud.errors import UserError
from edgeloop.contracts import blocks, delta, messages
from edgeloop.contracts.package import MANIFEST, Manifest, read_package
from edgeloop.contracts.errors import ContractError

__all__ = ["TARGETS", "Target"]


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    parse: Callable[[Any], Any]
    allowed: tuple[type[BaseException], ...] = (ContractError,)


# -- building blocks ---------------------------------------------------------------------
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2 ** 63, max_value=2 ** 4000),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40),
                     st.sampled_from(["", "0", "-1", "1e400", "NaN", "\x00", "../../etc/passwd", "a" * 300]))
json_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                             st.dictionaries(st.text(max_size=12), inner, max_size=6)),
                           max_leaves=40)


@st.composite
def deeply_nested(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(min_value=50, max_value=200_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return (opener * depth + "1" + closer * depth).encode()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


def _valid_messages() -> list[dict[str, Any]]:
    announce = {"schema": "edgeloop.announce/1", "update_id": "upd-0123456789ab", "model_version": "digits-mlp:2",
                "tier": "edge-gateway", "target": "digits-mlp/2/" + "a" * 64 + ".edge-gateway.elpkg",
                "sha256": "a" * 64, "length": 1234, "image_url": "http://127.0.0.1:8000/image",
                "director_url": "http://127.0.0.1:8000/director", "issued_at": 1.0e9}
    return [announce,
            {"schema": "edgeloop.status/1", "device_id": "dev-1", "state": "committed", "tier": "edge-gateway",
             "model_version": "digits-mlp:2", "update_id": "upd-0123456789ab", "ts": 1.0e9},
            {"schema": "edgeloop.error/1", "device_id": "dev-1", "update_id": "upd-0123456789ab",
             "code": "verify.hash", "message": "sha256 mismatch", "ts": 1.0e9, "report_id": "r-1"},
            {"schema": "edgeloop.command/1", "command": "install", "announce": announce},
            {"schema": "edgeloop.telemetry-ack/1", "device_id": "dev-1", "seqs": [1, 2, 3], "refused": [2],
             "errors": []},
            {"schema": "edgeloop.telemetry/1", "device_id": "dev-1", "seq": 1, "model_version": "digits-mlp:2",
             "window_start": 1.0e9, "window_end": 1.0e9 + 60, "count": 20, "labelled": 0, "correct": 0,
             "errors": 0, "latency_ms_p50": 0.4, "latency_ms_max": 1.2, "predictions": {"3": 20},
             "confidence_hist": [0] * 9 + [20]}]


@st.composite
def mutated(draw: st.DrawFn, valid: list[dict[str, Any]]) -> bytes:
    """A valid document with some fields replaced by arbitrary JSON, removed, or added."""
    doc = json.loads(json.dumps(draw(st.sampled_from(valid))))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(doc) + ["extra"]))
        action = draw(st.sampled_from(["replace", "delete", "nest"]))
        if action == "delete":
            doc.pop(key, None)
        elif action == "nest" and isinstance(doc.get(key), dict) and doc[key]:
            inner = draw(st.sampled_from(sorted(doc[key])))
            doc[key][inner] = draw(json_values)
        else:
            doc[key] = draw(json_values)
    return _json_bytes(doc)


def untrusted_json(valid: list[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=300), json_values.map(_json_bytes), deeply_nested(), mutated(valid))


def _parse_message(payload: bytes) -> Any:
    return messages.parse(payload)


def _parse_message_orjson(payload: bytes) -> Any:   # the control plane parses with orjson
    import orjson
    return messages.parse(payload, loads=orjson.loads)


# -- packages ----------------------------------------------------------------------------
def _manifest_obj() -> dict[str, Any]:
    return {"format": "edgeloop.bundle/1", "model": "m", "version": 1, "model_version": "m:1", "tier": "edge-gateway",
            "runtime": "onnxruntime", "numeric_format": "fp32", "entrypoint": "model.onnx",
            "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
            "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}],
            "features": {"version": 1, "n_features": 4}, "labels": ["a", "b"],
            "health": {"golden": "golden.npz", "atol": 0.01, "max_latency_ms": 50.0},
            "files": {"model.onnx": {"sha256": "0" * 64, "length": 3}, "golden.npz": {"sha256": "0" * 64, "length": 3}},
            "lineage": {}, "measured": {}, "layout": {}, "baseline": {}}


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@st.composite
def package_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "tar", "manifest", "flipped"]))
    if kind == "bytes":
        return draw(st.binary(max_size=2048))
    if kind == "tar":
        names = st.one_of(st.sampled_from([MANIFEST, "model.onnx", "../x", "/abs", "a/b", ""]), st.text(max_size=20))
        members = draw(st.lists(st.tuples(names, st.binary(max_size=64)), max_size=5))
        try:
            return _tar(members)
        except (ValueError, UnicodeError):   # tarfile refuses to write some names: not an input then
            return b""
    manifest = draw(mutated([_manifest_obj()]))
    data = _tar([(MANIFEST, manifest), ("model.onnx", b"abc"), ("golden.npz", b"abc")])
    if kind == "flipped":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return data


def _manifest_from_json(payload: bytes) -> Any:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None   # the package reader's JSON step is covered by the package target
    return Manifest.from_obj(obj)


# -- blocks and deltas -------------------------------------------------------------------
@st.composite
def block_payloads(draw: st.DrawFn) -> bytes:
    header = draw(st.one_of(json_values.map(_json_bytes), deeply_nested(), st.binary(max_size=64)))
    declared = draw(st.one_of(st.just(len(header)), st.integers(0, 65535)))
    return struct.pack(">H", declared % 65536) + header + draw(st.binary(max_size=64))


_valid_block_request = {"schema": blocks.SCHEMA, "request_id": "r1", "repo": "image",
                        "path": "targets/m/1/x.elpkg", "blocks": [0, 1], "block_size": 8192}


@st.composite
def delta_payloads(draw: st.DrawFn) -> tuple[bytes, bytes]:
    base = draw(st.binary(max_size=64))
    kind = draw(st.sampled_from(["bytes", "zlib-bytes", "header", "nested"]))
    if kind == "nested":
        header = draw(deeply_nested())
        return base, zlib.compress(struct.pack(">I", len(header)) + header)
    if kind == "bytes":
        return base, draw(st.binary(max_size=256))
    if kind == "zlib-bytes":
        return base, zlib.compress(draw(st.binary(max_size=256)))
    import hashlib
    body = {"format": delta.FORMAT, "base_sha256": hashlib.sha256(base).hexdigest(),
            "target_sha256": draw(st.one_of(st.just("0" * 64), st.text(max_size=8))),
            "target_length": draw(st.one_of(st.integers(), _scalars)),
            "ops": draw(st.one_of(st.lists(st.lists(st.one_of(st.sampled_from(["copy", "data"]), st.integers(), json_values),
                                                    max_size=4), max_size=4), json_values))}
    if draw(st.booleans()):
        body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
    header = json.dumps(body).encode()
    return base, zlib.compress(struct.pack(">I", len(header)) + header + draw(st.binary(max_size=64)))


def _apply_delta(args: tuple[bytes, bytes]) -> Any:
    base, payload = args
    delta.delta_header(payload)
    return delta.apply_delta(base, payload)


# -- control plane: API bodies and pipeline files -------------------------------------------------
_valid_rollout = {"model_version": "digits-mlp:2", "target": "tier=edge-gateway", "strategy": "canary",
                  "canary": "20%", "bake_s": 2, "growth": 2.0, "max_failure_pct": 10, "min_devices": 2,
                  "retries": 2, "timeout_s": 60.0, "max_error_rate": 0.05, "health_min_inferences": 20}
_valid_token = {"name": "ci-bot", "role": "operator", "expires_in_s": 3600}
_valid_abort = {"reason": "bad canary"}


def _api_rollout(raw: bytes) -> Any:
    from edgeloop.cloud.api import server
    return server._spec(server.parse_body(raw))


def _api_token(raw: bytes) -> Any:
    from edgeloop.cloud.api import server
    return server.token_request(server.parse_body(raw))


class ApiCrash(Exception):
    """The real API server answered 5xx: a foreign exception reached its error middleware."""


class _Rollouts:
    """A RolloutService that accepts what the API hands it (the parsing is what is under test)."""

    def create(self, spec: Any, *, actor: str | None = None) -> str:
        return "ro-fuzz"

    def pause(self, rollout_id: str, *, actor: str | None = None) -> None: ...
    def resume(self, rollout_id: str, *, actor: str | None = None) -> None: ...
    def abort(self, rollout_id: str, reason: str = "", *, actor: str | None = None) -> None: ...

    def status(self, rollout_id: str) -> dict[str, Any]:
        return {"rollout_id": rollout_id}

    def list(self) -> list[dict[str, Any]]:
        return []


_API: dict[str, Any] = {}
API_ENDPOINTS = ["/api/v1/rollouts", "/api/v1/rollouts/ro-fuzz/abort", "/api/v1/rollouts/ro-fuzz/pause",
                 "/api/v1/tokens"]


def _api_http(args: tuple[str, bytes]) -> Any:
    """POST one body to a real ApiServer thread (started once, on a private registry)."""
    import http.client
    if not _API:
        import atexit
        import tempfile
        from pathlib import Path

        from edgeloop.cloud.api.server import ApiServer, TokenStore
        from edgeloop.cloud.registry import Registry
        registry = Registry(Path(tempfile.mkdtemp(prefix="edgeloop-fuzz-")) / "registry.db")
        _API["server"] = ApiServer(registry, rollouts=_Rollouts()).start()
        _API["token"] = TokenStore(registry).create("fuzz-admin", "admin")[1]
        atexit.register(_API["server"].stop)
    path, body = args
    server = _API["server"]
    conn = _API.get("conn") or http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Authorization": f"Bearer {_API['token']}",
                                                       "Content-Type": "application/json"})
        response = conn.getresponse()
        answer = response.read()
        _API["conn"] = conn
    except (OSError, http.client.HTTPException):
        _API.pop("conn", None)
        conn.close()
        raise
    if response.status >= 500 and response.status != 503:
        raise ApiCrash(f"{path}: HTTP {response.status} {answer[:200]!r}")
    return response.status


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value != value:
        return "nan"
    return json.dumps(value)


def toml_doc(doc: dict[str, Any]) -> bytes:
    """A TOML rendering of sections of values (None left out), good enough to reach the checks."""
    lines = []
    for section, table in doc.items():
        if not isinstance(table, dict):
            lines.append(f"{json.dumps(str(section))} = {_toml_value(table)}")
            continue
        lines.append(f"[{json.dumps(str(section))}]")
        lines += [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines).encode()


_valid_pipeline = {"pipeline": {"name": "digits-retrain", "model": "digits-mlp"}, "collect": {"min_samples": 200},
                   "train": {"epochs": 30, "hidden": 32, "seed": 0, "lr": 0.01}, "gate": {"tolerance": 0.01},
                   "package": {"tiers": ["edge-gateway"]},
                   "rollout": {"target": "tier=edge-gateway", "strategy": "canary", "canary": "20%", "bake_s": 2},
                   "watch": {"timeout_s": 300}}


@st.composite
def pipeline_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "text", "nested", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if kind == "nested":
        depth = draw(st.integers(min_value=50, max_value=5_000))   # tomllib takes ~2 s to refuse 100,000
        opener, closer = draw(st.sampled_from([("[", "]"), ("{a = ", "}")]))
        return ("[pipeline]\nname = 'x'\n[train]\nepochs = " + opener * depth + "1" + closer * depth).encode()
    doc = json.loads(json.dumps(_valid_pipeline))
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(sorted(doc) + ["extra"]))
        action = draw(st.sampled_from(["replace", "delete", "field"]))
        if action == "delete":
            doc.pop(section, None)
        elif action == "field" and isinstance(doc.get(section), dict):
            key = draw(st.sampled_from(sorted(doc[section]) + ["extra", "model_version", "nproc_per_node"]))
            doc[section][key] = draw(json_values)
        else:
            doc[section] = draw(json_values)
    return toml_doc(doc)


def _parse_pipeline(raw: bytes) -> Any:
    from pathlib import Path

    from edgeloop.cloud.loop.closed_loop import parse_pipeline
    return parse_pipeline(raw, Path("fuzz.toml"))


TARGETS: list[Target] = [
    Target("mqtt message (device and cloud, json)", untrusted_json(_valid_messages()), _parse_message),
    Target("mqtt message (control plane, orjson)", untrusted_json(_valid_messages()), _parse_message_orjson),
    Target("package archive", package_bytes(), read_package),
    Target("package manifest", untrusted_json([_manifest_obj()]), _manifest_from_json),
    Target("block request", untrusted_json([_valid_block_request]), blocks.BlockRequest.decode),
    Target("block", block_payloads(), blocks.decode_block),
    Target("delta", delta_payloads(), _apply_delta),
    Target("api body: rollout start", untrusted_json([_valid_rollout]), _api_rollout, (UserError,)),
    Target("api body: token create", untrusted_json([_valid_token]), _api_token, (UserError,)),
    Target("api over http (real server thread)",
           st.tuples(st.sampled_from(API_ENDPOINTS), untrusted_json([_valid_rollout, _valid_token, _valid_abort])),
           _api_http, ()),
    Target("pipeline file (toml)", pipeline_bytes(), _parse_pipeline, (UserError,)),
]
