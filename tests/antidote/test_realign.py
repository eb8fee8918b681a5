"""Antidote re-alignment (Wanda scoring + per-row masking) against plain reference computations.

The references here never call the library's scoring: they run the model one unpadded sequence at a time,
take module inputs from plain PyTorch hooks or from ``output_hidden_states``, compute |W| * sqrt(mean x^2)
with ordinary tensor code, and pick each row's top entries with Python's ``sorted``.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from robustlab.antidote import realign as R
from robustlab.errors import UserError

torch.set_num_threads(1)

VOCAB = 97


# --------------------------------------------------------------------------- tiny models


def tiny(arch: str, seed: int = 0) -> nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "num_hidden_layers": 2, "num_attention_heads": 4}
    if arch == "llama":
        cfg = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
        return T.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = T.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
        return T.Qwen2ForCausalLM(cfg)
    if arch == "mistral":
        cfg = T.MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
        return T.MistralForCausalLM(cfg)
    if arch == "gemma":
        cfg = T.GemmaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, head_dim=8, **common)
        return T.GemmaForCausalLM(cfg)
    if arch == "gpt2":
        cfg = T.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
        )
        return T.GPT2LMHeadModel(cfg)
    if arch == "gpt_neox":
        cfg = T.GPTNeoXConfig(hidden_size=32, intermediate_size=64, **common)
        return T.GPTNeoXForCausalLM(cfg)
    if arch == "opt":
        cfg = T.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        return T.OPTForCausalLM(cfg)
    raise ValueError(arch)


def sequences(seed: int = 1, lengths=(5, 11, 3, 14, 8, 6, 9)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


def pad_batches(seqs, batch_size: int, left: bool, pad_id: int = 0):
    """Plain padding, written here rather than taken from the library."""
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(chunk):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[r, sl] = s
            mask[r, sl] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"


def reference_inputs(model, seqs, names):
    """Module inputs, one unpadded sequence at a time, via plain forward hooks; concatenated over tokens."""
    modules = dict(model.named_modules())
    acts = {n: [] for n in names}
    handles = [
        modules[n].register_forward_hook(
            lambda mod, inp, out, n=n: acts[n].append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
        )
        for n in names
    ]
    model.eval()
    with torch.no_grad():
        for s in seqs:
            model(input_ids=s[None])
    for h in handles:
        h.remove()
    return {n: torch.cat(acts[n]).double() for n in names}


def reference_score(weight: torch.Tensor, x: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """|W_ij| * ||x_j|| with rows = output units (Conv1D weights are stored transposed)."""
    w = weight.detach().double()
    w = w.t() if conv1d else w
    norm = (x**2).mean(dim=0).sqrt()  # sqrt of the mean of x_j^2 over all tokens
    return w.abs() * norm[None, :]


def reference_top(score_rows: torch.Tensor, ratio: float) -> torch.Tensor:
    """The official rule by Python sorting: per row, order the entries by (score, column index) ascending,
    keep the first int(cols * (1 - ratio)) and mark the rest (so equal scores keep the lower index)."""
    rows, cols = score_rows.shape
    keep = int(cols * (1 - ratio))
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        values = score_rows[i].tolist()
        ranked = sorted(range(cols), key=lambda j: (values[j], j))
        for j in ranked[keep:]:
            mask[i, j] = True
    return mask


def rows_view(mask: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return mask.t() if conv1d else mask


# --------------------------------------------------------------------------- per-row counts


@pytest.mark.parametrize(
    ("cols", "ratio", "zeroed"),
    [
        (4096, 0.1, 410),
        (256, 0.1, 26),
        (4096, 0.05, 205),
        (100, 0.3, 30),
        (8, 0.1, 1),
        (10, 0.5, 5),
        (3, 0.01, 1),
    ],
)
def test_zeroed_per_row_matches_official_formula(cols, ratio, zeroed):
    # the brief's worked numbers: lora_A 256x4096 at 0.1 -> ~410 of 4096, lora_B 4096x256 -> ~26 of 256
    assert R.zeroed_per_row(cols, ratio) == zeroed


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 40),
    ratio=st.floats(0.001, 0.999),
    seed=st.integers(0, 10_000),
    axis=st.sampled_from([0, 1]),
)
def test_masks_zero_exactly_the_top_scores_of_each_row(rows, cols, ratio, seed, axis):
    gen = torch.Generator().manual_seed(seed)
    score_rows = torch.rand(rows, cols, generator=gen)
    stored = score_rows if axis == 0 else score_rows.t()
    masks = R.masks_from_scores({"m": stored}, ratio, out_axis={"m": axis})
    got = masks["m"]
    assert got.dtype == torch.bool and got.shape == stored.shape
    got_rows = got if axis == 0 else got.t()
    k = cols - int(cols * (1 - ratio))
    assert got_rows.sum(dim=1).tolist() == [k] * rows
    assert torch.equal(got_rows, reference_top(score_rows, ratio))


def test_tied_scores_keep_the_lower_column_index_as_the_official_code():
    # worked by hand from the official rule (ascending stable sort, keep the first int(5 * 0.6) = 3):
    # row 0 sorts to columns 3, 0, 1, 2, 4 -> 2 and 4 are zeroed; row 1 to 2, 3, 0, 1, 4 -> 1 and 4
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [5.0, 5.0, 1.0, 1.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    expected = torch.tensor(
        [[0, 0, 1, 0, 1], [0, 1, 0, 0, 1], [0, 0, 0, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(R.masks_from_scores({"m": scores}, 0.4)["m"], expected)
    # Conv1D layout: rows are the columns of the stored weight
    got = R.masks_from_scores({"c": scores.t().contiguous()}, 0.4, out_axis={"c": 1})["c"]
    assert torch.equal(got, expected.t())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    cols=st.integers(1, 30),
    levels=st.integers(1, 4),
    ratio=st.floats(0.001, 0.999),
    seed=st.integers(0, 10_000),
)
def test_masks_with_many_ties_equal_the_brute_force_official_rule(rows, cols, levels, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, cols), generator=gen).float()  # few distinct values: many ties
    got = R.masks_for_ratios({"m": scores}, [ratio])[ratio]["m"]
    assert torch.equal(got, reference_top(scores, ratio))


def test_score_tensors_of_all_targets_never_coexist(monkeypatch):
    import gc
    import weakref

    model = tiny("llama")
    live: list[weakref.ref] = []
    real = R.module_score

    def tracked(*args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in live), "an earlier module's scores are still alive"
        out = real(*args, **kwargs)
        live.append(weakref.ref(out))
        return out

    monkeypatch.setattr(R, "module_score", tracked)
    found = R.realign_masks(model, pad_batches(sequences(), 3, left=True), [0.1, 0.3], targets="all-linear")
    assert len(live) == len(R.resolve_targets(model, "all-linear")) == len(found.masks[0.1])
    monkeypatch.undo()  # the reference below holds every score at once, by design
    reference = R.masks_for_ratios(
        R.wanda_scores(model, pad_batches(sequences(), 3, left=True), "all-linear"), [0.1, 0.3]
    )
    for r in (0.1, 0.3):
        for name, mask in found.masks[r].items():
            assert torch.equal(mask, reference[r][name].cpu())


def test_apply_masks_remembers_only_the_zeroed_values_and_restores_exactly():
    model = tiny("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = R.realign_masks(model, None, [0.2], targets="all-linear", method="random", seed=3).masks[0.2]
    pruned = R.apply_masks(model, masks, remember=True)
    for name, mask in masks.items():
        assert pruned.original[name].numel() == int(mask.sum()) == pruned.counts[name]
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    pruned.restore(model)
    for k, v in before.items():
        assert torch.equal(v, model.state_dict()[k])


def test_many_ratios_from_one_score_computation_are_nested_and_equal_single_calls():
    gen = torch.Generator().manual_seed(3)
    scores = {"a": torch.rand(7, 30, generator=gen), "b": torch.rand(5, 9, generator=gen)}
    ratios = [0.05, 0.1, 0.3, 0.7]
    many = R.masks_for_ratios(scores, ratios)
    for r in ratios:
        single = R.masks_from_scores(scores, r)
        for name in scores:
            assert torch.equal(many[r][name], single[name])
    for small, large in itertools.pairwise(ratios):
        for name in scores:
            assert bool((many[small][name] & ~many[large][name]).sum() == 0)


# --------------------------------------------------------------------------- full fine-tuning, Linear and Conv1D


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_realign_zeroes_exactly_the_reference_top_scores(arch):
    model = tiny(arch).double()
    seqs = sequences()
    targets = R.resolve_targets(model, "all-linear")
    assert targets, "all-linear found nothing"
    # lm_head is the output embedding and stays out unless asked
    assert not any(n.endswith("lm_head") for n in targets)
    before = {n: m.weight.detach().clone() for n, m in targets.items()}
    x = reference_inputs(model, seqs, list(targets))
    ratio = 0.2
    result = R.realign(model, pad_batches(seqs, 3, left=True), ratio, targets="all-linear")
    assert result.method == "wanda" and result.mask_ratio == ratio
    for name, module in targets.items():
        conv = is_conv1d(module)
        expected = reference_top(reference_score(before[name], x[name], conv), ratio)
        assert torch.equal(rows_view(result.masks[name], conv), expected), name
        w = module.weight.detach()
        assert torch.all(w[result.masks[name]] == 0)
        assert torch.equal(w[~result.masks[name]], before[name][~result.masks[name]])
        cols = expected.shape[1]
        assert result.counts[name] == expected.shape[0] * (cols - int(cols * (1 - ratio)))
    if arch == "gpt2":
        assert all(is_conv1d(m) for m in targets.values())


def test_scores_equal_hook_free_reference_from_hidden_states():
    """q/k/v_proj see input_layernorm(hidden_state of the layer): no hooks at all in this reference."""
    model = tiny("llama").double().eval()
    seqs = sequences(seed=5)
    scores = R.wanda_scores(model, pad_batches(seqs, 4, left=False), targets=["q_proj", "v_proj"])
    assert set(scores) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    xs = {i: [] for i in range(2)}
    with torch.no_grad():
        for s in seqs:
            hidden = model(input_ids=s[None], output_hidden_states=True).hidden_states
            for i, layer in enumerate(model.model.layers):
                xs[i].append(layer.input_layernorm(hidden[i])[0])
    for i, layer in enumerate(model.model.layers):
        x = torch.cat(xs[i])
        norm = x.pow(2).mean(0).sqrt()
        for p in ("q_proj", "v_proj"):
            w = getattr(layer.self_attn, p).weight
            torch.testing.assert_close(
                scores[f"model.layers.{i}.self_attn.{p}"].double(), w.abs() * norm, rtol=1e-6, atol=0
            )


# --------------------------------------------------------------------------- batch-size invariance with padding


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral", "gemma", "gpt_neox", "opt"])
def test_batched_padded_calibration_equals_batch_size_one(arch):
    model = tiny(arch).double()
    seqs = sequences(seed=7)
    one = R.wanda_scores(model, pad_batches(seqs, 1, left=False), targets="all-linear")
    assert len(one) >= 8
    for left in (False, True):
        batched = R.wanda_scores(model, pad_batches(seqs, 4, left=left), targets="all-linear")
        assert set(batched) == set(one)
        for name in one:
            torch.testing.assert_close(batched.stats[name], one.stats[name], rtol=1e-9, atol=1e-12)
            assert batched.tokens[name] == sum(len(s) for s in seqs)
        for ratio in (0.05, 0.3):
            m1, mb = R.masks_from_scores(one, ratio), R.masks_from_scores(batched, ratio)
            assert all(torch.equal(m1[n], mb[n]) for n in one), (arch, left, ratio)


def test_padding_tokens_do_not_leak_into_statistics():
    """The same sequences padded with a different pad id (and more padding) give the same statistics."""
    model = tiny("llama").double()
    seqs = sequences(seed=9)
    a = R.wanda_scores(model, pad_batches(seqs, 7, left=True, pad_id=0))
    extra = [torch.cat([s]) for s in seqs] + [torch.randint(3, VOCAB, (40,))]
    b_batches = pad_batches(extra, 8, left=True, pad_id=5)
    b_batches[0]["attention_mask"][-1] = 0  # the long row becomes all padding: only pads widened
    b = R.wanda_scores(model, b_batches)
    for n in a:
        torch.testing.assert_close(a.stats[n], b.stats[n], rtol=1e-9, atol=1e-12)


def test_a_mask_with_holes_counts_exactly_its_real_tokens():
    """Masks are normally one run of real tokens per row; one with holes (gathered instead of sliced) gives
    the mean of x^2 over exactly the positions marked 1, read here by plain hooks on the same forward."""
    model = tiny("llama").double().eval()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1]])
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    modules = dict(model.named_modules())
    seen = {}
    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    for h in handles:
        h.remove()
    stats = R.collect_statistics(model, [{"input_ids": ids, "attention_mask": mask}], names)
    for n in names:
        x = seen[n][mask.bool()]
        torch.testing.assert_close(stats.mean_sq[n], (x**2).mean(dim=0), rtol=1e-12, atol=0)
        assert stats.tokens[n] == int(mask.sum())


def test_calibration_stops_each_pass_after_the_last_target_and_keeps_exact_statistics():
    """With only the first layer's q/k/v as targets, every batch after the first stops inside layer 0: the
    last layer's MLP runs once (the first batch decides that each target is called once per pass), and the
    statistics are still those of plain hooks on full forward passes."""
    model = tiny("llama").double().eval()
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    calls = []
    model.model.layers[-1].mlp.register_forward_hook(lambda *_: calls.append(1))
    seqs = sequences(seed=3)
    stats = R.collect_statistics(model, pad_batches(seqs, 2, left=False), names)
    assert len(calls) == 1  # 4 batches; only the first ran to the end
    ref = reference_inputs(model, seqs, names)
    for n in names:
        torch.testing.assert_close(stats.mean_sq[n], (ref[n] ** 2).mean(0), rtol=1e-12, atol=0)


class _TwiceApplied(nn.Module):
    """A target called twice per forward pass (weight sharing): the pass must not be cut after its first
    call, and both calls count."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.shared(torch.tanh(self.shared(self.embed(input_ids)))))


