"""The control plane's HTTP API (aiohttp): devices, models and rollouts, behind bearer tokens.

Rules:

- Every ``/api/v1/`` request carries ``Authorization: Bearer <token>``. No token, or one that is
  unknown, revoked or expired: 401. A token whose role ranks below the endpoint's: 403. Roles rank
  ``viewer < operator < admin``; a higher role may do everything a lower one may.
- Tokens are 256 random bits (``edgeloop_`` + base64url). The registry keeps only their sha256,
  so a copy of the database grants nothing; the token itself is shown once, when created.
  Revocation is immediate: every request looks its token up again.
- Bad input is 400, an unknown name 404, a missing rollout service 503; every error body is
  ``{"error": "<one line>", "status": <code>}``. Request bodies are JSON objects of at most
  64 KiB.

Endpoints (role needed)::

    GET  /api/v1/devices?tier=&state=&tag=K=V&group=&online=true|false   viewer
    GET  /api/v1/devices/{id}          the device, its last errors, its telemetry totals   viewer
    GET  /api/v1/models                                                                     viewer
    GET  /api/v1/rollouts              GET /api/v1/rollouts/{id}                            viewer
    POST /api/v1/rollouts              body: cloud.rollouts.controller.RolloutSpec fields              operator
    POST /api/v1/rollouts/{id}/pause|resume|abort   body: {"reason": ...} (optional)        operator
    GET  /api/v1/tokens   POST /api/v1/tokens {"name", "role", "expires_in_s"?}   DELETE /api/v1/tokens/{id}   admin
    GET  /api/v1/audit?since=UNIX_TIME&action=A   the operators' actions, oldest first (cloud/audit.py)  admin
    GET  /healthz                      no token

Rollouts are run by :class:`RolloutService` (cloud.rollouts.controller.RolloutController satisfies it),
handed in by whoever starts the API; without one, rollout endpoints answer 503.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import math
import re
import secrets
import ssl
import time
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Protocol

from aiohttp import web

from edgeloop.cloud import audit
from edgeloop.cloud.api.http_thread import ThreadedHttpServer
from edgeloop.cloud.errors import CloudError, NotFound, ServiceUnavailable, UserError
from edgeloop.cloud.field_types import check_field_types
from edgeloop.cloud.fleet_registry import DeviceFilter, FleetRegistry
from edgeloop.cloud.registry import Registry

log = logging.getLogger("edgeloop.api")

API_PREFIX = "/api/v1"
TOKEN_PREFIX = "edgeloop_"
MAX_BODY = 64 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOKEN_ID = re.compile(r"^tok-[0-9a-f]{12}$")

__all__ = ["ApiServer", "Role", "RolloutService", "Token", "TokenStore", "create_app"]


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return ("viewer", "operator", "admin").index(self.value)

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls(text)
        except ValueError:
            raise UserError(f"unknown role {text!r}: use viewer, operator or admin") from None


# -- tokens ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    """A token's record; never the token itself."""

    token_id: str
    name: str
    role: str
    created_at: float
    revoked_at: float | None = None
    last_used_at: float | None = None
    expires_at: float | None = None      # None: until revoked


