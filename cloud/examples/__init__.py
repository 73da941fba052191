"""The shipped examples: a user's model and real data for each task, runnable with no download.

``edgeloop demo --example NAME`` runs one through the whole loop; ``bench/examples.py`` runs all
of them through training and per-tier packaging. The data sets ship inside installed packages
(scikit-learn's wheel, edgeloop's own digits) and are written into the workspace by
:mod:`edgeloop.cloud.train.example_data`; the model definitions are in :mod:`edgeloop.cloud.examples.models`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Example", "EXAMPLES", "EXAMPLE_DATA"]

# the example data sets by name (cloud.train.example_data writes them); here, without numpy, so the
# CLI can offer the names without importing it
EXAMPLE_DATA: dict[str, str] = {
    "diabetes": "regression: scikit-learn's diabetes data (442 rows, 10 features)",
    "breast-cancer": "binary classification: scikit-learn's breast cancer data (569 rows, 30 features)",
    "digits-images": "classification: the 8x8 digits as 1x8x8 images (NCHW)",
    "digits-anomaly": "anomaly detection: the digits, with 7 as the anomaly",
}


@dataclass(frozen=True)
class Example:
    name: str
    data: str               # cloud.train.example_data name
    model_def: str          # MODULE:FUNCTION
    task: str
    epochs: int
    description: str
    lr: float = 0.01


EXAMPLES: dict[str, Example] = {e.name: e for e in (
    Example("digits-cnn", "digits-images", "edgeloop.cloud.examples.models:digits_cnn", "classification", 15,
            "a CNN on the 8x8 handwritten digits read as 1x8x8 images (NCHW)"),
    Example("diabetes-regression", "diabetes", "edgeloop.cloud.examples.models:regression_mlp", "regression", 80,
            "regression of disease progression on scikit-learn's diabetes data (442 patients, 10 features)"),
    Example("breast-cancer", "breast-cancer", "edgeloop.cloud.examples.models:binary_mlp", "classification", 40,
            "a binary classifier on scikit-learn's breast cancer data (569 tumours, 30 features)"),
    Example("digits-anomaly", "digits-anomaly", "edgeloop.cloud.examples.models:autoencoder", "anomaly", 40,
            "an autoencoder anomaly detector: trained on the other digits, the digit 7 is the anomaly"),
)}
