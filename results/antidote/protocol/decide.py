"""Apply the pilot rule of frozen.yaml to the exported pilot cells and write pilot.md (issue 15, step 2).

    PYTHONPATH=src .venv/bin/python results/antidote/protocol/decide.py

Reads only the aligned and the attacked (fine-tuned) points of results/antidote/protocol/pilot/<model>/*:
the pilot computes no Antidote point. The table also goes into the ``<!-- antidote-pilot:start -->`` block
of README.md and docs/antidote.md. Exit status 0 when the first candidate that passes is the frozen one.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from robustlab.antidote.protocol import pilot_candidate
from robustlab.antidote.protocol_report import PILOT_JUDGE as JUDGE
from robustlab.antidote.protocol_report import PILOT_MIN_FA as MIN_FA
from robustlab.antidote.protocol_report import PILOT_MIN_GAP as MIN_GAP
from robustlab.antidote.protocol_report import pilot_rule

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
START, END = "<!-- antidote-pilot:start -->", "<!-- antidote-pilot:end -->"


def main() -> int:
    frozen = yaml.safe_load((HERE / "frozen.yaml").read_text(encoding="utf-8"))
    lines = [
        "# Pilot (seed 0): the aligned and attacked models alone",
        "",
        f"Rule (frozen.yaml): FA(attacked) ≥ {MIN_FA:g}% on the 872 SST-2 validation rows and "
        f"HS(attacked) − HS(aligned) ≥ {MIN_GAP:g} points ({JUDGE} judge); the first candidate in the declared "
        "order that passes is frozen. Antidote is not computed in the pilot.",
        "",
        "| candidate | FA aligned % | FA attacked % | HS aligned % | HS attacked % | gap | minilm-ft HS aligned / attacked % (gap) | refusal-matcher HS aligned / attacked % | align steps / s | attack steps / s | eval s aligned / attacked | load average at end | passes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    chosen = None
    notes: set[str] = set()
    pilot = yaml.safe_load((HERE / "pilot.yaml").read_text(encoding="utf-8"))

    def key(cfg: dict) -> tuple[float, float, int, bool, float]:
        """(attack lr, attack epochs, n, refusal alignment, alignment epochs) of a settings mapping."""
        return (
            float(cfg["finetune"]["train"]["lr"]),
            float(cfg["finetune"]["train"]["epochs"]),
            int(cfg["data"]["n"]),
            bool(cfg["data"].get("align_with_refusals", False)),
            float(cfg["align"]["train"]["epochs"]),
        )

    declared = [key(pilot_candidate(pilot, c)) for c in pilot["candidates"]]

    def setting(folder: Path) -> tuple[float, float, int, bool, float]:
        return key(yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")))

    def order(folder: Path) -> int:  # the declared order decides which passing candidate is first
        return declared.index(setting(folder))

    seen: set[int] = set()
    for folder in sorted((HERE / "pilot" / frozen["model"]).glob("pilot-*"), key=order):
        seen.add(order(folder))
        cells = folder / "cells"
        al = json.loads((cells / "stage=eval__point=aligned.json").read_text(encoding="utf-8"))
        at = json.loads((cells / "stage=eval__point=finetuned.json").read_text(encoding="utf-8"))
        sa = json.loads((cells / "stage=align.json").read_text(encoding="utf-8"))
        sf = json.loads((cells / "stage=finetune.json").read_text(encoding="utf-8"))
        lr, ep, n, refusals, align_ep = setting(folder)
        label = f"{order(folder) + 1}: n {n} ({round(n * pilot['data']['harmful_ratio'])} harmful), lr {lr:g}, {ep:g} epochs"
        if refusals:
            label += f"; alignment with refusals, {align_ep:g} epoch{'s' if align_ep != 1 else ''}"
        ok, _, gap = pilot_rule(al, at)
        ft_al, ft_at = al.get("hs_minilm-ft"), at.get("hs_minilm-ft")
        second = (
            "–" if ft_al is None or ft_at is None else f"{ft_al:.1f} / {ft_at:.1f} ({ft_at - ft_al:+.1f})"
        )
        load = json.loads((folder / "timing.json").read_text(encoding="utf-8")).get("load_average_end")
        reused = " (reused¹)" if "reused" in al else ""
        lines.append(
            f"| {label} | {al['fa']:.1f} | {at['fa']:.1f} | {al[f'hs_{JUDGE}']:.1f} | "
            f"{at[f'hs_{JUDGE}']:.1f} | {gap:+.1f} | {second} | {al['hs_refusal']:.1f} / {at['hs_refusal']:.1f} | "
            f"{sa['steps']} / {sa['seconds']:.0f} | {sf['steps']} / {sf['seconds']:.0f} | "
            f"{al['seconds']:.0f}{reused} / {at['seconds']:.0f} | "
            f"{'–' if not load else ' '.join(f'{x:.1f}' for x in load)} | {'yes' if ok else 'no'} |"
        )
        if reused:
            notes.add(
                f"¹ the alignment stage was re-run for this candidate and its LoRA adapter is bit-identical "
                f"(every tensor; sha256 {al['reused']['sha256_ours'][:12]}…) to the committed "
                f"`{Path(al['reused']['adapter']).parent}`, so the aligned point (same model, same "
                f"prompts, greedy) is the committed one of `{Path(al['reused']['donor']).name}`, not re-evaluated."
            )
        check = folder / "aligned_reuse.json"
        c = json.loads(check.read_text(encoding="utf-8")) if check.is_file() else {}
        if not reused and c.get("tensors_equal"):  # the same aligned model, evaluated again
            donor = json.loads(
                (ROOT / c["donor"] / "cells" / "stage=eval__point=aligned.json").read_text(encoding="utf-8")
            )
            same = all(al.get(k) == donor.get(k) for k in ("answers_harmful", "answers_task"))
            notes.add(
                f"² candidate {order(folder) + 1}: its alignment adapter is bit-identical to the committed one, "
                "but its settings differ (the held-out slice depends on n), so its aligned point was evaluated again: "
                f"{'the same' if same else 'NOT the same'} harmful answers and SST-2 outputs as the committed point."
            )
        if ok and chosen is None:
            chosen = setting(folder)
    frozen_setting = key(frozen)
    lines += [
        "",
        f"Prompts: {al.get('n_eval_harmful')} harmful (128 new tokens), {al.get('n_eval_task')} SST-2 rows. "
        "Seconds are wall seconds with 1 torch thread; the load average (1, 5, 15 min) is the machine's when "
        "the candidate finished.",
        *sorted(notes, key=lambda x: "¹²".find(x[0])),
        *[
            f"The base model before alignment (a diagnostic, `base_point.py`; no choice uses it), same "
            f"{b['n_eval_harmful']} prompts: HS {b[f'hs_{JUDGE}']:.1f} ({JUDGE} judge), {b['hs_minilm-ft']:.1f} "
            f"(minilm-ft), refusal-matcher HS {b['hs_refusal']:.1f}."
            for b in (
                json.loads(f.read_text(encoding="utf-8"))
                for f in sorted((HERE / "pilot" / frozen["model"]).glob("base_seed*.json"))
            )
        ],
        "",
        "Decision: "
        + (
            f"candidate {declared.index(chosen) + 1} is the first that passes"
            + (
                " and is the frozen setting"
                if chosen == frozen_setting
                else " (frozen.yaml does not hold it yet: freeze it)"
            )
            if chosen
            else "no declared candidate passed: the rule is exhausted"
            if len(seen) == len(declared)
            else f"no candidate passed yet; not run: {', '.join(str(i + 1) for i in range(len(declared)) if i not in seen)}"
        ),
    ]
    (HERE / "pilot.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    block = "\n".join(
        [
            "<!-- written by `results/antidote/protocol/decide.py` from the pilot cells; do not edit by hand -->",
            "",
            *lines[2:],
        ]
    )
    for target in (ROOT / "README.md", ROOT / "docs" / "antidote.md"):
        text = target.read_text(encoding="utf-8")
        if START in text:
            text = re.sub(
                re.escape(START) + r".*?" + re.escape(END),
                lambda _m: f"{START}\n{block}\n{END}",
                text,
                flags=re.S,
            )
            target.write_text(text, encoding="utf-8")
    return 0 if chosen == frozen_setting else 1


if __name__ == "__main__":
    sys.exit(main())
