"""The error-code contract: every code a device can report says whether the cloud may retry it."""

from __future__ import annotations

import re
from pathlib import Path

from edgeloop.contracts.codes import RETRYABLE, ErrorCode, retryable

ROOT = Path(__file__).resolve().parent.parent


def test_every_code_is_documented_with_its_retry_decision() -> None:
    doc = (ROOT / "contracts" / "codes.py").read_text()
    for code in ErrorCode:
        row = re.search(rf"^{re.escape(code.value)}\s+(yes|no)\s", doc, re.M)
        assert row, f"{code.value} missing from the table in contracts/codes.py"
        assert (row.group(1) == "yes") == code.retryable, code


def test_transient_codes_are_retried_and_verdicts_are_not() -> None:
    assert retryable("transport.download") and retryable(ErrorCode.AGENT_INTERNAL)
    # what a mirror or the network can cause is transient; what signed metadata says is definitive
    assert retryable("verify.hash") and retryable("metadata.too_large") and retryable("metadata.corrupt")
    assert retryable("metadata.stale")
    assert not retryable("verify.metadata") and not retryable("verify.director") and not retryable("verify.tier")
    assert not retryable("package.too_large") and not retryable("health.golden")
    assert RETRYABLE < set(ErrorCode)


def test_an_unknown_or_missing_code_is_never_retried() -> None:
    assert not retryable("transport.something-new")   # no decision by prefix
    assert not retryable(None) and not retryable("")
