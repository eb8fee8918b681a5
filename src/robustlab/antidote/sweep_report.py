"""The sweep's results: mean and 95% interval over seeds per (method, lr, epochs), the baseline table, one
table per measure across the lr and epoch sweeps, and the plots. ``cfg`` is a
:class:`robustlab.antidote.sweep.SweepConfig`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustlab.antidote.stats import seed_summary

MEASURES = (
    "hs_refusal",
    "fa",
    "fa_likelihood",
    "nll_harmful",
    "nll_refusal",
    "refusal_preference",
    "refusal_preference_start",
)


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Mean and 95% t-interval half-width over seeds of every measure, per (method, lr, epochs)."""

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r.get("lr"), r.get("epochs")), []).append(r)
    out = []
    for (method, lr, ep), rs in groups.items():
        row: dict[str, Any] = {
            "method": method,
            "label": rs[0].get("label", method),
            "lr": lr,
            "epochs": ep,
            "seeds": len(rs),
        }
        row |= seed_summary(rs, sorted({k for r in rs for k in r if k.startswith("hs_")} | set(MEASURES)))
        out.append(row)
    return out


def _fmt(row: dict | None, m: str, digits: int) -> str:
    if row is None or m not in row or row[m] != row[m]:
        return "—"
    if row.get("seeds", 1) > 1:
        return f"{row[m]:.{digits}f} ± {row[m + '_ci']:.{digits}f}"
    return f"{row[m]:.{digits}f}"


TABLE_MEASURES = (
    ("refusal_preference_start", "refusal preference % over the first 3 answer tokens (↑)", 1),
    ("refusal_preference", "refusal preference % over whole answers (↑)", 1),
    ("nll_harmful", "NLL of the held-out harmful answer (↑)", 2),
    ("hs_refusal", "harmful score %, refusal judge (↓)", 1),
    ("fa", "task accuracy %, exact match of the greedy answer (↑)", 1),
    ("fa_likelihood", "task accuracy %, most likely label (↑)", 1),
    ("nll_refusal", "NLL of a refusal (↓)", 2),
)


def sweep_table(agg: Sequence[dict], cfg: Any, axis: str, measure: str, digits: int) -> str:
    """One measure across the lr (``axis="lr"``) or epoch sweep: a row per method, a column per value and
    the average over the values."""
    from robustlab.report import markdown_table

    values = [float(v) for v in (cfg.lrs if axis == "lr" else cfg.epochs)]
    fixed = ("epochs", float(cfg.default_epochs)) if axis == "lr" else ("lr", float(cfg.default_lr))
    head = [f"lr {v:g}" for v in values] if axis == "lr" else [f"{v:g} ep" for v in values]
    body = []
    for s in cfg.specs():
        cells = []
        means = []
        for v in values:
            r = next(
                (
                    x
                    for x in agg
                    if x["method"] == s.name and x.get(axis) == v and x.get(fixed[0]) == fixed[1]
                ),
                None,
            )
            cells.append(_fmt(r, measure, digits))
            if r is not None and r.get(measure) is not None and r[measure] == r[measure]:
                means.append(r[measure])
        avg = f"{sum(means) / len(means):.{digits}f}" if len(means) == len(values) else "—"
        body.append([s.label, *cells, avg])
    return markdown_table(["method", *head, "avg"], body)


def baseline_table(agg: Sequence[dict], cfg: Any) -> str:
    """Every method at the default cell (default lr and epochs), and the aligned models before fine-tuning."""
    from robustlab.report import markdown_table

    hs = sorted({k for r in agg for k in r if k.startswith("hs_") and not k.endswith("_ci")})
    cols = [
        "method",
        *[f"HS {k[3:]} % ↓" for k in hs],
        "task acc % ↑",
        "task acc (likelihood) % ↑",
        "NLL harmful ↑",
        "NLL refusal ↓",
        "refusal pref. % (whole) ↑",
        "refusal pref. % (first 3 tokens) ↑",
    ]

    def row(label: str, r: dict | None) -> list[str]:
        return [
            label,
            *[_fmt(r, k, 1) for k in hs],
            _fmt(r, "fa", 1),
            _fmt(r, "fa_likelihood", 1),
            _fmt(r, "nll_harmful", 2),
            _fmt(r, "nll_refusal", 2),
            _fmt(r, "refusal_preference", 1),
            _fmt(r, "refusal_preference_start", 1),
        ]

    body = [
        row(f"aligned only ({r['method'][8:]})", r) for r in agg if str(r["method"]).startswith("aligned-")
    ]
    for s in cfg.specs():
        r = next(
            (
                x
                for x in agg
                if x["method"] == s.name
                and x.get("lr") == float(cfg.default_lr)
                and x.get("epochs") == float(cfg.default_epochs)
            ),
            None,
        )
        body.append(row(s.label, r))
    return markdown_table(cols, body)


def sweep_tables(agg: Sequence[dict], cfg: Any) -> str:
    parts = [
        f"### Baseline table (lr {cfg.default_lr:g}, {cfg.default_epochs:g} epochs)\n\n{baseline_table(agg, cfg)}"
    ]
    for axis, title in (
        ("lr", f"Learning-rate sweep ({cfg.default_epochs:g} epochs)"),
        ("epochs", f"Epoch sweep (lr {cfg.default_lr:g})"),
    ):
        if not (cfg.lrs if axis == "lr" else cfg.epochs):
            continue
        for m, name, digits in TABLE_MEASURES:
            parts.append(f"### {title}: {name}\n\n{sweep_table(agg, cfg, axis, m, digits)}")
    return "\n\n".join(parts) + "\n"


def sweep_plots(agg: Sequence[dict], cfg: Any, out: Path) -> list[Path]:
    """NLL of a refusal, harmful score and task accuracy (most likely label when measured, else exact match)
    against lr and against epochs, one line per method."""
    from robustlab.report import pyplot, save_figure

    plt = pyplot()
    paths = []
    fa = "fa_likelihood" if any(r.get("fa_likelihood") is not None for r in agg) else "fa"
    panels = (
        ("nll_refusal", "NLL of a refusal (↓)"),
        ("hs_refusal", "harmful score %, refusal judge (↓)"),
        (fa, "task accuracy %" + (", most likely label" if fa == "fa_likelihood" else "") + " (↑)"),
    )
    for axis, values, fixed, name in (
        ("lr", cfg.lrs, ("epochs", float(cfg.default_epochs)), "sweep_lr.png"),
        ("epochs", cfg.epochs, ("lr", float(cfg.default_lr)), "sweep_epochs.png"),
    ):
        if not values:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
        for s in cfg.specs():
            pts = sorted(
                (
                    r
                    for r in agg
                    if r["method"] == s.name
                    and r.get(fixed[0]) == fixed[1]
                    and r.get(axis) in [float(v) for v in values]
                ),
                key=lambda r: r[axis],
            )
            for ax, (m, _) in zip(axes, panels, strict=True):
                ax.plot([p[axis] for p in pts], [p.get(m) for p in pts], marker="o", label=s.label)
        for ax, (_, label) in zip(axes, panels, strict=True):
            ax.set_xlabel("fine-tuning learning rate" if axis == "lr" else "fine-tuning epochs")
            ax.set_ylabel(label)
            if axis == "lr":
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        paths.append(save_figure(fig, out / name))
    return paths
