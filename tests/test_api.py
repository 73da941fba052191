"""The control-plane HTTP API on a real aiohttp server (free port), over a real SQLite registry,
attacked without tokens, with revoked and forged ones, and with roles too low; and the CLI
talking to it with ``--server``.

Rollout endpoints run against a recording double of cloud.rollouts.controller.RolloutController's
public API (cloud.api.server.RolloutService): these tests are about who may call them.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from types import SimpleNamespace
from typing import Any

import pytest

from edgeloop.cloud.api.server import ApiServer, TokenStore
from edgeloop.cloud.errors import NotFound, UserError
from edgeloop.cloud.fleet_registry import FleetRegistry
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.workspace import Workspace
from edgeloop.cloud.store.readonly import query as raw_rows
from conftest import free_port, run_cli
from edgeloop.fleet import identity
from edgeloop.fleet.identity import Enrolment

ENDPOINTS = [("GET", "/api/v1/devices"), ("GET", "/api/v1/devices/gw-1"), ("GET", "/api/v1/models"),
             ("GET", "/api/v1/rollouts"), ("GET", "/api/v1/rollouts/ro-1"), ("POST", "/api/v1/rollouts"),
             ("POST", "/api/v1/rollouts/ro-1/pause"), ("POST", "/api/v1/rollouts/ro-1/resume"),
             ("POST", "/api/v1/rollouts/ro-1/abort"), ("GET", "/api/v1/tokens"), ("POST", "/api/v1/tokens"),
             ("GET", "/api/v1/audit")]
OPERATOR_ONLY = {("POST", "/api/v1/rollouts"), ("POST", "/api/v1/rollouts/ro-1/pause"),
                 ("POST", "/api/v1/rollouts/ro-1/resume"), ("POST", "/api/v1/rollouts/ro-1/abort")}
ADMIN_ONLY = {("GET", "/api/v1/tokens"), ("POST", "/api/v1/tokens"), ("GET", "/api/v1/audit")}
SPEC = {"model_version": "digits-mlp:2", "target": "tier=edge-gateway", "strategy": "canary", "canary": "10%"}


class RecordingRollouts:
    """Behind cloud.api.server.RolloutService: remembers what it was asked, answers like the controller."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.actors: list[str | None] = []        # who the API said acted (the token's name)
        self.rollouts: dict[str, dict[str, Any]] = {"ro-1": {"rollout_id": "ro-1", "state": "waves"}}

    def create(self, spec: Any, actor: str | None = None) -> str:
        self.actors.append(actor)
        if spec.target == "nosuch=1":
            raise UserError("unknown selector key 'nosuch'")
        self.calls.append(("create", spec))
        rid = f"ro-{len(self.rollouts) + 1}"
        self.rollouts[rid] = {"rollout_id": rid, "state": "pending", "model_version": spec.model_version}
        return rid

    def _get(self, rid: str) -> dict[str, Any]:
        if rid not in self.rollouts:
            raise NotFound(f"no rollout {rid!r}")
        return self.rollouts[rid]

    def pause(self, rid: str, actor: str | None = None) -> None:
        self.actors.append(actor)
        self.calls.append(("pause", rid))
        self._get(rid)["state"] = "paused"

    def resume(self, rid: str, actor: str | None = None) -> None:
        self.actors.append(actor)
        self.calls.append(("resume", rid))
        self._get(rid)["state"] = "waves"

    def abort(self, rid: str, reason: str = "", actor: str | None = None) -> None:
        self.actors.append(actor)
        self.calls.append(("abort", (rid, reason)))
        self._get(rid)["state"] = "aborting"

    def status(self, rid: str) -> dict[str, Any]:
        return dict(self._get(rid))

    def list(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rollouts.values()]


