"""Summary statistics over seeds shared by the demo and the sweep."""

from __future__ import annotations

import math
from collections.abc import Sequence

from robustlab.claims import T975  # the t quantiles every system's intervals use


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
