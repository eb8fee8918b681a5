"""Claims at a glance: one row per headline claim of each paper, with the paper's number, ours (with its
interval and the scale it was measured at) and a verdict. Filled by the systems from their results, never
typed by hand.

A system registers its claims by giving ``robustlab/<system>/reproduce.py`` a function::

    def claims(run: dict | None = None) -> list[robustlab.claims.Claim]

It reads the system's committed results (``results/<system>/`` in the checkout, :func:`results_dir`);
``run`` is the ``results`` dict of this report's section for that system, which a system may use where its
quick run is the evidence it has. The verdict is computed from the numbers by a rule the system states in
the claim's ``rule``. ``robustlab reproduce`` puts the rows first in its report; ``python -m
robustlab.claims --readme README.md`` writes them between the README's ``<!-- claims:start -->`` and
``<!-- claims:end -->`` markers.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_TESTABLE = "not testable at this scale"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, NOT_TESTABLE)

PAPERS = {
    "advmdp": "Dai et al., ICML 2023",
    "fedld": "Zeng et al., MICCAI 2024",
    "antidote": "Huang et al., ICML 2025",
}
COLUMNS = ["paper", "claim", "paper's number", "ours (interval; scale)", "verdict"]
START, END = "<!-- claims:start -->", "<!-- claims:end -->"


@dataclass(frozen=True)
class Claim:
    """One headline claim: ``ours`` gives the measured number with its interval, ``scale`` where it was
    measured, ``source`` the files it was computed from, ``rule`` how the verdict follows."""

    system: str
    claim: str
    paper: str
    ours: str
    scale: str
    verdict: str
    rule: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


def results_dir(system: str) -> Path:
    """``results/<system>`` of the checkout this package runs from (absent in an installed wheel)."""
    return Path(__file__).resolve().parents[2] / "results" / system


def collect(
    systems: Iterable[str], runs: dict[str, dict] | None = None
) -> tuple[list[Claim], dict[str, str]]:
    """Every registered claim of ``systems`` (in order) and, per system whose claims failed, why."""
    rows: list[Claim] = []
    problems: dict[str, str] = {}
    for system in systems:
        try:
            module = importlib.import_module(f"robustlab.{system}.reproduce")
        except ImportError as exc:
            problems[system] = f"not available ({exc})"
            continue
        fn = getattr(module, "claims", None)
        if fn is None:
            problems[system] = "registers no claims"
            continue
        try:
            rows += fn((runs or {}).get(system))
        except Exception as exc:  # one system's broken results must not hide the others' claims
            problems[system] = f"{type(exc).__name__}: {exc}"
    return rows, problems


# --------------------------------------------------------------------------- statistics the systems share


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and a 95% t-interval over seeds (``(m, m, m)`` for a single value: no interval)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan, math.nan
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return m, m, m
    df = len(vals) - 1
    if df in T975:
        t = T975[df]
    else:  # more values than the table (a per-prompt interval): the exact quantile, not the normal's 1.96
        from scipy.stats import t as student_t

        t = float(student_t.ppf(0.975, df))
    half = t * statistics.stdev(vals) / math.sqrt(len(vals))
    return m, m - half, m + half


def fmt_ci(m: float, lo: float, hi: float, digits: int = 3, signed: bool = False) -> str:
    sign = "+" if signed else ""
    if lo == hi:
        return f"{m:{sign}.{digits}f}"
    return f"{m:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


# --------------------------------------------------------------------------- rendering


def slug(text: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def rows(claims: Sequence[Claim], link: Callable[[str], str | None]) -> list[list[Any]]:
    """Table rows; ``link(system)`` is the anchor of the system's section (``None``: no link)."""
    from robustlab.report import Link

    out = []
    for c in claims:
        href = link(c.system)
        claim = Link(c.claim, href) if href else c.claim
        out.append([PAPERS.get(c.system, c.system), claim, c.paper, f"{c.ours} ({c.scale})", c.verdict])
    return out


def rule_notes(claims: Sequence[Claim], emphasis: str = "") -> list[str]:
    """One note per distinct rule: the claims it decides (by paper), the rule, the files it reads."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for c in claims:
        groups.setdefault((c.system, c.rule, c.source), []).append(f"{emphasis}{c.claim}{emphasis}")
    return [
        f"{PAPERS.get(system, system)}, {'; '.join(names)}: {rule} From {source}."
        for (system, rule, source), names in groups.items()
    ]


def readme_block(readme: str, claims: Sequence[Claim], problems: dict[str, str]) -> str:
    """The Markdown between the README's claims markers, linking each row to its system's section."""
    from robustlab.report import markdown_table

    headings = re.findall(r"^## (.+)$", readme, re.M)

    def link(system: str) -> str | None:
        for h in headings:
            if h.lower().startswith(system):
                return "#" + slug(h)
        return None

    lines = [
        "<!-- written by `python -m robustlab.claims --readme README.md` from each system's committed "
        "results; do not edit by hand -->",
        "",
        markdown_table(COLUMNS, rows(claims, link)),
        "",
        "How each verdict follows from the numbers (95% intervals: t over seeds; bootstrap over seeds for "
        "slopes):",
        "",
    ]
    lines += [f"- {note}" for note in rule_notes(claims, emphasis="*")]
    lines += [f"- {s}: claims unavailable ({why})" for s, why in problems.items()]
    return "\n".join(lines)


def update_readme(path: str | Path, systems: Iterable[str] | None = None) -> bool:
    """Rewrite the claims block of ``path``; returns whether it changed."""
    from robustlab.reproduce import SYSTEMS
    from robustlab.runs import atomic_write_text

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} block; add the two markers where the table goes")
    claims, problems = collect(systems or SYSTEMS)
    block = readme_block(text, claims, problems)
    new = re.sub(
        re.escape(START) + r".*?" + re.escape(END), lambda _m: f"{START}\n{block}\n{END}", text, flags=re.S
    )
    if new != text:
        atomic_write_text(path, new)
    return new != text


def as_dicts(claims: Sequence[Claim]) -> list[dict[str, Any]]:
    return [asdict(c) for c in claims]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Print the claims table, or write it into a README.")
    ap.add_argument("--readme", type=Path, help="README to update between its claims markers")
    args = ap.parse_args(argv)
    if args.readme:
        changed = update_readme(args.readme)
        print(f"{args.readme}: claims table {'updated' if changed else 'unchanged'}")
        return
    from robustlab.report import markdown_table
    from robustlab.reproduce import SYSTEMS

    claims, problems = collect(SYSTEMS)
    print(markdown_table(COLUMNS, rows(claims, lambda _s: None)))
    for c in claims:
        print(f"- {c.system}: {c.claim}: {c.verdict} — rule: {c.rule}; from {c.source}")
    for s, why in problems.items():
        print(f"- {s}: claims unavailable ({why})")


if __name__ == "__main__":  # pragma: no cover
    main()
