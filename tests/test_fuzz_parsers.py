"""Property-based tests: every parser of untrusted input raises only the project's own errors,
on 1,000 generated inputs each (tests/fuzz_targets.py; bench/fuzz_parsers.py runs 100,000)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_targets import TARGETS, Target


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_parser_raises_only_its_own_errors(target: Target) -> None:
    @settings(max_examples=1000, deadline=None, database=None, derandomize=True,
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
