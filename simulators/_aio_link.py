"""A device's MQTT link on the swarm's asyncio loop: :class:`edgeloop.device_sdk.ports.Link` over paho.

Each link is one paho client (its own client id, MQTT 3.1.1 with a persistent session, a last
will saying ``offline``; mutual TLS with the device's own certificate when it has one) whose
socket :class:`edgeloop.simulators._aio_mqtt.LoopDriver` watches. Nothing blocks: :meth:`AioLink.connect`
starts connecting, incoming messages wait in the inbox and ``on_ready`` tells the swarm to step
the device, and a lost connection is retried after ``reconnect_s``. The simulated network's
latency delays each incoming message; :meth:`AioLink.disconnect_abruptly` is its dropped link.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edgeloop.device_sdk.mqtt import configure_tls
from edgeloop.simulators._aio_mqtt import LoopDriver

__all__ = ["AioLink", "LinkStats"]


class LinkStats:
    """Counts shared by every link of a swarm (the event loop is the only writer)."""

    def __init__(self) -> None:
        self.disconnects = 0
        self.reconnects = 0


class AioLink:
    def __init__(self, driver: LoopDriver, client_id: str, host: str, port: int, *, will: tuple[str, bytes],
                 keepalive: int = 60, tls_dir: Path | None = None, latency_s: float = 0.0,
                 reconnect_s: float = 1.0, stats: LinkStats | None = None,
                 on_ready: Callable[[], None] = lambda: None) -> None:
        self.driver, self.loop = driver, driver.loop
        self.host, self.port, self.keepalive = host, port, keepalive
        self.latency_s, self.reconnect_s = latency_s, reconnect_s
        self.stats = stats or LinkStats()
        self.on_ready = on_ready
        self.on_acked: Callable[[int], None] | None = None
        self.on_connection_change: Callable[[bool], None] | None = None
        self.inbox: deque[tuple[str, bytes]] = deque()
        self.ready = asyncio.Event()          # subscribed at least once
        self.closing = False
        self._up = False
        self._subscriptions: list[tuple[str, int]] = []
        self._routes: dict[str, Callable[[bytes], None]] = {}
        self._subscribe_mid: int | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                  clean_session=False)
        self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.max_queued_messages_set(0)
        if tls_dir is not None and (tls_dir / "device.crt").exists():
            configure_tls(self.client, tls_dir / "ca.crt", tls_dir / "device.crt", tls_dir / "device.key")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        driver.attach(self.client)

    # -- device_sdk.ports.Link ------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._up

    def connect(self, timeout: float = 10.0) -> None:
        """Start connecting (never waits; a refused connection is retried later)."""
        try:
            self.client.connect(self.host, self.port, keepalive=self.keepalive)
        except OSError:
            self._reconnect_later()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscriptions.append((topic, qos))
        if self._up:
            self.client.subscribe(topic, qos)

    def route(self, topic: str, handler: Callable[[bytes], None]) -> None:
        self._routes[topic] = handler

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def receive(self, timeout: float = 0.0) -> tuple[str, bytes] | None:
        return self.inbox.popleft() if self.inbox else None

    def poll(self, timeout: float) -> None:
        """The loop does the I/O: nothing to do here (never blocks the loop)."""

    def close(self, flush_s: float = 0.0) -> None:
        """Disconnect; bytes already queued (the ``offline`` status) leave first."""
        self.closing = True
        self.client.disconnect()

    # -- the simulated network -------------------------------------------------------------------
    def disconnect_abruptly(self) -> None:
        """The link dies: the broker notices and publishes the last will (``offline``)."""
        sock = self.client.socket()
        if sock is not None:
            self.stats.disconnects += 1
            with contextlib.suppress(OSError):
                sock.shutdown(2)

    def _reconnect_later(self) -> None:
        self.loop.call_later(max(0.05, self.reconnect_s), self._reconnect)

    def _reconnect(self) -> None:
        if self.closing:
            return
        try:
            self.client.reconnect()
        except OSError:
            self._reconnect_later()

    # -- paho callbacks (on the loop) -------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        if not reason_code.is_failure and self._subscriptions:
            _, self._subscribe_mid = client.subscribe(list(self._subscriptions))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if mid != self._subscribe_mid:
            return
        if self.ready.is_set():
            self.stats.reconnects += 1
        self._up = True
        if self.on_connection_change is not None:
            self.on_connection_change(True)
        self.ready.set()
        self.on_ready()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        self._up = False
        if self.on_connection_change is not None:
            self.on_connection_change(False)
        if not self.closing:
            self._reconnect_later()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, props: Any) -> None:
        if self.on_acked is not None:
            self.on_acked(mid)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.latency_s:
            self.loop.call_later(self.latency_s, self._deliver, message.topic, bytes(message.payload))
        else:
            self._deliver(message.topic, bytes(message.payload))

    def _deliver(self, topic: str, payload: bytes) -> None:
        handler = self._routes.get(topic)
        if handler is not None:
            handler(payload)
        else:
            self.inbox.append((topic, payload))
        self.on_ready()
