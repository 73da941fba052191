"""The digest that ties a telemetry feature summary to the bin edges it was counted on.

A device puts ``edges_digest(baseline["features"])`` into every feature summary it sends
(``features.edges``); the control plane computes the same from the package baseline of the
record's model version, and refuses a summary counted on other edges (docs/contracts/telemetry.md).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["edges_digest"]


def edges_digest(features: list[dict[str, Any]]) -> str:
    """sha256 (first 16 hex digits) of every feature's bin edges, as canonical JSON."""
    edges = [[float(v) for v in f["edges"]] for f in features]
    return hashlib.sha256(json.dumps(edges, separators=(",", ":")).encode()).hexdigest()[:16]
