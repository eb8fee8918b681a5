"""MOON (Li, He & Song, CVPR 2021): model-contrastive federated learning."""

from __future__ import annotations

from typing import Any

from robustlab.fedld.strategies.aggregators import FlowerMean
from robustlab.fedld.strategies.base import DeltaStrategy


class MOON(DeltaStrategy):
    """MOON: FedAvg aggregation (:class:`FlowerMean`); clients add the model-contrastive loss ``mu * l_con``
    between the current representation, the global model's and their previous local model's (kept in
    ``context.state``), with temperature ``tau``."""

    local_algorithm = "moon"

    def __init__(self, *, mu: float = 1.0, tau: float = 0.5, **kwargs: Any) -> None:
        super().__init__(FlowerMean(), **kwargs)
        if mu < 0 or tau <= 0:
            raise ValueError(f"MOON needs mu >= 0 and tau > 0, got mu={mu}, tau={tau}")
        self.mu, self.tau = float(mu), float(tau)

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "moon-mu": self.mu, "moon-tau": self.tau}
