"""Rebuild the fedld results tables in docs/fedld.md and README.md from the finished cells in results/fedld.

Usage (repo root): .venv/bin/python results/fedld/make_tables.py

For every group of run folders here (``<group>_beta<b>``: a dataset, or ``regime_<...>`` for the pretrained
backbone grid), the block between ``<!-- fedld-results:<group>:start -->`` and
``<!-- fedld-results:<group>:end -->`` in both files is replaced by one table per beta (the experiment's own
``summary_table``) and the per-seed FedLD update ratio, cosine and matched server lr. A block whose group
has no finished cell here keeps its text but is marked, on its first line, as not backed by committed
cells (:func:`missing_note`).

``regime-vs-cnn`` is the regime comparison: every (beta, core method) of the pretrained-backbone grid
(:data:`REGIMES`, as ``regime_sweep.sh`` runs it) is a row, a row without a finished cell says "missing",
and the block says how many of the grid's cells exist. ``round-benchmark-<name>`` is the round benchmark in
``bench/fedld_round_<name>.json`` (``benchmarks/fedld_round.py``).
``--figure DATASET:BETA`` redraws that folder's outputs (summary.json, table.md, plots) and copies its
accuracy plot to docs/fedld_accuracy_<dataset>.png. ``--results DIR --print`` builds the blocks from another
copy of this folder (e.g. a running sweep's) and prints them instead of writing the docs. Reading is safe
while a sweep runs: only finished cells are read.
"""

from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from robustlab.fedld.experiment import ExperimentConfig, summarize, summary_table, write_outputs
from robustlab.report import markdown_table
from robustlab.runs import RunDir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NAMES = {"retinamnist": "RetinaMNIST", "pneumoniamnist_balanced": "PneumoniaMNIST (balanced subsample)"}
MISSING = "> **Not backed by committed cells**"
NONE_YET = "_No finished cell committed yet._"
OWN = " (clients' own models)"
TARGETS = (ROOT / "docs" / "fedld.md", ROOT / "README.md")


def load(folder: Path) -> tuple[RunDir, ExperimentConfig, dict]:
    config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    cfg = ExperimentConfig(**config)
    run = RunDir(folder)
    return run, cfg, summarize(run, cfg)


def round_costs(run: RunDir, rounds: int) -> str | None:
    """Median seconds per round (whole round; server aggregation alone) of FedAvg and FedLD over their
    finished cells in a folder, and the FedLD / FedAvg ratio; ``None`` unless both have a cell."""
    import statistics

    per: dict[str, dict[str, list[float]]] = {}
    for key in run.done_keys():
        cell = run.load(key)
        if cell["method"] in ("fedavg", "fedld"):
            hist = [h for h in cell["history"] if 0 < h["round"] <= rounds]
            d = per.setdefault(cell["method"], {"seconds": [], "aggregate_seconds": []})
            for k in d:
                d[k] += [float(h[k]) for h in hist]
    if set(per) != {"fedavg", "fedld"}:
        return None
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in per.items()}
    return (
        f"- median seconds per round, whole round (aggregation alone): FedAvg {med['fedavg']['seconds']:.0f} "
        f"({med['fedavg']['aggregate_seconds']:.2f}), FedLD {med['fedld']['seconds']:.0f} "
        f"({med['fedld']['aggregate_seconds']:.2f}); FedLD / FedAvg {med['fedld']['seconds'] / med['fedavg']['seconds']:.2f} "
        "(cells run at different times on the shared cores: the whole-round ratio carries the load's drift)"
    )


