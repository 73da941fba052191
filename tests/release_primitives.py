"""Signing primitives with none of the release path's checks, for tests that build states the
release path (cloud/release/releaser.py) never makes: an assignment the image repository does not back,
a forged or replayed announcement, a delta signed by hand. Production code never uses these."""

from __future__ import annotations

from pathlib import Path

from tuf.api.metadata import TargetFile

from edgeloop.contracts.messages import Announce
from edgeloop.contracts.topics import assignment_path
from edgeloop.cloud.release.delta import make_delta
from edgeloop.cloud.errors import NotFound


def assign(ws, group: str, msg: Announce, data: bytes) -> None:  # noqa: ANN001
    """The director's word, unchecked: ``group`` installs these bytes as ``msg.target``."""
    director = ws.director_repository()
    prefix = f"assignments/{group}/"
    current = {path: None for path in director.targets() if path.startswith(prefix)}
    target = TargetFile.from_data(assignment_path(group, msg.target), data, ["sha256"])
    target.unrecognized_fields["custom"] = {"update_id": msg.update_id, "model_version": msg.model_version}
    director.set_targets({**current, target.path: target})


def delta_from_current(ws, registry, image, group: str, target: str, data: bytes) -> dict | None:  # noqa: ANN001
    """Sign a delta from the package the group is assigned now, if one helps."""
    prefix = f"assignments/{group}/"
    current = [t for p, t in ws.director_repository().targets().items() if p.startswith(prefix)]
    if not current or current[0].path == f"{prefix}{target}":
        return None
    base_sha = current[0].hashes["sha256"]
    try:
        base = Path(registry.artifact_path(base_sha)).read_bytes()
    except (NotFound, OSError):
        return None
    made = make_delta(base, data)
    if made is None:
        return None
    patch, _ = made
    delta_target = f"{target.rsplit('.', 1)[0]}.from-{base_sha[:16]}.delta"
    image.add_target(delta_target, patch)
    return {"target": delta_target, "base_sha256": base_sha, "length": len(patch)}
