"""What the doctor reports: a `Finding`, the codes, their limits, and a text table."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = [
    "CODES",
    "Finding",
    "format_findings",
    "KERAS_MOMENTUM",
    "SMALL_BATCH",
    "STALE_MEAN_SHIFT",
    "STALE_VAR_RATIO",
    "updates_running_stats",
]

CODES: tuple[str, ...] = (
    # from the model alone (diagnose)
    "keras-momentum",
    "low-precision-stats",
    "redundant-bias",
    "batch-stats-at-eval",
    "non-finite-stats",
    "frozen-in-train",
    # from the model and data (diagnose with batches)
    "stale-statistics",
    # from what a block of code does (watch)
    "small-batch",
    "train-mode-under-no-grad",
    "updated-in-backward",
    "non-finite-batch",
)
"""Every finding code, in the order findings of one layer are listed. ``frozen-in-train`` is
reported by `diagnose` (the layer's current state) and by
`watch` (forwards that happened)."""

KERAS_MOMENTUM = 0.5
"""``keras-momentum``: a momentum above this weights the new batch more than the running value."""
SMALL_BATCH = 16
"""``small-batch``: a training forward with fewer examples than this (over all processes for sync layers)."""
STALE_MEAN_SHIFT = 0.5
"""``stale-statistics``: running mean more than this many population stds from the population mean."""
STALE_VAR_RATIO = 1.5
"""``stale-statistics``: running / population variance outside [1 / this, this]."""


@dataclass(frozen=True)
class Finding:
    """One problem of one batch-norm layer.

    Findings are aggregated: one per (code, layer), with counts in the message.
    """

    code: str
    """What kind of problem: one of `CODES` (e.g. ``"small-batch"``)."""
    layer: str
    """Qualified name of the batch-norm layer (as in ``model.named_modules()``; ``""`` for the model itself)."""
    message: str
    """What is wrong, with the numbers."""
    fix: str
    """What to do, naming the tool of this library that helps where there is one."""

    def __str__(self) -> str:
        return f"{self.layer or '<model>'}: {self.code}: {self.message} Fix: {self.fix}"


def updates_running_stats(m: nn.Module) -> bool:
    """Whether a training-mode forward of batch-norm layer ``m`` writes into its running statistics.

    False for frozen layers, layers without running statistics or with ``track_running_stats``
    off, and ``momentum=0``; ``momentum=None`` (cumulative average) updates.
    """
    if getattr(m, "frozen", False) or not isinstance(getattr(m, "running_mean", None), Tensor):
        return False
    if getattr(m, "track_running_stats", True) is False:
        return False
    return getattr(m, "momentum", None) != 0


def format_findings(findings: list[Finding], *, width: int = 120) -> str:
    """A plain-text table (layer, code, message, fix), message and fix wrapped at word boundaries to
    fit ``width`` (at least 80 characters go to these two columns)."""
    if not findings:
        return "no findings"
    head = ("layer", "code", "message", "fix")
    layer_w = max(len(head[0]), *(len(f.layer or "<model>") for f in findings))
    code_w = max(len(head[1]), *(len(f.code) for f in findings))
    rest = max(80, width - layer_w - code_w - 6)
    msg_w = math.ceil(rest * 0.55)
    fix_w = rest - msg_w
    widths = (layer_w, code_w, msg_w, fix_w)
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    # words are never split (a name cut in two cannot be copied): a longer one overflows its column
    wrap_msg = textwrap.TextWrapper(msg_w, break_long_words=False, break_on_hyphens=False)
    wrap_fix = textwrap.TextWrapper(fix_w, break_long_words=False, break_on_hyphens=False)
    for f in findings:
        cells = [[f.layer or "<model>"], [f.code], wrap_msg.wrap(f.message), wrap_fix.wrap(f.fix)]
        for i in range(max(len(c) for c in cells)):
            row = [c[i] if i < len(c) else "" for c in cells]
            lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)