def folder_block(folder: Path) -> tuple[str, str, int, float, dict]:
    """(group, markdown, finished cells, beta, summary) for one run folder."""
    run, cfg, summary = load(folder)
    cols, rows = summary_table(summary)
    model = "" if cfg.model == "cnn" else (
        f", {'ImageNet-pretrained ' if cfg.pretrained else ''}{cfg.model} at {cfg.image_size or 'native'} px"
        f", client lr {cfg.lr:g}"
    )  # fmt: skip
    own = [r for r in rows if str(r[0]).endswith(OWN)]
    lines = [
        f"**{NAMES.get(cfg.dataset, cfg.dataset)}{model}, {cfg.clients} clients, Dirichlet beta = {cfg.beta:g}, "
        f"{cfg.rounds} rounds** (finished seeds per method in column 2)",
        "",
        markdown_table(cols, [r for r in rows if not str(r[0]).endswith(OWN)]),
        "",
    ]
    if own:  # personalised methods: each client's own model on its own shares, not the global model
        lines += [
            "Personalised methods, scored on the clients' own models (local BatchNorm; personal head) over "
            "their own shares of the splits: not comparable with the global-model rows above",
            "",
            markdown_table(cols, [[str(r[0])[: -len(OWN)], *r[1:]] for r in own]),
            "",
        ]
    methods = summary["methods"]
    if "fedld" in methods:
        ps = methods["fedld"]["per_seed"]
        ratios = ", ".join(f"{p['update_ratio_median']:.2f}" for p in ps)
        cosines = ", ".join(f"{p['update_cosine_median']:.2f}" for p in ps)
        lines.append(f"- FedLD: median update ratio per seed {ratios}; median cosine {cosines}")
    if "fedavg-slr" in methods:
        lrs = ", ".join(f"{p['server_lr']:.3f}" for p in methods["fedavg-slr"]["per_seed"])
        lines.append(f"- FedAvg (server lr) used server lr {lrs} (seed order)")
    costs = round_costs(run, cfg.rounds) if cfg.model != "cnn" else None
    if costs:
        lines.append(costs)
    cells = sum(len(m["seeds"]) for m in methods.values())
    return folder.name.rsplit("_beta", 1)[0], "\n".join(lines).rstrip() + "\n", cells, cfg.beta, summary


CORE = ("fedavg", "fedavg-unweighted", "fedld", "fedavg-slr", "fedld-pg", "fedld-margin")


@dataclass(frozen=True)
class Regime:
    """One side of the regime comparison: the run folders ``<group>_beta<b>`` and the grid they should hold
    (every beta of :data:`BETAS` x every method of :data:`CORE` x ``seeds``)."""

    group: str
    short: str  # column prefix
    name: str
    seeds: tuple[int, ...]


#: RetinaMNIST: the CNN sweep's core (sweep.sh: 5 seeds) and the pretrained-backbone grid (regime_sweep.sh)
REGIMES = (
    Regime("regime_retinamnist_lite0_64", "Lite0", "pretrained EfficientNet-Lite0, 64 px", (0, 1, 2)),
    Regime("retinamnist", "CNN", "CNN from scratch, 28 px", (0, 1, 2, 3, 4)),
)
BETAS = (100.0, 1.0, 0.5)


def _pm(stat: dict | None, digits: int = 3) -> str:
    from robustlab.report import mean_pm

    return "—" if not stat else mean_pm(stat.get("mean"), stat.get("std"), stat.get("n"), digits)


def grid_cells(regime: Regime, summaries: dict[str, dict[float, dict]]) -> dict[tuple[float, str], list[int]]:
    """(beta, method) -> the grid's seeds with a finished cell."""
    return {
        (beta, method): sorted(
            set(summaries.get(regime.group, {}).get(beta, {}).get("methods", {}).get(method, {}).get("seeds", []))
            & set(regime.seeds)
        )
        for beta in BETAS
        for method in CORE
    }  # fmt: skip


