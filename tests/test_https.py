"""Transport security end to end: with a generated broker (``edgeloop broker up``), the API and the
package repository serve HTTPS with a certificate from the workspace's fleet CA; a real agent over
the real broker (mutual TLS) installs a package over HTTPS, verifying it with its fleet CA; a
client that does not trust that CA is refused in one line; a token is never sent over plain HTTP
to a host that is not loopback; a workspace without a broker configuration keeps plain HTTP."""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from tuf.api import exceptions as tuf_errors

from conftest import cli_json, free_port, run_cli, wait_for
from edgeloop.cloud.api.server import TokenStore
from edgeloop.cloud.errors import UserError
from edgeloop.cloud.fleet_registry import FleetRegistry
from edgeloop.cloud.loop.pipeline import publish_update
from edgeloop.cloud.release.repo_server import RepositoryServer
from edgeloop.cloud.services import ServerTls, ServiceStack, server_ssl_context
from edgeloop.cloud.workspace import Workspace
from edgeloop.device_sdk.agent import Agent, AgentConfig
from edgeloop.device_sdk.errors import TransientError
from edgeloop.device_sdk.fetcher import ResumableFetcher
from edgeloop.device_sdk.tuf_fetch import provision
from edgeloop.fleet.broker import control_plane_link, server_tls, stack_options
from edgeloop.fleet.identity import FleetCA, agent_tls, simulated_device_tls
from edgeloop.simulators._swarm_parts import Downloads

pytestmark = pytest.mark.e2e
TIER = "edge-gateway"


_cli = cli_json     # edgeloop ARGV --json in this process (tests/conftest.py)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """init -> broker up (private port) -> train -> package, then the service stack as serve runs it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGELOOP_KEY_PASSPHRASE", "https-tests")
        mp.delenv("EDGELOOP_CA", raising=False)
        mp.delenv("EDGELOOP_TOKEN", raising=False)
        root = tmp_path_factory.mktemp("https")
        ws_dir = str(root / "ws")
        _cli("init", "-w", ws_dir, "--fleet", "https-fleet")
        _cli("broker", "up", "-w", ws_dir, "--port", str(free_port()))
        try:
            model = _cli("train", "-w", ws_dir, "--epochs", "1")["model_version"]
            _cli("package", "-w", ws_dir, model, "--tier", TIER)
            ws = Workspace.open(Path(ws_dir))
            with ServiceStack(ws, stack_options(ws, worker="https-test", api=("127.0.0.1", 0))) as stack:
                token = TokenStore(stack.registry).create("https-admin", "admin")[1]
                yield SimpleNamespace(root=root, ws=ws, ws_dir=ws_dir, model=model, stack=stack, token=token,
                                      ca=ws.root / "pki" / "ca.crt")
        finally:
            _cli("broker", "down", "-w", ws_dir)


def _get(url: str, ca: Path | None) -> int:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    with urllib.request.urlopen(url, timeout=10, context=ctx) as resp:
        return resp.status


def test_the_api_and_the_repository_serve_https_from_the_fleet_ca(env):
    stack = env.stack
    assert stack.repository_url.startswith("https://127.0.0.1:") and stack.api.url.startswith("https://127.0.0.1:")
    assert stack.rollouts.repository_url == stack.repository_url     # what rollouts announce
    assert _get(stack.api.url + "/healthz", env.ca) == 200
    assert _get(stack.repository_url.rsplit("/", 1)[0] + "/healthz", env.ca) == 200
    with pytest.raises(urllib.error.URLError) as refused:              # not trusted by the system's store
        _get(stack.api.url + "/healthz", None)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
    with pytest.raises((urllib.error.URLError, ConnectionError)):     # and no plain HTTP on the same port
        _get(stack.api.url.replace("https://", "http://") + "/healthz", None)


