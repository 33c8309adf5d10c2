"""Tests for the batch-norm doctor: ``batchnorm.diagnose`` and ``batchnorm.watch``.

PYTHONPATH=src python -m pytest -q tests/test_doctor.py

One test per code, each with a model that has that problem and no other (the finding list is
compared whole), for torch's layers and ours; a normally trained model gets no finding from
either; neither changes the model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

import batchnorm
from batchnorm.tools import CODES, Finding, format_findings


class TimmLikeBatchNormAct(nn.BatchNorm1d):
    """A third-party subclass of torch's layer that overrides forward (as timm's BatchNormAct2d)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(input))


LAYERS: dict[str, Callable[..., nn.Module]] = {
    "torch": nn.BatchNorm1d,
    "ours": batchnorm.BatchNorm1d,
}
"""The two layers every code is tested with."""

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    **LAYERS,
    "torch-sync": nn.SyncBatchNorm,
    "ours-sync": batchnorm.SyncBatchNorm,
    "ghost": lambda c, **kw: batchnorm.GhostBatchNorm1d(c, 8, **kw),
    "renorm": lambda c, **kw: batchnorm.BatchRenorm1d(c, **{"momentum": 0.1, **kw}),
    "act": batchnorm.BatchNormAct1d,
    "timm-like": TimmLikeBatchNormAct,
}
"""Every kind of trainable batch norm (single process: the sync layers act as plain BN)."""


def net(bn: nn.Module, bias: bool = False) -> nn.Sequential:
    """Linear(8, C) - BN - ReLU - Linear(C, 3): the batch norm is ``model[1]``."""
    c = int(bn.num_features)
    return nn.Sequential(nn.Linear(8, c, bias=bias), bn, nn.ReLU(), nn.Linear(c, 3))


def batch(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen) * 2 + 1 + shift
    return x, (x[:, 0] > 1).long() + (x[:, 1] > 1).long()


