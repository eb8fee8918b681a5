"""SSL-FL data (the paper's Retina and COVID-FL folders) as a federated task: the clients are the split's
client files (natural partitions), reachable from ``robustlab fedld run --dataset sslfl --data-dir DIR``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from robustlab.errors import UserError
from robustlab.fedld.task import TaskSpec, load_task

RETINA_CLIENTS = [
    [0, 1, 0, 1, 0, 1, 0, 1],
    [0, 0, 0, 0, 0, 1],
    [1, 1, 1, 1, 1, 0, 0],
    [0, 1] * 4,
    [1] * 6 + [0] * 2,
]
COVID_SOURCES = ["bimcv", "cohen", "eurorad", "gz", "ml-workgroup", "ricord_c"] + [
    f"rsna-{i}" for i in range(5)
]
COVID_SOURCES.append("sirm")


def make_layout(root, clients: list[list[int]], split: str, names: list[str] | None = None, classes: int = 2):
    """An SSL-FL folder: train/ and test/ .npy images (float 0..255, 40 px), labels.csv, test.csv and
    <n>_clients/<split>/<client>.csv; returns the label counts per client (from the lists given)."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    folder = root / f"{len(clients)}_clients" / split
    folder.mkdir(parents=True)
    labels, k = {}, 0
    for c, ys in enumerate(clients):
        rows = []
        for y in ys:
            name = f"tr{k}.npy"
            np.save(root / "train" / name, rng.uniform(0, 255, size=(40, 40, 3)) * 0.5 + 60 * y)
            labels[name], k = y, k + 1
            rows.append(name)
        stem = names[c] if names else f"client_{c + 1}"
        (folder / f"{stem}.csv").write_text("".join(f"{r}\n" for r in rows))
    for i in range(3 * classes):
        np.save(root / "test" / f"te{i}.npy", rng.uniform(0, 255, size=(40, 40, 3)))
        labels[f"te{i}.npy"] = i % classes
    (root / "labels.csv").write_text("filename,label\n" + "".join(f"{a},{b}\n" for a, b in labels.items()))
    (root / "test.csv").write_text("".join(f"te{i}.npy\n" for i in range(3 * classes)))
    return [np.bincount(ys, minlength=classes).tolist() for ys in clients]


def test_retina_split_gives_the_client_files_as_partitions(tmp_path):
    counts = make_layout(tmp_path / "Retina", RETINA_CLIENTS, "split_2")
    spec = TaskSpec("sslfl", str(tmp_path / "Retina"), 5, sslfl_split="split_2", image_size=32)
    task = load_task(spec)
    assert task.x_train.shape[1:] == (3, 32, 32) and task.num_classes == 2
    # 10% of train is held out (stratified) for validation; what stays is each client's own files
    got = [np.bincount(task.y_train.numpy()[p], minlength=2) for p in task.partitions]
    assert sum(int(g.sum()) for g in got) + len(task.y_val) == sum(map(sum, counts))
    for g, want in zip(got, counts, strict=True):
        assert np.all(g <= want) and g.sum() >= sum(want) - 2
    with pytest.raises(UserError, match="has 5 clients, not 4; pass --clients 5"):
        load_task(TaskSpec("sslfl", str(tmp_path / "Retina"), 4, sslfl_split="split_2"))
    with pytest.raises(UserError, match="needs --data-dir"):
        load_task(TaskSpec("sslfl", None, 5))


def test_covid_fl_real_split_has_twelve_natural_clients(tmp_path):
    clients = [[i % 3, (i + 1) % 3, (i + 2) % 3, i % 3] for i in range(12)]
    make_layout(tmp_path / "COVID-FL", clients, "split_real", names=COVID_SOURCES, classes=3)
    task = load_task(TaskSpec("sslfl", str(tmp_path / "COVID-FL"), 12, sslfl_split="split_real"))
    assert len(task.partitions) == 12 and task.num_classes == 3 and task.x_train.shape[-1] == 40


@pytest.mark.integration
@pytest.mark.slow
def test_cli_runs_a_round_on_an_sslfl_folder(tmp_path):
    pytest.importorskip("flwr.simulation")
    from robustlab.cli import main as cli_main

    make_layout(tmp_path / "Retina", RETINA_CLIENTS, "split_1")
    out = tmp_path / "run"
    rc = cli_main(
        ["fedld", "run", "--dataset", "sslfl", "--data-dir", str(tmp_path / "Retina"), "--clients", "5",
         "--methods", "fedavg", "--rounds", "1", "--image-size", "32", "--batch-size", "4", "--out", str(out)]
    )  # fmt: skip
    assert rc in (0, None)
    cell = json.loads((out / "cells" / "method=fedavg__seed=0.json").read_text())
    task = load_task(TaskSpec("sslfl", str(tmp_path / "Retina"), 5, image_size=32))
    assert cell["label_counts"] == [
        np.bincount(task.y_train.numpy()[p], minlength=2).tolist() for p in task.partitions
    ]
    assert [h["round"] for h in cell["history"]] == [0, 1] and cell["history"][1]["train"]["replies"] == 5