def test_a_target_called_twice_per_pass_counts_both_calls_in_every_batch():
    torch.manual_seed(0)
    model = _TwiceApplied().double()
    seqs = sequences(seed=2)
    inputs = []
    handle = model.shared.register_forward_hook(lambda m, i, o: inputs.append(i[0].reshape(-1, 6)))
    with torch.no_grad():
        for s in seqs:
            model(s[None])
    handle.remove()
    stats = R.collect_statistics(model, pad_batches(seqs, 3, left=False), ["shared"])
    x = torch.cat(inputs)
    assert stats.tokens["shared"] == 2 * sum(len(s) for s in seqs)
    torch.testing.assert_close(stats.mean_sq["shared"], (x**2).mean(0), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- LoRA adapters (peft)


def lora_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    base = tiny("llama", seed).double()
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"], lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; a fine-tuned adapter is not
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def test_lora_adapter_prunes_only_A_and_B_with_reference_masks():
    model = lora_model()
    targets = R.resolve_targets(model, "auto")
    assert len(targets) == 2 * 3 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in targets)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    seqs = sequences(seed=11)
    # hook-free reference: lora_A sees input_layernorm(h); lora_B sees lora_A's output
    ref_x = {}
    with torch.no_grad():
        inner = model.get_base_model()
        per_layer = {i: [] for i in range(2)}
        for s in seqs:
            hidden = model(input_ids=s[None], output_hidden_states=True).hidden_states
            for i, layer in enumerate(inner.model.layers):
                per_layer[i].append(layer.input_layernorm(hidden[i])[0])
        for i, layer in enumerate(inner.model.layers):
            x = torch.cat(per_layer[i])
            for p in ("q_proj", "k_proj", "v_proj"):
                proj = getattr(layer.self_attn, p)
                prefix = f"base_model.model.model.layers.{i}.self_attn.{p}"
                ref_x[f"{prefix}.lora_A.default"] = x
                ref_x[f"{prefix}.lora_B.default"] = x @ proj.lora_A["default"].weight.t()
    before = {n: m.weight.detach().clone() for n, m in targets.items()}
    ratio = 0.25
    result = R.realign(model, pad_batches(seqs, 3, left=True), ratio)
    assert set(result.masks) == set(targets)
    for name in targets:
        expected = reference_top(reference_score(before[name], ref_x[name], False), ratio)
        assert torch.equal(result.masks[name], expected), name
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), f"base weight {n} changed"


