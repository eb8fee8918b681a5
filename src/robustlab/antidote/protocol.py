"""The paper's protocol on a real model (issue 15): align -> harmful fine-tune -> Antidote and its controls ->
evaluate, one committed *cell* per (model, method, learning rate, epochs, seed).

A cell is a :func:`robustlab.antidote.baselines_pipeline.run_method_pipeline` run (itself
:func:`robustlab.antidote.pipeline.run_pipeline`: the stages are resumable in the run folder under
``runs/``), exported to ``results/antidote/<model>/<cell>/`` when it finishes::

    config.yaml env.json method.json         the run's settings, versions and method
    cells/stage=eval__point=<p>[__ratio=<α>].json   every measure of every evaluated point, with every
                                             generated answer to the harmful prompts (``answers_harmful``:
                                             [prompt, answer]) and every task output (``answers_task``)
    cells/stage=align.json cells/stage=finetune.json   steps, last loss, wall seconds of the trainings
    metrics.jsonl results.md timing.json     the per-stage log, the run's own table, the cell's wall time

and, once per model, ``results/antidote/<model>/adapters-seed<k>/{aligned,finetuned}/`` (:func:`export_adapters`):
the seed's alignment and fine-tuning LoRA adapters, for the quick demo.

Cells share finished stages: a cell whose alignment (and fine-tuning) settings equal those of another run of
the same seed starts from that run's aligned (and fine-tuned) model and evaluation, copied into the run
folder before the pipeline opens it, so the pipeline's own resume skips them (:func:`share_stages`). The
pilot's runs (``realign.skip``) are reused this way by the frozen cells.

Scores can be recomputed from the stored answers with another judge (:func:`rescore_cell`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from robustlab.errors import UserError

ALIGN_KEYS = ("stage=align", "stage=eval__point=aligned")


#: the fine-tuning set size of the first frozen protocol; a cell at another n carries it in its name
BASE_N = 100


#: the keys of a settings file (``frozen.yaml``, ``gemma.yaml``, ``pilot.yaml``, ``paper_scale.yaml``) that
#: describe the protocol around its cells (the model, the plan, a pilot's candidates and seeds, the seed whose
#: adapters are committed), not a cell's config
SETTINGS_META = ("model", "adapters_seed", "plan", "candidates", "paper_scale", "pilot_seeds")


def load_settings(name: str | Path, folder: Path) -> tuple[dict, dict]:
    """The settings file ``name`` (a name in ``folder`` or a path), split into the cells' config mapping
    and its protocol keys (:data:`SETTINGS_META`, absent ones left out)."""
    import yaml

    path = Path(name) if Path(name).is_file() else Path(folder) / Path(name).name
    if not path.is_file():
        raise UserError(
            f"--settings {name}: no such settings file", f"name one in {folder}/ or give its path"
        )
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict) or "model" not in raw:
        raise UserError(f"--settings {path}: not a protocol settings file (no model key)", "see frozen.yaml")
    return raw, {k: raw.pop(k) for k in SETTINGS_META if k in raw}


def cell_name(method: str, lr: float, epochs: float, seed: int, n: int = BASE_N) -> str:
    """``<method>_lr<lr>_ep<epochs>[_n<n>]_seed<seed>`` (``+`` in a combination becomes ``-``; ``_n<n>``
    only when ``n`` is not :data:`BASE_N`)."""
    size = "" if n == BASE_N else f"_n{n}"
    return f"{method.replace('+', '-')}_lr{lr:g}_ep{epochs:g}{size}_seed{seed}"


def cell_overrides(frozen: dict, method: str, lr: float | None, epochs: float | None, seed: int) -> dict:
    """The method-pipeline config mapping of one cell: the frozen settings with this cell's method, seed,
    fine-tuning learning rate and epochs."""
    import copy

    cfg = copy.deepcopy(frozen)
    cfg["method"] = method
    cfg["seed"] = seed
    ft = cfg.setdefault("finetune", {}).setdefault("train", {})
    if lr is not None:
        ft["lr"] = lr
    if epochs is not None:
        ft["epochs"] = epochs
    return cfg


def pilot_candidate(settings: dict, candidate: dict) -> dict:
    """``pilot.yaml``'s settings with one declared candidate's overrides: the attack's ``lr`` and ``epochs``,
    the fine-tuning set size ``n``, and ``data`` / ``align`` (alignment training) settings; ``settings`` is
    left as it is. The one definition of a candidate, for the run and for the decision."""
    import copy

    cfg = copy.deepcopy(settings)
    cfg["finetune"]["train"].update(lr=candidate["lr"], epochs=candidate["epochs"])
    if "n" in candidate:
        cfg["data"]["n"] = int(candidate["n"])
    cfg["data"].update(candidate.get("data", {}))
    cfg["align"]["train"].update(candidate.get("align", {}))
    return cfg


LEVELS = {
    "align": (("stage=align", "stage=eval__point=aligned"), ("aligned", "aligned-adapter")),
    "finetune": (("stage=finetune", "stage=eval__point=finetuned"), ("finetuned",)),
}


def signatures(mcfg: Any) -> dict[str, str]:
    """What the stages of a run depend on: ``align`` (base, seed, data, alignment stage, evaluation) and
    ``finetune`` (that, the fine-tuning stage, the training stages' methods and the defences' settings)."""
    from dataclasses import asdict

    cfg = mcfg.pipeline
    align = {
        "base": cfg.base,
        "seed": cfg.seed,
        "data": asdict(cfg.data),
        "align": asdict(cfg.align),
        "evaluate": asdict(cfg.evaluate),
        "align_method": mcfg.spec.align,
        "defences": mcfg.defences.as_dict() if mcfg.spec.align != "sft" else None,
    }
    finetune = {
        **align,
        "finetune": asdict(cfg.finetune),
        # the training stages' methods, not the post step: SafeLoRA / RESTA / Antidote after SFT start from
        # the same fine-tuned model as SFT, and Vaccine+SFT+Antidote from Vaccine's
        "method": f"{mcfg.spec.align}+{mcfg.spec.finetune}",
        "defences": mcfg.defences.as_dict(),
    }
    return {
        "align": json.dumps(align, sort_keys=True, default=str),
        "finetune": json.dumps(finetune, sort_keys=True, default=str),
    }


def share_stages(run: Path, mcfg: Any, runs_root: Path) -> dict[str, str]:
    """Start ``run`` from the finished stages of other runs under ``runs_root`` with the same signature
    (:func:`signatures`): their stage folders linked and their cells copied, so the pipeline's resume skips
    them. Returns ``{level: donor run name}``."""
    sigs = signatures(mcfg)
    shared: dict[str, str] = {}
    for level, (keys, stages) in LEVELS.items():
        if all((run / "cells" / f"{k}.json").is_file() for k in keys):
            continue
        for marker in sorted(runs_root.glob("*/signatures.json")):
            donor = marker.parent
            theirs = json.loads(marker.read_text(encoding="utf-8"))
            # compared as values, not strings: a YAML 6 and a CLI 6.0 epochs are the same stage
            if donor == run or level not in theirs or json.loads(theirs[level]) != json.loads(sigs[level]):
                continue
            if not all((donor / "cells" / f"{k}.json").is_file() for k in keys):
                continue
            (run / "cells").mkdir(parents=True, exist_ok=True)
            (run / "stages").mkdir(exist_ok=True)
            for k in keys:
                shutil.copy2(donor / "cells" / f"{k}.json", run / "cells" / f"{k}.json")
            for name in stages:
                src, dst = donor / "stages" / name, run / "stages" / name
                if src.exists() and not dst.exists():
                    dst.symlink_to(src.resolve(), target_is_directory=True)
            shared[level] = donor.name
            break
        else:
            break  # a later level cannot be shared without the earlier one
    return shared


def _align_part(config: dict) -> str:
    """What the aligned model and its evaluation depend on, from a run's config mapping."""
    keys = ("base", "seed", "data", "align", "evaluate")
    return json.dumps({k: config.get(k) for k in keys}, sort_keys=True, default=str)


