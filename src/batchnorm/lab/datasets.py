"""Datasets for the lab, all available offline: ``load(spec, seed) -> Dataset``.

Specs:
- ``digits``: scikit-learn's 1797 handwritten digits (8x8, 16 grey levels), scaled x/16 to
  [0, 1]; a stratified 80/20 train/test split fixed by ``seed``.
- ``mnist1d``: MNIST-1D generated locally by the ``mnist1d`` package (``make_dataset``, never
  its download path), 10,000 samples (80/20 split as the package makes it; ``small=True``
  gives 2,000), inputs standardized with the training set's scalar mean and std. The
  generator's own seed (42, the package default) is kept, so the data are the standard ones;
  the run's ``seed`` shuffles nothing here.
- ``mnist:DIR``: the standard IDX files in DIR (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally ``.gz``), scaled x/255 (Fashion-MNIST files work too).

Shape: ``train_x`` (N, D) float32 with D = prod(input_shape) (images are flattened; models
that want images reshape to ``input_shape``, (1, 8, 8) for digits, (1, 28, 28) for MNIST,
(1, 40) for MNIST-1D); ``train_y`` (N,) int64 class indices in [0, classes).
Nothing is cached on disk; loaded datasets are cached in memory for the process, so the
returned tensors are shared between callers: never modify them in place.
"""

from __future__ import annotations

import functools
import gzip
import random
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "load", "parse_spec", "SPECS_HELP"]

SPECS_HELP = "digits | mnist1d | mnist:DIR"

_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Dataset:
    """A classification dataset held in memory as float32/int64 tensors (see module docstring)."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    input_shape: tuple[int, ...]
    classes: int

    @property
    def features(self) -> int:
        """D, the flattened input size."""
        return int(self.train_x.shape[1])

    def describe(self) -> dict[str, object]:
        """A JSON-serializable summary for results.json."""
        return {
            "name": self.name,
            "train": int(self.train_x.shape[0]),
            "test": int(self.test_x.shape[0]),
            "input_shape": list(self.input_shape),
            "classes": self.classes,
        }

    def subset_train(self, n: int, seed: int) -> Dataset:
        """The same dataset with a stratified random subset of n training examples."""
        if n >= self.train_x.shape[0]:
            return self
        from sklearn.model_selection import train_test_split

        labels = self.train_y.numpy()
        chosen, _ = train_test_split(np.arange(labels.shape[0]), train_size=n, stratify=labels, random_state=seed)
        idx = np.sort(chosen)
        return replace(self, name=f"{self.name}[train={n}]", train_x=self.train_x[idx], train_y=self.train_y[idx])


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """Split a spec into (kind, directory); raises ValueError for an unknown spec."""
    if not isinstance(spec, str):
        raise ValueError(f"data: expected a spec string ({SPECS_HELP}), got {spec!r}")
    if spec in ("digits", "mnist1d"):
        return spec, None
    if spec.startswith("mnist:"):
        directory = spec[len("mnist:") :]
        if not directory:
            raise ValueError("data: 'mnist:' needs a directory, e.g. mnist:~/data/mnist")
        return "mnist", Path(directory).expanduser()
    raise ValueError(f"data: unknown dataset {spec!r}; expected {SPECS_HELP}")


def load(spec: str, seed: int = 0, *, small: bool = False) -> Dataset:
    """Load the dataset named by ``spec`` (``digits``, ``mnist1d``, ``mnist:DIR``).

    ``seed`` fixes the digits train/test split; ``small`` generates fewer MNIST-1D samples
    (for tiny test runs). Raises ValueError for an unknown spec or missing/corrupt files.
    """
    kind, directory = parse_spec(spec)
    if kind == "digits":
        return _digits(int(seed))
    if kind == "mnist1d":
        return _mnist1d(2000 if small else 10000)
    return _mnist(str(cast(Path, directory).resolve()))  # parse_spec gives "mnist" a directory


@functools.lru_cache(maxsize=8)
def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x = (raw.data / 16.0).astype(np.float32)  # (1797, 64) in [0, 1]
    y = raw.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return Dataset("digits", *_tensors(xtr, ytr, xte, yte), input_shape=(1, 8, 8), classes=10)


@functools.lru_cache(maxsize=2)
def _mnist1d(num_samples: int) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset seeds the global `random` and NumPy generators; give them back afterwards
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    xtr = np.asarray(raw["x"], dtype=np.float64)  # (0.8 N, 40)
    xte = np.asarray(raw["x_test"], dtype=np.float64)  # (0.2 N, 40)
    mean = xtr.mean()
    std = xtr.std()
    xtr = ((xtr - mean) / std).astype(np.float32)
    xte = ((xte - mean) / std).astype(np.float32)
    ytr = np.asarray(raw["y"], dtype=np.int64)
    yte = np.asarray(raw["y_test"], dtype=np.int64)
    return Dataset("mnist1d", *_tensors(xtr, ytr, xte, yte), input_shape=(1, xtr.shape[1]), classes=10)


@functools.lru_cache(maxsize=2)
def _mnist(directory: str) -> Dataset:
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"data: mnist directory {directory!r} does not exist")
    arrays = {key: _read_idx(_find_idx(root, stem)) for key, stem in _MNIST_FILES.items()}
    xtr = arrays["train_x"]
    xte = arrays["test_x"]
    if xtr.ndim != 3 or xte.ndim != 3 or xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(
            f"data: mnist images in {directory!r} must be (N, H, W) with equal H, W; got {xtr.shape} and {xte.shape}"
        )
    if arrays["train_y"].shape[0] != xtr.shape[0] or arrays["test_y"].shape[0] != xte.shape[0]:
        raise ValueError(f"data: mnist image and label counts differ in {directory!r}")
    h, w = xtr.shape[1:]
    classes = int(max(arrays["train_y"].max(), arrays["test_y"].max())) + 1
    return Dataset(
        "mnist",
        *_tensors(
            (xtr.reshape(xtr.shape[0], h * w) / 255.0).astype(np.float32),  # (N, H*W)
            arrays["train_y"].astype(np.int64),
            (xte.reshape(xte.shape[0], h * w) / 255.0).astype(np.float32),
            arrays["test_y"].astype(np.int64),
        ),
        input_shape=(1, int(h), int(w)),
        classes=classes,
    )


def _find_idx(root: Path, stem: str) -> Path:
    for path in (root / name for base in (stem, stem.replace("-idx", ".idx")) for name in (base, base + ".gz")):
        if path.is_file():
            return path
    raise ValueError(f"data: {stem}[.gz] not found in mnist directory {str(root)!r}")


def _read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (unsigned-byte data, as MNIST ships it)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ValueError(f"data: cannot read {str(path)!r}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"data: {str(path)!r} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(">" + "I" * ndim, raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(f"data: {str(path)!r} is truncated: expected {expected} values, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _tensors(*arrays: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x, train_y, test_x, test_y) as contiguous tensors of their dtypes (float32, int64)."""
    xtr, ytr, xte, yte = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    return xtr, ytr, xte, yte
