"""The committed cells in results/fedld are reproduced by today's code: a short rerun of one committed cell's
settings gives the same accuracies, round by round, as the committed history, and the same losses and AUCs
to float32 rounding. (Not bit for bit: on a different host CPU the float32 kernels round differently; the
committed round-0 loss already differs in the 7th digit, and the difference grows with training.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flwr.simulation")
pytest.importorskip("ray")

from robustlab.fedld.experiment import ExperimentConfig, run_experiment

RESULTS = Path(__file__).resolve().parents[2] / "results" / "fedld"
FOLDER = RESULTS / "pneumoniamnist_balanced_beta0.5"
ROUNDS = 2


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedld", "fedavg"])
def test_committed_cell_first_rounds_are_reproduced(method, shared_data, tmp_path):
    data_dir = shared_data / "medmnist"
    if not (data_dir / "pneumoniamnist_balanced.npz").is_file():
        pytest.skip("pneumoniamnist_balanced.npz not staged")
    committed = json.loads((FOLDER / "cells" / f"method={method}__seed=0.json").read_text())["history"]
    cfg = yaml.safe_load((FOLDER / "config.yaml").read_text())
    keep = {k: v for k, v in cfg.items() if k in ExperimentConfig.__dataclass_fields__}
    keep.update(data_dir=str(data_dir), methods=[method], rounds=ROUNDS, seeds=1, first_seed=0)
    run_experiment(ExperimentConfig(**keep), tmp_path / "rerun", echo=lambda _m: None)
    rerun = json.loads((tmp_path / "rerun" / "cells" / f"method={method}__seed=0.json").read_text())[
        "history"
    ]
    assert [h["round"] for h in rerun] == list(range(ROUNDS + 1))
    for a, b in zip(rerun, committed[: ROUNDS + 1], strict=True):
        for split in ("val", "test"):
            for key in ("accuracy", "balanced_accuracy"):
                assert a[split][key] == b[split][key], (a["round"], split, key)
            for key in ("loss", "auc"):
                assert a[split][key] == pytest.approx(b[split][key], rel=1e-3), (a["round"], split, key)
        if method == "fedld" and a["round"] > 0:
            assert a["diagnostics"]["update-ratio"] == pytest.approx(
                b["diagnostics"]["update-ratio"], rel=1e-3
            )


def test_committed_folders_still_resume_with_todays_defaults():
    """Keys added since a folder was written (model, pretrained, image size, weights, SSL-FL split) do not
    block resuming it when the run asks for their defaults, which every earlier run used."""
    from dataclasses import asdict

    from robustlab.fedld.experiment import RESUME_KEYS, _resume_keys

    for folder in sorted(f for f in RESULTS.glob("*_beta*") if (f / "config.yaml").is_file()):
        old = yaml.safe_load((folder / "config.yaml").read_text())
        keep = {k: v for k, v in old.items() if k in ExperimentConfig.__dataclass_fields__}
        new = asdict(ExperimentConfig(**keep))
        keys = _resume_keys(folder, new)
        assert all(k in old for k in keys), (folder.name, [k for k in keys if k not in old])
        assert all(old[k] == new[k] for k in keys), folder.name
        assert set(RESUME_KEYS) - set(keys) <= {
            "pretrained",
            "image_size",
            "weights",
            "sslfl_split",
            "fedpac_lambda",
        }
