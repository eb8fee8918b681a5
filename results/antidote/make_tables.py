"""Rebuild the protocol's tables, plots and claims (issue 15) from the committed cells in results/antidote.

Usage (repo root): PYTHONPATH=src .venv/bin/python results/antidote/make_tables.py

Writes ``results/antidote/<model>/tables.md`` and the block between ``<!-- antidote-protocol:start -->`` and
``<!-- antidote-protocol:end -->`` in README.md and docs/antidote.md (the main table with 95% intervals over
seeds, the learning-rate table, the baselines, the judges' held-out agreement and the figures
docs/antidote_protocol_*.png). The claims table itself is written by ``python -m robustlab.claims --readme
README.md`` (robustlab.antidote.reproduce.claims reads the same cells). Reading is safe while cells run.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from robustlab.antidote import protocol_report as R
from robustlab.report import markdown_table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
START, END = "<!-- antidote-protocol:start -->", "<!-- antidote-protocol:end -->"
TARGETS = (ROOT / "docs" / "antidote.md", ROOT / "README.md")


def judges_text() -> str:
    """The held-out agreement of every judge used, from the committed judge reports."""
    lines = []
    for name, file in (
        ("embedding", "embedding_judge_report.json"),
        ("minilm-ft", "minilm_ft_judge_report.json"),
    ):
        path = HERE / "protocol" / file
        if not path.is_file():
            continue
        r = json.loads(path.read_text(encoding="utf-8"))
        lines.append(
            f"`{name}` judge: held-out agreement with BeaverTails `is_safe` {r['agreement']:.3f}, balanced "
            f"accuracy {r['balanced_accuracy']:.3f}, AUC {r['auc']:.3f} ({r.get('n_heldout', '?')} held-out "
            "pairs, split by prompt)"
        )
    return "; ".join(lines) if lines else "judge reports not committed"


def model_block(cells: list, model: str, rel: str) -> list[str]:
    frozen = R.frozen_setting(HERE, model)
    mains = R.main_cells(cells, model, frozen)
    seeds = R.pilot_seeds(HERE, model)
    if not mains:  # the frozen setting has no cell yet: say so, then the model's other cells as records
        if frozen is None:
            return []
        lr_f, ep_f, n_f, align_f = frozen
        return [
            f"#### {model}: the declared setting (SFT attack on n = {n_f} at lr {lr_f:g}, {ep_f:g} epochs "
            f"after {align_f})",
            "",
            f"Status: no cell of this setting committed yet, so its {R.pilot_text(seeds)} "
            f"{'is' if len(seeds) == 1 else 'are'} not evaluated against the pilot rule and nothing is frozen "
            "for this model.",
            "",
            *records(cells, model, set()),
        ]
    judge = R.judge_of(mains)
    lr, ep = mains[0].lr, mains[0].epochs
    verdict = R.pilot_verdict(mains, seeds)
    rule = (
        f"the pilot rule: FA(attacked) ≥ {R.PILOT_MIN_FA:g}% and HS(attacked) − HS(aligned) ≥ "
        f"{R.PILOT_MIN_GAP:g} points, {R.PILOT_JUDGE} judge"
    )
    one = len(seeds) == 1
    if verdict is None:
        status = (
            f"{R.pilot_text(seeds)} {'is' if one else 'are'} not yet evaluated against {rule}; the settings "
            "are not frozen yet"
        )
    else:
        ok, fa, gap = verdict
        status = (
            f"{R.pilot_text(seeds)} {('passes' if one else 'pass') if ok else ('FAILS' if one else 'FAIL')} "
            f"{rule} (FA {fa:.1f}%, gap {gap:+.1f})"
            + ("" if ok else ": nothing is frozen for this model and this table is a record, not evidence")
        )
    lines = [
        f"#### {model}: {'the main table' if verdict and verdict[0] else 'the declared setting'} (SFT attack "
        f"on n = {mains[0].n} at lr {lr:g}, {ep:g} epochs after {mains[0].align}; mean ± 95% CI over seeds)",
        "",
        f"Status: {status}.",
        "",
    ]
    cols, rows = R.main_table(mains, judge)
    lines += [markdown_table(cols, rows), ""]
    lines.append(
        "Wall time per cell, summed over its stages (alignment, attack and every evaluated point; 1 torch "
        "thread on 2 cores shared with other jobs; the 1-minute load average when the cell was last exported in "
        "brackets): "
        + ", ".join(
            f"seed {c.seed} {sum(c.timing.get('stage_seconds', {}).values()) / 60:.0f} min"
            + (f" [load {c.timing['load_average_end'][0]:.1f}]" if c.timing.get("load_average_end") else "")
            + ("" if c.timing.get("complete", True) else f" (unfinished: {len(c.points)} points)")
            for c in mains
        )
        + "."
    )
    lines.append("")
    fig = R.tradeoff_figure(mains, judge, ROOT / "docs" / f"antidote_protocol_tradeoff_{model}.png")
    lines += [f"![harmful score vs finetune accuracy]({rel}{fig.name})", ""]
    for path in sorted((HERE / "protocol" / "more_prompts").glob(f"{model}_seed*.json")):
        row = json.loads(path.read_text(encoding="utf-8"))
        cols, rows = R.more_prompts_table(row, judge)
        lines += [
            f"#### {model}: seed {row['config']['seed']} on {row['n_eval_harmful']} held-out prompts "
            f"(`protocol/more_prompts.py`: the cell's committed adapters, Antidote α {row['ratio']:g}'s mask "
            "recomputed, harmful prompts only)",
            "",
            markdown_table(cols, rows),
            "",
        ]
    comparable = R.same_setting(cells, mains[0])
    sft = [c for c in comparable if c.method == "sft"]
    if len({c.lr for c in sft}) > 1:
        cols, rows = R.sweep_table(sft, model, "sft", judge, R.PRIMARY_RATIO, "lr")
        lines += [
            f"#### {model}: learning rates ({min(c.epochs for c in sft):g} epochs)",
            "",
            markdown_table(cols, rows),
            "",
        ]
        fig = R.lr_figure(
            sft, model, judge, R.PRIMARY_RATIO, ROOT / "docs" / f"antidote_protocol_lr_{model}.png"
        )
        if fig is not None:
            lines += [f"![harmful score vs learning rate]({rel}{fig.name})", ""]
    if len({c.epochs for c in sft if c.lr == lr}) > 1:
        cols, rows = R.sweep_table(
            [c for c in sft if c.lr == lr], model, "sft", judge, R.PRIMARY_RATIO, "epochs"
        )
        lines += [f"#### {model}: epochs (lr {lr:g})", "", markdown_table(cols, rows), ""]
    if any(c.method != "sft" for c in comparable):
        cols, rows = R.baselines_table(comparable, mains, judge)
        lines += [f"#### {model}: baselines (same harness, data and seeds; paired with SFT's attacked model)", "",
                  markdown_table(cols, rows), ""]  # fmt: skip
    # a sweep table above shows a one-seed setting's primary point; a setting with more seeds, or one the
    # sweeps do not compare (another alignment or n), gets its whole table
    settings = Counter((c.align, c.lr, c.epochs, c.n) for c in sft)
    shown = {(c.align, c.lr, c.epochs, c.n) for c in mains} | {
        k for k, seeds in settings.items() if seeds < 2
    }
    return lines + records(cells, model, shown)


def records(cells: list, model: str, shown: set) -> list[str]:
    """The whole table of each of ``model``'s SFT settings not in ``shown``: a pilot candidate run before
    the freeze, or a declared setting whose pilot seed failed the rule."""
    lines = []
    others = sorted({(c.align, c.lr, c.epochs, c.n) for c in cells if c.model == model and c.method == "sft"})
    for align, lr_o, ep_o, n_o in (k for k in others if k not in shown):
        cs = R.group(cells, model, "sft", lr_o, ep_o, n_o, align)
        cols, rows = R.main_table(cs, R.judge_of(cs))
        verdict = R.pilot_verdict(cs)
        why = (
            f"its pilot seed 0 fails the pilot rule (FA {verdict[1]:.1f}%, gap {verdict[2]:+.1f})"
            if verdict is not None and not verdict[0]
            else "not the frozen setting"
        )
        lines += [
            f"#### {model}: SFT on n = {n_o} at lr {lr_o:g}, {ep_o:g} epochs after {align} — {why}; a record, "
            "not evidence for the claims",
            "",
            markdown_table(cols, rows),
            "",
        ]
    return lines


def build() -> str:
    cells = R.load_cells(HERE)
    models = sorted({c.model for c in cells})
    lines = [
        "<!-- written by `results/antidote/make_tables.py` from the committed cells; do not edit by hand -->",
        "",
        f"Judges: {judges_text()}. The refusal matcher is the second measure.",
        "",
    ]
    for model in models:
        lines += model_block(cells, model, "{rel}")
    if not models:
        lines.append("_No finished cell committed yet._")
    return "\n".join(lines)


def main() -> None:
    text = build()
    for target in TARGETS:
        rel = "" if target.parent.name == "docs" else "docs/"
        body = text.replace("{rel}", rel)
        src = target.read_text(encoding="utf-8")
        if START not in src:
            raise SystemExit(f"{target} has no {START} ... {END} block")
        new = re.sub(
            re.escape(START) + r".*?" + re.escape(END),
            lambda _m, b=body: f"{START}\n{b}\n{END}",
            src,
            flags=re.S,
        )
        target.write_text(new, encoding="utf-8")
        print(f"{target.relative_to(ROOT)}: updated")
    for model in sorted({c.model for c in R.load_cells(HERE)}):
        (HERE / model / "tables.md").write_text(
            text.replace("{rel}", "../../../docs/") + "\n", encoding="utf-8"
        )


if __name__ == "__main__":
    main()
