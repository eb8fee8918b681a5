"""Training stages: alignment SFT and (harmful) fine-tuning, with LoRA (peft) or full fine-tuning.

A plain loop: AdamW, constant or cosine schedule with warmup, loss only on response tokens (the prompt is
masked with -100), shuffling from one seed. Defaults are the official scripts' (brief §1.5):

- alignment: LoRA r=256, alpha=4 on q/k/v, lr 1e-3, 20 epochs, batch 5, cosine, warmup 0.1, weight decay 0.1;
- fine-tuning: a new LoRA with the same shape, lr 1e-4, 20 epochs, batch 5, constant, weight decay 0.1.

Defences that act during alignment or fine-tuning (Vaccine, RepNoise, Booster, Lisa, LDIFS) are registered in
:data:`robustlab.antidote.methods.REGISTRY`; ``sft`` is :func:`train`. They reuse :func:`train` with their own
``loss_fn`` or ``step_hook``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from robustlab.antidote.runtime import Runtime
from robustlab.errors import UserError

IGNORE_INDEX = -100


@dataclass
class TrainConfig:
    """One training stage. ``mode`` is ``lora`` (a new peft adapter) or ``full`` (all weights)."""

    mode: str = "lora"
    lr: float = 1e-4
    epochs: float = 20
    batch_size: int = 5
    weight_decay: float = 0.1
    schedule: str = "constant"  # constant | cosine | linear
    warmup_ratio: float = 0.1
    max_length: int = 256
    lora_r: int = 256
    lora_alpha: int = 4
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    max_grad_norm: float | None = None
    max_steps: int | None = None
    seed: int = 0
    #: recompute activations in the backward pass: less memory for long sequences, about a third more time
    gradient_checkpointing: bool = False

    def validate(self) -> TrainConfig:
        if self.mode not in ("lora", "full"):
            raise UserError(f"unknown training mode {self.mode!r}", "use lora or full")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise UserError(f"unknown schedule {self.schedule!r}", "use constant, cosine or linear")
        if self.lr <= 0 or self.epochs <= 0 or self.batch_size <= 0:
            raise UserError("lr, epochs and batch_size must be positive", "fix the training settings")
        if self.max_length < 8:
            raise UserError(f"max_length {self.max_length} is too small", "use at least 8 tokens")
        return self


#: The official alignment stage (``script/alignment/sft.sh``).
ALIGN_DEFAULTS = TrainConfig(mode="lora", lr=1e-3, epochs=20, batch_size=5, schedule="cosine")
#: The official harmful fine-tuning stage (``script/finetune/*.sh``, SST-2 default lr).
FINETUNE_DEFAULTS = TrainConfig(mode="lora", lr=1e-4, epochs=20, batch_size=5, schedule="constant")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------- tokenisation


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts in front of a text (e.g. BOS), found by encoding a probe with
    and without special tokens, so training, generation and calibration all see the same prefix."""
    probe = "a"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = _ids(tokenizer, probe)
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


