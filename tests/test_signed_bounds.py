"""Signed bounds and refusal classes, against real repositories (cloud/release) and real agents
over a real broker, with python-tuf verifying over HTTP through a hostile mirror.

- the package's SIGNED length is compared with the device's limit before a byte of it travels;
- every metadata file is cut at its signed length (timestamp and snapshot sign them) or its
  role's cap (contracts/metadata_limits.py), with a code that says so;
- what a mirror can cause is retried with bounded back-off and then reported, never
  remembered; what signed metadata says is remembered;
- a root chain longer than one refresh walks is walked over several.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from edgeloop.contracts.metadata_limits import LIMITS, MetadataLimits
from edgeloop.device_sdk.tuf_fetch import UpdateClient, provision
from edgeloop.cloud.errors import UserError
from edgeloop.cloud.release.signing import ROLES, Repository, RoleKeys
from conftest import TIER, assert_refused_and_still_serving, make_live, settled, wait_for

FAST_RETRIES = (0.05, 0.1)            # three tries in all, so the tests do not wait out 31 s
TRIES = len(FAST_RETRIES) + 1
Fault = Callable[[str, bytes, int], "bytes | Iterator[bytes]"]


class Mirror:
    """A mirror in front of the workspace's two repositories: serves their files as they are,
    except what ``fault(path, data, nth request of that path)`` makes of them (an iterator is
    streamed without a length, up to 64 MiB). Counts requests per path and bytes sent."""

    ENDLESS_BOUND = 64 * 1024 * 1024

    def __init__(self, ws) -> None:  # noqa: ANN001
        self.roots = {"repository": Path(ws.repository_dir), "director": Path(ws.director_dir)}
        self.fault: Fault | None = None
        self.requests: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self._lock = threading.Lock()
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                mirror._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/repository"
        self.director_url = f"http://127.0.0.1:{self.server.server_address[1]}/director"

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        top, _, rest = h.path.lstrip("/").partition("/")
        path = (self.roots[top] / rest).resolve() if top in self.roots and rest else None
        if path is None or not path.is_file():
            h.send_error(404)
            return
        with self._lock:
            self.requests[h.path] += 1
            nth = self.requests[h.path]
        data = path.read_bytes()
        body = self.fault(h.path, data, nth) if self.fault else data
        h.send_response(200)
        if isinstance(body, bytes):
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            self._count(h.path, len(body))
            return
        h.send_header("Connection", "close")
        h.end_headers()
        sent = 0
        try:
            for chunk in body:
                h.wfile.write(chunk)
                sent += len(chunk)
                if sent >= self.ENDLESS_BOUND:
                    break
        except OSError:
            pass        # the device hung up: what a device that cuts the stream does
        self._count(h.path, sent)
        h.close_connection = True

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self.sent[path] += n

    def package_requests(self) -> int:
        return sum(n for p, n in self.requests.items() if "/targets/" in p)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def endless(data: bytes) -> Iterator[bytes]:
    yield data
    while True:
        yield b" " * 65536


def flip(data: bytes) -> bytes:
    return data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]


@pytest.fixture(scope="module")
def shared(broker, tmp_path_factory):
    """One workspace, fleet of one and mirror for the module (each test signs new versions)."""
    env = make_live(broker, tmp_path_factory.mktemp("bounds"), devices=1,
                    agent_overrides={"retry_delays_s": FAST_RETRIES})
    env.mirror = Mirror(env.ws)
    env.client = env.agents[0].client
    yield env
    env.mirror.close()
    env.close()


@pytest.fixture
def env(shared):
    """The shared environment as each test expects to find it: the real server, no fault,
    the agent's own client and retry counter at zero."""
    agent = shared.agents[0]
    wait_for(lambda: not agent.installing and agent.pending_retry is None, what="the agent to be idle")
    shared.repository_url, shared.director_url = shared.server.url, shared.server.director_url
    shared.mirror.fault = None
    shared.mirror.requests.clear()
    agent.client, agent.retries = shared.client, 0
    yield shared


def through_mirror(env) -> None:  # noqa: ANN001
    env.repository_url, env.director_url = env.mirror.url, env.mirror.director_url


def received(env) -> int:  # noqa: ANN001
    return env.agents[0].client.fetcher.fetched_bytes


