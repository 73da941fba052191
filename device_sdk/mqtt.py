"""The agent's MQTT link: paho-mqtt, MQTT 5, one client per device.

The link never runs agent logic on paho's network thread: incoming messages go into a
bounded queue that the agent drains in :meth:`Agent.step`, so a slow install never blocks
acknowledgements or keep-alives. When the queue is full, new messages are dropped and counted.

Two ways to run it (:class:`edgeloop.device_sdk.ports.Link`): with paho's network thread
(``threaded=True``, the default: the link's thread, never the agent's), or polled, where every
:meth:`MqttLink.receive` and :meth:`MqttLink.poll` does the network I/O itself (``client.loop``)
and the device runs on one thread.

TLS is off unless a CA certificate is given: with ``tls_ca`` the link checks the broker's
certificate (and that it names the host it dials); with ``tls_cert`` and ``tls_key`` as well
it also proves the device's own identity (mutual TLS, what an edgeloop broker requires).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from edgeloop.device_sdk.errors import TransientError

log = logging.getLogger("edgeloop.agent.mqtt")

__all__ = ["MqttLink", "configure_tls"]


def configure_tls(client: mqtt.Client, ca: str | Path | None, cert: str | Path | None = None,
                  key: str | Path | None = None) -> None:
    """Turn on TLS for ``client``: no-op without ``ca``; mutual TLS with ``cert`` and ``key``.
    Raises ValueError for a certificate without its key (or the reverse) or TLS files that
    cannot be read."""
    if ca is None and cert is None and key is None:
        return
    if ca is None or (cert is None) != (key is None):
        raise ValueError("TLS needs the CA certificate, and a client certificate always with its key")
    try:
        client.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None,
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    except (OSError, ValueError) as e:   # ssl.SSLError is an OSError
        raise ValueError(f"cannot load the TLS files ({ca}, {cert}, {key}): {e}") from e


class MqttLink:
    def __init__(self, client_id: str, host: str, port: int, *, will: tuple[str, bytes] | None = None,
                 queue_max: int = 256, keepalive: int = 30, tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                 threaded: bool = True) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self.threaded = threaded
        self._activity = threading.Event()     # something arrived (wakes poll() on a threaded link)
        self._last: mqtt.MQTTMessageInfo | None = None
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=queue_max)
        self.dropped = 0
        self._connected = threading.Event()
        self._subscriptions: list[tuple[str, int]] = []
        self._routes: dict[str, Callable[[bytes], None]] = {}
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_queued_messages_set(1000)
        configure_tls(self.client, tls_ca, tls_cert, tls_key)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.on_acked: Callable[[int], None] | None = None   # called with the mid of each acknowledged publish
        self.on_connection_change: Callable[[bool], None] | None = None   # connected (subscribed) or not
        self._subscribe_mid: int | None = None

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; returns once the broker acknowledged the subscriptions.
        Raises TransientError if it cannot within ``timeout``."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        try:
            self.client.connect(self.host, self.port, keepalive=self.keepalive, clean_start=False,
                                properties=props)
        except OSError as e:
            raise TransientError(f"cannot connect to broker {self.host}:{self.port}: {e}") from e
        if self.threaded:
            self.client.loop_start()
            up = self._connected.wait(timeout)
        else:
            deadline = time.monotonic() + timeout
            while not self._connected.is_set() and time.monotonic() < deadline:
                self.client.loop(0.05)
            up = self._connected.is_set()
        if not up:
            if self.threaded:
                self.client.loop_stop()
            raise TransientError(f"broker {self.host}:{self.port} did not accept the connection")

    def receive(self, timeout: float = 0.0) -> tuple[str, bytes] | None:
        """The next queued message, waiting up to ``timeout`` (doing the I/O if polled)."""
        if not self.threaded:
            self.client.loop(timeout if self.inbox.empty() else 0.0)
            timeout = 0.0
        try:
            return self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
        except queue.Empty:
            return None

    def poll(self, timeout: float) -> None:
        """Network I/O for up to ``timeout``, returning early once something arrives."""
        if self.threaded:
            self._activity.wait(timeout)
            self._activity.clear()
        else:
            self.client.loop(timeout)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self._subscriptions.append((topic, qos))
        if self._connected.is_set():
            self.client.subscribe(topic, qos)

    def route(self, topic: str, handler: Callable[[bytes], None]) -> None:
        """Hand messages on ``topic`` to ``handler`` (on paho's thread: it must be quick)
        instead of the inbox."""
        self._routes[topic] = handler

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        self._last = self.client.publish(topic, payload, qos=qos, retain=retain)
        return self._last

    def close(self, flush_s: float = 5.0) -> None:
        """Wait up to ``flush_s`` for the last publish to be acknowledged, then disconnect."""
        last, deadline = self._last, time.monotonic() + flush_s
        if last is not None and last.rc == mqtt.MQTT_ERR_SUCCESS and self.connected:
            while not last.is_published() and time.monotonic() < deadline:
                self.poll(0.02)
        self.client.disconnect()
        if self.threaded:
            self.client.loop_stop()
        else:
            self.client.loop(0.05)

    # paho callbacks: network thread, keep them tiny
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.warning("broker refused connection: %s", reason_code)
            return
        if not self._subscriptions:
            self._up()
            return
        # connected counts from the broker's acknowledgement of our subscriptions, so nothing
        # published after connect() returns can be missed
        _, self._subscribe_mid = client.subscribe(list(self._subscriptions))

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if self.on_acked is not None:
            self.on_acked(mid)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        if mid == self._subscribe_mid:
            if any(rc.is_failure for rc in reason_codes):
                log.warning("broker refused a subscription: %s", reason_codes)
            self._up()

    def _up(self) -> None:
        if self.on_connection_change is not None:   # before connect() returns: the status is out first
            self.on_connection_change(True)
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._connected.clear()
        if self.on_connection_change is not None:
            self.on_connection_change(False)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        handler = self._routes.get(message.topic)
        if handler is not None:
            handler(bytes(message.payload))
        else:
            try:
                self.inbox.put_nowait((message.topic, bytes(message.payload)))
            except queue.Full:
                self.dropped += 1
        self._activity.set()
