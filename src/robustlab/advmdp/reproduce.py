"""Registered reproduction experiment for advmdp (``robustlab reproduce --only advmdp``).

quick (<= 2 minutes on 2 cores): the small instance (H=3, n=6, A=3, d=4), stochastic losses,
K in {300, 1000, 3000}, 3 seeds, Alg 1 / Alg 2 / Luo et al. / full-info / uniform, plus a small-K
simulator-vs-oracle check.

full (the issue's sweep): the standard instance (H=5, n=20, A=5, d=8, instance seed 0), stochastic and
switching losses, K in {1e3, 3e3, 1e4, 3e4, 1e5}, 10 seeds, exact-oracle mode, Alg 1 / Alg 2 / Luo et al. /
full-info, with the constants frozen from the pilot instance (seed 1); the combination lock; the
simulator-vs-oracle check. Every part is a resumable run folder under ``out``.
"""

from __future__ import annotations

import os
from pathlib import Path

from robustlab.advmdp.experiment import RegretConfig, format_table, run_regret, table_rows
from robustlab.console import Stages
from robustlab.report import Section

FULL_K = [1000, 3000, 10000, 30000, 100000]
LOCK_K = [1000, 3000, 10000, 30000]


def simulator_check(out: Path, instance: str, K: int, seeds: int, algorithms: list[str], seed: int) -> dict:
    """Same algorithms, same seeds, oracle mode vs simulator mode at small K."""
    res = {}
    for mode in ("oracle", "simulator"):
        cfg = RegretConfig(
            instance=instance,
            losses="stochastic",
            algorithms=algorithms,
            K=[K],
            seeds=seeds,
            seed=seed,
            mode=mode,
        )
        res[mode] = run_regret(cfg, out / f"sim-check-{mode}", echo=lambda _m: None)
    rows, agree = [], {}
    for a in algorithms:
        o, s = res["oracle"]["algorithms"][a], res["simulator"]["algorithms"][a]
        lo, hi = s["regret_ci95"][0]
        olo, ohi = o["regret_ci95"][0]
        ok = lo <= o["regret_mean"][0] <= hi or olo <= s["regret_mean"][0] <= ohi
        agree[a] = bool(ok)
        rows.append(
            [
                a,
                round(o["regret_mean"][0], 2),
                f"[{olo:.2f}, {ohi:.2f}]",
                round(s["regret_mean"][0], 2),
                f"[{lo:.2f}, {hi:.2f}]",
                int(s["simulator_calls_mean"][0]),
                ok,
            ]
        )
    return {"rows": rows, "agree": agree}


def _slopes(summary: dict) -> str:
    return ", ".join(f"{a} {s['slope']:.2f}" for a, s in summary["algorithms"].items())


def reproduce(scale: str, out: Path, seed: int) -> Section:
    parts = (2 if scale == "full" else 1) + 1 + (scale == "full")  # regret per loss sequence, lock, check
    with Stages("advmdp", parts, unit="parts") as progress:
        return _reproduce(scale, Path(out), seed, progress)


