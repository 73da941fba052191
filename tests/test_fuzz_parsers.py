"""Property-based tests: every parser of untrusted input raises only the project's own errors,
on 300 generated inputs each, the same ones every run (tests/fuzz_targets.py;
bench/fuzz_parsers.py runs 100,000 each, freshly drawn)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_targets import TARGETS, Target


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_parser_raises_only_its_own_errors(target: Target) -> None:
    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(target.strategy)
    def check(payload: object) -> None:
        try:
            target.parse(payload)
        except target.allowed:
            pass

    check()


def test_a_delta_op_naming_its_source_with_a_list_is_refused_not_a_crash() -> None:
    """Found by bench/fuzz_parsers.py: ``op[0] in sources`` raised TypeError (unhashable list)."""
    import hashlib
    import json
    import struct
    import zlib

    from edgeloop.contracts.delta import FORMAT, apply_delta
    from edgeloop.contracts.errors import SchemaError
    body = {"format": FORMAT, "base_sha256": hashlib.sha256(b"base").hexdigest(), "target_sha256": "0" * 64,
            "target_length": 1, "ops": [[["copy"], 0, 1]]}
    header = json.dumps(body).encode()
    with pytest.raises(SchemaError, match="malformed delta op"):
        apply_delta(b"base", zlib.compress(struct.pack(">I", len(header)) + header))


@pytest.mark.parametrize("body", [
    b"[" * 5000 + b"]" * 5000,                                   # RecursionError in json.loads
    b'{"model_version": "m:1", "target": "tier=x", "retries": 1' + b"0" * 5000 + b"}",   # int over 4300 digits
    b'{"model_version": "m:1", "target": "tier=x", "retries": "2"}',   # TypeError in validate()
    b'{"model_version": "m:1", "target": "tier=x", "bake_s": [1]}',
    b'{"model_version": "m:1", "target": "tier=x", "min_devices": true}',
])
def test_rollout_bodies_found_by_fuzzing_are_refused_as_bad_input(body: bytes) -> None:
    from edgeloop.cloud.api.server import _spec, parse_body
    from edgeloop.cloud.errors import UserError
    with pytest.raises(UserError):
        _spec(parse_body(body))


def test_a_token_lifetime_too_large_for_a_float_is_refused_as_bad_input() -> None:
    from edgeloop.cloud.api.server import parse_body, token_request
    from edgeloop.cloud.errors import UserError
    with pytest.raises(UserError, match="expires_in_s"):
        token_request(parse_body(b'{"name": "a", "role": "viewer", "expires_in_s": 1' + b"0" * 400 + b"}"))


@pytest.mark.parametrize("text", ["pipeline = 1\n", "train = 'fast'\n[pipeline]\nname = 'x'\n",
                                  "[pipeline]\nname = 'x'\n[package]\ntiers = 3\n[train]\nepochs = 'many'\n",
                                  "[pipeline]\nname = 'x'\n[rollout]\ntarget = 'tier=x'\nretries = [1]\n",
                                  "[pipeline]\nname = 'x'\n[train]\nepochs = " + "[" * 3000 + "]" * 3000 + "\n"])
def test_pipeline_files_found_by_fuzzing_are_refused_as_bad_input(text: str) -> None:
    from pathlib import Path

    from edgeloop.cloud.errors import UserError
    from edgeloop.cloud.loop.closed_loop import parse_pipeline
    with pytest.raises(UserError):
        parse_pipeline(text.encode(), Path("p.toml"))


@pytest.mark.parametrize("canary", ["\u2788", "1" * 5000, "\u0663%", "5" * 20 + "%"])
def test_canary_values_found_by_fuzzing_are_refused_as_bad_input(canary: str) -> None:
    """Found by bench/fuzz_parsers.py: ``"➈".isdigit()`` is True but ``int("➈")`` raises ValueError."""
    import json as _json

    from edgeloop.cloud.api.server import _spec, parse_body
    from edgeloop.cloud.errors import UserError
    body = {"model_version": "m:1", "target": "tier=x", "strategy": "canary", "canary": canary}
    with pytest.raises(UserError, match="canary"):
        _spec(parse_body(_json.dumps(body).encode()))
