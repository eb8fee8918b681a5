"""Summary statistics over seeds shared by the demo and the sweep."""

from __future__ import annotations

from collections.abc import Sequence

from robustlab import claims


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95% t-interval of :func:`robustlab.claims.mean_ci` (0 for a single
    value; missing and non-finite values are dropped), the form the demo's and sweep's tables print."""
    m, _, hi = claims.mean_ci(values)
    return m, hi - m
