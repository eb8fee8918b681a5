"""FedAvg (McMahan et al., AISTATS 2017) and the two controls that take FedLD's update apart.

* :class:`FedAvg`: ``w <- sum_i p_i w_i``, ``p_i = n_i / sum n`` (Flower's arithmetic, bit for bit);
* :class:`FedAvgUnweighted`: ``w <- w + (1/m) sum_i Delta_i`` (FedLD ignores client sizes);
* :class:`FedAvgServerLR`: ``w <- w + eta sum_i p_i Delta_i``; with ``eta`` set to FedLD's measured
  update-size ratio it separates "FedLD takes smaller steps" from "FedLD takes different steps".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from robustlab.fedld.protocol import NDict
from robustlab.fedld.strategies.aggregators import DeltaMean, FlowerMean
from robustlab.fedld.strategies.base import DeltaStrategy


class FedAvg(DeltaStrategy):
    """FedAvg: the sample-weighted mean of the client models (:class:`FlowerMean`); plain SGD clients."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(FlowerMean(), **kwargs)


class FedAvgUnweighted(DeltaStrategy):
    """Control: FedAvg with a plain (unweighted) mean of the deltas, as FedLD ignores client sizes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(DeltaMean(weighted=False), **kwargs)


class FedAvgServerLR(DeltaStrategy):
    """Control: FedAvg with a server learning rate, ``w <- w + server_lr * sum_i p_i Delta_i``.

    The server lr is checkpointed: a resumed run keeps the step size it started with, even if the FedLD run
    it was matched to has since changed (e.g. been extended to more rounds).
    """

    SERVER_LR = "server-lr"

    def __init__(self, *, server_lr: float, **kwargs: Any) -> None:
        super().__init__(DeltaMean(weighted=True), server_lr=server_lr, **kwargs)

    def state_dict(self) -> NDict:
        return {self.SERVER_LR: np.array(self.server_lr)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        unknown = set(state) - {self.SERVER_LR}
        if unknown:
            raise ValueError(f"FedAvgServerLR keeps only {self.SERVER_LR!r}, got {sorted(unknown)}")
        if self.SERVER_LR in state:  # checkpoints written before the lr was saved lack it
            self.server_lr = float(state[self.SERVER_LR])
