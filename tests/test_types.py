"""The typed public surface: mypy is clean on contracts/ and device_sdk/ (pyproject's [tool.mypy])."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


from edgeloop import PARTS


def test_mypy_is_clean_on_contracts_and_device_sdk(tmp_path):
    """mypy cannot follow setuptools' package-dir mapping, so it reads the source through a tree
    laid out as installed: edgeloop/ with the repository's folders linked in."""
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed: make install (the dev extra) installs it")
    tree = tmp_path / "edgeloop"
    tree.mkdir()
    (tree / "__init__.py").write_text((ROOT / "edgeloop" / "__init__.py").read_text())
    for part in PARTS:
        (tree / part).symlink_to(ROOT / part, target_is_directory=True)
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                          "-p", "edgeloop.contracts", "-p", "edgeloop.device_sdk"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "Success" in run.stdout


def test_parse_by_expected_type_is_typed_and_refuses_other_kinds():
    from edgeloop.contracts.errors import SchemaError
    from edgeloop.contracts.messages import Status, TelemetryAck, encode, parse

    raw = encode(TelemetryAck("dev-1", [1, 2], []))
    ack = parse(raw, TelemetryAck)
    assert isinstance(ack, TelemetryAck) and ack.seqs == [1, 2]
    with pytest.raises(SchemaError):
        parse(raw, Status)
