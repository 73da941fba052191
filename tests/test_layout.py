"""The architecture rule: device code never imports cloud code; contracts import neither."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = {
    "device_sdk": {"cloud", "fleet", "edge", "simulators"},
    "edge": {"cloud", "fleet", "simulators"},
    "contracts": {"cloud", "fleet", "device_sdk", "simulators", "edge", "kernels"},
    "cloud": {"device_sdk", "fleet", "simulators"},
}
# The control plane measures packages with the device's own runtime classes and their error type
# (what it verifies is what devices run); nothing else of the device side.
ALLOWED = {("cloud", "edgeloop.device_sdk.runtime"), ("cloud", "edgeloop.device_sdk.errors")}


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_packages_import_only_what_the_architecture_allows():
    offences = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for package, banned in RULES.items() for path in (ROOT / package).rglob("*.py")
                for line, name in imports(path)
                if name.removeprefix("edgeloop.").split(".")[0] in banned and (package, name) not in ALLOWED]
    assert offences == []


def test_every_import_of_our_own_code_goes_through_the_edgeloop_package():
    """``import cloud`` works only in a checkout: installed, the folders are edgeloop's subpackages."""
    from edgeloop import PARTS as parts
    offences = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                for folder in (*parts, "bench", "tests") for path in (ROOT / folder).rglob("*.py")
                for line, name in imports(path) if name.split(".")[0] in parts]
    assert offences == []
