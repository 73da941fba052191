"""``edgeloop tokens create|ls|revoke``: API tokens of the control plane (cloud/api/server.py).

Run on the control plane's machine, against its workspace: whoever can read the workspace's
registry administers it. A token is printed once, when created; the registry keeps only its
sha256.
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import asdict
from typing import Any, Callable

from edgeloop.cloud.api.server import Role, TokenStore
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet._output import Output

__all__ = ["add_tokens_commands"]


def add_tokens_commands(sub: Any, group: Callable, action: Callable) -> None:
    tokens = group(sub, "tokens", "create, list and revoke the control-plane API's tokens", _ls)
    p = action(tokens, "create", "create a token (printed once) with a role", _create)
    p.add_argument("--name", required=True, help="who or what uses it, for example ci-pipeline")
    p.add_argument("--role", required=True, choices=[r.value for r in Role],
                   help="viewer: read; operator: also start and steer rollouts; admin: also manage tokens")
    p.add_argument("--expires-in", type=_duration, metavar="DURATION",
                   help="it stops working after this long: 3600s, 90m, 12h or 30d (default: only when revoked)")
    action(tokens, "ls", "list tokens (never the tokens themselves)", _ls)
    p = action(tokens, "revoke", "revoke a token, by id or name; it stops working at once", _revoke)
    p.add_argument("ref", metavar="TOKEN_ID|NAME")


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration(text: str) -> float:
    m = _DURATION.fullmatch(text.strip())
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use a positive number with s, m, h or d, "
                                         "for example 12h)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def _store(args: argparse.Namespace) -> TokenStore:
    return TokenStore(Registry(Workspace.open(args.workspace).store_location))


def _create(args: argparse.Namespace, out: Output) -> int:
    token, secret = _store(args).create(args.name, args.role, args.expires_in)
    until = f", valid until {_when(token.expires_at)} UTC" if token.expires_at else ""
    out.result({**asdict(token), "token": secret},
               f"created {token.role} token {token.token_id} ({token.name}{until}); it is shown only this once:\n{secret}")
    return 0


def _when(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else None


def _ls(args: argparse.Namespace, out: Output) -> int:
    tokens = _store(args).list()
    out.table("API tokens", ["id", "name", "role", "created (UTC)", "last used (UTC)", "expires (UTC)",
                             "revoked (UTC)"],
              [[t.token_id, t.name, t.role, _when(t.created_at), _when(t.last_used_at), _when(t.expires_at),
                _when(t.revoked_at)] for t in tokens], {"tokens": [asdict(t) for t in tokens]})
    return 0


def _revoke(args: argparse.Namespace, out: Output) -> int:
    token, already = _store(args).revoke(args.ref)
    out.result({**asdict(token), "already_revoked": already},
               f"token {token.token_id} ({token.name}) {'was already' if already else 'is now'} revoked")
    return 0