MAX_LIFETIME_S = 10 * 365 * 86400.0


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """API tokens in the registry's ``api_tokens`` table: id, name, role, sha256 of the token."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def create(self, name: str, role: str, expires_in_s: float | None = None,
               actor: str | None = None) -> tuple[Token, str]:
        """A new token; returns its record and the token, which is not stored and cannot be
        shown again. ``expires_in_s``: it stops working that many seconds from now (None: only
        when revoked). Recorded in the audit log as ``actor``'s (None: the local user).
        Raises UserError for a bad name, role or lifetime, or a name an active token has."""
        if not _NAME.fullmatch(name):
            raise UserError(f"invalid token name {name!r}: use 1-64 of [A-Za-z0-9_.-], starting alphanumeric")
        role = Role.parse(role).value
        if expires_in_s is not None and not 0 < expires_in_s <= MAX_LIFETIME_S:
            raise UserError(f"a token's lifetime must be more than 0 s and at most 10 years, not {expires_in_s!r}")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        token = Token(f"tok-{secrets.token_hex(6)}", name, role, now,
                      expires_at=now + expires_in_s if expires_in_s is not None else None)
        if not self.registry.add_token({**asdict(token), "sha256": _hash(secret)}, now):
            raise UserError(f"an active token is already named {name!r} (revoke it first, or pick another name)")
        audit.record(self.registry, actor, "token.create", name,
                     {"token_id": token.token_id, "role": role, "expires_at": token.expires_at}, now)
        return token, secret

    def list(self) -> list[Token]:
        return [Token(**r) for r in self.registry.tokens()]

    def revoke(self, ref: str, actor: str | None = None) -> tuple[Token, bool]:
        """Revoke the active token with this id or name. Returns (token, was it already revoked).
        A revocation is recorded in the audit log as ``actor``'s (None: the local user).
        Raises NotFound."""
        now = time.time()
        found = self.registry.revoke_token(ref, now)
        if found is None:
            raise NotFound(f"no token {ref!r} (see: edgeloop tokens ls)")
        row, already = found
        token = Token(**row)
        if already:
            return token, True
        audit.record(self.registry, actor, "token.revoke", token.name, {"token_id": token.token_id}, now)
        return Token(**{**row, "revoked_at": now}), False

    def authenticate(self, secret: str) -> Token | None:
        """The active token ``secret`` is (not revoked, not expired), or None."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 256:
            return None
        row = self.registry.use_token(_hash(secret), time.time())
        return Token(**row) if row else None


# -- rollouts ---------------------------------------------------------------------------------------
class RolloutService(Protocol):
    """What the API needs of the rollout controller (cloud.rollouts.controller.RolloutController)."""

    def create(self, spec: Any, *, actor: str | None = ...) -> str: ...
    def pause(self, rollout_id: str, *, actor: str | None = ...) -> Any: ...
    def resume(self, rollout_id: str, *, actor: str | None = ...) -> Any: ...
    def abort(self, rollout_id: str, reason: str = ..., *, actor: str | None = ...) -> Any: ...
    def status(self, rollout_id: str) -> dict[str, Any]: ...
    def list(self) -> list[dict[str, Any]]: ...


