"""FedProx (Li et al., MLSys 2020): FedAvg aggregation; each client adds ``(mu/2) ||w - w_t||^2`` to its loss
(``proximal-mu`` in the training config, the key Flower's ``FedProx`` uses)."""

from __future__ import annotations

from typing import Any

from robustlab.fedld.strategies.aggregators import FlowerMean
from robustlab.fedld.strategies.base import DeltaStrategy


class FedProx(DeltaStrategy):
    """FedProx: :class:`FlowerMean` on the server, the proximal term on the clients."""

    def __init__(self, *, proximal_mu: float = 0.01, **kwargs: Any) -> None:
        super().__init__(FlowerMean(), **kwargs)
        if not proximal_mu >= 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = float(proximal_mu)

    def client_config(self) -> dict[str, Any]:
        return {**super().client_config(), "proximal-mu": self.proximal_mu}