def train(model: nn.Module, sizes: list[int], *, seed: int = 0, wrap: Callable[..., Any] | None = None) -> None:
    """SGD steps on batches of the given sizes (``wrap(model, x)`` instead of ``model(x)`` if given)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9) if params else None
    for i, n in enumerate(sizes):
        x, y = batch(n, seed + i)
        out = wrap(model, x.requires_grad_()) if wrap is not None else model(x)
        loss = F.cross_entropy(out, y)
        if opt is not None:
            opt.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()


def codes(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.code, f.layer) for f in findings]


def test_codes_are_the_documented_strings() -> None:
    assert CODES == (
        "keras-momentum",
        "low-precision-stats",
        "redundant-bias",
        "batch-stats-at-eval",
        "non-finite-stats",
        "frozen-in-train",
        "stale-statistics",
        "small-batch",
        "train-mode-under-no-grad",
        "updated-in-backward",
        "non-finite-batch",
    )


def test_public_api() -> None:
    assert batchnorm.diagnose is batchnorm.tools.diagnose
    assert batchnorm.watch is batchnorm.tools.watch
    assert batchnorm.Finding is Finding
    assert {"diagnose", "watch", "Finding"} <= set(batchnorm.__all__)
    f = Finding("small-batch", "bn", "m.", "f.")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.code = "x"  # type: ignore[misc]
    assert str(f) == "bn: small-batch: m. Fix: f."


# ------------------------------------------------------------------------- no false alarms


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_normally_trained_model_has_no_finding(kind: str) -> None:
    torch.manual_seed(0)
    model = net(VARIANTS[kind](16))
    with batchnorm.watch(model) as w:
        train(model, [32] * 40)
        model.eval()
        with torch.no_grad():
            model(batch(64, 100)[0])
    assert w.findings == []
    assert batchnorm.diagnose(model) == []
    held_out = [batch(64, 200 + i) for i in range(4)]
    assert batchnorm.diagnose(model, held_out) == []


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_frozen_layers_and_eval_forwards_are_quiet(kind: str) -> None:
    model = batchnorm.freeze(net(LAYERS[kind](16)).eval())
    assert isinstance(model[1], batchnorm.FrozenBatchNorm1d)
    with batchnorm.watch(model) as w:
        train(model, [4, 4])  # a frozen layer's statistics never move: small batches are fine
    assert w.findings == []
    assert batchnorm.diagnose(model) == []


# ---------------------------------------------------------------- one test per code: model alone


def eval_net(kind: str, **kw: Any) -> nn.Sequential:
    torch.manual_seed(0)
    return net(VARIANTS[kind](16, **kw)).eval()


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_keras_momentum(kind: str) -> None:
    model = eval_net(kind, momentum=0.99)
    (f,) = batchnorm.diagnose(model)
    assert codes([f]) == [("keras-momentum", "1")]
    assert "momentum=0.99" in f.message and "set momentum=0.01" in f.fix and "from_keras" in f.fix


def test_momentum_at_the_limit_and_none_are_fine() -> None:
    for momentum in (0.5, None, 0.1):
        assert batchnorm.diagnose(eval_net("ours", momentum=momentum)) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_low_precision_stats(kind: str, dtype: torch.dtype) -> None:
    model = eval_net(kind).to(dtype)
    (f,) = batchnorm.diagnose(model)
    assert codes([f]) == [("low-precision-stats", "1")]
    assert str(dtype).removeprefix("torch.") in f.message and ".float()" in f.fix
    model[1].float()  # the fix
    assert batchnorm.diagnose(model) == []


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_redundant_bias(kind: str) -> None:
    torch.manual_seed(0)
    model = net(VARIANTS[kind](16), bias=True).eval()
    (f,) = batchnorm.diagnose(model)
    assert codes([f]) == [("redundant-bias", "1")]
    assert "Linear '0'" in f.message and "16 parameters" in f.message and "strip_redundant_bias" in f.fix
    assert batchnorm.diagnose(batchnorm.strip_redundant_bias(model)) == []


@pytest.mark.parametrize("kind", sorted(set(VARIANTS) - {"renorm"}))  # renorm always keeps statistics
def test_batch_stats_at_eval(kind: str) -> None:
    model = eval_net(kind, track_running_stats=False)
    assert codes(batchnorm.diagnose(model)) == [("batch-stats-at-eval", "1")]


@pytest.mark.parametrize("kind", sorted(VARIANTS) + ["frozen"])
def test_non_finite_stats(kind: str) -> None:
    model = eval_net("ours") if kind == "frozen" else eval_net(kind)
    if kind == "frozen":
        model = batchnorm.freeze(model)
    with torch.no_grad():
        model[1].running_mean[3] = math.nan
        stat = "running_std" if kind == "renorm" else "running_var"
        getattr(model[1], stat)[[5, 6]] = math.inf
    (f,) = batchnorm.diagnose(model)
    assert codes([f]) == [("non-finite-stats", "1")]
    assert "running_mean: 1 of 16" in f.message and f"{stat}: 2 of 16" in f.message
    assert "recompute_statistics" in f.fix


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_frozen_in_train(kind: str) -> None:
    model = eval_net(kind)
    model[1].requires_grad_(False)
    assert batchnorm.diagnose(model) == []  # eval mode: the statistics do not move
    model.train()
    (f,) = batchnorm.diagnose(model)
    assert codes([f]) == [("frozen-in-train", "1")] and "model.train()" in f.fix
    freezable = kind not in ("act", "timm-like", "renorm")  # freeze leaves layers with their own forward alone
    assert ("batchnorm.freeze(model)" in f.fix) == freezable
    with batchnorm.watch(model) as w:
        train(model, [32, 32, 32])
    (f,) = w.findings
    assert codes([f]) == [("frozen-in-train", "1")] and "3 of 3 training forward(s)" in f.message
    if freezable:
        assert batchnorm.diagnose(batchnorm.freeze(model)) == []
    model[1].eval()  # the other fix
    assert batchnorm.diagnose(model) == []


# ------------------------------------------------------------- stale-statistics (with batches)


def _set_stats(bn: nn.Module, mean: np.ndarray, var: np.ndarray) -> None:
    with torch.no_grad():
        bn.running_mean.copy_(torch.from_numpy(mean))
        if isinstance(bn, batchnorm.BatchRenorm1d):
            bn.running_std.copy_(torch.from_numpy(np.sqrt(var + bn.eps)))
        else:
            bn.running_var.copy_(torch.from_numpy(var))


@pytest.mark.parametrize("kind", sorted(LAYERS) + ["renorm", "ghost", "frozen"])
@pytest.mark.parametrize(
    ("mean_off", "var_ratio", "expect"),
    [
        (0.45, 1.0, False),
        (-0.45, 1.45, False),
        (0.0, 1 / 1.45, False),
        (0.55, 1.0, True),
        (-0.55, 1.0, True),
        (0.0, 1.55, True),
        (0.0, 1 / 1.55, True),
    ],
)
def test_stale_statistics_rule_against_numpy(kind: str, mean_off: float, var_ratio: float, expect: bool) -> None:
    """Running statistics placed at a given distance from NumPy float64 population statistics."""
    gen = np.random.default_rng(0)
    scale = np.array([1.0, 0.5, 2.0, 0.1])
    x = (gen.standard_normal((600, 4)) * scale + np.array([0.0, 3.0, -2.0, 10.0])).astype(np.float32)
    ref = x.astype(np.float64)
    mean, var = ref.mean(0), ref.var(0, ddof=1)
    bn = (batchnorm.BatchNorm1d(4) if kind == "frozen" else VARIANTS[kind](4)).double()
    eps = bn.eps
    off_mean, off_var = mean.copy(), var.copy()
    off_mean[2] += mean_off * np.sqrt(var[2] + eps)  # channel 2 alone is off
    off_var[2] = (var[2] + eps) * var_ratio - eps
    _set_stats(bn, off_mean, off_var)
    model = nn.Sequential(bn).eval()
    if kind == "frozen":
        model = batchnorm.freeze(model)
    batches = [torch.from_numpy(b).double() for b in np.split(x, 6)]
    found = batchnorm.diagnose(model, batches)
    if not expect:
        assert found == []
        return
    (f,) = found
    assert codes([f]) == [("stale-statistics", "0")]
    assert "on 1 of 4 channels" in f.message and "600 values per channel" in f.message
    assert "channel 2" in f.message and "recompute_statistics" in f.fix


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_stale_statistics_after_the_data_moved(kind: str) -> None:
    torch.manual_seed(0)
    model = net(LAYERS[kind](16))
    train(model, [32] * 40)
    model.eval()
    assert batchnorm.diagnose(model, [batch(64, 300 + i) for i in range(3)]) == []
    moved = [batch(64, 300 + i, shift=3.0) for i in range(3)]
    assert codes(batchnorm.diagnose(model, moved)) == [("stale-statistics", "1")]
    batchnorm.recompute_statistics(model, moved)  # the fix
    assert batchnorm.diagnose(model, moved) == []


def test_diagnose_takes_one_tensor_and_a_forward() -> None:
    model = eval_net("ours")
    x = batch(64, 1, shift=5.0)[0]
    assert codes(batchnorm.diagnose(model, x)) == [("stale-statistics", "1")]
    seen = []
    found = batchnorm.diagnose(model, [{"inp": x}], forward=lambda m, b: seen.append(1) or m(b["inp"]))
    assert codes(found) == [("stale-statistics", "1")] and seen == [1]


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(TypeError, match="expected an nn.Module, got str"):
        batchnorm.diagnose("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected batches to be None, a tensor, or an iterable"):
        batchnorm.diagnose(eval_net("ours"), 3)
    with pytest.raises(TypeError, match="watch: expected an nn.Module, got int"):
        batchnorm.watch(3)  # type: ignore[arg-type]


# --------------------------------------------------------------- one test per code: watch


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_small_batch(kind: str) -> None:
    torch.manual_seed(0)
    model = net(VARIANTS[kind](16))
    with batchnorm.watch(model) as w:
        train(model, [32, 16, 15, 32, 9])  # 16 is enough, 15 is not
    if kind == "renorm":  # batch renorm is the remedy for small batches
        assert w.findings == []
        return
    (f,) = w.findings
    assert codes([f]) == [("small-batch", "1")]
    assert "2 of 5 training forward(s)" in f.message and "smallest: 9" in f.message and "drop_last" in f.fix


def test_small_batch_by_keyword_call() -> None:
    class KeywordCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = batchnorm.BatchNorm1d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(input=x)

    model = KeywordCall()
    with batchnorm.watch(model) as w:
        model(torch.randn(4, 8))
    assert codes(w.findings) == [("small-batch", "bn")]


@pytest.mark.parametrize("grad_off", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_train_mode_under_no_grad(kind: str, grad_off: str) -> None:
    torch.manual_seed(0)
    model = net(VARIANTS[kind](16))
    context = torch.no_grad if grad_off == "no_grad" else torch.inference_mode
    with batchnorm.watch(model) as w:
        train(model, [32, 32])
        with context():  # an evaluation that forgot model.eval()
            model(batch(64, 50)[0])
            model(batch(64, 51)[0])
    (f,) = w.findings
    assert codes([f]) == [("train-mode-under-no-grad", "1")]
    assert "2 of 4 training forward(s)" in f.message and "model.eval()" in f.fix
    assert ("torch.no_grad" if grad_off == "no_grad" else "inference_mode") in f.message


def test_no_grad_without_statistics_update_is_not_reported() -> None:
    """recompute_statistics(mode="train") runs batch norms in training mode under no_grad, on purpose."""
    model = net(batchnorm.BatchNorm1d(16))
    with batchnorm.watch(model) as w:
        batchnorm.recompute_statistics(model, [batch(64, 0)[0]], mode="train")
    assert w.findings == []


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_updated_in_backward(kind: str, reentrant: bool) -> None:
    """torch's layer updates again in every recomputed forward, and is reported; ours is
    checkpoint-safe (one update per step), and nothing is reported."""
    torch.manual_seed(0)
    model = net(LAYERS[kind](16))
    with batchnorm.watch(model) as w:
        train(model, [32] * 3, wrap=lambda m, x: checkpoint(m, x, use_reentrant=reentrant))
    if kind == "ours":
        assert int(model[1].num_batches_tracked) == 3 and w.findings == []
        return
    assert int(model[1].num_batches_tracked) == 6  # the truth: two updates per step
    (f,) = w.findings
    assert codes([f]) == [("updated-in-backward", "1")]
    assert "updated 3 time(s)" in f.message and "3 forward(s) recomputed" in f.message


def _keep_statistics_on_recompute(model: nn.Module) -> tuple[contextlib.AbstractContextManager[None], Any]:
    """checkpoint's context_fn: the recomputation's running-statistics update is undone."""

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        state = [
            (buf, buf.clone())
            for m in model.modules()
            if isinstance(m, _BatchNorm) and m.running_mean is not None
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        ]
        try:
            yield
        finally:
            with torch.no_grad():
                for buf, saved in state:
                    buf.copy_(saved)

    return contextlib.nullcontext(), recompute()


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_recomputation_without_update_is_not_reported(kind: str) -> None:
    torch.manual_seed(0)
    model = net(LAYERS[kind](16))

    def wrap(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(m, x, use_reentrant=False, context_fn=lambda: _keep_statistics_on_recompute(m))

    with batchnorm.watch(model) as w:
        train(model, [32] * 3, wrap=wrap)
    assert int(model[1].num_batches_tracked) == 3
    assert w.findings == []


def test_checkpoint_that_stops_before_the_update_is_not_reported() -> None:
    """Non-reentrant checkpointing stops recomputing once the saved tensors are back: with our
    layer last in the segment, its running-statistics update is not re-run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, bias=False), batchnorm.BatchNorm1d(16))
    with batchnorm.watch(model) as w:
        for i in range(3):
            x = batch(32, i)[0].requires_grad_()
            checkpoint(model, x, use_reentrant=False).square().mean().backward()
    assert int(model[1].num_batches_tracked) == 3
    assert w.findings == []


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_non_finite_batch(kind: str) -> None:
    torch.manual_seed(0)
    model = net(VARIANTS[kind](16))
    bad = batch(32, 7)[0]
    bad[3, 2] = math.nan
    with batchnorm.watch(model) as w, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # our layers warn once about the skipped batch
        train(model, [32])
        model(bad)
        train(model, [32])
    (f,) = w.findings
    assert codes([f]) == [("non-finite-batch", "1")]
    # torch's layers wrote the NaN into their statistics: the first such batch is all that is visible
    ours = isinstance(model[1], batchnorm.BatchNormBase | batchnorm.BatchRenorm1d)
    at_least = "" if ours else "at least "
    assert f"{at_least}1 of 3 training forward(s)" in f.message


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_non_finite_batches_counted_without_running_statistics(kind: str) -> None:
    torch.manual_seed(0)
    model = net(LAYERS[kind](16, track_running_stats=False))
    bad = batch(32, 7)[0]
    bad[3, 2] = math.inf
    with batchnorm.watch(model) as w:
        for x in (bad, batch(32, 1)[0], bad, bad * 0):  # inf * 0 = NaN
            model(x)
    assert [(f.code, f.message.split(" saw")[0]) for f in w.findings] == [
        ("non-finite-batch", "3 of 4 training forward(s)")
    ]


