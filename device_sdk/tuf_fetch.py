"""Resolve and fetch an update through two TUF repositories (the Uptane split).

The *director* says which package this device's group must install: its targets metadata
lists ``assignments/<group>/<package path>`` with the package's length and hashes. The *image*
repository holds every package. :meth:`UpdateClient.fetch` refreshes both with
``tuf.ngclient`` (each from its own trusted root), requires the director to assign the
announced package to this device's group and the image repository to sign the same length
and hashes, then downloads the package from the image repository through a
:class:`~device_sdk.fetcher.ResumableFetcher` and returns verified bytes.

Every failure becomes an :class:`UpdateRefused` with a specific code, or a
:class:`TransientError` (network trouble; the download resumes on the next attempt).

Expiry is judged at ``clock()`` (the agent's :class:`~device_sdk.clock.TrustedClock`: the control
plane's signed time once the device has it, within its round-trip bound), not at the device's
wall clock: python-tuf 7 reads the time once, as ``TrustedMetadataSet.reference_time`` when an
Updater is made, and that one attribute is set right after (:func:`_judge_at`).

Device layout (``<state>/tuf``)::

    image/metadata/root.json      trusted image root (provisioned), then newer versions
    director/metadata/root.json   trusted director root (provisioned)
    image/targets/                verified packages
    partial/                      resumable partial downloads
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from edgeloop.contracts.codes import ErrorCode
from edgeloop.contracts.delta import apply_delta
from edgeloop.contracts.errors import ContractError
from edgeloop.contracts.messages import Announce
from edgeloop.contracts.topics import assignment_path
from edgeloop.device_sdk.errors import TransientError, UpdateRefused
from edgeloop.device_sdk.fetcher import ResumableFetcher
from edgeloop.device_sdk.mqtt_fetcher import MqttBlockFetcher
from tuf.ngclient.fetcher import FetcherInterface
from edgeloop.device_sdk.storage import atomic_write

log = logging.getLogger("edgeloop.agent.update")

__all__ = ["UpdateClient", "provision"]


def provision(tuf_dir: Path, image_root: bytes, director_root: bytes) -> None:
    """Install the trusted roots a device starts from (only those it does not have yet)."""
    for repo, root in (("image", image_root), ("director", director_root)):
        path = tuf_dir / repo / "metadata" / "root.json"
        if not path.exists():
            atomic_write(path, root)
    (tuf_dir / "image" / "targets").mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Resolved:
    target: TargetFile
    custom: dict


class UpdateClient:
    def __init__(self, tuf_dir: Path, group: str, max_bytes: int, read_timeout_s: float = 30.0,
                 fetcher: FetcherInterface | None = None, clock: Callable[[], float] | None = None) -> None:
        """``fetcher``: how bytes travel (default: HTTP with resume). An MQTT block fetcher
        ignores the announced URLs and uses ``mqtt://image`` and ``mqtt://director``.
        ``clock``: the time metadata expiry is judged at (default: the wall clock)."""
        self.tuf_dir = Path(tuf_dir)
        self.clock = clock
        self.group = group
        self.config = UpdaterConfig(targets_max_length=max_bytes)
        self.fetcher = fetcher or ResumableFetcher(self.tuf_dir / "partial", read_timeout=read_timeout_s)
        self.over_mqtt = isinstance(self.fetcher, MqttBlockFetcher)
        self.last_delivery: str | None = None    # "full" or "delta", for reports and tests
        self._started: tuple[Announce, bytes | None] | None = None

    def start(self, announce: Announce, base: bytes | None) -> None:
        """:class:`edgeloop.device_sdk.ports.UpdateFetcher`: remember what :meth:`result` fetches."""
        self._started = (announce, base)

    def result(self) -> bytes | None:
        """The started fetch, done now (blocking). Raises UpdateRefused or TransientError."""
        if self._started is None:
            raise RuntimeError("UpdateClient.result() without start()")
        (announce, base), self._started = self._started, None
        return self.fetch(announce, base)

    def fetch(self, announce: Announce, base: bytes | None = None) -> bytes:
        """Verified bytes of the announced package. Raises UpdateRefused or TransientError.

        With ``base`` (the package now installed) and a delta announced from it, the delta is
        fetched (verified as its own target) and applied; the result must match the full
        package's signed length and hash, else the full package is downloaded instead.
        """
        try:
            return self._fetch(announce, base)
        except UpdateRefused:
            self.discard_partial()
            raise
        except (tuf_exc.LengthOrHashMismatchError, tuf_exc.DownloadLengthMismatchError) as e:
            self.discard_partial()
            raise UpdateRefused(ErrorCode.VERIFY_HASH, f"package does not match its signed length or hash: {e}") from e
        except tuf_exc.DownloadError as e:
            raise TransientError(f"download failed ({type(e).__name__}): {e}") from e
        except tuf_exc.RepositoryError as e:
            raise UpdateRefused(ErrorCode.VERIFY_METADATA, f"{type(e).__name__}: {e}") from e
        except OSError as e:
            raise TransientError(f"cannot reach the repository: {e}") from e

    def discard_partial(self) -> None:
        shutil.rmtree(self.tuf_dir / "partial", ignore_errors=True)

    def _updater(self, repo: str, base_url: str, with_targets: bool) -> Updater:
        meta = self.tuf_dir / repo / "metadata"
        if not (meta / "root.json").exists():
            raise UpdateRefused(ErrorCode.VERIFY_METADATA, f"this device has no trusted {repo} root (not provisioned)")
        base = base_url.rstrip("/")
        updater = Updater(metadata_dir=str(meta), metadata_base_url=f"{base}/metadata/",
                          target_dir=str(self.tuf_dir / repo / "targets") if with_targets else None,
                          target_base_url=f"{base}/targets/" if with_targets else None,
                          fetcher=self.fetcher, config=self.config, bootstrap=None)
        if self.clock is not None:
            _judge_at(updater, self.clock())
        return updater

    def _fetch(self, announce: Announce, base: bytes | None = None) -> bytes:
        director = self._updater("director", "mqtt://director" if self.over_mqtt else announce.director,
                                 with_targets=False)
        director.refresh()
        group = announce.group or self.group
        assigned = director.get_targetinfo(assignment_path(group, announce.target))
        if assigned is None:
            raise UpdateRefused(ErrorCode.VERIFY_DIRECTOR, f"the director does not assign {announce.target} "
                                                   f"to group {group} (stale or forged announcement)")
        custom = assigned.custom or {}
        if custom.get("update_id") != announce.update_id:
            raise UpdateRefused(ErrorCode.VERIFY_DIRECTOR, f"the director assigns update {custom.get('update_id')}, "
                                                   f"not the announced {announce.update_id} (replayed announcement)")
        image = self._updater("image", "mqtt://image" if self.over_mqtt else announce.repository,
                              with_targets=True)
        image.refresh()
        signed = image.get_targetinfo(announce.target)
        if signed is None:
            raise UpdateRefused(ErrorCode.VERIFY_DIRECTOR, f"the image repository does not back the director's "
                                                   f"assignment of {announce.target}")
        if (signed.length, signed.hashes) != (assigned.length, assigned.hashes):
            raise UpdateRefused(ErrorCode.VERIFY_DIRECTOR, "the director and the image repository disagree on "
                                                   f"{announce.target}'s length or hashes")
        if base is not None and announce.delta is not None:
            data = self._via_delta(image, announce.delta, base, signed)
            if data is not None:
                return data
        path = image.find_cached_target(signed) or image.download_target(signed)
        self.last_delivery = "full"
        return Path(path).read_bytes()

    def _via_delta(self, image: Updater, delta: dict, base: bytes, full: TargetFile) -> bytes | None:
        if hashlib.sha256(base).hexdigest() != delta["base_sha256"]:
            return None
        info = image.get_targetinfo(delta["target"])
        if info is None:
            return None
        try:
            patch = Path(image.find_cached_target(info) or image.download_target(info)).read_bytes()
            data = apply_delta(base, patch)
        except (ContractError, tuf_exc.RepositoryError) as e:
            log.warning("delta %s unusable (%s); downloading the full package", delta["target"], e)
            return None
        if len(data) != full.length or hashlib.sha256(data).hexdigest() != full.hashes.get("sha256"):
            log.warning("delta %s did not reproduce the signed package; downloading it in full", delta["target"])
            return None
        self.last_delivery = "delta"
        return data


def _judge_at(updater: Updater, t: float) -> None:
    """Make ``updater`` judge expiry at ``t`` (python-tuf 7: the trusted set's ``reference_time``,
    read at every expiry check and set once, when the Updater is made; there is no public hook)."""
    trusted = updater._trusted_set   # noqa: SLF001 - the one narrow patch point, see the module doc
    if not hasattr(trusted, "reference_time"):
        raise RuntimeError("this python-tuf has no TrustedMetadataSet.reference_time: update _judge_at")
    trusted.reference_time = datetime.fromtimestamp(t, timezone.utc)
