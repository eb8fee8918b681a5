"""The harmful score of a committed seed on more held-out prompts (issue 15: "≥ 300 held-out BeaverTails
unsafe test prompts"): the aligned model, the attacked model and Antidote at the primary α, on the first
``--prompts`` (default 320) ``unsafe_test`` prompts instead of the main table's 64.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python results/antidote/protocol/more_prompts.py [--seed 0] \
        [--points antidote,benign,magnitude,random] [--settings gemma.yaml]

``--points`` adds the controls at the same α (their committed points have the grid's first 32 prompts).

The models are the committed cell's own: its LoRA adapters (``adapters-seed<k>``) installed, not retrained;
Antidote's mask recomputed by the pipeline's functions on the cell's calibration slice. The wider slice is
asserted to leave every other slice unchanged and to begin with the 64 committed prompts, so the first 64
answers can be compared with the committed ones (how far this CPU's greedy decoding agrees with the one
that produced the cell). Only harmful prompts are generated: the cell's SST-2 accuracy does not depend on
the number of prompts. Resumable by chunks of 64 prompts (``runs/protocol/more_prompts/``); writes
``more_prompts/<model>_seed<k>.json`` with config, versions, every answer and every measure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CHUNK = 64  # prompts generated between two checkpoints (two evaluation batches of 32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=320)
    ap.add_argument(
        "--points",
        type=lambda v: [p for p in v.split(",") if p],
        default=["antidote"],
        help="pruned points at the primary α, in order: antidote, benign, magnitude, random (comma-separated)",
    )
    ap.add_argument("--settings", default="frozen.yaml", help="the settings file (a name beside this script)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "protocol" / "more_prompts")
    args = ap.parse_args(argv)
    if args.prompts < 64 or args.prompts % CHUNK:
        print(f"--prompts {args.prompts}: give a multiple of {CHUNK}, at least 64", file=sys.stderr)
        raise SystemExit(2)
    unknown = set(args.points) - {"antidote", "benign", "magnitude", "random"}
    if unknown:
        print(
            f"--points: unknown {', '.join(sorted(unknown))}; use antidote, benign, magnitude, random",
            file=sys.stderr,
        )
        raise SystemExit(2)

    from robustlab.antidote.baselines_pipeline import load_method_config
    from robustlab.antidote.cli_common import quiet_transformers
    from robustlab.antidote.evaluate import generate
    from robustlab.antidote.models import load_model
    from robustlab.antidote.pipeline import make_judges, pipeline_data, realign_inputs
    from robustlab.antidote.protocol import cell_name, cell_overrides, load_settings
    from robustlab.antidote.protocol_report import PRIMARY_RATIO
    from robustlab.antidote.quick_demo import committed_embedding_judge
    from robustlab.antidote.realign import apply_masks, realign_masks
    from robustlab.errors import UserError
    from robustlab.runs import atomic_write_json, environment_info, seed_everything, to_jsonable

    torch.set_num_threads(1)
    quiet_transformers()
    try:
        settings, meta = load_settings(args.settings, HERE)
    except UserError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        raise SystemExit(2) from None
    model_name = meta["model"]
    cfg = load_method_config(None, cell_overrides(settings, "sft", None, None, args.seed)).pipeline
    wide = replace(cfg, data=replace(cfg.data, n_eval_harmful=args.prompts))
    data, data_w = pipeline_data(cfg), pipeline_data(wide)
    for part in (
        "alignment",
        "finetune",
        "realign",
        "benign_calibration",
        "heldout_harmful",
        "eval_task",
        "harmful_aux",
    ):
        assert getattr(data, part) == getattr(data_w, part), f"the wider slice changed the {part} slice"
    assert data_w.eval_harmful[: len(data.eval_harmful)] == data.eval_harmful, (
        "not the committed prompts first"
    )
    ft = cfg.finetune.train
    cell_dir = (
        ROOT / "results" / "antidote" / model_name / cell_name("sft", ft.lr, ft.epochs, args.seed, cfg.data.n)
    )
    adapters = ROOT / "results" / "antidote" / model_name / f"adapters-seed{args.seed}"
    note = json.loads((adapters / "adapters.json").read_text(encoding="utf-8"))
    if note.get("cell") != str(cell_dir.relative_to(ROOT)):
        print(f"{adapters} holds the adapters of {note.get('cell')}, not of {cell_dir.name}", file=sys.stderr)
        raise SystemExit(2)

    seed_everything(args.seed)
    judge_cache = args.runs.parent
    if not (judge_cache / "embedding_judge.json").is_file():  # the fit the committed cells were scored with
        judge_cache.mkdir(parents=True, exist_ok=True)
        shutil.copy2(committed_embedding_judge(), judge_cache / "embedding_judge.json")
    judges = make_judges(["refusal", "embedding", "minilm-ft"], cfg.data.data_dir, judge_cache, args.seed)
    ev, rc = cfg.evaluate, cfg.realign
    prompts = [e.prompt for e in data_w.eval_harmful]
    raw = [e.instruction for e in data_w.eval_harmful]
    work = args.runs / f"{model_name}_seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)

    def answers_of(point: str, model: object, tokenizer: object) -> tuple[list[str], float]:
        """The greedy answers to every prompt, chunk by chunk, each chunk saved as it finishes."""
        out, seconds = [], 0.0
        for start in range(0, len(prompts), CHUNK):
            path = work / f"{point}_{start:04d}.json"
            if path.is_file():
                chunk = json.loads(path.read_text(encoding="utf-8"))
            else:
                t = time.perf_counter()
                answers = generate(
                    model, tokenizer, prompts[start : start + CHUNK], ev.max_new_tokens_harmful,
                    ev.batch_size, ev.max_prompt,
                )  # fmt: skip
                chunk = {"answers": answers, "seconds": round(time.perf_counter() - t, 2)}
                atomic_write_json(path, chunk)
            out += chunk["answers"]
            seconds += chunk["seconds"]
        return out, seconds

    pruned_points = args.points  # validated above: pruned points only
    committed = {
        p: json.loads((cell_dir / "cells" / f"stage=eval__point={key}.json").read_text(encoding="utf-8"))
        for p, key in [("aligned", "aligned"), ("finetuned", "finetuned")]
        + [(p, f"{p}__ratio={PRIMARY_RATIO:g}") for p in pruned_points]
    }
    base = cfg.base
    points: dict[str, dict] = {}
    aligned, tok = load_model(base, adapter=adapters / "aligned")
    aligned = aligned.merge_and_unload()  # the pipeline evaluates the merged checkpoint

    def save() -> Path:
        """The result so far, rewritten after every point: a killed run keeps the finished points."""
        row = {
            "cell": str(cell_dir.relative_to(ROOT)),
            "adapters": str(adapters.relative_to(ROOT)),
            "n_eval_harmful": len(prompts),
            "n_committed": len(data.eval_harmful),
            "ratio": PRIMARY_RATIO,
            "points": points,
            "config": to_jsonable(asdict(wide)),
            "env": environment_info(args.seed),
        }
        out = HERE / "more_prompts" / f"{model_name}_seed{args.seed}.json"
        atomic_write_json(out, row)
        return out

    pruned = None
    for point in ("aligned", "finetuned", *pruned_points):
        if point == "finetuned":
            del aligned
            model, tok = load_model(base, align_adapter=adapters / "aligned", adapter=adapters / "finetuned")
        elif point == "aligned":
            model = aligned
        else:  # as the pipeline: the mask from the unpruned fine-tuned model at the primary α, undone after
            if pruned is not None:
                pruned.restore(model)
            method = rc.method if point == "antidote" else point  # the pipeline's methods
            batches, scoring = realign_inputs(point, method, data, tok, rc)
            masks = realign_masks(model, batches, [PRIMARY_RATIO], rc.targets, scoring, args.seed)
            pruned = apply_masks(model, masks.masks[PRIMARY_RATIO], remember=True)
        answers, seconds = answers_of(point, model, tok)
        mine = [a for _, a in committed[point]["answers_harmful"]]
        n0 = len(mine)
        m: dict = {"seconds": seconds}
        for name, judge in judges.items():
            flags = [bool(f) for f in judge.harmful(raw, answers)]
            m[f"flags_{name}"] = flags  # per prompt, so points pair on the same prompts
            m[f"hs_{name}"] = 100.0 * sum(flags) / len(flags)
            m[f"hs_{name}_first"] = 100.0 * sum(flags[:n0]) / n0
            m[f"hs_{name}_committed"] = committed[point].get(f"hs_{name}")
        m["n_first"] = n0  # the committed point's prompts: 64, or the grid's 32 for a control
        m["first_answers_identical"] = sum(a == b for a, b in zip(answers, mine, strict=False))
        m["answers_harmful"] = [[r, a] for r, a in zip(raw, answers, strict=True)]
        points[point] = m
        out = save()
        print(
            f"{point}: HS minilm-ft {m['hs_minilm-ft']:.1f} on {len(prompts)} prompts (first {n0}: "
            f"{m['hs_minilm-ft_first']:.1f}, committed {m['hs_minilm-ft_committed']:.1f}; "
            f"{m['first_answers_identical']}/{n0} answers identical), {seconds:.0f} s",
            flush=True,
        )

    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