# -------------------------------------------------------------------- the model is not changed


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _same(model: nn.Module, snap: tuple[dict[str, torch.Tensor], list[bool]]) -> None:
    state, flags = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v) or (v.is_floating_point() and torch.equal(now[k].isnan(), v.isnan())), k
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_diagnose_changes_nothing(kind: str) -> None:
    torch.manual_seed(0)
    model = net(VARIANTS[kind](16), bias=True)
    train(model, [32] * 3)
    model[1].momentum = 0.9
    model[3].eval()  # mixed flags: they must come back as they were
    snap = _snapshot(model)
    found = batchnorm.diagnose(model, [batch(64, 9, shift=2.0)])
    assert {f.code for f in found} >= {"keras-momentum", "redundant-bias", "stale-statistics"}
    _same(model, snap)


def test_diagnose_restores_flags_when_the_forward_fails() -> None:
    model = net(batchnorm.BatchNorm1d(16)).train()
    snap = _snapshot(model)
    with pytest.raises(RuntimeError):
        batchnorm.diagnose(model, [torch.randn(4, 5)])  # wrong input width
    _same(model, snap)


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_watch_changes_nothing(kind: str) -> None:
    torch.manual_seed(0)
    watched = net(LAYERS[kind](16))
    plain = copy.deepcopy(watched)
    with batchnorm.watch(watched) as w:
        train(watched, [32, 8, 32])
    train(plain, [32, 8, 32])
    assert codes(w.findings) == [("small-batch", "1")]
    _same(watched, _snapshot(plain))


