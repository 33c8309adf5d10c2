# .venv/bin/python -m pytest -q tests/lab/test_goodfellow_chain.py
"""``goodfellow-chain`` over seeds: every seed draws its own inputs, the claims read every seed,
and the quick-mode claims hold (the chain is cheap: no slow marker)."""

from __future__ import annotations

from pathlib import Path

from batchnorm.lab.config import RunConfig
from batchnorm.lab.experiments import goodfellow_chain as exp
from batchnorm.lab.runner import run_one


def test_seeds_draw_their_own_inputs_and_a_refuting_seed_set_does_not_hold(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="tiny", seeds=(0, 1, 2), out=tmp_path))
    per = results["metrics"]["per_seed"]
    assert results["metrics"]["seeds"] == [0, 1, 2] and len(per) == 3
    assert per[0]["cases"][0]["loss"] != per[1]["cases"][0]["loss"]  # different inputs x
    assert [len(c["seeds"]) for c in results["claims"]] == [3] * 4
    # BN's safe lr made to vary 10x across chains on every seed: its claim is refuted
    for m in per:
        for i, c in enumerate(x for x in m["cases"] if x["arm"] == "bn"):
            c["safe_lr"] = 10.0 ** (-(i % 2))
    third = exp.EXPERIMENT.claims(results)[2]
    assert third["verdict"] == "does not hold" and third["estimate"] == 10.0


def test_quick_mode_claims_hold_at_the_first_look(tmp_path: Path) -> None:
    results = run_one(exp.EXPERIMENT.ID, RunConfig(mode="quick", seed=0, out=tmp_path))
    claims = results["claims"]
    assert results["metrics"]["seeds"] == [0, 1, 2, 3]  # the first look (4 seeds) decides every claim
    assert [c["verdict"] for c in claims] == ["holds"] * 4, claims
    # the BN claims follow from the chain's algebra; the spread of safe rates is capped by the grid
    assert [c["kind"] for c in claims] == ["replication", "replication", "identity", "identity"]
    # claims 1, 3 and 4 give the same value on every seed: reported as zero spread, not an interval
    assert [c["zero_spread"] for c in claims] == [True, False, True, True]
    assert all("zero spread" in c["why"] for c in (claims[0], claims[2], claims[3]))
