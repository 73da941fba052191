"""The package (bundle) format, version 1 (docs/contracts/package.md).

A package is one uncompressed POSIX tar file (``.elpkg``) holding ``manifest.json`` as its
first member and every file the manifest lists. The tar is deterministic (sorted members,
mtime 0, uid/gid 0), so the same inputs make the same bytes and the same sha256.

:func:`read_package` is pure: it takes bytes, enforces the size bounds, refuses any member
that is not a plain file at the top level, and checks every file against the length and
sha256 in the manifest. It raises :class:`~contracts.errors.SchemaError` for anything wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any

from edgeloop.contracts.errors import PayloadTooLarge, SchemaError
from edgeloop.contracts.features import FeatureSpec
from edgeloop.contracts.tasks import CLASSIFICATION, TaskSpec

FORMAT = "edgeloop.bundle/1"
MANIFEST = "manifest.json"
MAX_PACKAGE_BYTES = 512 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_MEMBERS = 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RUNTIMES = ("onnxruntime", "litert", "tflite-micro", "triton")
# measured.ram_bytes_method of an mcu package whose arena was found by running TFLM in it: the
# smallest arena it runs in, which a device (or firmware) can be given exactly
ARENA_MIN_SEARCH = "tflm-min-search"

__all__ = ["FORMAT", "MANIFEST", "ARENA_MIN_SEARCH", "Package", "Manifest", "TensorSpec", "read_package", "write_package", "sha256_hex"]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list[int]        # -1 for a dynamic dimension
    dtype: str              # numpy dtype name: float32, int8, ...
    # integer tensors: (scale, zero_point), real = (q - zero_point) * scale; None for float tensors
    quantization: tuple[float, int] | None = None

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.quantization is not None:
            obj["quantization"] = {"scale": self.quantization[0], "zero_point": self.quantization[1]}
        return obj

    @classmethod
    def from_obj(cls, obj: Any) -> TensorSpec:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise SchemaError("tensor spec needs a 'name'")
        shape = obj.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise SchemaError(f"tensor {obj['name']!r} needs an integer 'shape' list")
        if not isinstance(obj.get("dtype"), str):
            raise SchemaError(f"tensor {obj['name']!r} needs a 'dtype'")
        quant = obj.get("quantization")
        return cls(obj["name"], shape, obj["dtype"], None if quant is None else _quantization(obj["name"], quant))


def _quantization(name: str, q: Any) -> tuple[float, int]:
    scale, zero_point = (q.get("scale"), q.get("zero_point")) if isinstance(q, dict) else (None, None)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise SchemaError(f"tensor {name!r} quantization needs a finite positive 'scale'")
    if isinstance(zero_point, bool) or not isinstance(zero_point, int) or not -(1 << 31) <= zero_point < (1 << 31):
        raise SchemaError(f"tensor {name!r} quantization needs an integer 'zero_point'")
    return float(scale), zero_point


@dataclass(frozen=True)
class Manifest:
    """What a package is, what it needs, and how to check it works."""

    model: str
    version: int
    tier: str
    runtime: str
    numeric_format: str                 # fp32, fp16, int8
    entrypoint: str                     # the model file inside the package
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    features: FeatureSpec
    labels: list[str]
    golden: str                         # file with golden inputs and expected outputs
    golden_atol: float                  # allowed |difference| on golden outputs
    max_latency_ms: float               # health check budget per inference on the device
    files: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> {sha256, length}
    lineage: dict[str, Any] = field(default_factory=dict)            # run, data set hash, ...
    measured: dict[str, Any] = field(default_factory=dict)   # size, arena, latency, accuracy (packaging time)
    layout: dict[str, Any] = field(default_factory=dict)     # extra views: {"triton": {path: member}, "c_header": member}
    baseline: dict[str, Any] = field(default_factory=dict)   # training-data statistics for drift monitoring
    task: TaskSpec = CLASSIFICATION                           # what an output row means (contracts/tasks.py)

    @property
    def model_version(self) -> str:
        return f"{self.model}:{self.version}"

    def to_obj(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "model": self.model, "version": self.version,
            "model_version": self.model_version, "tier": self.tier, "runtime": self.runtime,
            "numeric_format": self.numeric_format, "entrypoint": self.entrypoint,
            "inputs": [t.to_obj() for t in self.inputs], "outputs": [t.to_obj() for t in self.outputs],
            "features": self.features.to_obj(), "labels": list(self.labels),
            "health": {"golden": self.golden, "atol": self.golden_atol,
                       "max_latency_ms": self.max_latency_ms},
            "files": {k: dict(v) for k, v in sorted(self.files.items())},
            "lineage": dict(self.lineage), "measured": dict(self.measured), "layout": dict(self.layout),
            "baseline": dict(self.baseline),
            **({"task": self.task.to_obj()} if self.task != CLASSIFICATION else {}),
        }

    @classmethod
    def from_obj(cls, obj: Any) -> Manifest:
        if not isinstance(obj, dict):
            raise SchemaError("manifest must be a JSON object")
        if obj.get("format") != FORMAT:
            raise SchemaError(f"unsupported package format {obj.get('format')!r}, expected {FORMAT}")
        try:
            health = obj["health"]
            m = cls(
                model=_s(obj, "model"), version=int(obj["version"]), tier=_s(obj, "tier"),
                runtime=_s(obj, "runtime"), numeric_format=_s(obj, "numeric_format"),
                entrypoint=_s(obj, "entrypoint"),
                inputs=[TensorSpec.from_obj(t) for t in obj["inputs"]],
                outputs=[TensorSpec.from_obj(t) for t in obj["outputs"]],
                features=FeatureSpec.from_obj(obj["features"]),
                labels=[str(x) for x in obj["labels"]], golden=_s(health, "golden"),
                golden_atol=float(health["atol"]), max_latency_ms=float(health["max_latency_ms"]),
                files=dict(obj["files"]), lineage=dict(obj.get("lineage", {})),
                measured=dict(obj.get("measured", {})), layout=dict(obj.get("layout", {})),
                baseline=dict(obj.get("baseline", {})), task=TaskSpec.from_obj(obj.get("task")),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            if isinstance(e, SchemaError):
                raise
            raise SchemaError(f"manifest field missing or mistyped: {e}") from None
        if m.runtime not in RUNTIMES:
            raise SchemaError(f"unknown runtime {m.runtime!r}; known: {', '.join(RUNTIMES)}")
        for name in (m.entrypoint, m.golden):
            if name not in m.files:
                raise SchemaError(f"manifest names {name!r} but does not list it in 'files'")
        for name, meta in m.files.items():
            if not _NAME.fullmatch(name) or name == MANIFEST:
                raise SchemaError(f"invalid file name {name!r} in manifest")
            if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) \
                    or not isinstance(meta.get("length"), int):
                raise SchemaError(f"file {name!r} needs 'sha256' and 'length'")
        return m


def _s(obj: dict[str, Any], key: str) -> str:
    v = obj[key]
    if not isinstance(v, str) or not v:
        raise SchemaError(f"manifest field {key!r} must be a non-empty string")
    return v


@dataclass(frozen=True)
class Package:
    manifest: Manifest
    files: dict[str, bytes]

    @property
    def model_bytes(self) -> bytes:
        return self.files[self.manifest.entrypoint]


def write_package(manifest: Manifest, files: dict[str, bytes]) -> bytes:
    """Make the package bytes. ``manifest.files`` is filled in from ``files``."""
    listed = {name: {"sha256": sha256_hex(data), "length": len(data)} for name, data in files.items()}
    full = Manifest(**{**manifest.__dict__, "files": listed})
    Manifest.from_obj(full.to_obj())  # the writer refuses what a reader would refuse
    manifest_bytes = json.dumps(full.to_obj(), indent=2, sort_keys=True).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [(MANIFEST, manifest_bytes)] + sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_package(data: bytes) -> Package:
    """Parse and check package bytes. Raises SchemaError or PayloadTooLarge."""
    if len(data) > MAX_PACKAGE_BYTES:
        raise PayloadTooLarge(f"package of {len(data)} bytes is over {MAX_PACKAGE_BYTES}")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise SchemaError(f"package has more than {MAX_MEMBERS} members")
            contents: dict[str, bytes] = {}
            for member in members:
                if not member.isfile() or not (_NAME.fullmatch(member.name)):
                    raise SchemaError(f"package member {member.name!r} is not a plain top-level file")
                if member.name in contents:
                    raise SchemaError(f"package member {member.name!r} appears twice")
                extracted = tar.extractfile(member)
                assert extracted is not None  # isfile() checked above
                contents[member.name] = extracted.read()
    except tarfile.TarError as e:
        raise SchemaError(f"package is not a valid tar file: {e}") from None
    raw_manifest = contents.pop(MANIFEST, None)
    if raw_manifest is None:
        raise SchemaError("package has no manifest.json")
    if len(raw_manifest) > MAX_MANIFEST_BYTES:
        raise PayloadTooLarge("manifest.json is over 1 MiB")
    try:
        manifest = Manifest.from_obj(json.loads(raw_manifest))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, SchemaError):
            raise
        raise SchemaError(f"manifest.json is not UTF-8 JSON: {str(e)[:200]}") from None
    if set(contents) != set(manifest.files):
        raise SchemaError("package files do not match the manifest's file list")
    for name, meta in manifest.files.items():
        blob = contents[name]
        if len(blob) != meta["length"] or sha256_hex(blob) != meta["sha256"]:
            raise SchemaError(f"package file {name!r} does not match its manifest hash")
    return Package(manifest, contents)
