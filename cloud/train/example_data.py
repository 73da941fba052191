"""Real example data sets that ship inside installed packages, written as ``.npz`` on demand.

Nothing is downloaded: scikit-learn carries the diabetes and breast cancer data inside its
wheel, and edgeloop ships the UCI 8x8 digits (``cloud/data/digits``, CC BY 4.0).

==============  ==============  ====================================================================
name            task            what it is
==============  ==============  ====================================================================
diabetes        regression      442 patients, 10 baseline variables; the target is disease
                                progression one year later (Efron et al. 2004)
breast-cancer   classification  569 tumours, 30 features of cell nuclei; malignant or benign
                                (Wisconsin diagnostic data)
digits-images   classification  the 1,797 digits read as 1x8x8 images (layout NCHW)
digits-anomaly  anomaly         the 1,797 digits, flat; the digit 7 is the anomaly (label 1), the other digits
                                are normal (label 0). The detector trains on normal rows only.
==============  ==============  ====================================================================

:func:`write_example` is byte-deterministic (the same file every time), so a data set written
twice has one content hash; it never overwrites a different file at the same path.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from edgeloop.cloud.errors import UserError
from edgeloop.cloud.examples import EXAMPLE_DATA

__all__ = ["EXAMPLE_DATA", "write_example", "write_npz", "example_arrays"]

def _diabetes() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    return {"x": d.data.astype(np.float32), "y": d.target.astype(np.float32), "task": np.array("regression")}


def _breast_cancer() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return {"x": d.data.astype(np.float32), "y": d.target.astype(np.int64), "task": np.array("classification"),
            "label_names": np.array([str(n) for n in d.target_names])}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from edgeloop.cloud.train.datasets import load_dataset

    d = load_dataset()
    return d.x, d.y


def _digits_images() -> dict[str, np.ndarray]:
    x, y = _digits()
    return {"x": x.reshape(len(x), 1, 8, 8), "y": y, "layout": np.array("NCHW"), "task": np.array("classification")}


def _digits_anomaly() -> dict[str, np.ndarray]:
    x, y = _digits()
    return {"x": x, "y": (y == 7).astype(np.int64), "task": np.array("anomaly"),
            "label_names": np.array(["normal", "anomaly"])}


_MAKERS: dict[str, Callable[[], dict[str, np.ndarray]]] = {
    "diabetes": _diabetes, "breast-cancer": _breast_cancer, "digits-images": _digits_images,
    "digits-anomaly": _digits_anomaly,
}


def example_arrays(name: str) -> dict[str, np.ndarray]:
    if name not in _MAKERS:
        raise UserError(f"unknown example data set {name!r}; known: {', '.join(sorted(_MAKERS))}")
    return _MAKERS[name]()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz with fixed member order and timestamps: the same arrays give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(arrays[key], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def write_npz(arrays: dict[str, np.ndarray], path: Path, overwrite: bool = False) -> Path:
    """Write ``arrays`` as a byte-deterministic ``.npz`` at ``path`` (atomically). The same bytes
    already there: nothing to do. Different bytes there: UserError unless ``overwrite``."""
    data = _npz_bytes(arrays)
    path = Path(path)
    if path.exists():
        if path.read_bytes() == data:
            return path
        if not overwrite:
            raise UserError(f"{path} exists with other contents; move it away or write the example elsewhere")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def write_example(name: str, dest_dir: Path) -> Path:
    """Write the example data set ``name`` to ``dest_dir/<name>.npz`` and return its path. The
    same bytes already there: nothing to do. Different bytes there: UserError, nothing written."""
    arrays = example_arrays(name)
    return write_npz(arrays, Path(dest_dir) / f"{name}.npz")
