"""Data sets: loading, content hashing, deterministic splits.

A data set is one CSV file (optionally gzip-compressed), or a folder of them whose rows are
concatenated in file-name order: one example per row, the feature columns first, the integer
class label last. Its identity is a sha256: of the file's bytes for one file; for a folder, of
every file's name and sha256 in order (so renaming, reordering, adding or changing a file
changes it). It is recorded with every training run, so "what was this model trained on"
always has an answer.
The shipped default is the UCI 8x8 handwritten digits set (``cloud/data/digits``, CC BY 4.0).
"""

from __future__ import annotations

import gzip
import hashlib
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from cloud.errors import NotFound, UserError

__all__ = ["Dataset", "Split", "load_dataset", "default_dataset_path"]


def default_dataset_path() -> Path:
    return Path(str(resources.files("cloud.data") / "digits" / "digits.csv.gz"))


@dataclass(frozen=True)
class Split:
    x: np.ndarray       # raw features, float32 (n, n_features)
    y: np.ndarray       # int64 labels (n,)


@dataclass(frozen=True)
class Dataset:
    name: str
    path: Path
    sha256: str
    x: np.ndarray
    y: np.ndarray
    n_classes: int
    files: tuple[tuple[str, str], ...] = ()     # (file name, sha256) in load order

    @property
    def schema(self) -> dict:
        return {"features": int(self.x.shape[1]), "feature_dtype": "float32", "label": "int64",
                "classes": self.n_classes, "rows": int(len(self.y))}

    def split_indices(self, seed: int = 0, test_fraction: float = 0.2,
                      val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row indices of (train, validation, test), by a permutation fixed by ``seed``."""
        order = np.random.default_rng(seed).permutation(len(self.y))
        n_test = int(round(len(order) * test_fraction))
        n_val = int(round(len(order) * val_fraction))
        return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]

    def split(self, seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1) -> tuple[Split, Split, Split]:
        """(train, validation, test), by a permutation fixed by ``seed``."""
        train, val, test = self.split_indices(seed, test_fraction, val_fraction)
        return (Split(self.x[train], self.y[train]), Split(self.x[val], self.y[val]),
                Split(self.x[test], self.y[test]))


def _read_table(path: Path, raw: bytes) -> np.ndarray:
    text = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    try:
        return np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.float64, ndmin=2)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a numeric CSV file (features..., label): {e}") from None


def load_dataset(path: Path | None = None, name: str | None = None) -> Dataset:
    """Load a CSV data set (a file or a folder of files). Raises NotFound or UserError."""
    path = Path(path) if path is not None else default_dataset_path()
    if path.is_dir():
        members = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".csv", ".csv.gz")))
        if not members:
            raise UserError(f"data set folder {path} holds no .csv or .csv.gz files")
    elif path.exists():
        members = [path]
    else:
        raise NotFound(f"data set not found: {path}")
    tables, files = [], []
    for member in members:
        try:
            raw = member.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read data set file {member}: {e.strerror}") from None
        tables.append(_read_table(member, raw))
        files.append((member.name, hashlib.sha256(raw).hexdigest()))
    if len({t.shape[1] for t in tables}) != 1:
        raise UserError(f"the files of data set {path} have different numbers of columns")
    table = np.concatenate(tables)
    if table.shape[1] < 2 or table.shape[0] < 10:
        raise UserError(f"{path} needs at least 10 rows and 2 columns (features..., label)")
    labels = table[:, -1]
    if np.any(labels != np.round(labels)) or labels.min() < 0:
        raise UserError(f"{path}: the last column must hold non-negative integer class labels")
    if not np.all(np.isfinite(table)):
        raise UserError(f"{path} holds missing or non-finite values")
    y = labels.astype(np.int64)
    if len(files) == 1 and not path.is_dir():
        digest = files[0][1]
    else:
        digest = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in files).encode()).hexdigest()
    return Dataset(name=name or path.name.split(".")[0], path=path, sha256=digest,
                   x=table[:, :-1].astype(np.float32), y=y, n_classes=int(y.max()) + 1, files=tuple(files))
