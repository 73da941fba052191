"""edgeloop: train, quantize, package per hardware tier, signed OTA over MQTT, telemetry and drift.

The repository keeps one folder per part (``cloud/``, ``fleet/``, ``device_sdk/``, ``edge/``,
``kernels/``, ``contracts/``, ``simulators/``); installed, they are the subpackages of this one
import package (``edgeloop.cloud``, ``edgeloop.device_sdk``, ...), so that none of their generic
names lands in site-packages beside other software (pyproject.toml maps them with
``package-dir``). Run from a source checkout without installing, the folders beside this one
are found through ``__path__``.
"""

from __future__ import annotations

from pathlib import Path as _Path

__all__ = ["PARTS", "__version__"]

# the repository folders that are, installed, edgeloop.<part> (pyproject.toml maps them)
PARTS = ("cloud", "fleet", "device_sdk", "edge", "kernels", "contracts", "simulators")

_here = _Path(__file__).resolve().parent
if not (_here / "cloud").is_dir() and (_here.parent / "cloud" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 - a source checkout: its top-level folders are our subpackages


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed metadata on first use: importlib.metadata costs
    tens of milliseconds, and every ``edgeloop`` command imports this package."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import metadata

    try:
        version = metadata.version("edgeloop")
    except metadata.PackageNotFoundError:  # pragma: no cover - a checkout that was never installed
        version = "0+unknown"
    globals()["__version__"] = version
    return version
