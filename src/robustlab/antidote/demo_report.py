"""The offline demo's results: mean and 95% interval over seeds per point, the table, the paired differences
(Antidote minus each control), the trade-off plot and a summary computed from the numbers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustlab.antidote.stats import mean_ci, seed_summary

#: The demo's points, in table order.
STAGES = ("aligned", "attacked", "antidote", "random", "benign")

MEASURES = (
    "hs_refusal",
    "fa",
    "nll_harmful",
    "nll_refusal",
    "refusal_preference",
    "refusal_preference_start",
)


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One row per (mode, stage, ratio) with the mean and 95% half-width of every measure over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["stage"], float(r["ratio"])), []).append(r)
    order = {s: i for i, s in enumerate(STAGES)}
    out = []
    for (mode, stage, ratio), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0] != "-", kv[0][0], kv[0][2], order[kv[0][1]])
    ):
        row: dict[str, Any] = {"mode": mode, "stage": stage, "ratio": ratio, "seeds": len(rs)}
        row |= seed_summary(rs, (*MEASURES, "hs_embedding"))
        out.append(row)
    return out


def table_rows(agg: Sequence[dict]) -> tuple[list[str], list[list[Any]]]:
    cols = [
        "fine-tuning",
        "stage",
        "α",
        "HS refusal-judge %",
        "HS embedding-judge %",
        "AG News acc %",
        "NLL harmful ↑",
        "NLL refusal ↓",
        "refusal pref. % (whole) ↑",
        "refusal pref. % (first 3 tokens) ↑",
    ]

    def cell(row: dict, m: str, digits: int) -> str:
        if m not in row or row[m] != row[m]:
            return "—"
        return f"{row[m]:.{digits}f} ± {row[m + '_ci']:.{digits}f}"

    rows = [
        [
            r["mode"],
            r["stage"],
            r["ratio"] if r["ratio"] else "—",
            cell(r, "hs_refusal", 1),
            cell(r, "hs_embedding", 1),
            cell(r, "fa", 1),
            cell(r, "nll_harmful", 2),
            cell(r, "nll_refusal", 2),
            cell(r, "refusal_preference", 1),
            cell(r, "refusal_preference_start", 1),
        ]
        for r in agg
    ]
    return cols, rows


def tradeoff_plot(agg: Sequence[dict], path: Path, modes: Sequence[str] = ("lora", "full")) -> Path:
    """Harmful score and refusal preference against task accuracy, per fine-tuning mode; one line per
    method across mask ratios, starting from the attacked model."""
    from robustlab.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, len(modes), figsize=(5.2 * len(modes), 8), squeeze=False)
    colors = {"antidote": "tab:red", "random": "tab:gray", "benign": "tab:blue"}
    aligned = [r for r in agg if r["stage"] == "aligned"]
    for j, mode in enumerate(modes):
        attacked = [r for r in agg if r["mode"] == mode and r["stage"] == "attacked"]
        for i, (m, label) in enumerate(
            (
                ("hs_refusal", "harmful score % (refusal judge, ↓)"),
                ("refusal_preference_start", "refusal preference %, first 3 tokens (↑)"),
            )
        ):
            ax = axes[i][j]
            for s, c in colors.items():
                pts = sorted(
                    (r for r in agg if r["mode"] == mode and r["stage"] == s), key=lambda r: r["ratio"]
                )
                pts = attacked + pts
                if len(pts) < 2:
                    continue
                ax.errorbar(
                    [p["fa"] for p in pts],
                    [p[m] for p in pts],
                    xerr=[p["fa_ci"] for p in pts],
                    yerr=[p[m + "_ci"] for p in pts],
                    color=c,
                    marker="o",
                    capsize=2,
                    label=s,
                )
                for p in pts[1:]:
                    ax.annotate(
                        f"{p['ratio']:g}",
                        (p["fa"], p[m]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
            for r, mk, lab in (
                (attacked[0] if attacked else None, "X", "attacked"),
                (aligned[0] if aligned else None, "*", "aligned"),
            ):
                if r is not None:
                    ax.scatter([r["fa"]], [r[m]], marker=mk, s=120, color="k", zorder=5, label=lab)
            ax.set_xlabel("AG News accuracy % (↑)")
            ax.set_ylabel(label)
            ax.set_title(f"{mode} fine-tuning")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("Antidote on a tiny from-scratch Llama: safety vs task accuracy (mean ± 95% CI over seeds)")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return save_figure(fig, path)


PREF = "refusal_preference_start"


PAIRED = ("nll_refusal", "nll_harmful", "fa")


def paired_differences(rows: Sequence[dict]) -> list[dict]:
    """Antidote minus each control at the same mode, ratio and seed (the seeds share the attacked model),
    with the mean and 95% t half-width over seeds for ``nll_refusal`` (negative = more refusal),
    ``nll_harmful`` (positive = less harmful) and ``fa``."""
    index = {(r["seed"], r["mode"], r["stage"], float(r["ratio"])): r for r in rows}
    out = []
    keys = sorted({(r["mode"], float(r["ratio"])) for r in rows if r["stage"] == "antidote"})
    for mode, ratio in keys:
        for control in ("benign", "random"):
            pairs = [
                (index[(s, mode, "antidote", ratio)], index[(s, mode, control, ratio)])
                for (s, m, st, a) in index
                if m == mode and st == "antidote" and a == ratio and (s, mode, control, ratio) in index
            ]
            row: dict[str, Any] = {"mode": mode, "ratio": ratio, "control": control, "seeds": len(pairs)}
            for m in PAIRED:
                row[m], row[m + "_ci"] = mean_ci([a[m] - c[m] for a, c in pairs])
            out.append(row)
    return out


def paired_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    cols = [
        "fine-tuning",
        "α",
        "control",
        "Δ NLL refusal (antidote − control, ↓ = more refusal)",
        "Δ NLL harmful (↑ = less harmful)",
        "Δ accuracy",
    ]
    body = [
        [d["mode"], d["ratio"], d["control"]] + [f"{d[m]:+.3f} ± {d[m + '_ci']:.3f}" for m in PAIRED]
        for d in paired_differences(rows)
    ]
    return cols, body


def summary_text(agg: Sequence[dict]) -> str:
    """What the numbers say about the issue's goal, computed from the table (no hand-written verdicts):
    at equal α, does Antidote move the likelihood measures toward refusal more than both controls, at a
    smaller accuracy cost than benign calibration?"""
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in agg if r["mode"] != "-"):
        att = next((r for r in agg if r["mode"] == mode and r["stage"] == "attacked"), None)
        if att is None:
            continue
        ratios = sorted({r["ratio"] for r in agg if r["mode"] == mode and r["stage"] == "antidote"})
        wins_pref = wins_nll = wins_fa = 0
        detail = []
        for a in ratios:
            get = {
                s: next((r for r in agg if r["mode"] == mode and r["stage"] == s and r["ratio"] == a), None)
                for s in ("antidote", "random", "benign")
            }
            if any(v is None for v in get.values()):
                continue
            ant, rnd, ben = get["antidote"], get["random"], get["benign"]
            pref = ant[PREF] > max(rnd[PREF], ben[PREF])
            nll = ant["nll_harmful"] > max(rnd["nll_harmful"], ben["nll_harmful"])
            fa = (att["fa"] - ant["fa"]) < (att["fa"] - ben["fa"])
            wins_pref += pref
            wins_nll += nll
            wins_fa += fa
            detail.append(
                f"α={a:g}: refusal pref. (first 3 tokens) {ant[PREF]:.1f} (random {rnd[PREF]:.1f}, "
                f"benign {ben[PREF]:.1f}); NLL refusal {ant['nll_refusal']:.2f} (random {rnd['nll_refusal']:.2f}, "
                f"benign {ben['nll_refusal']:.2f}); NLL harmful {ant['nll_harmful']:.2f} "
                f"(random {rnd['nll_harmful']:.2f}, benign {ben['nll_harmful']:.2f}); accuracy {ant['fa']:.1f} "
                f"(random {rnd['fa']:.1f}, benign {ben['fa']:.1f}); HS {ant['hs_refusal']:.1f} "
                f"(random {rnd['hs_refusal']:.1f}, benign {ben['hs_refusal']:.1f})"
            )
        n = len(detail)
        lines.append(
            f"\n**{mode} fine-tuning** (attacked: HS {att['hs_refusal']:.1f}%, accuracy {att['fa']:.1f}%, refusal "
            f"pref. (first 3 tokens) {att[PREF]:.1f}%). Antidote beats both controls on refusal preference at "
            f"{wins_pref}/{n} ratios and on harmful-answer NLL at {wins_nll}/{n}; its accuracy cost is below "
            f"benign calibration's at {wins_fa}/{n}. Means over seeds; see the table's 95% intervals before "
            "reading a difference as real, and the paired differences below."
        )
        lines += ["", *[f"- {d}" for d in detail]]
    return "\n".join(lines)
