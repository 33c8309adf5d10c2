"""Calibration data for the lab's rules that fix a setup before the claims are judged: its own
seed (``CALIBRATION_SEED``, never a claim's) and a stratified 80/20 split of that seed's training
set (``calibration_split``: train (N', D), validation (N - N', D)); the test set is never used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..datasets import Dataset
from ..experiment import load_for

__all__ = [
    "CALIBRATION_SEED",
    "calibration_data",
    "calibration_split",
    "epoch_rule",
    "epochs_to_steps",
]

CALIBRATION_SEED = 1000
"""The seed of every calibration run (its weights, minibatches and, for digits, data split);
the lab's claims are judged at seeds 0-999."""


def calibration_split(data: Dataset, seed: int) -> Dataset:
    """A new ``Dataset`` whose train/test parts are a stratified 80/20 split of ``data``'s training
    set, drawn with ``seed``. Raises ValueError if a part would be empty."""
    y = data.train_y.numpy()
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        held.append(idx[: int(round(0.2 * idx.size))])
    val = np.sort(np.concatenate(held))
    keep = np.setdiff1d(np.arange(y.size), val)
    if val.size == 0 or keep.size == 0:
        raise ValueError(f"calibration_split: an 80/20 split of {y.size} examples leaves an empty part")
    v, k = torch.from_numpy(val), torch.from_numpy(keep)
    return dataclasses.replace(
        data, train_x=data.train_x[k], train_y=data.train_y[k], test_x=data.train_x[v], test_y=data.train_y[v]
    )


def epochs_to_steps(epochs: float, examples: int, batch_size: int) -> int:
    """SGD steps for ``epochs`` passes over ``examples`` in batches of ``batch_size``
    (rounded to the nearest step, at least 1)."""
    if epochs <= 0 or examples < 1 or batch_size < 1:
        raise ValueError(
            f"epochs_to_steps: expected epochs > 0, examples >= 1, batch_size >= 1, got {epochs!r}, {examples!r}, {batch_size!r}"
        )
    return max(1, int(round(epochs * examples / batch_size)))


def calibration_data(cfg: RunConfig, seed: int) -> tuple[Dataset, dict[str, Any]]:
    """``calibration_split`` of seed ``seed``'s split of the run's data set (``load_for``), and how
    it was made, as the calibration's record in results.json begins: ``{"seed", "split"}``."""
    cal = calibration_split(load_for(cfg, seed), seed)
    sizes = f"{cal.train_x.shape[0]} / {cal.test_x.shape[0]} examples"
    split = f"80/20 stratified split of seed {seed}'s training set ({sizes}); test set unused"
    return cal, {"seed": seed, "split": split}


def epoch_rule(cfg: RunConfig, epochs: dict[str, float], batch_size: int) -> dict[str, Any]:
    """``{"steps", "steps_rule"}``: ``epochs[cfg.mode]`` passes over the run's training set (its
    size at ``cfg.seed``) in batches of ``batch_size``, and the rule as text; ``{}`` in tiny mode
    (its steps are in each settings file)."""
    if cfg.mode == "tiny":
        return {}
    n, e = load_for(cfg, cfg.seed).train_x.shape[0], epochs[cfg.mode]
    rule = f"{e:g} passes over the training set ({n} examples, batch {batch_size}), the same rule on every data set"
    return {"steps": epochs_to_steps(e, n, batch_size), "steps_rule": rule}
