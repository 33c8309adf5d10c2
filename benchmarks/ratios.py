"""Ours/torch from interleaved rounds, with its 95% interval.

Each round times both candidates back to back, so a round's ratio ``ours_r / torch_r`` (of the
round's median times) cancels what drifts between rounds: the machine's load, its clock. Over R
rounds, the ratio is the geometric mean of the rounds' ratios and its interval Student's t
interval on their logarithms (R - 1 degrees of freedom):

    l_r = log(ours_r / torch_r),   ratio = exp(mean l),   exp(mean l +- t(0.975, R-1) * sd(l) / sqrt(R))

An interval that contains 1 is a difference the run cannot detect; ours is slower only where the
whole interval lies above 1.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from batchnorm.lab.verdict import t_quantile

__all__ = ["ratio"]


def ratio(ours: Sequence[float], theirs: Sequence[float]) -> tuple[float, float, float]:
    """(ratio, low, high) from per-round times ``ours[r]``, ``theirs[r]`` (the module docstring);
    the interval is (0, inf) with a single round."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"ratio: expected one time per round for each, got {len(ours)} and {len(theirs)}")
    logs = [math.log(o / t) for o, t in zip(ours, theirs)]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), 0.0, math.inf
    half = t_quantile(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)