def _spec(body: dict[str, Any]) -> Any:
    """A cloud.rollouts.controller.RolloutSpec from a request body; unknown or missing fields,
    and fields of the wrong type, are bad input (UserError)."""
    from edgeloop.cloud.rollouts.controller import RolloutSpec

    check_field_types(RolloutSpec, body, "rollout")
    for required in ("model_version", "target"):
        if not isinstance(body.get(required), str) or not body[required]:
            raise UserError(f"a rollout needs {required!r} (a string)")
    spec = RolloutSpec(**body)
    spec.validate()
    return spec


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object (empty: ``{}``). Raises UserError for anything else,
    including JSON nested too deep or with numbers Python will not read."""
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UserError("the request body is not JSON (or is nested too deep)") from None
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    return body


def token_request(body: dict[str, Any]) -> tuple[str, str, float | None]:
    """(name, role, lifetime in s) of a token-create body. Raises UserError for wrong types."""
    name, role, lifetime = body.get("name", ""), body.get("role", ""), body.get("expires_in_s")
    if not isinstance(name, str) or not isinstance(role, str):
        raise UserError("a token needs a name and a role (strings)")
    if lifetime is not None and (isinstance(lifetime, bool) or not isinstance(lifetime, (int, float))
                                 or abs(lifetime) > MAX_LIFETIME_S * 2 or not math.isfinite(lifetime)):
        raise UserError("expires_in_s must be a number of seconds (at most 10 years)")
    return name, role, None if lifetime is None else float(lifetime)


# -- the application --------------------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_TOKEN_KEY: Any = web.RequestKey("token", Token) if hasattr(web, "RequestKey") else "edgeloop.token"
_STATE = web.AppKey("state", dict)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(obj, sort_keys=True, default=str), status=status,
                        content_type="application/json")


def _error(status: int, message: str, **headers: str) -> web.Response:
    resp = _json({"error": message, "status": status}, status)
    resp.headers.update(headers)
    return resp


def _needs(role: Role) -> Callable[[Handler], Handler]:
    def mark(handler: Handler) -> Handler:
        handler.role = role  # type: ignore[attr-defined]
        return handler
    return mark


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, e.reason)
        raise
    except NotFound as e:
        return _error(404, str(e))
    except UserError as e:
        return _error(400, str(e))
    except ServiceUnavailable as e:
        return _error(503, str(e))
    except CloudError as e:
        return _error(500, str(e))
    except Exception:  # noqa: BLE001 - logged; the client gets one line, never a traceback
        log.exception("API request %s %s failed", request.method, request.path)
        return _error(500, "internal error (see the control plane's log)")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(API_PREFIX + "/") or request.match_info.http_exception is not None:
        return await handler(request)        # /healthz, and 404/405 for what is not an endpoint
    scheme, _, secret = request.headers.get("Authorization", "").partition(" ")
    token = request.app[_STATE]["tokens"].authenticate(secret.strip()) if scheme.lower() == "bearer" else None
    if token is None:
        return _error(401, "a valid API token is needed (Authorization: Bearer <token>; edgeloop tokens create)",
                      **{"WWW-Authenticate": 'Bearer realm="edgeloop"'})
    needed: Role = getattr(handler, "role", Role.ADMIN)       # an endpoint that forgot to say: admins only
    if Role(token.role).rank < needed.rank:
        return _error(403, f"token {token.name!r} has role {token.role}; this needs {needed.value}")
    request[_TOKEN_KEY] = token
    return await handler(request)


async def _body(request: web.Request) -> dict[str, Any]:
    return parse_body(await request.read()) if request.can_read_body else {}


def _bool(text: str | None, name: str) -> bool | None:
    if text is None or text == "":
        return None
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise UserError(f"{name} must be true or false, not {text!r}")


def _device_filter(query: Any) -> DeviceFilter:
    known = {"tier", "state", "tag", "group", "online", "revoked"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise UserError(f"unknown device filter(s): {', '.join(unknown)} (use: {', '.join(sorted(known))})")
    tags: dict[str, str] = {}
    for item in query.getall("tag", []):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UserError(f"invalid tag filter {item!r}: expected KEY=VALUE")
        tags[key] = value
    return DeviceFilter(tier=query.get("tier") or None, state=query.get("state") or None, tags=tags,
                        group=query.get("group") or None, online=_bool(query.get("online"), "online"),
                        revoked=_bool(query.get("revoked"), "revoked"))


@_needs(Role.VIEWER)
async def _devices(request: web.Request) -> web.Response:
    fleet: FleetRegistry = request.app[_STATE]["fleet"]
    return _json({"devices": fleet.devices(_device_filter(request.query))})


def device_detail(fleet: FleetRegistry, device_id: str) -> dict[str, Any]:
    """One device with its last 10 errors and its telemetry totals (as `edgeloop devices show`).
    Raises NotFound."""
    device = fleet.device(device_id)
    device["errors"] = fleet.registry.device_errors(device_id)[-10:]
    device["telemetry"] = fleet.registry.device_telemetry_totals(device_id)
    return device


@_needs(Role.VIEWER)
async def _device(request: web.Request) -> web.Response:
    return _json(device_detail(request.app[_STATE]["fleet"], request.match_info["device_id"]))


@_needs(Role.VIEWER)
async def _models(request: web.Request) -> web.Response:
    rows = request.app[_STATE]["registry"].model_versions()
    for r in rows:
        r["metrics"] = json.loads(r["metrics"]) if isinstance(r.get("metrics"), str) else r.get("metrics")
        r.pop("features", None)
    return _json({"model_versions": rows})


def _rollouts(request: web.Request) -> RolloutService:
    service = request.app[_STATE]["rollouts"]
    if service is None:
        raise ServiceUnavailable("this control plane runs no rollout controller")
    return service


@_needs(Role.VIEWER)
async def _rollout_list(request: web.Request) -> web.Response:
    return _json({"rollouts": _rollouts(request).list()})


@_needs(Role.VIEWER)
async def _rollout_show(request: web.Request) -> web.Response:
    return _json(_rollouts(request).status(request.match_info["rollout_id"]))


@_needs(Role.OPERATOR)
async def _rollout_start(request: web.Request) -> web.Response:
    service = _rollouts(request)
    spec = _spec(await _body(request))
    rollout_id = await asyncio.to_thread(service.create, spec, actor=request[_TOKEN_KEY].name)   # signs: off the loop
    log.info("rollout %s started by token %s", rollout_id, request[_TOKEN_KEY].name)
    return _json(service.status(rollout_id), 201)


@_needs(Role.OPERATOR)
async def _rollout_action(request: web.Request) -> web.Response:
    service, rollout_id, action = _rollouts(request), request.match_info["rollout_id"], request.match_info["action"]
    body = await _body(request)
    actor = request[_TOKEN_KEY].name
    if action == "abort":
        reason = body.get("reason") or f"aborted through the API by {actor}"
        if not isinstance(reason, str):
            raise UserError("an abort's reason must be a string")
        await asyncio.to_thread(service.abort, rollout_id, reason=str(reason)[:500], actor=actor)
    else:
        await asyncio.to_thread(getattr(service, action), rollout_id, actor=actor)
    return _json(service.status(rollout_id))


@_needs(Role.ADMIN)
async def _token_list(request: web.Request) -> web.Response:
    return _json({"tokens": [asdict(t) for t in request.app[_STATE]["tokens"].list()]})


@_needs(Role.ADMIN)
async def _token_create(request: web.Request) -> web.Response:
    token, secret = request.app[_STATE]["tokens"].create(*token_request(await _body(request)),
                                                         actor=request[_TOKEN_KEY].name)
    return _json({**asdict(token), "token": secret}, 201)


@_needs(Role.ADMIN)
async def _token_revoke(request: web.Request) -> web.Response:
    ref = request.match_info["token_id"]
    if not _TOKEN_ID.fullmatch(ref):
        raise NotFound(f"no token {ref!r}")
    token, already = request.app[_STATE]["tokens"].revoke(ref, actor=request[_TOKEN_KEY].name)
    return _json({**asdict(token), "already_revoked": already})


@_needs(Role.ADMIN)
async def _audit(request: web.Request) -> web.Response:
    query = request.query
    unknown = sorted(set(query) - {"since", "action"})
    if unknown:
        raise UserError(f"unknown audit filter(s): {', '.join(unknown)} (use: action, since)")
    since = None
    if query.get("since"):
        try:
            since = float(query["since"])
        except ValueError:
            raise UserError(f"since must be a Unix time in seconds, not {query['since']!r}") from None
    rows = request.app[_STATE]["registry"].audit(since=since, action=query.get("action") or None)
    return _json({"audit": rows})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app(registry: Registry, rollouts: RolloutService | None = None) -> web.Application:
    """The API as an aiohttp application (mount it, or run it with :class:`ApiServer`)."""
    app = web.Application(middlewares=[_errors, _auth], client_max_size=MAX_BODY)
    app[_STATE] = {"registry": registry, "fleet": FleetRegistry(registry), "tokens": TokenStore(registry),
                   "rollouts": rollouts}
    r, p = app.router, API_PREFIX
    r.add_get("/healthz", _healthz)
    r.add_get(f"{p}/devices", _devices)
    r.add_get(f"{p}/devices/{{device_id}}", _device)
    r.add_get(f"{p}/models", _models)
    r.add_get(f"{p}/rollouts", _rollout_list)
    r.add_post(f"{p}/rollouts", _rollout_start)
    r.add_get(f"{p}/rollouts/{{rollout_id}}", _rollout_show)
    r.add_post(f"{p}/rollouts/{{rollout_id}}/{{action:pause|resume|abort}}", _rollout_action)
    r.add_get(f"{p}/tokens", _token_list)
    r.add_post(f"{p}/tokens", _token_create)
    r.add_delete(f"{p}/tokens/{{token_id}}", _token_revoke)
    r.add_get(f"{p}/audit", _audit)
    return app


class ApiServer(ThreadedHttpServer):
    """The API on its own event-loop thread (cloud/api/http_thread.py).
    ``port`` 0 picks a free port; :attr:`url` is known once :meth:`start` returned."""

    thread_name = "edgeloop-api"
    what = "API"

    def __init__(self, registry: Registry, host: str = "127.0.0.1", port: int = 0,
                 rollouts: RolloutService | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(host, port, ssl_context)     # HTTPS with a context (cloud/services.py)
        self.registry, self.rollouts = registry, rollouts

    @property
    def url(self) -> str:
        return self.base_url

    def make_app(self) -> web.Application:
        return create_app(self.registry, self.rollouts)