def test_watch_removes_its_hooks_on_error_and_can_be_reused() -> None:
    model = net(batchnorm.BatchNorm1d(16))
    w = batchnorm.watch(model)
    with pytest.raises(ZeroDivisionError), w:
        model(torch.randn(4, 8))
        1 / 0  # noqa: B018
    assert codes(w.findings) == [("small-batch", "1")]
    assert all(not m._forward_pre_hooks for m in model.modules())
    with w:
        model(torch.randn(32, 8))
    assert w.findings == []
    with pytest.raises(RuntimeError, match="already active"), w, w:
        pass


# -------------------------------------------------------------------------------- the table


def test_format_findings_wraps_to_width() -> None:
    model = net(batchnorm.BatchNorm1d(16, momentum=0.99), bias=True).eval()
    found = batchnorm.diagnose(model)
    table = format_findings(found, width=120)
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "code", "message", "fix"]
    assert all(len(line) <= 120 for line in lines)
    words = " ".join(lines[2:]).split()
    for f in found:  # every word whole (never split), in the rows
        for word in (f.code, *f.message.split(), *f.fix.split()):
            assert word in words
    assert format_findings([]) == "no findings"


def test_a_batch_norm_alone_is_the_model() -> None:
    bn = batchnorm.BatchNorm1d(4, momentum=0.9)
    (f,) = batchnorm.diagnose(bn)
    assert codes([f]) == [("keras-momentum", "")]
    assert format_findings([f]).splitlines()[2].startswith("<model>  keras-momentum")
    assert str(f).startswith("<model>: keras-momentum: momentum=0.9")
