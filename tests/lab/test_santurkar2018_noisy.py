"""santurkar2018-noisy: the noisy BN (NoisyReLU against a reference noisy BN), the drift measure, and the quick-mode claims.

PYTHONPATH=src python -m pytest -q tests/lab/test_santurkar2018_noisy.py          (fast)
PYTHONPATH=src python -m pytest -q -m slow tests/lab/test_santurkar2018_noisy.py  (quick-mode claims)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from batchnorm import BatchNorm1d
from batchnorm.lab.config import RunConfig
from batchnorm.lab.datasets import load
from batchnorm.lab.experiments import santurkar2018_noisy as exp
from batchnorm.lab.experiments._santurkar import NoisyReLU, build, noisy, seed_slot
from batchnorm.lab.models import blocks
from batchnorm.lab.runner import run_one
from batchnorm.lab.stacked import train_stacked
from batchnorm.lab.training import TrainSpec, minibatches, train


class NoisyBatchNorm(nn.Module):
    """The reference noisy BN that ``NoisyReLU`` follows: ``y = BN(x)`` (after gamma and beta),
    then at every training-mode forward a new shift and scale per unit j, mu_j ~ U(-noise_mean,
    noise_mean) and s_j ~ U(1, noise_scale), and per sample i

        y'_ij = y_ij * s_j * (1 + per_sample * e_ij) + mu_j + per_sample * e'_ij,   e, e' ~ N(0, 1);

    in eval mode its expectation, y' = y * (1 + noise_scale) / 2. Shape: (N, C) -> (N, C).
    """

    def __init__(
        self,
        num_features: int,
        noise_mean: float = 0.5,
        noise_scale: float = 1.5,
        per_sample: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.bn = BatchNorm1d(num_features)
        self.noise_mean, self.noise_scale, self.per_sample = noise_mean, noise_scale, per_sample
        self.generator = generator if generator is not None else torch.Generator()

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(x)
        if not self.training:
            return y * (0.5 * (1.0 + self.noise_scale))
        n, c = y.shape
        g = self.generator
        shift = (torch.rand(c, generator=g) * 2.0 - 1.0) * self.noise_mean  # (C,)
        scale = 1.0 + torch.rand(c, generator=g) * (self.noise_scale - 1.0)  # (C,)
        mult = 1.0 + self.per_sample * torch.randn(n, c, generator=g)  # (N, C)
        add = self.per_sample * torch.randn(n, c, generator=g)  # (N, C)
        return y * scale * mult + shift + add


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


def test_noisy_relu_rejects_bad_noise() -> None:
    with pytest.raises(ValueError, match="magnitude >= 0"):
        NoisyReLU([torch.Generator()], [-0.5])


def test_drift_measures_step_to_step_change_in_units_of_spread() -> None:
    # unit 0 alternates its mean by +-1 with std 2: RMS step change 2, / std 2 -> 1;
    # unit 1 is constant: 0. Median over 3 units (the third equal to unit 0) -> 1.
    t = 6
    means = np.zeros((t, 3))
    means[:, 0] = [0, 2, 0, 2, 0, 2]
    means[:, 2] = means[:, 0]
    stds = np.full((t, 3), 2.0)
    # the first 10% of the checkpoints (at least one) are left out: a first row far off changes nothing
    d = exp._drift(np.vstack([np.full((1, 3), 99.0), means]), np.vstack([np.full((1, 3), 9.0), stds]))
    assert d["step_location"] == pytest.approx(1.0)
    assert d["step_spread"] == pytest.approx(0.0)
    assert d["total_location"] == pytest.approx(0.5)
    assert set(exp._drift(means, stds, ok=False).values()) == {1e3}  # a run that diverged
    assert set(exp._drift(means[:3], stds[:3]).values()) == {1e3}  # < 3 checkpoints left


def test_noisy_relu_is_relu_of_noisy_batch_norm() -> None:
    """BN -> NoisyReLU draws the same noise, in the same order, as NoisyBatchNorm -> ReLU."""
    x = torch.randn(32, 6) * 2 + 1
    ref = NoisyBatchNorm(
        6, noise_mean=0.7, noise_scale=1.7, per_sample=0.7 / 5, generator=torch.Generator().manual_seed(5)
    )
    act = NoisyReLU([torch.Generator().manual_seed(5)], [0.7])  # mean a, scale 1 + a, per sample a / 5
    for _ in range(3):  # the noise changes every step, identically in both
        torch.testing.assert_close(act(ref.bn(x)), torch.relu(ref(x)))
    ref.eval()
    act.eval()
    torch.testing.assert_close(act(ref.bn(x)), torch.relu(ref(x)))


def test_noisy_relu_stacked_slices_use_each_seeds_generator_and_magnitude() -> None:
    y = torch.randn(3, 16, 4)
    stacked = NoisyReLU([torch.Generator().manual_seed(s) for s in (0, 1, 2)], [0.0, 0.5, 1.0])
    out = stacked(y)
    for k, a in enumerate([0.0, 0.5, 1.0]):
        alone = NoisyReLU([torch.Generator().manual_seed(k)], [a])
        torch.testing.assert_close(out[k], alone(y[k]))
    with pytest.raises(ValueError, match="one generator"):
        NoisyReLU([torch.Generator()], [0.1, 0.2])
    with pytest.raises(ValueError, match="magnitude >= 0"):
        NoisyReLU([torch.Generator()], [-0.1])


def test_noisy_refuses_a_count_of_activations_before_changing_a_model() -> None:
    data = load("digits", 0)
    models = [build(data, 3, 8, "bn", s) for s in (0, 1)]
    before = [[type(block.act) for block in blocks(m)] for m in models]
    acts = [NoisyReLU([torch.Generator()] * 2, [0.4, 0.4]) for _ in range(2)]
    with pytest.raises(ValueError, match=r"one NoisyReLU per hidden layer \(\[3\]\), got 2"):
        noisy(models, acts)
    assert [[type(block.act) for block in blocks(m)] for m in models] == before


def test_stacked_noisy_training_equals_each_seed_alone() -> None:
    """Noisy BN trained with train_stacked = each seed trained alone with its own noise stream."""
    data = load("digits", 0)
    seeds = [0, 1]
    spec = TrainSpec(steps=15, batch_size=32, lr=0.1)

    def models_with_noise(which: list[int]) -> list:
        ms = [build(data, 3, 8, "bn", s) for s in which]
        gens = [torch.Generator().manual_seed(s + 7) for s in which]
        noisy(ms, [NoisyReLU(gens, [0.4] * len(which)) for _ in range(3)])
        return ms

    together = models_with_noise(seeds)
    train_stacked(
        [together],
        [data.train_x] * 2,
        [data.train_y] * 2,
        spec,
        [minibatches(data.train_x.shape[0], spec.batch_size, torch.Generator().manual_seed(s + 2)) for s in seeds],
    )
    for k, s in enumerate(seeds):
        alone = models_with_noise([s])[0]
        train(alone, data.train_x, data.train_y, spec, generator=torch.Generator().manual_seed(s + 2))
        for (name, a), b in zip(alone.state_dict().items(), together[k].state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    with seed_slot(together[1], 1):
        assert all(m.slot == 1 for m in together[1].modules() if isinstance(m, NoisyReLU))
    assert all(m.slot == 0 for m in together[1].modules() if isinstance(m, NoisyReLU))


def test_claims_judge_each_seed(tmp_path: Path) -> None:
    """A refuting seed set gives `does not hold`: the claims read every seed's metrics."""
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="tiny", seeds=(0, 1, 2), out=tmp_path))
    assert results["config"]["noise_magnitude"] in results["config"]["noise_grid"]
    assert results["config"]["calibration"]["seed"] == 1000
    assert [len(c["seeds"]) for c in results["claims"]] == [3] * 4
    for m in results["metrics"]["per_seed"]:
        for lr in ("0.1", "0.5"):
            m[f"noisy@{lr}"]["final_train_acc"] = m[f"bn@{lr}"]["final_train_acc"] - 0.3 - 0.01 * len(lr)
    first = exp.EXPERIMENT.claims(results)[0]
    assert first["verdict"] == "does not hold"


@pytest.mark.slow
def test_quick_mode_on_digits_base_seed_0(tmp_path: Path) -> None:
    """The calibration's noise is large (a = 1.6); with it noisy BN keeps BN's robustness at
    lr 0.5 and moves the layer inputs more than no BN (claims 3 and 4 hold), but trains slower
    than no BN at lr 0.05 (claim 2 does not hold) and its final accuracy is not within 2 points
    of BN's (claim 1 does not hold at 8 seeds: 4 left it undecided)."""
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, data="digits", out=tmp_path))
    assert results["metrics"]["seeds"] == list(range(8))
    assert results["config"]["noise_magnitude"] == 1.6
    verdicts = [c["verdict"] for c in results["claims"]]
    assert verdicts == ["does not hold", "does not hold", "holds", "holds"], results["claims"]
