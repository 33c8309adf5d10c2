"""santurkar2018-noisy: the noisy BN layer, the drift measure, and the quick-mode claims.

PYTHONPATH=src python -m pytest -q tests/lab/test_santurkar2018_noisy.py          (fast)
PYTHONPATH=src python -m pytest -q -m slow tests/lab/test_santurkar2018_noisy.py  (quick-mode claims)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments import santurkar2018_noisy as exp
from batchnorm.lab.normalizers import NoisyBatchNorm
from batchnorm.lab.runner import run_one


def _reference_bn(x: torch.Tensor, eps: float = 1e-5) -> np.ndarray:
    """BN with gamma 1, beta 0 in float64 NumPy (biased batch variance)."""
    a = x.double().numpy()
    return (a - a.mean(axis=0)) / np.sqrt(a.var(axis=0) + eps)


def test_noise_off_is_batch_norm() -> None:
    x = torch.randn(32, 6) * 3 + 2
    layer = NoisyBatchNorm(6, noise_mean=0.0, noise_scale=1.0, per_sample=0.0)
    layer.train()
    torch.testing.assert_close(layer(x).detach().double(), torch.from_numpy(_reference_bn(x)), atol=1e-5, rtol=1e-5)


def test_training_noise_is_a_per_unit_affine_map_in_range_and_changes_every_step() -> None:
    x = torch.randn(64, 5)
    layer = NoisyBatchNorm(
        5, noise_mean=0.5, noise_scale=1.5, per_sample=0.0, generator=torch.Generator().manual_seed(3)
    )
    layer.train()
    y = _reference_bn(x)
    fits = []
    for _ in range(2):
        out = layer(x).detach().double().numpy()
        scale = out.std(axis=0) / y.std(axis=0)  # (C,): s_j
        shift = out.mean(axis=0) - scale * y.mean(axis=0)  # (C,): mu_j
        np.testing.assert_allclose(out, y * scale + shift, atol=1e-4)
        assert np.all((scale >= 1 - 1e-4) & (scale <= 1.5 + 1e-4))
        assert np.all(np.abs(shift) <= 0.5 + 1e-4)
        fits.append(scale)
    assert np.max(np.abs(fits[0] - fits[1])) > 1e-3, "the noise must be redrawn at every step"


def test_eval_replaces_the_noise_by_its_expectation() -> None:
    x = torch.randn(40, 4)
    layer = NoisyBatchNorm(4, noise_mean=0.5, noise_scale=1.5)
    layer.train()
    for _ in range(20):
        layer(torch.randn(40, 4) * 2 + 1)
    layer.eval()
    bn = layer.bn
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * 1.25
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_noisy_batch_norm_rejects_bad_noise() -> None:
    with pytest.raises(ValueError, match="noise_scale >= 1"):
        NoisyBatchNorm(3, noise_scale=0.5)


def test_drift_measures_step_to_step_change_in_units_of_spread() -> None:
    # unit 0 alternates its mean by +-1 with std 2: RMS step change 2, / std 2 -> 1;
    # unit 1 is constant: 0. Median over 3 units (the third equal to unit 0) -> 1.
    t = 6
    means = np.zeros((t, 3))
    means[:, 0] = [0, 2, 0, 2, 0, 2]
    means[:, 2] = means[:, 0]
    stds = np.full((t, 3), 2.0)
    d = exp._drift(means, stds)
    assert d["step_location"] == pytest.approx(1.0)
    assert d["step_spread"] == pytest.approx(0.0)
    assert d["total_location"] == pytest.approx(0.5)


@pytest.mark.slow
def test_quick_mode_claims_hold_on_digits(tmp_path: Path) -> None:
    results = run_one(exp.ID, RunConfig(mode="quick", seed=0, data="digits", out=tmp_path))
    failed = [c for c in results["claims"] if not c["holds"]]
    assert not failed, failed
