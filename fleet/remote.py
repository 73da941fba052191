"""The CLI against a remote control plane: ``--server URL`` with ``--token`` (or ``$EDGELOOP_TOKEN``).

Commands that can run remotely mark their handler with :func:`remote_ok` and, when
``args.server`` is set, read through :func:`client` instead of the local workspace; the
tables they print are the same. Errors map to the CLI's exit codes: a refused or missing
token, bad input or an unknown name are UserError (2), an unreachable or failing server is
ServiceUnavailable (3). Responses are bounded (:data:`MAX_RESPONSE`).
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from edgeloop.cloud.errors import NotFound, ServiceUnavailable, UserError

TOKEN_ENV = "EDGELOOP_TOKEN"
TIMEOUT_S = 30.0
MAX_RESPONSE = 64 * 1024 * 1024

__all__ = ["RemoteClient", "TOKEN_ENV", "allows_remote", "client", "remote_ok"]

F = TypeVar("F", bound=Callable[..., Any])


def remote_ok(fn: F) -> F:
    """Mark a command handler that honours ``--server``."""
    fn.remote_ok = True  # type: ignore[attr-defined]
    return fn


def allows_remote(fn: Callable[..., Any]) -> bool:
    return bool(getattr(fn, "remote_ok", False))


@dataclass(frozen=True)
class RemoteClient:
    """A small JSON client of the control plane's API (cloud/api/server.py)."""

    server: str
    token: str

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                query: list[tuple[str, str]] | None = None) -> dict[str, Any]:
        """One API call. Raises UserError (401, 403, 400; NotFound for 404) or ServiceUnavailable."""
        import urllib.error
        import urllib.request     # here, not at start-up: http.client and email cost ~30 ms

        url = self.server.rstrip("/") + "/api/v1" + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data is not None else {})})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                return _decode(resp.read(MAX_RESPONSE + 1), url)
        except urllib.error.HTTPError as e:
            raise _error(e, url) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServiceUnavailable(f"cannot reach the control plane at {self.server}: {reason}") from None

    def devices(self, tier: str | None = None, state: str | None = None, tags: dict[str, str] | None = None,
                group: str | None = None, online: bool | None = None) -> list[dict[str, Any]]:
        query = [(k, v) for k, v in (("tier", tier), ("state", state), ("group", group)) if v]
        query += [("tag", f"{k}={v}") for k, v in (tags or {}).items()]
        if online is not None:
            query.append(("online", "true" if online else "false"))
        return self.request("GET", "/devices", query=query)["devices"]

    def device(self, device_id: str) -> dict[str, Any]:
        return self.request("GET", f"/devices/{urllib.parse.quote(device_id, safe='')}")

    def models(self) -> list[dict[str, Any]]:
        return self.request("GET", "/models")["model_versions"]

    def rollouts(self) -> list[dict[str, Any]]:
        return self.request("GET", "/rollouts")["rollouts"]

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        return self.request("GET", f"/rollouts/{urllib.parse.quote(rollout_id, safe='')}")

    def start_rollout(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``spec``: cloud.rollouts.controller.RolloutSpec fields. Returns the new rollout's status."""
        return self.request("POST", "/rollouts", body=spec)

    def rollout_action(self, rollout_id: str, action: str, reason: str | None = None) -> dict[str, Any]:
        """``action``: pause, resume or abort. Returns the rollout's status."""
        body = {"reason": reason} if reason else {}
        return self.request("POST", f"/rollouts/{urllib.parse.quote(rollout_id, safe='')}/{action}", body=body)


def _decode(raw: bytes, url: str) -> dict[str, Any]:
    if len(raw) > MAX_RESPONSE:
        raise ServiceUnavailable(f"the answer from {url} is over {MAX_RESPONSE} bytes")
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ServiceUnavailable(f"{url} did not answer JSON: is it an edgeloop control plane?") from None
    if not isinstance(obj, dict):
        raise ServiceUnavailable(f"{url} answered {type(obj).__name__}, not a JSON object")
    return obj


def _error(e: urllib.error.HTTPError, url: str) -> Exception:
    try:
        message = json.loads(e.read(64 * 1024))["error"]
    except (ValueError, KeyError, TypeError, OSError):
        message = e.reason
    text = f"the control plane refused: {message} (HTTP {e.code})"
    if e.code == 404:
        return NotFound(text)
    if e.code in (400, 401, 403, 409, 413, 422):
        return UserError(text)
    return ServiceUnavailable(text)


def client(args: argparse.Namespace) -> RemoteClient:
    """The client ``--server`` and ``--token``/``$EDGELOOP_TOKEN`` name. Raises UserError."""
    server = args.server
    parts = urllib.parse.urlsplit(server)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"invalid --server {server!r}: expected http(s)://HOST:PORT")
    token = getattr(args, "token", None) or os.environ.get(TOKEN_ENV)
    if not token:
        raise UserError(f"--server needs an API token: --token TOKEN or ${TOKEN_ENV} (edgeloop tokens create)")
    return RemoteClient(server, token)
