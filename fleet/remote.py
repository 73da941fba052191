"""The CLI against a remote control plane: ``--server URL`` with ``--token`` (or ``$EDGELOOP_TOKEN``).

Commands that can run remotely mark their handler with :func:`remote_ok` and, when
``args.server`` is set, read through :func:`client` instead of the local workspace; the
tables they print are the same. Errors map to the CLI's exit codes: a refused or missing
token, bad input or an unknown name are UserError (2), an unreachable or failing server is
ServiceUnavailable (3). Responses are bounded (:data:`MAX_RESPONSE`).

Transport security: an ``https://`` server must present a certificate that chains to the CA
``--ca FILE`` or ``$EDGELOOP_CA`` names, else the workspace's fleet CA (``<workspace>/pki/ca.crt``,
what the control plane's certificate is issued by), else the system's trust store, and that
names the host; one that does not is IntegrityError (4). A token is never sent in clear over
the network: ``http://`` is refused (UserError, 2) for any host that is not loopback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from edgeloop.cloud.errors import IntegrityError, NotFound, ServiceUnavailable, UserError

TOKEN_ENV = "EDGELOOP_TOKEN"
CA_ENV = "EDGELOOP_CA"
TIMEOUT_S = 30.0
MAX_RESPONSE = 64 * 1024 * 1024

__all__ = ["CA_ENV", "RemoteClient", "TOKEN_ENV", "allows_remote", "client", "remote_ok"]

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
    ca_file: Path | None = None      # the CA an https server's certificate must chain to (None: the system's)

    def _ssl(self):  # noqa: ANN202 - ssl.SSLContext | None
        if not self.server.lower().startswith("https://"):
            return None
        import ssl

        try:
            return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as e:
            raise UserError(f"cannot read the CA file {self.ca_file}: {getattr(e, 'strerror', None) or e} "
                            f"(--ca FILE or ${CA_ENV}: the control plane's fleet CA, <workspace>/pki/ca.crt)") from None

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
        context = self._ssl()
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S, context=context) as resp:
                return _decode(resp.read(MAX_RESPONSE + 1), url)
        except urllib.error.HTTPError as e:
            raise _error(e, url) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if _is_cert_error(reason):
                ca = f"the CA {self.ca_file}" if self.ca_file else "the system's trust store"
                raise IntegrityError(f"the control plane at {self.server} presented a certificate that does not "
                                     f"verify against {ca}: {getattr(reason, 'verify_message', None) or reason} "
                                     f"(pass its fleet CA: --ca FILE or ${CA_ENV}, <workspace>/pki/ca.crt "
                                     "on the control plane)") from None
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

    def audit(self, since: float | None = None, action: str | None = None) -> list[dict[str, Any]]:
        """The audit log (admin role), oldest first; ``since``: a Unix time."""
        query = [(k, v) for k, v in (("since", None if since is None else repr(since)), ("action", action)) if v]
        return self.request("GET", "/audit", query=query)["audit"]


def _is_cert_error(reason: object) -> bool:
    import ssl

    return isinstance(reason, ssl.SSLCertVerificationError)


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
    if parts.scheme == "http" and not _loopback(parts.hostname or ""):
        raise UserError(f"refusing to send the API token in clear to {server}: use https:// (the control plane "
                        "serves HTTPS when its workspace has a broker: edgeloop broker config)")
    return RemoteClient(server, token, _ca_file(args))


def _loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ca_file(args: argparse.Namespace) -> Path | None:
    """``--ca``, else ``$EDGELOOP_CA``, else the workspace's fleet CA if it has one, else None."""
    given = getattr(args, "ca", None) or os.environ.get(CA_ENV)
    if given:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"no CA file {path} (--ca FILE or ${CA_ENV}: the control plane's <workspace>/pki/ca.crt)")
        return path
    workspace = getattr(args, "workspace", None)
    fleet_ca = Path(workspace) / "pki" / "ca.crt" if workspace else None
    return fleet_ca if fleet_ca is not None and fleet_ca.is_file() else None
