"""``edgeloop audit``: who did what to the fleet, and when (cloud/audit.py, the store's ``audit`` table).

On the workspace it reads the registry; with ``--server URL`` it asks the API (``GET
/api/v1/audit``, admin tokens only). ``--since DURATION`` keeps the actions of that last span,
``--action A`` one kind of action; ``--json`` prints ``{"audit": [...]}`` with epoch times.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from edgeloop.fleet import remote
from edgeloop.fleet._args import DURATION_HELP, duration
from edgeloop.fleet._output import Output
from edgeloop.fleet._workspace import open_registry, open_workspace, when

__all__ = ["add_audit_command"]

# cloud.audit.ACTIONS, written out so that `edgeloop --help` imports nothing of the cloud
# (tests/test_audit.py checks that the two lists agree)
ACTIONS = ("rollout.start", "rollout.pause", "rollout.resume", "rollout.abort", "model.promote", "model.archive",
           "keys.rotate", "token.create", "token.revoke")


def add_audit_command(sub: Any, common: Any) -> None:
    help_ = "list the operators' actions: rollouts, promotions, key rotations, token changes"
    p = sub.add_parser("audit", help=help_, description=help_)
    common(p)
    p.add_argument("--since", type=duration, metavar="DURATION",
                   help=f"only actions of this last span: {DURATION_HELP} (default: all)")
    p.add_argument("--action", choices=ACTIONS, metavar="ACTION", help="only this action: " + ", ".join(ACTIONS))
    p.set_defaults(fn=_audit)


@remote.remote_ok
def _audit(args: argparse.Namespace, out: Output) -> int:
    since = time.time() - args.since if args.since is not None else None
    if args.server:
        rows = remote.client(args).audit(since, args.action)
    else:
        registry = open_registry(open_workspace(args))
        try:
            rows = registry.audit(since=since, action=args.action)
        finally:
            registry.close()
    now = time.time()
    out.table("audit log", ["time (UTC)", "actor", "action", "subject"],
              [[when(r["ts"], now), r["actor"], r["action"], r["subject"]] for r in rows], {"audit": rows})
    return 0
