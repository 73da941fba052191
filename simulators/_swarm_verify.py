"""The swarm's one shortcut: TUF verification once per distinct announcement, shared.

A real agent refreshes the director's and the image repository's signed metadata with
python-tuf on every update (device_sdk/tuf_fetch.py). Thousands of simulated devices doing
that on two cores would measure python-tuf, not the rollout. So the swarm runs the same
checks **once per distinct (director URL, image URL, director group, target, update id)**, with
``tuf.ngclient`` from the trusted roots every simulated device is provisioned with, and caches
the verdict in the process: the signed length and sha256 that both repositories agree on, or
the refusal. Every device still downloads its own copy of the package over HTTP and checks its
length and sha256 against the announcement *and* against that signed verdict, so a tampered
package, a forged announcement or a missing director assignment is refused exactly as an agent
would refuse it (same codes: ``verify.director``, ``verify.metadata``, ``verify.hash``).

A new update (a new update id, or a rollback, which is an install of the previous package under
a new id) is a new key, so it is checked against freshly refreshed metadata. What the swarm does
*not* exercise per device is python-tuf's own rollback/freeze protection across metadata
versions on that device; the agent tests (tests/test_ota_attacks.py) cover that.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import Updater

from edgeloop.contracts.codes import ErrorCode
from edgeloop.contracts.messages import Announce
from edgeloop.contracts.topics import assignment_path
from edgeloop.device_sdk.tuf_fetch import provision, updater_config

__all__ = ["Verdict", "VerdictCache"]


@dataclass(frozen=True)
class Verdict:
    """What the signed metadata says about one announced package, or why it is refused."""

    length: int | None = None
    sha256: str | None = None
    code: str | None = None          # set when refused
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.code is None


class VerdictCache:
    """Verdicts per distinct announcement; verification runs in a worker thread, one at a time."""

    def __init__(self, tuf_dir: Path, image_root: bytes, director_root: bytes, max_bytes: int) -> None:
        self.tuf_dir = Path(tuf_dir)
        provision(self.tuf_dir, image_root, director_root)
        self.config = updater_config()     # the device's metadata bounds (contracts/metadata_limits.py)
        self.max_bytes = max_bytes
        self._verdicts: dict[tuple[str, ...], asyncio.Future[Verdict]] = {}
        self._lock = threading.Lock()     # one python-tuf refresh at a time on the shared metadata
        self.verifications = 0            # how many times python-tuf actually ran

    async def verdict(self, announce: Announce, group: str) -> Verdict:
        key = (announce.director, announce.repository, group, announce.target, announce.update_id)
        fut = self._verdicts.get(key)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._verdicts[key] = fut
            try:
                fut.set_result(await asyncio.to_thread(self._verify, announce, group))
            except Exception as e:  # noqa: BLE001 - network trouble: not cached, the next device retries
                del self._verdicts[key]
                fut.set_exception(e)
                fut.exception()       # retrieved: no "never retrieved" warning for the waiters' copy
                raise
        return await asyncio.shield(fut)

    def _updater(self, repo: str, base_url: str) -> Updater:
        base = base_url.rstrip("/")
        return Updater(metadata_dir=str(self.tuf_dir / repo / "metadata"), metadata_base_url=f"{base}/metadata/",
                       target_dir=None, target_base_url=f"{base}/targets/", config=self.config,
                       bootstrap=None)

    def _verify(self, announce: Announce, group: str) -> Verdict:
        """The agent's checks (device_sdk/tuf_fetch.py), without the download. Raises OSError or
        tuf DownloadError for network trouble (retry); returns refusals as verdicts."""
        with self._lock:
            self.verifications += 1
            try:
                director = self._updater("director", announce.director)
                director.refresh()
                assigned = director.get_targetinfo(assignment_path(group, announce.target))
                if assigned is None:
                    return Verdict(code=ErrorCode.VERIFY_DIRECTOR, reason=f"the director does not assign "
                                   f"{announce.target} to group {group}")
                if (assigned.custom or {}).get("update_id") != announce.update_id:
                    return Verdict(code=ErrorCode.VERIFY_DIRECTOR, reason=f"the director assigns update "
                                   f"{(assigned.custom or {}).get('update_id')}, not {announce.update_id}")
                image = self._updater("image", announce.repository)
                image.refresh()
                signed = image.get_targetinfo(announce.target)
            except tuf_exc.DownloadError:
                raise
            except tuf_exc.RepositoryError as e:
                return Verdict(code=ErrorCode.VERIFY_METADATA, reason=f"{type(e).__name__}: {e}")
        if signed is None:
            return Verdict(code=ErrorCode.VERIFY_DIRECTOR, reason=f"the image repository does not sign {announce.target}")
        if (signed.length, signed.hashes) != (assigned.length, assigned.hashes):
            return Verdict(code=ErrorCode.VERIFY_DIRECTOR, reason="the director and the image repository disagree on "
                                                          f"{announce.target}'s length or hashes")
        if signed.length > self.max_bytes:
            return Verdict(code=ErrorCode.PACKAGE_TOO_LARGE, reason=f"{announce.target} is signed as {signed.length} "
                                                                    f"bytes, over the {self.max_bytes} byte limit")
        return Verdict(length=signed.length, sha256=signed.hashes.get("sha256"))