def _reproduce(scale: str, out: Path, seed: int, progress: Stages) -> Section:
    workers = max(1, min(2, os.cpu_count() or 1))
    full = scale == "full"
    section = Section(
        "advmdp",
        "Refined regret for adversarial linear MDPs (Dai, Luo, Wei, Zimmert, ICML 2023)",
        settings={
            "scale": scale,
            "instance": "standard H=5 n=20 A=5 d=8 (seed 0)" if full else "small H=3 n=6 A=3 d=4 (seed 0)",
            "K": FULL_K if full else [300, 1000, 3000],
            "seeds": 10 if full else 3,
            "mode": "exact oracle (simulator mode only in the agreement check)",
            "data used": "synthetic linear MDPs (exact; no external data)",
            "learner seeds": f"{seed}..",
        },
    )
    loss_names = ["stochastic", "switching"] if full else ["stochastic"]
    algos = (
        ["alg1", "alg2", "luo21", "fullinfo"] if full else ["alg1", "alg2", "luo21", "fullinfo", "uniform"]
    )
    for ln in loss_names:
        cfg = RegretConfig(
            instance="standard" if full else "small",
            losses=ln,
            algorithms=algos,
            K=FULL_K if full else [300, 1000, 3000],
            seeds=10 if full else 3,
            seed=seed,
            workers=workers,
        )
        folder = out / f"regret-{cfg.instance}-{ln}"
        summary = run_regret(cfg, folder, echo=lambda _m: None)
        progress.stage(f"regret, {ln} losses: slopes " + _slopes(summary))
        cols, rows = table_rows(summary)
        section.table(f"Regret and log-log slope, {ln} losses", cols, rows, note=summary["slope_fit"])
        section.figure(f"Regret vs K, {ln} losses", folder / "regret.png")
        section.results[f"slopes_{ln}"] = {
            a: [s["slope"], s["slope_ci95"]] for a, s in summary["algorithms"].items()
        }
        section.results[f"table_{ln}"] = format_table(summary)

    if full:
        lock_cfg = RegretConfig(
            instance="lock",
            losses="stochastic",
            algorithms=["alg1", "alg2", "luo21", "expweights", "lbnobonus"],
            K=LOCK_K,
            seeds=3,
            seed=seed,
            workers=workers,
        )
        lock = run_regret(lock_cfg, out / "regret-lock", echo=lambda _m: None)
        progress.stage("combination lock: slopes " + _slopes(lock))
        cols, rows = table_rows(lock)
        per_ep = {a: s["regret_per_episode"] for a, s in lock["algorithms"].items()}
        section.table("Combination lock (H=6, A=4): regret and slope", cols, rows)
        section.table(
            "Combination lock: regret per episode",
            ["algorithm", *[f"K={k}" for k in LOCK_K]],
            [[a, *[round(v, 4) for v in vals]] for a, vals in per_ep.items()],
        )
        section.figure("Combination lock regret", out / "regret-lock" / "regret.png")
        section.results["lock_slopes"] = {a: s["slope"] for a, s in lock["algorithms"].items()}

    chk = simulator_check(
        out, "small", 200 if not full else 300, 4 if not full else 6, ["alg2", "luo21"], seed
    )
    progress.stage("simulator vs oracle check: " + ("agree" if all(chk["agree"].values()) else "DISAGREE"))
    section.table(
        "Simulator mode vs exact-oracle mode (small instance)",
        [
            "algorithm",
            "oracle regret",
            "oracle 95% CI",
            "simulator regret",
            "simulator 95% CI",
            "simulator calls / seed",
            "agree",
        ],
        chk["rows"],
    )
    section.results["simulator_agreement"] = chk["agree"]
    section.text(
        "Constants (c_eta, c_beta) come from `robustlab advmdp tune` on the pilot instance (seed 1) and are "
        "frozen in robustlab.advmdp.algorithms.specs.FROZEN_CONSTANTS. Slopes are least-squares fits of log mean "
        "regret on log K; intervals are bootstrap over seeds."
    )
    return section


# --------------------------------------------------------------------------- claims at a glance

SQRT_K_TARGET = 0.6  # a fitted slope at most this is read as √K (½), clearly below Luo et al.'s ⅔


CLAIM_ALGORITHMS = ("alg1", "alg2", "luo21")


