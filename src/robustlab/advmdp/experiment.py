"""Regret experiments: algorithms x K grid x seeds, resumable per cell, summary with log-log slopes.

A cell is one (algorithm, K) pair; all seeds of a cell run batched in one process (the engine advances
them together). Cells are spread over worker processes. Each finished cell is saved in the run folder's
``cells/``, so rerunning the same command resumes. ``summary.json`` holds, per algorithm, ``K``,
``regret_mean``, ``regret_ci95`` (bootstrap over seeds), ``slope`` (least-squares slope of log mean regret
against log K over the whole grid) and ``slope_ci95`` (bootstrap over seeds).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from robustlab.advmdp.algorithms import ALGORITHM_NAMES, MODES, get_spec, run_algorithm, with_constants
from robustlab.advmdp.algorithms.engine import resolve_backend
from robustlab.advmdp.algorithms.specs import FROZEN_CONSTANTS, base_name
from robustlab.advmdp.losses import LOSS_SEQUENCES, LossSequence, make_losses
from robustlab.advmdp.mdp import LinearMDP
from robustlab.advmdp.pool import cell_pool
from robustlab.errors import UserError

INSTANCES = ("standard", "small", "lock")
LOCAL_KEYS = ("workers", "backend", "ray_address")  # config entries that change where cells run, not a number
STANDARD = {"horizon": 5, "n_states": 20, "n_actions": 5, "dim": 8}

# FROZEN_CONSTANTS (imported above) were chosen on the pilot instance; see algorithms/specs.py.
PILOT_INSTANCE_SEED = 1


def make_instance(name: str, seed: int = 0) -> LinearMDP:
    """``standard`` (H=5, n=20, A=5, d=8), ``small`` (H=3, n=6, A=3, d=4), ``lock`` (combination lock,
    H=6, A=4), or a path to an ``.npz`` file with arrays ``phi``, ``mu``, ``rho`` (optional ``theta_mean``)."""
    if name == "standard":
        return LinearMDP.random(**STANDARD, seed=seed)
    if name == "small":
        return LinearMDP.random(3, 6, 3, 4, seed=seed)
    if name == "lock":
        return LinearMDP.combination_lock(6, 4, seed=seed)
    path = Path(name)
    if path.suffix == ".npz":
        if not path.is_file():
            raise UserError(f"instance file {path} does not exist", "pass an existing .npz file")
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("phi", "mu", "rho") if k not in z]
            if missing:
                raise UserError(
                    f"instance file {path} lacks arrays {', '.join(missing)}", "save phi, mu, rho"
                )
            tm = z.get("theta_mean", None)
            return LinearMDP(z["phi"], z["mu"], z["rho"], tm, name=str(path))
    raise UserError(f"unknown instance {name!r}", f"choose from {', '.join(INSTANCES)} or pass a .npz file")


def make_loss_sequence(name: str, mdp: LinearMDP, K: int, seed: int = 0) -> LossSequence:
    """A named sequence (see :mod:`robustlab.advmdp.losses`) or a ``.npy`` file of theta ``(K, H, d)``."""
    path = Path(name)
    if path.suffix == ".npy":
        if not path.is_file():
            raise UserError(f"loss file {path} does not exist", "pass an existing .npy file")
        theta = np.load(path, allow_pickle=False)
        if theta.ndim != 3:
            raise UserError(f"loss file {path} must hold theta of shape (K, H, d), got {theta.shape}")
        mdp.check_theta(theta, f"losses in {path}")
        if theta.shape[0] < K:
            raise UserError(f"loss file {path} has {theta.shape[0]} episodes, fewer than K={K}", "lower --K")
        return LossSequence(str(path), theta.shape[0], theta.astype(float))
    return make_losses(name, mdp, K, seed)


@dataclass
class RegretConfig:
    instance: str = "standard"
    instance_seed: int = 0
    losses: str = "stochastic"
    loss_seed: int = 0
    algorithms: list[str] = field(default_factory=lambda: ["alg1", "alg2", "luo21", "fullinfo"])
    K: list[int] = field(default_factory=lambda: [1000, 3000, 10000, 30000, 100000])
    seeds: int = 10
    seed: int = 0  # learner seeds are seed, seed+1, ..., seed+seeds-1
    mode: str = "oracle"
    constants: dict[str, list[float]] = field(default_factory=dict)  # name -> [c_eta, c_beta]
    gamma: float | None = None  # overrides every schedule's gamma when given
    workers: int = 1
    backend: str | None = None  # numpy | numba; None: numba when installed (same numbers either way)
    seeds_at: list[list[int]] = field(default_factory=list)  # [[K, seeds], ...] overrides ``seeds`` at K
    ray_address: str | None = None  # run the cells on a Ray cluster instead of local processes

    def seeds_for(self, K: int) -> int:
        return dict((int(k), int(n)) for k, n in self.seeds_at).get(int(K), self.seeds)


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(float(x)) for x in str(text).split(",") if x.strip()]
    except ValueError as exc:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}", "e.g. 1000,3000") from exc
    if not vals:
        raise UserError(f"{what} is empty", "give at least one value")
    return vals


def validate(cfg: RegretConfig) -> tuple[LinearMDP, LossSequence]:
    """Check every input and build the instance and the loss sequence (before anything is written)."""
    for a in cfg.algorithms:
        if a not in ALGORITHM_NAMES:
            raise UserError(f"unknown algorithm {a!r}", f"choose from {', '.join(ALGORITHM_NAMES)}")
        if a == "alg3" and cfg.losses == "adaptive":
            raise UserError(
                "alg3 runs on oblivious loss sequences only", "use stochastic, switching or needle"
            )
    if not cfg.algorithms:
        raise UserError("no algorithms given", "pass --algorithms alg1,alg2,...")
    bad = [k for k in cfg.K if k <= 0]
    if bad:
        raise UserError(f"K must be positive, got {bad[0]}", "pass --K with values >= 1")
    if cfg.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {cfg.seeds}", "pass --seeds 10")
    if cfg.workers < 1:
        raise UserError(f"--workers must be >= 1, got {cfg.workers}", "pass --workers 2")
    if cfg.backend is not None:
        resolve_backend(cfg.backend)
    if cfg.mode not in MODES:
        raise UserError(f"unknown mode {cfg.mode!r}", f"choose from {', '.join(MODES)}")
    if cfg.gamma is not None and (not math.isfinite(cfg.gamma) or cfg.gamma <= 0):
        raise UserError(f"gamma must be > 0, got {cfg.gamma}", "pass a positive --gamma or leave it out")
    if not (cfg.losses in LOSS_SEQUENCES or cfg.losses.endswith(".npy")):
        raise UserError(
            f"unknown loss sequence {cfg.losses!r}", f"choose from {', '.join(LOSS_SEQUENCES)} or a .npy"
        )
    for name, c in cfg.constants.items():
        if name not in ALGORITHM_NAMES or len(c) != 2 or c[0] <= 0 or c[1] < 0:
            raise UserError(
                f"bad constants for {name!r}: {c}", "use NAME=c_eta:c_beta with c_eta > 0, c_beta >= 0"
            )
    mdp = make_instance(cfg.instance, cfg.instance_seed)
    losses = make_loss_sequence(cfg.losses, mdp, max(cfg.K), cfg.loss_seed)
    return mdp, losses


def algorithm_params(cfg: RegretConfig, name: str, K: int, mdp: LinearMDP):
    spec = get_spec(name)
    base = base_name(name)  # a control shares its bandit algorithm's constants, hence its eta
    c = cfg.constants.get(name) or cfg.constants.get(base) or FROZEN_CONSTANTS.get(base)
    if c is not None:
        spec = with_constants(spec, *c)
    params = spec.params(K, mdp.H, mdp.dim, mdp.n_actions)
    if cfg.gamma is not None:
        from dataclasses import replace

        params = replace(params, gamma=float(cfg.gamma))
    return spec, params


def run_cell(cfg_dict: dict, name: str, K: int) -> dict:
    """One (algorithm, K) cell with every seed; runs in a worker process."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = RegretConfig(**cfg_dict)
    mdp = make_instance(cfg.instance, cfg.instance_seed)
    losses = make_loss_sequence(cfg.losses, mdp, max(cfg.K), cfg.loss_seed)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds_for(K)))
    spec0 = get_spec(name) if name != "alg3" else None
    if spec0 is not None and spec0.estimator in ("exact_q", "none") and cfg.mode == "oracle":
        # full information and the uniform policy never look at the trajectory: pi_k, hence the
        # pseudo-regret, is the same for every learner seed, so one seed is the whole distribution
        seeds = seeds[:1]
    if name == "alg3":
        from robustlab.advmdp.algorithms.alg3 import Alg3Config, run_alg3

        c = cfg.constants.get("alg3") or FROZEN_CONSTANTS.get("alg3")
        a3 = Alg3Config() if c is None else Alg3Config(c_eta=c[0], c_beta=c[1])
        parts = [run_alg3(mdp, losses, K, s, a3).to_json() for s in seeds]
        out = dict(parts[0])
        for key in ("regret", "realized_regret", "simulator_calls", "rollouts", "seeds", "params"):
            out[key] = [v for p in parts for v in p[key]]
        out["regret_curve"] = [[p["regret"][0] for p in parts]]
        out["seconds"] = sum(p["seconds"] for p in parts)
        out["episodes_per_second"] = K * len(seeds) / max(out["seconds"], 1e-12)
        out["c_eta"], out["c_beta"] = a3.c_eta, a3.c_beta
        return out
    spec, params = algorithm_params(cfg, name, K, mdp)
    res = run_algorithm(mdp, losses, spec, params, K, seeds, mode=cfg.mode, backend=cfg.backend)
    out = res.to_json()
    out["c_eta"], out["c_beta"] = spec.c_eta, spec.c_beta
    return out


