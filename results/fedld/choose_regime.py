"""Freeze the regime grid's client learning rate and number of rounds from the FedAvg pilot's validation
curves alone (results/fedld/regime_pilot.sh), before any grid cell runs; writes results/fedld/regime.json.

Rule (fixed before the pilot finished): lr = the pilot lr with the highest validation accuracy at any round
(ties: the higher mean validation accuracy over the last 3 rounds); rounds = the first round at which that
lr's validation accuracy reaches its pilot maximum, rounded up to a multiple of 2, at most the pilot length.
Test accuracy is never read.

    .venv/bin/python results/fedld/choose_regime.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    pilots = {}
    for folder in sorted(HERE.glob("regime_pilot_lr*")):
        cell = folder / "cells" / "method=fedavg__seed=100.json"
        if not folder.is_dir() or not cell.is_file():
            continue
        hist = [h for h in json.loads(cell.read_text())["history"] if h["round"] > 0]
        pilots[folder.name[len("regime_pilot_lr") :]] = [float(h["val"]["accuracy"]) for h in hist]
    if len(pilots) < 2:
        raise SystemExit(f"need both pilot cells in {HERE}/regime_pilot_lr*/cells; found {sorted(pilots)}")
    lr = max(pilots, key=lambda k: (max(pilots[k]), sum(pilots[k][-3:]) / 3))
    curve = pilots[lr]
    first_best = curve.index(max(curve)) + 1
    rounds = min(len(curve), 2 * math.ceil(first_best / 2))
    out = {
        "lr": float(lr),
        "rounds": rounds,
        "rule": __doc__.split("Rule")[1].split("Test accuracy")[0].strip(),
        "pilot_val_accuracy": {k: [round(v, 4) for v in c] for k, c in pilots.items()},
    }
    (HERE / "regime.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
