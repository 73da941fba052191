"""HTTP(S) delivery of the signed repository (aiohttp), run on its own event-loop thread.

Serves the image repository ``<workspace>/repository`` at ``/repository/`` (TUF metadata
under ``metadata/``, packages under ``targets/``) and the director ``<workspace>/director`` at
``/director/``, with Range support from aiohttp's static handler (resumable downloads), and
``/healthz``. Devices verify everything they fetch, so the server is trusted for nothing; with
an ``ssl_context`` (a workspace with a generated broker) it serves HTTPS, so what a device asks
for and receives is also private on the wire.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from aiohttp import web

from edgeloop.cloud.api.http_thread import ThreadedHttpServer

__all__ = ["RepositoryServer"]


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


class RepositoryServer(ThreadedHttpServer):
    thread_name = "edgeloop-repo-http"
    what = "repository"

    def __init__(self, repository_dir: Path, host: str = "127.0.0.1", port: int = 0,
                 director_dir: Path | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(host, port, ssl_context)
        self.repository_dir = Path(repository_dir)
        self.director_dir = Path(director_dir) if director_dir else self.repository_dir.parent / "director"

    @property
    def url(self) -> str:
        return f"{self.base_url}/repository"

    @property
    def director_url(self) -> str:
        return f"{self.base_url}/director"

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", _healthz)
        app.router.add_static("/repository/", self.repository_dir, show_index=False, follow_symlinks=False)
        self.director_dir.mkdir(parents=True, exist_ok=True)
        app.router.add_static("/director/", self.director_dir, show_index=False, follow_symlinks=False)
        return app
