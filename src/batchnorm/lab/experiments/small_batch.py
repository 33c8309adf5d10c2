"""``small-batch``: Wu & He 2018 (Group Norm) and Ioffe 2017 (Batch Renorm) — test error against
the size of BN's normalization group (i.i.d. and not) for BN, Batch Renorm, Ghost BN, Group Norm.
Setup, the rules fixed before any run and each setting's source: ``small_batch.md``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ... import GhostBatchNorm1d
from ..claims_spec import Claims, Declared, beside, listed
from ..config import RunConfig
from ..datasets import Dataset
from ..declare import mlp_for, non_iid_batches, seeded
from ..experiment import Experiment, PerSeed, column
from ..figures import NamedFigures, bar_values, categories, dress, log_ticks, pyplot
from ..models import ConvNet
from ..normalizers import GroupedBatchNorm1d, GroupedBatchRenorm1d
from ..progress import Progress
from ..stacked import train_stacked
from ..training import TrainSpec, evaluate, minibatches
from ._calibration import CALIBRATION_SEED

_NORMS = ("bn", "brn", "ghost", "gn")
_LABELS = {"bn": "BN (per-group stats)", "brn": "Batch Renorm", "ghost": "Ghost BN", "gn": "Group Norm"}
_COLORS = {"bn": "tab:blue", "brn": "tab:green", "ghost": "tab:purple", "gn": "tab:orange"}


@functools.cache
def _calibrated_steps() -> dict[str, int]:
    """Quick mode's steps per data set, measured by ``scripts/calibrate_lab_steps.py`` (full mode:
    10/3 x, tiny: 40), from ``small_batch.steps.json`` beside this module."""
    return dict(json.loads(beside(__name__, ".steps.json").read_text(encoding="utf-8"))["steps"])


class Settings(Declared):
    """The settings the code computes or each mode sets; the others: ``small_batch.settings.toml``."""

    model: str
    steps: int
    steps_rule: str
    group_sizes: tuple[int, ...]
    mnist1d_choice: str


def _settings_for(data_name: str, mode: str, steps: int | None = None) -> Settings:
    model = "cnn1d" if data_name == "mnist1d" else "mlp"
    calibrated = _calibrated_steps()
    base = calibrated.get(data_name, calibrated["digits"])
    steps = {"tiny": 40, "quick": base, "full": int(round(base * (10 / 3)))}[mode] if steps is None else steps
    earlier = Settings.text("hand_chosen_before", steps=2400) if data_name == "mnist1d" else ""
    name = data_name if data_name in calibrated else "digits (used for other data)"
    rule = Settings.text("steps_rule", seed=CALIBRATION_SEED, steps=base, data=name, earlier=earlier)
    choice = Settings.text("mnist1d_choice", steps=base) if model == "cnn1d" else ""
    return Settings.of(mode, model=model, steps=steps, steps_rule=rule, mnist1d_choice=choice)


def _model(data: Dataset, s: Settings, norm: str, group_size: int, seed: int) -> nn.Module:
    """The MLP or the 1-D CNN with ``norm`` in ("bn", "brn", "ghost", "gn") over groups of
    ``group_size``, PyTorch's default init seeded by ``seed`` (the same weights for every
    normalization: the norm layers draw no random numbers)."""
    momentum = s.moving_average_momentum
    ends = {"warmup_steps": s.steps // 10, "d_max_steps": s.steps // 2, "r_max_steps": 4 * s.steps // 5}
    factories: dict[str, Callable[[int], nn.Module]] = {
        "bn": lambda c: GroupedBatchNorm1d(c, group_size, momentum=momentum),
        "brn": lambda c: GroupedBatchRenorm1d(c, group_size, momentum=momentum, r_max=3.0, d_max=5.0, **ends),
        "ghost": lambda c: GhostBatchNorm1d(c, group_size, momentum=momentum),
        "gn": lambda c: nn.GroupNorm(s.group_norm_groups, c),
    }
    torch.manual_seed(seed + 1)
    if s.model == "cnn1d":
        return ConvNet(data.input_shape, list(s.channels), data.classes, act=s.activation, norm=factories[norm])
    return mlp_for(data, s.hidden, act=s.activation, norm=factories[norm])


def _stream(s: Settings, d: Dataset, seed: int, group: int, iid: bool) -> Iterator[Tensor]:
    """Seed ``seed``'s minibatches of an arm: i.i.d., or non-i.i.d. groups of ``group``."""
    gen = seeded(seed + 2)
    if iid:
        return minibatches(d.train_x.shape[0], s.batch_size, gen)
    return non_iid_batches(d.train_y, d.classes, gen, s.batch_size, group)


