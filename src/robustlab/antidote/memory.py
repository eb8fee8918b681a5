"""Peak memory of one call, for the re-alignment benchmark: resident set size (RSS) on the CPU,
``torch.cuda.max_memory_allocated`` on a GPU.

On Linux the kernel's RSS high-water mark (``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs``,
so the peak of one call is read exactly, whatever ran before it in the process. Where that is not possible
the RSS is sampled every millisecond in a thread (a lower bound of the true peak).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["MemoryPeak", "measure_peak", "realign_peak", "rss_bytes", "weights_bytes"]

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """The process's resident set size now."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # reset took effect (1 MiB slack)


@dataclass
class MemoryPeak:
    """``before``: bytes in use when the call started (RSS, or CUDA allocated); ``peak``: the most during it;
    ``method``: how the peak was read (``hwm``, ``sampled`` or ``cuda``)."""

    device: str
    before: int
    peak: int
    method: str

    @property
    def added(self) -> int:
        """What the call needed on top of what was already in use."""
        return max(0, self.peak - self.before)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "added": self.added}


def measure_peak(fn: Callable[[], Any], device: Any = "cpu") -> tuple[Any, MemoryPeak]:
    """Run ``fn()`` and return ``(its result, MemoryPeak)``: process RSS for a CPU device, allocated CUDA
    memory of that device for a CUDA one."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        return result, MemoryPeak(str(dev), before, torch.cuda.max_memory_allocated(dev), "cuda")
    before = rss_bytes()
    if _reset_high_water_mark():
        result = fn()
        hwm = _status_kib("VmHWM")
        return result, MemoryPeak("cpu", before, (hwm or 0) * 1024, "hwm")
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, MemoryPeak("cpu", before, max(peak[0], rss_bytes()), "sampled")


def weights_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def realign_peak(
    model: Any, calibration: Any, mask_ratio: float, baseline: int | None = None, **realign_kwargs: Any
) -> dict[str, Any]:
    """Run :func:`robustlab.antidote.realign.realign` (in place) and report its peak memory against the
    model's weights.

    ``baseline``: the memory in use before the model was loaded (RSS after imports, or CUDA allocated), so
    that ``peak_over_weights = (peak - baseline) / weights``; without it, ``peak - before + weights`` stands
    for the model's share (the call's own peak plus the weights it works on). ``added_over_weights`` is what
    realign needs beyond what was in use, relative to the weights.
    """
    from robustlab.antidote.calibration import model_device
    from robustlab.antidote.realign import realign

    calibration = list(calibration)
    device = model_device(model)
    weights = weights_bytes(model)
    result, peak = measure_peak(lambda: realign(model, calibration, mask_ratio, **realign_kwargs), device)
    share = peak.peak - baseline if baseline is not None else peak.added + weights
    return {
        **peak.as_dict(),
        "weights": weights,
        "baseline": baseline,
        "peak_over_weights": share / weights,
        "added_over_weights": peak.added / weights,
        "zeroed": result.total_zeroed,
        "modules": len(result.masks),
    }
