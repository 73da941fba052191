"""``edgeloop tokens create|ls|revoke``: API tokens of the control plane (cloud/api/server.py).

Run on the control plane's machine, against its workspace: whoever can read the workspace's
registry administers it. A token is printed once, when created; the registry keeps only its
sha256.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable

from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet._args import DURATION_HELP, LazyChoices, duration
from edgeloop.fleet._output import Output
from edgeloop.fleet._workspace import iso, when

if TYPE_CHECKING:
    from edgeloop.cloud.api.server import TokenStore

__all__ = ["add_tokens_commands"]


def add_tokens_commands(sub: Any, group: Callable, action: Callable) -> None:
    tokens = group(sub, "tokens", "create, list and revoke the control-plane API's tokens", _ls)
    p = action(tokens, "create", "create a token (printed once) with a role", _create)
    p.add_argument("--name", required=True, help="who or what uses it, for example ci-pipeline")
    p.add_argument("--role", required=True, choices=LazyChoices(_roles), metavar="ROLE",
                   help="viewer: read; operator: also start and steer rollouts; admin: also manage tokens")
    p.add_argument("--expires-in", type=duration, metavar="DURATION",
                   help=f"it stops working after this long: {DURATION_HELP} (default: only when revoked)")
    action(tokens, "ls", "list tokens (never the tokens themselves)", _ls)
    p = action(tokens, "revoke", "revoke a token, by id or name; it stops working at once", _revoke)
    p.add_argument("ref", metavar="TOKEN_ID|NAME")


def _roles() -> list[str]:
    from edgeloop.cloud.api.server import Role

    return [r.value for r in Role]


def _store(args: argparse.Namespace) -> TokenStore:
    from edgeloop.cloud.api.server import TokenStore
    from edgeloop.cloud.registry import Registry

    return TokenStore(Registry(Workspace.open(args.workspace).store_location))


def _create(args: argparse.Namespace, out: Output) -> int:
    token, secret = _store(args).create(args.name, args.role, args.expires_in)
    until = f", valid until {when(token.expires_at)}" if token.expires_at else ""
    out.result({**asdict(token), "token": secret},
               f"created {token.role} token {token.token_id} ({token.name}{until}); it is shown only this once:\n{secret}")
    return 0


def _ls(args: argparse.Namespace, out: Output) -> int:
    tokens = _store(args).list()
    out.table("API tokens", ["id", "name", "role", "created (UTC)", "last used (UTC)", "expires (UTC)",
                             "revoked (UTC)"],
              [[t.token_id, t.name, t.role, iso(t.created_at), iso(t.last_used_at), iso(t.expires_at),
                iso(t.revoked_at)] for t in tokens], {"tokens": [asdict(t) for t in tokens]})
    return 0


def _revoke(args: argparse.Namespace, out: Output) -> int:
    token, already = _store(args).revoke(args.ref)
    out.result({**asdict(token), "already_revoked": already},
               f"token {token.token_id} ({token.name}) {'was already' if already else 'is now'} revoked")
    return 0