def encode_prompt(tokenizer: Any, prompt: str, max_prompt: int) -> list[int]:
    """Prompt token ids (BOS when the tokenizer adds one). A too-long prompt keeps its head and its last 8
    tokens, so the ``### Response:`` cue survives truncation."""
    ids = _bos(tokenizer) + _ids(tokenizer, prompt)
    if len(ids) > max_prompt:
        tail = min(8, max_prompt // 2)
        ids = ids[: max_prompt - tail] + ids[-tail:]
    return ids


def encode_example(tokenizer: Any, prompt: str, answer: str, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for prompt + answer + EOS; labels are -100 on the prompt (loss on the answer
    only). The prompt takes at most 3/4 of ``max_length``; the answer is cut to what is left."""
    p = encode_prompt(tokenizer, prompt, max(1, (3 * max_length) // 4))
    a = _ids(tokenizer, answer)
    if tokenizer.eos_token_id is not None:
        a = [*a, tokenizer.eos_token_id]
    a = a[: max_length - len(p)]
    return p + a, [IGNORE_INDEX] * len(p) + a


def pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def collate(features: Sequence[tuple[list[int], list[int]]], pad: int) -> dict:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding)."""
    import torch

    width = max(len(f[0]) for f in features)
    ids = torch.full((len(features), width), pad, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, (x, y) in enumerate(features):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss(model: Any, batch: dict) -> Any:
    """Mean next-token cross-entropy over the response tokens of the batch (labels != -100)."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


# --------------------------------------------------------------------------- model preparation


def add_lora(model: Any, config: TrainConfig) -> Any:
    """Wrap ``model`` in a new trainable peft LoRA adapter (r, alpha, targets from ``config``)."""
    import torch
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in config.lora_targets if t not in names]
    if missing:
        raise UserError(
            f"LoRA target module(s) {', '.join(missing)} not found in the model",
            f"choose lora_targets among the model's module names (e.g. {', '.join(sorted(names - {''})[:6])})",
        )
    torch.manual_seed(config.seed)
    lcfg = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lcfg)


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if schedule == "constant":
            return 1.0  # HF's "constant" ignores warmup, as in the official fine-tuning scripts
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    config: TrainConfig,
    loss_fn: Callable[[Any, dict], Any] = response_loss,
    step_hook: Callable[[int, Any, dict], None] | None = None,
    log: Callable[..., None] | None = None,
    log_every: int = 10,
    runtime: Runtime | None = None,
) -> tuple[Any, TrainResult]:
    """Train ``model`` on ``examples`` (objects with ``.prompt`` and ``.output``) and return
    ``(model, result)``. With ``mode="lora"`` a new adapter is added first and the returned model is the
    ``PeftModel``; with ``mode="full"`` every parameter is trained in place.

    ``runtime`` places the model (unless a device map did) and sets the precision: every batch goes to the
    model's input device, and for bfloat16/float16 the forward pass runs under ``torch.autocast`` (a new
    LoRA adapter stays float32, peft's default, so the optimiser updates full-precision weights; float16 on
    CUDA adds loss scaling). Without ``runtime`` (and outside a ``use_runtime`` block) the model stays
    where it is, in its dtype.

    Deterministic for a seed on CPU: the batch order comes from ``random.Random(seed)``, LoRA init from
    ``torch.manual_seed(seed)``.
    """
    import contextlib
    import time

    import torch

    config.validate()
    if not examples:
        raise UserError("the training set is empty", "pass at least one example")
    runtime = runtime or Runtime.entered()
    if runtime is not None:
        model = runtime.place(model)
    if config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(
                f"{type(model).__name__} does not support gradient checkpointing",
                "set gradient_checkpointing: false",
            )
        # non-reentrant: gradients reach a LoRA adapter although the frozen embeddings need none
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    autocast = runtime.autocast if runtime is not None else contextlib.nullcontext
    scaler = runtime.grad_scaler() if runtime is not None else None
    if config.mode == "lora":
        model = add_lora(model, config)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    feats = [encode_example(tokenizer, e.prompt, e.output, config.max_length) for e in examples]
    pad = pad_id(tokenizer)
    steps_per_epoch = math.ceil(len(feats) / config.batch_size)
    total = math.ceil(steps_per_epoch * config.epochs)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(config.schedule, int(config.warmup_ratio * total), total)
    )
    device = (runtime or Runtime.cpu()).input_device(model)
    rng = random.Random(config.seed)
    result = TrainResult()
    start = time.perf_counter()
    step = 0
    while step < total:
        order = list(range(len(feats)))
        rng.shuffle(order)
        for b in range(0, len(order), config.batch_size):
            if step >= total:
                break
            batch = collate([feats[i] for i in order[b : b + config.batch_size]], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            if step_hook is not None:
                step_hook(step, model, batch)
            result.losses.append(float(loss.detach()))
            result.tokens += int(batch["attention_mask"].sum())
            step += 1
            if log is not None and (step % log_every == 0 or step == total):
                log(step=step, loss=sum(result.losses[-log_every:]) / len(result.losses[-log_every:]))
    result.steps = step
    result.seconds = time.perf_counter() - start
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return model, result


def merge_lora(model: Any) -> Any:
    """Merge a peft adapter into its base weights (the official code merges the alignment adapter first)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def with_overrides(base: TrainConfig, **overrides: Any) -> TrainConfig:
    unknown = set(overrides) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown training setting(s): {', '.join(sorted(unknown))}", "remove or rename them")
    if "lora_targets" in overrides and overrides["lora_targets"] is not None:
        overrides["lora_targets"] = tuple(overrides["lora_targets"])
    return replace(base, **overrides).validate()
