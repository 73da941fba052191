"""Serving repository files over MQTT in blocks (contracts/blocks.py), for devices without HTTP.

Requests are handled on the server's own thread, never on paho's network thread. A request
may only name a file inside the image or director repository folder; anything else (path
tricks, a bad request) is answered ``refused`` or dropped and counted. A server answers one
fleet's devices only (contracts/topics.py).
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Callable

from edgeloop.contracts import topics
from edgeloop.contracts.blocks import Block, BlockRequest, encode_block
from edgeloop.contracts.errors import ContractError

log = logging.getLogger("edgeloop.blocks")

__all__ = ["BlockServer"]

Publish = Callable[[str, bytes], None]


class BlockServer:
    def __init__(self, roots: dict[str, Path], publish: Publish, fleet: topics.Fleet,
                 queue_max: int = 10_000) -> None:
        """``fleet``: the topic scheme of the fleet it serves: requests on any other topic are
        dropped, blocks go to that fleet's ``devices/<id>/blocks``."""
        self.topics = fleet
        self.roots = {name: Path(p).resolve() for name, p in roots.items()}
        self.publish = publish
        self.served: list[tuple[str, str, int]] = []   # (device, path, index), for tests and benchmarks
        self.refused = 0
        self.drop_after: int | None = None   # fault injection: stop answering after N package blocks
        self._inbox: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=queue_max)
        self._thread = threading.Thread(target=self._loop, name="edgeloop-blocks", daemon=True)
        self._thread.start()

    def submit(self, topic: str, payload: bytes) -> None:
        try:
            self._inbox.put_nowait((topic, payload))
        except queue.Full:
            self.refused += 1

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(5)

    def _loop(self) -> None:
        while (item := self._inbox.get()) is not None:
            try:
                self._handle(*item)
            except Exception:  # noqa: BLE001 - one bad request never stops the server
                log.exception("block request failed")

    def _handle(self, topic: str, payload: bytes) -> None:
        device = self.topics.device_from_topic(topic)
        if device is None:
            return
        try:
            req = BlockRequest.decode(payload)
        except ContractError as e:
            self.refused += 1
            log.warning("dropped block request from %s: %s", device, e)
            return
        path = (self.roots[req.repo] / req.path).resolve()
        if self.roots[req.repo] not in path.parents or not path.is_file():
            self._answer(device, req, 0, "not_found", 0, b"")
            return
        size = path.stat().st_size
        with open(path, "rb") as f:
            for index in req.blocks:
                if self.drop_after is not None and req.path.startswith("targets/") and \
                        sum(p.startswith("targets/") for _, p, _ in self.served) >= self.drop_after:
                    return   # the link is gone: the device must time out and resume
                start = index * req.block_size
                if start >= max(size, 1):
                    self._answer(device, req, index, "refused", size, b"")
                    continue
                f.seek(start)
                self._answer(device, req, index, "ok", size, f.read(req.block_size))
                self.served.append((device, req.path, index))

    def _answer(self, device: str, req: BlockRequest, index: int, status: str, size: int, data: bytes) -> None:
        self.publish(self.topics.blocks(device), encode_block(Block(req.request_id, req.path, index, size, status, data)))