# ----------------------------------------------------------------------------- statistics


def bootstrap_mean_ci(x: np.ndarray, rng: np.random.Generator, reps: int = 2000) -> list[float]:
    x = np.asarray(x, dtype=float)
    if len(x) < 2:
        return [float(x.mean()), float(x.mean())]
    means = x[rng.integers(0, len(x), size=(reps, len(x)))].mean(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def loglog_slope(K: Sequence[float], mean_regret: Sequence[float]) -> float:
    """Least-squares slope of log(mean regret) on log K (nan if a mean is not positive)."""
    K, R = np.asarray(K, dtype=float), np.asarray(mean_regret, dtype=float)
    if len(K) < 2 or np.any(R <= 0):
        return float("nan")
    return float(np.polyfit(np.log(K), np.log(R), 1)[0])


def summarise(cells: dict[int, dict], rng: np.random.Generator, reps: int = 2000) -> dict:
    """Per-algorithm summary from its cells {K: cell}."""
    Ks = sorted(cells)
    regs = [np.asarray(cells[k]["regret"], dtype=float) for k in Ks]
    means = [float(r.mean()) for r in regs]
    slope = loglog_slope(Ks, means)
    boots = []
    for _ in range(reps):
        m = [r[rng.integers(0, len(r), len(r))].mean() for r in regs]
        boots.append(loglog_slope(Ks, m))
    boots = np.array(boots)
    boots = boots[np.isfinite(boots)]
    ci = (
        [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))]
        if len(boots) > reps // 2
        else [float("nan")] * 2
    )
    return {
        "K": Ks,
        "regret_mean": means,
        "regret_ci95": [bootstrap_mean_ci(r, rng, reps) for r in regs],
        "regret_per_episode": [m / k for m, k in zip(means, Ks, strict=True)],
        "slope": slope,
        "slope_ci95": ci,
        "realized_regret_mean": [float(np.mean(cells[k]["realized_regret"])) for k in Ks],
        "simulator_calls_mean": [float(np.mean(cells[k]["simulator_calls"])) for k in Ks],
        "episodes_per_second": [cells[k]["episodes_per_second"] for k in Ks],
        "params": {str(k): cells[k]["params"][0] for k in Ks},
        "c_eta": cells[Ks[0]].get("c_eta"),
        "c_beta": cells[Ks[0]].get("c_beta"),
        "seeds": len(regs[0]),
    }


