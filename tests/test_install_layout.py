"""Installed, edgeloop is one import package: its folders never land in site-packages as
generic top-level names (``kernels`` is a popular PyPI package; ``cloud``, ``fleet`` and ``edge``
are common too). Built here as a real wheel and installed beside a package named ``kernels``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
from edgeloop import PARTS


def test_every_folder_with_code_is_listed_as_an_installed_package() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {"edgeloop"} | {"edgeloop." + ".".join(p.parent.relative_to(ROOT).parts)
                              for part in PARTS for p in (ROOT / part).rglob("__init__.py")}
    assert set(config["packages"]) == on_disk
    assert config["package-dir"] == {"edgeloop": "edgeloop", **{f"edgeloop.{p}": p for p in PARTS}}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    return next(out.glob("edgeloop-*.whl"))


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"edgeloop"}
    assert "edgeloop/cloud/package/tiers/mcu.toml" in names and "edgeloop/kernels/aot/c/edgeloop_kernels.c" in names


def test_edgeloop_imports_beside_another_package_named_kernels(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'the other kernels'\n")
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import kernels, edgeloop.kernels.aot, edgeloop.kernels.int8_reference, edgeloop.cloud.package.tiers, "
            "edgeloop.contracts.messages\n"
            "assert kernels.WHO == 'the other kernels', kernels.__file__\n"
            "print(edgeloop.kernels.aot.__file__)\n"
            "print(edgeloop.cloud.package.tiers.__file__)")
    # -I: no user site, no cwd on the path (the checkout must not shadow what was installed)
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); exec({code!r})"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(line.startswith(str(site)) for line in result.stdout.split()), result.stdout