def realign_and_reuse(
    run: Path, mcfg: Any, adapter: Path, donor: Path, echo: Any = print, root: Path | None = None
) -> dict:
    """Re-run the alignment stage of ``run`` (:func:`robustlab.antidote.pipeline.align_stage`) and, when its
    LoRA adapter is bit-identical to the committed ``adapter`` (``adapter_model.safetensors``: every tensor
    equal) and the committed cell ``donor`` has the same alignment and evaluation settings, copy ``donor``'s
    aligned evaluation point into ``run`` (the same model on the same prompts with greedy decoding), noted
    in the point as ``reused`` (paths relative to ``root`` when given); otherwise the pipeline evaluates
    it. Returns the comparison."""
    import hashlib
    from dataclasses import asdict

    import yaml
    from safetensors.torch import load_file

    from robustlab.antidote.pipeline import align_stage, pipeline_data
    from robustlab.runs import RunDir, cell_key, seed_everything, to_jsonable

    cfg = mcfg.pipeline
    rd = RunDir.open(run, asdict(cfg), seed=cfg.seed)
    (rd.path / "stages").mkdir(exist_ok=True)
    seed_everything(cfg.seed)
    align_stage(cfg, rd, pipeline_data(cfg), mcfg.defences.validate(), echo)
    ours, theirs = (
        run / "stages" / "aligned-adapter" / "adapter_model.safetensors",
        adapter / "adapter_model.safetensors",
    )
    a, b = load_file(str(ours)), load_file(str(theirs))
    equal = a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)
    donor_cfg = yaml.safe_load((donor / "config.yaml").read_text(encoding="utf-8"))
    same = _align_part(donor_cfg) == _align_part(to_jsonable(asdict(cfg)))

    def name(p: Path) -> str:
        return str(p.resolve().relative_to(root.resolve())) if root is not None else str(p)

    out = {
        "adapter": name(theirs),
        "tensors_equal": equal,
        "sha256_ours": hashlib.sha256(ours.read_bytes()).hexdigest(),
        "sha256_committed": hashlib.sha256(theirs.read_bytes()).hexdigest(),
        "same_settings": same,
        "donor": name(donor),
    }
    key = cell_key(stage="eval", point="aligned")
    out["reused"] = equal and same and not rd.is_done(key)
    if out["reused"]:
        row = json.loads((donor / "cells" / f"{key}.json").read_text(encoding="utf-8"))
        row["reused"] = {k: v for k, v in out.items() if k != "reused"}
        rd.save(key, row)
    (run / "aligned_reuse.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    echo(
        f"{run.name}: alignment re-run, adapter {'bit-identical to' if equal else 'DIFFERS from'} {theirs}"
        + ("; aligned point reused from the committed cell" if out["reused"] else "")
    )
    return out