# ----------------------------------------------------------------------------- plots and table


def plot_regret(summary: dict, path: Path, title: str = "") -> Path:
    from robustlab.report import label_log_axis, pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax, ax2 = axes
    allK = sorted({k for s in summary["algorithms"].values() for k in s["K"]})
    for name, s in summary["algorithms"].items():
        K = np.array(s["K"], dtype=float)
        m = np.array(s["regret_mean"])
        lo = np.array([c[0] for c in s["regret_ci95"]])
        hi = np.array([c[1] for c in s["regret_ci95"]])
        label = f"{name} (slope {s['slope']:.2f})" if np.isfinite(s["slope"]) else name
        (line,) = ax.plot(K, np.clip(m, 1e-3, None), "o-", label=label)
        ax.fill_between(
            K, np.clip(lo, 1e-3, None), np.clip(hi, 1e-3, None), alpha=0.2, color=line.get_color()
        )
        ax2.plot(K, m / K, "o-", color=line.get_color(), label=name)
    if allK:
        k0 = allK[0]
        ref = max(min(s["regret_mean"][0] for s in summary["algorithms"].values()), 1e-3)
        ks = np.array([allK[0], allK[-1]], dtype=float)
        for p, style in ((0.5, ":"), (2 / 3, "--"), (1.0, "-.")):
            ax.plot(ks, ref * (ks / k0) ** p, "k" + style, lw=0.8, alpha=0.6, label=f"K^{p:.2g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K (episodes)")
    ax.set_ylabel("expected regret (mean, 95% CI)")
    ax.legend(fontsize=7)
    ax2.set_xscale("log")
    for a in (ax, ax2):
        label_log_axis(a.xaxis, allK)
    ax2.set_xlabel("K (episodes)")
    ax2.set_ylabel("regret per episode")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def table_rows(summary: dict) -> tuple[list[str], list[list]]:
    allK = sorted({k for s in summary["algorithms"].values() for k in s["K"]})
    cols = ["algorithm", *[f"R(K={k:g})" for k in allK], "slope", "slope 95% CI"]
    rows = []
    for name, s in summary["algorithms"].items():
        by = dict(zip(s["K"], s["regret_mean"], strict=True))
        ci = s["slope_ci95"]
        rows.append(
            [
                name,
                *[round(by[k], 1) if k in by else None for k in allK],
                round(s["slope"], 3),
                f"[{ci[0]:.3f}, {ci[1]:.3f}]",
            ]
        )
    return cols, rows


