"""The audit log: every operator action, who took it and when, in the store's ``audit`` table.

One place records each action, whichever way it came (the CLI on the workspace, or the API):

==================  ===============================================  ================
action              recorded by                                      subject
==================  ===============================================  ================
rollout.start       cloud.rollouts.controller.RolloutController.create   the rollout id
rollout.pause       RolloutController.pause                          the rollout id
rollout.resume      RolloutController.resume                         the rollout id
rollout.abort       RolloutController.abort (an operator's abort)    the rollout id
model.promote       cloud.models.promote (to staging or production)  the model version
model.archive       cloud.models.promote (to archived)               the model version
keys.rotate         cloud.audit.rotate_keys                          ``<repo>/<role>``
token.create        cloud.api.server.TokenStore.create               the token's name
token.revoke        cloud.api.server.TokenStore.revoke               the token's name
==================  ===============================================  ================

The actor is the API token's *name* for an API call, and ``local:<os user>`` for a command run
on the workspace (:func:`local_actor`), the default wherever none is given.
"""

from __future__ import annotations

import getpass
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeloop.cloud.release.signing import RoleKeys
    from edgeloop.cloud.store.interface import AccessStore

ACTIONS = ("rollout.start", "rollout.pause", "rollout.resume", "rollout.abort", "model.promote", "model.archive",
           "keys.rotate", "token.create", "token.revoke")

__all__ = ["ACTIONS", "local_actor", "record", "rotate_keys"]


def local_actor() -> str:
    """``local:<os user>``: the actor of a command run on the workspace itself."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):         # no login name and no passwd entry (a bare container)
        user = f"uid-{os.getuid()}"
    return f"local:{user}"


def record(store: AccessStore, actor: str | None, action: str, subject: str, detail: dict[str, Any] | None = None,
           now: float | None = None) -> None:
    """Append one action to the audit log (``actor`` None: :func:`local_actor`)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    store.add_audit({"ts": time.time() if now is None else now, "actor": actor or local_actor(), "action": action,
                     "subject": subject, "detail": detail or {}})


def rotate_keys(store: AccessStore, repo: Any, repo_name: str, role: str, layout: RoleKeys,
                actor: str | None = None) -> int:
    """Rotate ``role``'s keys of ``repo`` (cloud.release.signing: a signed repository) and record it.
    Returns the new root version."""
    retired = repo.key_report()["roles"][role]["keyids"]
    version = repo.rotate(role, layout)
    new = repo.key_report()["roles"][role]
    record(store, actor, "keys.rotate", f"{repo_name}/{role}",
           {"root_version": version, "keyids": new["keyids"], "threshold": new["threshold"], "retired": retired})
    return version
