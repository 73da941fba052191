"""The composition root of the cloud's service stack: one place that builds, starts and stops it.

``edgeloop serve``, ``edgeloop demo``, ``edgeloop demo --loop`` (and the fleet benchmark) all
run the same stack, built here from a workspace and :class:`StackOptions`::

    with ServiceStack(ws, options) as stack:       # started in this order:
        stack.repository                           # 1. the HTTP repository server (image + director)
        stack.control_plane, stack.ingest          # 2. the control plane(s): MQTT ingest, announce, blocks
        stack.rollouts                             # 3. the rollout controller (sends through 2, links to 1)
        stack.api                                  # 4. the HTTP API (reads the registry, drives 3)
    # stopped in reverse: API, control planes, repository server; then the registry is closed

Guarantees:

- Every control plane serves the workspace's fleet (``Workspace.fleet``: its topics, its
  shared-subscription group ``<share_group>-<fleet>``) and connects the way the options say
  (plain TCP, or mutual TLS as the identity its link holds); serve and the demos get their
  options from one function (:func:`edgeloop.fleet.broker.stack_options`), so they cannot differ.
- A stack that fails to start stops what it had started, in reverse, before the error
  (ServiceUnavailable, UserError) reaches the caller; :meth:`ServiceStack.stop` is idempotent and
  leaves no thread or socket of the stack behind.
- The stack owns its registry connection (:attr:`ServiceStack.registry`).
- With ``StackOptions.server_tls`` (a workspace with a generated broker: a certificate from its
  fleet CA, :func:`edgeloop.fleet.identity.https_tls`) the repository server and the API serve
  HTTPS only, and their URLs (``serve.json``, what rollouts announce) are ``https://``.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from edgeloop.cloud.errors import UserError
from edgeloop.cloud.ingest.control_plane import SHARE_GROUP, ControlPlane
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.release.repo_server import RepositoryServer
from edgeloop.cloud.workspace import Workspace

log = logging.getLogger("edgeloop.services")

if TYPE_CHECKING:
    from edgeloop.cloud.api.server import ApiServer
    from edgeloop.cloud.rollouts.controller import RolloutController

__all__ = ["BrokerLink", "PlainLink", "ServerTls", "ServiceStack", "StackOptions", "server_ssl_context"]


class BrokerLink(Protocol):
    """How one control plane reaches the broker (fleet.broker.MqttLink is one)."""

    host: str
    port: int

    def control_plane_kwargs(self) -> dict[str, object]:
        """ControlPlane's TLS keyword arguments (none for plain TCP)."""
        ...


@dataclass(frozen=True)
class PlainLink:
    """Plain TCP to a broker, no TLS."""

    host: str
    port: int

    def control_plane_kwargs(self) -> dict[str, object]:
        return {}


@dataclass(frozen=True)
class ServerTls:
    """The HTTPS identity of the repository server and the API: PEM certificate and key paths."""

    cert: Path
    key: Path