def test_lora_targets_require_an_adapter():
    with pytest.raises(UserError, match="no LoRA adapter"):
        R.resolve_targets(tiny("llama"), "lora")


# --------------------------------------------------------------------------- controls


def test_magnitude_control_zeroes_top_abs_weights():
    model = tiny("gpt2").double()
    targets = R.resolve_targets(model, "all-linear")
    before = {n: m.weight.detach().clone() for n, m in targets.items()}
    res = R.realign(model, None, 0.1, targets="all-linear", method="magnitude")
    for name, module in targets.items():
        conv = is_conv1d(module)
        w_rows = before[name].t() if conv else before[name]
        assert torch.equal(rows_view(res.masks[name], conv), reference_top(w_rows.abs(), 0.1))


def test_random_control_is_seeded_has_exact_counts_and_differs_from_wanda():
    seqs = pad_batches(sequences(), 4, left=False)
    a = R.realign(tiny("llama"), None, 0.2, method="random", seed=1)
    b = R.realign(tiny("llama"), None, 0.2, method="random", seed=1)
    c = R.realign(tiny("llama"), None, 0.2, method="random", seed=2)
    w = R.realign(tiny("llama"), seqs, 0.2, method="wanda")
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert any(not torch.equal(a.masks[n], c.masks[n]) for n in a.masks)
    assert any(not torch.equal(a.masks[n], w.masks[n]) for n in a.masks)
    assert a.counts == w.counts  # same per-row sizes


