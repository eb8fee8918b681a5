"""The offline demo's model and data: a tiny Llama-architecture model trained from scratch on the staged real
data, its BPE tokenizer, the demo's settings and its data slices (the experiment itself is
:mod:`robustlab.antidote.demo`, its tables and plots :mod:`robustlab.antidote.demo_report`).

No pretrained LLM is needed offline for the demo, so:

1. **Tokenizer**: byte-level BPE trained with the ``tokenizers`` library on the demo's pretraining corpus.
2. **Pretraining** (plain language modelling, cached on disk): BeaverTails harmful prompt+answer pairs from a
   pool disjoint from every evaluation, attack, calibration and held-out slice (so the base "knows" harmful
   content, as a pretrained LLM does), BeaverTails safe pairs, Alpaca instructions and answers, SST-2
   sentences and AG News articles (text only, no labels).
3. The slices of the experiment: alignment (harmful prompts -> templated refusals, plus Alpaca), the harmful
   fine-tuning mix (AG News + harmful pairs at ratio ``p``), calibration, held-out and evaluation sets.

The settings below were fixed before any evaluation number was looked at; see docs/antidote.md.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from robustlab.antidote.data import (
    COMPACT_INPUT,
    COMPACT_NO_INPUT,
    REFUSALS,
    Example,
    HarmfulFinetuningData,
    build_harmful_finetuning,
    load_beavertails,
    load_task,
    normalise,
)
from robustlab.antidote.train import TrainConfig, train
from robustlab.errors import UserError


@dataclass
class TinyModelConfig:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    max_position: int = 128


@dataclass
class DemoConfig:
    """Every setting of the demo; ``quick`` is what ``robustlab antidote demo`` and the reproduction run."""

    seeds: tuple[int, ...] = (0, 1, 2)
    task: str = "agnews"
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    max_length: int = 96
    # data
    n_finetune: int = 1000
    harmful_ratio: float = 0.2
    n_realign: int = 200
    n_heldout: int = 150
    n_eval_harmful: int = 150
    n_eval_task: int = 200
    n_align_refusal: int = 600
    n_align_alpaca: int = 400
    n_pretrain_docs: int = 5000
    # training
    pretrain: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            mode="full",
            lr=3e-3,
            epochs=1,
            batch_size=32,
            schedule="cosine",
            warmup_ratio=0.05,
            weight_decay=0.01,
        )
    )
    align: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            mode="full",
            lr=1e-3,
            epochs=2,
            batch_size=16,
            schedule="cosine",
            warmup_ratio=0.05,
            weight_decay=0.01,
        )
    )
    attack_full: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            mode="full", lr=5e-4, epochs=3, batch_size=16, schedule="constant", weight_decay=0.01
        )
    )
    attack_lora: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            mode="lora",
            lr=5e-3,
            epochs=3,
            batch_size=16,
            schedule="constant",
            weight_decay=0.01,
            lora_r=16,
            lora_alpha=32,
            lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        )
    )
    ratios_lora: tuple[float, ...] = (0.05, 0.1, 0.2)
    ratios_full: tuple[float, ...] = (0.01, 0.03, 0.1)
    modes: tuple[str, ...] = ("lora", "full")
    max_new_tokens_harmful: int = 8
    max_new_tokens_task: int = 4
    calibration_batch_size: int = 16
    eval_batch_size: int = 64


def demo_config(scale: str = "quick") -> DemoConfig:
    """``quick``: the demo (3 seeds, <= 8 minutes on 2 cores); ``full``: larger slices and evaluation sets;
    ``smoke``: a seconds-long run of every code path, for tests (its numbers mean nothing)."""
    if scale == "quick":
        return DemoConfig()
    if scale == "full":
        cfg = DemoConfig(
            n_finetune=2000,
            n_eval_harmful=1000,
            n_eval_task=1000,
            n_pretrain_docs=12000,
            n_realign=400,
            n_heldout=400,
            max_length=96,
        )
        cfg.pretrain = TrainConfig(**{**asdict(cfg.pretrain), "epochs": 2})
        return cfg
    if scale == "smoke":
        cfg = DemoConfig(
            seeds=(0,),
            model=TinyModelConfig(
                vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
            ),
            max_length=48,
            n_finetune=40,
            n_realign=8,
            n_heldout=6,
            n_eval_harmful=6,
            n_eval_task=6,
            n_align_refusal=16,
            n_align_alpaca=8,
            n_pretrain_docs=60,
            ratios_lora=(0.1, 0.2),
            ratios_full=(0.1,),
            max_new_tokens_harmful=3,
            max_new_tokens_task=2,
        )
        for name in ("pretrain", "align", "attack_full", "attack_lora"):
            setattr(cfg, name, TrainConfig(**{**asdict(getattr(cfg, name)), "epochs": 1}))
        return cfg
    raise UserError(f"unknown scale {scale!r}", "use quick or full")


# --------------------------------------------------------------------------- tokenizer and model


@dataclass(frozen=True)
class Doc:
    """A plain language-modelling document: every token is a target."""

    output: str
    prompt: str = ""


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (``tokenizers``) wrapped for transformers, with ``<s>`` prepended,
    ``</s>`` as EOS and ``<pad>`` for padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(tokenizer: Any, cfg: TinyModelConfig, seed: int) -> Any:
    """A from-scratch ``LlamaForCausalLM`` (tied embeddings) initialised from ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------- data


