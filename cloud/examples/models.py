"""Model definitions of the shipped examples, written as a user would write their own.

Each builder is ``fn(input_shape, n_outputs) -> nn.Module`` (docs/models.md): logits for
classification, one standardized value for regression, a reconstruction for anomaly detection.
"""

from __future__ import annotations

import math

from torch import nn


def digits_cnn(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """A small CNN on 1x8x8 digit images: two 3x3 convolutions, a pooling step, a classifier."""
    channels = input_shape[0]
    side = input_shape[1] // 2
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * (input_shape[2] // 2), n_outputs),
    )


def regression_mlp(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """Two hidden layers with tanh, one output: a small model for tabular regression."""
    return nn.Sequential(nn.Linear(math.prod(input_shape), 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, n_outputs))


def binary_mlp(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """A binary classifier with dropout-free hidden layers (deterministic at export)."""
    return nn.Sequential(nn.Linear(math.prod(input_shape), 16), nn.ReLU(), nn.Linear(16, n_outputs))


def autoencoder(input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """A fully connected autoencoder with an 8-wide bottleneck; the reconstruction error is the
    anomaly score (edgeloop adds it to the exported graph)."""
    width = math.prod(input_shape)
    return nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(),
                         nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, n_outputs))