def test_scores_passed_in_give_the_same_result_as_computing_them():
    seqs = pad_batches(sequences(), 4, left=True)
    scores = R.wanda_scores(tiny("llama"), seqs)
    direct = R.realign(tiny("llama"), seqs, 0.15)
    reused = R.realign(tiny("llama"), None, 0.15, scores=scores)
    assert all(torch.equal(direct.masks[n], reused.masks[n]) for n in direct.masks)


# --------------------------------------------------------------------------- targets


def test_target_lists_suffixes_and_regexes():
    model = tiny("llama")
    assert set(R.resolve_targets(model, ["q_proj"])) == {
        f"model.layers.{i}.self_attn.q_proj" for i in range(2)
    }
    assert set(R.resolve_targets(model, ["model.layers.1.mlp.down_proj"])) == {"model.layers.1.mlp.down_proj"}
    assert set(R.resolve_targets(model, r"layers\.0\..*_proj$")) == {
        n for n, m in model.named_modules() if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)
    }
    assert "lm_head" in R.resolve_targets(model, ["lm_head"])
    assert set(R.resolve_targets(model, "down_proj")) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert len(R.resolve_targets(model, "all-linear")) == 2 * 7


@pytest.mark.parametrize("bad", [["nonexistent_proj"], "zzz_nomatch", ["model.layers.0.mlp"], "re:(", [], 5])
def test_unknown_targets_raise_user_error(bad):
    with pytest.raises(UserError):
        R.resolve_targets(tiny("llama"), bad)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, math.nan, "abc"])
