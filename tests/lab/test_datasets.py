"""Lab datasets: digits split, MNIST IDX reading, MNIST-1D generation, spec errors.

PYTHONPATH=src python -m pytest -q tests/lab/test_datasets.py
"""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab.datasets import load


def test_digits_split_is_stratified_scaled_and_fixed_by_seed() -> None:
    a = load("digits", 0)
    b = load("digits", 0)
    c = load("digits", 1)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64
    assert a.train_x.shape == (1437, 64) and a.test_x.shape == (360, 64)
    assert a.input_shape == (1, 8, 8) and a.classes == 10
    assert float(a.train_x.min()) == 0.0 and float(a.train_x.max()) == 1.0
    torch.testing.assert_close(a.test_x, b.test_x)
    assert not torch.equal(a.test_y, c.test_y)
    # stratified: every class has 20% +- 1 of its examples in the test set
    counts_test = torch.bincount(a.test_y, minlength=10).numpy()
    counts_all = counts_test + torch.bincount(a.train_y, minlength=10).numpy()
    assert np.max(np.abs(counts_test - 0.2 * counts_all)) <= 1.0
    # the split is a partition of the 1797 images: no image in both halves
    from sklearn.datasets import load_digits

    raw = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    assert sorted(map(tuple, torch.cat([a.train_x, a.test_x]).tolist())) == sorted(map(tuple, raw.tolist()))


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_are_read_and_scaled(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, size=(12, 5, 4))
    ytr = rng.integers(0, 10, size=12)
    xte = rng.integers(0, 256, size=(6, 5, 4))
    yte = np.arange(6)
    for name, arr in (
        ("train-images-idx3-ubyte", xtr),
        ("train-labels-idx1-ubyte", ytr),
        ("t10k-images-idx3-ubyte", xte),
        ("t10k-labels-idx1-ubyte", yte),
    ):
        _write_idx(tmp_path / name, arr, compress)
    data = load(f"mnist:{tmp_path}", 0)
    assert data.input_shape == (1, 5, 4)
    np.testing.assert_allclose(data.train_x.numpy(), xtr.reshape(12, 20) / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(data.test_y.numpy(), yte)


def test_mnist_missing_or_truncated_files_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load(f"mnist:{tmp_path / 'nowhere'}", 0)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*not found"):
        load(f"mnist:{tmp_path}", 0)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        _write_idx(tmp_path / name, np.zeros((3, 2, 2) if "images" in name else (3,)), False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        load(f"mnist:{tmp_path}", 0)


@pytest.mark.parametrize("spec", ["", "cifar10", "mnist:", "digits:x", 3])
def test_bad_specs_raise_value_error(spec: object) -> None:
    with pytest.raises(ValueError, match="data:"):
        load(spec)  # type: ignore[arg-type]


def test_mnist1d_is_generated_locally_standardized_and_leaves_global_rngs_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    expected_np = np.random.random()
    expected_py = random.random()
    np.random.seed(123)
    random.seed(123)
    data = load("mnist1d", 0, small=True)
    assert np.random.random() == expected_np
    assert random.random() == expected_py
    assert data.train_x.shape == (1600, 40) and data.test_x.shape == (400, 40)
    assert data.input_shape == (1, 40) and data.classes == 10
    assert abs(float(data.train_x.mean())) < 1e-4
    assert abs(float(data.train_x.std()) - 1.0) < 1e-3
    assert set(torch.unique(data.train_y).tolist()) == set(range(10))
