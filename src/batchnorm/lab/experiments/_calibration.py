"""Calibration data for the lab's rules that fix a setup before the claims are judged.

A calibration run must not see what the claims are judged on: it uses its own seed
(``CALIBRATION_SEED``, never one of a run's seeds) and its own split, made only from the
training set of that seed's data split: a stratified part held out as validation data. The
test set is never used.

    cal = calibration_split(load("digits", CALIBRATION_SEED), CALIBRATION_SEED)
    cal.train_x, cal.test_x   # 80% / 20% of the training set (cal.test_* is the validation part)

Shape: as ``datasets.Dataset`` (``train_x`` (N', D), ``test_x`` (N - N', D)).
"""

from __future__ import annotations

import numpy as np
import torch

from ..datasets import Dataset

__all__ = ["CALIBRATION_SEED", "calibration_split", "epochs_to_steps"]

CALIBRATION_SEED = 1000
"""The seed of every calibration run (its weights, minibatches and, for digits, data split);
the lab's claims are judged at seeds 0-999."""


def calibration_split(data: Dataset, seed: int, validation: float = 0.2) -> Dataset:
    """A new ``Dataset`` whose train/test parts are a stratified ``1 - validation`` /
    ``validation`` split of ``data``'s training set, drawn with ``seed``.

    Raises ValueError if ``validation`` is not in (0, 1) or a part would be empty.
    """
    if not 0.0 < validation < 1.0:
        raise ValueError(f"calibration_split: expected 0 < validation < 1, got {validation!r}")
    y = data.train_y.numpy()
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(validation * idx.size))])
    val = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(y.size), val)
    if val.size == 0 or keep.size == 0:
        raise ValueError(f"calibration_split: a {validation:g} split of {y.size} examples leaves an empty part")
    v = torch.from_numpy(val)
    k = torch.from_numpy(keep)
    return Dataset(
        data.name,
        data.train_x[k],
        data.train_y[k],
        data.train_x[v],
        data.train_y[v],
        input_shape=data.input_shape,
        classes=data.classes,
    )


def epochs_to_steps(epochs: float, examples: int, batch_size: int) -> int:
    """SGD steps for ``epochs`` passes over ``examples`` in batches of ``batch_size``
    (rounded to the nearest step, at least 1)."""
    if epochs <= 0 or examples < 1 or batch_size < 1:
        raise ValueError(
            f"epochs_to_steps: expected epochs > 0, examples >= 1, batch_size >= 1, got {epochs!r}, {examples!r}, {batch_size!r}"
        )
    return max(1, int(round(epochs * examples / batch_size)))
