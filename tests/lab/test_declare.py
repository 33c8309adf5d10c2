"""The experiments' shared pieces (``lab.declare``): per-seed text, a probe that puts the model
back, and the seeds of an arm trained together as each alone.

    PYTHONPATH=src python -m pytest -q tests/lab/test_declare.py
"""

from __future__ import annotations

import pytest
import torch

from batchnorm.lab.config import RunConfig
from batchnorm.lab.datasets import load
from batchnorm.lab.declare import probing, seeded, train_seeds
from batchnorm.lab.experiments import ghost_bn
from batchnorm.lab.models import MLP
from batchnorm.lab.progress import Progress
from batchnorm.lab.training import TrainSpec, train


def _net(seed: int) -> MLP:
    return MLP(64, [16, 16], 10, act="relu", norm="bn", init_std="he", generator=seeded(seed))


def test_probing_puts_weights_grads_buffers_and_flags_back() -> None:
    model = _net(0)
    x = torch.randn(32, 64, generator=seeded(1))
    model(x).sum().backward()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    with probing(model):
        assert model.training
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()  # training-mode forward: moves the running statistics
    assert not any(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_train_seeds_matches_each_seed_trained_alone() -> None:
    data = [load("digits", seed, small=True) for seed in (3, 4)]
    spec = TrainSpec(steps=5, batch_size=20, lr=0.1)
    together = [_net(seed) for seed in (3, 4)]
    results = train_seeds(together, data, (3, 4), spec, "arm", Progress())
    for model, d, seed, r in zip(together, data, (3, 4), results):
        alone = _net(seed)
        expected = train(alone, d.train_x, d.train_y, spec, generator=seeded(seed + 2))
        assert torch.allclose(torch.tensor(r.losses), torch.tensor(expected.losses), atol=1e-5)
        for a, b in zip(model.parameters(), alone.parameters()):
            assert torch.allclose(a, b, atol=1e-5)


def test_file_settings_read_every_setting_of_the_file_by_attribute() -> None:
    s = ghost_bn.EXPERIMENT.settings(RunConfig(mode="quick"))
    assert (s.epochs, s.max_train) == (10, 2000)  # fields: set by mode and in code
    assert (s.lr, s.hidden) == (0.05, (128, 128, 128))  # read from ghost_bn.settings.toml
    assert s.record()["lr"] == s.lr and getattr(s, "calibration_seed", None) is None
    with pytest.raises(AttributeError, match="no setting 'not_a_setting'"):
        _ = s.not_a_setting


def test_a_setting_read_by_attribute_cannot_change_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchnorm.lab import claims_spec

    file = claims_spec._parse_settings("steps = 3\ngrid = [1, 2]\nnested = [[1], [2]]\n[quick]\nsteps = 4", "x.toml")
    monkeypatch.setattr(claims_spec, "_settings", lambda module: file)

    class Settings(claims_spec.Declared):
        steps: int

    s = Settings.of()
    assert (s.steps, s.grid, s.nested, Settings.of("quick").steps) == (3, (1, 2), ([1], [2]), 4)  # arrays as tuples
    s.nested[0].append(2)  # a copy: the file's value, and the next read, stay as read
    assert file[0]["nested"] == ([1], [2]) and s.nested == ([1], [2])
