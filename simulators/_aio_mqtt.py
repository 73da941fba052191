"""Many paho-mqtt clients on one asyncio event loop (paho's "external event loop" pattern).

paho's own loops (``loop_start``/``loop_forever``) use ``select()``, one thread per client, and
break past 1024 sockets. Here every client's socket is watched by the asyncio loop instead:
``add_reader`` calls ``loop_read`` when bytes arrive, bytes paho queues are written once per
loop iteration (``add_writer`` only while a socket's buffer is full), and one task calls ``loop_misc`` (keep-alive pings, lost-connection
detection) on every client once per ``misc_interval_s``. Nothing here owns a thread; every
callback runs on the event loop, so the simulated devices need no locks.

This follows paho's ``examples/loop_asyncio.py``. TLS sockets may hold decrypted bytes that
the kernel no longer reports as readable, so reads drain ``pending()`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["LoopDriver"]


class LoopDriver:
    """Attach paho clients to the running asyncio loop. Call :meth:`attach` before ``connect``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, misc_interval_s: float = 1.0) -> None:
        self.loop = loop
        self.misc_interval_s = misc_interval_s
        self.clients: set[mqtt.Client] = set()
        self._misc: asyncio.Task[None] | None = None
        self._dirty: set[mqtt.Client] = set()          # queued bytes since the last flush
        self._flush_scheduled = False
        self._watching: set[socket.socket] = set()     # sockets waiting to become writable

    def attach(self, client: mqtt.Client) -> None:
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._wrote
        self.clients.add(client)
        if self._misc is None:
            self._misc = self.loop.create_task(self._misc_loop())

    def detach(self, client: mqtt.Client) -> None:
        self.clients.discard(client)

    async def close(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
            self._misc = None

    # paho socket callbacks (all on the event loop's thread)
    def _opened(self, client: mqtt.Client, userdata: Any, sock: socket.socket) -> None:
        self.loop.add_reader(sock, self._read, client, sock)

    def _closed(self, client: mqtt.Client, userdata: Any, sock: socket.socket) -> None:
        self._unwatch(sock)
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(sock)

    def _want_write(self, client: mqtt.Client, userdata: Any, sock: socket.socket) -> None:
        # Batched: every client that queued bytes during this loop iteration is flushed once,
        # right after it; only a socket whose buffer is full waits for writability (one epoll
        # change per publish would cost more than the send itself).
        self._dirty.add(client)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for client in dirty:
            sock = client.socket()
            if sock is None:
                continue
            client.loop_write()
            if client.socket() is not sock:
                continue                 # the write failed and paho closed the socket
            if client.want_write() and sock not in self._watching:
                self._watching.add(sock)
                self.loop.add_writer(sock, self._writable, client, sock)

    def _writable(self, client: mqtt.Client, sock: socket.socket) -> None:
        client.loop_write()
        if not client.want_write():
            self._unwatch(sock)

    def _wrote(self, client: mqtt.Client, userdata: Any, sock: socket.socket) -> None:
        """paho has nothing left to write (called from inside loop_write)."""

    def _unwatch(self, sock: socket.socket) -> None:
        if sock in self._watching:
            self._watching.discard(sock)
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_writer(sock)

    @staticmethod
    def _read(client: mqtt.Client, sock: socket.socket) -> None:
        client.loop_read()
        if isinstance(sock, ssl.SSLSocket):
            while client.socket() is sock and sock.pending():
                client.loop_read()

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.misc_interval_s)
            for client in list(self.clients):
                client.loop_misc()