@pytest.fixture
def api(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELOOP_KEY_PASSPHRASE", "api-tests")
    monkeypatch.delenv("EDGELOOP_TOKEN", raising=False)
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    fleet = FleetRegistry(registry)
    identity.enroll(ws, fleet, Enrolment("gw-1", tier="edge-gateway", tags={"site": "berlin"}, groups=("canary",)))
    identity.enroll(ws, fleet, Enrolment("mcu-7", tier="mcu", tags={"site": "paris"}))
    registry.record_status({"device_id": "gw-1", "tier": "edge-gateway", "state": "committed",
                            "model_version": "digits-mlp:1", "update_id": "u1", "reason": None})
    registry.add_device_error({"device_id": "mcu-7", "update_id": "u1", "code": "health.golden",
                               "message": "wrong outputs", "ts": 5.0})
    tokens = TokenStore(registry)
    secrets = {role: tokens.create(f"{role}-token", role)[1] for role in ("viewer", "operator", "admin")}
    rollouts = RecordingRollouts()
    server = ApiServer(registry, "127.0.0.1", free_port(), rollouts=rollouts).start()
    try:
        yield SimpleNamespace(ws=ws, registry=registry, fleet=fleet, tokens=tokens, secrets=secrets,
                              rollouts=rollouts, url=server.url)
    finally:
        server.stop()
        registry.close()


def call(env, method: str, path: str, token: str | None = None, body: Any = None,
         raw: bytes | None = None, auth: str | None = None) -> tuple[int, dict[str, Any]]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if auth is not None or token is not None:
        headers["Authorization"] = auth if auth is not None else f"Bearer {token}"
    req = urllib.request.Request(env.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


cli = run_cli


# -- who may call what -----------------------------------------------------------------------------
def test_every_endpoint_refuses_a_request_without_a_token(api):
    for method, path in ENDPOINTS:
        status, body = call(api, method, path, body={} if method == "POST" else None)
        assert status == 401, (method, path, body)
        assert "token" in body["error"]
    assert api.rollouts.calls == [] and len(api.tokens.list()) == 3


@pytest.mark.parametrize("auth", ["Bearer edgeloop_forged-but-well-formed-0000000000000000000000000",
                                  "Bearer not-even-an-edgeloop-token", "Basic dXNlcjpwYXNz", "Bearer ", "Bearer"])
def test_forged_or_malformed_tokens_are_refused(api, auth):
    status, _ = call(api, "GET", "/api/v1/devices", auth=auth)
    assert status == 401


def test_viewer_can_list_and_watch_but_not_start_or_steer_a_rollout(api):
    viewer = api.secrets["viewer"]
    for method, path in ENDPOINTS:
        status, body = call(api, method, path, viewer, body=SPEC if path == "/api/v1/rollouts" else None)
        if (method, path) in OPERATOR_ONLY | ADMIN_ONLY:
            assert status == 403 and "role viewer" in body["error"], (method, path, body)
        else:
            assert status == 200, (method, path, body)
    assert api.rollouts.calls == []                           # refused before anything was done
    assert [r["state"] for r in api.rollouts.list()] == ["waves"]


def test_operator_starts_pauses_resumes_and_aborts_a_rollout(api):
    op = api.secrets["operator"]
    status, started = call(api, "POST", "/api/v1/rollouts", op, body=SPEC)
    assert status == 201 and started["state"] == "pending" and started["model_version"] == "digits-mlp:2"
    rid = started["rollout_id"]
    created = api.rollouts.calls[0][1]
    assert (created.model_version, created.target, created.strategy, created.canary) == \
        ("digits-mlp:2", "tier=edge-gateway", "canary", "10%")
    assert call(api, "POST", f"/api/v1/rollouts/{rid}/pause", op) == (200, {**started, "state": "paused"})
    assert call(api, "POST", f"/api/v1/rollouts/{rid}/resume", op)[1]["state"] == "waves"
    status, aborted = call(api, "POST", f"/api/v1/rollouts/{rid}/abort", op, body={"reason": "bad canary"})
    assert status == 200 and aborted["state"] == "aborting"
    assert api.rollouts.calls[1:] == [("pause", rid), ("resume", rid), ("abort", (rid, "bad canary"))]
    assert call(api, "GET", "/api/v1/tokens", op)[0] == 403   # an operator does not manage tokens


def test_bad_rollout_requests_are_400_or_404_and_change_nothing(api):
    op = api.secrets["operator"]
    before = api.rollouts.list()
    cases = [({**SPEC, "strategy": "everything"}, 400, "unknown strategy"),
             ({**SPEC, "canary_size": 3}, 400, "unknown rollout field"),
             ({"target": "tier=mcu"}, 400, "model_version"),
             ({**SPEC, "target": "nosuch=1"}, 400, "unknown selector"),
             ([SPEC], 400, "JSON object")]
    for body, status, text in cases:
        got = call(api, "POST", "/api/v1/rollouts", op, body=body)
        assert got[0] == status and text in got[1]["error"], (body, got)
    got = call(api, "POST", "/api/v1/rollouts", op, raw=b"{not json")
    assert got[0] == 400 and "not JSON" in got[1]["error"]
    assert call(api, "POST", "/api/v1/rollouts/ro-404/pause", op)[0] == 404
    assert call(api, "POST", "/api/v1/rollouts/ro-1/explode", op)[0] == 404
    assert api.rollouts.list() == before and [c for c, _ in api.rollouts.calls] == ["pause"]


# -- tokens -----------------------------------------------------------------------------------------
def test_tokens_are_stored_only_as_hashes(api):
    api.registry.checkpoint()
    stored = b"".join(p.read_bytes() for p in api.ws.root.glob("registry.db*"))
    rows = raw_rows(api.registry.path, "select * from api_tokens")
    assert len(rows) == 3 and all(len(r["sha256"]) == 64 for r in rows)
    for secret in api.secrets.values():
        assert secret.encode() not in stored and secret not in json.dumps(rows)


def test_admin_creates_a_token_that_works_at_once_and_dies_with_revocation(api, capsys):
    status, made = call(api, "POST", "/api/v1/tokens", api.secrets["admin"], body={"name": "ci", "role": "viewer"})
    assert status == 201 and made["role"] == "viewer" and made["token"].startswith("edgeloop_")
    assert call(api, "GET", "/api/v1/devices", made["token"])[0] == 200
    assert call(api, "POST", "/api/v1/rollouts", made["token"], body=SPEC)[0] == 403
    assert call(api, "POST", "/api/v1/tokens", api.secrets["admin"], body={"name": "ci2", "role": "root"})[0] == 400
    code, out, _ = cli(["tokens", "revoke", "ci", "-w", str(api.ws.root), "--json"], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["revoked_at"] is not None
    assert call(api, "GET", "/api/v1/devices", made["token"])[0] == 401        # at once, no restart
    assert call(api, "GET", "/api/v1/devices", api.secrets["viewer"])[0] == 200  # the others still work
    assert cli(["tokens", "revoke", "ci", "-w", str(api.ws.root)], capsys)[0] == 0     # revoking twice: a no-op
    code, _, err = cli(["tokens", "revoke", "nobody", "-w", str(api.ws.root)], capsys)
    assert code == 2 and err.count("\n") == 1 and "no token" in err


def test_cli_prints_a_token_once_and_lists_none(api, capsys):
    code, out, _ = cli(["tokens", "create", "--name", "ops-laptop", "--role", "operator", "-w", str(api.ws.root)],
                       capsys)
    secret = out.strip().splitlines()[-1]
    assert code == 0 and secret.startswith("edgeloop_")
    assert call(api, "POST", "/api/v1/rollouts", secret, body=SPEC)[0] == 201
    code, out, _ = cli(["tokens", "ls", "-w", str(api.ws.root)], capsys)
    assert code == 0 and "ops-laptop" in out and "operator" in out and secret not in out
    code, out, _ = cli(["tokens", "ls", "-w", str(api.ws.root), "--json"], capsys)
    assert secret not in out and len(json.loads(out.splitlines()[-1])["tokens"]) == 4
    code, _, err = cli(["tokens", "create", "--name", "ops-laptop", "--role", "viewer", "-w", str(api.ws.root)],
                       capsys)
    assert code == 2 and "already named" in err
    assert cli(["tokens", "create", "--name", "x", "--role", "god", "-w", str(api.ws.root)], capsys)[0] == 2


def test_a_token_with_a_lifetime_stops_working_when_it_ends(api, capsys):
    status, made = call(api, "POST", "/api/v1/tokens", api.secrets["admin"],
                        body={"name": "short", "role": "viewer", "expires_in_s": 1.5})
    assert status == 201 and made["expires_at"] == pytest.approx(made["created_at"] + 1.5)
    assert call(api, "GET", "/api/v1/devices", made["token"])[0] == 200
    time.sleep(1.7)
    assert call(api, "GET", "/api/v1/devices", made["token"])[0] == 401        # expired: like revoked
    for bad in (0, -5, "soon", True):
        assert call(api, "POST", "/api/v1/tokens", api.secrets["admin"],
                    body={"name": "bad", "role": "viewer", "expires_in_s": bad})[0] == 400
    code, out, _ = cli(["tokens", "create", "--name", "month", "--role", "viewer", "--expires-in", "30d",
                        "-w", str(api.ws.root), "--json"], capsys)
    made = json.loads(out.splitlines()[-1])
    assert code == 0 and made["expires_at"] - made["created_at"] == pytest.approx(30 * 86400)
    code, out, _ = cli(["tokens", "ls", "-w", str(api.ws.root)], capsys)
    assert code == 0 and "expires (UTC)" in out
    code, _, err = cli(["tokens", "create", "--name", "x", "--role", "viewer", "--expires-in", "2 weeks",
                        "-w", str(api.ws.root)], capsys)
    assert code == 2 and "not a duration" in err and "Traceback" not in err


# -- reading the fleet ------------------------------------------------------------------------------
def test_device_filters_and_detail(api):
    v = api.secrets["viewer"]
    ids = lambda q: [d["device_id"] for d in call(api, "GET", "/api/v1/devices" + q, v)[1]["devices"]]  # noqa: E731
    assert ids("") == ["gw-1", "mcu-7"]
    assert ids("?tier=mcu") == ["mcu-7"] and ids("?tag=site=berlin") == ["gw-1"] and ids("?group=canary") == ["gw-1"]
    assert ids("?state=committed") == ["gw-1"] and ids("?online=true") == ["gw-1"] and ids("?online=false") == ["mcu-7"]
    assert ids("?tag=site=berlin&tier=mcu") == []
    assert call(api, "GET", "/api/v1/devices?colour=red", v)[0] == 400
    assert call(api, "GET", "/api/v1/devices?online=maybe", v)[0] == 400
    status, d = call(api, "GET", "/api/v1/devices/mcu-7", v)
    assert status == 200 and d["last_error"] == "health.golden: wrong outputs" and d["errors"][0]["code"] == \
        "health.golden" and d["telemetry"]["records"] == 0
    assert call(api, "GET", "/api/v1/devices/ghost", v)[0] == 404


def test_remote_cli_lists_the_same_devices_as_the_local_workspace(api, capsys):
    remote = ["--server", api.url, "--token", api.secrets["viewer"], "--json"]
    local = ["-w", str(api.ws.root), "--json"]
    for argv in (["devices"], ["devices", "ls", "--tag", "site=paris"], ["devices", "--online"], ["models", "ls"]):
        code_r, out_r, err_r = cli([*argv, *remote], capsys)
        code_l, out_l, _ = cli([*argv, *local], capsys)
        assert code_r == code_l == 0, err_r
        r, l = json.loads(out_r.splitlines()[-1]), json.loads(out_l.splitlines()[-1])
        key = "devices" if argv[0] == "devices" else "model_versions"
        assert [x.get("device_id") for x in r[key]] == [x.get("device_id") for x in l[key]]
        if key == "devices":
            assert r[key] and {x["device_id"]: x["tier"] for x in r[key]} == {x["device_id"]: x["tier"] for x in l[key]}
    code, out, _ = cli(["devices", "show", "gw-1", *remote], capsys)
    assert code == 0 and json.loads(out.splitlines()[-1])["model_version"] == "digits-mlp:1"
    code, out, _ = cli(["devices", "--server", api.url, "--token", api.secrets["viewer"]], capsys)
    assert code == 0 and "gw-1" in out and "mcu-7" in out                   # the same table as locally


def test_remote_cli_token_from_the_environment_and_its_refusals(api, capsys, monkeypatch):
    monkeypatch.setenv("EDGELOOP_TOKEN", api.secrets["viewer"])
    assert cli(["devices", "--server", api.url, "--json"], capsys)[0] == 0
    monkeypatch.setenv("EDGELOOP_TOKEN", "edgeloop_wrong")
    code, out, err = cli(["devices", "--server", api.url], capsys)
    assert code == 2 and err.count("\n") == 1 and "HTTP 401" in err and "Traceback" not in err
    monkeypatch.delenv("EDGELOOP_TOKEN")
    assert "needs an API token" in cli(["devices", "--server", api.url], capsys)[2]
    code, _, err = cli(["devices", "--server", f"http://127.0.0.1:{free_port()}", "--token", "edgeloop_x"], capsys)
    assert code == 3 and "cannot reach" in err
    code, _, err = cli(["devices", "show", "ghost", "--server", api.url, "--token", api.secrets["viewer"]], capsys)
    assert code == 2 and "no device" in err
    code, _, err = cli(["devices", "enroll", "x-1", "--server", api.url, "--token", api.secrets["admin"]], capsys)
    assert code == 2 and "--server works with" in err and not api.fleet.enrolled("x-1")


def test_bad_rollouts_are_refused_by_the_real_controller_and_change_nothing(tmp_path, monkeypatch):
    from edgeloop.cloud.rollouts.controller import RolloutController

    monkeypatch.setenv("EDGELOOP_KEY_PASSPHRASE", "api-tests")
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    fleet = FleetRegistry(registry)
    identity.enroll(ws, fleet, Enrolment("gw-1", tier="edge-gateway"))
    sent: list[Any] = []
    ctl = RolloutController(ws, registry, lambda device_id, command: sent.append(device_id),
                            repository_url="http://127.0.0.1:1/repository")
    op = TokenStore(registry).create("op", "operator")[1]
    server = ApiServer(registry, "127.0.0.1", free_port(), rollouts=ctl).start()
    env = SimpleNamespace(url=server.url)
    try:
        for body, code, text in (({"model_version": "digits-mlp:9", "target": "tier=edge-gateway"}, 404,
                                  "no model version 'digits-mlp:9'"),
                                 ({"model_version": "digits-mlp:9", "target": "tier=edge-gateway",
                                   "strategy": "canary"}, 400, "canary")):
            status, answer = call(env, "POST", "/api/v1/rollouts", op, body=body)
            assert status == code and text in answer["error"], answer
        assert call(env, "GET", "/api/v1/rollouts", op) == (200, {"rollouts": []})
        assert call(env, "GET", "/api/v1/rollouts/ro-nosuch", op)[0] == 404
        assert sent == [] and ctl.list() == []
    finally:
        server.stop()
        registry.close()
