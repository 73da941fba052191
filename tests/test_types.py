"""The typed public surface: mypy is clean on contracts/ and device_sdk/ (pyproject's [tool.mypy])."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed (pip install .[dev])")
def test_mypy_is_clean_on_contracts_and_device_sdk():
    run = subprocess.run([sys.executable, "-m", "mypy", "contracts", "device_sdk"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "Success" in run.stdout


def test_parse_by_expected_type_is_typed_and_refuses_other_kinds():
    from contracts.errors import SchemaError
    from contracts.messages import Status, TelemetryAck, encode, parse

    raw = encode(TelemetryAck("dev-1", [1, 2], []))
    ack = parse(raw, TelemetryAck)
    assert isinstance(ack, TelemetryAck) and ack.seqs == [1, 2]
    with pytest.raises(SchemaError):
        parse(raw, Status)
