"""Run ``robustlab reproduce --quick --only antidote`` once, timed, and commit its antidote part here.

Usage (from the repository root): ``PYTHONPATH=src .venv/bin/python results/antidote/quick_demo/run.py [--out DIR]``.
Copies the demo's ``summary.json`` and ``points/`` (every answer) next to this file and writes ``env.json``
(wall time of the whole reproduce command, load averages before and after, cores, versions); then
``python results/antidote/update_judge_demo_docs.py`` puts the table and examples into the README and docs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from robustlab.reproduce import run_reproduce
from robustlab.runs import atomic_write_json, environment_info

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/reproduce_quick_timed")
    ap.add_argument("--note", default="shared machine: other engineers' jobs were running")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists: a timed run must start from an empty folder")
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    _, outcomes = run_reproduce("quick", ["antidote"], out)
    wall = time.perf_counter() - t
    load_after = os.getloadavg()[0]
    if outcomes[0].status != "ok":
        raise SystemExit(f"the antidote reproduction {outcomes[0].status}: {outcomes[0].detail}")
    shutil.copy(out / "antidote" / "summary.json", HERE / "summary.json")
    shutil.rmtree(HERE / "points", ignore_errors=True)
    shutil.copytree(out / "antidote" / "points", HERE / "points")
    env = environment_info(0)
    atomic_write_json(
        HERE / "env.json",
        {
            "wall_seconds": round(wall, 1),
            "load_before": round(load_before, 2),
            "load_after": round(load_after, 2),
            "cpus": os.cpu_count(),
            "note": args.note,
            "environment": env,
        },
    )
    print(f"antidote quick reproduction: {wall:.0f} s wall, load {load_before:.1f} -> {load_after:.1f}")


if __name__ == "__main__":
    main()