def _arms(s: Settings) -> list[tuple[str, int, bool]]:
    """(norm, group size, i.i.d.) of every arm: BN and BRN at every m, Ghost BN below the batch
    (one ghost batch of 32 is BN itself), GN once, and the four at the non-i.i.d. group size;
    with the 1-D CNN only the arms the claims read (``small_batch.md``)."""
    cnn, ends = s.model == "cnn1d", (max(s.group_sizes), min(s.group_sizes))
    arms = [("bn", m, True) for m in s.group_sizes]
    arms += [("brn", m, True) for m in s.group_sizes if not cnn or m in ends]
    arms += [("ghost", m, True) for m in s.group_sizes if m < s.batch_size] + [("gn", s.batch_size, True)]
    arms += [(norm, s.non_iid_group, False) for norm in (("bn", "brn") if cnn else _NORMS)]
    return arms


def _iid(m: dict[str, Any], norm: str, size: int, batch: int) -> float:
    """Test error (%) of ``norm`` at group size ``size`` in one seed's metrics, NaN for an arm not
    trained (GN: any size; Ghost BN at the whole batch is BN)."""
    rec = m["iid"]["bn" if norm == "ghost" and size >= batch else norm].get(str(batch if norm == "gn" else size))
    return float(rec["test_error"]) if rec else math.nan