# -- 3. signed bounds ---------------------------------------------------------------------------
def padded(data: bytes, size: int) -> bytes:
    """The same package with an incompressible file added until it is ``size`` bytes."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, content in members + [(tarfile.TarInfo("padding.bin"), os.urandom(size - len(data) - 2048))]:
            m.size = len(content)
            tar.addfile(m, io.BytesIO(content))
    return buf.getvalue()


def test_a_package_signed_over_the_device_limit_is_refused_before_a_byte_of_it_travels(broker, tmp_path):
    env = make_live(broker, tmp_path, devices=1, agent_overrides={"retry_delays_s": FAST_RETRIES,
                                                                    "max_package_bytes": 1_000_000})
    try:
        agent = env.agents[0]
        v2 = env.new_version()
        pkg = env.registry.package_for(v2, TIER)
        path = Path(env.registry.artifact_path(pkg["sha256"]))
        big = padded(path.read_bytes(), 3_400_000)
        path.write_bytes(big)          # both repositories sign these 3.4 MB
        before = received(env)
        msg = env.sign_and_announce(v2)
        assert env.repo.targets()[pkg["target"]].length == len(big) > 3_000_000
        assert_refused_and_still_serving(env, msg, "package.too_large")
        assert "signed as" in agent.last_result.reason and "nothing downloaded" in agent.last_result.reason
        metadata_only = received(env) - before
        assert metadata_only < 64 * 1024, metadata_only            # metadata, no package bytes
        assert not any(p.stat().st_size > 1_000_000 for p in (agent.client.tuf_dir / "image" / "targets").iterdir())
        assert not any((agent.client.tuf_dir / "partial").glob("*"))
        assert agent.installer.already_handled(msg.update_id)     # definitive: remembered
        # announced again: not fetched again (not even metadata)
        quiet = received(env)
        env.cp.announce(msg)
        time.sleep(0.5)
        assert received(env) == quiet and agent.retries == 0
    finally:
        env.close()


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_an_endless_metadata_stream_is_cut_at_its_signed_length_or_cap(env, role):
    agent = env.agents[0]
    now = agent.model_version
    through_mirror(env)
    pattern = "timestamp.json" if role == "timestamp" else f".{role}.json"
    env.mirror.fault = lambda p, data, n: endless(data) if p.startswith("/repository/metadata/") and \
        p.endswith(pattern) else data
    before = received(env)
    v2 = env.new_version()
    msg = env.sign_and_announce(v2)
    assert_refused_and_still_serving(env, msg, "metadata.too_large", model_version=now)
    assert agent.last_result.reason.startswith(f"download failed {TRIES} times")
    served = {p: n for p, n in env.mirror.requests.items() if p.endswith(pattern) and p.startswith("/repository/")}
    assert sum(served.values()) == TRIES, served                # bounded retries, then reported
    # each try was cut at the signed length (snapshot, targets) or the 4 KiB cap (timestamp), plus a chunk
    bound = LIMITS.timestamp_max_bytes if role == "timestamp" else 64 * 1024
    assert received(env) - before < TRIES * (bound + 64 * 1024 + 32 * 1024), received(env) - before
    if role != "timestamp":          # the signing side: the length and hash a device cuts at
        meta = Metadata.from_file(str(env.repo.meta_dir / "timestamp.json")).signed.snapshot_meta
        assert meta.length and meta.hashes["sha256"]
    assert not agent.installer.already_handled(msg.update_id)   # transient: not remembered
    # the mirror is fixed; the same update announced again installs
    env.mirror.fault = None
    env.cp.announce(msg)
    wait_for(lambda: agent.model_version == v2, what="the update once the mirror is fixed")


def test_the_largest_metadata_the_repository_may_sign_fits_its_cap_and_more_is_refused(tmp_path, monkeypatch):
    most = LIMITS.max_keys_per_role
    repo = Repository(tmp_path / "repo", tmp_path / "keys")
    repo.init({role: RoleKeys(most, most) for role in ROLES})
    repo.rotate("root")              # signed by the old and the new root keys: 2 x 8 signatures
    for role, name in [("root", "2.root.json"), ("timestamp", "timestamp.json"),
                       ("snapshot", "1.snapshot.json")]:
        size = (repo.meta_dir / name).stat().st_size
        # within the cap, and the cap no more than ~2.5x what the worst case needs
        assert LIMITS.max_bytes(role) // 3 < size <= LIMITS.max_bytes(role), (role, size)
    with pytest.raises(UserError, match="over the limit of 8"):
        RoleKeys(most + 1, 1)
    # a targets metadata over its cap is never written (so no device is ever asked for it)
    import edgeloop.cloud.release.signing as signing
    monkeypatch.setattr(signing, "LIMITS", MetadataLimits(targets_max_bytes=6000))
    before = sorted(p.name for p in repo.meta_dir.iterdir())
    with pytest.raises(UserError, match="targets metadata of .* bytes is over its 6000 byte cap"):
        for i in range(100):
            repo.add_target(f"m/{i}/{TIER}.elpkg", b"x" * 10)
    assert i > 3
    after = sorted(p.name for p in repo.meta_dir.iterdir())
    assert len(after) == len(before) + 2 * i          # the refused one wrote nothing
    assert len(json.loads(max(repo.meta_dir.glob("*.targets.json"),
                              key=lambda p: int(p.name.split(".")[0])).read_bytes())["signed"]["targets"]) == i


# -- 4. refusal classes -------------------------------------------------------------------------
def test_a_package_corrupted_in_transit_once_installs_on_the_retry(env):
    agent = env.agents[0]
    now = agent.model_version
    through_mirror(env)
    env.mirror.fault = lambda p, data, n: flip(data) if "/repository/targets/" in p and n == 1 else data
    v2 = env.new_version()
    env.sign_and_announce(v2)
    wait_for(lambda: agent.model_version == v2, what="the install on the retry")
    assert env.mirror.package_requests() == 2 and agent.retries == 1


def test_a_package_corrupted_on_every_try_is_retried_a_bounded_number_of_times_then_reported(env):
    agent = env.agents[0]
    now = agent.model_version
    through_mirror(env)
    env.mirror.fault = lambda p, data, n: flip(data) if "/repository/targets/" in p else data
    v2 = env.new_version()
    msg = env.sign_and_announce(v2)
    assert_refused_and_still_serving(env, msg, "verify.hash", model_version=now)
    assert env.mirror.package_requests() == TRIES and agent.retries == TRIES - 1
    assert agent.last_result.reason.startswith(f"download failed {TRIES} times")
    assert not agent.installer.already_handled(msg.update_id)
    time.sleep(0.3)
    assert env.mirror.package_requests() == TRIES               # and then it stops


def test_a_device_without_its_roots_retries_and_installs_once_it_has_them(env):
    agent = env.agents[0]
    now = agent.model_version
    tuf = agent.client.tuf_dir
    saved = (tuf / "director" / "metadata" / "root.json").read_bytes()
    import shutil
    shutil.rmtree(tuf / "director" / "metadata")
    v2 = env.new_version()
    msg = env.sign_and_announce(v2)
    assert_refused_and_still_serving(env, msg, "metadata.no_root", model_version=now)
    assert not agent.installer.already_handled(msg.update_id)
    provision(tuf, b"unused", saved)      # the operator installs the missing root
    env.cp.announce(msg)                  # the same update, announced again (no fresh publish)
    wait_for(lambda: agent.model_version == v2, what="the install once the root is there")


def test_a_definitive_refusal_is_remembered_and_not_tried_again(env):
    from release_primitives import assign
    agent = env.agents[0]
    now = agent.model_version
    through_mirror(env)
    v2 = env.new_version()
    msg = env.sign_and_announce(v2, send=False)
    assign(env.ws, TIER, msg, b"other bytes")      # the repositories disagree, both correctly signed
    env.cp.announce(msg)
    assert_refused_and_still_serving(env, msg, "verify.director", model_version=now)
    assert agent.installer.already_handled(msg.update_id) and agent.retries == 0
    requests = sum(env.mirror.requests.values())
    env.cp.announce(msg)
    time.sleep(0.5)
    assert sum(env.mirror.requests.values()) == requests


# -- long root chains ---------------------------------------------------------------------------
def bump_roots(repo: Repository, n: int) -> int:
    """``n`` more root versions, same keys, each signed by the one root key (a legitimate,
    long chain made fast). Returns the newest version."""
    md = Metadata.from_file(str(max(repo.meta_dir.glob("*.root.json"), key=lambda p: int(p.name.split(".")[0]))))
    signer = repo.keys.load("root", md.signed.roles["root"].keyids[0])
    serializer = JSONSerializer(compact=False)
    for _ in range(n):
        md.signed.version += 1
        md.signatures.clear()
        md.sign(signer)
        (repo.meta_dir / f"{md.signed.version}.root.json").write_bytes(md.to_bytes(serializer))
    return md.signed.version


@pytest.mark.parametrize("rotations,refreshes,chain", [(4, 2, 30), (LIMITS.max_root_rotations, 1, 300)],
                         ids=["lowered-cap", "python-tuf-cap"])
def test_a_root_chain_longer_than_one_refresh_walks_converges_over_refreshes(env, rotations, refreshes, chain):
    agent = env.agents[0]
    now = agent.model_version
    limits = MetadataLimits(max_root_rotations=rotations, root_refreshes=refreshes)
    old = agent.client
    agent.client = UpdateClient(old.tuf_dir, TIER, agent.config.max_package_bytes, fetcher=old.fetcher,
                                limits=limits)
    agent.config = dataclasses.replace(agent.config, retry_delays_s=(0.05,) * 20)
    def trusted() -> int:
        return json.loads((old.tuf_dir / "image" / "metadata" / "root.json").read_bytes())["signed"]["version"]
    start = trusted()
    started = time.perf_counter()
    assert bump_roots(env.repo, chain) == start + chain
    newest = env.repo.rotate("timestamp")   # only the newest root trusts the timestamp key now
    made = time.perf_counter() - started
    v2 = env.new_version()
    msg = env.sign_and_announce(v2)
    started = time.perf_counter()
    wait_for(lambda: agent.model_version == v2, timeout=120, what="the install at the end of the root chain")
    walked = time.perf_counter() - started
    assert trusted() == newest == start + chain + 1
    # each refresh walks `rotations` versions and one more finds the end: progress on every fetch
    fetches = -(-((chain + 1) // rotations + 1) // refreshes)
    assert agent.retries == fetches - 1, (agent.retries, fetches)
    wait_for(lambda: settled(env, msg.update_id), what="the install's result")
    assert agent.last_result.state == "committed"
    print(json.dumps({"roots": chain, "sign_s": round(made, 2), "walk_s": round(walked, 2)}))


def test_over_mqtt_a_file_whose_blocks_claim_more_than_its_bound_is_refused_before_it_is_held(tmp_path):
    """The block fetcher's source claims 10 GB for a timestamp python-tuf bounds at 4 KiB."""
    from tuf.api import exceptions

    from edgeloop.contracts.blocks import Block, BlockRequest, encode_block
    from edgeloop.device_sdk.mqtt_fetcher import MqttBlockFetcher

    class Link:       # the broker's side of device_sdk.ports.Link, answering every request
        def __init__(self) -> None:
            self.handlers: dict[str, Callable[[bytes], None]] = {}

        def route(self, topic: str, handler: Callable[[bytes], None]) -> None:
            self.handlers[topic] = handler

        def subscribe(self, topic: str, qos: int = 1) -> None: ...

        def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
            req = BlockRequest.decode(payload)
            for i in req.blocks:
                block = Block(req.request_id, req.path, i, 10 * 1024 ** 3, "ok", b"{" * req.block_size)
                for handler in self.handlers.values():
                    handler(encode_block(block))

        def poll(self, timeout: float) -> None: ...

    fetcher = MqttBlockFetcher(Link(), "dev-1", tmp_path / "partial", timeout_s=1.0)
    with pytest.raises(exceptions.DownloadLengthMismatchError, match="claims 10737418240 bytes"):
        fetcher.download_bytes("mqtt://image/metadata/timestamp.json", LIMITS.timestamp_max_bytes)
    assert fetcher.blocks_received == 0


