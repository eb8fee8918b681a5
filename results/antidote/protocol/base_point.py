"""The harmful score of the base model before alignment, on the pilot's prompts and judges (issue 15): a
diagnostic of the alignment stage, not a choice (nothing is chosen from it; Antidote is not computed).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python results/antidote/protocol/base_point.py

Writes ``pilot/<model>/base_seed<seed>.json``: config, versions, every measure and every answer, evaluated
exactly as the pipeline evaluates the aligned point (same slices, greedy, same settings) except that the
SST-2 rows are skipped (the base model's task accuracy is not in question).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def main() -> None:
    import yaml

    from robustlab.antidote.baselines_pipeline import load_method_config
    from robustlab.antidote.cli_common import quiet_transformers
    from robustlab.antidote.evaluate import EvalSettings, evaluate_model
    from robustlab.antidote.models import load_model
    from robustlab.antidote.pipeline import make_judges, pipeline_data
    from robustlab.antidote.protocol import cell_overrides
    from robustlab.runs import atomic_write_json, environment_info, seed_everything, to_jsonable

    torch.set_num_threads(1)
    quiet_transformers()
    settings = yaml.safe_load((HERE / "pilot.yaml").read_text(encoding="utf-8"))
    model_name = settings.pop("model")
    settings.pop("candidates", None)
    seed = int(settings.get("seed", 0))
    cfg = load_method_config(None, cell_overrides(settings, "sft", None, None, seed)).pipeline
    data = pipeline_data(cfg)
    seed_everything(seed)
    judges = make_judges(
        ["refusal", "embedding", "minilm-ft"], cfg.data.data_dir, ROOT / "runs" / "protocol", seed
    )  # the embedding judge the pilot cells were scored with (runs/protocol/embedding_judge.json)
    ev = cfg.evaluate
    model, tokenizer = load_model(cfg.base, trust_remote_code=cfg.trust_remote_code)
    t = time.perf_counter()
    m = evaluate_model(
        model,
        tokenizer,
        cfg.data.task,
        data.eval_harmful,
        [],
        data.heldout_harmful,
        judges,
        EvalSettings(
            ev.max_new_tokens_harmful, ev.max_new_tokens_task, ev.batch_size, ev.max_prompt, ev.max_length
        ),
        keep_outputs=len(data.eval_harmful),
    )
    m["answers_harmful"] = m.pop("samples_harmful", [])
    m.pop("samples_task", None)
    row = {
        "stage": "base",
        **m,
        "n_eval_harmful": len(data.eval_harmful),
        "seconds": round(time.perf_counter() - t, 2),
        "config": to_jsonable(asdict(cfg)),
        "env": environment_info(seed),
    }
    out = HERE / "pilot" / model_name / f"base_seed{seed}.json"
    atomic_write_json(out, row)
    print(
        f"base: HS embedding {row['hs_embedding']:.1f}, minilm-ft {row['hs_minilm-ft']:.1f}, refusal "
        f"{row['hs_refusal']:.1f} ({row['n_eval_harmful']} prompts, {row['seconds']:.0f} s) -> {out.relative_to(ROOT)}"
    )


if __name__ == "__main__":
    main()
