"""``small-batch``: Wu & He 2018 (Group Norm) and Ioffe 2017 (Batch Renorm) — test error against
the size of BN's normalization group, with i.i.d. and non-i.i.d. groups, for BN, Batch Renorm,
Ghost BN and Group Norm, judged over seeds.
Setup, the rules fixed before any run and each setting's source: ``small_batch.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ... import GhostBatchNorm1d
from ..claims_spec import Claims
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import listed, seeded
from ..experiment import Experiment, column, per_seed_values
from ..models import MLP, ConvNet
from ..normalizers import GroupedBatchNorm1d, GroupedBatchRenorm1d
from ..progress import Progress
from ..stacked import train_stacked
from ..training import TrainSpec, evaluate, minibatches
from ..verdict import part
from ._calibration import CALIBRATION_SEED, calibration_split

ID = "small-batch"
DESCRIPTION = "Wu & He 2018 / Ioffe 2017: test error vs BN group size (32..2) and non-i.i.d. groups for BN, Batch Renorm, Ghost BN, Group Norm"
QUICK_SECONDS = 25.0
_NORMS = ("bn", "brn", "ghost", "gn")
_LABELS = {"bn": "BN (per-group stats)", "brn": "Batch Renorm", "ghost": "Ghost BN", "gn": "Group Norm"}
_COLORS = {"bn": "tab:blue", "brn": "tab:green", "ghost": "tab:purple", "gn": "tab:orange"}
_GROUP_SIZES = {"tiny": (32, 2), "quick": (32, 8, 2), "full": (32, 16, 8, 4, 2)}

# Step counts from ``calibrate_steps`` (the rule: Settings.steps_rule; its history: small_batch.md)
_CALIBRATED_STEPS = {"digits": 500, "mnist1d": 2900}
_HAND_CHOSEN_BEFORE = {"mnist1d": 2400}  # what a data set used before its calibration was run
_TINY_STEPS = 40
_FULL_FACTOR = 10 / 3  # full mode trains 10/3 x the calibrated steps


@dataclass(frozen=True)
class Settings:
    """Every choice of this experiment (each field's meaning and source: ``small_batch.md``)."""

    model: str
    steps: int
    steps_rule: str
    group_sizes: tuple[int, ...]
    mnist1d_choice: str = ""
    hidden: tuple[int, ...] = (100, 100, 100)
    channels: tuple[int, ...] = (32, 32, 32)
    activation: str = "relu"
    placement: str = "normalization before each ReLU (Linear/conv bias dropped)"
    init: str = "PyTorch's default, seeded: every normalization of a seed starts from the same weights"
    batch_size: int = 32
    lr: float = 0.1
    non_iid_group: int = 4
    moving_average_momentum: float = 0.01
    renorm_schedule: str = (
        "r_max 1 and d_max 0 for the first 10% of the steps, then linear: d_max 5 at 50%, r_max 3 at 80%"
    )
    group_norm_groups: int = 4
    evaluation: str = "test set, eval mode: running statistics (BN, BRN, Ghost BN); GN needs none"
    seeds_trained: str = "all arms and seeds trained together (batchnorm.lab.stacked), each as if alone"
    flat_rise_at_most_pp: float = 2.5
    sharp_rise_at_least_pp: float = 10.0
    far_better_ratio: float = 2.0
    far_better_by_at_least_pp: float = 3.0
    bn_vs_gn_tolerance_pp: float = 1.0
    same_error_band_pp: float = 2.5


def _steps_rule(data_name: str, steps: int) -> str:
    before = _HAND_CHOSEN_BEFORE.get(data_name)
    earlier = f" (before this calibration, {before:,} steps chosen by hand on seed 0 were used)" if before else ""
    return (
        f"calibration on seed {CALIBRATION_SEED} (its own split: a stratified 80% of its training set trains, 20% validates; "
        "no test image): BN with m = 32 and Group Norm trained for up to 4x a default of 1,200 steps with "
        "validation checkpoints every 5% of that; steps = the first checkpoint at which BOTH reach within 1 pp of "
        f"their best validation error, rounded up to a multiple of 100; gave {steps} on {data_name}{earlier}"
    )


def calibrate_steps(
    data_name: str, *, max_steps: int = 4800, every: int = 240, tolerance_pp: float = 1.0
) -> dict[str, Any]:
    """The step-count rule (``Settings.steps_rule``) run on ``CALIBRATION_SEED``.

    Trains BN (m = 32) and Group Norm on the calibration split (``calibration_split``: a
    stratified 80% of the calibration seed's training set) and validates on the other 20% every ``every`` steps up to ``max_steps``; returns
    ``{"steps", "curves": {"bn": [...], "gn": [...]}, "checkpoints": [...]}`` where ``steps`` is
    the first checkpoint at which both validation errors are within ``tolerance_pp`` of their
    own best, rounded up to a multiple of 100.
    """
    from ..datasets import load

    data = calibration_split(load(data_name, CALIBRATION_SEED), CALIBRATION_SEED)
    cut = data.train_x.shape[0]
    s = _settings_for(data_name, "quick", steps=max_steps)
    arms = [
        [_model(data, s, _norm_factory("bn", s.batch_size, s), CALIBRATION_SEED)],
        [_model(data, s, _norm_factory("gn", s.batch_size, s), CALIBRATION_SEED)],
    ]
    gen = seeded(CALIBRATION_SEED + 2)
    streams = [minibatches(cut, s.batch_size, gen)]
    streams.append(minibatches(cut, s.batch_size, seeded(CALIBRATION_SEED + 2)))
    curves: dict[str, list[float]] = {"bn": [], "gn": []}
    checkpoints = []
    for done in range(every, max_steps + 1, every):
        # plain SGD has no optimizer state: training in chunks equals one long run
        train_stacked(
            arms,
            [data.train_x] * 2,
            [data.train_y] * 2,
            TrainSpec(steps=every, batch_size=s.batch_size, lr=s.lr),
            streams,
        )
        checkpoints.append(done)
        for name, arm in zip(("bn", "gn"), arms):
            curves[name].append(100.0 * (1.0 - evaluate(arm[0], data.test_x, data.test_y)[1]))
    reached = [
        next(c for c, e in zip(checkpoints, curves[name]) if e <= min(curves[name]) + tolerance_pp) for name in curves
    ]
    steps = int(math.ceil(max(reached) / 100.0) * 100)
    return {"steps": steps, "curves": curves, "checkpoints": checkpoints}


def _settings_for(data_name: str, mode: str, steps: int | None = None) -> Settings:
    model = "cnn1d" if data_name == "mnist1d" else "mlp"
    base = _CALIBRATED_STEPS.get(data_name, _CALIBRATED_STEPS["digits"])
    if steps is None:
        steps = {"tiny": _TINY_STEPS, "quick": base, "full": int(round(base * _FULL_FACTOR))}[mode]
    rule = _steps_rule(data_name if data_name in _CALIBRATED_STEPS else "digits (used for other data)", base)
    choice = ""
    if model == "cnn1d":
        choice = (
            "MNIST-1D: a 1-D CNN (three length-3 conv blocks of 32 channels, strides 1, 2, 2, normalization before each "
            "ReLU, global average pooling) instead of the digits MLP, whose 3x100 layers underfit MNIST-1D (~35% error); "
            f"{base} calibrated steps (see steps_rule)"
        )
    return Settings(model=model, steps=steps, steps_rule=rule, group_sizes=_GROUP_SIZES[mode], mnist1d_choice=choice)


def _model(data: Dataset, s: Settings, factory: Callable[[int], nn.Module], seed: int) -> nn.Module:
    """The MLP or the 1-D CNN, PyTorch's default init seeded by ``seed`` (the same weights for
    every normalization: the norm layers draw no random numbers)."""
    torch.manual_seed(seed + 1)
    if s.model == "cnn1d":
        return ConvNet(data.input_shape, list(s.channels), data.classes, act=s.activation, norm=factory)
    return MLP(data.features, list(s.hidden), data.classes, act=s.activation, norm=factory)


def _renorm_schedule(steps: int) -> dict[str, float | int]:
    return {
        "r_max": 3.0,
        "d_max": 5.0,
        "warmup_steps": steps // 10,
        "d_max_steps": steps // 2,
        "r_max_steps": 4 * steps // 5,
    }


def _norm_factory(norm: str, group_size: int, s: Settings) -> Callable[[int], nn.Module]:
    """The normalization layer of a hidden layer for ``norm`` in ("bn", "brn", "ghost", "gn")."""
    momentum = s.moving_average_momentum
    if norm == "bn":
        return lambda c: GroupedBatchNorm1d(c, group_size, momentum=momentum)
    if norm == "brn":
        sched = _renorm_schedule(s.steps)
        return lambda c: GroupedBatchRenorm1d(c, group_size, momentum=momentum, **sched)
    if norm == "ghost":
        return lambda c: GhostBatchNorm1d(c, group_size, momentum=momentum)
    if norm == "gn":
        return lambda c: nn.GroupNorm(s.group_norm_groups, c)
    raise ValueError(f"small-batch: expected norm in {_NORMS}, got {norm!r}")


def non_iid_batches(
    y: Tensor, classes: int, generator: torch.Generator, batch: int = 32, group: int = 4, per_class: int = 2
) -> Iterator[Tensor]:
    """Endless index batches of ``batch`` made of groups of ``group`` examples, each group holding
    ``group // per_class`` distinct random classes with ``per_class`` random examples of each.

    Shape: each yielded tensor is (batch,) int64; group g is entries g*group .. g*group + group - 1.
    """
    by_class = [torch.nonzero(y == c).flatten() for c in range(classes)]
    by_class = [idx for idx in by_class if idx.numel() > 0]
    k = group // per_class
    while True:
        parts = []
        for _ in range(batch // group):
            chosen = torch.randperm(len(by_class), generator=generator)[:k]
            for c in chosen.tolist():
                pool = by_class[c]
                parts.append(pool[torch.randint(pool.numel(), (per_class,), generator=generator)])
        yield torch.cat(parts)


def _arms(s: Settings) -> list[tuple[str, int, bool]]:
    """(norm, group size, i.i.d.) of every arm: BN and BRN at every m, Ghost BN below the batch
    (one ghost batch of 32 is BN itself), GN once, and the four at the non-i.i.d. group size.

    The 1-D CNN's convolutions cost about 1 ms per network and step however they are batched,
    so with it only the arms the claims read are trained: BRN at the largest and smallest m,
    and BN and BRN at the non-i.i.d. group size."""
    cnn = s.model == "cnn1d"
    ends = (max(s.group_sizes), min(s.group_sizes))
    arms = [("bn", m, True) for m in s.group_sizes]
    arms += [("brn", m, True) for m in s.group_sizes if not cnn or m in ends]
    arms += [("ghost", m, True) for m in s.group_sizes if m < s.batch_size]
    arms.append(("gn", s.batch_size, True))
    arms += [(norm, s.non_iid_group, False) for norm in (("bn", "brn") if cnn else _NORMS)]
    return arms


def _iid(m: dict[str, Any], norm: str, size: int, batch: int) -> float:
    """Test error (%) of ``norm`` at group size ``size`` in one seed's metrics (GN: any size;
    Ghost BN at the whole batch is BN)."""
    if norm == "gn":
        size = batch
    if norm == "ghost" and size >= batch:
        norm = "bn"
    return float(m["iid"][norm][str(size)]["test_error"])


def _has(m: dict[str, Any], norm: str, size: int, batch: int) -> bool:
    """Whether one seed's metrics hold ``norm`` at group size ``size`` (see ``_iid``)."""
    if norm == "gn":
        size = batch
    if norm == "ghost" and size >= batch:
        norm = "bn"
    return str(size) in m["iid"][norm]


def _claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Wu & He's curve shape, GN's advantage at tiny groups, BN vs GN at 32, BRN's recovery,
    and Ghost BN's limit — each judged over the seeds with paired differences (or ratios)."""
    t = results["config"]
    batch = int(t["batch_size"])
    sizes = sorted((int(v) for v in t["group_sizes"]), reverse=True)
    big, small = sizes[0], sizes[-1]
    mid_sizes = [v for v in sizes if 8 <= v < big]
    mid = min(mid_sizes) if mid_sizes else big

    def err(norm: str, size: int) -> list[float]:
        return per_seed_values(results, lambda m: _iid(m, norm, size, batch))

    def ni(norm: str) -> list[float]:
        return column(results["metrics"]["per_seed"], "non_iid", norm, "test_error")

    def mean(v: Sequence[float]) -> float:
        return float(np.mean(v))

    bn = {v: err("bn", v) for v in sizes}
    gn = err("gn", batch)
    brn = {v: err("brn", v) for v in (big, small)}  # the 1-D CNN trains BRN only at these
    ghost = {v: err("ghost", v) for v in sizes}
    flat, sharp = float(t["flat_rise_at_most_pp"]), float(t["sharp_rise_at_least_pp"])
    ratio, by = float(t["far_better_ratio"]), float(t["far_better_by_at_least_pp"])
    m_ni = int(t["non_iid_group"])

    def far_better(bad: Sequence[float], good: Sequence[float]) -> list[Any]:
        return [part(bad, good, effect="ratio", above=ratio), part(bad, good, above=by)]

    per_m = "; ".join(f"m={v}: {listed(bn[v])}" for v in sizes)
    make = Claims(__name__, results, big=big, mid=mid, small=small, m_ni=m_ni)
    return [
        make(
            "bn_curve_shape",
            a=bn[small],
            b=bn[big],
            also=[part(bn[mid], bn[big], below=flat)],
            evidence=f"BN test error per seed (%): {per_m}; rise at m={mid}: {mean(bn[mid]) - mean(bn[big]):+.1f} pp, "
            f"at m={small}: {mean(bn[small]) - mean(bn[big]):+.1f} pp (means)",
        ),
        make(
            "gn_far_better_at_small",
            a=bn[small],
            b=gn,
            also=far_better(bn[small], gn)[1:],
            evidence=f"GN {listed(gn)}% (every m); BN at m={small}: {listed(bn[small])}% (per seed)",
        ),
        make(
            "bn_as_good_as_gn_at_big",
            a=bn[big],
            b=gn,
            evidence=f"test error at m={big}: BN {listed(bn[big])}% vs GN {listed(gn)}% (per seed)",
        ),
        make(
            "brn_recovers",
            a=brn[big],
            b=bn[big],
            also=far_better(bn[small], brn[small]) + far_better(ni("bn"), ni("brn")),
            evidence=f"m={big}: BRN {listed(brn[big])}% vs BN {listed(bn[big])}%; m={small}: BRN {listed(brn[small])}% vs BN "
            f"{listed(bn[small])}%; non-i.i.d. m={m_ni}: BRN {listed(ni('brn'))}% vs BN {listed(ni('bn'))}% (per seed)",
        ),
        make(
            "ghost_limit",
            a=ghost[mid],
            b=bn[big],
            also=[part(ghost[small], bn[big], above=sharp)],
            evidence="Ghost BN test error per seed (%): "
            + "; ".join(f"m={v}: {listed(ghost[v])}" for v in sizes if v < big)
            + f" (full-batch BN {listed(bn[big])})"
            + (
                f"; non-i.i.d. groups of {m_ni}: Ghost BN {listed(ni('ghost'))}% vs per-group BN {listed(ni('bn'))}% (Ghost BN's "
                f"running averages use the whole batch of {batch})"
                if "ghost" in results["metrics"]["per_seed"][0]["non_iid"]
                else ""
            ),
        ),
    ]


def _figures(results: dict[str, Any], outdir: Path) -> list[Path]:
    """Test error vs group size (i.i.d.; mean ± std over seeds) and non-i.i.d. bars."""
    from ..figures import bar_values, categories, dress, log_ticks, pyplot, save

    plt = pyplot()
    t = results["config"]
    batch = int(t["batch_size"])
    per_seed = results["metrics"]["per_seed"]
    n = len(per_seed)
    sizes = sorted(int(v) for v in t["group_sizes"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    for norm in _NORMS:
        have = [v for v in sizes if all(_has(m, norm, v, batch) for m in per_seed)]  # arms not trained are left out
        errs = np.asarray([[_iid(m, norm, v, batch) for v in have] for m in per_seed])  # (seeds, sizes)
        label = (
            _LABELS[norm]
            + (" (independent of m)" if norm == "gn" else "")
            + (f", mean ± std of {n} seeds" if n > 1 else "")
        )
        ax.errorbar(
            have,
            errs.mean(axis=0),
            yerr=errs.std(axis=0) if n > 1 else None,
            marker="o",
            capsize=3,
            color=_COLORS[norm],
            linestyle="--" if norm == "gn" else "-",
            label=label,
        )
    ax.set_xscale("log", base=2)
    # every power of two from the smallest group to the largest, so the axis reads as a scale
    log_ticks(ax.xaxis, [2**k for k in range(int(np.log2(min(sizes))), int(np.log2(max(sizes))) + 1)])
    ax.invert_xaxis()
    ax.set(xlabel=f"examples per normalization group m ({batch} per SGD step)", ylabel="test error (%)")
    dress(ax, "Test error vs normalization group size (i.i.d. groups)", legend={"fontsize": 8})
    ax = axes[1]
    norms = [k for k in _NORMS if k in per_seed[0]["non_iid"]]
    vals = [float(np.mean([m["non_iid"][norm]["test_error"] for m in per_seed])) for norm in norms]
    ax.bar(range(len(norms)), vals, color=[_COLORS[k] for k in norms])
    bar_values(ax, vals, "{:.1f}", fontsize=9)
    categories(ax.xaxis, [_LABELS[k].replace(" (per-group stats)", "") for k in norms], fontsize=9)
    ax.set_ylabel(f"test error (%), mean of {n} seeds")
    ax.set_title(f"Non-i.i.d. groups of {t['non_iid_group']} (2 classes x 2 images)")
    return [save(fig, Path(outdir) / "error_vs_group_size.png")]


class SmallBatch(Experiment):
    """Wu & He's BN-vs-GN curve and Ioffe's Batch Renorm over several seeds."""

    ID, DESCRIPTION, QUICK_SECONDS = ID, DESCRIPTION, QUICK_SECONDS

    def settings(self, cfg: RunConfig) -> Settings:
        return _settings_for(cfg.data, cfg.mode)

    def run_seeds(
        self, settings: Settings, data: Sequence[Dataset], seeds: Sequence[int], progress: Progress
    ) -> list[dict[str, Any]]:
        s = settings
        arms = _arms(s)
        models = [
            [_model(d, s, _norm_factory(norm, m, s), seed) for d, seed in zip(data, seeds)] for norm, m, _iid in arms
        ]
        streams: list[Iterator[Tensor]] = []
        for _norm, m, iid in arms:
            for d, seed in zip(data, seeds):
                gen = seeded(seed + 2)
                streams.append(
                    minibatches(d.train_x.shape[0], s.batch_size, gen)
                    if iid
                    else non_iid_batches(d.train_y, d.classes, gen, s.batch_size, m)
                )
        xs = [d.train_x for _ in arms for d in data]
        ys = [d.train_y for _ in arms for d in data]
        spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=s.lr)
        with progress.task(f"{len(arms)} arms x {len(seeds)} seeds", total=s.steps) as tick:
            results = train_stacked(models, xs, ys, spec, streams, tick=tick)
        per_seed: list[dict[str, Any]] = [{"iid": {n: {} for n in _NORMS}, "non_iid": {}} for _ in seeds]
        k = 0
        for (norm, m, iid), arm in zip(arms, models):
            for j, (model, d) in enumerate(zip(arm, data)):
                r = results[k]
                k += 1
                _, test_acc = evaluate(model, d.test_x, d.test_y)
                _, train_acc = evaluate(model, d.train_x, d.train_y)
                rec = {
                    "test_error": 100.0 * (1.0 - test_acc),
                    "train_error_eval_mode": 100.0 * (1.0 - train_acc),
                    "final_train_loss": float(np.mean(r.losses[-50:])) if r.losses else None,
                    "diverged": r.diverged,
                }
                if iid:
                    per_seed[j]["iid"][norm][str(m)] = rec
                else:
                    per_seed[j]["non_iid"][norm] = rec
        return per_seed

    claims = staticmethod(_claims)
    figures = staticmethod(_figures)


EXPERIMENT = SmallBatch()
run, claims, figures = EXPERIMENT.run, EXPERIMENT.claims, EXPERIMENT.figures
