"""Run the protocol's cells one after another, resumable: every finished cell is exported to
``results/antidote/<model>/<cell>/`` and skipped on a rerun (issue 15).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python results/antidote/protocol/run.py PLAN [--model M]

PLAN: ``export`` (export the evaluated points of unfinished cells), ``restore`` (rebuild the lost run folder
of a frozen cell from its committed adapters and points, for the cells that share its stages), ``adapters``
(commit a frozen seed's aligned and attacked LoRA adapters; ``--seed``, by default the settings'
``adapters_seed``), ``pilot --candidate K`` (candidate K of ``pilot.yaml``'s declared list on the pilot seed, no
re-alignment; the alignment stage is re-run and, when its adapter is bit-identical to the committed seed's,
the committed aligned point is reused), ``main`` (SFT +
Antidote + controls, seeds 0 1 2, the frozen settings of ``frozen.yaml``), ``lr`` (the learning-rate table
and the longer run, seed 0), ``baselines`` (every baseline at the frozen settings, seed 0), or a
comma-separated list of ``method:seed[:lr[:epochs]]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def plan_cells(plan: str, frozen: dict) -> list[tuple[str, int, float | None, float | None]]:
    p = frozen.get("plan", {})
    seeds = p.get("seeds", [0, 1, 2])
    if plan == "main":
        return [("sft", s, None, None) for s in seeds]
    if plan == "lr":
        ep = frozen["finetune"]["train"]["epochs"]
        cells = [("sft", 0, lr, None) for lr in p.get("lrs", [])]
        return cells + [("sft", 0, None, e) for e in p.get("epochs", []) if e != ep]
    if plan == "baselines":
        return [(m, 0, None, None) for m in p.get("baselines", [])]
    out = []
    for item in plan.split(","):
        parts = item.split(":")
        out.append(
            (
                parts[0],
                int(parts[1]),
                float(parts[2]) if len(parts) > 2 and parts[2] else None,
                float(parts[3]) if len(parts) > 3 and parts[3] else None,
            )
        )
    return out


def method_settings(frozen: dict, plan: dict, method: str) -> dict:
    """The frozen settings of one method's cells: SFT's as they are; a baseline's with ``plan.overrides``
    merged in (``default`` for every baseline, then the method's own entry, section by section), declared in
    ``frozen.yaml`` before any baseline ran."""
    import copy

    if method == "sft":
        return frozen
    table = plan.get("overrides", {})
    out = copy.deepcopy(frozen)
    for part in (table.get("default", {}), table.get(method, {})):
        for section, values in part.items():
            out[section] = {**out.get(section, {}), **values}
    return out


def export_seed_adapters(frozen: dict, model: str, seed: int, runs: Path) -> None:
    """Commit the frozen setting's aligned and attacked LoRA adapters of ``seed`` (from whichever run of
    that seed has them: the pilot's or the cell's, the same stages) for the quick demo."""
    from robustlab.antidote.baselines_pipeline import load_method_config
    from robustlab.antidote.protocol import cell_name, cell_overrides, export_adapters

    mcfg = load_method_config(None, cell_overrides(frozen, "sft", None, None, seed))
    ft = mcfg.pipeline.finetune.train
    name = cell_name("sft", ft.lr, ft.epochs, seed, mcfg.pipeline.data.n)
    for run in (runs / name, runs / f"pilot-{name}"):
        if (run / "cells" / "stage=finetune.json").is_file():
            break
    else:
        raise SystemExit(f"no finished fine-tuning stage for {name} under {runs}")
    dest = ROOT / "results" / "antidote" / model / f"adapters-seed{seed}"
    note = {
        "base": mcfg.pipeline.base,
        "seed": seed,
        "aligned": "LoRA adapter of the alignment stage; merge it into the base first",
        "finetuned": "LoRA adapter of the harmful fine-tuning stage, trained on base + merged aligned adapter",
        "load": f"load_model({mcfg.pipeline.base!r}, align_adapter=<dest>/aligned, adapter=<dest>/finetuned)",
        "data": vars(mcfg.pipeline.data),
        "align": vars(mcfg.pipeline.align.train),
        "finetune": vars(ft),
        "from_run": run.name,
        "cell": f"results/antidote/{model}/{name}",
    }
    export_adapters(run, dest, note)
    print(f"adapters of {run.name} -> {dest.relative_to(ROOT)}")


def reuse_aligned(frozen: dict, model: str, cell: tuple, runs: Path, results: Path, prefix: str) -> None:
    """Before a pilot candidate runs: re-run its alignment stage and reuse the committed aligned point of
    the first pilot candidate when the adapter is bit-identical to the committed seed's
    (:func:`robustlab.antidote.protocol.realign_and_reuse`)."""
    from robustlab.antidote.baselines_pipeline import load_method_config
    from robustlab.antidote.protocol import cell_name, cell_overrides, realign_and_reuse

    method, seed, lr, epochs = cell
    mcfg = load_method_config(None, cell_overrides(frozen, method, lr, epochs, seed))
    ft = mcfg.pipeline.finetune.train
    run = runs / f"{prefix}{cell_name(method, ft.lr, ft.epochs, seed, mcfg.pipeline.data.n)}"
    adapter = ROOT / "results" / "antidote" / model / f"adapters-seed{seed}" / "aligned"
    donors = [d for d in sorted(results.glob(f"pilot-*_seed{seed}")) if d.name != run.name]
    if (run / "cells" / "stage=align.json").is_file() or not donors or not adapter.is_dir():
        return
    realign_and_reuse(run, mcfg, adapter, donors[0], echo=lambda msg: print(msg, flush=True), root=ROOT)


def restore_cell(frozen: dict, model: str, seed: int, runs: Path) -> None:
    """Rebuild the lost run folder of the committed frozen cell of ``seed`` from its committed LoRA adapters
    (``adapters-seed<k>``, used only when ``adapters.json`` names this cell) and its committed points, so
    the cells that share its stages (the baselines after SFT, an unfinished grid) start from exactly the
    models the committed points measured. The adapters are installed, not retrained: a re-run of the
    alignment on another CPU differs from the committed adapter in the fourth significant digit
    (floating-point kernels), which would make the committed points another model's."""
    from dataclasses import asdict

    from robustlab.antidote.baselines_pipeline import load_method_config
    from robustlab.antidote.models import load_model
    from robustlab.antidote.pipeline import save_checkpoint
    from robustlab.antidote.protocol import cell_name, cell_overrides, signatures
    from robustlab.runs import RunDir

    mcfg = load_method_config(None, cell_overrides(frozen, "sft", None, None, seed))
    cfg, ft = mcfg.pipeline, mcfg.pipeline.finetune.train
    name = cell_name("sft", ft.lr, ft.epochs, seed, cfg.data.n)
    committed = ROOT / "results" / "antidote" / model / name
    adapters = ROOT / "results" / "antidote" / model / f"adapters-seed{seed}"
    note = json.loads((adapters / "adapters.json").read_text(encoding="utf-8"))
    if note.get("cell") != f"results/antidote/{model}/{name}":
        raise SystemExit(f"{adapters} holds the adapters of {note.get('cell')}, not of {name}")
    run = runs / name
    if (run / "cells").is_dir():
        raise SystemExit(f"{run} exists: resume it with run.py sft:{seed}, or remove it to restore it")
    RunDir.open(run, asdict(cfg), seed=cfg.seed)
    aligned, tokenizer = load_model(cfg.base, adapter=adapters / "aligned")
    save_checkpoint(aligned.merge_and_unload(), tokenizer, run / "stages" / "aligned")
    for part, stage in (("aligned", "aligned-adapter"), ("finetuned", "finetuned")):
        shutil.copytree(adapters / part, run / "stages" / stage)
    (run / "cells").mkdir(exist_ok=True)
    for cell in sorted((committed / "cells").glob("*.json")):
        shutil.copy2(cell, run / "cells" / cell.name)
    shutil.copy2(committed / "metrics.jsonl", run / "metrics.jsonl")
    # signed like run_cell's runs, so the baselines that start from this fine-tuned model share its stages
    (run / "signatures.json").write_text(json.dumps(signatures(mcfg)), encoding="utf-8")
    (run / "restored.json").write_text(json.dumps({"adapters": str(adapters.relative_to(ROOT))}) + "\n")
    print(f"{name}: run folder restored from the committed adapters and points")