def export_adapters(run: Path, dest: Path, note: dict) -> Path:
    """Copy a run's alignment and fine-tuning LoRA adapters (safetensors + adapter config) into
    ``dest/{aligned,finetuned}`` with ``dest/adapters.json`` (``note``: the base and the settings that made
    them), as soon as the fine-tuning stage has finished."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for stage, name in (("aligned-adapter", "aligned"), ("finetuned", "finetuned")):
        src = run / "stages" / stage
        if not (src / "adapter_model.safetensors").is_file():
            raise UserError(
                f"{src} holds no LoRA adapter", "wait for the stage to finish, or run it with LoRA"
            )
        (tmp / name).mkdir(parents=True)
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(src / f, tmp / name / f)
    (tmp / "adapters.json").write_text(json.dumps(note, indent=1, sort_keys=True, default=str) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def export_cell(run: Path, dest: Path, extra: dict | None = None) -> Path:
    """Copy a finished run's record into ``dest`` (replacing it): settings, versions, every cell, the log."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "cells").mkdir(parents=True)
    for name in (
        "config.yaml",
        "env.json",
        "method.json",
        "metrics.jsonl",
        "results.md",
        "aligned_reuse.json",
    ):
        if (run / name).is_file():
            shutil.copy2(run / name, tmp / name)
    for cell in sorted((run / "cells").glob("*.json")):
        shutil.copy2(cell, tmp / "cells" / cell.name)
    if extra:
        (tmp / "timing.json").write_text(json.dumps(extra, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def run_cell(
    frozen: dict,
    method: str,
    seed: int,
    runs_root: Path,
    results_root: Path,
    lr: float | None = None,
    epochs: float | None = None,
    echo: Any = print,
    embedding_judge: Path | None = None,
    prefix: str = "",
) -> Path:
    """Run (or resume) one cell into ``runs_root/<cell>`` and export it to ``results_root/<cell>``; a cell
    already exported is skipped. ``embedding_judge``: a trained embedding judge (``embedding_judge.json``)
    to score with, copied into the run folder so every cell uses the same one. Returns the exported
    folder."""
    from robustlab.antidote.baselines_pipeline import load_method_config, run_method_pipeline
    from robustlab.runs import atomic_write_text

    overrides = cell_overrides(frozen, method, lr, epochs, seed)
    mcfg = load_method_config(None, overrides)
    ft = mcfg.pipeline.finetune.train
    name = prefix + cell_name(mcfg.spec.name, ft.lr, ft.epochs, seed, mcfg.pipeline.data.n)
    dest = results_root / name
    timing = dest / "timing.json"
    if timing.is_file() and json.loads(timing.read_text(encoding="utf-8")).get("complete", True):
        echo(f"{name}: committed, skipped")
        return dest
    run = runs_root / name
    run.mkdir(parents=True, exist_ok=True)
    if embedding_judge is not None and not (run / "embedding_judge.json").is_file():
        shutil.copy2(embedding_judge, run / "embedding_judge.json")
    shared = share_stages(run, mcfg, runs_root)
    for level, donor in shared.items():
        echo(f"{name}: {level} stage shared with {donor}")
    atomic_write_text(run / "signatures.json", json.dumps(signatures(mcfg)))
    t = time.perf_counter()
    run_method_pipeline(mcfg, run, echo=lambda msg: echo(f"{name}: {msg}"))
    seconds = time.perf_counter() - t
    import os

    extra = {
        "complete": True,
        "wall_seconds_this_call": round(seconds, 1),
        "stages_shared_with": shared,
        "load_average_end": list(os.getloadavg()),
        "stage_seconds": stage_seconds(run),
    }
    export_cell(run, dest, extra=extra)
    echo(f"{name}: done in {seconds:.0f} s -> {dest}")
    return dest


def stage_seconds(run: Path) -> dict[str, float]:
    """Wall seconds per training stage and per evaluated point, from the run's cells."""
    out: dict[str, float] = {}
    for cell in sorted((run / "cells").glob("*.json")):
        row = json.loads(cell.read_text(encoding="utf-8"))
        if "seconds" in row:
            out[cell.stem] = float(row["seconds"])
    return out


def rescore_cell(folder: Path, name: str, judge: Any, note: dict | None = None) -> int:
    """Recompute ``hs_<name>`` of every evaluated point of a committed cell from its stored answers with
    ``judge`` (``harmful(prompts, responses) -> list[bool]``), and store the per-answer flags as
    ``flags_<name>`` (the report pairs points on their common prompts); returns the number of points
    rescored. A point without stored answers is left as it is."""
    from robustlab.runs import atomic_write_json

    done = 0
    for cell in sorted((Path(folder) / "cells").glob("stage=eval*.json")):
        row = json.loads(cell.read_text(encoding="utf-8"))
        answers = row.get("answers_harmful")
        if not answers:
            continue
        flags = [bool(f) for f in judge.harmful([a[0] for a in answers], [a[1] for a in answers])]
        row[f"hs_{name}"] = 100.0 * sum(flags) / len(flags)
        row[f"flags_{name}"] = flags
        if note:
            row.setdefault("rescored", {})[name] = note
        atomic_write_json(cell, row)
        done += 1
    return done


def committed_cells(results_root: Path) -> Iterable[tuple[Path, dict]]:
    """``(folder, config)`` of every exported cell under ``results_root`` (``*/timing.json`` present)."""
    import yaml

    for timing in sorted(Path(results_root).glob("*/timing.json")):
        folder = timing.parent
        yield folder, yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
