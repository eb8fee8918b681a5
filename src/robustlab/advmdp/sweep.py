"""The evidence sweep (issue 17): regret against K to 1e6, both instances, both loss sequences, every
bandit algorithm with its eta-matched full-information control; local slopes per half-decade.

``run_sweep`` runs (or resumes) every (instance, losses) grid as a regret run folder under ``out`` (cells
are the same resumable files as ``robustlab advmdp regret``), one process pool over all of them, cheapest
cells first. ``build_report`` reads whatever cells are finished (also while the sweep runs) and writes
``summary.json``, ``tables.md`` and the R/sqrt(K) plot; the docs quote those files.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from robustlab.advmdp.algorithms.specs import CONTROL_SUFFIX
from robustlab.advmdp.experiment import LOCAL_KEYS, RegretConfig, bootstrap_mean_ci, run_cell, validate
from robustlab.advmdp.pool import cell_pool

SWEEP_K = [10_000, 30_000, 100_000, 300_000, 1_000_000]
SWEEP_ALGORITHMS = ["alg1", "alg2", "luo21", "fullinfo", "alg1_control", "alg2_control", "luo21_control"]
# cells run in order of their size (K x seeds, the small instance ~10x cheaper, the deterministic
# full-information runs ~10x cheaper), and at equal size in this order: Alg 2 and Luo et al. first
_PRIORITY = ["alg2", "luo21", "alg1"]


@dataclass
class SweepConfig:
    instances: list[str] = field(default_factory=lambda: ["standard", "small"])
    losses: list[str] = field(default_factory=lambda: ["stochastic", "switching"])
    algorithms: list[str] = field(default_factory=lambda: list(SWEEP_ALGORITHMS))
    K: list[int] = field(default_factory=lambda: list(SWEEP_K))
    seeds: int = 10
    seeds_at: list[list[int]] = field(default_factory=list)  # [[K, seeds], ...]: fewer seeds at large K
    max_K: list[list] = field(default_factory=list)  # [[instance, K], ...]: a smaller grid for an instance
    workers: int = 1
    backend: str | None = None
    ray_address: str | None = None
    tag: str = ""  # folder suffix: a run that extends a grid (more K, fewer seeds) sits beside it

    def regret_config(self, instance: str, losses: str) -> RegretConfig:
        return RegretConfig(
            instance=instance,
            losses=losses,
            algorithms=list(self.algorithms),
            K=[k for k in self.K if k <= dict((i, int(m)) for i, m in self.max_K).get(instance, k)],
            seeds=self.seeds,
            seeds_at=[list(x) for x in self.seeds_at],
            workers=self.workers,
            backend=self.backend,
            ray_address=self.ray_address,
        )


def _folder(out: Path, instance: str, losses: str, tag: str = "") -> Path:
    return Path(out) / f"{instance}-{losses}{tag}"


def run_sweep(cfg: SweepConfig, out: str | Path, echo: Callable[[str], None] = print) -> None:
    from robustlab.runs import RunDir, cell_key

    out = Path(out)
    runs, jobs = {}, []
    for inst in cfg.instances:
        for ln in cfg.losses:
            rc = cfg.regret_config(inst, ln)
            validate(rc)
            conf = asdict(rc)
            run = RunDir.open(
                _folder(out, inst, ln, cfg.tag), conf, resume_keys=[k for k in conf if k not in LOCAL_KEYS]
            )
            runs[inst, ln] = (run, conf)
            for a in cfg.algorithms:
                for K in rc.K:
                    if not run.is_done(cell_key(algorithm=a, K=K)):
                        size = K * rc.seeds_for(K) * (1.0 if inst == "standard" else 0.1)
                        size *= 1.0 if a in _PRIORITY else 0.1
                        prio = _PRIORITY.index(a) if a in _PRIORITY else -1
                        jobs.append((size, prio, inst, ln, a, K))
    jobs.sort()
    echo(f"sweep: {len(jobs)} cells to run on {cfg.workers} worker(s)")

    def finish(inst, ln, a, K, res):
        run, _ = runs[inst, ln]
        run.save(cell_key(algorithm=a, K=K), res)
        run.log(algorithm=a, K=K, regret_mean=float(np.mean(res["regret"])), seconds=res["seconds"])
        echo(f"done {inst}-{ln} {a} K={K}: {res['seconds']:.0f} s")

    if cfg.workers == 1 and not cfg.ray_address:
        for _, _, inst, ln, a, K in jobs:
            finish(inst, ln, a, K, run_cell(runs[inst, ln][1], a, K))
        return
    with cell_pool(cfg.workers, cfg.ray_address) as pool:
        futs = {pool.submit(run_cell, runs[i, ln][1], a, K): (i, ln, a, K) for _, _, i, ln, a, K in jobs}
        for f in as_completed(futs):
            finish(*futs[f], f.result())


# ----------------------------------------------------------------------------- statistics


def _slope(K, R) -> float:
    K, R = np.asarray(K, dtype=float), np.asarray(R, dtype=float)
    if len(K) < 2 or np.any(R <= 0):
        return float("nan")
    return float(np.polyfit(np.log(K), np.log(R), 1)[0])


def _boot_slope(regs: list[np.ndarray], Ks: list[int], rng, reps: int) -> tuple[float, list[float]]:
    """OLS slope of log mean regret on log K and its bootstrap 95% interval (seeds resampled within K)."""
    point = _slope(Ks, [r.mean() for r in regs])
    boots = np.array(
        [_slope(Ks, [r[rng.integers(0, len(r), len(r))].mean() for r in regs]) for _ in range(reps)]
    )
    boots = boots[np.isfinite(boots)]
    if len(boots) < reps // 2:
        return point, [float("nan"), float("nan")]
    return point, [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]


def summarise_cells(cells: dict[int, dict], control: dict[int, dict] | None, rng, reps: int = 2000) -> dict:
    """Per algorithm: regret mean and CI per K, R/sqrt(K), R - R_control, local slopes between consecutive
    K (half-decades) and the slope over the last decade (OLS on the K in [K_max/10, K_max]), each with a
    bootstrap interval over seeds."""
    Ks = sorted(cells)
    regs = [np.asarray(cells[k]["regret"], dtype=float) for k in Ks]
    out = {
        "K": Ks,
        "seeds": [len(r) for r in regs],
        "regret_mean": [float(r.mean()) for r in regs],
        "regret_ci95": [bootstrap_mean_ci(r, rng, reps) for r in regs],
        "regret_over_sqrtK": [float(r.mean() / math.sqrt(k)) for r, k in zip(regs, Ks, strict=True)],
        "params": {str(k): cells[k]["params"][0] for k in Ks},
        "c_eta": cells[Ks[0]].get("c_eta"),
        "c_beta": cells[Ks[0]].get("c_beta"),
        "seconds": [cells[k]["seconds"] for k in Ks],
    }
    out["local_slopes"] = [
        {
            "K": [Ks[i], Ks[i + 1]],
            **dict(
                zip(("slope", "ci95"), _boot_slope(regs[i : i + 2], Ks[i : i + 2], rng, reps), strict=True)
            ),
        }
        for i in range(len(Ks) - 1)
    ]
    last = [i for i, k in enumerate(Ks) if k >= Ks[-1] / 10 * 0.999]
    if len(last) >= 2 and Ks[-1] >= 10 * Ks[last[0]] * 0.999:
        s, ci = _boot_slope([regs[i] for i in last], [Ks[i] for i in last], rng, reps)
        out["last_decade"] = {"K": [Ks[last[0]], Ks[-1]], "slope": s, "ci95": ci}
    if control:
        diffs, dK, dregs = [], [], []
        for k, r in zip(Ks, regs, strict=True):
            if k in control:
                c = float(np.mean(control[k]["regret"]))  # the control is deterministic (no learner noise)
                lo, hi = bootstrap_mean_ci(r - c, rng, reps)
                diffs.append({"K": k, "control": c, "diff": float(r.mean() - c), "diff_ci95": [lo, hi]})
                dK.append(k)
                dregs.append(r - c)
        out["minus_control"] = diffs
        last = [i for i, k in enumerate(dK) if k >= dK[-1] / 10 * 0.999] if dK else []
        if len(last) >= 2 and dK[-1] >= 10 * dK[last[0]] * 0.999 and all(dregs[i].mean() > 0 for i in last):
            s, ci = _boot_slope([dregs[i] for i in last], [dK[i] for i in last], rng, reps)
            out["minus_control_last_decade"] = {"K": [dK[last[0]], dK[-1]], "slope": s, "ci95": ci}
    return out


def build_report(
    results: str | Path, plot: str | Path | None = None, echo: Callable[[str], None] = print
) -> dict:
    """Summaries, tables and the R/sqrt(K) plot from the finished cells under ``results``."""
    import yaml

    from robustlab.runs import RunDir, atomic_write_json, atomic_write_text, cell_key

    results = Path(results)
    folders = sorted(p.parent for p in results.glob("*/config.yaml"))
    rng = np.random.default_rng(99)
    # one grid per (instance, losses); a second folder of the same pair (e.g. an extension to larger K
    # with fewer seeds) adds its cells, and its folder name is listed under "folders"
    grids: dict[str, dict] = {}
    for folder in folders:
        rc = RegretConfig(**yaml.safe_load((folder / "config.yaml").read_text()))
        run = RunDir(folder)
        g = grids.setdefault(
            f"{rc.instance}-{rc.losses}",
            {
                "instance": rc.instance,
                "losses": rc.losses,
                "K_planned": [],
                "seeds": rc.seeds,
                "seeds_at": [],
                "folders": [],
                "cells": {},
            },
        )
        g["folders"].append(folder.name)
        g["K_planned"] = sorted(set(g["K_planned"]) | set(rc.K))
        g["seeds_at"] += [[k, rc.seeds_for(k)] for k in rc.K if rc.seeds_for(k) != g["seeds"]]
        for a in rc.algorithms:
            for K in rc.K:
                if run.is_done(cell_key(algorithm=a, K=K)):
                    g["cells"].setdefault(a, {})[K] = run.load(cell_key(algorithm=a, K=K))
    summary: dict = {"grids": {}}
    for name, g in grids.items():
        cells = g.pop("cells")
        algs = {}
        for a, c in cells.items():
            ctl = cells.get(a + CONTROL_SUFFIX) if not a.endswith(CONTROL_SUFFIX) else None
            algs[a] = summarise_cells(c, ctl or None, rng)
        summary["grids"][name] = {**g, "algorithms": algs}
    atomic_write_json(results / "summary.json", summary)
    text = format_tables(summary)
    atomic_write_text(results / "tables.md", text)
    if plot is not None:
        plot_sqrtK(summary, Path(plot))
    echo(text)
    return summary


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if all(np.isfinite(ci)) else "—"


def format_tables(summary: dict) -> str:
    """Markdown: per grid a regret table (mean [CI], R - R_control) and a local-slope table."""
    parts = []
    for name, g in summary["grids"].items():
        algs = g["algorithms"]
        Ks = sorted({k for s in algs.values() for k in s["K"]})
        parts.append(f"### {name}\n")
        cols = ["algorithm", *[f"K={k:.0e}".replace("e+0", "e") for k in Ks]]
        rows = []
        for a, s in algs.items():
            by = dict(
                zip(s["K"], zip(s["regret_mean"], s["regret_ci95"], s["seeds"], strict=True), strict=True)
            )
            cells = []
            for k in Ks:
                if k not in by:
                    cells.append("—")
                    continue
                m, ci, n = by[k]
                cells.append(f"{m:.0f} [{ci[0]:.0f}, {ci[1]:.0f}] ({n})" if n > 1 else f"{m:.0f} (1)")
            rows.append([a, *cells])
            if "minus_control" in s:
                d = {x["K"]: x for x in s["minus_control"]}
                rows.append(
                    [
                        f"{a} − control",
                        *[
                            f"{d[k]['diff']:.0f} [{d[k]['diff_ci95'][0]:.0f}, {d[k]['diff_ci95'][1]:.0f}]"
                            if k in d
                            else "—"
                            for k in Ks
                        ],
                    ]
                )
        parts.append("Regret, mean [bootstrap 95% CI] (seeds); `− control`: R_bandit − R_control.\n")
        parts.append(_md(cols, rows))
        scols = [
            "algorithm",
            *[f"{a:.0e}→{b:.0e}".replace("e+0", "e") for a, b in itertools.pairwise(Ks)],
            "last decade",
        ]
        srows = []
        for a, s in algs.items():
            by = {tuple(x["K"]): x for x in s["local_slopes"]}
            cells = [
                f"{by[(x, y)]['slope']:.3f} {_ci(by[(x, y)]['ci95'])}" if (x, y) in by else "—"
                for x, y in itertools.pairwise(Ks)
            ]
            ld = s.get("last_decade")
            cells.append(f"{ld['slope']:.3f} {_ci(ld['ci95'])}" if ld else "—")
            srows.append([a, *cells])
        parts.append(
            "\nLocal log-log slopes per half-decade and over the last decade (OLS), bootstrap 95% CI.\n"
        )
        parts.append(_md(scols, srows))
        parts.append("")
    return "\n".join(parts)


def _md(cols, rows) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_sqrtK(summary: dict, path: Path) -> Path:
    """R/sqrt(K) against K for every grid (flat = sqrt(K); rising like K^(1/6) = K^(2/3)); full information
    is left out (its regret is in the tables) and non-positive means are not drawn."""
    from robustlab.report import pyplot, save_figure

    plt = pyplot()
    grids = summary["grids"]
    fig, axes = plt.subplots(1, max(len(grids), 1), figsize=(4.2 * max(len(grids), 1), 3.8), squeeze=False)
    for ax, (name, g) in zip(axes[0], grids.items(), strict=False):
        colors: dict[str, str] = {}
        for a, s in g["algorithms"].items():
            if a == "fullinfo":  # regret ~5, two decades below the rest: in the tables, not on this axis
                continue
            K = np.array(s["K"], dtype=float)
            y = np.array(s["regret_over_sqrtK"])
            y = np.where(y > 0, y, np.nan)  # a mean regret <= 0 (switching losses) has no log
            lo = np.array([c[0] for c in s["regret_ci95"]]) / np.sqrt(K)
            hi = np.array([c[1] for c in s["regret_ci95"]]) / np.sqrt(K)
            base = a.removesuffix(CONTROL_SUFFIX)
            style = "--" if a != base else "o-"
            (line,) = ax.plot(K, y, style, ms=3, label=a, color=colors.get(base))
            colors.setdefault(base, line.get_color())  # a control takes its algorithm's colour
            if not a.endswith(CONTROL_SUFFIX):
                ax.fill_between(K, lo, hi, alpha=0.2, color=line.get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K (episodes)")
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("regret / sqrt(K)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def alg3_exploration(
    out: str | Path,
    K: list[int],
    c_explore: list[float],
    seeds: int = 3,
    instance: str = "small",
    echo: Callable[[str], None] = print,
) -> dict:
    """Alg 3's forced-exploration schedule delta_e = c_explore K^(-1/9) against its regret: mean regret
    (bootstrap CI over seeds) per (K, c_explore) on ``instance`` with stochastic losses; writes
    ``summary.json`` and ``table.md`` under ``out`` (resumable per cell)."""
    from robustlab.advmdp.algorithms.alg3 import Alg3Config, run_alg3
    from robustlab.advmdp.experiment import make_instance, make_loss_sequence
    from robustlab.runs import RunDir, atomic_write_text, cell_key

    conf = {"K": list(K), "c_explore": list(c_explore), "seeds": seeds, "instance": instance}
    run = RunDir.open(out, conf, seed=0)
    mdp = make_instance(instance, 0)
    seq = make_loss_sequence("stochastic", mdp, max(K), 0)
    rng = np.random.default_rng(7)
    rows, summary = [], {"config": conf, "cells": []}
    for k in K:
        for c in c_explore:
            key = cell_key(K=k, c_explore=c)
            if not run.is_done(key):
                res = [run_alg3(mdp, seq, k, s, Alg3Config(c_explore=c)) for s in range(seeds)]
                run.save(
                    key,
                    {
                        "K": k,
                        "c_explore": c,
                        "regret": [float(r.regret[0]) for r in res],
                        "delta_e": res[0].extra["schedule"]["delta_e"],
                        "seconds": sum(r.seconds for r in res),
                    },
                )
            cell = run.load(key)
            r = np.asarray(cell["regret"])
            ci = bootstrap_mean_ci(r, rng)
            summary["cells"].append({**cell, "mean": float(r.mean()), "ci95": ci})
            rows.append(
                [
                    f"{k:,}",
                    f"{c:g}",
                    f"{cell['delta_e']:.3f}",
                    f"{r.mean():.0f} [{ci[0]:.0f}, {ci[1]:.0f}]",
                    f"{r.mean() / k:.3f}",
                ]
            )
    text = _md(["K", "c_explore", "δ_e", f"regret, mean [95% CI] ({seeds} seeds)", "regret / K"], rows)
    run.write_summary(summary)
    atomic_write_text(Path(out) / "table.md", text)
    echo(text)
    return summary
