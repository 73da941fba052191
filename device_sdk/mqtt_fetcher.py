"""A python-tuf fetcher that gets repository files over MQTT in blocks (contracts/blocks.py).

For devices that speak only MQTT. URLs look like ``mqtt://image/metadata/timestamp.json`` and
``mqtt://image/targets/<path>``. A package's blocks are written into a partial file as they
arrive, with a bitmap of the blocks held; when the connection drops or answers stop (no block
within ``timeout_s``), the fetch fails as a slow retrieval and the next attempt asks only for
the blocks the bitmap lacks. python-tuf checks the length and hashes of the result; a file
whose blocks claim a total size over python-tuf's bound for it (its signed length, or its
role's cap) is refused before any of it is held (DownloadLengthMismatchError).
"""

from __future__ import annotations

import hashlib
import queue
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Protocol

from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

from edgeloop.contracts import topics
from edgeloop.contracts.blocks import DEFAULT_BLOCK_SIZE, MAX_BLOCKS_PER_REQUEST, BlockRequest, decode_block
from edgeloop.contracts.errors import ContractError
from edgeloop.device_sdk.storage import atomic_write

__all__ = ["MqttBlockFetcher"]


class _Link(Protocol):     # device_sdk.ports.Link, as far as this needs it
    def route(self, topic: str, handler: Callable[[bytes], None]) -> None: ...
    def subscribe(self, topic: str, qos: int = 1) -> None: ...
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Any: ...
    def poll(self, timeout: float) -> None: ...


class MqttBlockFetcher(FetcherInterface):
    def __init__(self, link: _Link, device_id: str, partial_dir: Path, block_size: int = DEFAULT_BLOCK_SIZE,
                 timeout_s: float = 10.0, window: int = 16,
                 fleet: topics.Fleet = topics.Fleet(topics.DEFAULT_FLEET)) -> None:
        """``fleet``: the topic scheme of the device's fleet (its requests and blocks travel there)."""
        self.link, self.device_id = link, device_id
        self.topics = fleet
        self.partial_dir = Path(partial_dir)
        self.block_size, self.timeout_s = block_size, timeout_s
        self.window = min(window, MAX_BLOCKS_PER_REQUEST)
        self._inbox: queue.Queue[bytes] = queue.Queue(maxsize=4096)
        self.blocks_received = 0
        self._max_length: int | None = None     # python-tuf's bound for the file being fetched
        link.route(self.topics.blocks(device_id), self._deliver)
        link.subscribe(self.topics.blocks(device_id))

    def _deliver(self, payload: bytes) -> None:   # paho's thread: just queue it
        try:
            self._inbox.put_nowait(payload)
        except queue.Full:
            pass   # dropped blocks are asked for again

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """python-tuf's download, with its bound known to the block requests."""
        self._max_length = max_length
        try:
            with super().download_file(url, max_length) as f:
                yield f
        finally:
            self._max_length = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith("mqtt://"):
            raise exceptions.DownloadError(f"not an mqtt:// URL: {url}")
        repo, _, path = url[len("mqtt://"):].partition("/")
        persist = path.startswith("targets/")
        key = self.partial_dir / hashlib.sha256(url.encode()).hexdigest()[:32]
        data_path, map_path = key.with_suffix(".data"), key.with_suffix(".map")
        have, total = self._load_map(map_path) if persist else (set(), None)
        buf = bytearray()
        if persist and data_path.exists():
            buf = bytearray(data_path.read_bytes())
        if total is None:
            total = self._request(repo, path, [0], buf, have)
        n_blocks = max(1, -(-total // self.block_size))
        buf.extend(b"\0" * max(0, total - len(buf)))
        while missing := [i for i in range(n_blocks) if i not in have]:
            try:
                self._request(repo, path, missing[:self.window], buf, have)
            finally:
                if persist:
                    self.partial_dir.mkdir(parents=True, exist_ok=True)
                    atomic_write(data_path, bytes(buf))
                    atomic_write(map_path, f"{total} {self.block_size} ".encode() + bytes(
                        1 if i in have else 0 for i in range(n_blocks)))
        for suffix_path in (data_path, map_path):
            suffix_path.unlink(missing_ok=True)
        yield bytes(buf[:total])

    def _load_map(self, map_path: Path) -> tuple[set[int], int | None]:
        try:
            raw = map_path.read_bytes()
            total_s, size_s, bits = raw.split(b" ", 2)
            if int(size_s) != self.block_size:
                return set(), None
            return {i for i, b in enumerate(bits) if b}, int(total_s)
        except (OSError, ValueError):
            return set(), None

    def _next_block(self, deadline: float) -> bytes:
        """The next block that arrived, running the link's I/O while waiting (a polled link has
        no thread of its own). Raises SlowRetrievalError at ``deadline``."""
        while True:
            try:
                return self._inbox.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise exceptions.SlowRetrievalError from None   # resumes from the bitmap next time
                self.link.poll(min(left, 0.05))

    def _request(self, repo: str, path: str, indexes: list[int], buf: bytearray, have: set[int]) -> int:
        """Ask for blocks; store those that arrive. Returns the file's total size."""
        rid = uuid.uuid4().hex[:12]
        req = BlockRequest(rid, repo, path, indexes, self.block_size)
        self.link.publish(self.topics.block_requests(self.device_id), req.encode(), qos=1)
        wanted, total = set(indexes), None
        deadline = time.monotonic() + self.timeout_s
        while wanted:
            payload = self._next_block(deadline)
            try:
                block = decode_block(payload)
            except ContractError:
                continue
            if block.request_id != rid or block.index not in wanted:
                continue   # a late answer to an earlier request
            if block.status == "not_found":
                raise exceptions.DownloadHTTPError(f"{repo}/{path} not found", 404)
            if block.status != "ok":
                raise exceptions.DownloadError(f"block {block.index} of {path} refused")
            total = block.total_size
            if self._max_length is not None and total > self._max_length:
                raise exceptions.DownloadLengthMismatchError(
                    f"{repo}/{path} claims {total} bytes, over the {self._max_length} allowed")
            start = block.index * self.block_size
            if len(buf) < total:
                buf.extend(b"\0" * (total - len(buf)))
            buf[start:start + len(block.data)] = block.data
            have.add(block.index)
            wanted.discard(block.index)
            self.blocks_received += 1
            deadline = time.monotonic() + self.timeout_s   # progress: keep going
        return total if total is not None else len(buf)
