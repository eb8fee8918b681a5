"""``robustlab antidote``: re-align your own fine-tuned model, run the whole pipeline, or the offline demo.

Module-level imports stay light (no torch / transformers): ``robustlab --help`` imports every sub-app.
"""

from __future__ import annotations

from pathlib import Path

import typer

from robustlab.antidote.cli_common import quiet_transformers
from robustlab.antidote.runtime import (
    Runtime,
    device_map_option,
    device_option,
    dtype_option,
    with_runtime_options,
)
from robustlab.errors import UserError

app = typer.Typer(
    name="antidote",
    help="Antidote (Huang et al., ICML 2025): post-fine-tuning safety re-alignment by one-shot pruning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def realign(
    base: str = typer.Option(
        ...,
        "--base",
        help="Base model: a local folder, a hub id (online), a .gguf file, or a built-in name (see `models`).",
    ),
    adapter: str = typer.Option(
        None, "--adapter", help="The fine-tuning LoRA adapter to re-align (a folder or a hub id)."
    ),
    align_adapter: str = typer.Option(
        None, "--align-adapter", help="An alignment LoRA adapter, merged into the base first."
    ),
    calibration: Path = typer.Option(
        ..., "--calibration", help="JSONL of harmful {prompt, response} rows (the re-alignment set)."
    ),
    mask_ratio: float = typer.Option(..., "--mask-ratio", help="α: fraction of each row to zero, in (0, 1)."),
    out: Path = typer.Option(..., "--out", help="New folder for the re-aligned adapter/model."),
    targets: str = typer.Option(
        "auto", "--targets", help="auto | lora | all-linear | comma-separated module names | a regex."
    ),
    method: str = typer.Option("wanda", "--method", help="wanda (Antidote) | magnitude | random."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration batch size (padding is exact)."),
    max_length: int = typer.Option(2048, "--max-length", help="Calibration tokens per sample."),
    limit: int = typer.Option(None, "--limit", help="Use only the first N calibration rows."),
    seed: int = typer.Option(0, "--seed"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    device: str = device_option(),
    dtype: str = dtype_option(),
    device_map: str = device_map_option(),
) -> None:
    """Re-align a fine-tuned model: Wanda scores on the harmful calibration set, zero the top α per row."""
    from robustlab.antidote.realign import validate_mask_ratio

    runtime = Runtime.resolve(device, dtype, device_map)
    validate_mask_ratio(mask_ratio)
    if not calibration.is_file():
        raise UserError(
            f"calibration file {calibration} does not exist", "pass a JSONL file to --calibration"
        )
    tgt: str | list[str] = targets
    if "," in targets:
        tgt = [t.strip() for t in targets.split(",") if t.strip()]
    quiet_transformers()
    from robustlab.antidote.models import realign_from_paths

    summary = realign_from_paths(
        base,
        adapter,
        align_adapter,
        calibration,
        mask_ratio,
        out,
        targets=tgt,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        method=method,
        limit=limit,
        runtime=runtime,
        trust_remote_code=trust_remote_code,
        log=lambda line: typer.echo(line, err=True),
    )
    typer.echo(
        f"zeroed {summary.get('zeroed')} of {summary.get('params')} target weights "
        f"({100 * summary.get('zeroed_fraction', 0):.2f}%) in {summary.get('modules')} modules; saved to {out}"
    )


@app.command()
def models() -> None:
    """The built-in offline models: licence, whether each is installed and cached, how to install it."""
    from robustlab.antidote.sources import cache_dir, model_table
    from robustlab.report import markdown_table

    columns, rows = model_table()
    typer.echo(markdown_table(columns, rows))
    typer.echo(f"cache folder: {cache_dir()} (set ROBUSTLAB_CACHE to move it)")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/antidote/demo"), "--out", help="Run folder (a rerun resumes)."),
    scale: str = typer.Option("quick", "--scale", help="quick (<= 8 min on 2 cores) or full."),
    seeds: str = typer.Option(None, "--seeds", help="Comma-separated seeds [default: 0,1,2]."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Staged data folder [default: shared/data]."),
    workers: int = typer.Option(2, "--workers", help="Processes for the seeds (one torch thread each)."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    device_map: str = device_map_option(),
) -> None:
    """The offline demo: a tiny from-scratch Llama through align -> attack -> Antidote vs controls."""
    from robustlab.antidote.data import resolve_data_dir
    from robustlab.antidote.runtime import use_runtime

    runtime = Runtime.resolve(device, dtype, device_map)
    if scale not in ("quick", "full"):
        raise UserError(f"unknown scale {scale!r}", "use --scale quick or --scale full")
    seed_list = None
    if seeds:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError as exc:
            raise UserError(
                f"--seeds {seeds!r} is not a list of integers", "pass e.g. --seeds 0,1,2"
            ) from exc
    if workers < 1:
        raise UserError(
            f"--workers must be >= 1, got {workers}", "use 2 on a 2-core machine, 1 to run seeds in turn"
        )
    resolve_data_dir(data_dir)
    quiet_transformers()
    from robustlab.antidote.demo import demo_progress, run_demo
    from robustlab.antidote.tiny import demo_config

    cfg = demo_config(scale)
    cfg.seeds = tuple(seed_list) if seed_list else cfg.seeds
    # a line per finished stage (a bar on a terminal); the runtime reaches the seeds' worker processes too
    with use_runtime(runtime), demo_progress(cfg, out):
        res = run_demo(out, scale, data_dir=data_dir, cfg=cfg, workers=workers, runtime=runtime)
    from robustlab.report import markdown_table

    typer.echo(markdown_table(res["columns"], res["table"]))
    typer.echo(markdown_table(res["paired_columns"], res["paired_table"]))
    typer.echo(f"trade-off plot: {res['figure']}  ({res['seconds']} s)")


judge_app = typer.Typer(
    name="judge",
    help="The validated offline harmful-content judge (minilm-ft): train it once, check it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(judge_app, name="judge")


def _judge_settings(seed: int) -> object:
    from robustlab.antidote.finetuned_judge import FineTuneSettings

    return FineTuneSettings(seed=seed).check()


@judge_app.command("train")
def judge_train(
    data_dir: Path = typer.Option(None, "--data-dir", help="Staged data folder [default: shared/data]."),
    out: Path = typer.Option(
        None, "--out", help="Where to cache the judge [default: $ROBUSTLAB_CACHE/judges/minilm-ft]."
    ),
    report_dir: Path = typer.Option(
        None, "--report-dir", help="Also write judge_report.json/.md here (e.g. results/antidote/judge)."
    ),
    threads: int = typer.Option(
        1, "--threads", help="torch threads (the committed checksum is for 1 thread on torch 2.13 CPU)."
    ),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Fine-tune the MiniLM judge on BeaverTails is_safe labels (split by prompt; epoch and threshold chosen on
    a validation fold of the training split), report its held-out agreement beside the embedding judge,
    always-safe and the refusal matcher, and cache it."""
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}", "use 1 (reproducible) or the core count")
    settings = _judge_settings(seed)
    from robustlab.antidote.embedding_judge import beavertails_dir

    beavertails_dir(data_dir)  # fail before any training
    quiet_transformers()
    import torch

    from robustlab.antidote.finetuned_judge import build_judge, report_markdown
    from robustlab.runs import atomic_write_json, atomic_write_text

    torch.set_num_threads(threads)
    _, report = build_judge(data_dir, out, settings, log=lambda line: typer.echo(line, err=True))
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(report_dir / "judge_report.json", report)
        atomic_write_text(report_dir / "judge_report.md", report_markdown(report))
    h = report["heldout"]
    typer.echo(
        "held-out agreement: "
        + ", ".join(f"{k} {v['agreement']:.3f}" for k, v in h.items())
        + f"; saved to {out or 'the cache'} (sha256 {report['weights_sha256'][:12]})"
    )


@judge_app.command("check")
def judge_check(
    data_dir: Path = typer.Option(None, "--data-dir", help="Staged data folder [default: shared/data]."),
    out: Path = typer.Option(
        None, "--out", help="The cached judge [default: $ROBUSTLAB_CACHE/judges/minilm-ft]."
    ),
) -> None:
    """Re-score the held-out pairs with the cached judge and compare with the agreement it recorded."""
    quiet_transformers()
    from robustlab.antidote.finetuned_judge import check_judge

    got = check_judge(out, data_dir)
    typer.echo(
        f"{got['judge']}: held-out agreement {got['agreement']:.3f} (recorded {got['recorded']:.3f}), "
        f"balanced accuracy {got['balanced_accuracy']:.3f}, AUC {got['auc']:.3f} on {got['n']} pairs; "
        f"weights sha256 {'matches' if got['sha_matches'] else 'differs from'} the record"
    )


# The pipeline command takes a ``method:`` (issue 6's defences, e.g. ``vaccine+sft+antidote``); without one
# it is the plain align -> fine-tune -> re-align -> evaluate pipeline. ``sweep`` is the robustness sweep.
from robustlab.antidote.sweep_cli import method_pipeline, sweep  # noqa: E402

# --device/--dtype/--device-map reach their loading, training and evaluation through use_runtime
app.command(name="pipeline")(with_runtime_options(method_pipeline))
app.command(name="sweep")(with_runtime_options(sweep))
