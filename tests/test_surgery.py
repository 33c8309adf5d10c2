"""Tests for batchnorm.tools.surgery: fold, strip_redundant_bias, find_redundant_biases, freeze/unfreeze.

PYTHONPATH=src python -m pytest -q tests/test_surgery.py
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

from batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    FrozenBatchNorm2d,
    find_redundant_biases,
    fold,
    freeze,
    strip_redundant_bias,
    unfreeze,
)
from batchnorm.tools.surgery import fold_bn_into_next_weights, fold_bn_weights, fold_conv_bn


def randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters everywhere."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
                m.running_mean.normal_(0, 2)
                m.running_var.uniform_(0.2, 3)
                if m.weight is not None:
                    m.weight.copy_(torch.randn_like(m.weight) + 1)
                    m.bias.copy_(torch.randn_like(m.bias))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def check_fold(model: nn.Module, *inputs: object, folds: int) -> nn.Module:
    model = randomize_bn(model).eval()
    before = copy.deepcopy(model.state_dict())
    result = fold(model)
    assert len(result.folded) == folds, str(result)
    with torch.no_grad():
        want = model(*inputs)
        got = result.model(*inputs)
    assert rel_err(got, want) <= 1e-5
    # the original is untouched
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    return result.model


# ------------------------------------------------------------------------- tensor level


def test_fold_bn_weights_matches_numpy() -> None:
    w = torch.randn(5, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    mean, var, gamma, beta = torch.randn(5), torch.rand(5) + 0.1, torch.randn(5), torch.randn(5)
    wf, bf = fold_bn_weights(w, b, mean, var, 1e-3, gamma, beta)
    x = np.random.default_rng(0).normal(size=(7, 3))
    y = x @ w.numpy().T + b.numpy()
    ref = (y - mean.double().numpy()) / np.sqrt(
        var.double().numpy() + 1e-3
    ) * gamma.double().numpy() + beta.double().numpy()
    np.testing.assert_allclose(x @ wf.numpy().T + bf.numpy(), ref, rtol=1e-12, atol=1e-12)
    # BN before the layer
    wn, bn_ = fold_bn_into_next_weights(torch.randn(4, 5, dtype=torch.float64), None, mean, var, 1e-3, gamma, beta)
    x5 = np.random.default_rng(1).normal(size=(7, 5))
    z = (x5 - mean.double().numpy()) / np.sqrt(
        var.double().numpy() + 1e-3
    ) * gamma.double().numpy() + beta.double().numpy()
    w2 = wn.numpy() / (gamma.double().numpy() / np.sqrt(var.double().numpy() + 1e-3))  # recover W
    np.testing.assert_allclose(x5 @ wn.numpy().T + bn_.numpy(), z @ w2.T, rtol=1e-10, atol=1e-10)


def test_identity_affine_and_missing_bias() -> None:
    w = torch.randn(3, 2, dtype=torch.float64)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    wf, bf = fold_bn_weights(w, None, mean, var, 0.0)
    assert_close(wf, w / var.sqrt()[:, None])
    assert_close(bf, -mean / var.sqrt())


# --------------------------------------------------------------------------- conv kinds

CONVS = [
    (nn.Conv1d(4, 6, 3, padding=1, groups=2, dilation=2), nn.BatchNorm1d(6), (2, 4, 11)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), BatchNorm2d(6), (2, 4, 9, 9)),
    (nn.Conv3d(4, 8, 2, groups=4), nn.BatchNorm3d(8), (2, 4, 5, 5, 5)),
    (nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d(6), (2, 4, 7)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=2, padding=1), nn.BatchNorm2d(6), (2, 4, 6, 6)),
    (nn.ConvTranspose3d(6, 9, 2, groups=3, bias=False), nn.BatchNorm3d(9), (2, 6, 3, 3, 3)),
]


@pytest.mark.parametrize("conv,bn,shape", CONVS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_fold_conv_then_bn_all_kinds(conv: nn.Module, bn: nn.Module, shape: tuple[int, ...]) -> None:
    model = nn.Sequential(conv, bn, nn.ReLU())
    folded = check_fold(model, torch.randn(shape), folds=1)
    assert isinstance(folded[1], nn.Identity)


def test_grouped_transposed_conv_module_level() -> None:
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    bn = randomize_bn(nn.BatchNorm2d(6)).eval()
    x = torch.randn(2, 4, 5, 5)
    new = fold_conv_bn(conv, bn)
    assert new is not conv
    with torch.no_grad():
        assert rel_err(new(x), bn(conv(x))) <= 1e-6
    bn.train()
    with pytest.raises(ValueError, match="training mode"):
        fold_conv_bn(conv, bn)


def test_bn_before_linear_and_conv() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, groups=2),  # padding 0: BN folds into it
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"),  # reflect padding commutes with BN
        nn.ReLU(),
        nn.BatchNorm2d(5),
        nn.Conv2d(5, 5, 3, padding=1),  # zero padding: refused
        nn.Flatten(),
        nn.BatchNorm1d(5 * 64),
        nn.Linear(5 * 64, 3),
    )
    folded = check_fold(model, torch.randn(4, 3, 10, 10), folds=3)
    result = fold(model)
    assert result.folded == [("2", "3", "before"), ("5", "6", "before"), ("11", "12", "before")]
    assert dict(result.skipped)["8"].endswith("which does not commute with the BN shift")
    assert isinstance(folded[8], nn.BatchNorm2d)


class SubBN(nn.BatchNorm2d):
    """A plain subclass: same forward."""


class ActBN(BatchNorm2d):
    """A subclass that does more than normalize: must not be folded."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(input))


