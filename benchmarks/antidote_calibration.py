"""Antidote calibration throughput: batched scoring with a padding mask vs the official batch-size-1 way.

Both paths score the same randomly initialised Llama (about 70M parameters by default) on the same calibration
set of random-length sequences:

- **baseline (official way)**: batch size 1, no padding, one forward pass per sample, hooks that keep the
  official ``WrappedGPT.add_batch`` statistic (running mean over samples of the per-sample sum of x_j^2),
  then ``|W| * sqrt(statistic)``. (The official code also replays every decoder layer sample by sample, so
  its real cost is higher than this baseline's.)
- **batched**: ``robustlab.antidote.realign.wanda_scores`` on padded batches (left padding, sorted by length),
  padded tokens excluded.

Masks for several ratios must be identical; the script asserts it on a float64 copy of the model (where
forward passes of different batch shapes agree to ~1e-15, so no near-tie can flip) and reports how many
entries differ in float32 (only near-ties can). It also records peak memory against model size.

    python benchmarks/antidote_calibration.py --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from robustlab.antidote.realign import WandaScores, masks_for_ratios, resolve_targets, wanda_scores

RATIOS = (0.01, 0.05, 0.1, 0.2)


def build_llama(
    hidden: int, layers: int, intermediate: int, heads: int, vocab: int, seed: int, dtype, device
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    return model


def calibration_set(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    return [torch.randint(3, vocab, (int(L),), generator=gen) for L in lengths]


def padded_batches(seqs, batch_size: int, left: bool = True):
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [seqs[i] for i in order[start : start + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(chunk):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[r, sl] = s
            mask[r, sl] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def official_scores(model, seqs, device) -> WandaScores:
    """Batch size 1, unpadded; the official running-mean statistic (WrappedGPT.add_batch), then Wanda."""
    targets = resolve_targets(model, "all-linear")
    acc = {n: torch.zeros(m.weight.shape[1], dtype=torch.float64, device=device) for n, m in targets.items()}
    nsamples = {n: 0 for n in targets}

    def hook(name):
        def add_batch(module, args):
            inp = args[0].reshape(-1, args[0].shape[-1]).t()  # (in, tokens) as in WrappedGPT
            tmp = 1  # batch size 1
            acc[name] *= nsamples[name] / (nsamples[name] + tmp)
            nsamples[name] += tmp
            col = inp.double() if inp.dtype == torch.float64 else inp.float()
            acc[name] += torch.linalg.vector_norm(col, dim=1, dtype=torch.float64) ** 2 / nsamples[name]

        return add_batch

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            for s in seqs:
                model(input_ids=s[None].to(device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    scores = WandaScores()
    for n, m in targets.items():
        dtype = torch.float64 if m.weight.dtype == torch.float64 else torch.float32
        scores[n] = m.weight.detach().abs().to(dtype) * acc[n].sqrt().to(dtype)[None, :]
        scores.out_axis[n] = 0
    return scores


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = fn()
    sync(device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if str(device).startswith("cuda") else None
    return result, seconds, peak


def compare_masks(a: WandaScores, b: WandaScores) -> dict:
    ma, mb = masks_for_ratios(a, RATIOS), masks_for_ratios(b, RATIOS)
    diff = {str(r): int(sum(int((ma[r][n] != mb[r][n]).sum()) for n in ma[r])) for r in RATIOS}
    return {"differing_entries": diff, "identical": all(v == 0 for v in diff.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--samples", type=int, default=None, help="calibration sequences (default 512 on GPU, 48 on CPU)"
    )
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=None, help="default 256 on GPU, 128 on CPU")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--memory-sizes", default="256x4,512x12,768x16", help="hidden x layers for the memory sweep"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    torch.set_num_threads(args.threads)
    n = args.samples or (512 if gpu else 48)
    max_len = args.max_len or (256 if gpu else 128)
    seqs = calibration_set(n, args.min_len, max_len, args.vocab, args.seed)
    tokens = sum(len(s) for s in seqs)
    batches = padded_batches(seqs, args.batch_size, left=True)
    padded_tokens = sum(b["input_ids"].numel() for b in batches)

    model = build_llama(
        args.hidden, args.layers, args.intermediate, args.heads, args.vocab, args.seed, torch.float32, device
    )
    params = sum(p.numel() for p in model.parameters())
    print(
        f"Llama {params / 1e6:.1f}M params on {device}; {n} sequences, {tokens} tokens ({padded_tokens} padded)",
        flush=True,
    )

    # warm-up both paths on a few samples (kernels, allocator)
    official_scores(model, seqs[:2], device)
    wanda_scores(model, batches[:1], targets="all-linear")

    base, t_base, peak_base = timed(lambda: official_scores(model, seqs, device), device)
    print(f"official bs=1: {t_base:.2f}s ({tokens / t_base:.0f} tok/s)", flush=True)
    ours, t_ours, peak_ours = timed(lambda: wanda_scores(model, batches, targets="all-linear"), device)
    print(f"batched bs={args.batch_size}: {t_ours:.2f}s ({tokens / t_ours:.0f} tok/s)", flush=True)
    fp32 = compare_masks(base, ours)
    print(f"float32 masks: {fp32}", flush=True)
    del base, ours

    # exact identity on a float64 copy of the same model and calibration set
    model64 = model.double()
    base64 = official_scores(model64, seqs, device)
    ours64 = wanda_scores(model64, batches, targets="all-linear")
    fp64 = compare_masks(base64, ours64)
    print(f"float64 masks: {fp64}", flush=True)
    assert fp64["identical"], f"masks differ between batched and batch-size-1 scoring: {fp64}"
    del model64, base64, ours64
    if gpu:
        torch.cuda.empty_cache()

    # peak memory of batched scoring against model size
    memory = []
    for spec in args.memory_sizes.split(","):
        if not spec:
            continue
        h, L = (int(v) for v in spec.split("x"))
        m = build_llama(
            h, L, int(h * 2.6875) // 16 * 16, max(4, h // 64), args.vocab, args.seed, torch.float32, device
        )
        p = sum(q.numel() for q in m.parameters())
        weights = sum(q.numel() * q.element_size() for q in m.parameters())
        sub = batches[: max(1, len(batches) // 4)]
        _, secs, peak = timed(lambda m=m, sub=sub: wanda_scores(m, sub, targets="all-linear"), device)
        row = {"hidden": h, "layers": L, "params": p, "weight_bytes": weights, "seconds": secs}
        if peak is not None:
            row |= {"peak_bytes": peak, "peak_over_weights": peak / weights}
        memory.append(row)
        print(f"memory {spec}: {row}", flush=True)
        del m
        if gpu:
            torch.cuda.empty_cache()

    result = {
        "benchmark": "antidote_calibration",
        "device": torch.cuda.get_device_name(device) if gpu else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": {
            "arch": "llama",
            "params": params,
            "hidden": args.hidden,
            "layers": args.layers,
            "dtype": "float32",
        },
        "calibration": {
            "sequences": n,
            "tokens": tokens,
            "padded_tokens": padded_tokens,
            "min_len": args.min_len,
            "max_len": max_len,
        },
        "batch_size": args.batch_size,
        "baseline": {
            "what": "official way: batch size 1, unpadded, WrappedGPT running mean",
            "seconds": t_base,
            "tokens_per_s": tokens / t_base,
            "peak_bytes": peak_base,
        },
        "batched": {
            "what": "wanda_scores, padded batches with mask",
            "seconds": t_ours,
            "tokens_per_s": tokens / t_ours,
            "peak_bytes": peak_ours,
        },
        "speedup": t_base / t_ours,
        "goal_speedup": 5.0,
        "masks_float64": fp64,
        "masks_float32": fp32,
        "ratios": list(RATIOS),
        "memory_vs_model_size": memory,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"antidote_calibration_{device.type}.json"
    path.write_text(json.dumps(result, indent=2))
    print(
        f"speedup {result['speedup']:.2f}x (goal >= 5x); masks identical in float64: {fp64['identical']}; wrote {path}"
    )


if __name__ == "__main__":
    main()
