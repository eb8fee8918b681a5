"""FedLD experiments on Flower's simulation engine (Ray backend): methods x seeds, resumable, summarised.

:func:`run_experiment` validates everything first (nothing is written for bad input), opens the run folder
(:class:`robustlab.runs.RunDir`), and runs every unfinished (method, seed) cell inside **one**
``flwr.simulation.run_simulation`` (one Ray start for the whole sweep): the ServerApp trains the cells one
after the other with :func:`robustlab.fedld.server_app.run_training`, checkpointing the global model, the
strategy state and the history after every round (client state goes to ``client_state/``), so a killed run
continues from the last finished round of the cell it was in. Finished cells are stored in ``cells/``.

Every round the global model is evaluated on the validation and test splits (accuracy, balanced accuracy,
macro AUC); the reported "best" round is chosen on validation accuracy, never on test. The clients report
their accuracy on their own test share (sample-weighted and unweighted means, per-client values). For
FedLD the update-size ratio and cosine against FedAvg on the same deltas are logged every round.

The folder then holds ``summary.json`` (per method: final and validation-chosen test accuracy and balanced
accuracy, mean and std over seeds, per-round curves), ``table.md``, ``accuracy.png`` (test accuracy vs
round) and ``label_histogram.png`` (the clients' label counts).

Seeds: seed ``s`` fixes the Dirichlet split (so every seed has its own split, as in the feasibility run),
the model initialisation and every client's batch order.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from robustlab.errors import UserError
from robustlab.fedld.config import RUNTIME_FIELDS, ExperimentConfig, options
from robustlab.runs import RunDir, cell_key, environment_info, to_jsonable

log = logging.getLogger("robustlab.fedld")

#: methods whose clients never use the server's averaged model as it is (FedBN: local BatchNorm; FedPAC:
#: a personal head): reported on the clients' own models, round chosen on their validation shares
PERSONALISED = ("fedbn", "fedpac")

#: every method the experiment runs (strategy registry names), in run order (FedLD before the control
#: whose server learning rate is matched to FedLD's measured update-size ratio)
METHODS = (
    "fedavg",
    "fedavg-unweighted",
    "fedld",
    "fedavg-slr",
    "fedld-margin",
    "fedld-pg",
    "fedprox",
    "fedbn",
    "fedgh",
    "scaffold",
    "moon",
    "fedpac",
)
LABELS = {
    "fedavg": "FedAvg",
    "fedavg-unweighted": "FedAvg (unweighted)",
    "fedavg-slr": "FedAvg (server lr = FedLD ratio)",
    "fedld": "FedLD",
    "fedld-margin": "FedLD: margin control only",
    "fedld-pg": "FedLD: PG aggregation only",
    "fedprox": "FedProx",
    "fedbn": "FedBN",
    "fedgh": "FedGH (FedLD repo's variant)",  # svd_tools.pcgrad_hierarchy, not the FedGH paper's code
    "scaffold": "SCAFFOLD",
    "moon": "MOON",
    "fedpac": "FedPAC",
}

#: config entries that must match to resume a folder (methods, seeds and rounds may grow)
RESUME_KEYS = (
    "dataset",
    "data_dir",
    "clients",
    "beta",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "local_epochs",
    "margin_lambda",
    "k_proportion",
    "proximal_mu",
    "moon_mu",
    "moon_tau",
    "fedpac_lambda",
    "server_lr",
    "min_partition_size",
    "model",
    "pretrained",
    "image_size",
    "weights",
    "sslfl_split",
)

#: resume keys added after folders were first written: a folder whose config.yaml lacks one still resumes
#: when the run asks for the default (the value every earlier run used)
LATER_RESUME_DEFAULTS: dict[str, Any] = {
    "fedpac_lambda": 1.0,
    "pretrained": False,
    "image_size": 0,
    "weights": "",
    "sslfl_split": "split_1",
}


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """``"fedavg,fedld"`` -> ``["fedavg", "fedld"]``; ``all`` -> every method; unknown names raise."""
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    if names == ["all"]:
        return list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UserError(
            f"unknown method(s): {', '.join(unknown) or repr(text)}",
            f"choose from {', '.join(METHODS)} (comma-separated) or 'all'",
        )
    return list(dict.fromkeys(names))


def validate_config(cfg: ExperimentConfig) -> None:
    """Raise ``UserError`` for any bad setting, before anything is written."""
    from robustlab.fedld.models import MODEL_NAMES

    parse_methods(cfg.methods)
    checks = [
        (cfg.clients >= 1, f"--clients must be >= 1, got {cfg.clients}", "use e.g. 5"),
        (
            math.isfinite(cfg.beta) and cfg.beta > 0,
            f"--beta must be > 0, got {cfg.beta}",
            "use e.g. 100, 1 or 0.5",
        ),
        (cfg.rounds >= 1, f"--rounds must be >= 1, got {cfg.rounds}", "use e.g. 100"),
        (cfg.seeds >= 1, f"--seeds must be >= 1, got {cfg.seeds}", "use e.g. 5"),
        (0 < cfg.k_proportion <= 1, f"--k-proportion must be in (0, 1], got {cfg.k_proportion}", "use 0.8"),
        (cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}", "use 0.01"),
        (cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}", "use 50"),
        (cfg.local_epochs >= 1, f"--local-epochs must be >= 1, got {cfg.local_epochs}", "use 1"),
        (cfg.margin_lambda >= 0, f"--margin-lambda must be >= 0, got {cfg.margin_lambda}", "use 0.1"),
        (cfg.proximal_mu >= 0, f"--proximal-mu must be >= 0, got {cfg.proximal_mu}", "use 0.01"),
        (
            cfg.moon_tau > 0 and cfg.moon_mu >= 0,
            "MOON needs --moon-tau > 0 and --moon-mu >= 0",
            "use 0.5 and 1",
        ),
        (
            math.isfinite(cfg.fedpac_lambda) and cfg.fedpac_lambda >= 0,
            f"--fedpac-lambda must be >= 0, got {cfg.fedpac_lambda}",
            "use 1.0",
        ),
        (
            cfg.server_lr is None or (math.isfinite(cfg.server_lr) and cfg.server_lr > 0),
            f"--server-lr must be > 0, got {cfg.server_lr}",
            "omit it to match FedLD's measured update ratio",
        ),
        (
            1 <= cfg.min_replies <= cfg.clients,
            f"--min-replies must be between 1 and --clients, got {cfg.min_replies}",
            "use 1",
        ),
        (
            cfg.model.lower() in MODEL_NAMES,
            f"unknown --model '{cfg.model}'",
            f"use one of {', '.join(MODEL_NAMES)}",
        ),
        (
            cfg.image_size >= 0,
            f"--image-size must be >= 0, got {cfg.image_size}",
            "use e.g. 64 (0 = the data's)",
        ),
        (
            cfg.min_nodes >= 0,
            f"--min-nodes must be >= 0, got {cfg.min_nodes}",
            "use 0 (= --min-node-fraction)",
        ),
        (
            0 < cfg.min_node_fraction <= 1,
            f"--min-node-fraction must be in (0, 1], got {cfg.min_node_fraction}",
            "use e.g. 0.5",
        ),
        (cfg.node_wait >= 0, f"--node-wait must be >= 0, got {cfg.node_wait}", "use e.g. 120"),
        (
            cfg.dataset != "sslfl" or bool(cfg.data_dir),
            "--dataset sslfl needs --data-dir",
            "pass the SSL-FL folder holding labels.csv (e.g. data/Retina)",
        ),
        (cfg.round_timeout > 0, f"--round-timeout must be > 0, got {cfg.round_timeout}", "use e.g. 600"),
        (
            cfg.num_cpus >= 1 and cfg.client_cpus > 0,
            "--num-cpus must be >= 1 and --client-cpus > 0",
            "use 2 and 1",
        ),
    ]
    for ok, problem, fix in checks:
        if not ok:
            raise UserError(problem, fix)


def _task_spec(cfg: ExperimentConfig, seed: int):
    from robustlab.fedld.task import TaskSpec

    return TaskSpec(
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        num_partitions=cfg.clients,
        beta=cfg.beta,
        seed=seed,
        min_partition_size=cfg.min_partition_size,
        model=cfg.model,
        pretrained=cfg.pretrained,
        image_size=cfg.image_size,
        weights=cfg.weights,
        sslfl_split=cfg.sslfl_split,
    )


def _strategy_options(cfg: ExperimentConfig, task: Any, server_lr: float | None) -> dict[str, Any]:
    return {
        "num_clients": cfg.clients,
        "min_replies": cfg.min_replies,
        "margin_lambda": cfg.margin_lambda,
        "k_proportion": cfg.k_proportion,
        "proximal_mu": cfg.proximal_mu,
        "moon_mu": cfg.moon_mu,
        "moon_tau": cfg.moon_tau,
        "fedpac_lambda": cfg.fedpac_lambda,
        "server_lr": server_lr if server_lr is not None else 1.0,
        "min_nodes": cfg.min_nodes,
        "min_node_fraction": cfg.min_node_fraction,
        "node_wait": cfg.node_wait,
        "bn_keys": task.batchnorm_keys(),
        "head_keys": task.head_keys(),
        "param_keys": [n for n, _ in task.build_model().named_parameters()],
    }


def _cell(method: str, seed: int) -> str:
    return cell_key(method=method, seed=seed)


def _cell_done(run: RunDir, method: str, seed: int, rounds: int) -> bool:
    key = _cell(method, seed)
    return run.is_done(key) and int(run.load(key)["rounds"]) >= rounds


def matched_server_lr(history: list[dict[str, Any]]) -> float:
    """Median over rounds of FedLD's update-size ratio (||g_FedLD|| / ||g_FedAvg||) in a history."""
    vals = [
        float(h["diagnostics"]["update-ratio"])
        for h in history
        if h.get("diagnostics") and math.isfinite(float(h["diagnostics"].get("update-ratio", float("nan"))))
    ]
    if not vals:
        raise UserError("FedLD's history holds no update-size ratio", "rerun the fedld cell")
    return float(statistics.median(vals))


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    echo: Callable[[str], None] = print,
    *,
    stop_after_rounds: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) the experiment into ``out``; return the summary (also written to summary.json).

    ``stop_after_rounds`` (testing the resume path) ends the simulation after that many trained rounds
    in total, as a kill would, leaving the checkpoints behind.
    """
    from robustlab.fedld.task import load_task

    cfg.methods = parse_methods(cfg.methods)
    validate_config(cfg)
    seeds = cfg.seed_list()
    # load (and so validate) the data and every seed's partition before any output exists
    for s in seeds:
        load_task(_task_spec(cfg, s)).build_model()  # also checks the model, its input and its weights
    out = Path(out)
    if "fedavg-slr" in cfg.methods and cfg.server_lr is None and "fedld" not in cfg.methods:
        probe = RunDir(out)
        if not all(probe.is_done(_cell("fedld", s)) for s in seeds):
            raise UserError(
                "fedavg-slr matches its server lr to FedLD's measured update ratio, but fedld is not run",
                "add fedld to --methods, or pass --server-lr",
            )
    app_only = {f.name for f, opt in options() if opt.where == "app"}
    config = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS and k not in app_only}
    run = RunDir.open(out, config, seed=cfg.first_seed, resume_keys=_resume_keys(out, config))
    pending = [(m, s) for s in seeds for m in cfg.ordered_methods() if not _cell_done(run, m, s, cfg.rounds)]
    done = len(seeds) * len(cfg.methods) - len(pending)
    echo(f"fedld: {len(pending)} cell(s) to run, {done} already done -> {out}")
    if pending:
        _simulate(cfg, run, pending, echo, stop_after_rounds)
    summary = summarize(run, cfg)
    write_outputs(run, cfg, summary)
    return summary


def _resume_keys(out: Path, config: dict[str, Any]) -> tuple[str, ...]:
    """:data:`RESUME_KEYS`, less any key of :data:`LATER_RESUME_DEFAULTS` that the folder's config.yaml
    predates while this run asks for its default (so folders written before the key existed resume)."""
    cfg_file = Path(out) / "config.yaml"
    if not cfg_file.exists():
        return RESUME_KEYS
    import yaml

    old = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    return tuple(
        k
        for k in RESUME_KEYS
        if not (k in LATER_RESUME_DEFAULTS and k not in old and config.get(k) == LATER_RESUME_DEFAULTS[k])
    )


class _Stop(Exception):
    """Ends the simulation early (``stop_after_rounds``), as a kill would."""


def _simulate(
    cfg: ExperimentConfig,
    run: RunDir,
    pending: list[tuple[str, int]],
    echo: Callable[[str], None],
    stop_after_rounds: int | None,
) -> None:
    import torch
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from robustlab.fedld.client_app import app as client_app
    from robustlab.fedld.server_app import Checkpoint, run_training
    from robustlab.fedld.strategies import make_strategy
    from robustlab.fedld.task import load_task

    server_app = ServerApp()
    trained = {"rounds": 0}
    errors: list[BaseException] = []

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            for method, seed in pending:
                spec = _task_spec(cfg, seed)
                task = load_task(spec)
                server_lr = cfg.server_lr
                if method == "fedavg-slr" and server_lr is None:
                    server_lr = matched_server_lr(run.load(_cell("fedld", seed))["history"])
                strategy = make_strategy(method, _strategy_options(cfg, task, server_lr))
                key = _cell(method, seed)
                state_dir = run.path / "client_state" / key
                train_config = {
                    **spec.to_config(),
                    "lr": cfg.lr,
                    "momentum": cfg.momentum,
                    "weight-decay": cfg.weight_decay,
                    "batch-size": cfg.batch_size,
                    "local-epochs": cfg.local_epochs,
                    "client-state-dir": str(state_dir),
                    "cell": key,
                }
                t0 = time.perf_counter()

                def on_round(rec: dict[str, Any], method: str = method, seed: int = seed) -> None:
                    diag = rec.get("diagnostics") or {}
                    run.log(
                        method=method,
                        seed=seed,
                        round=rec["round"],
                        val_accuracy=rec["val"]["accuracy"],
                        test_accuracy=rec["test"]["accuracy"],
                        test_balanced_accuracy=rec["test"]["balanced_accuracy"],
                        test_auc=rec["test"]["auc"],
                        client_accuracy=(rec.get("clients") or {}).get("accuracy"),
                        client_accuracy_unweighted=(rec.get("clients") or {}).get("accuracy-unweighted"),
                        update_ratio=diag.get("update-ratio"),
                        update_cosine=diag.get("update-cosine"),
                        seconds=rec.get("seconds"),
                    )
                    if rec["round"] > 0:
                        trained["rounds"] += 1
                        if rec["round"] % 10 == 0 or rec["round"] == cfg.rounds:
                            echo(
                                f"  {method} seed {seed} round {rec['round']}/{cfg.rounds}: "
                                f"val acc {rec['val']['accuracy']:.3f}, test acc {rec['test']['accuracy']:.3f}"
                            )
                        if stop_after_rounds is not None and trained["rounds"] >= stop_after_rounds:
                            raise _Stop

                _, history = run_training(
                    grid,
                    strategy,
                    task,
                    num_rounds=cfg.rounds,
                    train_config=train_config,
                    init_seed=seed,
                    round_timeout=cfg.round_timeout,
                    checkpoint=Checkpoint(run.path / "checkpoints" / f"{key}.npz"),
                    on_round=on_round,
                )
                run.save(
                    key,
                    {
                        "method": method,
                        "seed": seed,
                        "rounds": cfg.rounds,
                        "server_lr": strategy.server_lr if method == "fedavg-slr" else None,
                        "skipped_rounds": list(strategy.skipped_rounds),
                        "label_counts": task_label_counts(task),
                        "data_source": task.source,
                        "source_image_size": task.source_image_size,
                        "model_parameters": sum(p.numel() for p in task.build_model().parameters()),
                        "history": history,
                        "seconds": time.perf_counter() - t0,
                        # each cell carries its own versions and commit: a sweep spans sessions and the
                        # folder's env.json only records the latest call
                        "environment": environment_info(seed),
                    },
                )
                echo(f"  {method} seed {seed}: done in {time.perf_counter() - t0:.0f} s")
        except BaseException as exc:  # surfaced after the simulation ends
            errors.append(exc)

    flwr_logger = logging.getLogger("flwr")
    old_level = flwr_logger.level
    old_threads = torch.get_num_threads()
    flwr_logger.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_name="ray",
            backend_config={
                "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
                "init_args": {"num_cpus": cfg.num_cpus, "include_dashboard": False},
            },
        )
    finally:
        flwr_logger.setLevel(old_level)
        torch.set_num_threads(old_threads)
    if errors and not isinstance(errors[0], _Stop):
        raise errors[0]


def task_label_counts(task: Any) -> list[list[int]]:
    """Per-client training label counts (rows: clients, columns: classes)."""
    import numpy as np

    y = task.y_train.numpy()
    return [np.bincount(y[p], minlength=task.num_classes).tolist() for p in task.partitions]


# --------------------------------------------------------------------------- summary and outputs


def _mean_std(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": float(statistics.fmean(vals)),
        "std": float(statistics.stdev(vals)) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def summarize(run: RunDir, cfg: ExperimentConfig) -> dict[str, Any]:
    """Per method over its finished seeds: final and validation-chosen test numbers (mean, std), curves."""
    import numpy as np

    from robustlab.fedld.server_app import best_client_round, best_round

    methods: dict[str, Any] = {}
    for key in run.done_keys():
        cell = run.load(key)
        method = cell["method"]
        hist = [h for h in cell["history"] if h["round"] <= cfg.rounds]
        if hist[-1]["round"] < cfg.rounds:
            continue
        m = methods.setdefault(method, {"seeds": [], "per_seed": []})
        best = best_round(hist)
        final = hist[-1]
        ratios = [
            h["diagnostics"]["update-ratio"]
            for h in hist
            if (h.get("diagnostics") or {}).get("update-ratio") is not None
        ]
        cosines = [
            h["diagnostics"]["update-cosine"]
            for h in hist
            if (h.get("diagnostics") or {}).get("update-cosine") is not None
        ]
        cbest = best_client_round(hist)
        fclients = final.get("clients") or {}
        m["seeds"].append(cell["seed"])
        m["per_seed"].append(
            {
                "seed": cell["seed"],
                "final": {"round": final["round"], **final["test"]},
                "best": {"round": best["round"], "val_accuracy": best["val"]["accuracy"], **best["test"]},
                # the clients' own models (local BatchNorm, personal heads), pooled over their shares
                "clients_best": None
                if cbest is None
                else {
                    "round": cbest["round"],
                    "val_accuracy": cbest["clients"]["val-accuracy"],
                    "accuracy": cbest["clients"].get("accuracy"),
                    "balanced_accuracy": cbest["clients"].get("balanced-accuracy"),
                },
                "clients_final": {
                    "accuracy": fclients.get("accuracy"),
                    "balanced_accuracy": fclients.get("balanced-accuracy"),
                },
                "final_client_accuracy": (final.get("clients") or {}).get("accuracy"),
                "final_client_accuracy_unweighted": (final.get("clients") or {}).get("accuracy-unweighted"),
                "final_client_accuracies": (final.get("clients") or {}).get("client-accuracy"),
                "update_ratio_median": float(np.median(ratios)) if ratios else None,
                "update_cosine_median": float(np.median(cosines)) if cosines else None,
                "server_lr": cell.get("server_lr"),
                "seconds_per_round": float(np.mean([h["seconds"] for h in hist if h["round"] > 0])),
                "curve": {
                    "round": [h["round"] for h in hist],
                    "val_accuracy": [h["val"]["accuracy"] for h in hist],
                    "test_accuracy": [h["test"]["accuracy"] for h in hist],
                    "test_balanced_accuracy": [h["test"]["balanced_accuracy"] for h in hist],
                    "update_ratio": [(h.get("diagnostics") or {}).get("update-ratio") for h in hist],
                    "update_cosine": [(h.get("diagnostics") or {}).get("update-cosine") for h in hist],
                },
            }
        )
    for method, m in methods.items():
        ps = sorted(m["per_seed"], key=lambda p: p["seed"])
        m["per_seed"] = ps
        m["seeds"] = [p["seed"] for p in ps]
        m["label"] = LABELS.get(method, method)
        for which in ("final", "best"):
            m[which] = {
                k: _mean_std([p[which][k] for p in ps])
                for k in ("accuracy", "balanced_accuracy", "auc", "loss")
            }
        m["best"]["round"] = _mean_std([p["best"]["round"] for p in ps])
        # Personalised methods are reported on the clients' own models when every seed has those numbers
        # (cells run before the clients evaluated on validation do not: they keep the server copy's).
        native = method in PERSONALISED and all(p["clients_best"] is not None for p in ps)
        m["reported"] = "clients" if native else "server"
        if native:
            m["clients_best"] = {
                k: _mean_std([p["clients_best"][k] for p in ps])
                for k in ("round", "val_accuracy", "accuracy", "balanced_accuracy")
            }
            m["clients_final"] = {
                k: _mean_std([p["clients_final"][k] for p in ps]) for k in ("accuracy", "balanced_accuracy")
            }
        m["final_client_accuracy"] = _mean_std([p["final_client_accuracy"] for p in ps])
        m["final_client_accuracy_unweighted"] = _mean_std([p["final_client_accuracy_unweighted"] for p in ps])
        m["update_ratio_median"] = _mean_std([p["update_ratio_median"] for p in ps])
        m["update_cosine_median"] = _mean_std([p["update_cosine_median"] for p in ps])
        curves = np.array([p["curve"]["test_accuracy"] for p in ps], dtype=float)
        vcurves = np.array([p["curve"]["val_accuracy"] for p in ps], dtype=float)
        m["curve"] = {
            "round": ps[0]["curve"]["round"],
            "test_accuracy_mean": curves.mean(0).tolist(),
            "test_accuracy_std": curves.std(0).tolist(),
            "val_accuracy_mean": vcurves.mean(0).tolist(),
        }
    ordered = {k: methods[k] for k in sorted(methods, key=lambda k: METHODS.index(k) if k in METHODS else 99)}
    return {
        "config": to_jsonable(asdict(cfg)),
        "selection": "best round = highest validation accuracy (earliest on ties); test read at that round. "
        "FedBN, FedPAC: the clients' own models, round chosen on their pooled validation accuracy",
        "methods": ordered,
    }


def _pm(stat: dict[str, Any], digits: int = 3) -> str:
    from robustlab.report import mean_pm

    return mean_pm(stat.get("mean"), stat.get("std"), stat.get("n"), digits)


def summary_table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    cols = [
        "method",
        "seeds",
        "test acc (val-chosen)",
        "test bal. acc (val-chosen)",
        "test AUC (val-chosen)",
        "final test acc",
        "final test bal. acc",
        "client acc (w / unw.)",
        "update ratio",
    ]
    rows = []
    for m in summary["methods"].values():
        ca, cu = m["final_client_accuracy"], m["final_client_accuracy_unweighted"]
        native = m.get("reported") == "clients"
        best = m["clients_best"] if native else m["best"]
        final = m["clients_final"] if native else m["final"]
        rows.append(
            [
                m["label"] + (" (clients' own models)" if native else ""),
                len(m["seeds"]),
                _pm(best["accuracy"]),
                _pm(best["balanced_accuracy"]),
                "—" if native else _pm(m["best"]["auc"]),
                _pm(final["accuracy"]),
                _pm(final["balanced_accuracy"]),
                (
                    f"{ca['mean']:.3f} / {cu['mean']:.3f}"
                    if None not in (ca.get("mean"), cu.get("mean"))
                    else "—"
                ),
                _pm(m["update_ratio_median"], 2) if m["update_ratio_median"].get("mean") is not None else "",
            ]
        )
    return cols, rows


def write_outputs(run: RunDir, cfg: ExperimentConfig, summary: dict[str, Any]) -> dict[str, Path]:
    """summary.json, table.md, accuracy.png and label_histogram.png in the run folder."""
    from robustlab.report import markdown_table, pyplot, save_figure
    from robustlab.runs import atomic_write_text

    run.write_summary(summary)
    cols, rows = summary_table(summary)
    head = (
        f"{cfg.dataset}, {cfg.clients} clients, Dirichlet beta={cfg.beta}, {cfg.rounds} rounds; "
        "mean ± std over seeds; val-chosen = round with the best validation accuracy (FedBN, FedPAC: their "
        "clients' own models, round chosen on the clients' pooled validation shares).\n\n"
    )
    atomic_write_text(run.path / "table.md", head + markdown_table(cols, rows) + "\n")
    paths = {"summary": run.path / "summary.json", "table": run.path / "table.md"}
    if summary["methods"]:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.2))
        # more methods than the colour cycle has colours: dash the ones whose colour repeats
        n_colours = len(plt.rcParams["axes.prop_cycle"].by_key()["color"])
        for i, m in enumerate(summary["methods"].values()):
            r = m["curve"]["round"]
            mu = m["curve"]["test_accuracy_mean"]
            sd = m["curve"]["test_accuracy_std"]
            style = "-" if i < n_colours else "--"
            (line,) = ax.plot(r, mu, style, label=f"{m['label']} ({len(m['seeds'])} seeds)", lw=1.4)
            ax.fill_between(
                r,
                [a - b for a, b in zip(mu, sd, strict=True)],
                [a + b for a, b in zip(mu, sd, strict=True)],
                color=line.get_color(),
                alpha=0.12,
            )
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (global model)")
        ax.set_title(f"{cfg.dataset}, {cfg.clients} clients, beta={cfg.beta}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        paths["accuracy"] = save_figure(fig, run.path / "accuracy.png")
        cell = run.load(run.done_keys()[0]) if run.done_keys() else None
        if cell is not None:
            paths["label_histogram"] = plot_label_histogram(
                cell["label_counts"],
                run.path / "label_histogram.png",
                f"{cfg.dataset}, beta={cfg.beta}, seed {cell['seed']}",
            )
    return paths


def plot_label_histogram(counts: list[list[int]], path: Path, title: str) -> Path:
    """Stacked bars: one bar per client, one colour per class."""
    import numpy as np

    from robustlab.report import pyplot, save_figure

    plt = pyplot()
    c = np.asarray(counts)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = np.zeros(c.shape[0])
    for k in range(c.shape[1]):
        ax.bar(np.arange(c.shape[0]), c[:, k], bottom=bottom, label=f"class {k}")
        bottom += c[:, k]
    ax.set_xticks(np.arange(c.shape[0]), [f"client {i}" for i in range(c.shape[0])])
    ax.set_ylabel("training samples")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)
