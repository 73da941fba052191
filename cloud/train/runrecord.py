"""What a training run is made of, captured so it can be rebuilt: code, environment, hardware.

- code: the git commit of the source tree and whether it had uncommitted changes, plus a
  sha256 of the training code itself (which holds even outside a git checkout);
- environment: Python, torch, numpy, onnx and onnxruntime versions, and a sha256 of every
  installed distribution's ``name==version``;
- hardware: machine, processor, CPU count, CUDA devices;
- process: the pid and host training it, so that a run left ``running`` by a process that is
  gone (killed, crashed, its machine rebooted) is recognised: :func:`reap_orphaned_runs` marks
  it ``interrupted`` ("process N is gone") the next time the registry is opened on that host.
  Runs recorded on another host, or without a pid (before schema 4), are left as they are.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

__all__ = ["code_record", "environment_record", "hardware_record", "process_record", "process_alive",
           "reap_orphaned_runs", "interrupt_marks", "TRAINING_CODE"]

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


def process_record() -> dict[str, Any]:
    """The ``pid`` and ``host`` columns of a run this process trains."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie (killed, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True          # another user's process: alive
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True          # no /proc (not Linux): os.kill said it exists
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


class _Runs(Protocol):
    def running_runs(self) -> list[dict[str, Any]]: ...

    def interrupt_run(self, run_id: str, reason: str) -> bool: ...


def reap_orphaned_runs(store: _Runs) -> list[str]:
    """Mark ``interrupted`` every run recorded ``running`` by a process of this host that is gone.
    Returns their run ids."""
    host, reaped = socket.gethostname(), []
    for run in store.running_runs():
        pid = run.get("pid")
        if pid is None or run.get("host") != host or pid == os.getpid() or process_alive(int(pid)):
            continue
        if store.interrupt_run(run["run_id"], f"process {pid} on {host} is gone (killed or crashed while training)"):
            reaped.append(run["run_id"])
    return reaped


@contextmanager
def interrupt_marks(store: _Runs, run_id: str) -> Iterator[None]:
    """Inside: an interrupt (Ctrl-C, or SIGTERM raised as cloud.errors.Interrupted) marks the run
    ``interrupted`` with the signal as the reason before it propagates."""
    try:
        yield
    except KeyboardInterrupt as e:
        signal_name = getattr(e, "signal_name", "SIGINT")
        store.interrupt_run(run_id, f"interrupted by {signal_name}" + (" (Ctrl-C)" if signal_name == "SIGINT" else ""))
        raise
