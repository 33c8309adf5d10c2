"""Several networks per seed, averaged into the seed's measurement: less seed-to-seed noise in a
claim's per-seed value without adding seeds. Replicate ``r`` of seed ``s`` draws its initial
weights and minibatch order from ``replicate_seed(s, r)`` and shares the seed's data split; every
arm uses the same replicate seeds, so arms stay paired. Claims are still judged over seeds
(``verdict``): replicates are averaged inside a seed (``mean_over_replicates``), never counted as seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["REPLICATE_STRIDE", "mean_over_replicates", "replicate_seed"]

REPLICATE_STRIDE = 100_003
"""Offset between the generator seeds of consecutive replicates (a prime far above the lab's
seeds, so replicate seeds of different seeds never coincide)."""


def replicate_seed(seed: int, r: int) -> int:
    """The generator seed of replicate ``r`` >= 0 of ``seed`` (``r = 0`` gives ``seed``)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"replicate_seed: expected a replicate index r >= 0, got {r!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < REPLICATE_STRIDE:
        raise ValueError(f"replicate_seed: expected 0 <= seed < {REPLICATE_STRIDE}, got {seed!r}")
    return seed + REPLICATE_STRIDE * r


def mean_over_replicates(values: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise mean of the replicates' quantities (every replicate must have the same keys)."""
    if not values:
        raise ValueError("mean_over_replicates: expected at least one replicate, got none")
    keys = list(values[0])
    if any(list(v) != keys for v in values):
        raise ValueError(
            f"mean_over_replicates: expected the same keys in every replicate, got {[list(v) for v in values]}"
        )
    return {k: sum(float(v[k]) for v in values) / len(values) for k in keys}