def regime_block(summaries: dict[str, dict[float, dict]]) -> str | None:
    """RetinaMNIST, the pretrained-backbone grid beside the CNN sweep's core: per beta and core method,
    finished seeds of the grid's, val-chosen and final test accuracy (mean ± std over seeds), FedLD's update
    ratio and cosine against FedAvg on the same deltas; a (beta, method) without a finished cell is a row
    that says "missing". Under the table, per beta and regime, FedLD minus FedAvg and minus FedAvg with
    FedLD's server step, paired by seed. ``None`` before the grid has a cell."""
    from robustlab.fedld.experiment import LABELS

    if not summaries.get(REGIMES[0].group):
        return None
    lines = []
    regimes = []
    for reg in REGIMES:
        cells = grid_cells(reg, summaries)
        have, total = sum(map(len, cells.values())), len(cells) * len(reg.seeds)
        rounds = {s["config"]["rounds"] for s in summaries.get(reg.group, {}).values()}
        where = f"`results/fedld/{reg.group}_beta*/cells/`"
        if have:
            regimes.append((reg, cells, "/".join(map(str, sorted(rounds)))))
            lines.append(
                f"- {reg.name}, {'/'.join(map(str, sorted(rounds)))} rounds ({reg.short} columns): **{have} of "
                f"{total} cells** of its grid are committed ({len(BETAS)} β × {len(CORE)} methods × seeds "
                f"{reg.seeds[0]}–{reg.seeds[-1]}; {where})"
            )
        else:
            lines.append(
                f"- {reg.name}: **0 of {total} cells** committed (no {where}), so no {reg.short} columns; "
                f"its {NAMES.get(reg.group, reg.group)} tables in this file are marked as not backed by "
                "committed cells"
            )
    cols = ["β", "method"]
    for reg, _, _ in regimes:
        cols += [
            f"{reg.short} {c}"
            for c in ("seeds", "test acc (val-chosen)", "final test acc", "update ratio / cosine")
        ]
    rows = []
    for beta in BETAS:
        for method in CORE:
            row: list = [f"{beta:g}", LABELS.get(method, method)]
            for reg, cells, _ in regimes:
                seeds = cells[(beta, method)]
                if not seeds:
                    row += [f"missing (0 of {len(reg.seeds)})", "—", "—", "—"]
                    continue
                m = summaries[reg.group][beta]["methods"][method]
                if set(m["seeds"]) != set(seeds):  # seeds outside the grid's (a pilot): not this table's
                    raise SystemExit(
                        f"{reg.group} beta {beta:g} {method}: seeds {m['seeds']} not in {reg.seeds}"
                    )
                diag = (
                    f"{_pm(m['update_ratio_median'], 2)} / {_pm(m['update_cosine_median'], 2)}"
                    if m["update_ratio_median"].get("mean") is not None
                    else ""
                )
                row += [
                    f"{len(seeds)} of {len(reg.seeds)} ({','.join(map(str, seeds))})",
                    _pm(m["best"]["accuracy"]),
                    _pm(m["final"]["accuracy"]),
                    diag,
                ]
            rows.append(row)
    out = ["\n".join(lines), "", markdown_table(cols, rows), ""]
    gaps = []
    for beta in BETAS:
        for reg, _, rounds in regimes:
            methods = summaries.get(reg.group, {}).get(beta, {}).get("methods", {})
            parts = []
            for other, name in (("fedavg", "FedAvg"), ("fedavg-slr", "FedAvg with FedLD's server step")):
                gap = paired_gap(methods, "fedld", other)
                if gap:
                    parts.append(f"FedLD − {name} {gap}")
            if parts:
                gaps.append(f"- β {beta:g}, {reg.name}, {rounds} rounds: " + "; ".join(parts))
    if gaps:
        out += [
            "Test accuracy differences paired by seed (mean ± std over the seeds both methods finished; "
            "val-chosen round, final round):",
            "",
            *gaps,
        ]
    return "\n".join(out).rstrip() + "\n"


def paired_gap(methods: dict, a: str, b: str) -> str | None:
    """``a`` minus ``b`` in test accuracy (val-chosen, final) over the seeds both finished, as text."""
    if a not in methods or b not in methods:
        return None
    pa = {p["seed"]: p for p in methods[a]["per_seed"]}
    pb = {p["seed"]: p for p in methods[b]["per_seed"]}
    seeds = sorted(set(pa) & set(pb))
    if not seeds:
        return None
    import statistics

    def stat(which: str) -> str:
        d = [pa[s][which]["accuracy"] - pb[s][which]["accuracy"] for s in seeds]
        sd = f" ± {statistics.stdev(d):.3f}" if len(d) > 1 else ""
        return f"{statistics.fmean(d):+.3f}{sd}"

    return f"{stat('best')} val-chosen, {stat('final')} final ({len(seeds)} seed{'s' * (len(seeds) > 1)})"


def splice(text: str, dataset: str, block: str) -> str:
    start, end = f"<!-- fedld-results:{dataset}:start -->", f"<!-- fedld-results:{dataset}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"no {start} ... {end} block found; add the two markers where the tables go")
    return pattern.sub(lambda _m: f"{start}\n\n{block}\n{end}", text)