class SmallBatch(Experiment):
    """Wu & He's BN-vs-GN curve and Ioffe's Batch Renorm over several seeds."""

    DESCRIPTION = "Wu & He 2018 / Ioffe 2017: test error vs BN group size (32..2) and non-i.i.d. groups for BN, Batch Renorm, Ghost BN, Group Norm"

    def settings(self, cfg: RunConfig) -> Settings:
        return _settings_for(cfg.data, cfg.mode)

    def run_seeds(self, settings: Settings, data: Seq[Dataset], seeds: Seq[int], progress: Progress) -> PerSeed:
        s, arms = settings, _arms(settings)
        models = [[_model(d, s, norm, m, seed) for d, seed in zip(data, seeds)] for norm, m, _ in arms]
        streams = [_stream(s, d, seed, m, iid) for _, m, iid in arms for d, seed in zip(data, seeds)]
        xs, ys = [d.train_x for _ in arms for d in data], [d.train_y for _ in arms for d in data]
        spec = TrainSpec(steps=s.steps, batch_size=s.batch_size, lr=s.lr)
        with progress.task(f"{len(arms)} arms x {len(seeds)} seeds", total=s.steps) as tick:
            runs = iter(train_stacked(models, xs, ys, spec, streams, tick=tick))
        per_seed: PerSeed = [{"iid": {n: {} for n in _NORMS}, "non_iid": {}} for _ in seeds]
        for (norm, m, iid), arm in zip(arms, models):
            for rec, model, d, r in zip(per_seed, arm, data, runs):
                (rec["iid"][norm] if iid else rec["non_iid"])[str(m) if iid else norm] = {
                    "test_error": 100.0 * (1.0 - evaluate(model, d.test_x, d.test_y)[1]),
                    "train_error_eval_mode": 100.0 * (1.0 - evaluate(model, d.train_x, d.train_y)[1]),
                    "final_train_loss": float(np.mean(r.losses[-50:])) if r.losses else None,
                    "diverged": r.diverged,
                }
        return per_seed

    def claims(self, results: dict[str, Any]) -> list[dict[str, Any]]:
        """Wu & He's curve shape, GN's advantage at tiny groups, BN vs GN at 32, BRN's recovery,
        and Ghost BN's limit — each judged over the seeds with paired differences (or ratios)."""
        t, per_seed = results["config"], results["metrics"]["per_seed"]
        batch, m_ni = int(t["batch_size"]), int(t["non_iid_group"])
        sizes = sorted((int(v) for v in t["group_sizes"]), reverse=True)
        big, small = sizes[0], sizes[-1]
        mid = min([v for v in sizes if 8 <= v < big] or [big])

        def err(norm: str, size: int) -> list[float]:
            return [_iid(m, norm, size, batch) for m in per_seed]

        bn, ghost = ({v: err(norm, v) for v in sizes} for norm in ("bn", "ghost"))
        at = {"big": big, "mid": mid, "small": small}
        ni = {f"ni_{norm}": column(per_seed, "non_iid", norm, "test_error") for norm in per_seed[0]["non_iid"]}
        ghost_non_iid = ""
        if "ni_ghost" in ni:
            ghost_non_iid = (
                f"; non-i.i.d. groups of {m_ni}: Ghost BN {listed(ni['ni_ghost'])}% vs per-group BN "
                f"{listed(ni['ni_bn'])}% (Ghost BN's running averages use the whole batch of {batch})"
            )
        return Claims(
            __name__,
            results,
            **{f"bn_{k}": bn[v] for k, v in at.items()},
            **{f"brn_{k}": err("brn", at[k]) for k in ("big", "small")},  # the 1-D CNN trains BRN only at these
            **{f"ghost_{k}": ghost[at[k]] for k in ("mid", "small")},
            **{f"rise_{k}": float(np.mean(bn[at[k]])) - float(np.mean(bn[big])) for k in ("mid", "small")},
            **ni,
            gn=err("gn", batch),
            bn_by_size="; ".join(f"m={v}: {listed(bn[v])}" for v in sizes),
            ghost_by_size="; ".join(f"m={v}: {listed(ghost[v])}" for v in sizes if v < big),
            ghost_non_iid=ghost_non_iid,
            **at,
            m_ni=m_ni,
        ).all()

    def figures(self, results: dict[str, Any]) -> NamedFigures:
        """Test error vs group size (i.i.d.; mean ± std over seeds) and non-i.i.d. bars."""
        t, per_seed = results["config"], results["metrics"]["per_seed"]
        batch, n, sizes = int(t["batch_size"]), len(per_seed), sorted(int(v) for v in t["group_sizes"])
        fig, (ax, bars) = pyplot().subplots(1, 2, figsize=(12, 4.3), gridspec_kw={"width_ratios": [3, 2]})
        for norm in _NORMS:
            have = [v for v in sizes if not any(math.isnan(_iid(m, norm, v, batch)) for m in per_seed)]  # trained arms
            errs = np.asarray([[_iid(m, norm, v, batch) for v in have] for m in per_seed])  # (seeds, sizes)
            gn, std = norm == "gn", errs.std(axis=0) if n > 1 else None
            seeds = f", mean ± std of {n} seeds" if n > 1 else ""
            label = _LABELS[norm] + (" (independent of m)" if gn else "") + seeds
            style = {"marker": "o", "capsize": 3, "color": _COLORS[norm], "linestyle": "--" if gn else "-"}
            ax.errorbar(have, errs.mean(axis=0), yerr=std, label=label, **style)
        # every power of two from the smallest group to the largest, so the axis reads as a scale
        log_ticks(ax.xaxis, [2**k for k in range(int(np.log2(min(sizes))), int(np.log2(max(sizes))) + 1)], base=2)
        ax.invert_xaxis()
        xlabel = f"examples per normalization group m ({batch} per SGD step)"
        title = "Test error vs normalization group size (i.i.d. groups)"
        dress(ax, title, xlabel=xlabel, ylabel="test error (%)", legend={"fontsize": 8})
        norms = [k for k in _NORMS if k in per_seed[0]["non_iid"]]
        vals = [float(np.mean([m["non_iid"][norm]["test_error"] for m in per_seed])) for norm in norms]
        bars.bar(range(len(norms)), vals, color=[_COLORS[k] for k in norms])
        bar_values(bars, vals, "{:.1f}", fontsize=9)
        categories(bars.xaxis, [_LABELS[k].replace(" (per-group stats)", "") for k in norms], fontsize=9)
        title = f"Non-i.i.d. groups of {t['non_iid_group']} (2 classes x 2 images)"
        dress(bars, title, ylabel=f"test error (%), mean of {n} seeds")
        yield "error_vs_group_size.png", fig


EXPERIMENT = SmallBatch()
