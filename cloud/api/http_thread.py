"""An aiohttp application served on its own thread and event loop, so synchronous code (the CLI,
tests, the control plane) can start and stop it. Used by the repository server and the API.

With an ``ssl_context`` (cloud/services.py :func:`~edgeloop.cloud.services.server_ssl_context`:
a certificate from the workspace's fleet CA) it serves HTTPS only, and :attr:`scheme` is
``https``; subclasses build their URLs from it."""

from __future__ import annotations

import asyncio
import ssl
import threading

from aiohttp import web

from edgeloop.cloud.errors import ServiceUnavailable

__all__ = ["ThreadedHttpServer"]


class ThreadedHttpServer:
    """Subclasses build their app in :meth:`make_app`. ``port`` 0 picks a free port; ``port``
    holds the bound one once :meth:`start` returned."""

    thread_name = "edgeloop-http"
    what = "HTTP"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        """``https`` with a TLS context, else ``http``."""
        return "https" if self.ssl_context is not None else "http"

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def make_app(self) -> web.Application:
        raise NotImplementedError

    def start(self):  # noqa: ANN201 - returns self (the subclass)
        """Raises ServiceUnavailable if the address cannot be served."""
        started, errors = threading.Event(), []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._start())
            except BaseException as e:  # noqa: BLE001 - handed to the starting thread
                errors.append(e)
                started.set()
                return
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
        self._thread.start()
        started.wait(10)
        if errors:
            raise ServiceUnavailable(f"cannot serve the {self.what} on {self.host}:{self.port}: {errors[0]}")
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)