def pilot_block(here: Path = HERE) -> str | None:
    """The regime pilot (regime_pilot_lr*/: FedAvg, validation accuracy per round at each client lr, the
    mean seconds per round) and the lr and rounds frozen from it (regime.json), or ``None`` before it ran."""
    import json
    import statistics

    curves = {}
    for folder in sorted(here.glob("regime_pilot_lr*")):
        cell = folder / "cells" / "method=fedavg__seed=100.json"
        if cell.is_file():
            hist = json.loads(cell.read_text())["history"]
            curves[folder.name[len("regime_pilot_lr") :]] = hist
    if not curves:
        return None
    lrs = sorted(curves, key=float, reverse=True)
    rounds = max(len(h) for h in curves.values())
    cols = ["round"] + [f"val acc, lr {lr}" for lr in lrs]
    rows = [
        [r] + [f"{curves[lr][r]['val']['accuracy']:.3f}" if r < len(curves[lr]) else "" for lr in lrs]
        for r in range(1, rounds)
    ]
    secs = ", ".join(
        f"lr {lr}: {statistics.mean(h['seconds'] for h in curves[lr] if h['round'] > 0):.0f} s" for lr in lrs
    )
    lines = [
        markdown_table(cols, rows),
        "",
        f"- mean wall time per round (5 clients, one CPU per run): {secs}",
    ]
    frozen = here / "regime.json"
    if frozen.is_file():
        r = json.loads(frozen.read_text())
        lines.append(f"- frozen for the grid (`regime.json`): client lr {r['lr']:g}, {r['rounds']} rounds")
    return "\n".join(lines) + "\n"


def cells_block(folders: list[Path]) -> str:
    """Which finished cells each run folder holds (method: seeds), and the total."""
    import json

    lines, total = [], 0
    for folder in folders:
        seeds: dict[str, list[int]] = {}
        for f in sorted((folder / "cells").glob("*.json")):
            cell = json.loads(f.read_text())
            seeds.setdefault(cell["method"], []).append(int(cell["seed"]))
        n = sum(len(v) for v in seeds.values())
        if not n:  # a folder whose first cell is still running
            continue
        total += n
        what = "; ".join(
            f"{m} {','.join(map(str, sorted(v)))}"
            for m, v in sorted(seeds.items(), key=lambda kv: CORE.index(kv[0]) if kv[0] in CORE else 99)
        )
        lines.append(f"- `{folder.name}` ({n}): {what}")
    return f"{total} finished cells in {len(lines)} folders (method: seeds)\n\n" + "\n".join(lines) + "\n"


