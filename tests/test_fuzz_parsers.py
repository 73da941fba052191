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