def export_unfinished(runs: Path, results: Path) -> None:
    """Export the evaluated points of every cell that did not finish (the session's deadline), marked
    ``complete: false`` in its timing.json; finished cells are left as they are."""
    import os

    from robustlab.antidote.protocol import export_cell, stage_seconds

    for run in sorted(
        p for p in runs.iterdir() if (p / "cells").is_dir() and not p.name.startswith("pilot-")
    ):
        done = results / run.name / "timing.json"
        if done.is_file() and json.loads(done.read_text()).get("complete", True):
            continue
        points = sorted(c.stem for c in (run / "cells").glob("stage=eval*.json"))
        if not points:
            continue
        export_cell(
            run,
            results / run.name,
            extra={
                "complete": False,
                "points": points,
                "load_average_end": list(os.getloadavg()),
                "stage_seconds": stage_seconds(run),
            },
        )
        print(f"{run.name}: {len(points)} points exported (unfinished)")


def main(argv: list[str] | None = None) -> None:
    from robustlab.antidote.cli_common import quiet_transformers
    from robustlab.antidote.protocol import run_cell

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("--settings", default=None, help="settings file beside this script (default by plan)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "protocol")
    ap.add_argument("--candidate", type=int, default=1, help="pilot: the candidate's number in pilot.yaml")
    ap.add_argument(
        "--seed", type=int, default=None, help="adapters, restore: the seed (default: adapters_seed)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    quiet_transformers()
    from robustlab.antidote.protocol import load_settings
    from robustlab.errors import UserError

    settings = args.settings or ("pilot.yaml" if args.plan == "pilot" else "frozen.yaml")
    try:
        frozen, meta = load_settings(settings, HERE)
    except UserError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        raise SystemExit(2) from None
    model, plan, candidates = meta["model"], meta.get("plan", {}), meta.get("candidates")
    adapters_seed = args.seed if args.seed is not None else meta.get("adapters_seed")
    if args.plan in ("restore", "adapters") and adapters_seed is None:
        print(
            f"error: {args.plan} needs a seed; give --seed K ({settings} names no adapters_seed)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if args.plan == "export":
        export_unfinished(args.runs / model, ROOT / "results" / "antidote" / model)
        return None
    if args.plan == "restore":
        restore_cell(frozen, model, int(adapters_seed), args.runs / model)
        return None
    if args.plan == "adapters":
        export_seed_adapters(frozen, model, int(adapters_seed), args.runs / model)
        return None
    if args.plan == "pilot":
        if not candidates or not 1 <= args.candidate <= len(candidates):
            raise SystemExit(f"--candidate must be 1..{len(candidates or [])} (pilot.yaml candidates)")
        from robustlab.antidote.protocol import pilot_candidate

        c = candidates[args.candidate - 1]
        frozen = pilot_candidate(frozen, c)
        # a candidate with other data or alignment settings carries a tag for its run folder
        prefix = "pilot-" + (f"{c['tag']}-" if "tag" in c else "")  # n is in the cell name (cell_name)
        cells = [("sft", int(frozen.get("seed", 0)), float(c["lr"]), float(c["epochs"]))]
        results = HERE / "pilot" / model
        reuse_aligned(frozen, model, cells[0], args.runs / model, results, prefix)
    else:
        cells = plan_cells(args.plan, {**frozen, "plan": plan})
        results = ROOT / "results" / "antidote" / model
    results.mkdir(parents=True, exist_ok=True)
    runs = args.runs / model
    judge = args.runs / "embedding_judge.json"
    from robustlab.antidote.quick_demo import committed_embedding_judge

    committed = committed_embedding_judge()
    if not judge.is_file() and committed.is_file():  # the same deterministic fit, committed: no 6-min refit
        args.runs.mkdir(parents=True, exist_ok=True)
        shutil.copy2(committed, judge)
    if not judge.is_file():  # the pipeline's judge, trained once and cached there with its report
        from robustlab.antidote.pipeline import make_judges

        make_judges(["embedding"], cache=args.runs)
    for method, seed, lr, epochs in cells:
        run_cell(
            method_settings(frozen, plan, method),
            method,
            seed,
            runs,
            results,
            lr=lr,
            epochs=epochs,
            echo=lambda msg: print(msg, flush=True),
            embedding_judge=judge,
            prefix=prefix if args.plan == "pilot" else "",
        )


if __name__ == "__main__":
    sys.exit(main())
