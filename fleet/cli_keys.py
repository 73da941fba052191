"""``edgeloop keys init|rotate|list``: the signing keys of the image and director repositories."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from edgeloop.cloud.errors import UserError
from edgeloop.cloud.release.roles import ROLES
from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet._output import Output

__all__ = ["add_keys_commands"]

REPOS = ("image", "director")


def add_keys_commands(sub: Any, group: Callable, action: Callable) -> None:
    keys = group(sub, "keys", "create, rotate and list the repositories' signing keys", _list)
    p = action(keys, "init", "create a repository's keys with per-role counts and thresholds", _init)
    p.add_argument("--repo", choices=REPOS, default="image")
    for role in ROLES:
        p.add_argument(f"--{role}-keys", type=int, default=1, metavar="N", help=f"keys for the {role} role")
        p.add_argument(f"--{role}-threshold", type=int, default=1, metavar="T",
                       help=f"signatures the {role} role needs")
    p = action(keys, "rotate", "replace a role's keys; devices follow through the new root", _rotate)
    p.add_argument("role", choices=ROLES)
    p.add_argument("--repo", choices=REPOS, default="image")
    p.add_argument("--keys", type=int, metavar="N", help="how many new keys (default: as many as now)")
    p.add_argument("--threshold", type=int, metavar="T", help="signatures needed (default: as now)")
    action(keys, "list", "list roles, key ids, thresholds and expiry", _list)


def _repo(ws: Workspace, name: str):  # noqa: ANN202
    return ws.image_repository() if name == "image" else ws.director_repository()


def _init(args: argparse.Namespace, out: Output) -> int:
    ws = Workspace.open(args.workspace)
    repo = _repo(ws, args.repo)
    if repo.initialized:
        raise UserError(f"the {args.repo} repository already has keys (see: edgeloop keys list; "
                        f"to replace them: edgeloop keys rotate ROLE --repo {args.repo})")
    from edgeloop.cloud.release.signing import RoleKeys

    layout = {role: RoleKeys(getattr(args, f"{role}_keys"), getattr(args, f"{role}_threshold")) for role in ROLES}
    repo.init(layout)
    report = repo.key_report()
    out.result({"repo": args.repo, **report}, f"created {args.repo} repository keys: " + ", ".join(
        f"{r} {len(v['keyids'])} (threshold {v['threshold']})" for r, v in report["roles"].items()))
    return 0


def _rotate(args: argparse.Namespace, out: Output) -> int:
    ws = Workspace.open(args.workspace)
    repo = _repo(ws, args.repo)
    current = repo.key_report()["roles"][args.role]
    from edgeloop.cloud.audit import rotate_keys
    from edgeloop.cloud.registry import Registry
    from edgeloop.cloud.release.signing import RoleKeys

    layout = RoleKeys(args.keys or len(current["keyids"]), args.threshold or current["threshold"])
    registry = Registry(ws.store_location)
    try:
        version = rotate_keys(registry, repo, args.repo, args.role, layout)     # recorded in the audit log
    finally:
        registry.close()
    new = repo.key_report()["roles"][args.role]
    out.result({"repo": args.repo, "role": args.role, "root_version": version, "keyids": new["keyids"],
                "threshold": new["threshold"], "retired": current["keyids"]},
               f"rotated {args.repo} {args.role} keys: {len(new['keyids'])} new (threshold {new['threshold']}), "
               f"root is now version {version}; devices follow it on their next update")
    return 0


def _list(args: argparse.Namespace, out: Output) -> int:
    ws = Workspace.open(args.workspace)
    reports = {name: _repo(ws, name).key_report() for name in REPOS if _repo(ws, name).initialized}
    rows = [[name, role, f"{v['threshold']} of {len(v['keyids'])}", v["keys_here"], v["version"], v["expires"],
             ", ".join(k[:12] for k in v["keyids"])]
            for name, report in reports.items() for role, v in report["roles"].items()]
    out.table("signing keys", ["repository", "role", "threshold", "keys here", "version", "expires", "key ids"],
              rows, {"repositories": reports})
    return 0
