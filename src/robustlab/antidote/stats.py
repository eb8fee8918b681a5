"""Summary statistics over seeds shared by the demo and the sweep."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from robustlab import claims


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of the 95% t-interval of :func:`robustlab.claims.mean_ci` (0 for a single
    value; missing and non-finite values are dropped), the form the demo's and sweep's tables print."""
    m, _, hi = claims.mean_ci(values)
    return m, hi - m


def seed_summary(rows: Sequence[dict], measures: Iterable[str]) -> dict[str, float]:
    """``{m: mean, m + "_ci": half-width}`` over ``rows`` (one per seed) for each of ``measures`` that some row
    has (a row without it, or with None, is left out of that measure's interval)."""
    out: dict[str, float] = {}
    for m in measures:
        if any(r.get(m) is not None for r in rows):
            out[m], out[m + "_ci"] = mean_ci([r.get(m) for r in rows])
    return out
