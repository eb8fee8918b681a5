"""How much do the pruning masks of Antidote and its controls agree? A diagnostic for the main table (issue 15):
on the committed seed-0 adapters of the frozen setting, the α masks of Wanda on the harmful re-alignment
pairs (Antidote), Wanda on benign SST-2 calibration rows, magnitude and random pruning, built by the
pipeline's own ``realign_masks`` on the attacked model (its LoRA adapter weights, the pipeline's targets), and
the share of Antidote's zeroed weights that each control zeroes too (random pruning's expected share is α).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python results/antidote/protocol/mask_overlap.py [--ratio 0.1]

Writes ``mask_overlap.json`` beside this file (config, versions, shares overall and per LoRA matrix kind).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CELL = ROOT / "results" / "antidote" / "smollm2-135m-instruct" / "adapters-seed0"


def shares(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of ``ref``'s zeroed weights that ``other`` zeroes too: overall and per LoRA matrix kind."""
    kinds: dict[str, list[int]] = {}
    for name, m in ref.items():
        kind = "lora_A" if "lora_A" in name else "lora_B" if "lora_B" in name else "other"
        both, total = int((m & other[name]).sum()), int(m.sum())
        for k in ("all", kind):
            acc = kinds.setdefault(k, [0, 0])
            acc[0] += both
            acc[1] += total
    return {k: round(b / t, 4) if t else float("nan") for k, (b, t) in kinds.items()}


def main() -> None:
    from peft import PeftModel

    from robustlab.antidote.models import load_model
    from robustlab.antidote.pipeline import pipeline_data
    from robustlab.antidote.quick_demo import adapters_pipeline_config
    from robustlab.antidote.realign import calibration_batches, realign_masks
    from robustlab.runs import atomic_write_json, environment_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=None, help="mask ratio α (default: the frozen primary α)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pcfg, alpha = adapters_pipeline_config(CELL)
    alpha = args.ratio or alpha
    data = pipeline_data(pcfg)
    model, tok = load_model(pcfg.base, align_adapter=str(CELL / "aligned"))
    model = PeftModel.from_pretrained(model, str(CELL / "finetuned"), is_trainable=False).eval()
    rc = pcfg.realign

    def masks(method: str, texts: list | None) -> dict[str, torch.Tensor]:
        batches = (
            calibration_batches(tok, [e.text for e in texts], rc.batch_size, rc.max_length) if texts else None
        )
        return realign_masks(model, batches, [alpha], rc.targets, method, pcfg.seed).masks[alpha]

    t = time.perf_counter()
    antidote = masks("wanda", data.realign)
    controls = {
        "benign": masks("wanda", data.benign_calibration[: len(data.realign)]),
        "magnitude": masks("magnitude", None),
        "random": masks("random", None),
    }
    out = {
        "what": "share of Antidote's zeroed weights that each control zeroes too (random's expectation: α)",
        "adapters": str(CELL.relative_to(ROOT)),
        "ratio": alpha,
        "calibration_rows": {
            "harmful": len(data.realign),
            "benign": min(len(data.realign), len(data.benign_calibration)),
        },
        "zeroed": sum(int(m.sum()) for m in antidote.values()),
        "targets": len(antidote),
        "shares": {k: shares(antidote, v) for k, v in controls.items()},
        "seconds": round(time.perf_counter() - t, 1),
        "environment": environment_info(pcfg.seed),
    }
    atomic_write_json(HERE / "mask_overlap.json", out)
    print(json.dumps({k: out[k] for k in ("ratio", "zeroed", "targets", "shares", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
