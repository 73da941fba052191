"""A simulated network link in front of an HTTP server: bandwidth, stalls and drops.

:class:`LinkProxy` is a real HTTP proxy (aiohttp, its own event-loop thread) that forwards GET
requests (with their ``Range`` header) to an upstream server and streams the answer back at a
limited rate. Faults are queued per request: ``stall_after`` stops sending after N bytes and
holds the connection open (a stalled link), ``drop_after`` closes it after N bytes (a dropped
link). Every request is logged with its range start and bytes sent, so tests can prove that a
resumed download did not fetch finished bytes again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

__all__ = ["LinkProxy", "Fault", "RequestLog"]


@dataclass(frozen=True)
class Fault:
    stall_after: int | None = None     # bytes, then hold the connection open for stall_s
    drop_after: int | None = None      # bytes, then close the connection
    stall_s: float = 30.0
    path_contains: str = "/targets/"   # only requests whose path contains this


@dataclass
class RequestLog:
    path: str
    range_start: int
    status: int
    sent: int = 0
    at: float = field(default_factory=time.time)


class LinkProxy:
    def __init__(self, upstream: str, bytes_per_s: float | None = None, chunk: int = 4096) -> None:
        self.upstream = upstream.rstrip("/")
        self.bytes_per_s = bytes_per_s
        self.chunk = chunk
        self.faults: list[Fault] = []
        self.log: list[RequestLog] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._closing = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LinkProxy:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, name="link-proxy", daemon=True).start()
        ready.wait(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        self._closing = True   # ends stalls early
        if self._loop and self._runner:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)

    def _take_fault(self, path: str) -> Fault | None:
        for i, fault in enumerate(self.faults):
            if fault.path_contains in path:
                return self.faults.pop(i)
        return None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        headers = {k: v for k, v in request.headers.items() if k.lower() == "range"}
        start = int(headers["Range"].split("=")[1].split("-")[0]) if "Range" in headers else 0
        fault = self._take_fault(path)
        async with aiohttp.ClientSession() as session:
            async with session.get(self.upstream + path, headers=headers) as up:
                entry = RequestLog(path, start, up.status)
                self.log.append(entry)
                response = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items()
                    if k.lower() in ("content-length", "content-range", "content-type", "accept-ranges")})
                await response.prepare(request)
                async for chunk in up.content.iter_chunked(self.chunk):
                    if fault and fault.drop_after is not None and entry.sent + len(chunk) > fault.drop_after:
                        request.transport.close()   # the link drops mid-transfer
                        return response
                    if fault and fault.stall_after is not None and entry.sent + len(chunk) > fault.stall_after:
                        deadline = time.time() + fault.stall_s   # the link stalls; the client must time out
                        while time.time() < deadline and not self._closing:
                            await asyncio.sleep(0.05)
                        return response
                    await response.write(chunk)
                    entry.sent += len(chunk)
                    if self.bytes_per_s:
                        await asyncio.sleep(len(chunk) / self.bytes_per_s)
                await response.write_eof()
                return response
