"""Making delta packages for retrained models (the device side is :mod:`edgeloop.contracts.delta`).

When a model is retrained and only some tensors change (a fine-tuned head), most bytes of the
new package already sit on the device in the old one. :func:`make_delta` walks the new
package's tar members: unchanged members are copied from the base; in the model file, each
run of bytes equal to the base at the same offset is copied (tensors of the same shape keep
their offsets in a re-exported graph, so unchanged tensors are copied whole and only changed
tensors travel); small members that changed (manifest, golden vectors) go through a
sequence diff. The result is checked by applying it before it is returned; if it does not
reproduce the target, or is not smaller, there is no delta (ship the full package).
"""

from __future__ import annotations

import difflib
import io
import re
import tarfile
from dataclasses import dataclass
from typing import Any

from edgeloop.contracts.package import sha256_hex
from edgeloop.contracts.delta import apply_delta, encode_delta

__all__ = ["make_delta", "DeltaStats"]

MIN_COPY = 64          # shorter equal runs are sent as data (a copy op costs about as much)


@dataclass(frozen=True)
class DeltaStats:
    full_bytes: int
    delta_bytes: int
    copied_bytes: int
    sent_bytes: int

    @property
    def ratio(self) -> float:
        return self.delta_bytes / self.full_bytes


def _members(package: bytes) -> dict[str, tuple[int, int]]:
    """name -> (offset of its data in the tar, length)."""
    with tarfile.open(fileobj=io.BytesIO(package), mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


class _Ops:
    def __init__(self) -> None:
        self.ops: list[list[Any]] = []
        self.blob = bytearray()
        self.copied = self.sent = 0

    def copy(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        last = self.ops[-1] if self.ops else None
        if last and last[0] == "copy" and last[1] + last[2] == offset:
            last[2] += length
        else:
            self.ops.append(["copy", offset, length])
        self.copied += length

    def data(self, new: bytes) -> None:
        if new:
            last = self.ops[-1] if self.ops else None
            if last and last[0] == "data" and last[1] + last[2] == len(self.blob):
                last[2] += len(new)
            else:
                self.ops.append(["data", len(self.blob), len(new)])
            self.blob += new
            self.sent += len(new)


def _same_offset_runs(ops: _Ops, base: bytes, base_off: int, new: bytes) -> None:
    """Copy runs equal to the base at the same offset; send the rest."""
    i, n = 0, len(new)
    while i < n:
        j = i
        while j < n and base_off + j < len(base) and base[base_off + j] == new[j]:
            j += 1
        if j - i >= MIN_COPY:
            ops.copy(base_off + i, j - i)
            i = j
            continue
        k = max(j, i + 1)
        while k < n and not (base_off + k + MIN_COPY <= len(base)
                             and base[base_off + k:base_off + k + MIN_COPY] == new[k:k + MIN_COPY]):
            k += 1
        ops.data(new[i:k])
        i = k


_TOKEN = re.compile(rb"[^,\n]*[,\n]|[^,\n]+$")


def _sequence_diff(ops: _Ops, base: bytes, base_off: int, new: bytes) -> None:
    """Diff on tokens (runs ending in ',' or a newline): JSON-friendly, and fast because
    SequenceMatcher compares token hashes, not bytes."""
    a, b = _TOKEN.findall(base), _TOKEN.findall(new)
    a_at = [0]
    for tok in a:
        a_at.append(a_at[-1] + len(tok))
    b_at = [0]
    for tok in b:
        b_at.append(b_at[-1] + len(tok))
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b).get_opcodes():
        length = a_at[i2] - a_at[i1]
        if tag == "equal" and length >= MIN_COPY:
            ops.copy(base_off + a_at[i1], length)
        else:
            ops.data(new[b_at[j1]:b_at[j2]])


def make_delta(base: bytes, target: bytes, model_member: str = "model.onnx",
               small_limit: int = 256 * 1024) -> tuple[bytes, DeltaStats] | None:
    """A verified delta from ``base`` to ``target`` packages, or None if it would not help (or
    either is not a package tar)."""
    try:
        base_members, target_members = _members(base), _members(target)
    except tarfile.TarError:
        return None
    ops = _Ops()
    pos = 0
    for name, (off, size) in sorted(target_members.items(), key=lambda kv: kv[1][0]):
        _same_offset_runs(ops, base, pos, target[pos:off])      # tar headers and padding
        data = target[off:off + size]
        if name in base_members:
            b_off, b_size = base_members[name]
            b_data = base[b_off:b_off + b_size]
            if b_data == data:
                ops.copy(b_off, size)
            elif name == model_member or size > small_limit:
                _same_offset_runs(ops, base, b_off, data)
            else:
                _sequence_diff(ops, b_data, b_off, data)
        else:
            ops.data(data)
        pos = off + size
    _same_offset_runs(ops, base, pos, target[pos:])
    delta = encode_delta(sha256_hex(base), target, ops.ops, bytes(ops.blob))
    if len(delta) >= len(target) or apply_delta(base, delta) != target:
        return None
    return delta, DeltaStats(len(target), len(delta), ops.copied, ops.sent)