def server_ssl_context(tls: ServerTls) -> ssl.SSLContext:
    """The one server-side TLS context (TLS 1.2 or later) for ``tls``. Raises UserError if the
    certificate or key cannot be loaded."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"cannot load the HTTPS certificate {tls.cert} / key {tls.key}: {e} "
                        "(reissue them: edgeloop broker config)") from None
    return ctx


@dataclass(frozen=True)
class StackOptions:
    """What to run and how. ``broker``: the first control plane's link (default: plain TCP to the
    workspace's MQTT address); it announces and sends commands. ``workers``: the links of further
    ingest workers, one identity each (a client id is its certificate CN on an edgeloop broker):
    ``1 + len(workers)`` control planes split the stream in the shared group. ``session``: the
    persistent MQTT session of the first (further ones get ``-2``, ``-3``, ...). ``http``: where the
    repository server listens (default: the workspace's HTTP address); ``repository=False``: none
    here (``repository_url``: the one served elsewhere, which rollouts announce).
    ``api``: (host, port) of the HTTP API, None for none. ``rollouts``: build a rollout controller.
    ``blocks``: also serve the repositories over MQTT in blocks (contracts/blocks.py).
    ``server_tls``: serve the repository and the API over HTTPS with this identity (None: HTTP)."""

    broker: BrokerLink | None = None
    workers: Sequence[BrokerLink] = ()
    share_group: str = SHARE_GROUP
    shared: bool = True
    session: str | None = None
    repository: bool = True
    repository_url: str | None = None   # with repository=False: where a repository served elsewhere is
    http: tuple[str, int] | None = None
    api: tuple[str, int] | None = None
    rollouts: bool = True
    blocks: bool = True
    server_tls: ServerTls | None = None
    public_url: str | None = None       # what rollouts announce when a load balancer fronts every host's
                                        # repository server (the workspace's http.public_url; docs/multihost.md)

    @property
    def ingest_workers(self) -> int:
        return 1 + len(self.workers)


class ServiceStack:
    """The running stack; see the module docstring. Use as a context manager, or call
    :meth:`start` and :meth:`stop`."""

    def __init__(self, ws: Workspace, options: StackOptions | None = None) -> None:
        self.ws = ws
        self.options = options or StackOptions()
        self._registry: Registry | None = None
        self.repository: RepositoryServer | None = None
        self.ingest: list[ControlPlane] = []
        self.rollouts: RolloutController | None = None
        self.api: ApiServer | None = None
        self._stops: list[Callable[[], None]] = []      # what to call on stop, in start order
        self._ssl: ssl.SSLContext | None = None

    @property
    def registry(self) -> Registry:
        """The stack's registry connection (closed once the stack stopped)."""
        if self._registry is None:
            raise RuntimeError("the service stack has not been started")
        return self._registry

    @property
    def control_plane(self) -> ControlPlane:
        """The first control plane: the one that announces and sends rollout commands."""
        if not self.ingest:
            raise RuntimeError("the service stack is not running")
        return self.ingest[0]

    @property
    def repository_url(self) -> str | None:
        """The repository URL devices are told to download from (what rollouts announce and
        serve.json names): the public one of several hosts, else this stack's own server's."""
        if self.options.public_url:
            return self.options.public_url
        return self.repository.url if self.repository else self.options.repository_url

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> ServiceStack:
        """Start every service in order. Raises ServiceUnavailable or UserError (after stopping
        what had started)."""
        try:
            self._start_registry()
            self._start_repository()
            self._start_control_planes()
            self._start_rollouts()
            self._start_api()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything started, in reverse order. Safe to call twice."""
        while self._stops:
            self._stops.pop()()

    def __enter__(self) -> ServiceStack:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the steps ---------------------------------------------------------------------------------
    def _start_registry(self) -> None:
        if self.options.server_tls is not None:      # before anything listens: a bad certificate is bad input
            self._ssl = server_ssl_context(self.options.server_tls)
        self._registry = Registry(self.ws.store_location)
        self._stops.append(self._registry.close)

    def _start_repository(self) -> None:
        if not self.options.repository:
            return
        host, port = self.options.http or (self.ws.http_host, self.ws.http_port)
        self.repository = RepositoryServer(self.ws.repository_dir, host, port, self.ws.director_dir,
                                           ssl_context=self._ssl).start()
        self._stops.append(self.repository.stop)

    def _repositories(self) -> dict[str, Path] | None:
        return {"image": self.ws.repository_dir, "director": self.ws.director_dir} if self.options.blocks else None

    def _time_server(self):  # noqa: ANN202 - cloud.ingest.time_server.TimeServer | None
        """Signed time for devices, with the director's timestamp keys (device_sdk/clock.py); none
        (devices keep their own clocks) when the director is not set up or its keys are not here."""
        from edgeloop.cloud.ingest.time_server import TimeServer

        try:
            return TimeServer.for_director(self.ws.director_repository())
        except UserError as e:
            log.warning("no signed time for devices: %s", e)
            return None

    def _start_control_planes(self) -> None:
        o = self.options
        time_server = self._time_server()
        links = [o.broker or PlainLink(self.ws.mqtt_host, self.ws.mqtt_port), *o.workers]
        for i, link in enumerate(links):
            session = o.session if o.session is None or i == 0 else f"{o.session}-{i + 1}"
            cp = ControlPlane(self.registry, link.host, link.port, session=session, fleet=self.ws.fleet,
                              repositories=self._repositories(), share_group=o.share_group, shared=o.shared,
                              time_server=time_server, **link.control_plane_kwargs())     # type: ignore[arg-type]
            cp.start()
            self.ingest.append(cp)                  # kept after stop: their stats stay readable
            self._stops.append(cp.stop)

    def _start_rollouts(self) -> None:
        if not self.options.rollouts:
            return
        from edgeloop.cloud.rollouts.controller import RolloutController

        self.rollouts = RolloutController(self.ws, self.registry, self.control_plane.send_command,
                                          repository_url=self.repository_url)

    def _start_api(self) -> None:
        if self.options.api is None:
            return
        from edgeloop.cloud.api.server import ApiServer

        host, port = self.options.api
        api = ApiServer(self.registry, host, port, rollouts=self.rollouts, ssl_context=self._ssl).start()
        self.api = api
        self._stops.append(api.stop)
