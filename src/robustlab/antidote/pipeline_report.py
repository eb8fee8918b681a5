"""The pipeline's results: the table of every evaluated point and the harmful-score vs finetune-accuracy
trade-off plot."""

from __future__ import annotations

from pathlib import Path


def results_table(rows: list[dict], judges: list[str]) -> str:
    from robustlab.report import markdown_table

    cols = [
        "stage",
        "α",
        *[f"HS {j} %" for j in judges],
        "FA %",
        "NLL harmful",
        "NLL refusal",
        "refusal pref. %",
        "refusal pref. % (first 3 tokens)",
    ]
    body = [
        [
            r["stage"],
            r.get("ratio") or "—",
            *[r.get(f"hs_{j}") for j in judges],
            r.get("fa"),
            r.get("nll_harmful"),
            r.get("nll_refusal"),
            r.get("refusal_preference"),
            r.get("refusal_preference_start"),
        ]
        for r in rows
    ]
    return markdown_table(cols, body)


def tradeoff_plot(rows: list[dict], judge: str, path: Path) -> Path:
    """Harmful score against finetune accuracy: the aligned and fine-tuned models, and one line per
    re-alignment method across the mask ratios."""
    from robustlab.report import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    hs = f"hs_{judge}"
    fa = lambda r: r.get("fa") if r.get("fa") is not None else float("nan")  # noqa: E731
    base = {r["stage"]: r for r in rows if r["stage"] in ("aligned", "finetuned")}
    for label in dict.fromkeys(r["stage"] for r in rows if r["stage"] not in ("aligned", "finetuned")):
        pts = sorted((r for r in rows if r["stage"] == label), key=lambda r: r["ratio"])
        if "finetuned" in base:
            pts = [base["finetuned"], *pts]
        ax.plot([fa(p) for p in pts], [p.get(hs) for p in pts], marker="o", label=label)
        for p in pts[1:]:
            ax.annotate(
                f"{p['ratio']:g}", (fa(p), p.get(hs)), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    for name, mk in (("aligned", "*"), ("finetuned", "X")):
        if name in base:
            ax.scatter(
                [fa(base[name])], [base[name].get(hs)], marker=mk, s=120, color="k", zorder=5, label=name
            )
    ax.set_xlabel("finetune accuracy % (↑)")
    ax.set_ylabel(f"harmful score % ({judge} judge, ↓)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