@pytest.mark.parametrize("error, url, code", [
    ("UnsignedMetadataError", "http://m/repository/metadata/7.targets.json", "verify.metadata"),   # pinned bytes
    ("UnsignedMetadataError", "http://m/repository/metadata/3.snapshot.json", "verify.metadata"),
    ("UnsignedMetadataError", "http://m/repository/metadata/timestamp.json", "metadata.corrupt"),  # nothing pins it
    ("UnsignedMetadataError", "http://m/repository/metadata/4.root.json", "metadata.corrupt"),
    ("BadVersionNumberError", "http://m/repository/metadata/timestamp.json", "metadata.stale"),
    ("ExpiredMetadataError", "http://m/repository/metadata/3.snapshot.json", "metadata.stale"),
    ("LengthOrHashMismatchError", "http://m/repository/metadata/7.targets.json", "metadata.corrupt"),
    ("DownloadLengthMismatchError", "http://m/repository/metadata/timestamp.json", "metadata.too_large"),
    ("DownloadHTTPError", "http://m/repository/metadata/timestamp.json", None),                    # TransientError
])
def test_a_metadata_failure_is_classified_by_what_a_mirror_could_have_done(error, url, code):
    from tuf.api import exceptions

    from edgeloop.contracts.codes import ErrorCode
    from edgeloop.device_sdk.errors import TransientError, UpdateRefused
    from edgeloop.device_sdk.tuf_fetch import _metadata_refusal
    cls = getattr(exceptions, error)
    e = cls("x", 503) if error == "DownloadHTTPError" else cls("x")
    refusal = _metadata_refusal("image", e, url)
    if code is None:
        assert isinstance(refusal, TransientError)
    else:
        assert isinstance(refusal, UpdateRefused) and refusal.code == code
        assert ErrorCode(code).retryable == (code != "verify.metadata")