def _slopes_from_cells(folder: Path, reps: int = 2000) -> dict[str, dict]:
    """Per algorithm of :data:`CLAIM_ALGORITHMS`: the K values all of them finished, the log-log slope of
    mean regret over them and over the last decade (K ≥ K_max/10; the last interval when the grid spans
    less), each with a 95% bootstrap interval over seeds (resampled within each K)."""
    import json

    import numpy as np

    cells: dict[str, dict[int, list[float]]] = {}
    for f in sorted((folder / "cells").glob("*.json")):
        c = json.loads(f.read_text(encoding="utf-8"))
        if c.get("algorithm") in CLAIM_ALGORITHMS:
            cells.setdefault(c["algorithm"], {})[int(c["K"])] = c["regret"]
    if set(cells) != set(CLAIM_ALGORITHMS):
        return {}
    common = sorted(set.intersection(*(set(v) for v in cells.values())))
    last = [i for i, k in enumerate(common) if k >= common[-1] / 10 * 0.999] if common else []
    tail = (
        slice(last[0], None) if len(last) >= 2 and common[-1] >= 9.99 * common[last[0]] else slice(-2, None)
    )
    rng = np.random.default_rng(0)
    out = {}
    for alg, by_k in cells.items():
        logk = np.log(np.array(common, dtype=float))
        samples = [np.asarray(by_k[k], dtype=float) for k in common]
        logm = np.log([r.mean() for r in samples])
        logb = np.log(
            np.clip(
                [[r[rng.integers(0, len(r), len(r))].mean() for _ in range(reps)] for r in samples],
                1e-12,
                None,
            )
        )

        def fit(idx: slice, logm=logm, logb=logb, logk=logk) -> tuple[float, float, float]:
            x = logk[idx]
            b = np.polyfit(x, logb[idx], 1)[0]
            return (
                float(np.polyfit(x, logm[idx], 1)[0]),
                float(np.percentile(b, 2.5)),
                float(np.percentile(b, 97.5)),
            )

        out[alg] = {
            # a power law only describes regret that grows with K; under switching losses a tuned learner
            # can track the switches and its regret against the best fixed policy falls at large K
            "grows": bool(np.all(np.diff(logm) > 0)),
            "K": common,
            "tail_K": common[tail],
            "seeds": (min(len(r) for r in samples), max(len(r) for r in samples)),
            "global": fit(slice(None)),
            "last": fit(tail),
        }
    return out


def _committed_grids() -> dict[str, tuple[str, dict]]:
    """Per loss sequence on the standard instance: (folder, slopes), from the evidence sweep
    (``results/advmdp/sweep/*``) when it has the three algorithms at three or more K, else from a
    ``robustlab advmdp regret`` grid (``results/advmdp/regret-standard-*``)."""
    import yaml

    from robustlab.claims import results_dir

    root = results_dir("advmdp")
    found: dict[str, tuple[str, dict]] = {}
    for pattern in ("sweep/*/config.yaml", "regret-*/config.yaml"):
        for cfg_file in sorted(root.glob(pattern)):
            cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
            ln = cfg.get("losses")
            if cfg.get("instance") != "standard" or ln not in ("stochastic", "switching") or ln in found:
                continue
            slopes = _slopes_from_cells(cfg_file.parent)
            if slopes and len(slopes["alg2"]["K"]) >= 3:
                found[ln] = (f"results/advmdp/{cfg_file.parent.relative_to(root).as_posix()}", slopes)
    return dict(sorted(found.items()))


