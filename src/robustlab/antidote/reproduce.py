"""Antidote's registered reproduction: the offline tiny-model demo (``robustlab reproduce --only antidote``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from robustlab.console import Stages, watch_run
from robustlab.report import Section

TRAINING_UNITS = 10  # a training stage takes about as long as ten evaluations, for the time estimate


def demo_progress(cfg: Any, out: Path) -> contextlib.AbstractContextManager:
    """Stage lines (or a bar on a terminal) for the demo, read from the rows its processes append to
    ``out/metrics.jsonl``: the base's pretraining, each seed's alignment and attacks, and each seed's
    evaluations per fine-tuning mode as they complete."""
    ratios = {"lora": list(cfg.ratios_lora), "full": list(cfg.ratios_full)}
    per_mode = {m: 1 + 3 * len(ratios[m]) for m in cfg.modes}  # the attacked model + 3 variants per α
    points = len(cfg.seeds) * (1 + sum(per_mode.values()))
    trainings = 1 + len(cfg.seeds) * (1 + len(cfg.modes))
    seen: dict[tuple[Any, str], int] = {}
    names = {"lora": "LoRA", "full": "full"}

    def describe(row: dict[str, Any]) -> tuple[str | None, int]:
        seed, stage = row.get("seed"), str(row.get("stage"))
        if "mode" not in row:  # a training stage
            took = f"{row.get('seconds', 0):.0f} s"
            if stage == "pretrain":
                return f"base model pretrained in {took}", TRAINING_UNITS
            if stage == "align":
                return f"seed {seed}: aligned in {took}", TRAINING_UNITS
            mode = stage.removeprefix("attack_")
            return f"seed {seed}: {names.get(mode, mode)} attack trained in {took}", TRAINING_UNITS
        if stage == "aligned":
            return f"seed {seed}: aligned model evaluated (HS {row.get('hs_refusal', 0):.0f}%)", 1
        mode = row["mode"]
        seen[(seed, mode)] = seen.get((seed, mode), 0) + 1
        if seen[(seed, mode)] < per_mode.get(mode, 0):
            return None, 1
        alphas = ", ".join(f"{r:g}" for r in ratios.get(mode, []))
        return (
            f"seed {seed}: {names.get(mode, mode)} attack, Antidote and controls at α = {alphas} evaluated",
            1,
        )

    progress = Stages("antidote", TRAINING_UNITS * trainings + points, unit="units")
    stack = contextlib.ExitStack()
    stack.enter_context(progress)
    stack.enter_context(watch_run(out, progress, describe))
    return stack


def reproduce(scale: str, out: Path, seed: int) -> Section:
    """Run (or resume) the demo into ``out``. Seeds are ``seed, seed+1, seed+2``."""
    from robustlab.antidote.cli import quiet_transformers
    from robustlab.antidote.tiny import demo_config, run_demo, summary_text

    quiet_transformers()
    cfg = demo_config(scale)
    cfg.seeds = (seed, seed + 1, seed + 2)
    with demo_progress(cfg, out):
        res = run_demo(out, scale, cfg=cfg)
    section = Section(
        "antidote",
        settings={
            "scale": scale,
            "seeds": list(cfg.seeds),
            "data": "shared/data: BeaverTails unsafe_train / unsafe_test_prompts, AG News, Alpaca, SST-2 (text)",
            "model": f"tiny Llama from scratch, hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, "
            f"BPE vocab {cfg.model.vocab_size}",
            "fine-tuning mix": f"n={cfg.n_finetune}, harmful ratio p={cfg.harmful_ratio}, task {cfg.task}",
            "mask ratios": f"LoRA {list(cfg.ratios_lora)}, full {list(cfg.ratios_full)}",
            "evaluation": f"{cfg.n_eval_harmful} harmful prompts, {cfg.n_eval_task} {cfg.task} test rows, "
            f"{cfg.n_heldout} held-out harmful pairs",
        },
    )
    section.table(
        "Antidote vs controls on a tiny from-scratch Llama (mean ± 95% CI over seeds)",
        res["columns"],
        res["table"],
        note="HS: % of harmful prompts answered without a refusal phrase (greedy). NLL: nats per token on "
        "held-out harmful pairs. Refusal pref.: % of held-out prompts where the refusal is more likely than "
        "the harmful answer. antidote = Wanda on harmful calibration; random = random pruning; benign = "
        "Wanda on benign AG News calibration; all at the same α.",
    )
    section.table(
        "Paired differences: Antidote minus each control, same seed and α (mean ± 95% CI over seeds)",
        res["paired_columns"],
        res["paired_table"],
    )
    section.figure(
        "Safety vs task accuracy", res["figure"], "One line per method across α, from the attacked model."
    )
    section.text(summary_text(res["aggregate"]))
    section.results = {"aggregate": res["aggregate"], "seconds": res["seconds"]}
    return section
