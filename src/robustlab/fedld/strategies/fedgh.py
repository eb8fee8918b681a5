"""FedGH (gradient harmonization; Zhang et al., 2023) **as the FedLD repository runs it**
(``svd_tools.pcgrad_hierarchy``), the variant FedLD's paper compares against; not the FedGH authors' code."""

from __future__ import annotations

from typing import Any

from robustlab.fedld.protocol import NDict
from robustlab.fedld.strategies.aggregators import GradientHarmony
from robustlab.fedld.strategies.base import DeltaStrategy


class FedGH(DeltaStrategy):
    """FedGH (FedLD repository's variant): :class:`GradientHarmony` on the server, plain SGD clients; the
    aggregator's history (EMA of past aggregates) is the strategy state."""

    HISTORY = GradientHarmony.HISTORY

    def __init__(self, **kwargs: Any) -> None:
        self.harmony = GradientHarmony()
        super().__init__(self.harmony, **kwargs)

    @property
    def history(self) -> NDict | None:
        """The EMA of past aggregates (``None`` before the first round)."""
        return self.harmony.history
