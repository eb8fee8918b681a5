"""Regenerate the judge and quick-demo blocks of docs/antidote.md and the README from the committed results.

Usage (from the repository root): ``python results/antidote/update_judge_demo_docs.py``. It replaces the block
between ``<!-- generated:antidote-judge -->`` and ``<!-- /generated:antidote-judge -->`` with the judge's
held-out table (``results/antidote/judge/judge_report.json``), and the ``antidote-quick-demo`` block with the
quick demo's table and examples (``results/antidote/quick_demo/summary.json``), in both files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from robustlab.antidote.finetuned_judge import report_markdown

ROOT = Path(__file__).resolve().parents[2]
RES = ROOT / "results" / "antidote"


def judge_block() -> str:
    rep = json.loads((RES / "judge" / "judge_report.json").read_text())
    body = report_markdown(rep).split("\n", 2)[2]  # without the title line
    return (
        "Held-out agreement with BeaverTails' human labels (`results/antidote/judge/judge_report.md`):\n\n"
        + body
    )


def demo_block() -> str:
    from robustlab.antidote.reproduce import demo_section
    from robustlab.report import Report

    summary = json.loads((RES / "quick_demo" / "summary.json").read_text())
    report = Report("quick demo")
    report.add(demo_section(summary, "quick"))
    md = report.to_markdown()
    part = md[md.index("Settings:") :]
    part = part.replace("### ", "#### ")
    env = (
        json.loads((RES / "quick_demo" / "env.json").read_text())
        if (RES / "quick_demo" / "env.json").is_file()
        else {}
    )
    note = ""
    if env:
        note = (
            f"\n\nMeasured: {summary['seconds']:.0f} s wall for the demo itself (SmolLM2 loaded from the cache in "
            f"{summary['load_seconds']:.0f} s), `robustlab reproduce --quick --only antidote` {env['wall_seconds']:.0f} s, "
            f"load average {env['load_before']:.1f} before and {env['load_after']:.1f} after on {env['cpus']} cores "
            f"({env['note']})."
        )
    return part.rstrip() + note


def replace(text: str, name: str, block: str) -> str:
    pattern = re.compile(rf"(<!-- generated:{name} -->\n)(?:.*?\n)?(<!-- /generated:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no generated:{name} block")
    return pattern.sub(lambda m: m.group(1) + block.rstrip() + "\n" + m.group(2), text, count=1)


def main() -> None:
    blocks = {"antidote-judge": judge_block()}
    if (RES / "quick_demo" / "summary.json").is_file():
        blocks["antidote-quick-demo"] = demo_block()
    for path in (ROOT / "README.md", ROOT / "docs" / "antidote.md"):
        text = path.read_text()
        for name, block in blocks.items():
            if f"<!-- generated:{name} -->" in text:
                text = replace(text, name, block)
        path.write_text(text)
        print(f"updated {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
