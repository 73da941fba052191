"""A python-tuf fetcher over HTTP(S) that resumes interrupted package downloads.

``tuf.ngclient`` asks a fetcher for a URL and checks length and hashes itself; this fetcher
only moves bytes. For package URLs (under ``/targets/``) every byte received is appended to a
partial file first; when a download is cut (network drop, power loss, a stalled server hitting
the read timeout), the next attempt asks for ``Range: bytes=<have>-`` and replays what it
already has before streaming the rest, so finished bytes are never fetched twice. A server
that ignores the range (HTTP 200) restarts the file. When a stream ends, the partial file is
removed whatever the verification result, so bad bytes are never resumed from twice.

``tuf.ngclient`` gives every download its bound (a signed length, or the role's cap from
``contracts/metadata_limits.py``); the first chunk past it closes the connection at once
(:meth:`ResumableFetcher.download_file`), so a mirror's endless stream costs at most the bound
plus one chunk.

With ``ca_file`` (the device's fleet CA, the one its MQTT TLS trusts) an ``https://`` server
must present a certificate that chains to that CA and names the host asked for; nothing else
is trusted. ``http://`` URLs keep working (a workspace without a broker configuration).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import urllib3
from tuf.api import exceptions
from tuf.ngclient.fetcher import FetcherInterface

__all__ = ["ResumableFetcher"]

CHUNK = 16 * 1024


class ResumableFetcher(FetcherInterface):
    def __init__(self, partial_dir: Path, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 resume_marker: str = "/targets/", ca_file: Path | str | None = None) -> None:
        self.partial_dir = Path(partial_dir)
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        self.resume_marker = resume_marker
        if ca_file is None:
            self._pool = urllib3.PoolManager(retries=False)
        else:                    # only the fleet's CA; urllib3 checks the host name against the certificate
            self._pool = urllib3.PoolManager(retries=False, cert_reqs="CERT_REQUIRED", ca_certs=str(ca_file))
        self.resumed_bytes = 0   # bytes replayed from partial files (for tests and benchmarks)
        self.fetched_bytes = 0   # bytes received from the network

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """python-tuf's download, but the stream is closed the moment it passes ``max_length``
        (raising DownloadLengthMismatchError), not when the exception is collected."""
        with tempfile.TemporaryFile() as temp_file:
            chunks = self.fetch(url)
            received = 0
            try:
                for chunk in chunks:
                    received += len(chunk)
                    if received > max_length:
                        raise exceptions.DownloadLengthMismatchError(
                            f"{url}: more than the {max_length} bytes allowed; cut at {received}")
                    temp_file.write(chunk)
            finally:
                if isinstance(chunks, Generator):
                    chunks.close()          # closes the connection now
            temp_file.seek(0)
            yield temp_file

    def _partial(self, url: str) -> Path:
        return self.partial_dir / hashlib.sha256(url.encode()).hexdigest()[:32]

    def _fetch(self, url: str) -> Iterator[bytes]:
        if self.resume_marker not in url:
            yield from self._stream(url, None, 0)
            return
        partial = self._partial(url)
        have = partial.stat().st_size if partial.exists() else 0
        yield from self._stream(url, partial, have)

    def _stream(self, url: str, partial: Path | None, have: int) -> Iterator[bytes]:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            response = self._pool.request("GET", url, headers=headers, preload_content=False,
                                          timeout=self.timeout)
        except urllib3.exceptions.MaxRetryError as e:
            if isinstance(e.reason, urllib3.exceptions.TimeoutError):
                raise exceptions.SlowRetrievalError from e
            raise exceptions.DownloadError(f"cannot fetch {url}: {e.reason}") from e
        except urllib3.exceptions.HTTPError as e:
            raise exceptions.DownloadError(f"cannot fetch {url}: {e}") from e
        complete = False
        try:
            if response.status == 416 and partial is not None:   # our partial is not a prefix any more
                partial.unlink(missing_ok=True)
                raise exceptions.DownloadError(f"range not satisfiable for {url}; restarting next time")
            if response.status not in (200, 206):
                raise exceptions.DownloadHTTPError(f"HTTP {response.status} for {url}", response.status)
            sink = None
            if partial is not None:
                self.partial_dir.mkdir(parents=True, exist_ok=True)
                if response.status == 206 and have:
                    with open(partial, "rb") as f:
                        while chunk := f.read(CHUNK):
                            self.resumed_bytes += len(chunk)
                            yield chunk
                    sink = open(partial, "ab")
                else:
                    sink = open(partial, "wb")
            try:
                # read1: whatever has arrived (up to CHUNK), so a stall loses no received bytes
                while chunk := response.read1(CHUNK):
                    self.fetched_bytes += len(chunk)
                    if sink is not None:
                        sink.write(chunk)
                        sink.flush()
                        os.fsync(sink.fileno())
                    yield chunk
            except urllib3.exceptions.ReadTimeoutError as e:
                raise exceptions.SlowRetrievalError from e
            except urllib3.exceptions.HTTPError as e:
                raise exceptions.DownloadError(f"connection lost: {e}") from e
            finally:
                if sink is not None:
                    sink.close()
            complete = True
            if partial is not None:
                partial.unlink(missing_ok=True)   # complete: ngclient verifies it now
        finally:
            if not complete:       # never hand a half-read connection back to the pool
                response.close()
            response.release_conn()
