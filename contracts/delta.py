"""Delta packages, version 1: a new package expressed against a package the device already has.

A delta is zlib-compressed: a 4-byte big-endian header length, a JSON header, then the new
bytes it carries::

    {"format": "edgeloop.delta/1", "base_sha256": ..., "target_sha256": ..., "target_length": N,
     "ops": [["copy", base_offset, length], ["data", blob_offset, length], ...]}

Applying it copies ranges of the base package and of the data blob, in order. The cloud side
makes the ops tensor-aware (the model file's unchanged tensors are copied, only changed ones
travel); the device side only copies and inserts, so it needs no ONNX or TFLite parser.
:func:`apply_delta` is pure and bounded, and checks the result against the target's sha256:
a delta can never produce anything but the package it names.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from typing import Any

from edgeloop.contracts.errors import ContractError, PayloadTooLarge, SchemaError

FORMAT = "edgeloop.delta/1"
MAX_TARGET_BYTES = 512 * 1024 * 1024
MAX_DELTA_JSON = 64 * 1024 * 1024

__all__ = ["FORMAT", "DeltaError", "apply_delta", "encode_delta", "delta_header"]


class DeltaError(ContractError):
    """The delta does not apply to this base, or does not produce its target."""


def encode_delta(base_sha256: str, target: bytes, ops: list[list[Any]], blob: bytes) -> bytes:
    body = {"format": FORMAT, "base_sha256": base_sha256, "target_sha256": hashlib.sha256(target).hexdigest(),
            "target_length": len(target), "ops": ops}
    header = json.dumps(body, separators=(",", ":")).encode()
    return zlib.compress(struct.pack(">I", len(header)) + header + blob, 9)


def _decode(delta: bytes) -> tuple[dict[str, Any], bytes]:
    try:
        d = zlib.decompressobj()
        raw = d.decompress(delta, MAX_DELTA_JSON)
        if d.unconsumed_tail:
            raise PayloadTooLarge("delta expands beyond its bound")
        (size,) = struct.unpack(">I", raw[:4])
        body = json.loads(raw[4:4 + size])
    except (zlib.error, struct.error, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise SchemaError(f"not an {FORMAT} document: {str(e)[:200]}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("ops"), list):
        raise SchemaError(f"not an {FORMAT} document")
    return body, raw[4 + size:]


def delta_header(delta: bytes) -> dict[str, Any]:
    body, _ = _decode(delta)
    return {k: body.get(k) for k in ("base_sha256", "target_sha256", "target_length")}


def apply_delta(base: bytes, delta: bytes) -> bytes:
    """The target package's bytes. Raises DeltaError (wrong base, bad ops, wrong result)."""
    body, blob = _decode(delta)
    if hashlib.sha256(base).hexdigest() != body.get("base_sha256"):
        raise DeltaError("this delta was made for another base package")
    length = body.get("target_length")
    if not isinstance(length, int) or not 0 <= length <= MAX_TARGET_BYTES:
        raise SchemaError("delta target_length out of bounds")
    out = bytearray()
    sources = {"copy": base, "data": blob}
    for op in body["ops"]:
        if not (isinstance(op, list) and len(op) == 3 and isinstance(op[0], str) and op[0] in sources
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in op[1:])
                and op[1] + op[2] <= len(sources[op[0]])):
            raise SchemaError(f"malformed delta op {op!r:.60}")
        out += sources[op[0]][op[1]:op[1] + op[2]]
        if len(out) > length:
            raise DeltaError("delta produces more bytes than its target")
    if len(out) != length or hashlib.sha256(out).hexdigest() != body.get("target_sha256"):
        raise DeltaError("delta did not reproduce its target package")
    return bytes(out)