def test_bn_matched_by_type_and_subclasses_with_own_forward_kept() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), SubBN(4),
        nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4),
        nn.Conv2d(4, 4, 1), BatchNorm2d(4),
        nn.Conv2d(4, 4, 1), FrozenBatchNorm2d(4),
        nn.Conv2d(4, 4, 1), ActBN(4),
    )  # fmt: skip
    folded = check_fold(model, torch.randn(2, 3, 4, 4), folds=4)
    assert isinstance(folded[9], ActBN)
    assert "overrides forward" in dict(fold(model.eval()).skipped)["9"]


def test_our_ghost_and_sync_fold_in_eval_and_renorm_is_listed() -> None:
    from batchnorm import BatchRenorm2d, GhostBatchNorm2d, SyncBatchNorm

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), GhostBatchNorm2d(4, virtual_batch_size=2),
        nn.Conv2d(4, 4, 1), SyncBatchNorm(4),
        nn.Conv2d(4, 4, 1), BatchRenorm2d(4),
    )  # fmt: skip
    with torch.no_grad():
        model[5].running_mean.normal_()
        model[5].running_std.uniform_(0.5, 2.0)
    folded = check_fold(model, torch.randn(2, 3, 4, 4), folds=2)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[3], nn.Identity)
    skipped = dict(fold(model.eval()).skipped)
    assert list(skipped) == ["5"] and "BatchRenorm2d" in skipped["5"]  # listed, never silently left


def test_strip_redundant_bias_before_batch_renorm() -> None:
    from batchnorm import BatchRenorm1d

    model = nn.Sequential(nn.Linear(3, 4), BatchRenorm1d(4, momentum=0.5, warmup_steps=0, r_max_steps=1, d_max_steps=1))
    with torch.no_grad():
        model[0].bias.normal_(0, 3)
        model[1].running_mean.normal_()
        model[1].running_std.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(5)  # r and d clipped at r_max=3, d_max=5
    assert [f.bn for f in find_redundant_biases(model)] == ["1"]
    stripped = strip_redundant_bias(model)
    assert stripped[0].bias is None
    x = torch.randn(8, 3)
    with torch.no_grad():
        assert rel_err(stripped(x), model(x)) <= 1e-5  # training: d depends on mu_B - mu
        model.eval()
        stripped.eval()
        assert rel_err(stripped(x), model(x)) <= 1e-5


