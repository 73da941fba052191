"""Data sets: loading, content hashing, deterministic splits.

Three formats, each one example per row of ``x`` (always flat float32, row-major order of one
example, with the per-example ``input_shape`` and ``layout`` kept beside it):

- **CSV**: one file (optionally gzip-compressed), or a folder of them whose rows are
  concatenated in file-name order: the feature columns first, the label last;
- **NumPy** ``.npz``: arrays ``x`` ``(n, ...)`` (up to 4 axes per example) and ``y`` ``(n,)``,
  optionally 0-d strings ``layout`` and ``task`` and a 1-d ``label_names``;
- **image folders**: one subfolder per class (sorted names give the labels), each holding
  PNG/JPEG/PGM/PPM/BMP images of one size and mode; grayscale -> ``(1, H, W)``, RGB ->
  ``(3, H, W)``, layout ``NCHW``, pixel values 0-255.

Labels depend on the task: class indices (classification), 0 normal / 1 anomalous (anomaly),
any finite number (regression). Its identity is a sha256: of the file's bytes for one file; for a folder, of
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

from edgeloop.cloud.errors import NotFound, UserError

__all__ = ["Dataset", "Split", "load_dataset", "default_dataset_path", "TASKS", "LAYOUTS"]

TASKS = ("classification", "regression", "anomaly")
LAYOUTS = ("flat", "NCHW", "NHWC", "NCL", "NLC")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".bmp")


def default_dataset_path() -> Path:
    return Path(str(resources.files("edgeloop.cloud.data") / "digits" / "digits.csv.gz"))


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
    input_shape: tuple[int, ...] = ()           # per example; () means (n_features,)
    layout: str = "flat"
    task: str = "classification"
    label_names: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.input_shape or (int(self.x.shape[1]),)

    @property
    def schema(self) -> dict:
        return {"features": int(self.x.shape[1]), "feature_dtype": "float32",
                "label": "float32" if self.task == "regression" else "int64",
                "classes": self.n_classes, "rows": int(len(self.y)), "input_shape": list(self.shape),
                "layout": self.layout, "task": self.task, "label_names": list(self.label_names)}

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


def load_dataset(path: Path | None = None, name: str | None = None, task: str | None = None) -> Dataset:
    """Load a data set: a CSV file or folder, an ``.npz`` file, or an image folder. ``task``
    decides how labels read (default: what an ``.npz`` declares, else classification).
    Raises NotFound or UserError (one line naming the file and the problem)."""
    if task is not None and task not in TASKS:
        raise UserError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    path = Path(path) if path is not None else default_dataset_path()
    if not path.exists():
        raise NotFound(f"data set not found: {path}")
    if path.is_file() and (path.suffix == ".npz" or _is_zip(path)):
        return _load_npz(path, name, task)
    if path.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        if any(p.is_file() and p.name.endswith((".csv", ".csv.gz")) for p in path.iterdir()):
            raise UserError(f"data set folder {path} mixes CSV files and class subfolders; use one or the other")
        return _load_image_folder(path, name, task)
    return _load_csv(path, name, task or "classification")


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _labels(path: Path, y: np.ndarray, task: str) -> tuple[np.ndarray, int]:
    """Labels checked for the task: (y, n_classes)."""
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(y)):
        raise UserError(f"{path}: labels must be finite numbers")
    if task == "regression":
        return y.astype(np.float32), 0
    if np.any(y != np.round(y)) or (len(y) and y.min() < 0):
        raise UserError(f"{path}: {task} labels must be non-negative whole numbers"
                        + (" (use --task regression for a numeric target)" if task == "classification" else ""))
    if task == "anomaly" and len(y) and y.max() > 1:
        raise UserError(f"{path}: anomaly labels must be 0 (normal) or 1 (anomalous), found {int(y.max())}")
    yi = y.astype(np.int64)
    return yi, (2 if task == "anomaly" else int(yi.max()) + 1 if len(yi) else 0)


def _check_rows(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise UserError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    if len(x) < 10:
        raise UserError(f"{path} needs at least 10 rows, has {len(x)}")
    if not np.all(np.isfinite(x)):
        raise UserError(f"{path} holds missing or non-finite values")


def _load_npz(path: Path, name: str | None, task: str | None) -> Dataset:
    raw = path.read_bytes()
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as e:
        raise UserError(f"{path}: an array in it is not plain numbers or text (pickled objects are refused): "
                        f"{str(e).splitlines()[0][:120]}") from None
    except (OSError, EOFError, KeyError, Exception) as e:  # noqa: BLE001 - a corrupt zip raises many kinds
        raise UserError(f"{path} is not a readable .npz file: {type(e).__name__}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(f"{path} has no array {key!r} (it needs x of shape (n, ...) and y of shape (n,))")
    x, y = arrays["x"], arrays["y"]
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise UserError(f"{path}: x and y must hold numbers (x is {x.dtype}, y is {y.dtype})")
    if x.ndim < 2 or x.ndim > 5:
        raise UserError(f"{path}: x must have shape (n, ...) with 1 to 4 axes per example, got {x.shape}")
    if y.ndim != 1:
        raise UserError(f"{path}: y must have shape (n,), got {y.shape}")
    declared = _text(arrays, "task", path)
    if declared is not None and declared not in TASKS:
        raise UserError(f"{path} declares unknown task {declared!r}; tasks: {', '.join(TASKS)}")
    task = task or declared or "classification"
    shape = tuple(int(d) for d in x.shape[1:])
    layout = _text(arrays, "layout", path) or {1: "flat", 2: "NCL", 3: "NCHW"}.get(len(shape), "flat")
    want = {"flat": 1, "NCHW": 3, "NHWC": 3, "NCL": 2, "NLC": 2}.get(layout)
    if want is None or (layout != "flat" and want != len(shape)) or (layout == "flat" and len(shape) != 1):
        raise UserError(f"{path}: layout {layout!r} does not fit examples of shape {shape} "
                        f"(layouts: {', '.join(LAYOUTS)})")
    flat = x.reshape(len(x), -1).astype(np.float32)
    _check_rows(path, flat, y)
    labels, n_classes = _labels(path, y, task)
    names = tuple(str(v) for v in arrays["label_names"].reshape(-1)) if "label_names" in arrays else ()
    digest = hashlib.sha256(raw).hexdigest()
    return Dataset(name=name or path.name.split(".")[0], path=path, sha256=digest, x=flat, y=labels,
                   n_classes=max(n_classes, len(names)) if task == "classification" else n_classes,
                   files=((path.name, digest),), input_shape=shape if len(shape) > 1 else (), layout=layout,
                   task=task, label_names=names)


def _text(arrays: dict[str, np.ndarray], key: str, path: Path) -> str | None:
    if key not in arrays:
        return None
    v = arrays[key]
    if v.dtype.kind not in "US" or v.ndim != 0:
        raise UserError(f"{path}: {key!r} must be one string")
    return str(v)


def _load_image_folder(path: Path, name: str | None, task: str | None) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    if task == "regression":
        raise UserError(f"{path}: an image folder's labels are its class subfolders; regression needs an .npz")
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise UserError(f"image folder {path} needs at least 2 class subfolders, found {len(classes)}")
    rows, labels, files, first = [], [], [], None
    for label, folder in enumerate(classes):
        images = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        if not images:
            raise UserError(f"class folder {folder} holds no images")
        for img_path in images:
            rel = img_path.relative_to(path).as_posix()
            if not img_path.is_file() or img_path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{rel} in image folder {path} is not an image ({', '.join(IMAGE_SUFFIXES)})")
            raw = img_path.read_bytes()
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    im.load()
                    mode, size = im.mode, im.size
                    if mode not in ("L", "RGB"):
                        im = im.convert("RGB")
                        mode = "RGB"
                    pixels = np.asarray(im, dtype=np.float32)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                raise UserError(f"{rel} in image folder {path} is not a readable image: "
                                f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
            if first is None:
                first = (mode, size)
            elif (mode, size) != first:
                raise UserError(f"{rel} is {size[0]}x{size[1]} {mode}; the images of {path} are "
                                f"{first[1][0]}x{first[1][1]} {first[0]}: all must have one size and mode")
            chw = pixels[None, :, :] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
            rows.append(chw.reshape(-1))
            labels.append(label)
            files.append((rel, hashlib.sha256(raw).hexdigest()))
    x = np.stack(rows).astype(np.float32)
    y = np.asarray(labels, dtype=np.int64)
    _check_rows(path, x, y)
    channels = 1 if first[0] == "L" else 3
    shape = (channels, first[1][1], first[1][0])
    digest = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in files).encode()).hexdigest()
    return Dataset(name=name or path.name, path=path, sha256=digest, x=x, y=y,
                   n_classes=2 if task == "anomaly" else len(classes), files=tuple(files), input_shape=shape,
                   layout="NCHW", task=task or "classification", label_names=tuple(c.name for c in classes))


def _load_csv(path: Path, name: str | None, task: str) -> Dataset:
    """A CSV data set (a file or a folder of files)."""
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
    if task == "classification" and (np.any(labels != np.round(labels)) or labels.min() < 0):
        raise UserError(f"{path}: the last column must hold non-negative integer class labels "
                        "(use --task regression for a numeric target)")
    if not np.all(np.isfinite(table)):
        raise UserError(f"{path} holds missing or non-finite values")
    y, n_classes = _labels(path, labels, task)
    if len(files) == 1 and not path.is_dir():
        digest = files[0][1]
    else:
        digest = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in files).encode()).hexdigest()
    return Dataset(name=name or path.name.split(".")[0], path=path, sha256=digest,
                   x=table[:, :-1].astype(np.float32), y=y, n_classes=n_classes, files=tuple(files), task=task)