def test_mask_ratio_outside_open_interval_is_a_user_error(ratio):
    with pytest.raises(UserError, match="mask ratio"):
        R.realign(tiny("llama"), pad_batches(sequences(), 2, left=False), ratio)


def test_empty_calibration_is_a_user_error():
    with pytest.raises(UserError, match="empty"):
        R.wanda_scores(tiny("llama"), [])
    all_pad = [
        {
            "input_ids": torch.zeros(2, 4, dtype=torch.long),
            "attention_mask": torch.zeros(2, 4, dtype=torch.long),
        }
    ]
    with pytest.raises(UserError, match="empty"):
        R.realign(tiny("llama"), all_pad, 0.1)


def test_malformed_batches_and_methods_are_user_errors():
    model = tiny("llama")
    with pytest.raises(UserError):
        R.wanda_scores(model, [{"tokens": torch.ones(1, 3)}])
    with pytest.raises(UserError, match="shape"):
        R.wanda_scores(
            model, [{"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 4)}]
        )
    with pytest.raises(UserError, match="method"):
        R.realign(model, None, 0.1, method="sparsegpt")


# --------------------------------------------------------------------------- calibration data, hash, saving


def word_tokenizer(padding_side: str = "right"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<eos>", "how", "do", "i", "make", "a", "bomb", "sure", "here", "is"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side=padding_side,
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_calibration_batches_pad_truncate_and_append_eos(side):
    tok = word_tokenizer(side)
    texts = ["how do i make a bomb", "sure", "here is a bomb how do i", "i"]
    batches = R.calibration_batches(tok, texts, batch_size=3, max_length=5)
    seqs = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            real = ids[mask.bool()].tolist()
            seqs.append(real)
            if side == "left":
                assert mask.tolist() == sorted(mask.tolist())  # zeros first
            else:
                assert mask.tolist() == sorted(mask.tolist(), reverse=True)
    assert sorted(map(tuple, seqs)) == sorted([(3, 4, 5, 6, 7), (9, 2), (10, 11, 7, 8, 3), (5, 2)])
    assert [len(b["input_ids"]) for b in batches] == [3, 1]


def test_calibration_hash_ignores_batching_padding_and_order_but_not_content():
    seqs = sequences()
    h = R.calibration_hash(pad_batches(seqs, 1, left=False))
    assert h.startswith("sha256:")
    assert h == R.calibration_hash(pad_batches(seqs, 3, left=True, pad_id=9))
    assert h == R.calibration_hash(pad_batches(seqs[::-1], 4, left=False))
    changed = [s.clone() for s in seqs]
    changed[0][0] = (changed[0][0] + 1) % VOCAB
    assert h != R.calibration_hash(pad_batches(changed, 1, left=False))
    assert h != R.calibration_hash(pad_batches(seqs[1:], 1, left=False))


def test_save_realigned_writes_model_mask_and_record(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = tiny("llama")
    batches = pad_batches(sequences(), 4, left=True)
    result = R.realign(model, batches, 0.1)
    out = R.save_realigned(model, result, tmp_path / "out", calibration_digest=R.calibration_hash(batches))
    record = json.loads((out / "realign.json").read_text())
    assert record["mask_ratio"] == 0.1 and record["method"] == "wanda"
    assert record["counts"] == result.counts and record["calibration_hash"].startswith("sha256:")
    assert record["versions"]["torch"] == torch.__version__.split("+")[0] or record["versions"]["torch"]
    masks = load_file(str(out / "realign_mask.safetensors"))
    assert set(masks) == set(result.masks)
    assert all(torch.equal(masks[n].bool(), result.masks[n]) for n in masks)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    for name, module in reloaded.named_modules():
        if name in result.masks:
            assert torch.all(module.weight[result.masks[name]] == 0)
    assert (out / "model.safetensors").exists()


def test_save_realigned_lora_saves_the_pruned_adapter(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    model = lora_model()
    result = R.realign(model, pad_batches(sequences(), 4, left=False), 0.3)
    out = R.save_realigned(model, result, tmp_path / "adapter")
    assert json.loads((out / "realign.json").read_text())["saved"] == "adapter"
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all("lora_" in k for k in weights)
    reloaded = PeftModel.from_pretrained(tiny("llama").double(), str(out))
    named = dict(reloaded.named_modules())
    for name, mask in result.masks.items():
        assert torch.all(named[name].weight[mask] == 0)
        assert int((named[name].weight != 0).sum()) == mask.numel() - int(mask.sum())


def test_scoring_only_reads_the_model():
    """Hooks collect statistics only: weights, outputs and the train/eval mode are unchanged afterwards."""
    model = tiny("llama")
    model.train()
    ids = torch.randint(3, VOCAB, (1, 9))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.train()
    R.wanda_scores(model, pad_batches(sequences(), 3, left=True))
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_realign_peak_memory_holds_no_copy_of_the_weights():
    """Full fine-tuning, every linear layer a target: realign may add the bool masks (1 byte per target
    weight, a quarter of fp32 weights), one module's scores and sort, and one batch of activations, but
    never a float copy of all targets (that alone would add 1x the weights)."""
    import transformers as T

    from robustlab.antidote.memory import realign_peak

    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = T.LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 1000, (2, 32), generator=gen)} for _ in range(2)]
    # warm-up: the first forward pass and sort of a process grow the allocator's pools once (~1x the weights
    # of this small model in RSS); what is measured is what realign itself keeps alive at its peak
    R.realign_masks(model, batches[:1], [0.1], targets="all-linear")
    report = realign_peak(model, batches, 0.1, targets="all-linear")
    assert report["weights"] > 50e6 and report["modules"] == 4 * 7
    assert report["added_over_weights"] < 0.5, report
