"""``robustlab antidote``: bad inputs give one line and exit 2 with nothing written; light imports; a real run."""

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