class Residual(nn.Module):
    """Residual block whose conv is shared, and whose first conv output also feeds the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.bn3 = nn.BatchNorm2d(4)
        self.conv4 = nn.Conv2d(4, 4, 1)
        self.bn4 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        a = self.bn1(h) + h  # conv1's output is used twice: neither folded into conv1
        b = self.bn2(self.shared(a))  # shared conv: called twice
        c = self.bn3(self.shared(b))
        return self.bn4(self.conv4(torch.relu(c))) + a


def test_residual_block_shared_conv_never_corrupted() -> None:
    model = Residual()
    check_fold(model, torch.randn(2, 4, 6, 6), folds=1)
    skipped = dict(fold(model.eval()).skipped)
    assert "also used elsewhere" in skipped["bn1"]
    assert "shared" in skipped["bn2"] and "shared" in skipped["bn3"]


def test_torch_fx_fuser_corrupts_shared_conv_we_do_not() -> None:
    """Contrast: torch.fx.experimental.optimization.fuse on the shared conv above."""
    import warnings

    with warnings.catch_warnings():  # the module imports torch.jit (deprecated) at import time
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.fx.experimental.optimization import fuse

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) + self.conv(x)

    model = randomize_bn(Shared()).eval()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = model(x)
        theirs = rel_err(fuse(copy.deepcopy(model))(x), want)
        ours = rel_err(fold(model).model(x), want)
    assert ours <= 1e-6
    assert theirs > 1e-2  # torch 2.13 folds the BN into the conv that the skip path also uses


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.bn = BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.lin(batch["x"])))) * batch["w"]


def test_dict_input_model() -> None:
    model = DictModel()
    check_fold(model, {"x": torch.randn(5, 6), "w": torch.rand(5, 1)}, folds=1)


def test_untraceable_model_lists_every_bn() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.bn(self.lin(x))
            return x

    model = randomize_bn(Dynamic()).eval()
    result = fold(model)
    assert result.folded == []
    assert [name for name, _ in result.skipped] == ["bn"] and "torch.fx could not trace" in result.skipped[0][1]
    assert find_redundant_biases(model) == []
    with pytest.raises(ValueError, match="strip_redundant_bias: expected a model torch.fx can trace"):
        strip_redundant_bias(model)  # was a raw torch.fx TraceError
    assert model.lin.bias is not None


def test_training_mode_raises_and_unused_bn_listed() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="eval mode"):
        fold(model)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
            self.spare = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    result = fold(Holder().eval())
    assert result.folded == [("used.1", "used.0", "after")]
    assert ("spare", "not called by the model's forward") in result.skipped


def test_no_running_stats_is_reported() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    result = fold(model)
    assert result.folded == [] and "no running statistics" in result.skipped[0][1]


def test_example_inputs_guard_linear_on_3d_tensors() -> None:
    # Linear over the last dim of (N, 4, 4), then BatchNorm1d over dim 1: not the same axis
    model = randomize_bn(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))).eval()
    x = torch.randn(3, 4, 4)
    result = fold(model, example_inputs=(x,))
    assert result.folded == [] and "3D" in result.skipped[0][1]
    with torch.no_grad():
        assert torch.equal(result.model(x), model(x))
    ok = fold(model, example_inputs=(torch.randn(3, 4),))
    assert len(ok.folded) == 1


def test_inplace_and_dtype_device_requires_grad_kept() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)).half()
    randomize_bn(model).eval()
    model[0].weight.requires_grad_(False)
    conv_ref = copy.deepcopy(model[0]).double()
    bn_ref = copy.deepcopy(model[1])
    result = fold(model, inplace=True)
    assert result.model is model and isinstance(model[1], nn.Identity)
    conv = model[0]
    assert conv.weight.dtype == torch.float16 and conv.bias.dtype == torch.float16
    assert not conv.weight.requires_grad and not conv.bias.requires_grad
    # computed in float64, then rounded once
    w64, b64 = fold_bn_weights(
        conv_ref.weight, None, bn_ref.running_mean, bn_ref.running_var, bn_ref.eps, bn_ref.weight, bn_ref.bias
    )
    assert torch.equal(conv.weight, w64.half())
    assert torch.equal(conv.bias, b64.half())


# ---------------------------------------------------------------------- redundant bias


def bias_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 16, 10), nn.BatchNorm1d(10), nn.Linear(10, 3),
    )  # fmt: skip


def test_find_redundant_biases_counts_parameters() -> None:
    found = find_redundant_biases(bias_model())
    assert [(f.layer, f.bn, f.parameters) for f in found] == [("0", "1", 8), ("7", "8", 10)]
    # a conv whose output also feeds a skip path is not reported
    assert find_redundant_biases(Residual()) == [
        type(found[0])("conv4", "bn4", 4),
    ]


def test_strip_redundant_bias_keeps_train_and_eval_outputs() -> None:
    model = randomize_bn(bias_model())
    with torch.no_grad():
        model[0].bias.normal_(0, 3)
    before = copy.deepcopy(model.state_dict())
    stripped = strip_redundant_bias(model)
    assert stripped[0].bias is None and stripped[7].bias is None and model[0].bias is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    x = torch.randn(6, 3, 8, 8)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mode in ("eval", "train"):
            getattr(ref, mode)()
            getattr(stripped, mode)()
            assert rel_err(stripped(x), ref(x)) <= 1e-5, mode
        # after the training step both running means moved alike (shifted by the bias)
        assert_close(stripped[1].running_mean, ref[1].running_mean - ref[0].bias, rtol=1e-5, atol=1e-5)
        ref.eval()
        stripped.eval()
        assert rel_err(stripped(x), ref(x)) <= 1e-5
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in stripped.parameters()) == 18


# ----------------------------------------------------------------------------- freeze


def test_freeze_unfreeze_roundtrip() -> None:
    model = randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5), BatchNorm1d(5, momentum=0.3)
        )
    )
    model.eval()
    frozen = freeze(model)
    assert isinstance(frozen[1], FrozenBatchNorm2d) and isinstance(model[1], nn.BatchNorm2d)
    x = torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        want = model(x)
        frozen.train()
        got = frozen(x)  # training mode: still the frozen function, and nothing updates
        got2 = frozen(x)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got, got2)
    back = unfreeze(frozen)
    assert type(back[1]) is nn.BatchNorm2d and type(back[4]) is BatchNorm1d and back[4].momentum == 0.3
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back[1].training  # the frozen layer's flag


def test_freeze_unfreeze_keep_a_shared_batchnorm_shared() -> None:
    bn = nn.BatchNorm1d(3)
    model = randomize_bn(nn.Sequential(bn, nn.Tanh(), bn)).eval()
    x = torch.randn(6, 3)
    frozen = freeze(model)
    assert type(frozen[0]).__name__ == "FrozenBatchNorm1d" and frozen[2] is frozen[0]
    frozen.train()
    with torch.no_grad():
        assert_close(frozen(x), model(x), rtol=1e-6, atol=1e-6)
    back = unfreeze(frozen)
    assert type(back[0]) is nn.BatchNorm1d and back[2] is back[0]


def test_unfreeze_does_not_add_a_bias_to_a_bias_free_layer() -> None:
    model = nn.Sequential(BatchNorm2d(3, bias=False)).eval()
    with torch.no_grad():
        model[0].running_mean.normal_()
        model[0].weight.normal_()
    back = unfreeze(freeze(model))
    assert type(back[0]) is BatchNorm2d and back[0].bias is None
    assert list(back.state_dict()) == list(model.state_dict())
    back.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert_close(back.eval()(x), model(x), rtol=1e-6, atol=1e-6)


def test_freeze_ghost_batchnorm_keeps_its_rank() -> None:
    from batchnorm import FrozenBatchNorm1d, GhostBatchNorm1d

    model = randomize_bn(nn.Sequential(GhostBatchNorm1d(3, virtual_batch_size=2))).eval()
    frozen = freeze(model)
    assert type(frozen[0]) is FrozenBatchNorm1d
    x = torch.randn(6, 3)
    with torch.no_grad():
        assert_close(frozen(x), model(x), rtol=1e-6, atol=1e-6)
        back = unfreeze(frozen).eval()
        assert_close(back(x), model(x), rtol=1e-6, atol=1e-6)  # (N, C) accepted: a 1d layer


def test_update_bn_leaves_frozen_layers_alone() -> None:
    from torch.optim.swa_utils import update_bn

    frozen = freeze(randomize_bn(nn.Sequential(nn.BatchNorm1d(3))))
    before = frozen[0].running_var.clone()
    update_bn([torch.randn(10, 3) * 5], frozen)
    assert torch.equal(frozen[0].running_var, before)


def _random_conv(rng: np.random.Generator, transposed: bool) -> tuple[nn.Module, tuple[int, ...]]:
    d = int(rng.integers(1, 4))
    groups = int(rng.choice([1, 2, 3]))
    cin = groups * int(rng.integers(1, 3))
    cout = groups * int(rng.integers(1, 3))
    k = int(rng.integers(1, 4))
    stride = int(rng.integers(1, 3))
    dilation = int(rng.integers(1, 3))
    bias = bool(rng.integers(0, 2))
    kinds = {
        False: (nn.Conv1d, nn.Conv2d, nn.Conv3d),
        True: (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    }
    cls = kinds[transposed][d - 1]
    conv = cls(cin, cout, k, stride=stride, dilation=dilation, groups=groups, bias=bias)
    size = 7 if d < 3 else 5
    return conv, (2, cin) + (size,) * d


@pytest.mark.parametrize("seed", range(12))
def test_random_conv_configurations_fold_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    conv, shape = _random_conv(rng, transposed=bool(seed % 2))
    d = len(shape) - 2
    bn_cls = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[d - 1]
    after = nn.Sequential(conv, bn_cls(conv.out_channels))
    check_fold(after, torch.randn(shape), folds=1)
    if not conv.transposed:  # BN before a conv without padding
        before = nn.Sequential(bn_cls(conv.in_channels), copy.deepcopy(conv))
        check_fold(before, torch.randn(shape), folds=1)