def claims(run: dict | None = None) -> list:
    """The paper's rates against the committed regret grid (``results/advmdp/regret-standard-<losses>``,
    standard instance H=5 n=20 A=5 d=8, exact-oracle mode, constants frozen from the pilot instance)."""
    from robustlab.claims import NOT_REPRODUCED, NOT_TESTABLE, REPRODUCED, Claim, fmt_ci
    from robustlab.report import short_number

    del run  # the quick run's K ≤ 3000 is burn-in for every bandit learner
    committed = _committed_grids()
    grids = {ln: g for ln, (_, g) in committed.items()}
    source = ", ".join(f"{folder}/cells" for folder, _ in committed.values()) or "results/advmdp"
    if grids:
        first = next(iter(next(iter(grids.values())).values()))
        k = [short_number(v) for v in first["K"]]
        lo, hi = first["seeds"]
        seeds = f"{lo} seeds" if lo == hi else f"{lo}–{hi} seeds"
        scale = f"standard linear MDP H=5 n=20 A=5 d=8, K {k[0]}–{k[-1]}, {seeds}, exact oracle"
        t = [short_number(v) for v in first["tail_K"]]
        last = f"K {t[0]}–{t[-1]}"
    else:
        scale, last = "no committed regret grid", ""

    def falls(ln: str, alg: str) -> str:
        return f"{ln}: {alg}'s regret does not grow with K (no rate to fit)"

    def rate(alg: str) -> tuple[str, str]:
        if not grids or any(alg not in g for g in grids.values()):
            return "no committed run", NOT_TESTABLE
        fitted = {ln: g for ln, g in grids.items() if g[alg]["grows"]}
        text = "; ".join(
            f"{ln}: slope {fmt_ci(*g[alg]['global'])}, over {last} {fmt_ci(*g[alg]['last'])}"
            if ln in fitted
            else falls(ln, alg)
            for ln, g in grids.items()
        )
        if not fitted:
            return text, NOT_TESTABLE
        if all(g[alg]["global"][2] <= SQRT_K_TARGET for g in fitted.values()):
            return text, REPRODUCED
        if all(g[alg]["last"][2] <= SQRT_K_TARGET for g in fitted.values()):
            return text, NOT_TESTABLE
        return text, NOT_REPRODUCED

    def faster_than_luo21() -> tuple[str, str]:
        if not grids or any({"alg2", "luo21"} - set(g) for g in grids.values()):
            return "no committed run", NOT_TESTABLE
        fitted = {ln: g for ln, g in grids.items() if g["alg2"]["grows"] and g["luo21"]["grows"]}
        text = "; ".join(
            f"{ln}: Alg 2 {fmt_ci(*g['alg2']['global'])} vs Luo et al. {fmt_ci(*g['luo21']['global'])}"
            if ln in fitted
            else falls(ln, "alg2" if not g["alg2"]["grows"] else "luo21")
            for ln, g in grids.items()
        )
        if not fitted:
            return text, NOT_TESTABLE
        below = all(g["alg2"]["global"][2] < g["luo21"]["global"][1] for g in fitted.values())
        return text, REPRODUCED if below else NOT_REPRODUCED

    rate_rule = (
        f"on every loss sequence where the algorithm's mean regret grows with K (a falling regret has no rate): "
        f"reproduced iff the slope's 95% interval is ≤ {SQRT_K_TARGET}; not testable at this scale iff not, but "
        f"the slope over the grid's last decade is (regret bends towards √K only at the end of the grid); not "
        f"reproduced otherwise; not testable if regret grows on no loss sequence."
    )
    rows = []
    for alg, claim, paper in (
        (
            "alg2",
            "Alg 2 (Hedge, magnitude-reduced estimator, dilated bonus) has √K regret",
            "Õ(√K): slope ½, log A",
        ),
        ("alg1", "Alg 1 (log-barrier FTRL, dilated bonus) has √K regret", "Õ(√K): slope ½, poly(A)"),
    ):
        ours, verdict = rate(alg)
        rows.append(Claim("advmdp", claim, paper, ours, scale, verdict, rate_rule, source))
    ours, verdict = faster_than_luo21()
    rows.append(
        Claim(
            "advmdp",
            "Regret grows more slowly than Luo et al. 2021's",
            "√K against K^⅔ (slope ½ vs ⅔)",
            ours,
            scale,
            verdict,
            "reproduced iff Alg 2's slope interval lies below Luo et al.'s on every loss sequence where both "
            "regrets grow with K.",
            source,
        )
    )
    rows.append(
        Claim(
            "advmdp",
            "Without a simulator (linear MDP), Alg 3 improves K^(14/15) to K^(8/9)",
            "Õ(K^(8/9)) vs Õ(K^(14/15)): slopes 0.889 vs 0.933",
            "not measured: no committed alg3 grid",
            "slopes 0.044 apart need a grid far past K = 1e5",
            NOT_TESTABLE,
            "not testable at this scale while no alg3 grid is committed.",
            source,
        )
    )
    return rows
