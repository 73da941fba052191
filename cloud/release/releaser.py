"""The one release path: a registered package made into an update the fleet can install.

``publish``, the rollout controller (its update and rollback groups) and the pipeline all
release through :class:`Releaser`, which for each :class:`Assignment`, in order:

1. **stages** the package in the image repository: reads its stored bytes (checked against
   the sha256 it was registered under), signs them under the package's target name if the
   image repository does not sign that name yet, and then requires the image repository to
   sign exactly this length and sha256 and to hold the file;
2. makes a **delta** from the package the group's devices run now, if one helps, and signs it
   into the image repository (docs/ota.md);
3. **assigns** it in the director: ``assignments/<group>/<target>`` with the same length and
   hashes, replacing the group's previous assignment, all assignments in one director signing;
4. **records** the update (``updates`` row, lineage edge ``package -> update``).

:meth:`Releaser.withdraw` is the way back out: it removes the director assignments of groups
that no longer assign anything (a rollout that ended), so the director's metadata stays bounded.

Guarantee: the director never assigns a package the image repository does not sign with the
same length and hashes and hold. Every check of step 1 runs for every assignment before the
director is touched; a package the two repositories would disagree on raises
:class:`~cloud.errors.IntegrityError` with one line, and nothing is assigned or recorded.

Registering a built package (:func:`register_package`, the last step of
``edgeloop.cloud.loop.pipeline.package_model`` and of packaging an imported model) stores its bytes and its
drift baseline (cloud/drift/baselines.py) and decides its target name. A package's target name
(``packages.target``, :func:`target_name`) belongs to one sha256 for ever. Packaging
is deterministic, so re-packaging a version gives the same bytes and the same name; a
re-package with other bytes (other code, another host's converter) gets a name of its own,
``<model>/<version>/<tier>.<sha256[:12]>.elpkg``, and is signed as a new target beside the
first, which stays signed for whatever still assigns it.

Update ids are derived from the caller's ``update_key`` (``upd-`` + 12 hex of its sha256),
so two control-plane workers releasing the same thing sign the same thing. One release at a
time per workspace: a thread lock and a file lock on ``<workspace>/.release.lock``.
"""

from __future__ import annotations

import fcntl
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from hashlib import sha256
from pathlib import Path
from typing import Any

from tuf.api.metadata import TargetFile

from edgeloop.contracts.package import sha256_hex
from edgeloop.contracts.messages import Announce
from edgeloop.contracts.topics import assignment_path
from edgeloop.cloud.drift.baselines import store_baseline
from edgeloop.cloud.release.delta import make_delta
from edgeloop.cloud.errors import IntegrityError, NotFound
from edgeloop.cloud.package.packaging import PackageResult, store_blob
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.workspace import Workspace

__all__ = ["Assignment", "Released", "Releaser", "director_url_for", "register_package", "target_name", "update_id_for"]

LOCK_NAME = ".release.lock"
_THREAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Assignment:
    """``group`` installs ``model_version``'s ``tier`` package. ``update_key`` names this release
    uniquely (the update id is derived from it). ``delta_base``: sha256 of the package the
    group's devices run now (None: the group's current director assignment, if any).
    ``named``: whether the announcement names the group (a rollout's command does; a
    tier-wide announcement leaves each device to check its own group)."""

    group: str
    model_version: str
    tier: str
    update_key: str
    named: bool = True
    delta_base: str | None = None


@dataclass(frozen=True)
class Released:
    announce: Announce
    package: dict[str, Any]


def update_id_for(update_key: str) -> str:
    return "upd-" + sha256(update_key.encode()).hexdigest()[:12]


def director_url_for(repository_url: str) -> str:
    """The director's URL beside the image repository's (``.../repository`` -> ``.../director``)."""
    return repository_url.rstrip("/").rsplit("/", 1)[0] + "/director"


