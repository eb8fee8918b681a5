"""``robustlab advmdp``: regret experiments on exactly specified adversarial linear MDPs.

Imports stay light here (numpy and the library load inside the commands).
"""

from __future__ import annotations

from pathlib import Path

import typer

from robustlab.errors import UserError

app = typer.Typer(
    help="Refined-regret algorithms for adversarial linear MDPs (Dai, Luo, Wei, Zimmert, ICML 2023).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _parse_constants(text: str | None) -> dict[str, list[float]]:
    """``alg2=30:0.1,alg1=10:0.1`` -> {"alg2": [30, 0.1], ...}."""
    out: dict[str, list[float]] = {}
    if not text:
        return out
    for part in text.split(","):
        try:
            name, vals = part.split("=")
            ce, cb = vals.split(":")
            out[name.strip()] = [float(ce), float(cb)]
        except ValueError as exc:
            raise UserError(f"cannot parse --constants part {part!r}", "use NAME=c_eta:c_beta,...") from exc
    return out


@app.command()
def regret(
    instance: str = typer.Option(
        "standard", help="standard | small | lock | path to an .npz (phi, mu, rho)."
    ),
    instance_seed: int = typer.Option(0, help="Seed of the random instance."),
    losses: str = typer.Option(
        "stochastic", help="stochastic | switching | needle | adaptive | path to .npy theta (K,H,d)."
    ),
    loss_seed: int = typer.Option(0, help="Seed of the (oblivious) loss sequence."),
    algorithms: str = typer.Option("alg1,alg2,luo21,fullinfo", help="Comma-separated algorithm names."),
    K: str = typer.Option("1000,3000,10000", "--K", help="Comma-separated numbers of episodes."),
    seeds: int = typer.Option(10, help="Learner seeds per cell."),
    seed: int = typer.Option(0, help="First learner seed (seeds are seed..seed+N-1)."),
    mode: str = typer.Option("oracle", help="oracle (exact covariance, for scaling) | simulator (rollouts)."),
    constants: str = typer.Option(None, help="Override constants: NAME=c_eta:c_beta,..."),
    gamma: float = typer.Option(None, help="Override every schedule's gamma (must be > 0)."),
    workers: int = typer.Option(1, help="Worker processes (cells run in parallel)."),
    backend: str = typer.Option(None, help="numpy | numba [default: numba when installed]; same numbers."),
    ray_address: str = typer.Option(
        None, help="Run cells on a Ray cluster: auto | host:port | ray://host:port | local."
    ),
    out: Path = typer.Option(None, help="Run folder [default: runs/advmdp/regret-<instance>-<losses>]."),
) -> None:
    """Regret of each algorithm on a K grid x seeds; resumable per cell; writes summary.json and regret.png."""
    from robustlab.advmdp.experiment import RegretConfig, parse_int_list, run_regret, validate

    cfg = RegretConfig(
        instance=instance,
        instance_seed=instance_seed,
        losses=losses,
        loss_seed=loss_seed,
        algorithms=[a.strip() for a in algorithms.split(",") if a.strip()],
        K=parse_int_list(K, "--K"),
        seeds=seeds,
        seed=seed,
        mode=mode,
        constants=_parse_constants(constants),
        gamma=gamma,
        workers=workers,
        backend=backend,
        ray_address=ray_address,
    )
    validate(cfg)  # every check before the run folder exists
    target = out or Path("runs") / "advmdp" / f"regret-{Path(instance).stem}-{Path(losses).stem}"
    run_regret(cfg, target, echo=typer.echo)


@app.command()
def tune(
    algorithms: str = typer.Option("alg1,alg2,luo21,fullinfo", help="Comma-separated algorithm names."),
    c_eta: str = typer.Option("1,10,100,1000", help="Starting grid of c_eta (extended at its edges)."),
    c_beta: str = typer.Option("0.03,0.3,3,10", help="Starting grid of c_beta (extended at its edges)."),
    K: int = typer.Option(100_000, "--K", help="Pilot number of episodes."),
    seeds: int = typer.Option(3, help="Seeds per grid point."),
    losses: str = typer.Option("stochastic", help="Comma-separated loss sequences scored (mean)."),
    instance_seed: int = typer.Option(1, help="Pilot instance seed (must differ from the evaluation seed)."),
    extend: int = typer.Option(2, help="Times an axis may be extended when the best value is on its edge."),
    workers: int = typer.Option(1, help="Worker processes."),
    backend: str = typer.Option(None, help="numpy | numba [default: numba when installed]."),
    ray_address: str = typer.Option(
        None, help="Run cells on a Ray cluster: auto | host:port | ray://host:port | local."
    ),
    out: Path = typer.Option(Path("runs/advmdp/tune"), help="Run folder."),
) -> None:
    """Choose (c_eta, c_beta) per algorithm on a pilot instance; freeze them before measuring slopes."""
    from robustlab.advmdp.algorithms import get_spec
    from robustlab.advmdp.algorithms.engine import resolve_backend
    from robustlab.advmdp.experiment import TuneConfig, tune_constants

    names = [a.strip() for a in algorithms.split(",") if a.strip()]
    for a in names:
        get_spec(a)
    try:
        ce = [float(x) for x in c_eta.split(",")]
        cb = [float(x) for x in c_beta.split(",")]
    except ValueError as exc:
        raise UserError("grids must be comma-separated numbers", "e.g. --c-eta 3,10,30") from exc
    if K <= 0:
        raise UserError(f"K must be positive, got {K}", "pass --K 100000")
    if seeds < 1 or workers < 1 or min(ce) <= 0 or min(cb) < 0 or extend < 0:
        raise UserError("seeds, workers >= 1, extend >= 0, c_eta > 0, c_beta >= 0", "fix the options")
    if instance_seed == 0:
        raise UserError("instance seed 0 is the evaluation instance", "tune on another --instance-seed")
    loss_names = [x.strip() for x in losses.split(",") if x.strip()]
    for ln in loss_names:
        if ln not in ("stochastic", "switching", "needle"):
            raise UserError(f"unknown loss sequence {ln!r} for tuning", "use stochastic, switching or needle")
    if backend is not None:
        resolve_backend(backend)
    cfg = TuneConfig(
        names,
        ce,
        cb,
        K,
        seeds,
        instance_seed,
        loss_names,
        extend,
        workers=workers,
        backend=backend,
        ray_address=ray_address,
    )
    tune_constants(cfg, out, echo=typer.echo)


@app.command()
def sweep(
    out: Path = typer.Option(Path("results/advmdp/sweep"), help="Folder of the per-grid run folders."),
    instances: str = typer.Option("standard,small", help="Comma-separated instances."),
    losses: str = typer.Option("stochastic,switching", help="Comma-separated loss sequences."),
    algorithms: str = typer.Option(
        "alg1,alg2,luo21,fullinfo,alg1_control,alg2_control,luo21_control", help="Comma-separated."
    ),
    K: str = typer.Option("10000,30000,100000,300000,1000000", "--K", help="Comma-separated K values."),
    seeds: int = typer.Option(10, help="Learner seeds per cell."),
    seeds_at: str = typer.Option("", help="Fewer seeds at some K: K:seeds,... e.g. 1000000:3."),
    max_K: str = typer.Option("", "--max-K", help="A smaller grid for some instances: instance:K,..."),
    tag: str = typer.Option("", help="Folder suffix, for a run that extends a grid (more K, fewer seeds)."),
    workers: int = typer.Option(1, help="Worker processes (one pool over every grid)."),
    backend: str = typer.Option(None, help="numpy | numba [default: numba when installed]."),
    ray_address: str = typer.Option(
        None, help="Run cells on a Ray cluster: auto | host:port | ray://host:port | local."
    ),
) -> None:
    """The evidence sweep: every (instance, losses) grid, resumable per cell, cheapest cells first."""
    from robustlab.advmdp.experiment import parse_int_list
    from robustlab.advmdp.sweep import SweepConfig, run_sweep

    try:
        at = [[int(float(a)), int(b)] for a, b in (x.split(":") for x in seeds_at.split(",") if x.strip())]
    except ValueError as exc:
        raise UserError(f"cannot parse --seeds-at {seeds_at!r}", "use K:seeds,... e.g. 1000000:3") from exc
    try:
        caps = [[i, int(float(k))] for i, k in (x.split(":") for x in max_K.split(",") if x.strip())]
    except ValueError as exc:
        raise UserError(f"cannot parse --max-K {max_K!r}", "use instance:K,... e.g. standard:300000") from exc
    if seeds < 1 or workers < 1 or any(n < 1 for _, n in at):
        raise UserError("seeds and workers must be >= 1", "fix --seeds, --seeds-at or --workers")
    cfg = SweepConfig(
        instances=[x.strip() for x in instances.split(",") if x.strip()],
        losses=[x.strip() for x in losses.split(",") if x.strip()],
        algorithms=[x.strip() for x in algorithms.split(",") if x.strip()],
        K=parse_int_list(K, "--K"),
        seeds=seeds,
        seeds_at=at,
        max_K=caps,
        tag=tag,
        workers=workers,
        backend=backend,
        ray_address=ray_address,
    )
    run_sweep(cfg, out, echo=typer.echo)


@app.command("sweep-report")
def sweep_report(
    results: Path = typer.Option(Path("results/advmdp/sweep"), help="The sweep folder."),
    plot: Path = typer.Option(Path("docs/advmdp_sqrtK.png"), help="Where to write the R/sqrt(K) plot."),
) -> None:
    """Tables (tables.md), summary.json and the R/sqrt(K) plot from the finished cells of a sweep."""
    from robustlab.advmdp.sweep import build_report

    if not results.is_dir():
        raise UserError(f"{results} is not a folder", "pass the --out of `robustlab advmdp sweep`")
    build_report(results, plot, echo=typer.echo)


@app.command("alg3-exploration")
def alg3_exploration_cmd(
    out: Path = typer.Option(Path("results/advmdp/alg3_exploration"), help="Run folder."),
    K: str = typer.Option("3000,10000", "--K", help="Comma-separated K values."),
    c_explore: str = typer.Option("0,0.3,1", help="Multipliers of the exploration schedule K^(-1/9)."),
    seeds: int = typer.Option(3, help="Learner seeds per cell."),
) -> None:
    """Alg 3's forced exploration (delta_e = c_explore K^(-1/9)) against its regret, small instance."""
    from robustlab.advmdp.experiment import parse_int_list
    from robustlab.advmdp.sweep import alg3_exploration

    try:
        cs = [float(x) for x in c_explore.split(",") if x.strip()]
    except ValueError as exc:
        raise UserError("--c-explore must be comma-separated numbers", "e.g. 0,0.3,1") from exc
    if seeds < 1 or not cs or min(cs) < 0:
        raise UserError("seeds >= 1 and c_explore >= 0", "fix --seeds or --c-explore")
    alg3_exploration(out, parse_int_list(K, "--K"), cs, seeds, echo=typer.echo)


@app.command()
def summarize(
    out: Path = typer.Option(..., help="A regret run folder."),
    per_algorithm: bool = typer.Option(
        False, help="Use every K each algorithm has finished (default: only K finished by all)."
    ),
) -> None:
    """Summarise the finished cells of a (possibly still running) regret run: table + partial plot."""
    from robustlab.advmdp.experiment import summarise_folder

    summarise_folder(out, echo=typer.echo, per_algorithm=per_algorithm)


@app.command("algorithms")
def list_algorithms() -> None:
    """List the algorithms with their regulariser, estimator, bonus and rate."""
    from robustlab.advmdp.algorithms import ALGORITHMS

    for spec in ALGORITHMS.values():
        typer.echo(
            f"{spec.name:10s} {spec.title}  [reg={spec.regularizer}, est={spec.estimator}, "
            f"bonus={spec.bonus}, rate {spec.rate}, c_eta={spec.c_eta}, c_beta={spec.c_beta}]"
        )
