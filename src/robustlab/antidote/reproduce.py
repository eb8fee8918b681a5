"""Antidote's registered reproduction: the offline tiny-model demo (``robustlab reproduce --only antidote``)."""

from __future__ import annotations

from pathlib import Path

from robustlab.report import Section


def reproduce(scale: str, out: Path, seed: int) -> Section:
    """Run (or resume) the demo into ``out``. Seeds are ``seed, seed+1, seed+2``."""
    from robustlab.antidote.cli import quiet_transformers
    from robustlab.antidote.tiny import demo_config, run_demo, summary_text

    quiet_transformers()
    cfg = demo_config(scale)
    cfg.seeds = (seed, seed + 1, seed + 2)
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
