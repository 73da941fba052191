"""The audit log (cloud/audit.py): every operator action, taken on the workspace's CLI or through
the API, is recorded once, with the right actor (``local:<user>`` or the API token's name),
readable with ``edgeloop audit`` (filters, --json, --server) and ``GET /api/v1/audit`` (admins only)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from conftest import free_port, run_cli
from edgeloop.cloud import audit
from edgeloop.cloud.api.server import ApiServer, TokenStore
from edgeloop.cloud.rollouts.controller import RolloutController
from edgeloop.fleet import cli_audit
from test_rollouts import TIER, Sent, make_unit

REPO_URL = "http://127.0.0.1:9/repository"


@pytest.fixture
def env(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGELOOP_KEY_PASSPHRASE", "audit-tests")
    monkeypatch.delenv("EDGELOOP_TOKEN", raising=False)
    with make_unit(tmp_path) as u:
        for i in range(3):
            u.device(f"gw{i}")
        sent = Sent()
        ctl = RolloutController(u.ws, u.registry, sent, repository_url=REPO_URL)    # the wall clock
        server = ApiServer(u.registry, "127.0.0.1", free_port(), rollouts=ctl).start()
        try:
            e = SimpleNamespace(u=u, ws=str(u.ws.root), url=server.url, capsys=capsys)
            e.admin = _cli(e, "tokens", "create", "--name", "ops-admin", "--role", "admin")["token"]
            e.viewer = _cli(e, "tokens", "create", "--name", "dash", "--role", "viewer")["token"]
            yield e
        finally:
            server.stop()


def _cli(env, *argv: str) -> dict:
    code, out, err = run_cli([*argv, "-w", env.ws, "--json"], env.capsys)
    assert code == 0, (argv, err)
    return json.loads(out.splitlines()[-1])


def _api(env, method: str, path: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(env.url + "/api/v1" + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _rows(env, **filters) -> list[dict]:
    return env.u.registry.audit(**filters)


def _new(env, before: int) -> list[tuple[str, str, str]]:
    return [(r["actor"], r["action"], r["subject"]) for r in _rows(env)[before:]]


def test_each_action_on_the_cli_records_one_row_as_the_local_user(env):
    me = audit.local_actor()
    assert me.startswith("local:") and len(me) > len("local:")
    assert _new(env, 0) == [(me, "token.create", "ops-admin"), (me, "token.create", "dash")]
    steps = [
        (["rollout", "start", "m:2", "--target", f"tier={TIER}", "--repository-url", REPO_URL, "--force"],
         "rollout.start"),
        (["rollout", "pause", "RID"], "rollout.pause"),
        (["rollout", "resume", "RID"], "rollout.resume"),
        (["rollout", "abort", "RID", "--reason", "test"], "rollout.abort"),
        (["models", "promote", "m:2", "--to", "staging"], "model.promote"),
        (["models", "archive", "m:1"], "model.archive"),
        (["keys", "rotate", "targets", "--repo", "image"], "keys.rotate"),
        (["tokens", "revoke", "dash"], "token.revoke"),
    ]
    rid = None
    for argv, action in steps:
        before = len(_rows(env))
        result = _cli(env, *[rid if a == "RID" else a for a in argv])
        rid = rid or result.get("rollout_id")
        subject = {"model.promote": "m:2", "model.archive": "m:1", "keys.rotate": "image/targets",
                   "token.revoke": "dash"}.get(action, rid)
        assert _new(env, before) == [(me, action, subject)], argv
    abort = _rows(env, action="rollout.abort")[0]
    assert abort["detail"]["reason"] == "test"
    rotate = _rows(env, action="keys.rotate")[0]["detail"]
    assert rotate["root_version"] >= 2 and set(rotate["keyids"]).isdisjoint(rotate["retired"])


def test_a_refused_action_records_nothing_and_a_repeated_revocation_is_recorded_once(env, capsys):
    before = len(_rows(env))
    code, _, err = run_cli(["rollout", "pause", "ro-nosuch", "-w", env.ws], capsys)
    assert code == 2 and "ro-nosuch" in err
    _cli(env, "tokens", "revoke", "dash")
    _cli(env, "tokens", "revoke", "dash")                  # already revoked: changes nothing
    assert [r["action"] for r in _rows(env)[before:]] == ["token.revoke"]


def test_each_action_through_the_api_records_one_row_as_the_tokens_name(env):
    before = len(_rows(env))
    status, started = _api(env, "POST", "/rollouts", env.admin,
                           {"model_version": "m:2", "target": f"tier={TIER}", "force": True})
    assert status == 201, started
    rid = started["rollout_id"]
    for action in ("pause", "resume", "abort"):
        assert _api(env, "POST", f"/rollouts/{rid}/{action}", env.admin, {})[0] == 200
    status, made = _api(env, "POST", "/tokens", env.admin, {"name": "ci", "role": "operator"})
    assert status == 201
    assert _api(env, "DELETE", f"/tokens/{made['token_id']}", env.admin)[0] == 200
    assert _new(env, before) == [("ops-admin", "rollout.start", rid), ("ops-admin", "rollout.pause", rid),
                                 ("ops-admin", "rollout.resume", rid), ("ops-admin", "rollout.abort", rid),
                                 ("ops-admin", "token.create", "ci"), ("ops-admin", "token.revoke", "ci")]
    assert _rows(env, action="rollout.abort")[0]["detail"]["reason"] == "aborted through the API by ops-admin"


def test_audit_lists_filters_and_prints_json(env, capsys):
    audit.record(env.u.registry, "local:old", "model.promote", "m:0", {"to": "staging"}, now=time.time() - 7200)
    _cli(env, "models", "promote", "m:2", "--to", "staging")
    everything = _cli(env, "audit")["audit"]
    assert [r["action"] for r in everything] == ["model.promote", "token.create", "token.create", "model.promote"]
    assert everything[0]["actor"] == "local:old" and isinstance(everything[0]["ts"], float)
    recent = _cli(env, "audit", "--since", "1h")["audit"]
    assert [r["subject"] for r in recent] == ["ops-admin", "dash", "m:2"]
    promotions = _cli(env, "audit", "--action", "model.promote", "--since", "1h")["audit"]
    assert [(r["subject"], r["detail"]["to"]) for r in promotions] == [("m:2", "staging")]
    code, out, err = run_cli(["audit", "-w", env.ws], capsys)
    assert code == 0 and "local:old" in out and "2 h ago" in out and "model.promote" in out
    assert time.strftime("%Y-%m-%dT", time.gmtime()) in out
    code, _, err = run_cli(["audit", "-w", env.ws, "--action", "nosuch"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err


def test_audit_over_the_api_is_for_admins_and_works_with_server(env, capsys, monkeypatch):
    _cli(env, "models", "archive", "m:1")
    assert _api(env, "GET", "/audit", env.viewer)[0] == 403
    status, body = _api(env, "GET", "/audit?action=model.archive", env.admin)
    assert status == 200 and [(r["actor"], r["subject"]) for r in body["audit"]] == [(audit.local_actor(), "m:1")]
    assert _api(env, "GET", "/audit?since=yesterday", env.admin)[0] == 400
    remote = _cli(env, "audit", "--server", env.url, "--token", env.admin, "--since", "1h")["audit"]
    assert remote == _rows(env, since=time.time() - 3600)
    code, _, err = run_cli(["audit", "-w", env.ws, "--server", env.url, "--token", env.viewer], capsys)
    assert code == 2 and "403" in err and err.count("\n") == 1


def test_the_cli_knows_every_action_without_importing_the_cloud():
    assert cli_audit.ACTIONS == audit.ACTIONS