def format_table(summary: dict) -> str:
    cols, rows = table_rows(summary)
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the experiment


def run_regret(cfg: RegretConfig, out: str | Path, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) the grid, write summary.json and regret.png, return the summary."""
    from robustlab.runs import RunDir, cell_key, track

    mdp, _ = validate(cfg)
    config = asdict(cfg)
    keys = [k for k in config if k not in LOCAL_KEYS]
    run = RunDir.open(out, config, seed=cfg.seed, resume_keys=keys)
    todo = [(a, k) for a in cfg.algorithms for k in cfg.K if not run.is_done(cell_key(algorithm=a, K=k))]
    # small K first: an interrupted sweep still holds every algorithm's smaller-K cells
    todo.sort(key=lambda t: t[1])
    if todo:
        echo(
            f"{len(todo)} cells to run ({len(cfg.algorithms) * len(cfg.K) - len(todo)} already done) on {cfg.workers} worker(s)"
        )
    if cfg.workers == 1 and not cfg.ray_address:
        for a, k in track(todo, "cells"):
            res = run_cell(config, a, k)
            run.save(cell_key(algorithm=a, K=k), res)
            run.log(algorithm=a, K=k, regret_mean=float(np.mean(res["regret"])), seconds=res["seconds"])
    elif todo:
        with cell_pool(cfg.workers, cfg.ray_address) as pool:
            futs = {pool.submit(run_cell, config, a, k): (a, k) for a, k in todo}
            for f in track(as_completed(futs), "cells", total=len(futs)):
                a, k = futs[f]
                res = f.result()
                run.save(cell_key(algorithm=a, K=k), res)
                run.log(algorithm=a, K=k, regret_mean=float(np.mean(res["regret"])), seconds=res["seconds"])
    rng = np.random.default_rng([cfg.seed, 99])
    summary = {
        "instance": mdp.name,
        "losses": cfg.losses,
        "mode": cfg.mode,
        "seeds": cfg.seeds,
        "slope_fit": "least squares of log mean regret on log K over every K in the grid",
        "algorithms": {
            a: summarise({k: run.load(cell_key(algorithm=a, K=k)) for k in cfg.K}, rng)
            for a in cfg.algorithms
        },
    }
    plot_regret(
        summary,
        Path(out) / "regret.png",
        f"{mdp.name}, {cfg.losses} losses, {cfg.mode} mode, {cfg.seeds} seeds",
    )
    run.write_summary(summary)
    echo(format_table(summary))
    echo(f"summary: {Path(out) / 'summary.json'}")
    return summary


# ----------------------------------------------------------------------------- constant selection

TUNE_C_ETA = (1.0, 10.0, 100.0, 1000.0)  # three decades
TUNE_C_BETA = (0.03, 0.3, 3.0, 10.0)  # brackets the theory values c_beta ~ 5 (Alg 1, MR-clip), ~ 9 (MR-unb.)


@dataclass
class TuneConfig:
    """The tuning protocol (docs/advmdp.md, "Tuning"): on the PILOT instance (standard shape, instance seed
    1; the evaluation instance is seed 0), at K episodes, ``seeds`` learner seeds (1000, 1001, ...), every
    point scored by its mean regret over the seeds and loss sequences. Coordinate search over the grids,
    screened with ``screen_seeds`` seeds: (A) every c_eta at the second-smallest c_beta, (B) every c_beta
    at the best c_eta, (A') every c_eta again at the best c_beta (gamma depends on both); (C) while the best point sits on an edge of an axis, that axis is extended by one
    decade (at most ``extend`` times per axis). (D) The ``finalists`` best screened points and the
    half-decade neighbours of the best c_eta are evaluated with all ``seeds``; (D') while the best of those
    is an end of the evaluated c_eta range, one more half-decade step (at most ``extend`` times). The best
    point evaluated with all seeds wins."""

    algorithms: list[str] = field(default_factory=lambda: ["alg1", "alg2", "luo21", "fullinfo"])
    c_eta: list[float] = field(default_factory=lambda: list(TUNE_C_ETA))
    c_beta: list[float] = field(default_factory=lambda: list(TUNE_C_BETA))
    K: int = 100_000
    seeds: int = 3
    instance_seed: int = PILOT_INSTANCE_SEED
    losses: list[str] = field(default_factory=lambda: ["stochastic"])
    extend: int = 2
    screen_seeds: int = 1
    finalists: int = 1
    workers: int = 1
    backend: str | None = None
    ray_address: str | None = None


def _tune_key(a: str, loss: str, ce: float, cb: float, seeds: int, full: int) -> str:
    from robustlab.runs import cell_key

    key = cell_key(algorithm=a, losses=loss, c_eta=f"{ce:.6g}", c_beta=f"{cb:.6g}")
    return key if seeds == full else f"{key}__seeds={seeds}"


def _tune_point(cfg_dict: dict, name: str, loss_name: str, ce: float, cb: float, n_seeds: int) -> dict:
    """One grid point: regret of every seed at K on the pilot instance."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = TuneConfig(**cfg_dict)
    mdp = make_instance("standard", cfg.instance_seed)
    losses = make_losses(loss_name, mdp, cfg.K, seed=0)
    spec = get_spec(name)
    params = spec.schedule(cfg.K, mdp.H, mdp.dim, mdp.n_actions, ce, cb)
    seeds = list(range(1000, 1000 + n_seeds))
    res = run_algorithm(mdp, losses, spec, params, cfg.K, seeds, backend=cfg.backend)
    return {
        "algorithm": name,
        "losses": loss_name,
        "c_eta": ce,
        "c_beta": cb,
        "params": params.__dict__,
        "regret": res.regret.tolist(),
        "mean_regret": float(res.regret.mean()),
        "seconds": res.seconds,
    }


def _uses_c_beta(name: str) -> bool:
    spec = get_spec(name)
    return spec.bonus or name in ("expweights", "lbnobonus")  # c_beta sets gamma there too


def tune_constants(cfg: TuneConfig, out: str | Path, echo: Callable[[str], None] = print) -> dict:
    """Choose (c_eta, c_beta) per algorithm by :class:`TuneConfig`'s protocol; resumable per grid point.
    Writes ``summary.json`` (every point's score, the choice and where it sits in the final grid) and
    ``constants.json``; freeze the result in ``algorithms/specs.py`` before measuring slopes."""
    from robustlab.runs import RunDir

    for a in cfg.algorithms:
        get_spec(a)
    config = asdict(cfg)
    run = RunDir.open(
        out,
        config,
        seed=cfg.instance_seed,
        resume_keys=[
            k for k in config if k not in ("workers", "backend", "algorithms")
        ],  # cells are per algorithm
    )
    grids = {a: (sorted(cfg.c_eta), sorted(cfg.c_beta) if _uses_c_beta(a) else [0.0]) for a in cfg.algorithms}

    def key(a, ln, ce, cb, n):
        return _tune_key(a, ln, ce, cb, n, cfg.seeds)

    def run_points(points: list[tuple[str, float, float]], n: int) -> None:
        jobs = [
            (a, ln, ce, cb, n)
            for a, ce, cb in points
            for ln in cfg.losses
            if not run.is_done(key(a, ln, ce, cb, n))
        ]
        if not jobs:
            return
        echo(f"tuning: {len(jobs)} points with {n} seed(s) to run on {cfg.workers} worker(s)")
        if cfg.workers == 1 and not cfg.ray_address:
            for j in jobs:
                run.save(key(*j), _tune_point(config, *j))
            return
        with cell_pool(cfg.workers, cfg.ray_address) as pool:
            futs = {pool.submit(_tune_point, config, *j): j for j in jobs}
            for f in as_completed(futs):
                run.save(key(*futs[f]), f.result())

    def score(a: str, ce: float, cb: float, n: int) -> float:
        return float(np.mean([run.load(key(a, ln, ce, cb, n))["mean_regret"] for ln in cfg.losses]))

    evaluated: dict[str, set[tuple[float, float]]] = {a: set() for a in cfg.algorithms}
    final: dict[str, set[tuple[float, float]]] = {a: set() for a in cfg.algorithms}

    def stage(points: list[tuple[str, float, float]], is_final: bool = False) -> None:
        run_points(points, cfg.seeds if is_final else cfg.screen_seeds)
        for a, ce, cb in points:
            (final if is_final else evaluated)[a].add((ce, cb))

    def best(a: str, is_final: bool = False) -> tuple[float, float]:
        n = cfg.seeds if is_final else cfg.screen_seeds
        return min(sorted(final[a] if is_final else evaluated[a]), key=lambda p: score(a, *p, n))

    start = {a: grids[a][1][min(1, len(grids[a][1]) - 1)] for a in cfg.algorithms}
    stage([(a, ce, start[a]) for a in cfg.algorithms for ce in grids[a][0]])  # (A)
    stage([(a, best(a)[0], cb) for a in cfg.algorithms for cb in grids[a][1]])  # (B)
    stage([(a, ce, best(a)[1]) for a in cfg.algorithms for ce in grids[a][0]])  # (A') c_eta again
    for _ in range(cfg.extend):  # (C)
        new = []
        for a in cfg.algorithms:
            ces, cbs = grids[a]
            ce, cb = best(a)
            if len(ces) > 1 and ce in (ces[0], ces[-1]):
                x = ces[0] / 10 if ce == ces[0] else ces[-1] * 10
                ces.insert(0, x) if x < ces[0] else ces.append(x)
                new.append((a, x, cb))
            if len(cbs) > 1 and cb in (cbs[0], cbs[-1]):
                y = cbs[0] / 10 if cb == cbs[0] else cbs[-1] * 10
                cbs.insert(0, y) if y < cbs[0] else cbs.append(y)
                new.append((a, ce, y))
        if not new:
            break
        stage(new)
    refined: dict[str, list[float]] = {}
    pts = []  # (D) finalists and the half-decade neighbours of the best c_eta, with every seed
    for a in cfg.algorithms:
        ce, cb = best(a)
        refined[a] = [ce / math.sqrt(10), ce * math.sqrt(10)]
        top = sorted(evaluated[a], key=lambda p, a=a: score(a, *p, cfg.screen_seeds))[: cfg.finalists]
        pts += [(a, *p) for p in top] + [(a, x, cb) for x in refined[a]]
    stage(pts, is_final=True)
    for _ in range(cfg.extend):  # (D') while the best final c_eta is an end of the refined range, step on
        pts = []
        for a in cfg.algorithms:
            ce, cb = best(a, is_final=True)
            done = sorted(x for x, y in final[a] if y == cb)
            if len(done) > 1 and ce in (done[0], done[-1]):
                x = ce / math.sqrt(10) if ce == done[0] else ce * math.sqrt(10)
                refined[a].append(x)
                pts.append((a, x, cb))
        if not pts:
            break
        stage(pts, is_final=True)
    chosen = {}
    for a in cfg.algorithms:
        ces, cbs = grids[a]
        ce, cb = best(a, is_final=True)
        on_edge = [
            ax
            for ax, v, g in (("c_eta", ce, ces), ("c_beta", cb, cbs))
            if len(g) > 1 and not g[0] < v < g[-1]
        ]
        chosen[a] = {
            "c_eta": ce,
            "c_beta": cb,
            "pilot_mean_regret": score(a, ce, cb, cfg.seeds),
            "c_eta_grid": ces,
            "c_beta_grid": cbs,
            "c_eta_refined": refined[a],
            "on_grid_edge": on_edge,
            "screened": [
                {"c_eta": p[0], "c_beta": p[1], "mean_regret": score(a, *p, cfg.screen_seeds)}
                for p in sorted(evaluated[a])
            ],
            "final": [
                {"c_eta": p[0], "c_beta": p[1], "mean_regret": score(a, *p, cfg.seeds)}
                for p in sorted(final[a])
            ],
        }
        echo(
            f"{a}: c_eta={ce:.4g}, c_beta={cb:.4g} (pilot mean regret {chosen[a]['pilot_mean_regret']:.1f} at "
            f"K={cfg.K}, {cfg.seeds} seeds"
            + (f"; on the grid edge in {', '.join(on_edge)}" if on_edge else "; inside the grid")
            + ")"
        )
    result = {
        "protocol": " ".join((TuneConfig.__doc__ or "").split()),
        "pilot_instance_seed": cfg.instance_seed,
        "K": cfg.K,
        "seeds": cfg.seeds,
        "losses": cfg.losses,
        "chosen": chosen,
    }
    run.write_summary(result)
    Path(out, "table.md").write_text(format_tuning(result))
    Path(out, "constants.json").write_text(
        json.dumps({a: [c["c_eta"], c["c_beta"]] for a, c in chosen.items()}, indent=2)
    )
    return result


def format_tuning(summary: dict) -> str:
    """Markdown of a tuning summary: per algorithm the screened grid (mean regret, 1 seed by default), the
    finalists with every seed, the choice and where it sits in the final grid."""
    lines = [
        f"Pilot instance seed {summary['pilot_instance_seed']}, K = {summary['K']:,}, losses "
        f"{', '.join(summary['losses'])}; finalists with {summary['seeds']} seeds.\n"
    ]
    for a, c in summary["chosen"].items():
        ces = sorted({p["c_eta"] for p in c["screened"]})
        cbs = sorted({p["c_beta"] for p in c["screened"]})
        val = {(p["c_eta"], p["c_beta"]): p["mean_regret"] for p in c["screened"]}
        where = (
            f"on the grid edge in {', '.join(c['on_grid_edge'])}" if c["on_grid_edge"] else "inside the grid"
        )
        lines.append(
            f"**{a}**: chosen c_η = {c['c_eta']:.4g}, c_β = {c['c_beta']:.4g} ({where}; c_η grid "
            f"{', '.join(f'{x:g}' for x in c['c_eta_grid'])}; c_β grid {', '.join(f'{x:g}' for x in c['c_beta_grid'])})\n"
        )
        lines.append("| c_η \\ c_β | " + " | ".join(f"{b:g}" for b in cbs) + " |")
        lines.append("|---|" + "---|" * len(cbs))
        for e in ces:
            cells = [f"{val[(e, b)]:.0f}" if (e, b) in val else "" for b in cbs]
            lines.append(f"| {e:.4g} | " + " | ".join(cells) + " |")
        fin = ", ".join(f"({p['c_eta']:.4g}, {p['c_beta']:.4g}): {p['mean_regret']:.0f}" for p in c["final"])
        lines.append(f"\nFinal points (c_η, c_β): mean regret over {summary['seeds']} seeds: {fin}.\n")
    return "\n".join(lines)


def summarise_folder(
    out: str | Path, echo: Callable[[str], None] = print, per_algorithm: bool = False
) -> dict:
    """Summarise the finished cells of a run folder without running anything (e.g. while a sweep is
    still going). Only K values finished by every algorithm enter; writes ``summary_partial.json`` and
    ``regret_partial.png`` (the full ``summary.json`` is written by :func:`run_regret` at the end)."""
    import yaml

    from robustlab.runs import RunDir, atomic_write_json, cell_key

    out = Path(out)
    cfg_file = out / "config.yaml"
    if not cfg_file.exists():
        raise UserError(
            f"{out} is not a regret run folder (no config.yaml)", "pass the --out of a regret run"
        )
    cfg = RegretConfig(**yaml.safe_load(cfg_file.read_text()))
    run = RunDir(out)
    Ks = [k for k in cfg.K if all(run.is_done(cell_key(algorithm=a, K=k)) for a in cfg.algorithms)]
    done = {a: [k for k in cfg.K if run.is_done(cell_key(algorithm=a, K=k))] for a in cfg.algorithms}
    if per_algorithm and all(len(v) >= 2 for v in done.values()):
        Ks = sorted({k for v in done.values() for k in v})
    else:
        per_algorithm = False
        done = {a: Ks for a in cfg.algorithms}
    if not Ks:
        raise UserError(f"no K value in {out} is finished for every algorithm yet", "wait for the run")
    mdp = make_instance(cfg.instance, cfg.instance_seed)
    rng = np.random.default_rng([cfg.seed, 99])
    summary = {
        "instance": mdp.name,
        "losses": cfg.losses,
        "mode": cfg.mode,
        "seeds": cfg.seeds,
        "partial": True,
        "K_finished": Ks,
        "slope_fit": "least squares of log mean regret on log K over every finished K"
        + (" of that algorithm" if per_algorithm else ""),
        "algorithms": {
            a: summarise({k: run.load(cell_key(algorithm=a, K=k)) for k in done[a]}, rng)
            for a in cfg.algorithms
        },
    }
    plot_regret(summary, out / "regret_partial.png", f"{mdp.name}, {cfg.losses} losses (K finished: {Ks})")
    atomic_write_json(out / "summary_partial.json", summary)
    echo(format_table(summary))
    return summary
