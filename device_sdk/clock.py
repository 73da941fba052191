"""Time a device can trust: the control plane's signed time, learned with a nonce.

A device's wall clock may run days off (a flat RTC battery, no NTP). TUF expiry, telemetry window
times and status timestamps need the real time, so the agent asks the control plane for it as
Uptane's time server is asked: it publishes an ``edgeloop.time_request/1`` with a fresh random
nonce; the control plane answers ``edgeloop.time/1``: the device id, the nonce and its time,
signed by keys of the director's ``timestamp`` role. :meth:`TrustedClock.accept` takes the answer
only if

- its nonce is one this clock sent, at most ``max_rtt_s`` ago (a replayed or delayed answer is
  refused: the time is known to within that round trip), and
- at least the role's threshold of distinct keys of the director root this device trusts now
  (``<state>/tuf/director/metadata/root.json``, rotated by TUF) signed
  :func:`~contracts.messages.time_signing_bytes`.

Then :meth:`now` is the signed time plus the monotonic time elapsed since the answer arrived
(immune to later jumps of the wall clock), never earlier than a trusted time already seen: the
device learns "now >= T" and never goes backwards, also across restarts (the last trusted time is
kept in ``<state>/clock.json``; a write the disk refuses costs only that). Without an answer yet,
:meth:`now` is the wall clock. :attr:`offset_s` (trusted minus wall clock) over ``tolerance_s`` is
a ``clock.skewed`` fault on the device's status.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Callable

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Signature
from tuf.api.metadata import Metadata, Root

from edgeloop.contracts.messages import SignedTime, TimeRequest, time_signing_bytes
from edgeloop.device_sdk.errors import StorageError
from edgeloop.device_sdk.storage import read_json, write_json

log = logging.getLogger("edgeloop.agent.clock")

__all__ = ["TrustedClock"]

MAX_OUTSTANDING = 8        # nonces awaiting an answer


class TrustedClock:
    def __init__(self, device_id: str, trusted_root: Path, state: Path | None = None, *,
                 wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 max_rtt_s: float = 10.0, tolerance_s: float = 300.0) -> None:
        """``trusted_root``: the director root.json whose ``timestamp`` keys sign the time;
        ``state``: where the last trusted time is kept (None: memory only); ``wall``: the
        device's own clock."""
        self.device_id = device_id
        self.trusted_root = Path(trusted_root)
        self.state = state
        self.wall, self.monotonic = wall, monotonic
        self.max_rtt_s, self.tolerance_s = max_rtt_s, tolerance_s
        self._sent: dict[str, float] = {}              # nonce -> monotonic time it was sent
        self._lock = threading.Lock()                  # request() and accept() may run on two threads
        self._anchor: tuple[float, float] | None = None   # (trusted time, monotonic time then)
        self.refused = 0                                # answers refused (bad nonce, late, bad signature)
        saved = self._load_floor()
        self._floor = saved                             # trusted time known to have passed (restart-safe)
        self._floor_mono = monotonic()

    # -- asking -------------------------------------------------------------------------
    def request(self) -> TimeRequest:
        """A new request with a fresh nonce (the oldest outstanding one is forgotten past the bound)."""
        nonce = secrets.token_hex(16)
        with self._lock:
            self._sent[nonce] = self.monotonic()
            while len(self._sent) > MAX_OUTSTANDING:
                self._sent.pop(next(iter(self._sent)))
        return TimeRequest(self.device_id, nonce)

    def accept(self, answer: SignedTime) -> bool:
        """Take a signed time answering one of this clock's nonces; False (and counted) otherwise."""
        with self._lock:
            sent = self._sent.pop(answer.nonce, None)
        now_mono = self.monotonic()
        why = None
        if answer.device_id != self.device_id or sent is None:
            why = "answers no request of this device"
        elif now_mono - sent > self.max_rtt_s:
            why = f"arrived {now_mono - sent:.1f} s after its request (over {self.max_rtt_s} s)"
        elif not self._signed(answer):
            why = "not signed by the director's timestamp keys this device trusts"
        if why is not None:
            self.refused += 1
            log.warning("%s: refused a signed time: %s", self.device_id, why)
            return False
        self._anchor = (max(answer.time, self.now_floor()), now_mono)
        self._save_floor(answer.time)
        return True

    # -- reading ------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        return self._anchor is not None

    def now(self) -> float:
        """The trusted time when known (never earlier than one already seen), else the wall clock."""
        if self._anchor is None:
            return max(self.wall(), self.now_floor())
        t, mono = self._anchor
        return max(t + (self.monotonic() - mono), self.now_floor())

    def now_floor(self) -> float:
        """A time known to have passed: the last trusted time plus what the monotonic clock ran since."""
        return self._floor + (self.monotonic() - self._floor_mono) if self._floor else 0.0

    @property
    def offset_s(self) -> float | None:
        """Trusted time minus the wall clock (positive: the device is behind), once synced."""
        return None if self._anchor is None else round(self.now() - self.wall(), 3)

    @property
    def skewed(self) -> bool:
        offset = self.offset_s
        return offset is not None and abs(offset) > self.tolerance_s

    # -- internals ----------------------------------------------------------------------
    def _signed(self, answer: SignedTime) -> bool:
        try:
            root = Metadata[Root].from_bytes(self.trusted_root.read_bytes()).signed
        except Exception as e:  # noqa: BLE001 - no usable root: no trusted time
            log.warning("%s: no trusted director root to check the time with: %s", self.device_id, e)
            return False
        role = root.roles["timestamp"]
        data = time_signing_bytes(answer.device_id, answer.nonce, answer.time)
        good = set()
        for sig in answer.signatures:
            keyid = sig["keyid"]
            if keyid not in role.keyids or keyid not in root.keys:
                continue
            try:
                root.keys[keyid].verify_signature(Signature(keyid, sig["sig"]), data)
            except UnverifiedSignatureError:
                continue
            good.add(keyid)
        return len(good) >= role.threshold

    def _load_floor(self) -> float:
        if self.state is None:
            return 0.0
        try:
            value = (read_json(self.state) or {}).get("trusted_time", 0.0)
        except StorageError:
            return 0.0
        return float(value) if isinstance(value, (int, float)) else 0.0

    def _save_floor(self, t: float) -> None:
        if t > self._floor:
            self._floor, self._floor_mono = t, self.monotonic()
        if self.state is not None:
            try:
                write_json(self.state, {"trusted_time": self._floor})
            except StorageError as e:     # a full disk: known for this run only
                log.warning("%s: cannot keep the trusted time: %s", self.device_id, e)
