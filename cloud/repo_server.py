"""HTTP(S) delivery of the signed repository (aiohttp), run on its own event-loop thread.

Serves the image repository ``<workspace>/repository`` at ``/repository/`` (TUF metadata
under ``metadata/``, packages under ``targets/``) and the director ``<workspace>/director`` at
``/director/``, with Range support from aiohttp's static handler (resumable downloads), and
``/healthz``. Devices verify everything they fetch, so the server is trusted for nothing.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from aiohttp import web

from cloud.errors import ServiceUnavailable

__all__ = ["RepositoryServer"]


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


class RepositoryServer:
    def __init__(self, repository_dir: Path, host: str = "127.0.0.1", port: int = 0,
                 director_dir: Path | None = None) -> None:
        self.repository_dir = Path(repository_dir)
        self.director_dir = Path(director_dir) if director_dir else self.repository_dir.parent / "director"
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/repository"

    @property
    def director_url(self) -> str:
        return f"http://{self.host}:{self.port}/director"

    def start(self) -> RepositoryServer:
        started = threading.Event()
        errors: list[BaseException] = []

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

        self._thread = threading.Thread(target=run, name="edgeloop-repo-http", daemon=True)
        self._thread.start()
        started.wait(10)
        if errors:
            raise ServiceUnavailable(f"cannot serve the repository on {self.host}:{self.port}: {errors[0]}")
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", _healthz)
        app.router.add_static("/repository/", self.repository_dir, show_index=False, follow_symlinks=False)
        self.director_dir.mkdir(parents=True, exist_ok=True)
        app.router.add_static("/director/", self.director_dir, show_index=False, follow_symlinks=False)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._loop is None or self._runner is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)
