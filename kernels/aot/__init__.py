"""Ahead-of-time compiler: a fully int8 .tflite -> portable C99, bit-exact to TensorFlow Lite
Micro's reference kernels, with one statically planned arena and in-place execution.

::

    compiled = compile_tflite(model_bytes)            # CompiledModel: C sources + arena figures
    exe = build_host(compiled, workdir)               # host gcc build with a stdin/stdout harness
    outputs = run_host(exe, int8_inputs)              # (n, output size) int8

Modules: ``_graph`` (flatbuffer -> tensors and operators), ``_ops`` (one kernel call per
operator, parameters as TFLM's Prepare computes them), ``_planner`` (lifetimes, in place,
greedy arena), ``_codegen`` (model.h / model.c), ``c/`` (the kernels), ``host``.
"""

from .compiler import CompiledModel, compile_tflite
from .errors import UnsupportedByCompiler
from .host import build_host, run_host

__all__ = ["compile_tflite", "CompiledModel", "UnsupportedByCompiler", "build_host", "run_host"]
