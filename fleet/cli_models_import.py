"""``edgeloop models import FILE --name NAME --data DATA``: a model trained elsewhere (ONNX,
TorchScript, torch.export ``.pt2`` or ``.tflite``) registered as a model version, with its
feature contract, task and test metrics on DATA (cloud/package/importing.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from edgeloop.fleet._output import Output

__all__ = ["add_models_import"]


def add_models_import(models: Any, action: Callable) -> None:
    p = action(models, "import", "register a model trained elsewhere (ONNX, TorchScript, torch.export .pt2, "
                                 ".tflite) as a model version, checked on a data set", _import)
    p.add_argument("file", type=Path, metavar="FILE", help="the model file; its format is read from its content")
    p.add_argument("--name", required=True, help="model name; the import becomes its next version")
    p.add_argument("--data", required=True, metavar="NAME[:V]|PATH",
                   help="registered data set, or a file/folder (registered on the way): the feature contract, "
                        "task and test metrics come from it")
    p.add_argument("--task", choices=["classification", "regression", "anomaly"],
                   help="what the model predicts; default: what the data set declares (classification for CSV)")
    p.add_argument("--preprocess", choices=["standardize", "none"], default="standardize",
                   help="standardize: the model takes inputs standardized as training would (scale by the "
                        "training maximum, then per-feature mean/std); none: raw values (default: standardize)")
    p.add_argument("--threshold", type=float, help="anomaly: the score above which a row is anomalous "
                                                   "(default: chosen on the validation split's normal rows)")


def _import(args: argparse.Namespace, out: Output) -> int:
    from edgeloop.cloud.package.importing import import_model
    from edgeloop.cloud.registry import Registry
    from edgeloop.cloud.workspace import Workspace
    from edgeloop.fleet.cli import quality_line

    ws = Workspace.open(args.workspace).with_mqtt(args.mqtt)
    r = import_model(ws, Registry(ws.store_location), args.file, args.name, args.data, task=args.task,
                     preprocess=args.preprocess, threshold=args.threshold)
    onnx = f"ONNX {r['onnx_sha256'][:12]}" if r["onnx_sha256"] else "no ONNX (packaged as the .tflite itself)"
    if not r["created"]:
        out.result(r, f"already imported, unchanged: {r['model_version']} (the same {r['format']} file, sha256 "
                      f"{r['source_sha256'][:12]}, on data {r['dataset_id']}); nothing registered")
        return 0
    out.result(r, f"imported {args.file} ({r['format']}{', int8' if r['int8'] else ''}, sha256 "
                  f"{r['source_sha256'][:12]}) as {r['model_version']} (run {r['run_id']}, data {r['dataset_id']}, "
                  f"{r['task']['kind']}, input {tuple(r['input_shape'])}, {onnx}): {quality_line(r['metrics'])}")
    return 0
