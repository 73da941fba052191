"""What a training run is made of, captured so it can be rebuilt: code, environment, hardware.

- code: the git commit of the source tree and whether it had uncommitted changes, plus a
  sha256 of the training code itself (which holds even outside a git checkout);
- environment: Python, torch, numpy, onnx and onnxruntime versions, and a sha256 of every
  installed distribution's ``name==version``;
- hardware: machine, processor, CPU count, CUDA devices.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["code_record", "environment_record", "hardware_record", "TRAINING_CODE"]

SOURCE_ROOT = Path(__file__).resolve().parents[2]
TRAINING_CODE = ("cloud/train/datasets.py", "cloud/train/training.py", "cloud/train/worker.py", "cloud/train/launcher.py",
                 "cloud/package/export.py", "contracts/features.py")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def training_code_sha256() -> str:
    h = hashlib.sha256()
    for rel in TRAINING_CODE:
        h.update(rel.encode())
        h.update((SOURCE_ROOT / rel).read_bytes())
    return h.hexdigest()


def code_record() -> dict[str, Any]:
    commit = _git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status) if status is not None else None
    return {"commit": commit, "dirty": dirty, "training_code_sha256": training_code_sha256()}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def environment_record() -> dict[str, Any]:
    packages = sorted(f"{d.metadata['Name']}=={d.version}".lower() for d in md.distributions()
                      if d.metadata and d.metadata["Name"])
    return {"python": platform.python_version(), "implementation": sys.implementation.name,
            "torch": _version("torch"), "numpy": _version("numpy"), "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime"), "platform": platform.platform(),
            "packages_sha256": hashlib.sha256("\n".join(packages).encode()).hexdigest(),
            "packages": len(packages)}


def hardware_record() -> dict[str, Any]:
    cuda: list[str] = []
    try:
        import torch
        if torch.cuda.is_available():
            cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {"machine": platform.machine(), "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(), "cuda_devices": cuda}
