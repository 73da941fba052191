"""Which builtin operators the installed TensorFlow Lite Micro can run, read from its build.

TFLM registers an operator through a ``tflite::Register_<NAME>()`` function (or
``tflite::micro::Register_<NAME>()``) linked into its interpreter; the Python runtime's op
resolver adds every builtin it links. So the builtin operators this TFLM runs are the
``Register_<NAME>`` symbols in its ``_runtime.so`` whose NAME is a TFLite builtin operator
(``BuiltinOperator`` in the schema that ships with LiteRT). Kernel variants (``_INT8``,
``_REF``) and TFLM's signal-library custom operators are not builtin names and drop out.

The list is the tier's operator check (``supported_ops = "tflite-micro"`` in a tier profile),
so it follows the installed TFLM rather than a hand-written list.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

__all__ = ["tflm_builtin_operators", "tflm_library_path", "FROM_RUNTIME"]

FROM_RUNTIME = "tflite-micro"      # a tier profile's supported_ops that means: read them from TFLM
_SYMBOL = re.compile(rb"Register_([A-Z][A-Z0-9_]*[A-Z0-9])Ev")


def tflm_library_path() -> Path:
    """The installed TFLM interpreter's shared library (found without loading it)."""
    import importlib.util

    spec = importlib.util.find_spec("tflite_micro")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("TFLite Micro (the tflite-micro package) is not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / "python" / "tflite_micro"
    found = sorted(folder.glob("_runtime*.so"))
    if not found:
        raise FileNotFoundError(f"no TFLM _runtime shared library in {folder}")
    return found[0]


@lru_cache(maxsize=1)
def tflm_builtin_operators() -> tuple[str, ...]:
    """The builtin operators the installed TFLM registers, sorted."""
    from edgeloop.kernels.aot._graph import builtin_operator_names

    symbols = {m.decode() for m in _SYMBOL.findall(tflm_library_path().read_bytes())}
    return tuple(sorted(symbols & set(builtin_operator_names().values())))
