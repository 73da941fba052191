"""Hardware tier profiles: data, not code.

Shipped profiles live in ``cloud/package/tiers/*.toml`` (``gpu-server``, ``edge-gateway``,
``mobile``, ``mcu``); a workspace adds or overrides them with ``<workspace>/tiers/*.toml``.
Each states its runtime, numeric format, memory and flash budgets, a latency budget, how host
latency scales to the device, and optionally the operators its runtime supports.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from edgeloop.cloud.errors import NotFound, UserError

RUNTIMES = ("onnxruntime", "litert", "tflite-micro")
FORMATS = ("fp32", "int8", "dynamic-int8")

__all__ = ["TierProfile", "load_tiers", "tier"]


@dataclass(frozen=True)
class TierProfile:
    name: str
    description: str
    runtime: str
    format: str
    ram_bytes: int
    flash_bytes: int
    runtime_flash_bytes: int
    latency_budget_ms: float
    host_to_device: float
    supported_ops: tuple[str, ...] = field(default_factory=tuple)   # empty: no operator restriction
    # (in the profile file: a list, or "tflite-micro" for the operators the installed TFLM registers)
    in_progress_timeout_s: float = 600.0   # a rollout counts a device silent this long as failed (timed_out)

    @classmethod
    def from_toml(cls, path: Path) -> TierProfile:
        try:
            raw = tomllib.loads(path.read_text())
            profile = cls(name=str(raw["name"]), description=str(raw.get("description", "")),
                          runtime=str(raw["runtime"]), format=str(raw["format"]), ram_bytes=int(raw["ram_bytes"]),
                          flash_bytes=int(raw["flash_bytes"]), runtime_flash_bytes=int(raw["runtime_flash_bytes"]),
                          latency_budget_ms=float(raw["latency_budget_ms"]),
                          host_to_device=float(raw["host_to_device"]),
                          supported_ops=_supported_ops(raw.get("supported_ops", ())),
                          in_progress_timeout_s=float(raw.get("in_progress_timeout_s", 600.0)))
        except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed tier profile {path}: {e}") from None
        if not profile.in_progress_timeout_s > 0:
            raise UserError(f"tier profile {path}: in_progress_timeout_s must be positive")
        if profile.runtime not in RUNTIMES or profile.format not in FORMATS:
            raise UserError(f"tier profile {path}: runtime must be one of {RUNTIMES}, format one of {FORMATS}")
        return profile


def _supported_ops(value: object) -> tuple[str, ...]:
    """A list of operator names, or "tflite-micro": the builtin operators the installed TFLM
    build registers (cloud/package/tflm_ops.py)."""
    from edgeloop.cloud.package.tflm_ops import FROM_RUNTIME, tflm_builtin_operators

    if value == FROM_RUNTIME:
        return tflm_builtin_operators()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"supported_ops must be a list of operator names or {FROM_RUNTIME!r}, got {value!r}")
    return tuple(str(op) for op in value)


def load_tiers(workspace_root: Path | None = None) -> dict[str, TierProfile]:
    shipped = Path(str(resources.files("edgeloop.cloud.package") / "tiers"))
    paths = sorted(shipped.glob("*.toml"))
    if workspace_root is not None and (workspace_root / "tiers").is_dir():
        paths += sorted((workspace_root / "tiers").glob("*.toml"))
    return {p.name: p for p in (TierProfile.from_toml(path) for path in paths)}


def tier(name: str, workspace_root: Path | None = None) -> TierProfile:
    tiers = load_tiers(workspace_root)
    if name not in tiers:
        raise NotFound(f"unknown tier {name!r}; tiers: {', '.join(sorted(tiers))}")
    return tiers[name]
