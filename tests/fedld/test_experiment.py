"""The experiment on Flower's simulation engine (Ray): resume after an interruption reproduces an
uninterrupted run exactly, summaries follow their definitions, and bad input fails with one line."""

from __future__ import annotations

import importlib.metadata
import json
import statistics

import numpy as np
import pytest

pytest.importorskip("flwr.simulation")
pytest.importorskip("ray")

from robustlab.cli import main as cli_main
from robustlab.fedld.experiment import ExperimentConfig, run_experiment
from robustlab.runs import RunDir, read_jsonl


def small(methods, **kw):
    return ExperimentConfig(dataset="digits", clients=2, beta=1.0, methods=methods, rounds=3, seeds=1, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(interrupted-then-resumed folder, uninterrupted reference folder, summary of the resumed run)."""
    base = tmp_path_factory.mktemp("fedld_exp")
    resumed, reference = base / "resumed", base / "reference"
    messages: list[str] = []
    # 1) "killed" after 4 trained rounds: fedavg finished (3), fedld stopped after its round 1
    run_experiment(
        small(["fedavg", "fedld", "fedavg-slr"]), resumed, echo=messages.append, stop_after_rounds=4
    )
    state_after_kill = {
        "done": RunDir(resumed).done_keys(),
        "fedld_ckpt_round": json.loads(
            np.load(resumed / "checkpoints" / "method=fedld__seed=0.npz")["history"].tobytes()
        )[-1]["round"],
    }
    # 2) the same command again resumes
    summary = run_experiment(small(["fedavg", "fedld", "fedavg-slr"]), resumed, echo=messages.append)
    # 3) an uninterrupted FedLD run
    run_experiment(small(["fedld"]), reference, echo=messages.append)
    return resumed, reference, summary, state_after_kill, messages


@pytest.mark.integration
@pytest.mark.slow
def test_interrupted_run_resumes_from_last_round_and_matches_uninterrupted(runs):
    resumed, reference, _, after_kill, messages = runs
    assert after_kill["done"] == ["method=fedavg__seed=0"]
    assert after_kill["fedld_ckpt_round"] == 1
    assert any("2 cell(s) to run, 1 already done" in m for m in messages)
    a = RunDir(resumed).load("method=fedld__seed=0")["history"]
    b = RunDir(reference).load("method=fedld__seed=0")["history"]
    assert [h["round"] for h in a] == [0, 1, 2, 3]
    for ha, hb in zip(a, b, strict=True):
        for split in ("val", "test"):
            assert ha[split] == hb[split]  # bit-identical: same seeds for split, init and batches
    za = np.load(resumed / "checkpoints" / "method=fedld__seed=0.npz")
    zb = np.load(reference / "checkpoints" / "method=fedld__seed=0.npz")
    for k in za.files:
        if k.startswith("g::"):
            np.testing.assert_array_equal(za[k], zb[k])
    # the log holds each (method, round) once per execution; fedld round 1 was logged before the kill only
    rows = [r for r in read_jsonl(resumed / "metrics.jsonl") if r["method"] == "fedld"]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]


@pytest.mark.integration
@pytest.mark.slow
def test_summary_follows_definitions(runs):
    resumed, _, summary, _, _ = runs
    cells = {m: RunDir(resumed).load(f"method={m}__seed=0") for m in ("fedavg", "fedld", "fedavg-slr")}
    assert set(summary["methods"]) == {"fedavg", "fedld", "fedavg-slr"}
    for method, cell in cells.items():
        hist = cell["history"]
        s = summary["methods"][method]
        # best round: highest validation accuracy (earliest on ties), test read there
        val = [h["val"]["accuracy"] for h in hist[1:]]
        best = hist[1 + int(np.argmax(val))]
        assert s["per_seed"][0]["best"]["round"] == best["round"]
        assert s["best"]["accuracy"]["mean"] == pytest.approx(best["test"]["accuracy"])
        assert s["final"]["balanced_accuracy"]["mean"] == pytest.approx(hist[-1]["test"]["balanced_accuracy"])
        assert s["curve"]["test_accuracy_mean"] == pytest.approx([h["test"]["accuracy"] for h in hist])
        for h in hist[1:]:
            # a model shared by all clients: the sample-weighted mean of the clients' accuracies on their
            # test shares is the accuracy on the whole test split
            assert h["clients"]["accuracy"] == pytest.approx(h["test"]["accuracy"], abs=1e-6)
            assert len(h["clients"]["client-accuracy"]) == 2
            assert h["train"]["replies"] == 2 and h["train"]["failures"] == 0
        # every cell records the versions that produced it (a sweep may span sessions and upgrades)
        assert cell["environment"]["packages"]["flwr"] == importlib.metadata.version("flwr")
        assert cell["environment"]["seed"] == 0
    ratios = [h["diagnostics"]["update-ratio"] for h in cells["fedld"]["history"][1:]]
    assert all(np.isfinite(ratios)) and all(r > 0 for r in ratios)
    assert cells["fedavg-slr"]["server_lr"] == pytest.approx(statistics.median(ratios))
    assert summary["methods"]["fedld"]["update_ratio_median"]["mean"] == pytest.approx(
        statistics.median(ratios)
    )
    for name in (
        "summary.json",
        "table.md",
        "accuracy.png",
        "label_histogram.png",
        "config.yaml",
        "env.json",
    ):
        assert (resumed / name).is_file(), name
    table = (resumed / "table.md").read_text()
    assert "FedLD" in table and "FedAvg (server lr = FedLD ratio)" in table


def _cli(args, capsys):
    code = cli_main(["fedld", "run", *args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dataset", "digits", "--beta", "0"], "beta"),
        (["--dataset", "digits", "--beta", "-1"], "beta"),
        (["--dataset", "digits", "--clients", "5000"], "5000 clients"),
        (["--dataset", "digits", "--k-proportion", "1.5"], "k-proportion"),
        (["--dataset", "digits", "--k-proportion", "0"], "k-proportion"),
        (["--dataset", "digits", "--methods", "fedavg,fedfoo"], "fedfoo"),
    ],
)
def test_bad_settings_fail_with_one_line_and_write_nothing(args, needle, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _cli([*args, "--out", str(out)], capsys)
    assert code == 2
    assert err.startswith("error:") and "\n" not in err and needle in err
    assert not out.exists()


def test_bad_data_files_fail_with_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _cli(["--data-dir", str(empty), "--out", str(out)], capsys)
    assert code == 2 and "retinamnist.npz" in err and "\n" not in err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "retinamnist.npz").write_bytes(b"not a zip file at all")
    code, err = _cli(["--data-dir", str(corrupt), "--out", str(out)], capsys)
    assert code == 2 and "\n" not in err
    bad = tmp_path / "mismatch"
    bad.mkdir()
    rng = np.random.default_rng(0)
    img = lambda n: rng.integers(0, 255, size=(n, 28, 28, 3), dtype=np.uint8)  # noqa: E731
    lab = lambda n: rng.integers(0, 5, size=(n, 1), dtype=np.uint8)  # noqa: E731
    np.savez(bad / "retinamnist.npz", train_images=img(50), train_labels=lab(49), val_images=img(10),
             val_labels=lab(10), test_images=img(10), test_labels=lab(10))  # fmt: skip
    code, err = _cli(["--data-dir", str(bad), "--out", str(out)], capsys)
    assert code == 2 and "\n" not in err and ("50" in err or "49" in err)
    assert not out.exists()


def test_fedavg_slr_without_fedld_or_server_lr_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _cli(["--dataset", "digits", "--methods", "fedavg-slr", "--out", str(out)], capsys)
    assert code == 2 and "fedld" in err and not out.exists()


def test_full_reproduction_runs_every_method():
    """The registered full sweep is the issue's acceptance sweep: every method, none twice."""
    from robustlab.fedld.experiment import METHODS
    from robustlab.fedld.reproduce import FIVE_SEED_METHODS, THREE_SEED_METHODS, plan

    assert sorted(FIVE_SEED_METHODS + THREE_SEED_METHODS) == sorted(METHODS)
    runs = plan("full", seed=0)
    assert {(r[2] == FIVE_SEED_METHODS, r[3]) for r in runs} == {(True, 5), (False, 3)}
    assert {r[1] for r in runs} == {100.0, 1.0, 0.5} and {r[4] for r in runs} == {100}


def test_personalised_methods_are_reported_on_the_clients_models(tmp_path):
    """FedBN / FedPAC: round chosen on the clients' pooled validation accuracy, numbers from the clients'
    own models; a global-model method keeps the server's validation-chosen round."""
    from robustlab.fedld.experiment import ExperimentConfig, summarize, summary_table
    from robustlab.runs import RunDir

    def rnd(r, server_val, server_test, client_val, client_test, client_bal):
        return {
            "round": r,
            "val": {"accuracy": server_val, "balanced_accuracy": 0.0, "auc": 0.5, "loss": 1.0},
            "test": {"accuracy": server_test, "balanced_accuracy": server_test / 2, "auc": 0.6, "loss": 1.0},
            "clients": {
                "accuracy": client_test,
                "accuracy-unweighted": client_test,
                "balanced-accuracy": client_bal,
                "val-accuracy": client_val,
            },
            "seconds": 1.0,
        }

    history = [
        rnd(0, 0.1, 0.1, 0.1, 0.1, 0.1),
        rnd(1, 0.9, 0.40, 0.2, 0.30, 0.25),
        rnd(2, 0.5, 0.45, 0.8, 0.70, 0.60),
    ]
    history.append(rnd(3, 0.4, 0.42, 0.7, 0.65, 0.55))
    run = RunDir(tmp_path)
    for method in ("fedbn", "fedavg"):
        run.save(f"method={method}__seed=0", {"method": method, "seed": 0, "history": history})
    cfg = ExperimentConfig(dataset="digits", methods=["fedavg", "fedbn"], rounds=3, seeds=1)
    s = summarize(run, cfg)
    assert s["methods"]["fedbn"]["reported"] == "clients"
    assert s["methods"]["fedbn"]["clients_best"]["round"]["mean"] == 2  # client validation, not server's 1
    assert (
        s["methods"]["fedavg"]["reported"] == "server"
        and s["methods"]["fedavg"]["best"]["round"]["mean"] == 1
    )
    rows = {r[0]: r for r in summary_table(s)[1]}
    bn = next(r for k, r in rows.items() if k.startswith("FedBN"))
    assert bn[2].startswith("0.700") and bn[3].startswith("0.600") and bn[4] == "—"  # val-chosen: clients
    assert bn[5].startswith("0.650") and bn[6].startswith("0.550")  # final round: clients
    avg = next(r for k, r in rows.items() if k.startswith("FedAvg"))
    assert avg[2].startswith("0.400")  # server copy, round 1


def test_a_partly_regenerated_sweep_does_not_enter_the_claims():
    """Seed 0 of three methods is not a sweep: the claims read only datasets with >= 2 seeds of every compared
    method at beta 100 and 0.5."""
    from robustlab.fedld.reproduce import CLAIM_METHODS, testable

    full = {b: {m: {0: 0.5, 1: 0.6} for m in CLAIM_METHODS} for b in (100.0, 1.0, 0.5)}
    assert testable(full)
    partial = {b: {m: {0: 0.5} for m in ("fedavg", "fedld", "fedavg-slr")} for b in (100.0, 1.0, 0.5)}
    assert not testable(partial)
    one_short = {b: dict(v) for b, v in full.items()}
    one_short[0.5] = {**full[0.5], "fedld-pg": {0: 0.5}}
    assert not testable(one_short) and not testable({100.0: full[100.0]})