def _sec(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if x < 10 else f"{x:.1f}"


def bench_block(path: Path) -> str:
    """One round benchmark (``bench/fedld_round_<name>.json``, written by ``benchmarks/fedld_round.py``):
    median seconds per round of FedAvg and FedLD in one simulation, the ratio, and the load it ran under."""
    import json

    r = json.loads(path.read_text())
    med, ratio, load = r["median_seconds"], r["ratio_fedld_over_fedavg"], r["load_average_1min"]

    def spread(name: str) -> str:
        return ", ".join(_sec(x["seconds"], 2) for x in r["per_round"][name])

    rows = [
        [part, _sec(med["fedavg"][key]), _sec(med["fedld"][key]), f"{ratio[key]:.2f}"]
        for part, key in (
            ("whole round", "whole_round"),
            ("training phase", "train_phase"),
            ("aggregation", "aggregation"),
        )
    ]
    model = "small CNN" if r["model"] == "cnn" else (
        f"{'ImageNet-pretrained ' if r['pretrained'] else ''}{r['model']}"
    )  # fmt: skip
    wall = r["wall_seconds"]
    extra = med["fedld"]["aggregation"] - med["fedavg"]["aggregation"]
    bound = (
        f"FedLD's extra server time (aggregation + diagnostics) is {extra:.3f} s, "
        f"{100 * extra / med['fedavg']['whole_round']:.1f}% of a FedAvg round"
        if extra > 0
        else f"FedLD's server aggregation (with its diagnostics) was not slower than FedAvg's here ({extra:+.3f} s)"
    )
    env = r.get("env") or {}
    source = (
        f"`python {' '.join(env['argv'])}` → `results/fedld/bench/{path.name}` (git {str(env['git_commit'])[:7]})"
        if env.get("argv")
        else f"`results/fedld/bench/{path.name}` (written before the benchmark recorded its command and versions)"
    )
    n = r["model_parameters"]
    size = f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
    return (
        markdown_table(["median seconds per round", "FedAvg", "FedLD", "FedLD / FedAvg"], rows)
        + f"\n\n- {source}"
        + f"\n- {r['dataset']}, {model} at {r['image_size']} px ({size} parameters), "
        f"{r['clients']} clients, {r['rounds_measured_per_method']} measured rounds per method (blocks "
        f"alternating FedAvg, FedLD; rounds 0 and 1 of each block dropped), "
        f"{f'{wall:.0f} s' if wall < 120 else f'{wall / 60:.0f} min'} wall; goal whole-round ratio <= 1.10: "
        f"{'met' if r['goal_met'] else 'missed'}\n"
        f"- 1-minute load average on the {r['cpu_count']} shared cores: {load['start']:.1f} at the start, "
        f"{load['median_over_measured_rounds']:.1f} median over the measured rounds, {load['end']:.1f} at the end "
        "(other jobs; both methods ran under it, interleaved)\n"
        f"- whole rounds measured: FedAvg {spread('fedavg')} s, FedLD {spread('fedld')} s; the load moves a "
        "round by as much as FedLD adds or more, so the ratio of medians is noisy at this sample size. "
        f"Load-free bound: {bound}; the clients' training is the same work for both (the margin term is one "
        "softmax)\n"
    )


def missing_note(group: str) -> str:
    """The first line of a block whose group has no finished cell here."""
    return (
        f"{MISSING}: `results/fedld/` has no finished cell of this table (no `{group}_beta*/cells/*.json`): "
        "the numbers below were built from cells that are not in the repository, so they can be neither "
        f"rebuilt nor checked from it. `results/fedld/sweep.sh {group} DATA_DIR` regenerates the cells."
    )


def mark_missing(text: str, group: str) -> str:
    """Put :func:`missing_note` first in ``group``'s block (replacing an older note), or :data:`NONE_YET`
    in an empty block."""
    start, end = f"<!-- fedld-results:{group}:start -->", f"<!-- fedld-results:{group}:end -->"
    head, _, rest = text.partition(start)
    if not rest or rest.lstrip().startswith(NONE_YET):
        return text
    body, _, tail = rest.partition(end)
    if not body.strip():  # an empty block: nothing has run yet
        return f"{head}{start}\n\n{NONE_YET}\n\n{end}{tail}"
    body = body.lstrip()
    if body.startswith(MISSING):
        body = body.partition("\n")[2].lstrip("\n")
    return f"{head}{start}\n\n{missing_note(group)}\n\n{body}{end}{tail}"


def build_blocks(here: Path = HERE, echo=print) -> dict[str, list[str]]:
    """Every generated block (group -> parts) from the run folders, pilot and benchmarks under ``here``."""
    folders = sorted(
        (f for f in here.iterdir() if (f / "config.yaml").is_file() and "_beta" in f.name),
        key=lambda f: (f.name.rsplit("_beta", 1)[0], -float(f.name.rsplit("_beta", 1)[1])),
    )
    blocks: dict[str, list[str]] = {}
    summaries: dict[str, dict[float, dict]] = {}
    for folder in folders:
        dataset, block, cells, beta, summary = folder_block(folder)
        echo(f"{folder.name}: {cells} finished cells")
        if cells:
            blocks.setdefault(dataset, []).append(block)
            summaries.setdefault(dataset, {})[beta] = summary
    pilot = pilot_block(here)
    if pilot is not None:
        blocks["regime-pilot"] = [pilot]
    blocks["committed-cells"] = [cells_block(folders)]
    regimes = regime_block(summaries)
    if regimes is not None:
        blocks["regime-vs-cnn"] = [regimes]
    for path in sorted((here / "bench").glob("fedld_round_*.json")):
        blocks[f"round-benchmark-{path.stem.removeprefix('fedld_round_')}"] = [bench_block(path)]
    return blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figure", action="append", default=[], help="DATASET:BETA whose accuracy plot to copy")
    ap.add_argument("--results", type=Path, default=HERE, help="the folder to read (default: this one)")
    ap.add_argument("--print", action="store_true", help="print the blocks instead of writing the docs")
    args = ap.parse_args()
    blocks = build_blocks(args.results.resolve())
    if args.print:
        for group, parts in blocks.items():
            print(f"\n<!-- fedld-results:{group} -->\n\n" + "\n".join(parts))
        return
    for path in TARGETS:
        text = path.read_text(encoding="utf-8")
        for group, parts in blocks.items():
            text = splice(text, group, "\n".join(parts))
        for group in re.findall(r"<!-- fedld-results:(.+?):start -->", text):
            if group not in blocks:
                text = mark_missing(text, group)
        path.write_text(text, encoding="utf-8")
    for spec in args.figure:
        dataset, beta = spec.split(":")
        folder = args.results / f"{dataset}_beta{beta}"
        write_outputs(*load(folder))
        shutil.copyfile(folder / "accuracy.png", ROOT / "docs" / f"fedld_accuracy_{dataset}.png")


if __name__ == "__main__":
    main()
