"""Compare two replication matrices run on different seed sets: does any claim flip?

    .venv/bin/python scripts/compare_replications.py runs/rep-0-4/replication.json runs/rep-5-9/replication.json

Prints, per experiment and data set, each claim's verdict on both seed sets and the counts;
a claim that ``holds`` on one set and ``does not hold`` on the other is marked FLIP, and the
exit status is 1 when there is one (0 otherwise, 2 for a file that cannot be read).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_SHORT = {"holds": "holds", "does not hold": "NOT", "inconclusive": "inc"}


def compare_matrices(first: Mapping[str, Any], second: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Line up two matrices run on different seed sets, claim by claim.

    One row per claim present in both (matched by experiment, data set and position): ``{"id",
    "data", "index", "claim", "first", "second", "flip"}``; ``flip`` is true when one verdict is
    ``holds`` and the other ``does not hold`` (``inconclusive`` on either side is no flip).
    Claims are matched by position because a claim's wording may carry measured numbers.
    """
    cells = {(row["id"], data): cell for row in second.get("rows", []) for data, cell in row["cells"].items()}
    rows = []
    for row in first.get("rows", []):
        for data, cell in row["cells"].items():
            other = cells.get((row["id"], data), {"claims": []})["claims"]
            for i, (a, b) in enumerate(zip(cell["claims"], other)):
                verdicts = {"first": a["verdict"], "second": b["verdict"]}
                flip = set(verdicts.values()) == {"holds", "does not hold"}
                rows.append({"id": row["id"], "data": data, "index": i, "claim": a["claim"], **verdicts, "flip": flip})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="replication.json of one seed set")
    parser.add_argument("second", type=Path, help="replication.json of another seed set")
    args = parser.parse_args(argv)
    try:
        first, second = (json.loads(p.read_text()) for p in (args.first, args.second))
    except (OSError, ValueError) as err:
        print(f"compare_replications: cannot read a matrix: {err}", file=sys.stderr)
        return 2
    rows = compare_matrices(first, second)
    seeds = f"seeds {first.get('seeds')} vs {second.get('seeds')}"
    print(f"{len(rows)} claims on both ({seeds})")
    for r in rows:
        mark = "  FLIP" if r["flip"] else ""
        print(
            f"{r['id']:<24} {r['data']:<8} #{r['index']} {_SHORT[r['first']]:>5} / {_SHORT[r['second']]:<5}{mark}  {r['claim'][:90]}"
        )
    for side in ("first", "second"):
        counts = Counter((r["data"], r[side]) for r in rows)
        for data in dict.fromkeys(r["data"] for r in rows):
            n = sum(v for (d, _), v in counts.items() if d == data)
            line = ", ".join(f"{counts[(data, v)]} {v}" for v in ("holds", "does not hold", "inconclusive"))
            print(f"{side} set, {data}: {line} (of {n}; {100 * counts[(data, 'holds')] / max(n, 1):.0f}% hold)")
    flips = [r for r in rows if r["flip"]]
    print(f"flips: {len(flips)}")
    return 1 if flips else 0


if __name__ == "__main__":
    sys.exit(main())