def target_name(ws: Workspace, registry: Registry, model: str, version: int, tier: str, sha: str) -> str:
    """The target name a package gets: the plain ``<model>/<version>/<tier>.elpkg`` unless other
    bytes hold it (signed under it by the image repository, or registered under it), then one of
    its own with its sha256 in it."""
    plain = f"{model}/{version}/{tier}.elpkg"
    signed = ws.image_repository().targets().get(plain) if ws.image_repository().initialized else None
    if signed is not None:
        taken = signed.hashes.get("sha256") != sha
    else:
        taken = any(other != sha for other in registry.packages_named(plain))
    return f"{model}/{version}/{tier}.{sha[:12]}.elpkg" if taken else plain


def register_package(ws: Workspace, registry: Registry, model_version: str, result: PackageResult) -> PackageResult:
    """Store a built package (content-addressed), its drift baseline (once, keyed by the
    package's sha256: cloud/drift/baselines.py) and register it under its target name. Returns the
    result with ``target`` set to that name."""
    m = result.manifest
    sha, path = store_blob(ws.artifacts_dir, result.data)
    registry.add_artifact(sha, f"package:{m.tier}", len(result.data), str(path))
    baseline = store_baseline(ws, registry, m.baseline)
    target = target_name(ws, registry, m.model, m.version, m.tier, sha)
    registry.add_package({"sha256": sha, "model_version": model_version, "tier": m.tier, "target": target,
                          "length": len(result.data), "baseline_sha256": baseline})
    registry.add_edge(f"model_version:{model_version}", f"package:{sha}", "packaged")
    return replace(result, target=target)


