"""What the agent is built from: the parts a test, a gateway or a simulator may swap.

The agent (device_sdk/agent.py) owns no thread and no I/O of its own; it talks to the world
through these Protocols, each with one real implementation in device_sdk built by
:mod:`edgeloop.device_sdk.factory` when none is given:

==============  ==========================================  =====================================
part            real implementation                         what the swarm swaps in
==============  ==========================================  =====================================
Link            device_sdk.mqtt.MqttLink (paho)             paho on the swarm's asyncio loop
UpdateFetcher   device_sdk.tuf_fetch.UpdateClient           async HTTP + shared TUF verdict
RuntimeLoader   device_sdk.runtime.DEFAULT_LOADER           loaded runtimes shared by sha256
StateStore      device_sdk.storage.JsonFile (state.json)    the same, on tmpfs
OutboxStore     device_sdk.outbox.Outbox (SQLite)           the same, SQLite in memory
SequenceStore   device_sdk.telemetry.SequenceCounter        the same, on tmpfs
==============  ==========================================  =====================================

The three stores' writes raise :class:`~device_sdk.errors.StorageError` whose ``code`` names the
fault (``storage.full``, ``storage.readonly``, ``storage.write``; an OSError is taken the same
way) and change nothing; the agent keeps serving through them (device_sdk/spool.py, the
installer's persist-then-transition).

A fetcher is *started* and then *asked*: :meth:`UpdateFetcher.result` returns ``None`` while a
download is still under way (an asynchronous fetcher) or does the whole download before it
returns (a blocking one, run from the device's control thread), so one agent works with both.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from edgeloop.contracts.package import Package
from edgeloop.contracts.messages import Announce
from edgeloop.device_sdk.outbox import Pending
from edgeloop.device_sdk.runtime import HealthReport, ModelRuntime

__all__ = ["Sent", "Link", "UpdateFetcher", "RuntimeLoader", "StateStore", "OutboxStore", "SequenceStore"]


class Sent(Protocol):
    """A publish in progress (paho's MQTTMessageInfo, as far as the agent needs it)."""

    mid: int
    rc: int


class Link(Protocol):
    """The device's MQTT connection. Incoming messages wait in an inbox the agent drains;
    ``route`` handlers and the two callbacks may run on the link's own thread or loop."""

    on_acked: Callable[[int], None] | None               # the mid of each acknowledged publish
    on_connection_change: Callable[[bool], None] | None  # up (subscribed) or down

    @property
    def connected(self) -> bool: ...
    def connect(self, timeout: float = 10.0) -> None: ...
    def subscribe(self, topic: str, qos: int = 1) -> None: ...
    def route(self, topic: str, handler: Callable[[bytes], None]) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any: ...
    def receive(self, timeout: float = 0.0) -> tuple[str, bytes] | None: ...
    def poll(self, timeout: float) -> None: ...
    def close(self, flush_s: float = 5.0) -> None: ...


class UpdateFetcher(Protocol):
    """Gets an announced package's verified bytes (TUF metadata and package transport)."""

    def start(self, announce: Announce, base: bytes | None) -> None: ...
    def result(self) -> bytes | None:
        """The verified bytes, or None while still fetching. Raises UpdateRefused (never
        install this update) or TransientError (retry later)."""
    def discard_partial(self) -> None: ...


class RuntimeLoader(Protocol):
    """Loads a package's model and runs its health check (golden vectors, latency budget)."""

    def load(self, bundle: Package, package_sha256: str) -> ModelRuntime:
        """``package_sha256``: the verified package's hash (the same hash is the same model).
        Raises UpdateRefused (``health.load``)."""
    def check(self, runtime: ModelRuntime, bundle: Package) -> HealthReport: ...


class StateStore(Protocol):
    """Where the install state (``state.json``) lives; every save is atomic."""

    def load(self) -> dict[str, Any] | None: ...
    def save(self, state: dict[str, Any]) -> None: ...


class OutboxStore(Protocol):
    """Store-and-forward of telemetry and error reports (device_sdk/outbox.py)."""

    def put(self, topic: str, payload: bytes, priority: int = 0, seq: int | None = None,
            ref: str | None = None) -> None: ...
    def pending(self, limit: int, after: int = 0, resend_before: float | None = None) -> list[Pending]: ...
    def ack(self, message_id: int) -> None: ...
    def taken(self, message_id: int) -> None: ...
    def confirm(self, seqs: list[int], refs: list[str] | None = None) -> int: ...
    def unsent(self) -> int: ...
    def take_dropped(self) -> int: ...
    def close(self) -> None: ...
    def __len__(self) -> int: ...


class SequenceStore(Protocol):
    """The device's persisted, strictly increasing telemetry record number: :meth:`take`
    persists the next number before it hands it out, and hands out nothing if that fails."""

    @property
    def issued(self) -> int: ...
    def take(self) -> int: ...