def test_serve_records_https_urls(env, capsys):
    code, out, err = run_cli(["serve", "-w", env.ws_dir, "--duration", "1", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["repository_url"].startswith("https://") and result["api_url"].startswith("https://")


def test_a_device_installs_a_package_over_https_verifying_it_with_its_fleet_ca(env, tmp_path):
    ws, stack = env.ws, env.stack
    files = simulated_device_tls(ws, FleetRegistry(stack.registry), "gw-https", TIER)
    state = tmp_path / "gw-https"
    provision(state / "tuf", ws.image_repository().trusted_root(), ws.director_repository().trusted_root())
    link = control_plane_link(ws)
    agent = Agent(AgentConfig(device_id="gw-https", tier=TIER, state_dir=state, mqtt_host=link.host,
                              mqtt_port=link.port, fleet=ws.fleet, **agent_tls(files)))
    stop = threading.Event()
    agent.start()
    driver = threading.Thread(target=lambda: [agent.step(timeout=0.05) for _ in iter(stop.is_set, True)], daemon=True)
    driver.start()
    try:
        msg = publish_update(ws, stack.registry, stack.repository_url, env.model, TIER, stack.control_plane.announce)
        assert msg.repository.startswith("https://")
        wait_for(lambda: agent.model_version == env.model, 60, "the device to install over https")
        assert agent.last_result.update_id == msg.update_id
        assert _swarm_download(msg, env.ca) == msg.length              # the swarm's devices trust the same CA
        with pytest.raises(TransientError, match="certificate verify failed"):
            _swarm_download(msg, None)
    finally:
        stop.set()
        driver.join(10)
        agent.stop()


def _swarm_download(msg, ca: Path | None) -> int:
    async def get() -> int:
        downloads = Downloads(1, 64 * 1024 * 1024, 0.0, random.Random(0), ca_file=ca)
        try:
            return len(await downloads.get(msg))
        finally:
            await downloads.close()
    return asyncio.run(get())


def test_a_device_refuses_a_server_whose_certificate_is_not_its_fleet_cas_or_not_for_that_host(env, tmp_path):
    files = tmp_path / "served"
    (files / "metadata").mkdir(parents=True)
    (files / "metadata" / "1.root.json").write_text("{}")
    ca = FleetCA.open(env.ws)
    for name, hosts in (("right", ("127.0.0.1",)), ("wrong-host", ("other.example",))):
        issued = ca.issue_service(f"edgeloop-test-{name}", hosts)
        (tmp_path / f"{name}.crt").write_bytes(issued.cert_pem)
        (tmp_path / f"{name}.key").write_bytes(issued.key_pem)
    foreign = Workspace.init(tmp_path / "foreign")
    foreign_ca = FleetCA.open(foreign).cert_path

    def fetch(cert: str, trust: Path) -> bytes:
        tls = server_ssl_context(ServerTls(tmp_path / f"{cert}.crt", tmp_path / f"{cert}.key"))
        server = RepositoryServer(files, ssl_context=tls, director_dir=tmp_path / "d").start()
        try:
            return b"".join(ResumableFetcher(tmp_path / "partial", ca_file=trust).fetch(
                server.url + "/metadata/1.root.json"))
        finally:
            server.stop()

    assert fetch("right", env.ca) == b"{}"
    with pytest.raises(tuf_errors.DownloadError, match="certificate verify failed"):
        fetch("right", foreign_ca)                 # another fleet's CA
    with pytest.raises(tuf_errors.DownloadError, match="(?i)hostname|match"):
        fetch("wrong-host", env.ca)                # the fleet's CA, but not a certificate for this host


def test_server_clients_verify_the_control_planes_certificate(env, tmp_path, capsys, monkeypatch):
    url, token = env.stack.api.url, env.token
    code, out, err = run_cli(["devices", "-w", env.ws_dir, "--server", url, "--token", token, "--json"], capsys)
    assert code == 0, err                          # the workspace's fleet CA, found by itself
    elsewhere = str(tmp_path / "no-workspace")
    code, out, err = run_cli(["devices", "-w", elsewhere, "--server", url, "--token", token], capsys)
    assert code == 4 and err.count("\n") == 1 and "Traceback" not in err
    assert "does not verify" in err and "--ca" in err
    code, out, err = run_cli(["devices", "-w", elsewhere, "--server", url, "--token", token, "--ca", str(env.ca)],
                             capsys)
    assert code == 0, err
    monkeypatch.setenv("EDGELOOP_CA", str(env.ca))
    assert run_cli(["models", "-w", elsewhere, "--server", url, "--token", token], capsys)[0] == 0
    foreign = Workspace.init(tmp_path / "foreign")
    monkeypatch.setenv("EDGELOOP_CA", str(FleetCA.open(foreign).cert_path))
    code, out, err = run_cli(["audit", "-w", elsewhere, "--server", url, "--token", token], capsys)
    assert code == 4 and err.count("\n") == 1
    monkeypatch.setenv("EDGELOOP_CA", str(tmp_path / "missing.crt"))
    code, out, err = run_cli(["models", "-w", elsewhere, "--server", url, "--token", token], capsys)
    assert code == 2 and "missing.crt" in err and err.count("\n") == 1


@pytest.mark.parametrize("server", ["http://10.1.2.3:8080", "http://control.example.com", "http://[2001:db8::1]:80"])
def test_a_token_is_never_sent_over_plain_http_to_another_host(server, tmp_path, capsys):
    code, out, err = run_cli(["devices", "-w", str(tmp_path), "--server", server, "--token", "edgeloop_x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "in clear" in err and "https://" in err


def test_a_workspace_without_a_broker_configuration_keeps_plain_http(broker, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELOOP_KEY_PASSPHRASE", "https-tests")
    ws = Workspace.init(tmp_path / "plain", mqtt=broker.address)      # a private plain-TCP Mosquitto
    options = stack_options(ws, api=("127.0.0.1", 0), rollouts=False)
    assert options.server_tls is None
    with ServiceStack(ws, options) as stack:
        assert stack.repository_url.startswith("http://") and stack.api.url.startswith("http://")
        assert _get(stack.api.url + "/healthz", None) == 200
    assert not (ws.root / "pki" / "https").exists()


def test_the_https_identity_is_issued_once_and_reissued_only_when_its_names_change(env, tmp_path):
    first = server_tls(env.ws, ("127.0.0.1", 0))
    pem = first.cert.read_bytes()
    assert server_tls(env.ws, ("127.0.0.1", 0)).cert.read_bytes() == pem          # twice: the same certificate
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(n.value) for n in names} == {"127.0.0.1", "localhost"}
    try:
        moved = server_tls(env.ws, ("10.9.8.7", 0))                                 # served on another address
        names = x509.load_pem_x509_certificate(moved.cert.read_bytes()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert "10.9.8.7" in {str(n.value) for n in names}
        assert oct(moved.key.stat().st_mode & 0o777) == "0o600"
    finally:
        server_tls(env.ws, ("127.0.0.1", 0))
    with pytest.raises(UserError, match="cannot load the HTTPS certificate"):
        server_ssl_context(ServerTls(tmp_path / "none.crt", tmp_path / "none.key"))
