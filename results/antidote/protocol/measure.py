"""Measure the protocol's unit costs on SmolLM2-135M-Instruct with one torch thread (issue 15, step 1).

One LoRA training step (batch 5, SST-2 rows and harmful rows), greedy generation of 128 new tokens on a
batch of harmful evaluation prompts, the SST-2 validation evaluation (872 rows, exact match) and a realign
(Wanda scores on harmful pairs). Writes measure.json next to this file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
from robustlab.antidote.data import build_harmful_finetuning  # noqa: E402
from robustlab.antidote.evaluate import finetune_accuracy, generate  # noqa: E402
from robustlab.antidote.models import load_model  # noqa: E402
from robustlab.antidote.realign import calibration_batches, realign_masks  # noqa: E402
from robustlab.antidote.train import TrainConfig, add_lora, collate, encode_example, pad_id, response_loss  # noqa: E402


class Record(dict):
    """Measures, written to measure.json and printed as each arrives (a killed run keeps what it had)."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        print(key, value, flush=True)
        OUT.write_text(json.dumps(self, indent=1))


OUT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("measure.json"))


def main() -> None:
    out = Record()
    out["load_avg_start"] = os.getloadavg()
    out["threads"] = torch.get_num_threads()
    t = time.perf_counter()
    model, tok = load_model("smollm2-135m-instruct")
    out["load_s"] = time.perf_counter() - t
    data = build_harmful_finetuning(
        n=200, n_align=200, n_realign=64, n_heldout=16, n_eval_harmful=300, seed=0
    )
    cfg = TrainConfig(lora_r=8, lora_alpha=16, max_length=256)
    pm = add_lora(model, cfg)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    pad = pad_id(tok)
    for kind, rows in (
        ("sst2", [e for e in data.finetune if e.source == "sst2"]),
        ("harmful", [e for e in data.finetune if e.source.startswith("beaver")]),
        ("align", data.alignment),
    ):
        feats = [encode_example(tok, e.prompt, e.output, 256) for e in rows[:10]]
        times = []
        for b in range(0, 10, 5):
            batch = collate(feats[b : b + 5], pad)
            t = time.perf_counter()
            loss = response_loss(pm, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        out[f"step_{kind}_bs5_s"] = times
        out[f"tokens_{kind}_mean"] = sum(len(f[0]) for f in feats) / len(feats)
    pm.eval()
    prompts = [e.prompt for e in data.eval_harmful[:32]]
    for bs in (32,):
        t = time.perf_counter()
        generate(pm, tok, prompts[:bs], max_new_tokens=128, batch_size=bs, max_prompt=256)
        out[f"gen128_bs{bs}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    outs = generate(
        pm, tok, [e.prompt for e in data.eval_task], max_new_tokens=8, batch_size=32, max_prompt=256
    )
    out["sst2_eval_872_maxnew8_s"] = time.perf_counter() - t
    out["sst2_fa_untrained"] = finetune_accuracy("sst2", outs, data.eval_task)
    t = time.perf_counter()
    batches = calibration_batches(tok, [e.text for e in data.realign[:32]], 8, 256)
    realign_masks(pm, batches, [0.01, 0.05, 0.1, 0.2], "auto", "wanda", 0)
    out["realign_32pairs_4ratios_s"] = time.perf_counter() - t
    out["load_avg_end"] = os.getloadavg()


if __name__ == "__main__":
    main()
