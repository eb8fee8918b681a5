"""The baselines' commands: ``sweep`` (every method across fine-tuning learning rates and epochs) and
``pipeline`` (the harmful fine-tuning pipeline with a ``method:``).

Mounted by ``antidote/cli.py`` as ``robustlab antidote sweep`` and ``robustlab antidote pipeline``.
No torch at import time.
"""

from __future__ import annotations

from pathlib import Path

import typer

from robustlab.errors import UserError

JUDGE_MODEL_HELP = (
    "The beaver-dam judge (the paper's HS): a local folder or hub id [default: PKU-Alignment/beaver-dam-7b]; "
    "adds the beaverdam judge to evaluate.judges."
)


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise UserError(
            f"{flag} must be comma-separated numbers, got {text!r}", f"pass e.g. {flag} 1e-5,1e-4"
        ) from exc


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    vals = _floats(text, flag)
    if vals is None:
        return None
    if any(v != int(v) for v in vals):
        raise UserError(f"{flag} must be integers, got {text!r}", f"pass e.g. {flag} 0,1,2")
    return tuple(int(v) for v in vals)


def _params(items: list[str] | None):
    from robustlab.antidote.methods import DefenceParams

    params = DefenceParams()
    fields = {f for f in DefenceParams.__dataclass_fields__}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--param {item!r} is not key=value", "pass e.g. --param vaccine_rho=2")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in fields:
            raise UserError(f"unknown defence setting {key!r}", f"choose from {', '.join(sorted(fields))}")
        kind = type(getattr(params, key))
        try:
            setattr(params, key, kind(float(value)) if kind is int else kind(value))
        except ValueError as exc:
            raise UserError(f"--param {key} needs a {kind.__name__}, got {value!r}", "fix the value") from exc
    return params.validate()


def sweep(
    out: Path = typer.Option(..., "--out", help="Run folder (rerun the same command to resume)."),
    config: Path = typer.Option(
        None,
        "--config",
        help="Pipeline YAML of a real model (base, data, stages, judges); omit for the tiny offline model.",
    ),
    methods: str = typer.Option(
        None,
        "--methods",
        help="Comma-separated methods, e.g. sft,vaccine,repnoise,booster,lisa,ldifs,safelora,resta,antidote,vaccine+sft+antidote.",
    ),
    lrs: str = typer.Option(None, "--lrs", help="Fine-tuning learning rates (at the default epochs)."),
    epochs: str = typer.Option(None, "--epochs", help="Fine-tuning epochs (at the default learning rate)."),
    default_lr: float = typer.Option(None, "--default-lr", help="The lr of the epoch sweep."),
    default_epochs: float = typer.Option(None, "--default-epochs", help="The epochs of the lr sweep."),
    seeds: str = typer.Option(None, "--seeds", help="Comma-separated seeds."),
    param: list[str] = typer.Option(
        None, "--param", help="A defence setting, key=value (repeatable), e.g. lisa_rho=0.1."
    ),
    scale: str = typer.Option(
        "quick", "--scale", help="Tiny model only: quick (the documented run) or smoke."
    ),
    data_dir: Path = typer.Option(
        None, "--data-dir", help="Data folder with the layout of shared/data (tiny model)."
    ),
    keep_models: bool = typer.Option(False, "--keep-models", help="Keep every fine-tuned model on disk."),
    judge_model: str = typer.Option(None, "--judge-model", help=JUDGE_MODEL_HELP),
) -> None:
    """Every method across fine-tuning learning rates and epochs (the paper's robustness tables)."""
    import dataclasses

    from robustlab.antidote.sweep import SweepConfig
    from robustlab.antidote.sweep_harness import tiny_sweep_config

    overrides = {
        "methods": tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None,
        "lrs": _floats(lrs, "--lrs"),
        "epochs": _floats(epochs, "--epochs"),
        "default_lr": default_lr,
        "default_epochs": default_epochs,
        "seeds": _ints(seeds, "--seeds"),
        "keep_models": keep_models,
    }
    if config is None:
        if judge_model:
            raise UserError(
                "--judge-model needs --config: the tiny offline model is judged by refusal phrases",
                "pass --config with a pipeline YAML of a real model, or drop --judge-model",
            )
        cfg, demo = tiny_sweep_config(scale)
        if data_dir is not None and not data_dir.is_dir():
            raise UserError(f"data folder {data_dir} does not exist", "pass an existing folder to --data-dir")
        from robustlab.antidote.data import resolve_data_dir

        resolve_data_dir(data_dir)
    else:
        from robustlab.antidote.pipeline import load_config, with_judge_model

        pcfg = with_judge_model(load_config(config), judge_model)
        cfg = SweepConfig(
            default_lr=pcfg.finetune.train.lr, default_epochs=pcfg.finetune.train.epochs, seeds=(pcfg.seed,)
        )
    if param:
        overrides["params"] = _params(param)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate()  # every input is checked before the run folder exists

    from robustlab.antidote.cli_common import quiet_transformers
    from robustlab.antidote.sweep import run_sweep
    from robustlab.antidote.sweep_harness import pipeline_harness, tiny_harness

    quiet_transformers()
    echo = lambda s: typer.echo(s, err=True)  # noqa: E731
    if config is None:
        record = {"demo": dataclasses.asdict(demo)}
        res = run_sweep(
            cfg, out, lambda seed, cache, log: tiny_harness(demo, seed, cache, data_dir, log), record, echo
        )
    else:
        record = {"pipeline": dataclasses.asdict(pcfg)}
        res = run_sweep(cfg, out, lambda seed, cache, log: pipeline_harness(pcfg, seed, cache), record, echo)
    typer.echo(res["tables"])
    typer.echo(f"tables: {Path(out) / 'sweep_tables.md'}; plots: {', '.join(res['figures'])}")


def method_pipeline(
    config: Path = typer.Option(..., "--config", help="Pipeline YAML plus method: and defences: keys."),
    out: Path = typer.Option(None, "--out", help="Run folder [default: runs/antidote/<config name>]."),
    method: str = typer.Option(
        None, "--method", help="Overrides the config's method:, e.g. vaccine+sft+antidote."
    ),
    judge_model: str = typer.Option(None, "--judge-model", help=JUDGE_MODEL_HELP),
) -> None:
    """Align -> fine-tune -> (SafeLoRA / RESTA) -> Antidote -> evaluate, with the chosen defences."""
    from robustlab.antidote.baselines_pipeline import load_method_config
    from robustlab.antidote.pipeline import with_judge_model

    mcfg = load_method_config(config, {"method": method} if method else None)
    with_judge_model(mcfg.pipeline, judge_model)
    out = out or Path("runs") / "antidote" / config.stem
    from robustlab.antidote.cli_common import quiet_transformers

    quiet_transformers()
    from robustlab.antidote.baselines_pipeline import run_method_pipeline

    summary = run_method_pipeline(mcfg, out, echo=typer.echo)
    typer.echo(summary["table"])
    typer.echo(f"run folder: {out}")
