"""Rescore every committed protocol cell from its stored answers with the fine-tuned MiniLM judge
(``minilm-ft``, trained once by ``robustlab antidote judge train``), and commit its held-out report beside.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python results/antidote/protocol/rescore.py [CELL_FOLDER ...]

Adds ``hs_minilm-ft`` to every evaluated point (the pipeline's own judges' scores stay); the tables then
lead with it (robustlab.antidote.protocol_report.JUDGE_ORDER).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def main() -> None:
    from robustlab.antidote.finetuned_judge import load_finetuned_judge
    from robustlab.antidote.protocol import rescore_cell

    torch.set_num_threads(1)
    judge = load_finetuned_judge()
    report = judge.meta.get("report") or {}
    held = (report.get("heldout") or {}).get("minilm-ft") or {}
    note = {
        **{k: held.get(k) for k in ("agreement", "balanced_accuracy", "auc")},
        "n_heldout": (report.get("split") or {}).get("heldout_pairs"),
        "weights_sha256": judge.weights_sha256(),
    }
    summary = {
        **note,
        "baselines_same_split": {k: v for k, v in (report.get("heldout") or {}).items() if k != "minilm-ft"},
    }
    (HERE / "minilm_ft_judge_report.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    folders = sorted({t.parent for t in (ROOT / "results" / "antidote").glob("*/*/timing.json")})
    folders += sorted({t.parent for t in (HERE / "pilot").glob("*/*/timing.json")})
    if len(sys.argv) > 1:  # only the cell folders given
        folders = [f for f in folders if any(f.resolve() == Path(a).resolve() for a in sys.argv[1:])]
    for folder in folders:
        n = rescore_cell(folder, "minilm-ft", judge, note)
        print(f"{folder.relative_to(ROOT)}: {n} points rescored", flush=True)


if __name__ == "__main__":
    main()