class Releaser:
    """Signs, assigns and records releases; see the module docstring."""

    def __init__(self, ws: Workspace, registry: Registry, repository_url: str, director_url: str | None = None) -> None:
        self.ws, self.registry = ws, registry
        self.repository_url = repository_url
        self.director_url = director_url or director_url_for(repository_url)

    def release(self, assignments: Sequence[Assignment], now: float | None = None) -> list[Released]:
        """Stage, delta, assign (one director signing) and record each assignment. Raises
        IntegrityError (the repositories would disagree, or a stored package is corrupt) or
        NotFound (no such package) before the director is touched."""
        now = time.time() if now is None else now
        with self._locked():
            image, director = self.ws.image_repository(), self.ws.director_repository()
            staged = [(a, *self._stage(image, a)) for a in assignments]
            current = director.targets()
            changes: dict[str, TargetFile | None] = {}
            out = []
            for a, pkg, data in staged:
                delta = self._delta(image, current, a, pkg, data)
                msg = Announce(update_id=update_id_for(a.update_key), model=pkg["model"],
                               model_version=a.model_version, tier=a.tier, target=pkg["target"],
                               length=pkg["length"], sha256=pkg["sha256"], repository=self.repository_url,
                               director=self.director_url, issued_at=now, delta=delta,
                               group=a.group if a.named else None)
                prefix = f"assignments/{a.group}/"
                changes.update({p: None for p in current if p.startswith(prefix) and p not in changes})
                target = TargetFile.from_data(assignment_path(a.group, msg.target), data, ["sha256"])
                target.unrecognized_fields["custom"] = {"update_id": msg.update_id, "model_version": a.model_version}
                changes[target.path] = target
                out.append(Released(msg, pkg))
            director.set_targets(changes)
        for r in out:
            self._record(r)
        return out

    def withdraw(self, groups: Sequence[str]) -> int:
        """Remove every director assignment of ``groups`` (a rollout that ended no longer assigns
        anything), in one director signing; the image repository and the recorded updates stay.
        Returns how many assignments were removed (none: nothing is signed)."""
        prefixes = tuple(f"assignments/{g}/" for g in groups)
        if not prefixes:
            return 0
        with self._locked():
            director = self.ws.director_repository()
            gone: dict[str, TargetFile | None] = {p: None for p in director.targets() if p.startswith(prefixes)}
            if gone:
                director.set_targets(gone)
        return len(gone)

    # -- steps ------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with _THREAD_LOCK, (self.ws.root / LOCK_NAME).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)        # and one across processes (CLI, serve workers)
            yield

    def _stage(self, image: Any, a: Assignment) -> tuple[dict[str, Any], bytes]:
        pkg = dict(self.registry.package_for(a.model_version, a.tier))
        pkg["model"] = self.registry.model_version(a.model_version)["model"]
        data = self._stored_bytes(pkg)
        if pkg["target"] not in image.targets():
            image.add_target(pkg["target"], data)
        self._agree(image, pkg)
        return pkg, data

    def _stored_bytes(self, pkg: dict[str, Any]) -> bytes:
        what = f"{pkg['model_version']} {pkg['tier']} package"
        try:
            path = Path(self.registry.artifact_path(pkg["sha256"]))
            data = path.read_bytes()
        except (NotFound, OSError) as e:
            raise IntegrityError(f"the stored {what} ({pkg['sha256'][:12]}) is missing: {e}; "
                                 f"re-package it (edgeloop package {pkg['model_version']} --tier {pkg['tier']})") from None
        if len(data) != pkg["length"] or sha256_hex(data) != pkg["sha256"]:
            raise IntegrityError(f"the stored {what} is corrupt ({path}: sha256 {sha256_hex(data)[:12]}, registered "
                                 f"{pkg['sha256'][:12]}); re-package it (edgeloop package {pkg['model_version']} "
                                 f"--tier {pkg['tier']})")
        return data

    def _agree(self, image: Any, pkg: dict[str, Any]) -> None:
        """Refuse unless the image repository signs this package's exact length and sha256 under
        its target name and holds the file."""
        signed = image.targets().get(pkg["target"])
        name = f"{pkg['model_version']} {pkg['tier']} package {pkg['target']}"
        fix = f"re-package it (edgeloop package {pkg['model_version']} --tier {pkg['tier']}) to sign it as a new target"
        if signed is None:
            raise IntegrityError(f"the image repository does not sign the {name}; {fix}")
        if signed.length != pkg["length"] or signed.hashes.get("sha256") != pkg["sha256"]:
            raise IntegrityError(
                f"the director and the image repository would disagree on the {name}: the image repository signs "
                f"{signed.length} B sha256 {str(signed.hashes.get('sha256'))[:12]}, the package is {pkg['length']} B "
                f"sha256 {pkg['sha256'][:12]}; {fix}")
        path = image.target_file(pkg["target"])
        try:
            held = path.read_bytes()
        except OSError:
            raise IntegrityError(f"the image repository signs the {name} but its file is not present ({path}); "
                                 f"restore it, or {fix}") from None
        if sha256_hex(held) != pkg["sha256"]:
            raise IntegrityError(f"the image repository's file of the {name} is corrupt ({path}); restore it, or {fix}")

    def _delta(self, image: Any, current: dict[str, TargetFile], a: Assignment, pkg: dict[str, Any],
               data: bytes) -> dict[str, Any] | None:
        """Sign a delta from the group's base package, if one helps (docs/ota.md)."""
        base_sha = a.delta_base
        if base_sha is None:
            prefix = f"assignments/{a.group}/"
            now = [t for p, t in current.items() if p.startswith(prefix)]
            base_sha = now[0].hashes.get("sha256") if now else None
        if not base_sha or base_sha == pkg["sha256"]:
            return None
        try:
            base = Path(self.registry.artifact_path(base_sha)).read_bytes()
        except (NotFound, OSError):
            return None
        if sha256_hex(base) != base_sha:
            return None          # a corrupt base makes no delta; the full package still ships
        made = make_delta(base, data)
        if made is None:
            return None
        patch, _ = made
        delta_target = f"{pkg['target'].rsplit('.', 1)[0]}.from-{base_sha[:16]}.delta"
        signed = image.targets().get(delta_target)
        if signed is None or signed.hashes.get("sha256") != sha256_hex(patch):
            image.add_target(delta_target, patch)
        return {"target": delta_target, "base_sha256": base_sha, "length": len(patch)}

    def _record(self, r: Released) -> None:
        msg = r.announce
        self.registry.upsert_update({"update_id": msg.update_id, "model_version": msg.model_version, "tier": msg.tier,
                                  "target": msg.target, "sha256": msg.sha256, "length": msg.length,
                                  "issued_at": msg.issued_at})
        self.registry.add_edge(f"package:{msg.sha256}", f"update:{msg.update_id}", "published")