def demo_slices(cfg: DemoConfig, seed: int, data_dir: Any = None) -> HarmfulFinetuningData:
    """One seed's experiment slices (alignment, fine-tuning mix, calibration, held-out and evaluation sets;
    disjoint, asserted by :func:`build_harmful_finetuning`) in the compact template."""
    alpaca = load_task("alpaca", "train", data_dir)
    random.Random(10_000 + seed).shuffle(alpaca)
    data = build_harmful_finetuning(
        task=cfg.task,
        n=cfg.n_finetune,
        harmful_ratio=cfg.harmful_ratio,
        n_align=cfg.n_align_refusal,
        n_realign=cfg.n_realign,
        n_heldout=cfg.n_heldout,
        n_eval_harmful=cfg.n_eval_harmful,
        n_eval_task=cfg.n_eval_task,
        align_with_refusals=True,
        align_with_safe_pairs=False,
        align_benign=alpaca[: cfg.n_align_alpaca],
        data_dir=data_dir,
        seed=seed,
    )
    return compact(data)


def pretraining_docs(
    cfg: DemoConfig, slices: Sequence[HarmfulFinetuningData], seed: int, data_dir: Any = None
) -> list[Doc]:
    """The pretraining documents, disjoint (by normalised prompt) from every harmful slice of every seed in
    ``slices`` and from their AG News rows: harmful pairs (the alignment prompts' own harmful answers are in,
    as a pretrained LLM has seen such text), safe pairs, Alpaca, SST-2 sentences, AG News text."""
    excluded = {
        normalise(e.instruction)
        for data in slices
        for e in data.realign
        + data.heldout_harmful
        + data.eval_harmful
        + [x for x in data.finetune if x.source.startswith("beavertails")]
    }
    rng = random.Random(10_000 + seed)
    alpaca = load_task("alpaca", "train", data_dir)
    rng.shuffle(alpaca)
    pool = [e for e in load_beavertails("unsafe_train", data_dir) if normalise(e.instruction) not in excluded]
    docs = [Doc(f"{e.instruction}\n{e.output}") for e in pool]
    docs += [Doc(f"{e.instruction}\n{e.output}") for e in load_beavertails("safe", data_dir)]
    docs += [Doc(f"{e.instruction}\n{e.input}\n{e.output}".replace("\n\n", "\n")) for e in alpaca]
    used = {e.uid for data in slices for e in data.finetune + data.benign_calibration}
    news = [e for e in load_task(cfg.task, "train", data_dir) if e.uid not in used]
    docs += [Doc(e.input) for e in news]
    sst = load_task("sst2", "train", data_dir)
    rng.shuffle(sst)
    docs += [Doc(e.input) for e in sst[:1500]]
    rng.shuffle(docs)
    return docs[: cfg.n_pretrain_docs]


def demo_data(cfg: DemoConfig, seed: int, data_dir: Any = None) -> tuple[HarmfulFinetuningData, list[Doc]]:
    """One seed's slices and pretraining documents disjoint from them (a base of its own per seed)."""
    data = demo_slices(cfg, seed, data_dir)
    return data, pretraining_docs(cfg, [data], seed, data_dir)


#: The demo's AG News instruction: the official one's meaning in 12 tokens instead of 30 (tiny context).
DEMO_AGNEWS_INSTRUCTION = "Categorize the news article: World, Sports, Business or Sci/Tech"


def compact(data: HarmfulFinetuningData) -> HarmfulFinetuningData:
    """Every example with the compact template (and the short AG News instruction): with a 96-token context
    the official preamble and AG News instruction (73 tokens) would leave no room for the article."""
    import dataclasses

    def fix(e: Example) -> Example:
        instr = DEMO_AGNEWS_INSTRUCTION if e.source == "agnews" else e.instruction
        return dataclasses.replace(e, template="compact", instruction=instr)

    for name in (
        "alignment",
        "finetune",
        "realign",
        "benign_calibration",
        "heldout_harmful",
        "eval_harmful",
        "eval_task",
    ):
        setattr(data, name, [fix(e) for e in getattr(data, name)])
    return data


def tokenizer_corpus(docs: Sequence[Doc], data: HarmfulFinetuningData) -> list[str]:
    """Pretraining text plus the prompt templates and refusals, so the BPE learns them as a few tokens."""
    texts = [d.output for d in docs]
    texts += [
        COMPACT_NO_INPUT.format(instruction="x"),
        COMPACT_INPUT.format(instruction=DEMO_AGNEWS_INSTRUCTION, input="x"),
    ] * 200
    texts += list(REFUSALS) * 50
    texts += [e.output for e in data.finetune if not e.source.startswith("beavertails")][:200]
    return texts


# --------------------------------------------------------------------------- stages (cached on disk)


def load_or_build_base(
    cfg: DemoConfig,
    seed: int,
    docs: Sequence[Doc],
    data: HarmfulFinetuningData,
    cache: Path,
    log: Callable[..., None],
    name: str | None = None,
) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = cache / (name or f"base-seed{seed}")
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return LlamaForCausalLM.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    tokenizer = train_tokenizer(tokenizer_corpus(docs, data), cfg.model.vocab_size)
    model = tiny_llama(tokenizer, cfg.model, seed)
    t = time.perf_counter()
    model, res = train(
        model,
        tokenizer,
        docs,
        TrainConfig(**{**asdict(cfg.pretrain), "seed": seed, "max_length": cfg.max_length}),
    )
    log(
        stage="pretrain",
        seed=seed,
        loss_first=res.losses[0],
        loss_last=sum(res.losses[-10:]) / 10,
        steps=res.steps,
        tokens=res.tokens,
        seconds=time.perf_counter() - t,
    )
    tmp = cache / f".{folder.name}.tmp"
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    import shutil

    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return model, tokenizer


def train_config(base: TrainConfig, seed: int, max_length: int) -> TrainConfig:
    return TrainConfig(**{**asdict(base), "seed": seed, "max_length": max_length})


# --------------------------------------------------------------------------- the experiment


# --------------------------------------------------------------------------- aggregation, table, plot
