"""Users' own PyTorch models, entered by reference: ``path/to/file.py:build_model`` or ``package.module:fn``.

The builder is called as ``fn(input_shape, n_outputs)`` and must return an ``nn.Module`` that
maps a batch of inputs ``(n, *input_shape)`` (float32, after the feature contract) to
``(n, n_outputs)``:

- classification: *logits* (edgeloop adds the softmax to the exported graph);
- regression: the target in standardized units (edgeloop trains on the standardized target and
  adds the inverse transform to the exported graph, so devices see real units);
- anomaly: a reconstruction of its input, same shape (edgeloop exports the per-row mean squared
  reconstruction error as the model's one output, the anomaly score).

The same file may define a training hook ``training_step(model, x, y) -> loss`` (a scalar
tensor); edgeloop's trainer then uses it instead of its own loss for the task, and keeps
everything else (optimizer, batches, distributed data parallel, checkpoints, reproducibility).

A run records the definition by content: the file's sha256 and a copy of its source in the
workspace's artifacts, so a version can be packaged later even if the file moved, and
``edgeloop reproduce`` says when the file changed since the run. Errors (``UserError``, exit
2): a reference without ``:``, a file or module that does not exist or does not import, a name
that is not a callable, a builder that raises or returns something other than an ``nn.Module``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from edgeloop.cloud.errors import UserError

__all__ = ["ModelDef", "load_model_def", "model_def_from_source", "names_a_file"]


@dataclass(frozen=True)
class ModelDef:
    ref: str                    # what the user wrote
    function: str               # the builder's name in the module
    source: bytes               # the module's source, as loaded
    sha256: str                 # of ``source``
    module: types.ModuleType

    @property
    def builder(self) -> Callable[..., Any]:
        return getattr(self.module, self.function)

    @property
    def training_step(self) -> Callable[..., Any] | None:
        step = getattr(self.module, "training_step", None)
        return step if callable(step) else None

    def build(self, input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
        try:
            model = self.builder(tuple(input_shape), int(n_outputs))
        except Exception as e:  # noqa: BLE001 - user code raises anything; the operator gets one line
            raise UserError(f"model definition {self.ref} raised {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''} when called as "
                            f"{self.function}(input_shape={tuple(input_shape)}, n_outputs={n_outputs})") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"model definition {self.ref} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def record(self) -> dict[str, Any]:
        return {"ref": self.ref, "function": self.function, "sha256": self.sha256}


def _split(ref: str) -> tuple[str, str]:
    where, sep, function = ref.rpartition(":")
    if not sep or not where or not function.isidentifier():
        raise UserError(f"model definition {ref!r} must be FILE.py:FUNCTION or MODULE:FUNCTION "
                        "(for example models/cnn.py:build_model)")
    return where, function


def names_a_file(where: str) -> bool:
    """The part before ``:FUNCTION`` is a file path (``x.py``, ``dir/x``), not a module name."""
    return where.endswith(".py") or "/" in where


# run records made before edgeloop became one import package name the shipped examples so
_MOVED = {"cloud.examples.models": "edgeloop.cloud.examples.models"}


def load_model_def(ref: str) -> ModelDef:
    """Import a model definition by reference. Raises UserError with one line."""
    where, function = _split(ref)
    if names_a_file(where) or Path(where).exists():
        path = Path(where)
        if not path.is_file():
            raise UserError(f"model definition file not found: {where}")
        try:
            source = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read model definition {where}: {e.strerror}") from None
        module = _exec(source, f"edgeloop_user_model_{hashlib.sha256(source).hexdigest()[:12]}", ref, path)
    else:
        where = _MOVED.get(where, where)
        try:
            module = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot import model definition module {where}: {type(e).__name__}: {e}") from None
        try:
            source = Path(module.__file__ or "").read_bytes()
        except OSError:
            raise UserError(f"model definition module {where} has no readable source file") from None
    return _finish(ref, function, source, module)


def model_def_from_source(ref: str, source: bytes) -> ModelDef:
    """The definition a run recorded, rebuilt from its stored source (not from the user's file)."""
    _, function = _split(ref)
    module = _exec(source, f"edgeloop_user_model_{hashlib.sha256(source).hexdigest()[:12]}", ref, None)
    return _finish(ref, function, source, module)


def _exec(source: bytes, name: str, ref: str, path: Path | None) -> types.ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__file__ = str(path.resolve()) if path else f"<recorded {ref}>"
    try:
        code = compile(source, module.__file__, "exec")
        sys.modules[name] = module    # dataclasses and pickling look modules up by name
        exec(code, module.__dict__)   # noqa: S102 - running the user's own model code is the point
    except Exception as e:  # noqa: BLE001
        sys.modules.pop(name, None)
        raise UserError(f"model definition {ref} does not import: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    return module


def _finish(ref: str, function: str, source: bytes, module: types.ModuleType) -> ModelDef:
    fn = getattr(module, function, None)
    if fn is None:
        raise UserError(f"model definition {ref}: the module has no {function!r}")
    if not callable(fn):
        raise UserError(f"model definition {ref}: {function!r} is not a function")
    return ModelDef(ref, function, source, hashlib.sha256(source).hexdigest(), module)
