"""A package's drift baseline, stored once when the package is built and read through one function.

The baseline (training-split feature histograms, prediction and confidence distributions,
the residual model: :func:`edgeloop.cloud.package.packaging.baseline_stats`) travels inside every package for
the devices, and is stored beside it for the cloud: canonical JSON in the artifact store
(kind ``baseline``), its sha256 in the package's registry record (``packages.baseline_sha256``).
Drift reports and the telemetry gate read it with :func:`package_baseline` /
:func:`model_baseline`, never out of the package tar.

A package built without a baseline says so in its record (``NO_BASELINE``); those readers then
get None. Anything else is an error, never a silent "no baseline":

- a record with no baseline entry (registered before baselines were stored, or by hand):
  :class:`~cloud.errors.IntegrityError` naming the package and how to fix it (re-package);
- a stored baseline that is missing, differs from its sha256 or is not a baseline:
  :class:`~cloud.errors.IntegrityError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeloop.contracts.package import sha256_hex
from edgeloop.cloud.errors import IntegrityError, NotFound
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.workspace import Workspace

__all__ = ["NO_BASELINE", "store_baseline", "package_baseline", "model_baseline"]

NO_BASELINE = "none"      # packages.baseline_sha256 of a package built without one


def store_baseline(ws: Workspace, registry: Registry, baseline: dict[str, Any] | None) -> str:
    """Store a baseline (canonical JSON, content-addressed); returns what the package record
    keeps: its sha256, or ``NO_BASELINE`` for an empty one."""
    from edgeloop.cloud.package.packaging import store_blob

    if not baseline:
        return NO_BASELINE
    data = json.dumps(baseline, sort_keys=True, separators=(",", ":")).encode()
    sha, path = store_blob(ws.artifacts_dir, data)
    registry.add_artifact(sha, "baseline", len(data), str(path))
    return sha


def package_baseline(registry: Registry, package: dict[str, Any]) -> dict[str, Any] | None:
    """The baseline of one registered package (a ``packages`` row). None only when its record
    says it has none. Raises IntegrityError for a missing or corrupt baseline."""
    name = f"the {package['model_version']} {package['tier']} package {package['sha256'][:12]}"
    fix = f"re-package it: edgeloop package {package['model_version']} --tier {package['tier']}"
    ref = package.get("baseline_sha256")
    if ref == NO_BASELINE:
        return None
    if not ref:
        raise IntegrityError(f"{name} has no stored drift baseline (registered before baselines were stored?); {fix}")
    try:
        path = Path(registry.artifact_path(ref))
        data = path.read_bytes()
    except (NotFound, OSError) as e:
        raise IntegrityError(f"the drift baseline of {name} ({ref[:12]}) is missing: {e}; {fix}") from None
    if sha256_hex(data) != ref:
        raise IntegrityError(f"the drift baseline of {name} is corrupt ({path}: sha256 {sha256_hex(data)[:12]}, "
                             f"recorded {ref[:12]}); {fix}")
    try:
        baseline = json.loads(data)
    except ValueError as e:
        raise IntegrityError(f"the drift baseline of {name} is not JSON ({path}): {e}; {fix}") from None
    if not isinstance(baseline, dict) or not isinstance(baseline.get("features"), list):
        raise IntegrityError(f"the drift baseline of {name} has no feature list ({path}); {fix}")
    return baseline


def model_baseline(registry: Registry, model_version: str, tier: str | None = None) -> dict[str, Any] | None:
    """The baseline a model version's telemetry is compared with: its ``tier`` package's, else
    its newest package's (every tier's package of a version carries the same baseline). None
    when the version has no package here (nothing to compare with) or its record says it has
    no baseline. Raises IntegrityError for a missing or corrupt one."""
    packages = registry.packages_of(model_version)
    chosen = next((p for p in packages if p["tier"] == tier), packages[0] if packages else None)
    return None if chosen is None else package_baseline(registry, chosen)
