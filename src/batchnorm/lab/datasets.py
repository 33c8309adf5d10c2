"""Datasets for the lab, all available offline: ``load(spec, seed) -> Dataset`` with spec
``digits``, ``mnist1d`` or ``mnist:DIR`` (docs/lab.md, "Data"). MNIST-1D is made by the
``mnist1d`` package's ``make_dataset`` (never its download path) with the package's own seed,
so the run's ``seed`` shuffles nothing there; it is standardized with the training set's scalar
mean and std. ``mnist:DIR`` reads the standard IDX files, each optionally ``.gz``
(Fashion-MNIST files work too).

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

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "load"]

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


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


def load(spec: str, seed: int = 0, *, small: bool = False) -> Dataset:
    """Load the dataset named by ``spec`` (``digits``, ``mnist1d``, ``mnist:DIR``).

    ``seed`` fixes the digits train/test split; ``small`` generates fewer MNIST-1D samples
    (2,000 instead of 10,000, for tiny test runs). Raises ValueError for an unknown spec or
    missing/corrupt files.
    """
    if spec == "digits":
        return _digits(int(seed))
    if spec == "mnist1d":
        return _mnist1d(2000 if small else 10000)
    if isinstance(spec, str) and spec.startswith("mnist:") and spec != "mnist:":
        return _mnist(str(Path(spec[len("mnist:") :]).expanduser().resolve()))
    raise ValueError(
        f"data: unknown dataset {spec!r}; expected digits | mnist1d | mnist:DIR (mnist:DIR names a directory)"
    )


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
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    xtr, xte = (np.asarray(raw[k], dtype=np.float64) for k in ("x", "x_test"))  # (0.8 N, 40), (0.2 N, 40)
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (((x - mean) / std).astype(np.float32) for x in (xtr, xte))
    ytr, yte = (np.asarray(raw[k], dtype=np.int64) for k in ("y", "y_test"))
    return Dataset("mnist1d", *_tensors(xtr, ytr, xte, yte), input_shape=(1, xtr.shape[1]), classes=10)


@functools.lru_cache(maxsize=2)
def _mnist(directory: str) -> Dataset:
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"data: mnist directory {directory!r} does not exist")
    xtr, ytr, xte, yte = (_read_idx(_find_idx(root, stem)) for stem in _MNIST_FILES)
    if xtr.ndim != 3 or xte.ndim != 3 or xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(
            f"data: mnist images in {directory!r} must be (N, H, W) with equal H, W; got {xtr.shape} and {xte.shape}"
        )
    if ytr.shape[0] != xtr.shape[0] or yte.shape[0] != xte.shape[0]:
        raise ValueError(f"data: mnist image and label counts differ in {directory!r}")
    flat = [(x.reshape(x.shape[0], -1) / 255.0).astype(np.float32) for x in (xtr, xte)]  # (N, H*W)
    return Dataset(
        "mnist",
        *_tensors(flat[0], ytr.astype(np.int64), flat[1], yte.astype(np.int64)),
        input_shape=(1, *map(int, xtr.shape[1:])),
        classes=int(max(ytr.max(), yte.max())) + 1,
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
