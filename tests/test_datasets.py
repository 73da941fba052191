"""Data sets beyond one CSV (cloud/train/datasets.py): NumPy .npz, image folders, regression CSV.

Each follows what an operator does: write or bring the data, register it, register it again,
change it, register it under the same name, train from it; and the bad files a real user brings.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeloop.cloud.train.datasets import load_dataset
from edgeloop.cloud.errors import IntegrityError, UserError
from edgeloop.cloud.train.example_data import EXAMPLE_DATA, write_example
from edgeloop.cloud.loop.pipeline import register_dataset, resolve_dataset
from edgeloop.cloud.registry import Registry
from edgeloop.cloud.workspace import Workspace
from edgeloop.fleet.cli import main


@pytest.fixture
def reg(tmp_path):
    ws = Workspace.init(tmp_path / "ws")
    registry = Registry(ws.registry_path)
    yield ws, registry
    registry.close()


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _series(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3, 16)).astype(np.float32), rng.integers(0, 2, n)


# -- .npz ------------------------------------------------------------------------------------
def test_npz_keeps_shape_layout_and_task_and_hashes_the_file(tmp_path):
    x, y = _series()
    path = _npz(tmp_path / "sensors.npz", x=x, y=y, layout=np.array("NCL"), label_names=np.array(["ok", "worn"]))
    d = load_dataset(path)
    assert d.name == "sensors" and d.shape == (3, 16) and d.layout == "NCL" and d.task == "classification"
    assert d.x.shape == (40, 48) and np.array_equal(d.x[5], x[5].reshape(-1))     # row-major per example
    assert d.label_names == ("ok", "worn") and d.n_classes == 2
    import hashlib
    assert d.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert d.schema["input_shape"] == [3, 16] and d.schema["label"] == "int64"


def test_npz_layout_defaults_by_rank_and_a_declared_task_reads_the_labels(tmp_path):
    x = np.random.default_rng(1).normal(size=(30, 1, 4, 4))
    assert load_dataset(_npz(tmp_path / "img.npz", x=x, y=np.arange(30) % 3)).layout == "NCHW"
    d = load_dataset(_npz(tmp_path / "reg.npz", x=x.reshape(30, -1), y=np.linspace(0, 1, 30), task=np.array("regression")))
    assert d.task == "regression" and d.y.dtype == np.float32 and d.n_classes == 0 and d.layout == "flat"
    # an explicit task wins over what the file declares; an anomaly set's labels are 0 or 1
    assert load_dataset(tmp_path / "img.npz", task="regression").task == "regression"
    with pytest.raises(UserError, match="anomaly labels must be 0 .normal. or 1"):
        load_dataset(tmp_path / "img.npz", task="anomaly")


@pytest.mark.parametrize("arrays,needle", [
    ({"x": np.zeros((20, 4))}, "no array 'y'"),
    ({"x": np.zeros((20, 4)), "y": np.zeros(19)}, "x has 20 rows but y has 19"),
    ({"x": np.zeros((20, 4)), "y": np.zeros((20, 2))}, "y must have shape (n,)"),
    ({"x": np.zeros((20, 4)), "y": np.zeros(20), "layout": np.array("NCHW")}, "layout 'NCHW' does not fit"),
    ({"x": np.zeros((20, 4)), "y": np.zeros(20), "task": np.array("ranking")}, "unknown task 'ranking'"),
    ({"x": np.full((20, 4), np.nan), "y": np.zeros(20)}, "non-finite"),
    ({"x": np.zeros((20, 4)), "y": np.full(20, 0.5)}, "non-negative whole numbers"),
    ({"x": np.zeros((20, 4)), "y": np.array(["a"] * 20)}, "must hold numbers"),
    ({"x": np.zeros((5, 4)), "y": np.zeros(5)}, "at least 10 rows"),
])
def test_bad_npz_is_one_line_naming_the_problem(tmp_path, arrays, needle):
    with pytest.raises(UserError) as e:
        load_dataset(_npz(tmp_path / "bad.npz", **arrays))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_pickled_and_corrupt_npz_are_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 20, dtype=object), y=np.zeros(20))
    with pytest.raises(UserError, match="pickled objects are refused"):
        load_dataset(tmp_path / "obj.npz")
    good = _npz(tmp_path / "cut.npz", x=np.zeros((20, 4)), y=np.zeros(20))
    good.write_bytes(good.read_bytes()[:200])                          # a truncated copy
    with pytest.raises(UserError, match="not a readable .npz"):
        load_dataset(good)


# -- image folders ---------------------------------------------------------------------------
def _image_folder(root: Path, size=(6, 4), mode: str = "L", per_class: int = 6,
                  classes=("cat", "dog")) -> Path:
    rng = np.random.default_rng(2)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i:03d}.png")
    return root


def test_image_folder_reads_classes_from_subfolders_as_nchw(tmp_path):
    root = _image_folder(tmp_path / "pets", size=(6, 4), mode="RGB")
    d = load_dataset(root)
    assert d.label_names == ("cat", "dog") and d.n_classes == 2 and d.layout == "NCHW"
    assert d.shape == (3, 4, 6) and len(d.y) == 12 and list(d.y[:6]) == [0] * 6
    pixels = np.asarray(Image.open(root / "dog" / "002.png"), dtype=np.float32)     # (H, W, 3)
    assert np.array_equal(d.x[8].reshape(3, 4, 6), pixels.transpose(2, 0, 1))
    assert [f for f, _ in d.files][:2] == ["cat/000.png", "cat/001.png"]
    gray = load_dataset(_image_folder(tmp_path / "gray", size=(5, 5), mode="L"))
    assert gray.shape == (1, 5, 5)


def test_image_folder_hash_follows_names_and_contents(tmp_path):
    root = _image_folder(tmp_path / "pets")
    first = load_dataset(root).sha256
    assert load_dataset(root).sha256 == first                          # loading twice: one identity
    (root / "dog" / "005.png").rename(root / "dog" / "105.png")
    renamed = load_dataset(root).sha256
    assert renamed != first
    Image.fromarray(np.zeros((4, 6), np.uint8), "L").save(root / "dog" / "105.png")
    assert load_dataset(root).sha256 not in (first, renamed)


@pytest.mark.parametrize("spoil,needle", [
    (lambda r: Image.fromarray(np.zeros((9, 9), np.uint8), "L").save(r / "cat" / "big.png"), "all must have one size"),
    (lambda r: (r / "dog" / "notes.txt").write_text("hello"), "is not an image"),
    (lambda r: (r / "dog" / "broken.png").write_bytes(b"\x89PNG not really"), "not a readable image"),
    (lambda r: (r / "empty").mkdir(), "holds no images"),
    (lambda r: (r / "rows.csv").write_text("1,2,0\n"), "mixes CSV files and class subfolders"),
])
def test_bad_image_folders_are_one_line(tmp_path, spoil, needle):
    root = _image_folder(tmp_path / "pets")
    spoil(root)
    with pytest.raises(UserError) as e:
        load_dataset(root)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_one_class_image_folder_and_image_regression_are_refused(tmp_path):
    root = _image_folder(tmp_path / "one", classes=("only",))
    with pytest.raises(UserError, match="at least 2 class subfolders"):
        load_dataset(root)
    with pytest.raises(UserError, match="regression needs an .npz"):
        load_dataset(_image_folder(tmp_path / "two"), task="regression")


# -- CSV for regression ----------------------------------------------------------------------
def test_csv_regression_keeps_float_targets_classification_refuses_them(tmp_path):
    rng = np.random.default_rng(3)
    table = np.column_stack([rng.normal(size=(30, 3)), rng.normal(50, 10, 30)])
    path = tmp_path / "houses.csv"
    np.savetxt(path, table, delimiter=",")
    d = load_dataset(path, task="regression")
    assert d.task == "regression" and np.allclose(d.y, table[:, -1], atol=1e-3) and d.schema["label"] == "float32"
    with pytest.raises(UserError, match="use --task regression"):
        load_dataset(path)


# -- registering: versions, twice, changed contents ------------------------------------------
def test_registering_npz_twice_then_changed_gives_a_new_version_and_refuses_the_stale_name(reg, tmp_path):
    ws, registry = reg
    x, y = _series()
    path = _npz(tmp_path / "sensors.npz", x=x, y=y)
    _, first, created = register_dataset(registry, "sensors", path)
    _, again, created_again = register_dataset(registry, "sensors", path)
    assert (first, created, again, created_again) == ("sensors:1", True, "sensors:1", False)
    _npz(path, x=x * 2, y=y)                                            # the file changes on disk
    with pytest.raises(IntegrityError, match="changed on disk since it was registered"):
        resolve_dataset(registry, "sensors:1")
    _, second, created = register_dataset(registry, "sensors", path)
    assert (second, created) == ("sensors:2", True)
    assert [r["dataset_id"] for r in registry.datasets()] == ["sensors:1", "sensors:2"]


def test_image_folder_registered_then_a_file_added_is_refused_under_the_old_version(reg, tmp_path):
    ws, registry = reg
    root = _image_folder(tmp_path / "pets")
    register_dataset(registry, "pets", root)
    Image.fromarray(np.zeros((4, 6), np.uint8), "L").save(root / "cat" / "new.png")
    with pytest.raises(IntegrityError):
        resolve_dataset(registry, "pets")
    assert register_dataset(registry, "pets", root)[1] == "pets:2"


# -- shipped examples and the CLI ------------------------------------------------------------
def test_example_data_is_byte_deterministic_and_never_overwrites(tmp_path):
    for name in EXAMPLE_DATA:
        a = write_example(name, tmp_path / "a").read_bytes()
        assert write_example(name, tmp_path / "b").read_bytes() == a
        assert write_example(name, tmp_path / "a").read_bytes() == a   # the same file again: nothing to do
    other = tmp_path / "c" / "diabetes.npz"
    other.parent.mkdir()
    other.write_bytes(b"mine")
    with pytest.raises(UserError, match="exists with other contents"):
        write_example("diabetes", tmp_path / "c")
    assert other.read_bytes() == b"mine"
    d = load_dataset(tmp_path / "a" / "diabetes.npz")
    assert d.task == "regression" and len(d.y) == 442 and d.shape == (10,)


def test_cli_example_add_ls_and_bad_input(reg, tmp_path, capsys):
    ws, registry = reg
    w = ["--workspace", str(ws.root)]
    assert main(["data", "example", "digits-images", "--dest", str(tmp_path), "--json"]) == 0
    path = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["path"]
    assert main(["data", "add", "digits-img", path, *w, "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["created"] and out["schema"]["input_shape"] == [1, 8, 8] and out["schema"]["layout"] == "NCHW"
    assert main(["data", "add", "digits-img", path, *w]) == 0
    assert "already registered, unchanged: digits-img:1" in capsys.readouterr().out
    assert main(["data", "ls", *w, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["datasets"]
    assert [(r["dataset_id"], r["schema"]["task"]) for r in listed] == [("digits-img:1", "classification")]
    bad = _npz(tmp_path / "bad.npz", x=np.zeros((20, 4)), y=np.zeros(19))
    assert main(["data", "add", "bad", str(bad), *w]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x has 20 rows but y has 19" in err
    assert main(["data", "add", "reg", path, *w, "--task", "regression"]) == 0     # a numeric label is fine
    capsys.readouterr()
    assert [r["dataset_id"] for r in registry.datasets()] == ["digits-img:1", "reg:1"]


def test_train_a_cnn_from_an_image_folder(reg, tmp_path):
    """What a user brings: a folder of PNGs per class. The digits written as images train a CNN
    whose feature contract says 1x8x8 NCHW."""
    from edgeloop.cloud.train.datasets import load_dataset as load
    from edgeloop.cloud.loop.pipeline import train_model
    from edgeloop.cloud.train.training import TrainParams

    ws, registry = reg
    digits = load()
    root = tmp_path / "digit-pngs"
    for i in range(400):
        folder = root / f"d{int(digits.y[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.x[i].reshape(8, 8) * 15).astype(np.uint8)     # 0..16 -> 0..240
        Image.fromarray(pixels, "L").save(folder / f"{i:04d}.png")
    trained = train_model(ws, registry, TrainParams(epochs=12), data=str(root), model="png-cnn",
                          model_def="edgeloop.cloud.examples.models:digits_cnn")
    mv = registry.model_version(trained["model_version"])
    assert mv["features"]["input_shape"] == [1, 8, 8] and mv["features"]["layout"] == "NCHW"
    assert mv["metrics"]["test_accuracy"] > 0.6
    assert registry.dataset("digit-pngs")["schema"]["label_names"][:2] == ["d0", "d1"]
