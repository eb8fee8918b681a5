"""Compare a re-run of a protocol cell with the committed cell, point by point (issue 15: can the committed
numbers be reproduced from nothing?).

    PYTHONPATH=src .venv/bin/python results/antidote/protocol/compare_cells.py COMMITTED RERUN --out FILE.json

For every evaluated point of the committed cell: how many greedy answers (harmful prompts and SST-2 rows)
are identical in the re-run, and the difference of each stored measure (harmful scores, FA, NLLs). A point
the re-run lacks is reported as missing. Writes ``FILE.json`` (with both cells' versions) and prints one
line per point.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: the stored measures compared (a rescored judge's ``hs_<judge>`` is added by the committed cell only)
MEASURES = ("hs_refusal", "hs_embedding", "fa", "nll_harmful", "nll_refusal", "refusal_preference")


def compare_point(committed: dict, rerun: dict) -> dict:
    """Identical answers out of the committed ones, and the re-run minus the committed value of each measure."""
    out: dict = {}
    for key in ("answers_harmful", "answers_task"):
        a, b = committed.get(key) or [], rerun.get(key) or []
        out[f"{key}_identical"] = sum(x == y for x, y in zip(a, b, strict=False))
        out[f"{key}_n"] = len(a)
    for m in MEASURES:
        if committed.get(m) is not None and rerun.get(m) is not None:
            out[f"{m}_diff"] = float(rerun[m]) - float(committed[m])
    return out


def compare_cells(committed: Path, rerun: Path) -> dict:
    def points(folder: Path) -> dict[str, dict]:
        return {
            p.stem: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted((folder / "cells").glob("stage=eval*.json"))
        }

    pc, pr = points(committed), points(rerun)
    if not pc:
        print(f"error: {committed} holds no evaluated point (cells/stage=eval*.json)", file=sys.stderr)
        raise SystemExit(2)
    env = {
        name: json.loads((f / "env.json").read_text(encoding="utf-8")) if (f / "env.json").is_file() else None
        for name, f in (("committed", committed), ("rerun", rerun))
    }
    return {
        "committed": str(committed),
        "rerun": str(rerun),
        "points": {k: compare_point(v, pr[k]) if k in pr else "missing" for k, v in pc.items()},
        "env": env,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("committed", type=Path)
    ap.add_argument("rerun", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    report = compare_cells(args.committed, args.rerun)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    for name, r in report["points"].items():
        if r == "missing":
            print(f"{name}: missing in the re-run")
            continue
        diffs = ", ".join(f"{k[:-5]} {v:+.3g}" for k, v in r.items() if k.endswith("_diff"))
        print(
            f"{name}: {r['answers_harmful_identical']}/{r['answers_harmful_n']} harmful answers, "
            f"{r['answers_task_identical']}/{r['answers_task_n']} SST-2 answers identical; {diffs}"
        )


if __name__ == "__main__":
    main()
